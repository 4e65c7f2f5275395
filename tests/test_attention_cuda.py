"""attnext.causal_attention on CUDA: values and gradients against the float64 reference and
SDPA, half types by the flash-attention tolerance rule, dropout masks identical to the CPU's,
gradcheck, opcheck, compile and the modules. Skipped (not passed) without a GPU or without
the CUDA kernel in the build."""
import pytest
import torch
import torch.nn.functional as F

import attnext
from attnext import reference
from conftest import tf32_switch

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


def assert_matches_cpu_mask(op, eager, q64, k64, v64, g64, dtype):
    """op in `dtype` on the GPU against op in float64 on the CPU (the same dropout mask):
    output and gradients within twice the error of the eager composite in `dtype`."""
    qc, kc, vc = (t.detach().cpu().requires_grad_() for t in (q64, k64, v64))
    cpu = fwd_bwd(op, qc, kc, vc, g64.cpu())  # CPU kernel, float64
    qh, kh, vh = (t.detach().to(dtype).requires_grad_() for t in (q64, k64, v64))
    got = fwd_bwd(op, qh, kh, vh, g64.to(dtype))
    eag = fwd_bwd(eager, qh, kh, vh, g64.to(dtype))
    for name, a, e, o in zip(("out", "dq", "dk", "dv"), got, eag, cpu):
        err = (a.double().cpu() - o).abs().max().item()
        eager_err = (e.double().cpu() - o).abs().max().item()
        assert err <= 2 * eager_err + 1e-4, (name, err, eager_err)


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


def assert_within_twice_eager(fn, q64, k64, v64, g64, dtype, ref=None, atol=1e-4, floor_rel=0.0):
    """The flash-attention rule: fn's error (forward and each gradient, one shared grad_out) vs the
    float64 oracle is at most 2x eager torch's own error in that dtype, + atol. ref(q, k, v) -> out
    is the eager computation (reference.causal_attention by default). floor_rel: eager's error is
    taken as at least floor_rel * max|oracle| (for TF32, where eager's matmuls might not all use it)."""
    hs = q64.shape[-1]
    ref = ref or (lambda q, k, v: reference.causal_attention(q, k, v, hs**-0.5)[0])
    oracle = fwd_bwd(ref, q64, k64, v64, g64)
    qh, kh, vh = (t.detach().to(dtype).requires_grad_() for t in (q64, k64, v64))
    got = fwd_bwd(fn, qh, kh, vh, g64.to(dtype))
    eager = fwd_bwd(ref, qh, kh, vh, g64.to(dtype))
    for name, a, e, o in zip(("out", "dq", "dk", "dv"), got, eager, oracle):
        assert a.dtype == dtype
        err = (a.double() - o).abs().max().item()
        eager_err = max((e.double() - o).abs().max().item(), floor_rel * o.abs().max().item())
        assert err <= 2 * eager_err + atol, (name, err, eager_err)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,hs", [(17, 64), (1000, 64), (4097, 128), (256, 256)])
def test_half_types_within_twice_eager_error(dtype, T, hs):
    # Whichever path the dispatcher picks (tensor cores on sm_80+).
    q64, k64, v64 = make_qkv((1, 2), T, T, hs, hs)
    g64 = torch.randn(1, 2, T, hs, device="cuda", dtype=torch.float64)
    assert_within_twice_eager(attnext.causal_attention, q64, k64, v64, g64, dtype)


# ------------------------------------------------------------------ tensor cores vs CUDA cores
# float16 / bfloat16 on sm_80+ run the mma.sync kernels (csrc/cuda/causal_attention_mma.cuh);
# ATTNEXT_CUDA_MMA=0 forces the CUDA-core kernels and =require makes a call the tensor-core
# kernels cannot take an error, so every case below runs on the path it names (the env var is
# read per call), forward and backward (head sizes up to 256 both ways).
PATHS = ["mma", "cuda_core"]


def use_path(monkeypatch, path):
    if path == "cuda_core":
        monkeypatch.setenv("ATTNEXT_CUDA_MMA", "0")
        return
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("the tensor-core kernels need compute capability 8.0+")
    monkeypatch.setenv("ATTNEXT_CUDA_MMA", "require")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
