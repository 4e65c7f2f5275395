"""attnext.causal_attention: forward, backward, dropout, fallback, fake/opcheck, compile, errors."""
import math

import pytest
import torch
import torch.nn.functional as F

import attnext
from attnext import reference
from conftest import CPU_ISAS, assert_python_ok_on_isa

HAVE_KERNEL = attnext.native_available() and hasattr(torch.ops.attnext, "causal_attention")
needs_native = pytest.mark.skipif(not HAVE_KERNEL, reason="attnext._C not built (or built without causal_attention)")

# tolerances beside their dtype: (atol, rtol)
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 2e-5)}


def make_qkv(batch, T, S, hs, hs_v, dtype=torch.float64, requires_grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(*batch, T, hs, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(*batch, S, hs, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(*batch, S, hs_v, generator=g, dtype=torch.float64).to(dtype)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def run_both(q, k, v, align="top_left", **kw):
    """Output and grads (one shared grad_out) of attnext and of the float64 reference."""
    bottom_right = align == "bottom_right"
    out = attnext.causal_attention(q, k, v, align=align, **kw)
    scale = kw.get("scale") or q.shape[-1] ** -0.5
    ref, _ = reference.causal_attention(q, k, v, scale, 0.0, bottom_right)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    return out, ref, grads, ref_grads


SHAPES = [
    # (batch, T, S, hs, hs_v, align): the code path each covers
    ((2,), 1, 1, 16, 16, "top_left"),  # T = 1: one row, one key
    ((3,), 67, 67, 24, 24, "top_left"),  # odd T, inside one query tile
    ((2,), 64, 64, 64, 64, "top_left"),  # exactly one tile
    ((2,), 130, 130, 64, 64, "top_left"),  # T > tile, not a multiple of it: partial last tiles
    ((1,), 200, 200, 128, 128, "top_left"),  # hs = 128, several diagonal tiles
    ((2,), 100, 100, 1, 1, "top_left"),  # hs = 1
    ((2, 3), 70, 70, 16, 8, "top_left"),  # 4-D (nanoGPT), hs_v != hs
    ((2,), 70, 150, 16, 24, "top_left"),  # S > T top-left: trailing keys never seen (zero grads)
    ((2,), 70, 150, 16, 24, "bottom_right"),  # S > T bottom-right: KV-cache decoding
    ((2,), 150, 70, 24, 16, "bottom_right"),  # T > S bottom-right: first rows see no key
    ((2,), 150, 70, 24, 16, "top_left"),  # T > S top-left
    ((1, 1), 65, 129, 64, 32, "bottom_right"),  # diagonal crossing tile boundaries
    # past the backward's 256-row query blocks: a partial second block, and blocks
    # that start mid-way through a key tile's rows (T != S either way)
    ((1,), 300, 300, 32, 32, "top_left"),
    ((1,), 270, 600, 16, 24, "bottom_right"),
    ((1,), 600, 270, 16, 16, "bottom_right"),
]


@needs_native
@pytest.mark.parametrize("batch,T,S,hs,hs_v,align", SHAPES)
def test_matches_reference_float64(batch, T, S, hs, hs_v, align):
    q, k, v = make_qkv(batch, T, S, hs, hs_v)
    assert not attnext.explain("causal_attention", q, k, v)
    out, ref, grads, ref_grads = run_both(q, k, v, align)
    atol, rtol = TOL[torch.float64]
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    for name, g, r in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(g, r, atol=atol, rtol=rtol, msg=lambda m: f"grad {name}: {m}")
    if align == "top_left" and S > T:
        assert grads[1][..., T:, :].abs().max() == 0 and grads[2][..., T:, :].abs().max() == 0
    if align == "bottom_right" and T > S:
        assert out[..., : T - S, :].abs().max() == 0  # rows that see no key are 0, not NaN


# float32 runs attnext's AVX-512 tile products where the CPU has AVX-512 (the BLAS
# elsewhere, or with ATTNEXT_F32_GEMM=0): every tiling path, plus S * hs > 2^20,
# where the forward transposes K per key tile instead of caching K^T per batch.
F32_SHAPES = SHAPES + [((1,), 520, 520, 2048, 40, "top_left")]


def _float32_check(batch, T, S, hs, hs_v, align):
    qd, kd, vd = make_qkv(batch, T, S, hs, hs_v)
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (qd, kd, vd))
    out = attnext.causal_attention(qf, kf, vf, align=align)
    ref, _ = reference.causal_attention(qd, kd, vd, hs**-0.5, 0.0, align == "bottom_right")
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad(out, (qf, kf, vf), g.float())
    ref_grads = torch.autograd.grad(ref, (qd, kd, vd), g)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    for name, a, r in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(a.double(), r, atol=1e-4, rtol=1e-4, msg=lambda m: f"grad {name}: {m}")


@needs_native
@pytest.mark.parametrize("batch,T,S,hs,hs_v,align", F32_SHAPES)
def test_float32_matches_reference(batch, T, S, hs, hs_v, align):
    _float32_check(batch, T, S, hs, hs_v, align)


@needs_native
def test_float32_blas_path_matches_reference():
    # ATTNEXT_F32_GEMM=0: the float tiles through the BLAS, as on CPUs without AVX-512;
    # K^T cached per batch (T >= 449, e.g. 600) and, past 4 MiB of it, K's rows per call
    code = (
        "import sys; sys.path.insert(0, 'tests')\n"
        "import test_attention as t\n"
        "for case in t.F32_SHAPES:\n"
        "    t._float32_check(*case)\n"
        "print('ok')\n"
    )
    from conftest import assert_python_ok

    assert_python_ok(code, ATTNEXT_F32_GEMM="0")


@needs_native
@pytest.mark.parametrize("isa", CPU_ISAS)
def test_sharp_attention_matches_reference(isa):
    # Scores hundreds apart (q, k of std 8 at hs 64): most weights of a row are below
    # float's smallest normal. The tiles flush them to 0 instead of computing with
    # subnormals (3-4x slower on x86); output and gradients stay the float64 reference's.
    code = (
        "import torch, attnext\n"
        "from attnext import reference\n"
        "g = torch.Generator().manual_seed(0)\n"
        "q, k, v = (torch.randn(2, 3, 150, 64, generator=g, dtype=torch.float64) * s for s in (8, 8, 1))\n"
        "do = torch.randn(2, 3, 150, 64, generator=g, dtype=torch.float64)\n"
        "qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))\n"
        "ref, _ = reference.causal_attention(qr, kr, vr, 0.125)\n"
        "refg = torch.autograd.grad(ref, (qr, kr, vr), do)\n"
        "qf, kf, vf = (t.float().requires_grad_() for t in (q, k, v))\n"
        "out = attnext.causal_attention(qf, kf, vf)\n"
        "assert list(attnext.explain('causal_attention', qf, kf, vf)) == []\n"
        "grads = torch.autograd.grad(out, (qf, kf, vf), do.float())\n"
        "torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)\n"
        "for a, r in zip(grads, refg):\n"
        "    torch.testing.assert_close(a.double(), r, atol=2e-3, rtol=1e-3)\n"
        "print('ok')\n"
    )
    assert_python_ok_on_isa(code, isa)


@needs_native
def test_lse_matches_logsumexp():
    q, k, v = make_qkv((2,), 90, 90, 16, 16, requires_grad=False)
    out, lse = torch.ops.attnext.causal_attention(q, k, v, 0.3, 0.0, False, 0, 0)
    ref_out, ref_lse = reference.causal_attention(q, k, v, 0.3)
    torch.testing.assert_close(lse, ref_lse, atol=1e-12, rtol=1e-12)
    assert lse.dtype == torch.float64 and lse.shape == (2, 90)


@pytest.mark.parametrize("batch", [(3,), (2, 4)])  # 3-D (lecture: SDPA math path) and 4-D (nanoGPT)
@pytest.mark.parametrize("T,hs", [(1, 16), (77, 24), (150, 64)])
def test_matches_sdpa_float32(batch, T, hs):
    q, k, v = make_qkv(batch, T, T, hs, hs, dtype=torch.float32)
    out = attnext.causal_attention(q, k, v)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=5e-5)


def test_transposed_views_like_nanogpt():
    # q, k, v as nanoGPT makes them: split of one (B, T, 3C) tensor, viewed (B, T, nh, hs)
    # and transposed to (B, nh, T, hs): non-contiguous, read through their strides.
    B, T, nh, hs = 2, 75, 3, 16
    x = torch.randn(B, T, 3 * nh * hs, dtype=torch.float64, requires_grad=True)
    q, k, v = (t.view(B, T, nh, hs).transpose(1, 2) for t in x.split(nh * hs, dim=2))
    assert not q.is_contiguous()
    out = attnext.causal_attention(q, k, v)
    ref, _ = reference.causal_attention(q, k, v, hs**-0.5)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, g)
    (rx,) = torch.autograd.grad(ref, x, g)
    torch.testing.assert_close(gx, rx, atol=1e-10, rtol=1e-10)


