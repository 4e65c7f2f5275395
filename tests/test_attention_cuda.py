"""attnext.causal_attention on CUDA: values and gradients against the float64 reference and
SDPA, half types by the flash-attention tolerance rule, dropout masks identical to the CPU's,
gradcheck, opcheck, compile and the modules. Skipped (not passed) without a GPU or without
the CUDA kernel in the build."""
import pytest
import torch
import torch.nn.functional as F

import attnext
from attnext import reference

HAVE_CUDA_KERNEL = (
    torch.cuda.is_available()
    and attnext.native_available()
    and hasattr(torch.ops.attnext, "causal_attention")
    and torch._C._dispatch_has_kernel_for_dispatch_key("attnext::causal_attention", "CUDA")
)
pytestmark = pytest.mark.skipif(not HAVE_CUDA_KERNEL, reason="no GPU, or attnext built without CUDA kernels")


def make_qkv(batch, T, S, hs, hs_v, dtype=torch.float64, seed=0, device="cuda"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(*batch, T, hs, generator=g, dtype=torch.float64)
    k = torch.randn(*batch, S, hs, generator=g, dtype=torch.float64)
    v = torch.randn(*batch, S, hs_v, generator=g, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v)]


def fwd_bwd(fn, q, k, v, g):
    out = fn(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), g))


SHAPES = [
    # (batch, T, S, hs, hs_v, align)
    ((2,), 1, 1, 16, 16, "top_left"),
    ((3,), 17, 17, 64, 64, "top_left"),
    ((2, 2), 128, 128, 80, 80, "top_left"),
    ((1,), 1000, 1000, 128, 128, "top_left"),
    ((1,), 130, 130, 256, 256, "top_left"),
    ((2,), 70, 150, 16, 24, "bottom_right"),
    ((2,), 150, 70, 24, 16, "bottom_right"),
    ((2,), 70, 150, 64, 64, "top_left"),
]


@pytest.mark.parametrize("batch,T,S,hs,hs_v,align", SHAPES)
def test_float32_matches_float64_reference(batch, T, S, hs, hs_v, align):
    q, k, v = make_qkv(batch, T, S, hs, hs_v, torch.float32)
    assert not attnext.explain("causal_attention", q, k, v)
    g = torch.randn(*batch, T, hs_v, device="cuda")
    got = fwd_bwd(lambda *a: attnext.causal_attention(*a, align=align), q, k, v, g)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    br = align == "bottom_right"
    ref = fwd_bwd(lambda *a: reference.causal_attention(*a, hs**-0.5, 0.0, br)[0], q64, k64, v64, g.double())
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.double(), b, atol=2e-4, rtol=2e-4)


def test_float64_matches_reference_tightly():
    q, k, v = make_qkv((2, 3), 45, 45, 16, 8)
    g = torch.randn(2, 3, 45, 8, device="cuda", dtype=torch.float64)
    got = fwd_bwd(attnext.causal_attention, q, k, v, g)
    ref = fwd_bwd(lambda *a: reference.causal_attention(*a, 16**-0.5)[0], q, k, v, g)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,hs", [(17, 64), (1000, 64), (4097, 128), (256, 256)])
def test_half_types_within_twice_eager_error(dtype, T, hs):
    # The flash-attention rule: error vs the float64 oracle at most 2x eager's own error in that dtype.
    q64, k64, v64 = make_qkv((1, 2), T, T, hs, hs)
    g64 = torch.randn(1, 2, T, hs, device="cuda", dtype=torch.float64)
    oracle = fwd_bwd(lambda *a: reference.causal_attention(*a, hs**-0.5)[0], q64, k64, v64, g64)
    qh, kh, vh = (t.detach().to(dtype).requires_grad_() for t in (q64, k64, v64))
    got = fwd_bwd(attnext.causal_attention, qh, kh, vh, g64.to(dtype))
    eager = fwd_bwd(lambda *a: reference.causal_attention(*a, hs**-0.5)[0], qh, kh, vh, g64.to(dtype))
    for a, e, o in zip(got, eager, oracle):
        assert a.dtype == dtype
        err = (a.double() - o).abs().max().item()
        eager_err = (e.double() - o).abs().max().item()
        assert err <= 2 * eager_err + 1e-4, (err, eager_err)