# 16 -> tile 32, 80 -> 96 (zero-padded); 160 -> 192 and 256: dK/dV columns split over two blocks
@pytest.mark.parametrize("hs", [16, 64, 80, 128, 160, 256])
@pytest.mark.parametrize("T", [1, 17, 128, 1000, 4097])  # one row; partial tile; whole tiles; many; 4096 + 1
def test_both_paths_within_twice_eager_error(monkeypatch, path, dtype, T, hs):
    use_path(monkeypatch, path)
    batch = (1, 2) if T <= 1000 else (1, 1)
    q64, k64, v64 = make_qkv(batch, T, T, hs, hs, seed=T + hs)
    g64 = torch.randn(*batch, T, hs, device="cuda", dtype=torch.float64)
    assert_within_twice_eager(attnext.causal_attention, q64, k64, v64, g64, dtype)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("align", ["top_left", "bottom_right"])
@pytest.mark.parametrize("T,S", [(70, 150), (150, 70), (1, 300), (300, 1), (65, 64)])
def test_both_paths_t_ne_s(monkeypatch, path, dtype, align, T, S):
    # bottom-right with T > S: the first T - S rows see no key (zeros, lse -inf, zero gradients)
    use_path(monkeypatch, path)
    q64, k64, v64 = make_qkv((2,), T, S, 64, 64, seed=T * S)
    g64 = torch.randn(2, T, 64, device="cuda", dtype=torch.float64)
    br = align == "bottom_right"
    assert_within_twice_eager(lambda *a: attnext.causal_attention(*a, align=align), q64, k64, v64, g64, dtype,
                              ref=lambda q, k, v: reference.causal_attention(q, k, v, 64**-0.5, 0.0, br)[0])
    if br and T > S:
        qh, kh, vh = (t.detach().to(dtype) for t in (q64, k64, v64))
        out, lse = torch.ops.attnext.causal_attention(qh, kh, vh, 0.125, 0.0, True, 0, 0)
        assert (out[:, : T - S] == 0).all() and torch.isinf(lse[:, : T - S]).all() and (lse[:, : T - S] < 0).all()
        assert torch.isfinite(lse[:, T - S :]).all()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_both_paths_nanogpt_views_and_3d(monkeypatch, path, dtype):
    use_path(monkeypatch, path)
    # 4-D nanoGPT views: q.view(B, T, nh, hs).transpose(1, 2), read in place (row stride nh * hs)
    B, T, nh, hs = 2, 300, 4, 64
    x = torch.randn(B, T, 3 * nh * hs, device="cuda", dtype=dtype, requires_grad=True)
    q, k, v = (t.view(B, T, nh, hs).transpose(1, 2) for t in x.split(nh * hs, dim=2))
    assert not q.is_contiguous()
    g = torch.randn(B, nh, T, hs, device="cuda", dtype=dtype)
    out = attnext.causal_attention(q, k, v)
    (gx,) = torch.autograd.grad(out, x, g)
    x64 = x.detach().double().requires_grad_()
    q64, k64, v64 = (t.view(B, T, nh, hs).transpose(1, 2) for t in x64.split(nh * hs, dim=2))
    ref = reference.causal_attention(q64, k64, v64, hs**-0.5)[0]
    (gx_ref,) = torch.autograd.grad(ref, x64, g.double())
    xe = x.detach().requires_grad_()
    qe, ke, ve = (t.view(B, T, nh, hs).transpose(1, 2) for t in xe.split(nh * hs, dim=2))
    eager = reference.causal_attention(qe, ke, ve, hs**-0.5)[0]
    (gx_eager,) = torch.autograd.grad(eager, xe, g)
    for a, e, o in ((out, eager, ref), (gx, gx_eager, gx_ref)):
        err, eager_err = (a.double() - o).abs().max().item(), (e.double() - o).abs().max().item()
        assert err <= 2 * eager_err + 1e-4, (err, eager_err)
    # 3-D lecture inputs (B, T, hs)
    q64, k64, v64 = make_qkv((4,), 129, 129, 64, 64)
    assert_within_twice_eager(attnext.causal_attention, q64, k64, v64,
                              torch.randn(4, 129, 64, device="cuda", dtype=torch.float64), dtype)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("T,S,br", [(90, 90, False), (70, 150, True), (150, 70, True), (20, 20, False)])