def test_other_strides_are_copied():
    # last dim not unit-stride, and a grad_out that is a transposed view
    q, k, v = make_qkv((2,), 40, 40, 8, 8)
    qt = q.detach().transpose(-1, -2).contiguous().transpose(-1, -2).requires_grad_()
    assert qt.stride(-1) != 1
    out = attnext.causal_attention(qt, k, v, scale=0.5)
    ref, _ = reference.causal_attention(q, k, v, 0.5)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    g = torch.randn(2, 8, 40, dtype=torch.float64).transpose(-1, -2)
    torch.testing.assert_close(
        torch.autograd.grad(out, qt, g)[0], torch.autograd.grad(ref, q, g)[0], atol=1e-10, rtol=1e-10
    )


@needs_native
def test_bfloat16_error_within_twice_eager():
    q, k, v = make_qkv((2, 2), 130, 130, 64, 64, dtype=torch.float64)
    oracle = reference.causal_attention(q, k, v, 0.125)[0]
    g64 = torch.randn_like(oracle)
    oracle_grads = torch.autograd.grad(oracle, (q, k, v), g64)
    qb, kb, vb = (t.detach().bfloat16().requires_grad_() for t in (q, k, v))
    gb = g64.bfloat16()

    out = attnext.causal_attention(qb, kb, vb, scale=0.125)
    assert out.dtype == torch.bfloat16
    grads = torch.autograd.grad(out, (qb, kb, vb), gb)
    eager = reference.causal_attention(qb, kb, vb, 0.125)[0]
    eager_grads = torch.autograd.grad(eager, (qb, kb, vb), gb)

    def err(a, b):
        return (a.double() - b).abs().max().item()

    assert err(out, oracle) <= 2 * err(eager, oracle) + 1e-3
    for a, e, o in zip(grads, eager_grads, oracle_grads):
        assert a.dtype == torch.bfloat16
        assert err(a, o) <= 2 * err(e, o) + 1e-3


