"""causal_attention for decoding with a KV cache (the CPU decode pass, T <= 16 without
dropout: csrc/cpu/causal_attention_decode.cpp) and grouped-query heads (enable_gqa).

Oracles: reference.causal_attention in float64 (k, v repeated per group for GQA),
and F.scaled_dot_product_attention(..., enable_gqa=True) itself.
"""
import pytest
import torch
import torch.nn.functional as F

import attnext
from attnext import reference
from conftest import TOL, assert_close_to_oracle, assert_python_ok, needs_native

DECODE_SHAPES = [
    # (batch, T, S, hs, hs_v): the decode-pass paths each covers
    ((2, 3), 1, 1, 8, 8),  # one key
    ((1,), 1, 700, 64, 64),  # one (batch, head): keys split across threads, partials merged
    ((2, 2), 1, 129, 32, 16),  # a block of 128 keys plus one; hs_v != hs
    ((1, 2), 5, 3000, 128, 128),  # a few rows, several splits, hs 128
    ((1,), 16, 1030, 17, 33),  # the most rows the pass takes; odd head sizes (vector tails)
    ((3,), 4, 2, 8, 8),  # T > S: the first two rows see no key (zeros, lse -inf)
    ((2,), 7, 7, 16, 16),  # T == S: an ordinary causal square
]


def _qkv(batch, T, S, hs, hs_v, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*batch, T, hs, generator=g).to(dtype), torch.randn(*batch, S, hs, generator=g).to(dtype),
            torch.randn(*batch, S, hs_v, generator=g).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("align", ["bottom_right", "top_left"])
@pytest.mark.parametrize("batch,T,S,hs,hs_v", DECODE_SHAPES)
def test_decode_matches_reference(batch, T, S, hs, hs_v, align, dtype):
    q, k, v = _qkv(batch, T, S, hs, hs_v, dtype)
    br = align == "bottom_right"
    out = attnext.causal_attention(q, k, v, scale=0.3, align=align)
    ref, _ = reference.causal_attention(q.double(), k.double(), v.double(), 0.3, 0.0, br)
    eager, _ = reference.causal_attention(q, k, v, 0.3, 0.0, br)
    assert out.dtype == dtype and out.shape == ref.shape
    assert_close_to_oracle(out, ref, eager, dtype, f"decode {batch} T={T} S={S}")


@needs_native
@pytest.mark.parametrize("batch,T,S,hs,hs_v", DECODE_SHAPES)
def test_decode_lse_matches_reference(batch, T, S, hs, hs_v):
    # The op's second output (the backward needs it): -inf exactly for rows without keys.
    q, k, v = _qkv(batch, T, S, hs, hs_v, torch.float32)
    out, lse = torch.ops.attnext.causal_attention(q, k, v, 0.3, 0.0, True)
    _, ref = reference.causal_attention(q.double(), k.double(), v.double(), 0.3, 0.0, True)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref))
    fin = torch.isfinite(ref)
    torch.testing.assert_close(lse.double()[fin], ref[fin], atol=1e-5, rtol=1e-5)


def test_decode_gradients():
    # A decode-shaped forward (native decode pass) still differentiates: the backward
    # uses the lse the decode pass left, against the float64 oracle.
    q, k, v = (t.requires_grad_() for t in _qkv((2, 2), 3, 600, 16, 16, torch.float64))
    assert torch.autograd.gradcheck(lambda q, k, v: attnext.causal_attention(q, k, v, align="bottom_right"),
                                    (q, k, v), fast_mode=True)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    out = attnext.causal_attention(q32, k32, v32, align="bottom_right")
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q32, k32, v32), g)
    ref = reference.causal_attention(q, k, v, 16**-0.5, 0.0, True)[0]
    ref_grads = torch.autograd.grad(ref, (q, k, v), g.double())
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-4)


def test_decode_strided_views():
    # nanoGPT-style (B, nh, T, hs) views of (B, T, nh, hs) tensors and a cache slice are read in place.
    B, nh, S, hs = 2, 4, 300, 16
    kc = torch.randn(B, 512, nh, hs)  # a preallocated cache, filled to S
    vc = torch.randn(B, 512, nh, hs)
    q = torch.randn(B, 1, nh, hs).transpose(1, 2)
    k, v = kc[:, :S].transpose(1, 2), vc[:, :S].transpose(1, 2)
    out = attnext.causal_attention(q, k, v, align="bottom_right")
    ref = reference.causal_attention(q.double(), k.double(), v.double(), hs**-0.5, 0.0, True)[0]
    torch.testing.assert_close(out.double(), ref, atol=TOL[torch.float32][0] * 10, rtol=TOL[torch.float32][1])