@pytest.mark.parametrize("seed_on", ["host", "gpu"])  # the ints, or rng = [seed, offset] read by the kernels
def test_both_paths_dropout_mask_is_the_cpu_mask(monkeypatch, path, T, S, br, seed_on):
    # The CPU kernel in float64 with the same (seed, offset) is the oracle: a mask bit that differs
    # moves its weight (>= 1/S of the row) and fails the twice-eager bound. T = 20: large weights.
    use_path(monkeypatch, path)
    dtype, p, seed, offset = torch.bfloat16, 0.3, 1234, 77
    q64, k64, v64 = make_qkv((2, 2), T, S, 64, 64, seed=5)
    g64 = torch.randn(2, 2, T, 64, device="cuda", dtype=torch.float64)
    rng = torch.tensor([seed, offset], device="cuda")

    def op(q, k, v):
        if q.is_cuda and seed_on == "gpu":
            return torch.ops.attnext.causal_attention(q, k, v, 0.125, p, br, 0, 0, rng)[0]
        return torch.ops.attnext.causal_attention(q, k, v, 0.125, p, br, seed, offset)[0]

    def eager(q, k, v):
        return reference.causal_attention(q, k, v, 0.125, p, br, seed, offset)[0]

    assert_matches_cpu_mask(op, eager, q64, k64, v64, g64, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mma_forward_with_cuda_core_backward(monkeypatch, dtype):
    # No state passes from the forward to the backward but lse: a tensor-core forward followed by
    # a CUDA-core backward (and the reverse) gives the gradients of either path alone.
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("the tensor-core kernels need compute capability 8.0+")
    q, k, v = make_qkv((2, 2), 150, 150, 64, 64, dtype, seed=3)
    g = torch.randn(2, 2, 150, 64, device="cuda", dtype=dtype)
    grads = {}
    for fwd_mode, bwd_mode in (("require", "require"), ("0", "0"), ("require", "0"), ("0", "require")):
        monkeypatch.setenv("ATTNEXT_CUDA_MMA", fwd_mode)
        out = torch.ops.attnext.causal_attention(q, k, v, 0.125, 0.1, False, 9, 0)[0]
        monkeypatch.setenv("ATTNEXT_CUDA_MMA", bwd_mode)
        grads[fwd_mode, bwd_mode] = torch.autograd.grad(out, (q, k, v), g)
    tol = dict(atol=3e-2, rtol=3e-2) if dtype == torch.bfloat16 else dict(atol=5e-3, rtol=5e-3)
    for mixed in (("require", "0"), ("0", "require")):
        for a, b in zip(grads[mixed], grads["require", "require"]):
            torch.testing.assert_close(a.float(), b.float(), **tol)


def test_mma_forward_takes_head_size_256(monkeypatch):
    use_path(monkeypatch, "mma")
    q64, k64, v64 = make_qkv((1, 2), 300, 300, 256, 256)
    qh, kh, vh = (t.detach().bfloat16() for t in (q64, k64, v64))
    out, lse = torch.ops.attnext.causal_attention(qh, kh, vh, 256**-0.5, 0.0, False, 0, 0)
    ref_out, ref_lse = reference.causal_attention(q64.detach(), k64.detach(), v64.detach(), 256**-0.5)
    eager = reference.causal_attention(qh, kh, vh, 256**-0.5)[0]
    assert (out.double() - ref_out).abs().max() <= 2 * (eager.double() - ref_out).abs().max() + 1e-4
    # lse against the float64 lse of the bfloat16-rounded inputs (rounding q, k alone moves
    # the scores by about 2e-3): what is left is the kernel's own float accumulation
    _, rounded_lse = reference.causal_attention(qh.double(), kh.double(), vh.double(), 256**-0.5)
    torch.testing.assert_close(lse.double(), rounded_lse, atol=1e-3, rtol=1e-3)


def test_mma_path_refusals(monkeypatch, tf32_off):
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("the tensor-core kernels need compute capability 8.0+")
    monkeypatch.setenv("ATTNEXT_CUDA_MMA", "require")
    # rows not 16-byte aligned (a view starting one element in): the CUDA-core kernel takes it
    base = torch.randn(2, 40, 65, device="cuda", dtype=torch.bfloat16)
    q = base[..., 1:]
    with pytest.raises(RuntimeError, match="16-byte aligned"):
        torch.ops.attnext.causal_attention(q, q, q, 0.125, 0.0, False, 0, 0)
    qf = q.float().contiguous()
    with pytest.raises(RuntimeError, match="float32 without TF32"):  # torch's default: exact float32
        torch.ops.attnext.causal_attention(qf, qf, qf, 0.125, 0.0, False, 0, 0)
    with pytest.raises(RuntimeError, match="not float16, bfloat16 or float32"):
        torch.ops.attnext.causal_attention(qf.double(), qf.double(), qf.double(), 0.125, 0.0, False, 0, 0)
    with pytest.raises(RuntimeError, match="hs != hs_v"):
        v = torch.randn(2, 40, 32, device="cuda", dtype=torch.bfloat16)
        torch.ops.attnext.causal_attention(q.contiguous(), q.contiguous(), v, 0.125, 0.0, False, 0, 0)
    monkeypatch.setenv("ATTNEXT_CUDA_MMA", "1")
    out = torch.ops.attnext.causal_attention(q, q, q, 0.125, 0.0, False, 0, 0)[0]
    ref = reference.causal_attention(q.double(), q.double(), q.double(), 0.125)[0]
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mma_nan_in_a_visible_score_makes_only_the_rows_that_see_it_nan(monkeypatch, dtype):
    use_path(monkeypatch, "mma")
    q, k, v = (t.detach() for t in make_qkv((2,), 130, 130, 64, 64, dtype))
    k = k.clone()
    k[:, 70, 3] = float("nan")  # key 70: the second key tile; rows 64.. share its query tile
    out, lse = torch.ops.attnext.causal_attention(q, k, v, 0.125, 0.0, False, 0, 0)
    assert torch.isfinite(out[:, :70]).all() and torch.isfinite(lse[:, :70]).all()
    assert torch.isnan(out[:, 70:]).all() and torch.isnan(lse[:, 70:]).all()


# ------------------------------------------------------------------ float32 on TF32 tensor cores
# float32 takes the tensor-core kernels (mma.m16n8k8 .tf32) only when torch allows TF32 for CUDA
# matmuls, as torch.matmul does; otherwise the exact CUDA-core kernel (the tests above).


@pytest.fixture
def tf32_off():
    """TF32 off for CUDA matmuls during one test, whatever the environment set."""
    with tf32_switch("allow_tf32", False):
        yield


@pytest.fixture
def tf32_on():
    """TF32 allowed for CUDA matmuls during one test (torch.backends.cuda.matmul.fp32_precision
    where this torch has it, else allow_tf32)."""
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("TF32 tensor cores need compute capability 8.0+")
    switch = "fp32_precision" if hasattr(torch.backends.cuda.matmul, "fp32_precision") else "allow_tf32"
    with tf32_switch(switch):
        yield switch


# TF32 rounds to 10 mantissa bits (unit roundoff 2^-11): the error floor of the TF32 tests
TF32_FLOOR = 2.0**-10


@pytest.mark.parametrize("hs", [16, 64, 80, 128, 160, 256])  # tile classes 32..256
@pytest.mark.parametrize("T", [17, 1000])
def test_tf32_within_twice_eager_tf32_error(monkeypatch, tf32_on, T, hs):
    # eager float32 under the same switch runs its matmuls on TF32: the flash rule against it
    use_path(monkeypatch, "mma")
    q64, k64, v64 = make_qkv((1, 2), T, T, hs, hs, seed=T + hs)
    g64 = torch.randn(1, 2, T, hs, device="cuda", dtype=torch.float64)
    assert_within_twice_eager(attnext.causal_attention, q64, k64, v64, g64, torch.float32, floor_rel=TF32_FLOOR)


def test_tf32_forward_takes_head_size_256(monkeypatch, tf32_on):
    # forward alone on the TF32 kernels (require): 16-key tiles at this row length
    monkeypatch.setenv("ATTNEXT_CUDA_MMA", "require")
    q64, k64, v64 = (t.detach() for t in make_qkv((1, 2), 300, 300, 256, 256))
    out, lse = torch.ops.attnext.causal_attention(q64.float(), k64.float(), v64.float(), 256**-0.5, 0.0, False, 0, 0)
    ref_out, ref_lse = reference.causal_attention(q64, k64, v64, 256**-0.5)
    err = (out.double() - ref_out).abs().max().item()
    assert 1e-6 < err < 4 * TF32_FLOOR * ref_out.abs().max().item(), err  # TF32, not exact, and close
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-2, rtol=2e-3)