def test_scale_default_and_explicit():
    q, k, v = make_qkv((2,), 33, 33, 24, 24, requires_grad=False)
    torch.testing.assert_close(
        attnext.causal_attention(q, k, v), reference.causal_attention(q, k, v, 24**-0.5)[0], atol=1e-10, rtol=1e-10
    )
    torch.testing.assert_close(
        attnext.causal_attention(q, k, v, scale=2.0), reference.causal_attention(q, k, v, 2.0)[0], atol=1e-10, rtol=1e-10
    )


@needs_native
def test_gradcheck():
    q, k, v = make_qkv((1, 2), 19, 19, 5, 3)
    assert torch.autograd.gradcheck(lambda a, b, c: attnext.causal_attention(a, b, c, scale=0.7), (q, k, v))
    q, k, v = make_qkv((2,), 9, 13, 4, 6)
    assert torch.autograd.gradcheck(
        lambda a, b, c: attnext.causal_attention(a, b, c, align="bottom_right"), (q, k, v)
    )


@needs_native
def test_gradcheck_with_dropout_fixed_seed():
    # The backward regenerates the forward's mask from (seed, offset): with a fixed
    # seed the op is a deterministic function and its gradient must check.
    q, k, v = make_qkv((2,), 70, 70, 4, 3)

    def f(a, b, c):
        return torch.ops.attnext.causal_attention(a, b, c, 0.5, 0.4, False, 123, 7)[0]

    assert torch.autograd.gradcheck(f, (q, k, v))

    def g(a, b, c):  # the public function, with the generator reset on every call
        return attnext.causal_attention(a, b, c, dropout_p=0.3, generator=torch.Generator().manual_seed(5))

    assert torch.autograd.gradcheck(g, (q, k, v))