def test_decode_inf_and_nan():
    # Keys whose scores are -inf fill the first splits entirely: the merge ignores them
    # (no NaN); a NaN score makes the row NaN, as torch.softmax does.
    q = torch.full((1, 1, 1, 8), -1.0)
    k, v = torch.randn(1, 1, 5000, 8), torch.randn(1, 1, 5000, 8)
    k[..., :2600, :] = float("inf")
    out = attnext.causal_attention(q, k, v, scale=1.0, align="bottom_right")
    ref = reference.causal_attention(q.double(), k.double(), v.double(), 1.0, 0.0, True)[0]
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    k = torch.randn(1, 1, 5000, 8)
    k[..., 100, 0] = float("nan")
    assert torch.isnan(attnext.causal_attention(q, k, v, align="bottom_right")).all()


def test_decode_no_keys():
    # S = 0: every row sees nothing, output zeros of shape (..., T, hs_v).
    q, k, v = torch.randn(2, 1, 8), torch.randn(2, 0, 8), torch.randn(2, 0, 5)
    out = attnext.causal_attention(q, k, v, align="bottom_right")
    assert out.shape == (2, 1, 5) and torch.equal(out, torch.zeros_like(out))


@needs_native
def test_decode_pass_equals_tile_kernels():
    # ATTNEXT_DECODE=0 sends the same call to the tile kernels: the two agree.
    assert_python_ok(
        "import torch, attnext\n"
        "torch.manual_seed(0)\n"
        "q, k, v = torch.randn(3, 4, 2, 64), torch.randn(3, 4, 2000, 64), torch.randn(3, 4, 2000, 64)\n"
        "out = attnext.causal_attention(q, k, v, align='bottom_right')\n"
        "torch.save(out, '/tmp/attnext_decode_tiles.pt')\n"
        "print('ok')\n",
        ATTNEXT_DECODE="0",
    )
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 4, 2, 64), torch.randn(3, 4, 2000, 64), torch.randn(3, 4, 2000, 64)
    out = attnext.causal_attention(q, k, v, align="bottom_right")
    tiles = torch.load("/tmp/attnext_decode_tiles.pt")
    torch.testing.assert_close(out, tiles, atol=2e-6, rtol=2e-5)


# ----------------------------------------------------------------------------- grouped-query heads

GQA_SHAPES = [
    # (B, H, Hkv, T, S, align): the paths each covers
    (2, 8, 2, 1, 300, "bottom_right"),  # decode: one work item per key/value head serves 4 query heads
    (1, 32, 8, 1, 2100, "bottom_right"),  # decode with key splits (few kv heads per thread)
    (1, 6, 1, 3, 70, "bottom_right"),  # multi-query (one kv head), a few rows
    (2, 4, 2, 40, 40, "top_left"),  # training shape: the tile kernels on stride-0 k/v views
    (1, 4, 4, 33, 70, "bottom_right"),  # Hkv == H: ordinary attention through the GQA entry
    (2, 6, 3, 70, 30, "bottom_right"),  # T > S: rows without keys stay zeros
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,H,Hkv,T,S,align", GQA_SHAPES)
def test_gqa_matches_sdpa(B, H, Hkv, T, S, align, dtype):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, H, T, 16, generator=g).to(dtype).requires_grad_()
    k = torch.randn(B, Hkv, S, 16, generator=g).to(dtype).requires_grad_()
    v = torch.randn(B, Hkv, S, 24, generator=g).to(dtype).requires_grad_()
    out = attnext.causal_attention(q, k, v, enable_gqa=True, align=align)
    mask = reference.causal_mask(T, S, align == "bottom_right")
    grp = H // Hkv

    def oracle(q, k, v):  # float64, k and v repeated per group
        out, _ = reference.causal_attention(q, k.repeat_interleave(grp, -3), v.repeat_interleave(grp, -3),
                                            16**-0.5, 0.0, align == "bottom_right")
        return out

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = oracle(q64, k64, v64)
    gout = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad(out, (q, k, v), gout.to(dtype))
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), gout)
    qe, ke, ve = (t.detach().requires_grad_() for t in (q, k, v))
    eager = F.scaled_dot_product_attention(qe, ke, ve, attn_mask=mask, enable_gqa=True)
    eager_grads = torch.autograd.grad(eager, (qe, ke, ve), gout.to(dtype))
    if T > S and align == "bottom_right":  # SDPA gives NaN rows where nothing is seen: compare against ours
        eager, eager_grads = ref.to(dtype), tuple(r.to(dtype) for r in ref_grads)
    assert out.shape == (B, H, T, 24)
    assert_close_to_oracle(out, ref, eager, dtype, "gqa out")
    for name, a, r, e in zip("qkv", grads, ref_grads, eager_grads):
        assert a.shape == r.shape
        assert_close_to_oracle(a, r, e, dtype, f"gqa grad {name}")