@pytest.mark.parametrize("switch", ["fp32_precision", "allow_tf32", "set_float32_matmul_precision"])
def test_tf32_follows_each_of_torchs_switches(monkeypatch, tf32_off, switch):
    # require: the call fails unless the tensor cores take it. TF32 rounding (10-bit mantissa)
    # shows as an error well above the exact kernel's.
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("TF32 tensor cores need compute capability 8.0+")
    q, k, v = (t.detach() for t in make_qkv((2, 2), 200, 200, 64, 64, torch.float32, seed=4))
    ref = reference.causal_attention(q.double(), k.double(), v.double(), 0.125)[0]
    monkeypatch.setenv("ATTNEXT_CUDA_MMA", "1")
    exact = torch.ops.attnext.causal_attention(q, k, v, 0.125, 0.0, False, 0, 0)[0]
    monkeypatch.setenv("ATTNEXT_CUDA_MMA", "require")
    with pytest.raises(RuntimeError, match="float32 without TF32"):
        torch.ops.attnext.causal_attention(q, k, v, 0.125, 0.0, False, 0, 0)
    with tf32_switch(switch):
        tf32 = torch.ops.attnext.causal_attention(q, k, v, 0.125, 0.0, False, 0, 0)[0]
    exact_err = (exact.double() - ref).abs().max().item()
    tf32_err = (tf32.double() - ref).abs().max().item()
    assert exact_err < 1e-5, exact_err
    assert 1e-5 < tf32_err < 1e-2, tf32_err
    assert tf32.dtype == torch.float32


