"""attnext.causal_softmax: values, gradients, dtypes, layouts, errors, opcheck."""
import math

import pytest
import torch

import attnext
from attnext import reference
from conftest import CPU_ISAS, TOL, assert_close_to_oracle, assert_python_ok_on_isa, devices, needs_native

ALIGNS = ["top_left", "bottom_right"]

# (shape, what code path it covers)
SHAPES = [
    ((1, 1), "T=1, S=1, no batch dims"),
    ((7, 7), "odd T, no batch dims"),
    ((3, 5, 5), "one batch dim, tiny rows (all in the vector tail)"),
    ((2, 16, 16), "rows exactly one AVX-512 vector long at the end"),
    ((2, 33, 33), "T = 2 * 16 + 1: full vectors plus a one-lane tail"),
    ((2, 3, 9, 20), "two batch dims, T < S (bottom-right shifts the diagonal right)"),
    ((2, 1, 2, 20, 9), "three batch dims, T > S (bottom-right: first rows see no key)"),
    ((4, 130, 130), "T crosses several vector widths and the row-grain of the parallel split"),
    ((1, 300, 1037), "long odd rows, S > T"),
]


def expected(x, scale, align):
    """torch itself on the masked input, as the issue states it (float64)."""
    T, S = x.shape[-2:]
    mask = reference.causal_mask(T, S, align == "bottom_right", x.device)
    y = torch.softmax((x.double() * scale).masked_fill(~mask, float("-inf")), -1)
    return torch.nan_to_num(y, nan=0.0) if (align == "bottom_right" and T > S) else y


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("align", ALIGNS)
@pytest.mark.parametrize("shape,_why", SHAPES)
def test_forward_and_grad_match_oracle(device, dtype, align, shape, _why):
    torch.manual_seed(0)
    scale = 0.37
    x = (3 * torch.randn(shape, dtype=torch.float64, device=device)).to(dtype)
    x.requires_grad_(True)
    y = attnext.causal_softmax(x, scale, align=align)
    assert y.shape == x.shape and y.dtype == dtype and y.is_contiguous()

    x64 = x.detach().double().requires_grad_(True)
    y64 = reference.causal_softmax(x64, scale, align == "bottom_right")
    torch.testing.assert_close(y64, expected(x64.detach(), scale, align), atol=1e-12, rtol=1e-10)
    eager = reference.causal_softmax(x.detach(), scale, align == "bottom_right")
    assert_close_to_oracle(y.detach(), y64.detach(), eager, dtype, "forward")

    # Masked entries are exactly zero.
    T, S = shape[-2:]
    mask = reference.causal_mask(T, S, align == "bottom_right", device)
    assert (y.detach()[..., ~mask] == 0).all()

    grad_out = torch.randn(shape, dtype=torch.float64, device=device)
    (gx,) = torch.autograd.grad(y, x, grad_out.to(dtype))
    (gx64,) = torch.autograd.grad(y64, x64, grad_out)
    xe = x.detach().clone().requires_grad_(True)
    (gxe,) = torch.autograd.grad(reference.causal_softmax(xe, scale, align == "bottom_right"), xe, grad_out.to(dtype))
    assert gx.dtype == dtype
    assert_close_to_oracle(gx, gx64, gxe, dtype, "grad")


@pytest.mark.parametrize("align", ALIGNS)
def test_fully_masked_rows_are_zero_not_nan(align):
    # bottom-right with T > S: the first T - S query rows see no key.
    x = torch.randn(2, 6, 3, requires_grad=True)
    y = attnext.causal_softmax(x, align=align)
    assert not torch.isnan(y).any()
    if align == "bottom_right":
        assert (y[:, :3] == 0).all()
        torch.testing.assert_close(y[:, 3:].sum(-1), torch.ones(2, 3))
    y.sum().backward()
    assert not torch.isnan(x.grad).any()


def test_rows_sum_to_one_and_first_row_is_one_hot():
    x = torch.randn(4, 50, 50)
    y = attnext.causal_softmax(x, 2.0)
    torch.testing.assert_close(y.sum(-1), torch.ones(4, 50))
    assert (y[:, 0, 0] == 1).all()


def test_matches_torch_softmax_with_lecture_masking():
    # The lecture: wei = q @ k.T * hs**-0.5; masked_fill(tril == 0, -inf); softmax.
    torch.manual_seed(1)
    B, T, hs = 4, 8, 16
    q, k = torch.randn(B, T, hs), torch.randn(B, T, hs)
    wei = q @ k.transpose(-2, -1)
    tril = torch.tril(torch.ones(T, T))
    lecture = torch.softmax((wei * hs**-0.5).masked_fill(tril == 0, float("-inf")), dim=-1)
    torch.testing.assert_close(attnext.causal_softmax(wei, hs**-0.5), lecture)


