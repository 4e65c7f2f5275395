"""attnext.causal_attention_qkvpacked: q, k, v packed as (..., T, 3, nh, hs).

The oracle is causal_attention on the (..., nh, T, hs) views (the same kernels, so the
same bits) and reference.py in float64; plus the packed layouts of out and the gradient,
dropout, fallback, fake/opcheck, compile and errors.
"""
import pytest
import torch

import attnext
from attnext import reference

HAVE_KERNEL = attnext.native_available() and hasattr(torch.ops.attnext, "causal_attention_qkvpacked")
needs_native = pytest.mark.skipif(not HAVE_KERNEL, reason="attnext._C not built (or built without the packed op)")


def make_qkv(shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_()


def views(qkv):
    """q, k, v as separate leaf tensors equal to the (..., nh, T, hs) views of qkv."""
    return [t.detach().clone().requires_grad_() for t in reference.unpack_qkv(qkv.detach())]


SHAPES = [
    # qkv shape (..., T, 3, nh, hs): the path each covers
    (1, 3, 1, 16),  # no batch dim, T = 1
    (2, 67, 3, 2, 24),  # nanoGPT (B, T, 3, nh, hs), odd T inside one tile
    (2, 130, 3, 3, 64),  # T > tile, not a multiple of it
    (2, 2, 70, 3, 2, 16),  # two batch dims
]


@needs_native
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("align", ["top_left", "bottom_right"])
def test_matches_unpacked_op_on_views(shape, dtype, dropout_p, align):
    qkv = make_qkv(shape, dtype)
    q, k, v = views(qkv)
    out = attnext.causal_attention_qkvpacked(qkv, dropout_p=dropout_p, align=align,
                                             generator=torch.Generator().manual_seed(3))
    ref = attnext.causal_attention(q, k, v, dropout_p=dropout_p, align=align,
                                   generator=torch.Generator().manual_seed(3))  # (..., nh, T, hs)
    assert out.shape == (*shape[:-3], shape[-2], shape[-1]) and out.is_contiguous()
    assert torch.equal(out, ref.transpose(-3, -2))  # same kernels, same mask: the same bits
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    (gqkv,) = torch.autograd.grad(out, qkv, g)
    gq, gk, gv = torch.autograd.grad(ref, (q, k, v), g.transpose(-3, -2))
    assert gqkv.shape == qkv.shape and gqkv.is_contiguous()
    expect = torch.stack([t.transpose(-3, -2) for t in (gq, gk, gv)], dim=-3)
    if dtype == torch.bfloat16:  # the unpacked dQ sum may round at another point: one bf16 ulp
        torch.testing.assert_close(gqkv, expect, atol=1e-2, rtol=1e-2)
    else:
        assert torch.equal(gqkv, expect)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rows_too_long_to_copy_whole(dtype):
    # The float backward reads the packed Q and dO rows through compact copies and
    # accumulates dQ in a compact scratch while a batch's rows fit a per-thread budget
    # (T * (hs + hs_v) <= 2^21), and in place past it, as here (a large head size keeps
    # T, and the test's time under qemu, small).
    qkv = make_qkv((1, 520, 3, 1, 2048), dtype)
    q, k, v = views(qkv)
    out = attnext.causal_attention_qkvpacked(qkv)
    ref = attnext.causal_attention(q, k, v)
    assert torch.equal(out, ref.transpose(-3, -2))
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    (gqkv,) = torch.autograd.grad(out, qkv, g)
    gq, gk, gv = torch.autograd.grad(ref, (q, k, v), g.transpose(-3, -2))
    assert torch.equal(gqkv, torch.stack([t.transpose(-3, -2) for t in (gq, gk, gv)], dim=-3))
    if dtype == torch.float64:
        r, _ = reference.causal_attention_qkvpacked(qkv, 2048**-0.5)
        torch.testing.assert_close(out, r, atol=1e-10, rtol=1e-10)


@needs_native
def test_matches_reference_float64():
    qkv = make_qkv((2, 90, 3, 3, 16))
    out = attnext.causal_attention_qkvpacked(qkv, scale=0.3)
    ref, lse = reference.causal_attention_qkvpacked(qkv, 0.3)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    g = torch.randn_like(out)
    (a,) = torch.autograd.grad(out, qkv, g)
    (b,) = torch.autograd.grad(ref, qkv, g)
    torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    _, lse_k = torch.ops.attnext.causal_attention_qkvpacked(qkv.detach(), 0.3, 0.0, False, 0, 0)
    assert lse_k.shape == (2, 3, 90)
    torch.testing.assert_close(lse_k, lse, atol=1e-12, rtol=1e-12)


@needs_native
def test_heads_side_by_side_match_the_lecture():
    # out.view(B, T, nh * hs) is torch.cat over heads of each head's attention
    B, T, nh, hs = 2, 33, 3, 8
    qkv = make_qkv((B, T, 3, nh, hs))
    out = attnext.causal_attention_qkvpacked(qkv).view(B, T, nh * hs)
    heads = [reference.causal_attention(qkv[:, :, 0, h], qkv[:, :, 1, h], qkv[:, :, 2, h], hs**-0.5)[0]
             for h in range(nh)]
    torch.testing.assert_close(out, torch.cat(heads, dim=-1), atol=1e-10, rtol=1e-10)


@needs_native
def test_strided_input_is_read_in_place():
    # qkv a slice of a wider projection (row stride larger than 3 * nh * hs)
    B, T, nh, hs = 2, 40, 2, 16
    wide = make_qkv((B, T, 3 * nh * hs + 8))
    qkv = wide[..., 8:].unflatten(-1, (3, nh, hs))  # (B, T, 3, nh, hs), row stride 3 * nh * hs + 8
    assert not qkv.is_contiguous()
    out = attnext.causal_attention_qkvpacked(qkv)
    ref, _ = reference.causal_attention_qkvpacked(qkv, hs**-0.5)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    (g,) = torch.autograd.grad(out.sum(), wide)
    (gr,) = torch.autograd.grad(ref.sum(), wide)
    torch.testing.assert_close(g, gr, atol=1e-10, rtol=1e-10)


@needs_native
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_gradcheck(dropout_p):
    qkv = make_qkv((1, 9, 3, 2, 4))

    def f(x):  # a fixed generator per call: the same mask in every evaluation
        return attnext.causal_attention_qkvpacked(x, dropout_p=dropout_p, generator=torch.Generator().manual_seed(7))

    assert torch.autograd.gradcheck(f, (qkv,))


def test_fallback_parity():
    qkv = make_qkv((2, 21, 3, 2, 8), torch.float32)
    kw = dict(dropout_p=0.3, align="bottom_right")
    out = attnext.causal_attention_qkvpacked(qkv, generator=torch.Generator().manual_seed(5), **kw)
    (g,) = torch.autograd.grad(out.sum(), qkv)
    attnext.set_kernels_enabled(False)
    try:
        assert attnext.explain("causal_attention_qkvpacked", qkv)
        ref = attnext.causal_attention_qkvpacked(qkv, generator=torch.Generator().manual_seed(5), **kw)
        (gr,) = torch.autograd.grad(ref.sum(), qkv)
    finally:
        attnext.set_kernels_enabled(True)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(g, gr, atol=2e-5, rtol=2e-5)


def test_float16_takes_the_fallback_on_cpu():
    qkv = make_qkv((1, 12, 3, 2, 8), torch.float16)
    if HAVE_KERNEL:
        assert any("float16" in r for r in attnext.explain("causal_attention_qkvpacked", qkv))
    out = attnext.causal_attention_qkvpacked(qkv)
    assert out.dtype == torch.float16 and out.shape == (1, 12, 2, 8)


@needs_native
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_opcheck(dropout_p):
    qkv = make_qkv((2, 19, 3, 2, 8), torch.float32)
    args = (0.35, dropout_p, False, 11, 2)
    torch.library.opcheck(torch.ops.attnext.causal_attention_qkvpacked.default, (qkv, *args))
    out, lse = torch.ops.attnext.causal_attention_qkvpacked(qkv, *args)
    torch.library.opcheck(
        torch.ops.attnext._causal_attention_qkvpacked_backward.default,
        (torch.randn_like(out), qkv.detach(), out.detach(), lse, *args),
    )


@needs_native
def test_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        qkv = torch.empty(2, 17, 3, 4, 8, dtype=torch.bfloat16)
        out, lse = torch.ops.attnext.causal_attention_qkvpacked(qkv, 1.0, 0.0, True, 0, 0)
        assert out.shape == (2, 17, 4, 8) and out.dtype == torch.bfloat16
        assert lse.shape == (2, 4, 17) and lse.dtype == torch.float32
        g = torch.ops.attnext._causal_attention_qkvpacked_backward(out, qkv, out, lse, 1.0, 0.0, True, 0, 0)
        assert g.shape == qkv.shape


@needs_native
def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    qkv = make_qkv((2, 30, 3, 2, 16), torch.float32)

    def f(x):
        return attnext.causal_attention_qkvpacked(x).sum(-1)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(qkv)
    torch.testing.assert_close(out, f(qkv))
    (g,) = torch.autograd.grad(out.sum(), qkv)
    (gr,) = torch.autograd.grad(f(qkv).sum(), qkv)
    torch.testing.assert_close(g, gr)


def test_errors_name_the_argument():
    with pytest.raises(RuntimeError, match="size 3 in dim -3"):
        attnext.causal_attention_qkvpacked(torch.randn(2, 8, 2, 2, 4))
    with pytest.raises(RuntimeError, match="at least 4 dims"):
        attnext.causal_attention_qkvpacked(torch.randn(8, 3, 4))
    with pytest.raises(RuntimeError, match="floating-point"):
        attnext.causal_attention_qkvpacked(torch.ones(2, 8, 3, 2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="dropout_p"):
        attnext.causal_attention_qkvpacked(torch.randn(2, 8, 3, 2, 4), dropout_p=1.0)
    with pytest.raises(TypeError, match="torch.Tensor"):
        attnext.causal_attention_qkvpacked([[1.0]])


@needs_native
def test_kernel_errors_name_the_argument():
    op = torch.ops.attnext.causal_attention_qkvpacked
    with pytest.raises(RuntimeError, match="size 3 in dim -3"):
        op(torch.randn(2, 8, 4, 2, 4), 1.0, 0.0, False, 0, 0)
    with pytest.raises(RuntimeError, match=r"qkv must have at least 4 dims"):
        op(torch.randn(8, 3, 4), 1.0, 0.0, False, 0, 0)
    qkv = torch.randn(2, 8, 3, 2, 4)
    out, lse = op(qkv, 1.0, 0.0, False, 0, 0)
    with pytest.raises(RuntimeError, match="grad_out must have shape"):
        torch.ops.attnext._causal_attention_qkvpacked_backward(out[:, :4], qkv, out, lse, 1.0, 0.0, False, 0, 0)


def test_empty_sequence():
    qkv = torch.randn(2, 0, 3, 2, 8, requires_grad=True)
    out = attnext.causal_attention_qkvpacked(qkv)
    assert out.shape == (2, 0, 2, 8)
    out.sum().backward()
    assert qkv.grad.shape == qkv.shape