@pytest.mark.parametrize("T,S,br", [(90, 90, False), (70, 150, True), (20, 20, False)])
def test_tf32_dropout_mask_is_the_cpu_mask(monkeypatch, tf32_on, T, S, br):
    # as test_both_paths_dropout_mask_is_the_cpu_mask, for the TF32 kernels (forward and backward)
    use_path(monkeypatch, "mma")
    p, seed, offset = 0.3, 99, 5
    q64, k64, v64 = make_qkv((2, 2), T, S, 64, 64, seed=6)
    g64 = torch.randn(2, 2, T, 64, device="cuda", dtype=torch.float64)

    def op(q, k, v):
        return torch.ops.attnext.causal_attention(q, k, v, 0.125, p, br, seed, offset)[0]

    def eager(q, k, v):
        return reference.causal_attention(q, k, v, 0.125, p, br, seed, offset)[0]

    qc, kc, vc = (t.detach().cpu().requires_grad_() for t in (q64, k64, v64))
    cpu = fwd_bwd(op, qc, kc, vc, g64.cpu())  # CPU kernel, float64
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q64, k64, v64))
    got = fwd_bwd(op, qf, kf, vf, g64.float())
    eag = fwd_bwd(eager, qf, kf, vf, g64.float())
    for name, a, e, o in zip(("out", "dq", "dk", "dv"), got, eag, cpu):
        err = (a.double().cpu() - o).abs().max().item()
        eager_err = max((e.double().cpu() - o).abs().max().item(), TF32_FLOOR * o.abs().max().item())
        assert err <= 2 * eager_err + 1e-4, (name, err, eager_err)


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
    # a CPU generator: both devices draw (seed, offset) on the host, the same values
    got = fwd_bwd(lambda *a: attnext.causal_attention(*a, dropout_p=0.3, generator=torch.Generator().manual_seed(123)),
                  q, k, v, g)
    qc, kc, vc = (t.detach().cpu().requires_grad_() for t in (q, k, v))
    cpu = fwd_bwd(lambda *a: attnext.causal_attention(*a, dropout_p=0.3, generator=torch.Generator().manual_seed(123)),
                  qc, kc, vc, g.cpu())
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


@pytest.mark.parametrize("path,dtype", [("cuda_core", torch.float32), ("cuda_core", torch.bfloat16),
                                        ("mma", torch.bfloat16), ("mma", torch.float16)])
def test_first_key_tiles_all_minus_inf(monkeypatch, path, dtype):
    # keys [0, 256) score -inf for every query: rows t < 256 see only -inf (torch: NaN),
    # rows t >= 256 also see finite keys (torch: finite) although their first key tiles
    # are all -inf (the online softmax must not compute -inf - -inf)
    use_path(monkeypatch, path)
    T, hs = 300, 64
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, T, hs, generator=g, dtype=torch.float64).abs() + 0.1
    k = torch.randn(2, T, hs, generator=g, dtype=torch.float64)
    v = torch.randn(2, T, hs, generator=g, dtype=torch.float64)
    k[:, :256, 0] = float("-inf")
    out = attnext.causal_attention(*(t.to("cuda", dtype) for t in (q, k, v)))
    ref, _ = reference.causal_attention(q, k, v, hs**-0.5)
    assert ref[:, :256].isnan().all() and ref[:, 256:].isfinite().all()
    assert torch.equal(out.isnan().cpu(), ref.isnan())
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.double().cpu(), ref, atol=tol, rtol=tol, equal_nan=True)


