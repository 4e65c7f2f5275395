"""attnext.causal_mean against the lecture's (tril / tril.sum) @ x."""
import pytest
import torch

import attnext
from attnext import reference

native = pytest.mark.skipif(not attnext.native_available(), reason="attnext._C not built")

# (shape, what the case covers)
SHAPES = [
    ((1, 1), "T = 1, C = 1"),
    ((8, 32), "no batch dims"),
    ((4, 8, 2), "the lecture's (B, T, C) = (4, 8, 2)"),
    ((2, 3, 17, 5), "two batch dims, odd T"),
    ((2, 9, 300), "C > one column block (256), ragged last block"),
    ((0, 5, 3), "empty batch"),
    ((3, 0, 4), "T = 0"),
]
IDS = [str(s) for s, _ in SHAPES]


def _x(shape, dtype=torch.float64, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("shape,why", SHAPES, ids=IDS)
def test_forward_backward_float64(shape, why):
    x = _x(shape)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, r = attnext.causal_mean(x1), reference.causal_mean(x2)
    torch.testing.assert_close(y, r, rtol=1e-12, atol=1e-12)
    g = torch.randn(r.shape, dtype=r.dtype)  # one shared grad_out
    y.backward(g)
    r.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_dtypes(dtype, tol):
    x = _x((3, 40, 20))
    y = attnext.causal_mean(x.to(dtype))
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), reference.causal_mean(x), rtol=tol, atol=tol)


def test_non_contiguous_input():
    """nanoGPT-style transposed batch dims and a non-unit-stride last dim (copied)."""
    x = _x((3, 6, 4, 10))
    for v in (x.transpose(0, 1), x.transpose(-1, -2), x[..., ::2]):
        torch.testing.assert_close(attnext.causal_mean(v), reference.causal_mean(v), rtol=1e-12, atol=1e-12)


@native
def test_float32_accuracy_long_sequence():
    """T = 8192 in float32: error against a float64 oracle within eager matmul's own."""
    x64 = _x((1, 8192, 16)) + 3.0  # a mean offset: a plain float running sum would drift
    oracle = reference.causal_mean(x64)
    x = x64.float()
    err = (attnext.causal_mean(x).double() - oracle).abs().max().item()
    eager = (reference.causal_mean(x).double() - oracle).abs().max().item()
    assert err <= eager
    assert err <= 4e-7 * 4  # ~ one float32 rounding of values around 3-4


def test_gradcheck_gradgradcheck():
    x = _x((2, 5, 3)).requires_grad_()
    assert torch.autograd.gradcheck(attnext.causal_mean, (x,))
    assert torch.autograd.gradgradcheck(attnext.causal_mean, (x,))


@native
@pytest.mark.parametrize("shape", [(5, 3), (2, 7, 4), (2, 0, 3)], ids=str)
def test_opcheck(shape):
    x = _x(shape)
    torch.library.opcheck(torch.ops.attnext.causal_mean, (x,))
    torch.library.opcheck(torch.ops.attnext.causal_mean, (x.clone().requires_grad_(),))
    torch.library.opcheck(torch.ops.attnext._causal_mean_backward, (x,))
    torch.library.opcheck(torch.ops.attnext._causal_mean_backward, (x.clone().requires_grad_(),))


@native
def test_compile_fullgraph():
    torch._dynamo.reset()
    f = torch.compile(lambda x: attnext.causal_mean(x) * 2, fullgraph=True, backend="aot_eager")
    x = _x((2, 6, 3)).requires_grad_()
    y = f(x)
    torch.testing.assert_close(y, reference.causal_mean(x) * 2)
    (g,) = torch.autograd.grad(y.sum(), (x,))
    (r,) = torch.autograd.grad((reference.causal_mean(x) * 2).sum(), (x,))
    torch.testing.assert_close(g, r)


def test_fallback_parity():
    x = _x((2, 9, 5), torch.float32)
    fast = attnext.causal_mean(x)
    attnext.set_kernels_enabled(False)
    try:
        assert attnext.explain("causal_mean", x)
        slow = attnext.causal_mean(x)
    finally:
        attnext.set_kernels_enabled(True)
    torch.testing.assert_close(fast, slow, rtol=1e-6, atol=1e-6)


def test_bad_inputs():
    with pytest.raises(RuntimeError, match=r"at least 2 dims \(\.\.\., T, C\)"):
        attnext.causal_mean(torch.randn(5))
    with pytest.raises(RuntimeError, match="floating-point"):
        attnext.causal_mean(torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        attnext.causal_mean([[1.0]])


@native
def test_native_op_errors():
    with pytest.raises(RuntimeError, match=r"at least 2 dims"):
        torch.ops.attnext.causal_mean(torch.randn(5))
    with pytest.raises(RuntimeError, match="floating-point"):
        torch.ops.attnext._causal_mean_backward(torch.ones(3, 4, dtype=torch.int32))