# ----------------------------------------------------------------------------- dropout


def _identity_probe(batch, T, p, dtype=torch.float64, **kw):
    """q = 0 makes row t's weights 1/(t+1); v = identity exposes them: out[t, j] = keep * 1/((1-p)(t+1))."""
    q = torch.zeros(*batch, T, 8, dtype=dtype)
    k = torch.randn(*batch, T, 8, dtype=dtype)
    v = torch.eye(T, dtype=dtype).expand(*batch, T, T).contiguous()
    out = attnext.causal_attention(q, k, v, dropout_p=p, **kw)
    row = torch.arange(1, T + 1, dtype=dtype).view(T, 1)
    return out, out * row * (1 - p)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_dropout_keep_rate_and_mean(p):
    T = 192
    torch.manual_seed(0)
    out, mask = _identity_probe((4,), T, p)
    visible = reference.causal_mask(T, T).expand_as(mask)
    vals = mask[visible]
    assert torch.all(((vals - 0).abs() < 1e-9) | ((vals - 1).abs() < 1e-9))  # exactly 0 or 1/(1-p)
    assert torch.all(mask[~visible] == 0)
    n = vals.numel()
    keep = vals.mean().item()
    assert abs(keep - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    # mean preserved: each row still sums to 1 in expectation
    row_sums = out.sum(-1)  # (4, T)
    assert abs(row_sums[..., 64:].mean().item() - 1.0) < 0.05


def test_dropout_matches_reference_mask_and_fallback():
    # kernel and fallback draw the same (seed, offset) and drop the same weights
    q, k, v = make_qkv((2, 2), 80, 80, 16, 16)
    torch.manual_seed(42)
    out = attnext.causal_attention(q, k, v, dropout_p=0.25)
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    attnext.set_kernels_enabled(False)
    try:
        torch.manual_seed(42)
        ref = attnext.causal_attention(q, k, v, dropout_p=0.25)
        ref_grads = torch.autograd.grad(ref, (q, k, v), torch.ones_like(ref))
    finally:
        attnext.set_kernels_enabled(True)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_dropout_reproducible_with_manual_seed():
    q, k, v = make_qkv((2,), 50, 50, 8, 8, dtype=torch.float32, requires_grad=False)
    torch.manual_seed(3)
    a = attnext.causal_attention(q, k, v, dropout_p=0.5)
    b = attnext.causal_attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(3)
    c = attnext.causal_attention(q, k, v, dropout_p=0.5)
    assert torch.equal(a, c)
    assert not torch.equal(a, b)  # the generator moved on
    # p = 0 draws nothing from the generator and equals the no-dropout result
    torch.manual_seed(3)
    d = attnext.causal_attention(q, k, v, dropout_p=0.0)
    after = torch.rand(1)
    torch.manual_seed(3)
    assert torch.equal(after, torch.rand(1))
    torch.testing.assert_close(d, reference.causal_attention(q, k, v, 8**-0.5)[0], atol=2e-6, rtol=2e-6)


def test_dropout_mask_is_independent_of_threads():
    q, k, v = make_qkv((1,), 300, 300, 16, 16, dtype=torch.float32)
    n = torch.get_num_threads()
    results = []
    for threads in sorted({1, n}):
        torch.set_num_threads(threads)
        try:
            out = attnext.causal_attention(q, k, v, dropout_p=0.2, generator=torch.Generator().manual_seed(9))
            results.append((out, *torch.autograd.grad(out, (q, k, v), torch.ones_like(out))))
        finally:
            torch.set_num_threads(n)
    for a, b in zip(results[0], results[-1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- fallback


def test_fallback_parity():
    q, k, v = make_qkv((2, 3), 70, 70, 16, 24)
    out = attnext.causal_attention(q, k, v, align="bottom_right")
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    attnext.set_kernels_enabled(False)
    try:
        reasons = attnext.explain("causal_attention", q, k, v)
        assert reasons
        if HAVE_KERNEL:
            assert any("disabled" in r for r in reasons)
        ref = attnext.causal_attention(q, k, v, align="bottom_right")
        ref_grads = torch.autograd.grad(ref, (q, k, v), torch.ones_like(ref))
    finally:
        attnext.set_kernels_enabled(True)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@needs_native
def test_float16_takes_the_fallback():
    q, k, v = make_qkv((2,), 20, 20, 8, 8, dtype=torch.float16)
    reasons = attnext.explain("causal_attention", q, k, v)
    assert reasons and all("dtype torch.float16" in r for r in reasons)
    out = attnext.causal_attention(q, k, v)
    ref = reference.causal_attention(q.double(), k.double(), v.double(), 8**-0.5)[0]
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.double(), ref, atol=5e-3, rtol=5e-3)


@needs_native
def test_kernel_rejects_float16_directly():
    q, k, v = make_qkv((2,), 4, 4, 8, 8, dtype=torch.float16, requires_grad=False)
    with pytest.raises(RuntimeError, match="float32, float64 or bfloat16"):
        torch.ops.attnext.causal_attention(q, k, v, 1.0, 0.0, False, 0, 0)


def test_meta_tensors_take_the_fallback_or_fake():
    q, k, v = (torch.empty(2, 3, 10, 8, device="meta") for _ in range(3))
    out = attnext.causal_attention(q, k, v)
    assert out.shape == (2, 3, 10, 8) and out.device.type == "meta"


# ----------------------------------------------------------------------------- fake, opcheck, compile


@needs_native
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_opcheck(dropout_p):
    q, k, v = make_qkv((2, 2), 37, 37, 8, 4, dtype=torch.float32)
    torch.library.opcheck(torch.ops.attnext.causal_attention.default, (q, k, v, 0.35, dropout_p, False, 11, 2))
    out, lse = torch.ops.attnext.causal_attention(q, k, v, 0.35, dropout_p, False, 11, 2)
    g = torch.randn_like(out)
    qd, kd, vd = (t.detach() for t in (q, k, v))
    torch.library.opcheck(
        torch.ops.attnext._causal_attention_backward.default,
        (g, qd, kd, vd, out.detach(), lse, 0.35, dropout_p, False, 11, 2),
    )


@needs_native
def test_rng_tensor_replaces_the_ints():
    # rng = [seed, offset] as an int64 tensor (what CUDA inputs get, drawn on the GPU):
    # the same mask as the ints in the forward and the backward, opcheck-clean
    q, k, v = make_qkv((2,), 37, 37, 8, 8)
    rng = torch.tensor([11, 2])
    args = (0.35, 0.3, False)
    out, lse = torch.ops.attnext.causal_attention(q, k, v, *args, 0, 0, rng)
    ref, _ = torch.ops.attnext.causal_attention(q, k, v, *args, 11, 2)
    assert torch.equal(out, ref)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(grads, ref_grads):
        assert torch.equal(a, b)
    assert torch.autograd.gradcheck(
        lambda q, k, v: torch.ops.attnext.causal_attention(q, k, v, *args, 0, 0, rng)[0], (q, k, v)
    )
    qf, kf, vf = (t.detach().float() for t in (q, k, v))
    torch.library.opcheck(torch.ops.attnext.causal_attention.default, (qf, kf, vf, *args, 0, 0, rng))
    qkv = torch.randn(2, 21, 3, 2, 8, requires_grad=True)
    o1, _ = torch.ops.attnext.causal_attention_qkvpacked(qkv, *args, 0, 0, rng)
    o2, _ = torch.ops.attnext.causal_attention_qkvpacked(qkv, *args, 11, 2)
    assert torch.equal(o1, o2)
    torch.library.opcheck(torch.ops.attnext.causal_attention_qkvpacked.default, (qkv, *args, 0, 0, rng))
    with pytest.raises(RuntimeError, match="rng must be an int64 tensor of shape"):
        torch.ops.attnext.causal_attention(q, k, v, *args, 0, 0, rng.float())


@needs_native
def test_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 3, 17, 8, dtype=torch.bfloat16)
        k = torch.empty(2, 3, 21, 8, dtype=torch.bfloat16)
        v = torch.empty(2, 3, 21, 5, dtype=torch.bfloat16)
        out, lse = torch.ops.attnext.causal_attention(q, k, v, 1.0, 0.0, True, 0, 0)
        assert out.shape == (2, 3, 17, 5) and out.dtype == torch.bfloat16
        assert lse.shape == (2, 3, 17) and lse.dtype == torch.float32


@needs_native
def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    q, k, v = make_qkv((2, 2), 50, 50, 16, 16, dtype=torch.float32)

    def f(q, k, v):
        return attnext.causal_attention(q, k, v).sum(-1)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v)
    torch.testing.assert_close(out, f(q, k, v))
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    ref_grads = torch.autograd.grad(f(q, k, v).sum(), (q, k, v))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- errors