def test_dropout_seed_is_drawn_on_the_gpu_and_matches_the_cpu_mask():
    # CUDA inputs draw rng = [seed, offset] on the GPU (torch's CUDA generator); the CPU
    # kernel given the same values drops the same weights
    q, k, v = make_qkv((2,), 50, 50, 16, 16, torch.float64)
    torch.manual_seed(3)
    out = attnext.causal_attention(q, k, v, dropout_p=0.3)
    torch.manual_seed(3)
    rng = torch.randint(-(2**63), 2**63 - 1, (2,), dtype=torch.int64, device="cuda")
    seed, offset = rng.tolist()
    ref, _ = torch.ops.attnext.causal_attention(*(t.detach().cpu() for t in (q, k, v)), 0.25, 0.3, False, seed, offset)
    torch.testing.assert_close(out.detach().cpu(), ref, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("path", PATHS)
def test_dropout_under_cuda_graph_capture_draws_a_new_mask_per_replay(monkeypatch, path):
    # The public functions draw rng on the GPU inside the graph: each replay draws anew.
    # A second graph captures the ops with a static rng refilled by torch.randint inside
    # the graph, read back after each replay: the CPU kernels given those values are
    # the oracle for the mask the GPU kernels used (forward and backward).
    use_path(monkeypatch, path)
    q, k, v = (t.detach() for t in make_qkv((2,), 128, 128, 64, 64, torch.bfloat16))
    xd = torch.randn(8, 4000, device="cuda")
    g = torch.randn(2, 128, 64, device="cuda", dtype=torch.bfloat16)
    rng = torch.zeros(2, dtype=torch.int64, device="cuda")
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))

    def public():
        return attnext.causal_attention(q, k, v, dropout_p=0.3), attnext.dropout(xd, 0.3)

    def with_rng():
        rng.copy_(torch.randint(-(2**63), 2**63 - 1, (2,), dtype=torch.int64, device="cuda"))
        out, _ = torch.ops.attnext.causal_attention(qg, kg, vg, 0.125, 0.3, False, 0, 0, rng)
        grads = torch.autograd.grad(out, (qg, kg, vg), g)
        return (out, torch.ops.attnext.dropout(xd, 0.3, 0, 0, rng), *grads)

    graphs, outputs = [], []
    for fn in (public, with_rng):
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):  # warm up outside the graph, as torch's capture recipe does
            fn()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs.append(fn())
        graphs.append(graph)

    seen = []
    for _ in range(2):
        graphs[0].replay()
        torch.cuda.synchronize()
        seen.append([t.clone() for t in outputs[0]])
    assert not torch.equal(seen[0][0], seen[1][0])  # a fresh attention mask per replay
    assert not torch.equal(seen[0][1], seen[1][1])  # and a fresh dropout mask
    assert abs((seen[0][1] != 0).float().mean().item() - 0.7) < 0.05

    drawn = []
    for _ in range(2):
        graphs[1].replay()
        torch.cuda.synchronize()
        seed, offset = rng.tolist()
        drawn.append((seed, offset))
        qc, kc, vc = (t.detach().cpu().float().requires_grad_() for t in (q, k, v))
        out_c, _ = torch.ops.attnext.causal_attention(qc, kc, vc, 0.125, 0.3, False, seed, offset)
        grads_c = torch.autograd.grad(out_c, (qc, kc, vc), g.cpu().float())
        y_c = torch.ops.attnext.dropout(xd.cpu(), 0.3, seed, offset)
        got = outputs[1]
        torch.testing.assert_close(got[1].cpu(), y_c)  # the same mask, bit for bit
        for a, b in zip((got[0], *got[2:]), (out_c, *grads_c)):
            torch.testing.assert_close(a.float().cpu(), b, atol=3e-2, rtol=3e-2)
    assert drawn[0] != drawn[1]