def test_gqa_dropout_equals_repeated_heads():
    # Query head h keeps the mask it has without grouping (the batch index is the same).
    q = torch.randn(2, 6, 9, 8, requires_grad=True)
    k, v = torch.randn(2, 2, 9, 8, requires_grad=True), torch.randn(2, 2, 9, 8, requires_grad=True)
    out = attnext.causal_attention(q, k, v, dropout_p=0.3, enable_gqa=True, generator=torch.Generator().manual_seed(4))
    kr, vr = k.repeat_interleave(3, 1), v.repeat_interleave(3, 1)
    ref = attnext.causal_attention(q, kr, vr, dropout_p=0.3, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b)


def test_gqa_gradcheck():
    q = torch.randn(1, 4, 5, 3, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 6, 3, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 6, 2, dtype=torch.float64, requires_grad=True)
    f = lambda q, k, v: attnext.causal_attention(q, k, v, enable_gqa=True, align="bottom_right")  # noqa: E731
    assert torch.autograd.gradcheck(f, (q, k, v))
    assert torch.autograd.gradgradcheck(f, (q, k, v))


def test_expanded_and_overlapping_kv_views():
    # k, v passed as stride-0 (expanded) views or views whose rows overlap are read in
    # place and give the result of their materialised copies.
    q = torch.randn(2, 3, 4, 8)
    k1, v1 = torch.randn(2, 1, 50, 8), torch.randn(2, 1, 50, 8)
    k, v = k1.expand(2, 3, 50, 8), v1.expand(2, 3, 50, 8)
    out = attnext.causal_attention(q, k, v, align="bottom_right")
    ref = attnext.causal_attention(q, k.contiguous(), v.contiguous(), align="bottom_right")
    torch.testing.assert_close(out, ref)
    base = torch.randn(2 * 3 * 60 * 8)
    ko = base.as_strided((2, 3, 50, 8), (3 * 60 * 8, 60 * 8, 4, 1))  # rows 4 apart, 8 wide: overlapping
    out = attnext.causal_attention(q, ko, ko, align="bottom_right")
    ref = reference.causal_attention(q.double(), ko.double(), ko.double(), 8**-0.5, 0.0, True)[0]
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "qs,ks,vs,match",
    [
        ((1, 6, 4, 8), (1, 4, 4, 8), (1, 4, 4, 8), "multiple of the number of key/value heads"),
        ((1, 4, 4, 8), (1, 2, 4, 8), (1, 1, 4, 8), "same number of heads"),
        ((4, 8), (4, 8), (4, 8), "at least 3 dims"),
        ((1, 4, 4, 8), (1, 2, 4, 6), (1, 2, 4, 8), "same head size"),
        ((2, 4, 4, 8), (1, 2, 4, 8), (1, 2, 4, 8), "same batch dims"),
        ((1, 4, 4, 8), (1, 0, 4, 8), (1, 0, 4, 8), "multiple of the number of key/value heads"),
    ],
)
def test_gqa_bad_input(qs, ks, vs, match):
    with pytest.raises(RuntimeError, match=match):
        attnext.causal_attention(torch.randn(qs), torch.randn(ks), torch.randn(vs), enable_gqa=True)


def test_gqa_under_compile():
    torch._dynamo.reset()
    q, k, v = torch.randn(2, 8, 5, 16), torch.randn(2, 2, 5, 16), torch.randn(2, 2, 5, 16)
    f = lambda q, k, v: attnext.causal_attention(q, k, v, enable_gqa=True)  # noqa: E731
    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v), f(q, k, v))


@pytest.mark.parametrize("batch,T,S,hs", [((1, 4), 1, 1, 128), ((2, 8), 8, 8, 64), ((1, 2), 4, 600, 64),
                                          ((1, 2), 16, 40, 32), ((1, 2), 16, 300, 64)])
def test_decode_gradients_bfloat16(batch, T, S, hs):
    # The bfloat16 backward of decode-shaped calls: on CPUs with AMX, rows too few to
    # repay its 64-row tiles (T < 8, or T x S <= 2048) run the AVX512-BF16 tiles, the
    # others AMX (csrc/cpu/causal_attention.cpp, amx_backward_pays); every one against
    # the float64 oracle, relative to 1 + the gradient's largest entry (dq of a row with
    # one key is 0).
    q, k, v = (t.requires_grad_() for t in _qkv(batch, T, S, hs, hs, torch.bfloat16, seed=3))
    out = attnext.causal_attention(q, k, v, align="bottom_right")
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).bfloat16()
    grads = torch.autograd.grad(out, (q, k, v), g)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference.causal_attention(q64, k64, v64, hs**-0.5, 0.0, True)[0]
    refs = torch.autograd.grad(ref, (q64, k64, v64), g.double())
    for name, a, r in zip("qkv", grads, refs):
        assert a.dtype == torch.bfloat16 and a.shape == r.shape
        err = (a.double() - r).abs().max().item() / (r.abs().max().item() + 1.0)
        assert err < 2e-2, f"d{name} T={T} S={S}: relative error {err:.3g}"
    notes = attnext.explain("causal_attention", q, k, v).kernels
    assert any("bfloat16 backward" in n for n in notes) or not attnext.native_available(), notes