def _qkv(T=8, S=8, hs=4, hs_v=4, dtype=torch.float32):
    return torch.randn(2, T, hs, dtype=dtype), torch.randn(2, S, hs, dtype=dtype), torch.randn(2, S, hs_v, dtype=dtype)


def test_error_head_size_mismatch():
    q, k, v = _qkv()
    with pytest.raises(RuntimeError, match="same head size"):
        attnext.causal_attention(q, torch.randn(2, 8, 5), v)


def test_error_key_count_mismatch():
    q, k, v = _qkv()
    with pytest.raises(RuntimeError, match="same number of keys"):
        attnext.causal_attention(q, k, torch.randn(2, 9, 4))


def test_error_batch_mismatch():
    q, k, v = _qkv()
    with pytest.raises(RuntimeError, match="same batch dims"):
        attnext.causal_attention(q, torch.randn(3, 8, 4), v)
    with pytest.raises(RuntimeError, match="same batch dims"):
        attnext.causal_attention(q.unsqueeze(0), k, v)


def test_error_dtype_mismatch():
    q, k, v = _qkv()
    with pytest.raises(RuntimeError, match="same dtype"):
        attnext.causal_attention(q, k.double(), v)
    with pytest.raises(RuntimeError, match="floating-point"):
        attnext.causal_attention(q.long(), k.long(), v.long())