@pytest.mark.parametrize("device", devices())
def test_non_contiguous_views(device):
    torch.manual_seed(2)
    base = torch.randn(3, 40, 6, 40, device=device, dtype=torch.float64)
    x = base.transpose(1, 2)  # (3, 6, 40, 40): nanoGPT-like transposed batch dims, unit-stride rows
    assert not x.is_contiguous()
    torch.testing.assert_close(attnext.causal_softmax(x, 0.5), expected(x, 0.5, "top_left"))
    xt = base[:, :, 0, :].transpose(-1, -2)  # last dim not unit-stride: copied
    torch.testing.assert_close(attnext.causal_softmax(xt), expected(xt, 1.0, "top_left"))
    xs = base[:, ::2, 1, ::3]  # sliced with steps in both matrix dims
    torch.testing.assert_close(attnext.causal_softmax(xs), expected(xs, 1.0, "top_left"))
    # A non-contiguous gradient (expanded) for the backward.
    xg = base[0, :, 0, :].clone().requires_grad_(True)
    attnext.causal_softmax(xg).backward(torch.ones(40, 1).expand(40, 40))
    xr = base[0, :, 0, :].clone().requires_grad_(True)
    reference.causal_softmax(xr).backward(torch.ones(40, 1).expand(40, 40))
    torch.testing.assert_close(xg.grad, xr.grad)


@pytest.mark.parametrize("scale", [1.0, 0.125, -2.0, 0.0, 1e-3, 30.0])
def test_scales(scale):
    # Negative scale flips the order; zero gives a uniform distribution over the visible prefix.
    x = torch.randn(3, 21, 21, dtype=torch.float64)
    torch.testing.assert_close(attnext.causal_softmax(x, scale), expected(x, scale, "top_left"))


def test_large_magnitudes_do_not_overflow():
    x = torch.tensor([[1e30, 0.0], [-1e30, 1e30]])  # exp would overflow without the max shift
    y = attnext.causal_softmax(x)
    torch.testing.assert_close(y, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    x = torch.full((5, 17, 17), -80.0)  # exp(-80) is a float32 denormal in a naive version
    torch.testing.assert_close(attnext.causal_softmax(x, 1.0).sum(-1), torch.ones(5, 17))


@needs_native
@pytest.mark.parametrize("isa", CPU_ISAS)
def test_sharp_rows_give_zero_not_subnormal_weights(isa):
    # Scores up to 110 below their row's maximum: where exp(score - max) is below
    # float's smallest normal (2^-126 = exp(-87.34)), torch.softmax's float weight is
    # subnormal and attnext's is 0 (subnormal arithmetic costs a microcode assist per
    # operation on x86); every other weight is torch's. On each CPU kernel.
    code = (
        "import torch, attnext\n"
        "g = torch.Generator().manual_seed(0)\n"
        "x = -110 * torch.rand(6, 70, 70, generator=g)\n"
        "x[..., 0] = 0.0\n"
        "mask = torch.ones(70, 70, dtype=torch.bool).tril()\n"
        "for scale in (1.0, 1.5):\n"
        "    y = attnext.causal_softmax(x, scale)\n"
        "    z = (x * scale).masked_fill(~mask, float('-inf'))\n"
        "    flushed = (z - z.amax(-1, keepdim=True)) < -87.33654\n"
        "    torch_y = torch.softmax(z, -1)\n"
        "    assert flushed.any() and (torch_y[flushed] != 0).any()  # torch: subnormal weights there\n"
        "    assert (y[flushed] == 0).all()\n"
        "    ref = torch.softmax(z.double(), -1)\n"
        "    torch.testing.assert_close(y.double()[~flushed], ref[~flushed], atol=1e-44, rtol=2e-6)\n"
        "print('ok')\n"
    )
    assert_python_ok_on_isa(code, isa)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_non_finite_inputs_behave_like_torch_softmax(value, dtype):
    x = torch.randn(3, 20, 20, dtype=torch.float64)
    x[0, 10, 4] = value  # visible: that row behaves as torch.softmax
    x[1, 5, 12] = value  # masked (above the diagonal): never read, no effect
    x[2, 7, :8] = float("-inf")  # a whole visible prefix of -inf: NaN, like torch
    x = x.to(dtype)
    y = attnext.causal_softmax(x)
    ref = expected(x, 1.0, "top_left").to(dtype)
    torch.testing.assert_close(y, ref, equal_nan=True, atol=TOL[dtype][0], rtol=TOL[dtype][1])
    assert torch.isnan(y[2, 7]).all()  # torch.softmax's row is NaN throughout
    assert not torch.isnan(y[1]).any()


@pytest.mark.parametrize("shape", [(0, 5, 5), (3, 0, 4), (3, 4, 0), (0, 0)])
def test_empty_tensors(shape):
    x = torch.randn(shape, requires_grad=True)
    y = attnext.causal_softmax(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_gradcheck_and_gradgradcheck():
    for align in ALIGNS:
        x = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
        fn = lambda t: attnext.causal_softmax(t, 0.7, align=align)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x,))
        assert torch.autograd.gradgradcheck(fn, (x,))