def test_rng_on_the_gpu_for_every_dropout_op():
    # rng = [seed, offset] read on the device gives the mask of the same ints, for
    # dropout, causal_attention (opcheck too) and the packed op
    rng = torch.tensor([1234, 77], device="cuda")
    x = torch.randn(3, 1000, device="cuda")
    torch.testing.assert_close(torch.ops.attnext.dropout(x, 0.4, 0, 0, rng), torch.ops.attnext.dropout(x, 0.4, 1234, 77))
    q, k, v = (t.detach() for t in make_qkv((2,), 40, 40, 16, 16, torch.float32))
    a, _ = torch.ops.attnext.causal_attention(q, k, v, 0.25, 0.3, False, 0, 0, rng)
    b, _ = torch.ops.attnext.causal_attention(q, k, v, 0.25, 0.3, False, 1234, 77)
    assert torch.equal(a, b)
    qkv = torch.randn(2, 40, 3, 2, 16, device="cuda")
    a, _ = torch.ops.attnext.causal_attention_qkvpacked(qkv, 0.25, 0.3, False, 0, 0, rng)
    b, _ = torch.ops.attnext.causal_attention_qkvpacked(qkv, 0.25, 0.3, False, 1234, 77)
    assert torch.equal(a, b)
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    torch.library.opcheck(torch.ops.attnext.causal_attention.default, (qr, kr, vr, 0.25, 0.3, False, 0, 0, rng))


def test_compile_fullgraph_with_dropout_on_cuda():
    # on CUDA the seed is a tensor drawn on the device: no capture_scalar_outputs needed
    torch._dynamo.reset()
    q, k, v = make_qkv((2,), 50, 50, 16, 16, torch.float32)

    def f(q, k, v):
        return attnext.causal_attention(q, k, v, dropout_p=0.3)

    out = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    keep_rows = out.detach()
    assert torch.isfinite(keep_rows).all()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


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


# ------------------------------------------------------------------ windows (window_size)
# Both kernel families take every window (the mask first(t) <= key < visible(t), tiles
# outside every row's window skipped). Cases: sliding windows narrower and wider than a
# key tile (16..64 keys) and not a multiple of it, full attention, bands right of the
# diagonal, bottom-right with T < S and T > S, rows that see no key on either side.
WINDOWS = [
    # (T, S, align, window)
    (300, 300, "top_left", (10, 0)),  # W < a tile: most key tiles skipped
    (300, 300, "top_left", (100, 0)),  # W > a tile, not a multiple of it
    (70, 300, "bottom_right", (40, 0)),  # T < S: keys 0..189 seen by no row
    (150, 70, "bottom_right", (20, 0)),  # T > S: rows 0..79 see no key
    (130, 70, "top_left", (-1, -1)),  # full attention
    (200, 200, "top_left", (7, 5)),  # a band right of the diagonal
    (200, 90, "top_left", (3, -1)),  # rows from 93 on start past the last key: no key
    (90, 90, "top_left", (0, 0)),  # the diagonal key only
]


def window_ref(align, window, p=0.0, seed=0, offset=0):
    br = align == "bottom_right"
    return lambda q, k, v: reference.causal_attention(
        q, k, v, q.shape[-1] ** -0.5, p, br, seed, offset, window=window
    )[0]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,S,align,window", WINDOWS)