def test_error_device_mismatch():
    q, k, v = _qkv()
    with pytest.raises(RuntimeError, match="same device"):
        attnext.causal_attention(q, k.to("meta"), v)


def test_error_too_few_dims_and_non_tensor():
    q, k, v = _qkv()
    with pytest.raises(RuntimeError, match="at least 2 dims"):
        attnext.causal_attention(torch.randn(4), k, v)
    with pytest.raises(TypeError, match="torch.Tensor"):
        attnext.causal_attention(q.tolist(), k, v)


def test_error_bad_dropout_scale_align():
    q, k, v = _qkv()
    for p in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="dropout_p"):
            attnext.causal_attention(q, k, v, dropout_p=p)
    with pytest.raises(TypeError, match="dropout_p"):
        attnext.causal_attention(q, k, v, dropout_p="0.1")
    with pytest.raises(ValueError, match="scale"):
        attnext.causal_attention(q, k, v, scale=float("nan"))
    with pytest.raises(ValueError, match="align"):
        attnext.causal_attention(q, k, v, align="diagonal")


@needs_native
def test_kernel_errors_name_the_argument():
    q, k, v = _qkv()
    op = torch.ops.attnext.causal_attention
    with pytest.raises(RuntimeError, match="same head size"):
        op(q, torch.randn(2, 8, 5), v, 1.0, 0.0, False, 0, 0)
    with pytest.raises(ValueError, match="dropout_p"):
        op(q, k, v, 1.0, 1.0, False, 0, 0)
    out, lse = op(q, k, v, 1.0, 0.0, False, 0, 0)
    with pytest.raises(RuntimeError, match="grad_out must have shape"):
        torch.ops.attnext._causal_attention_backward(out[:, :4], q, k, v, out, lse, 1.0, 0.0, False, 0, 0)
    with pytest.raises(RuntimeError, match="lse must be"):
        torch.ops.attnext._causal_attention_backward(out, q, k, v, out, lse.double(), 1.0, 0.0, False, 0, 0)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_non_finite_scores_behave_as_torch_softmax(dtype):
    # keys [0, 256) score -inf for every query (k[..., 0] = -inf, q[..., 0] > 0): rows
    # t < 256 see only -inf (torch: NaN), rows t >= 256 also see finite keys (torch:
    # finite, the -inf keys weigh 0) even though their first key tiles are all -inf.
    T, hs = 300, 16
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, T, hs, generator=g, dtype=torch.float64).abs() + 0.1
    k = torch.randn(2, T, hs, generator=g, dtype=torch.float64)
    v = torch.randn(2, T, hs, generator=g, dtype=torch.float64)
    k[:, :256, 0] = float("-inf")
    # and one NaN query row: only that row is NaN
    q[1, 280, 3] = float("nan")
    out = attnext.causal_attention(q.to(dtype), k.to(dtype), v.to(dtype))
    ref, _ = reference.causal_attention(q, k, v, hs**-0.5)
    assert ref[:, :256].isnan().all() and ref[:, 256:].isfinite().sum() == 2 * 44 * hs - hs
    assert torch.equal(out.isnan(), ref.isnan())
    atol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=atol, equal_nan=True)