def test_matches_sdpa_4d_and_reads_transposed_views():
    B, T, nh, hs = 2, 300, 4, 64
    x = torch.randn(B, T, 3 * nh * hs, device="cuda", requires_grad=True)
    q, k, v = (t.view(B, T, nh, hs).transpose(1, 2) for t in x.split(nh * hs, dim=2))
    assert not q.is_contiguous()
    g = torch.randn(B, nh, T, hs, device="cuda")
    out = attnext.causal_attention(q, k, v)
    (gx,) = torch.autograd.grad(out, x, g)
    with torch.backends.cuda.sdp_kernel(enable_flash=False, enable_mem_efficient=False, enable_math=True):
        ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    (gx_ref,) = torch.autograd.grad(ref, x, g.double())
    torch.testing.assert_close(out.double(), ref, atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(gx.double(), gx_ref.double(), atol=2e-4, rtol=2e-4)


def test_three_d_lecture_inputs():
    q, k, v = make_qkv((4,), 129, 129, 64, 64, torch.float32)
    out = attnext.causal_attention(q, k, v)
    ref = reference.causal_attention(q.double(), k.double(), v.double(), 64**-0.5)[0]
    torch.testing.assert_close(out.double(), ref, atol=2e-4, rtol=2e-4)


def test_dropout_mask_is_the_cpu_mask():
    # Same (seed, offset) -> the same counter-based hash on both devices: the CUDA kernel,
    # the CPU kernel and the reference drop the same weights.
    q, k, v = make_qkv((2, 2), 90, 90, 32, 32, torch.float64)
    g = torch.randn(2, 2, 90, 32, dtype=torch.float64, device="cuda")
    torch.manual_seed(123)
    got = fwd_bwd(lambda *a: attnext.causal_attention(*a, dropout_p=0.3), q, k, v, g)
    qc, kc, vc = (t.detach().cpu().requires_grad_() for t in (q, k, v))
    torch.manual_seed(123)
    cpu = fwd_bwd(lambda *a: attnext.causal_attention(*a, dropout_p=0.3), qc, kc, vc, g.cpu())
    for a, b in zip(got, cpu):
        torch.testing.assert_close(a.cpu(), b, atol=1e-10, rtol=1e-10)


def test_gradcheck_with_dropout_float64():
    q, k, v = make_qkv((1, 2), 37, 41, 8, 8)

    def f(q, k, v):
        return torch.ops.attnext.causal_attention(q, k, v, 0.3, 0.2, True, 7, 11)[0]

    assert torch.autograd.gradcheck(f, (q, k, v))


def test_opcheck_on_cuda():
    q, k, v = make_qkv((2,), 33, 33, 16, 16, torch.float32)
    torch.library.opcheck(torch.ops.attnext.causal_attention.default, (q, k, v, 0.25, 0.0, False, 0, 0))
    torch.library.opcheck(torch.ops.attnext.causal_attention.default, (q, k, v, 0.25, 0.1, True, 3, 4))


def test_compile_fullgraph_on_cuda():
    q, k, v = make_qkv((2, 2), 64, 64, 32, 32, torch.float32)
    f = torch.compile(lambda q, k, v: attnext.causal_attention(q, k, v) * 2, fullgraph=True)
    torch.testing.assert_close(f(q, k, v), attnext.causal_attention(q, k, v) * 2)


def test_no_visible_keys_give_zeros_not_nan():
    q, k, v = make_qkv((2,), 40, 10, 16, 16, torch.float32)
    out = attnext.causal_attention(q, k, v, align="bottom_right")
    assert torch.equal(out[:, :30], torch.zeros_like(out[:, :30]))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("T,S,br", [(90, 90, False), (70, 40, True), (40, 70, True)])
def test_lse_matches_reference(dtype, T, S, br):
    # lse is what the backward recomputes the weights from; rows that see no key give -inf.
    q, k, v = make_qkv((2,), T, S, 16, 8, dtype)
    out, lse = torch.ops.attnext.causal_attention(q, k, v, 0.3, 0.0, br, 0, 0)
    ref_out, ref_lse = reference.causal_attention(q.double(), k.double(), v.double(), 0.3, 0.0, br)
    assert lse.dtype == dtype and lse.shape == (2, T)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(lse.double(), ref_lse, atol=tol, rtol=tol)
    torch.testing.assert_close(out.double(), ref_out, atol=tol, rtol=tol)


def test_nan_in_a_visible_score_makes_only_the_rows_that_see_it_nan():
    q, k, v = make_qkv((2,), 70, 70, 16, 16, torch.float32)
    k = k.detach().clone()
    k[:, 40, 3] = float("nan")  # key 40: seen by rows 40.. (another key tile, several query tiles)
    out, lse = torch.ops.attnext.causal_attention(q.detach(), k, v.detach(), 0.25, 0.0, False, 0, 0)
    assert torch.isfinite(out[:, :40]).all() and torch.isfinite(lse[:, :40]).all()
    assert torch.isnan(out[:, 40:]).all() and torch.isnan(lse[:, 40:]).all()
    ref = reference.causal_attention(q.double(), k.double(), v.double(), 0.25)[0]
    torch.testing.assert_close(out.double(), ref, atol=2e-4, rtol=2e-4, equal_nan=True)


def test_modules_run_on_cuda_and_match_cpu():
    torch.manual_seed(0)
    mha = attnext.nn.MultiHeadAttention(4, 16, 64, 32).double()
    csa = attnext.nn.CausalSelfAttention(n_embd=64, n_head=4, block_size=32).double()
    x = torch.randn(3, 32, 64, dtype=torch.float64)
    for m in (mha, csa):
        ref = m(x)
        out = m.to("cuda")(x.cuda())
        torch.testing.assert_close(out.cpu(), ref, atol=1e-10, rtol=1e-10)


def test_rejects_mixed_devices():
    q, k, v = make_qkv((2,), 8, 8, 4, 4, torch.float32)
    with pytest.raises(RuntimeError, match="same device"):
        torch.ops.attnext.causal_attention(q, k.cpu(), v, 0.5, 0.0, False, 0, 0)