def test_both_paths_windows(monkeypatch, path, dtype, T, S, align, window):
    use_path(monkeypatch, path)
    q64, k64, v64 = make_qkv((2,), T, S, 64, 64, seed=T + S)
    g64 = torch.randn(2, T, 64, device="cuda", dtype=torch.float64)
    assert not attnext.explain("causal_attention", q64.to(dtype), k64.to(dtype), v64.to(dtype), window_size=window)
    assert_within_twice_eager(
        lambda *a: attnext.causal_attention(*a, align=align, window_size=window), q64, k64, v64, g64, dtype,
        ref=window_ref(align, window),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("T,S,align,window", WINDOWS)
def test_windows_cuda_core_match_reference_and_cpu_kernel(monkeypatch, dtype, T, S, align, window):
    # The exact kernel against the float64 reference; rows that see no key exactly as the CPU
    # kernel gives them (zeros, lse -inf, zero gradients).
    monkeypatch.setenv("ATTNEXT_CUDA_MMA", "0")
    br = align == "bottom_right"
    q, k, v = make_qkv((2,), T, S, 32, 24, dtype, seed=T * 3 + S)
    g = torch.randn(2, T, 24, device="cuda", dtype=dtype)
    out, lse = torch.ops.attnext.causal_attention(q, k, v, 0.2, 0.0, br, 0, 0, None, *window)
    qc, kc, vc = (t.detach().cpu() for t in (q, k, v))
    cpu_out, cpu_lse = torch.ops.attnext.causal_attention(qc, kc, vc, 0.2, 0.0, br, 0, 0, None, *window)
    ref_out, ref_lse = reference.causal_attention(qc.double(), kc.double(), vc.double(), 0.2, 0.0, br, window=window)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(out.double().cpu(), ref_out, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double().cpu(), ref_lse, atol=tol, rtol=tol)
    none = torch.isinf(cpu_lse)
    assert torch.equal(none, torch.isinf(lse.cpu())) and (lse.cpu()[none] < 0).all()
    assert (out.cpu()[none] == 0).all()
    torch.testing.assert_close(out.cpu(), cpu_out, atol=tol, rtol=tol)
    got = torch.autograd.grad(attnext.causal_attention(q, k, v, scale=0.2, align=align, window_size=window), (q, k, v), g)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref_out = reference.causal_attention(q64, k64, v64, 0.2, 0.0, br, window=window)[0]
    ref = torch.autograd.grad(ref_out, (q64, k64, v64), g.double())
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.double(), b, atol=tol * 10, rtol=tol * 10)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("window", [(-1, 0), (20, 0), (-1, -1), (5, 9)])
def test_both_paths_gqa_gradients_sum_over_each_group(monkeypatch, path, window):
    # enable_gqa: k, v reach the kernels as stride-0 views over each group; the gradient of each
    # key/value head is the sum over its query heads (autograd's expand backward).
    use_path(monkeypatch, path)
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(3)
    q64 = torch.randn(2, 6, 90, 64, generator=gen, dtype=torch.float64).cuda().requires_grad_()
    k64 = torch.randn(2, 2, 90, 64, generator=gen, dtype=torch.float64).cuda().requires_grad_()
    v64 = torch.randn(2, 2, 90, 64, generator=gen, dtype=torch.float64).cuda().requires_grad_()
    g64 = torch.randn(2, 6, 90, 64, device="cuda", dtype=torch.float64)

    def ref(q, k, v):  # heads repeated, as SDPA's enable_gqa
        kr, vr = (t.repeat_interleave(3, dim=-3) for t in (k, v))
        return reference.causal_attention(q, kr, vr, 0.125, window=window)[0]

    assert_within_twice_eager(
        lambda *a: attnext.causal_attention(*a, enable_gqa=True, window_size=window), q64, k64, v64, g64, dtype,
        ref=ref,
    )


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("window", [(30, 0), (10, 10)])
def test_both_paths_window_dropout_mask_is_the_cpu_mask(monkeypatch, path, window):
    use_path(monkeypatch, path)
    dtype, p, seed, offset = torch.bfloat16, 0.3, 99, 5
    q64, k64, v64 = make_qkv((2,), 150, 150, 64, 64, seed=9)
    g64 = torch.randn(2, 150, 64, device="cuda", dtype=torch.float64)

    def op(q, k, v):
        return torch.ops.attnext.causal_attention(q, k, v, 0.125, p, False, seed, offset, None, *window)[0]

    def eager(q, k, v):
        return reference.causal_attention(q, k, v, 0.125, p, False, seed, offset, window=window)[0]

    assert_matches_cpu_mask(op, eager, q64, k64, v64, g64, dtype)


@pytest.mark.parametrize("window", [(16, 0), (-1, -1)])
def test_qkvpacked_windows(window):
    qkv = torch.randn(2, 100, 3, 2, 32, device="cuda", dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 100, 2, 32, device="cuda", dtype=torch.float64)
    assert not attnext.explain("causal_attention_qkvpacked", qkv, window_size=window)
    out = attnext.causal_attention_qkvpacked(qkv, window_size=window)
    (gq,) = torch.autograd.grad(out, qkv, g)
    x = qkv.detach().requires_grad_()
    ref = reference.causal_attention_qkvpacked(x, 32**-0.5, window=window)[0]
    (gr,) = torch.autograd.grad(ref, x, g)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(gq, gr, atol=1e-10, rtol=1e-10)


def test_gradcheck_window_float64():
    q, k, v = make_qkv((1,), 40, 50, 8, 8, torch.float64)
    for window in [(5, 0), (3, 4), (-1, -1)]:
        torch.autograd.gradcheck(
            lambda q, k, v: attnext.causal_attention(q, k, v, align="bottom_right", window_size=window), (q, k, v)
        )