def test_empty_inputs():
    q, k, v = make_qkv((2,), 0, 0, 8, 8, dtype=torch.float32)
    out = attnext.causal_attention(q, k, v)
    assert out.shape == (2, 0, 8)


@pytest.mark.parametrize("kernels", [True, False])
def test_zero_head_size_gives_the_causal_mean_of_v(kernels):
    # hs == 0: every score is 0 whatever the scale, so each row is the mean of the v
    # rows it sees, as SDPA gives; scale=None must not divide by zero (0 ** -0.5).
    q, k, v = make_qkv((2, 3), 5, 5, 0, 4, dtype=torch.float32)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    mean = v.cumsum(-2) / torch.arange(1, 6, dtype=torch.float32).view(5, 1)
    torch.testing.assert_close(want, mean)
    previous = attnext.kernels_enabled()
    attnext.set_kernels_enabled(kernels)
    try:
        out = attnext.causal_attention(q, k, v)
        packed = attnext.causal_attention_qkvpacked(torch.zeros(2, 5, 3, 3, 0))
    finally:
        attnext.set_kernels_enabled(previous)
    torch.testing.assert_close(out, mean)
    assert packed.shape == (2, 5, 3, 0)


@needs_native
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_bfloat16_strided_views_and_chunked_backward(dropout_p):
    # bf16 tiles widened as read from nanoGPT-style strided views; 3 batches (not a
    # multiple of the thread count) also takes the chunked-dQ backward path.
    B, T, nh, hs = 1, 150, 3, 16
    x = torch.randn(B, T, 3 * nh * hs, dtype=torch.float64).bfloat16().double()
    xb = x.bfloat16().requires_grad_()
    xd = x.clone().requires_grad_()
    qb, kb, vb = (t.view(B, T, nh, hs).transpose(1, 2) for t in xb.split(nh * hs, dim=2))
    qd, kd, vd = (t.view(B, T, nh, hs).transpose(1, 2) for t in xd.split(nh * hs, dim=2))
    out = attnext.causal_attention(qb, kb, vb, dropout_p=dropout_p, align="bottom_right",
                                   generator=torch.Generator().manual_seed(1))
    ref, _ = reference.causal_attention(qd, kd, vd, hs**-0.5, dropout_p, True, *_seed_of(1))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)
    g = torch.randn(out.shape, dtype=torch.float64)
    (gx,) = torch.autograd.grad(out, xb, g.bfloat16())
    (rx,) = torch.autograd.grad(ref, xd, g.bfloat16().double())
    torch.testing.assert_close(gx.double(), rx, atol=5e-2, rtol=5e-2)


def _seed_of(generator_seed):
    """The (seed, offset) attnext draws from a generator seeded with generator_seed."""
    return attnext.ops._draw_dropout_seed(torch.Generator().manual_seed(generator_seed))