@needs_native
def test_backward_op_gradcheck_directly():
    # The backward op's own derivative (double backward), with y a real softmax output.
    x = torch.randn(2, 6, 7, dtype=torch.float64)
    for br in (False, True):
        y = torch.ops.attnext.causal_softmax(x, 1.3, br).requires_grad_(True)
        dy = torch.randn_like(y, requires_grad=True)
        fn = lambda a, b: torch.ops.attnext._causal_softmax_backward(a, b, 1.3, br)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (dy, y))


@needs_native
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_opcheck(device, dtype):
    x = torch.randn(2, 3, 9, 11, device=device, dtype=dtype, requires_grad=dtype != torch.bfloat16)
    torch.library.opcheck(torch.ops.attnext.causal_softmax.default, (x, 0.5, False))
    torch.library.opcheck(torch.ops.attnext.causal_softmax.default, (x, 1.0, True))
    y = torch.ops.attnext.causal_softmax(x.detach(), 1.0, False).requires_grad_(x.requires_grad)
    dy = torch.randn_like(y)
    torch.library.opcheck(torch.ops.attnext._causal_softmax_backward.default, (dy, y, 1.0, False))


@needs_native
def test_kernel_is_used_by_default():
    x = torch.randn(3, 4)
    assert attnext.explain("causal_softmax", x) == []
    assert torch.ops.attnext._cpu_isa() in ("avx512", "avx2", "neon", "scalar")


# --------------------------------------------------------------------------- bad input


def test_rejects_integer_bool_and_complex():
    for t in (torch.ones(3, 3, dtype=torch.int64), torch.ones(3, 3, dtype=torch.bool), torch.ones(3, 3, dtype=torch.complex64)):
        with pytest.raises(RuntimeError, match="x must be a floating-point tensor"):
            attnext.causal_softmax(t)


@needs_native
def test_op_rejects_integer_directly():
    with pytest.raises(RuntimeError, match="x must be a floating-point tensor"):
        torch.ops.attnext.causal_softmax(torch.ones(3, 3, dtype=torch.int32), 1.0, False)
    with pytest.raises(RuntimeError, match="grad_y must have the shape of y"):
        torch.ops.attnext._causal_softmax_backward(torch.ones(3, 4), torch.ones(3, 3), 1.0, False)
    with pytest.raises(RuntimeError, match="same dtype"):
        torch.ops.attnext._causal_softmax_backward(torch.ones(3, 3), torch.ones(3, 3, dtype=torch.float64), 1.0, False)
    with pytest.raises(ValueError, match="scale must be a finite number"):
        torch.ops.attnext.causal_softmax(torch.ones(3, 3), float("nan"), False)


@pytest.mark.parametrize("shape", [(), (5,)])
def test_rejects_fewer_than_two_dims(shape):
    with pytest.raises(RuntimeError, match=r"x must have at least 2 dims \(\.\.\., T, S\)"):
        attnext.causal_softmax(torch.ones(shape))


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -math.inf])
def test_rejects_non_finite_scale(scale):
    with pytest.raises(ValueError, match="scale must be a finite number"):
        attnext.causal_softmax(torch.ones(3, 3), scale)


def test_rejects_bad_scale_type_and_align():
    with pytest.raises(TypeError, match="scale must be a Python number"):
        attnext.causal_softmax(torch.ones(3, 3), torch.tensor(1.0))
    with pytest.raises(ValueError, match="align must be 'top_left' or 'bottom_right'"):
        attnext.causal_softmax(torch.ones(3, 3), align="bottom")
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        attnext.causal_softmax([[1.0]])


def test_rejects_sparse():
    with pytest.raises(RuntimeError, match="x must be a dense"):
        attnext.causal_softmax(torch.eye(3).to_sparse())


def test_meta_tensors_give_shapes():
    x = torch.empty(2, 7, 9, device="meta")
    y = attnext.causal_softmax(x, 0.5)
    assert y.device.type == "meta" and y.shape == x.shape


def test_offsets_beyond_32_bits():
    # A view whose batch stride puts rows more than 2**31 elements into its storage: the
    # kernels' row addressing must be 64-bit. Only the touched pages are ever backed.
    T = S = 48
    stride_b = 2**30 + 7
    storage = torch.empty(2 * stride_b + T * S, dtype=torch.bfloat16)
    x = storage.as_strided((3, T, S), (stride_b, S, 1))
    g = torch.Generator().manual_seed(0)
    for b in range(3):
        x[b].copy_(torch.randn(T, S, generator=g))
    assert x.storage_offset() + 2 * stride_b + T * S > 2**31
    y = attnext.causal_softmax(x, 0.5)
    ref = reference.causal_softmax(x.float(), 0.5)
    torch.testing.assert_close(y.float(), ref, atol=1e-2, rtol=1e-2)
    dy = storage.as_strided((3, T, S), (stride_b, S, 1))  # a strided grad_y too
    if attnext.native_available():
        dx = torch.ops.attnext._causal_softmax_backward(dy, y, 0.5, False)
        dx_ref = reference.causal_softmax_backward(dy.float(), y.float(), 0.5, False)
        torch.testing.assert_close(dx.float(), dx_ref, atol=2e-2, rtol=2e-2)