@needs_native
def test_torch_compile_fullgraph_with_dropout():
    # the dropout seed is drawn inside the graph (an unbacked SymInt into the op)
    torch._dynamo.reset()
    q, k, v = make_qkv((2, 2), 40, 40, 8, 8, dtype=torch.float32)

    def f(q, k, v):
        return attnext.causal_attention(q, k, v, dropout_p=0.2)

    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        torch.manual_seed(0)
        out = compiled(q, k, v)
    torch.manual_seed(0)
    ref = f(q, k, v)
    torch.testing.assert_close(out, ref)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.sum(), (q, k, v))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


BF16_SHAPES = [
    # (batch, T, S, hs, hs_v, align, dropout_p): the bfloat16 paths each covers
    ((2, 3), 130, 130, 64, 64, "top_left", 0.0),  # several query tiles, partial last tile
    ((1,), 300, 300, 128, 128, "top_left", 0.2),  # one batch: chunked backward, dropout
    ((2,), 70, 151, 16, 24, "bottom_right", 0.0),  # odd shift S - T: pairs made per tile
    ((2,), 150, 70, 24, 16, "bottom_right", 0.3),  # rows that see no key, dropout
    ((3,), 33, 33, 2, 4, "top_left", 0.0),  # the smallest even head size, hs_v != hs
    ((2,), 40, 40, 5, 3, "top_left", 0.0),  # odd head sizes: the widened-float path
    ((1,), 600, 600, 32, 32, "top_left", 0.0),  # key tiles beyond the first 256 columns
]


def _bf16_errors(batch, T, S, hs, hs_v, align, dropout_p):
    """Max error vs the float64 oracle of attnext and of eager, in bfloat16, out and grads."""
    br = align == "bottom_right"
    q, k, v = make_qkv(batch, T, S, hs, hs_v)
    seed = _seed_of(5) if dropout_p else (0, 0)
    oracle = reference.causal_attention(q, k, v, hs**-0.5, dropout_p, br, *seed)[0]
    g = torch.randn(oracle.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    oracle_all = (oracle, *torch.autograd.grad(oracle, (q, k, v), g))
    qb, kb, vb = (t.detach().bfloat16().requires_grad_() for t in (q, k, v))
    out = attnext.causal_attention(qb, kb, vb, align=align, dropout_p=dropout_p,
                                   generator=torch.Generator().manual_seed(5))
    ours = (out, *torch.autograd.grad(out, (qb, kb, vb), g.bfloat16()))
    eager = reference.causal_attention(qb, kb, vb, hs**-0.5, dropout_p, br, *seed)[0]
    eager_all = (eager, *torch.autograd.grad(eager, (qb, kb, vb), g.bfloat16()))

    def err(a, o):
        return (a.double() - o).abs().max().item()

    return [(err(a, o), err(e, o)) for a, e, o in zip(ours, eager_all, oracle_all)]


@needs_native
@pytest.mark.parametrize("batch,T,S,hs,hs_v,align,dropout_p", BF16_SHAPES)
def test_bfloat16_within_twice_eager_every_path(batch, T, S, hs, hs_v, align, dropout_p):
    # On CPUs with AVX512-BF16 or AArch64's BF16 extension (BFDOT, checked under qemu
    # by scripts/check_aarch64.sh) the tile products run in bfloat16 (P and dS rounded
    # to bfloat16, as eager does); elsewhere, and for odd head sizes, tiles are
    # widened to float. Either way: at most twice eager bfloat16's own error.
    for ours, eager in _bf16_errors(batch, T, S, hs, hs_v, align, dropout_p):
        assert ours <= 2 * eager + 1e-3, (ours, eager)


@needs_native
def test_bfloat16_dot_path_matches_widened_path():
    # ATTNEXT_BF16_DOT=0 forces the widened-float path; both must meet the same bar
    # (the subprocess also covers CPUs where the dot path is the default).
    code = (
        "import sys; sys.path.insert(0, 'tests')\n"
        "import test_attention as t\n"
        "for case in t.BF16_SHAPES:\n"
        "    for ours, eager in t._bf16_errors(*case):\n"
        "        assert ours <= 2 * eager + 1e-3, (case, ours, eager)\n"
        "print('ok')\n"
    )
    from conftest import assert_python_ok

    assert_python_ok(code, ATTNEXT_BF16_DOT="0")
