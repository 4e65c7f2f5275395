"""attnext.scaled_dot_product_attention against torch.nn.functional.scaled_dot_product_attention:
forward and gradients with one shared grad_out, over mask kinds x is_causal x GQA x scale x
dtypes x (T, S) shapes, plus which calls run attnext's kernel (explain_sdpa), errors and
torch.compile.

Oracle: torch's SDPA in float64 (and in the test dtype, for the low-precision rule of
conftest.assert_close_to_oracle).
"""
import pytest
import torch
import torch.nn.functional as F

import attnext
from attnext import reference
from attnext import functional as AF
from attnext.functional import explain_sdpa, match_band
from conftest import assert_close_to_oracle

native_cpu = pytest.mark.skipif(not (attnext.native_available() and attnext.kernels_enabled()),
                                reason="attnext._C not built or kernels disabled")


def _mask(kind, T, S, batch=()):
    """attn_mask and is_causal for a mask kind, and whether attnext's kernel should run it."""
    g = torch.Generator().manual_seed(3)
    if kind == "none":
        return None, False, True
    if kind == "is_causal":
        return None, True, True
    if kind == "bool_causal":  # is_causal written out as a mask
        return reference.attention_mask(T, S, False, (-1, 0)), False, True
    if kind == "bool_bottom_right":  # KV-cache decoding's mask
        return reference.attention_mask(T, S, True, (-1, 0)), False, True
    if kind == "bool_sliding":  # Mistral's sliding window, bottom-right
        return reference.attention_mask(T, S, True, (3, 0)), False, True
    if kind == "bool_band_batched":  # one band broadcast to (B, 1, T, S) as transformers builds it
        return reference.attention_mask(T, S, False, (2, 1)).expand(*batch[:1], 1, T, S).clone(), False, True
    if kind == "bool_random":  # an arbitrary mask: torch runs it
        return torch.rand(T, S, generator=g) > 0.4, False, False
    if kind == "bool_padding":  # per-batch key padding: differs between batch entries, torch runs it
        m = torch.ones(*batch[:1], 1, T, S, dtype=torch.bool)
        m[0, ..., : S // 2] = False
        return m, False, False
    if kind == "float":  # an additive float mask: torch runs it
        return torch.randn(T, S, generator=g), False, False
    raise ValueError(kind)


MASKS = ["none", "is_causal", "bool_causal", "bool_bottom_right", "bool_sliding", "bool_band_batched",
         "bool_random", "bool_padding", "float"]  # mask + is_causal: test_delegated_calls_say_why
SHAPES = [
    # (q batch, kv batch, T, S, hs, hs_v): the paths each covers
    ((2, 3), (2, 3), 9, 9, 16, 16),  # T == S
    ((2, 3), (2, 3), 5, 13, 8, 12),  # T < S (decoding rows), hs_v != hs
    ((1, 2), (1, 2), 13, 5, 8, 8),  # T > S: bottom-right rows that see no key
    ((2, 3), (1, 3), 1, 20, 16, 16),  # one query row (decode pass), k/v batch broadcast
    ((3, 2), (2,), 70, 70, 8, 8),  # two query tiles; k/v 3-D broadcast against 4-D q
]


def _inputs(qb, kb, T, S, hs, hs_v, dtype, gqa=1):
    g = torch.Generator().manual_seed(7)
    qb = (*qb[:-1], qb[-1] * gqa) if gqa > 1 else qb
    q = torch.randn(*qb, T, hs, generator=g, dtype=torch.float64)
    k = torch.randn(*kb, S, hs, generator=g, dtype=torch.float64)
    v = torch.randn(*kb, S, hs_v, generator=g, dtype=torch.float64)
    return [t.to(dtype).requires_grad_() for t in (q, k, v)]


def _both(q, k, v, gout, **kw):
    """attnext's and torch's outputs and gradients, and torch's in float64."""
    def run(fn, dt):
        a = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        kw2 = dict(kw)
        if isinstance(kw2.get("attn_mask"), torch.Tensor) and kw2["attn_mask"].is_floating_point():
            kw2["attn_mask"] = kw2["attn_mask"].to(dt)
        o = fn(*a, **kw2)
        return (o, *torch.autograd.grad(o, a, gout.to(dt)))
    dtype = q.dtype
    return (run(attnext.scaled_dot_product_attention, dtype), run(F.scaled_dot_product_attention, torch.float64),
            run(F.scaled_dot_product_attention, dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("qb,kb,T,S,hs,hs_v", SHAPES)
@pytest.mark.parametrize("kind", MASKS)
def test_matches_torch(kind, qb, kb, T, S, hs, hs_v, dtype):
    q, k, v = _inputs(qb, kb, T, S, hs, hs_v, dtype)
    mask, is_causal, native = _mask(kind, T, S, qb)
    gout = torch.randn(*torch.broadcast_shapes(qb, kb), T, hs_v, generator=torch.Generator().manual_seed(1),
                       dtype=torch.float64)
    kw = dict(attn_mask=mask, is_causal=is_causal, scale=0.4 if hs == 8 else None)
    got, oracle, eager = _both(q, k, v, gout, **kw)
    for name, a, o, e in zip(("out", "dq", "dk", "dv"), got, oracle, eager):
        assert a.shape == o.shape and a.dtype == dtype
        if dtype == torch.bfloat16 and name != "out" and qb != kb:
            # the gradient of a broadcast input is summed by autograd over the expanded
            # batch from per-batch bfloat16 gradients: one more rounding, up to 1 ulp
            err = (a.double() - o).abs().max().item()
            assert err <= 2 * (e.double() - o).abs().max().item() + 2**-8 * o.abs().max().item() + 2e-3, name
        else:
            assert_close_to_oracle(a, o, e, dtype, f"{kind} {name}")
    if attnext.native_available() and attnext.kernels_enabled():
        assert (explain_sdpa(q, k, v, **kw) == []) == native, explain_sdpa(q, k, v, **kw)


@pytest.mark.parametrize("kind", ["none", "is_causal", "bool_bottom_right", "bool_sliding", "bool_random"])
@pytest.mark.parametrize("T,S", [(7, 7), (3, 11)])
def test_gqa_matches_torch(kind, T, S):
    """enable_gqa=True: 6 query heads over 2 key/value heads (and 2 over 2), 3-D and 4-D."""
    for qb, kb in (((2, 2), (2, 2)), ((2,), (2,))):
        q, k, v = _inputs(qb, kb, T, S, 8, 8, torch.float32, gqa=3 if len(qb) == 2 else 1)
        mask, is_causal, native = _mask(kind, T, S)
        gout = torch.randn(*q.shape[:-1], 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        got, oracle, eager = _both(q, k, v, gout, attn_mask=mask, is_causal=is_causal, enable_gqa=True)
        for name, a, o, e in zip(("out", "dq", "dk", "dv"), got, oracle, eager):
            assert_close_to_oracle(a, o, e, torch.float32, f"gqa {kind} {name}")
        if attnext.native_available() and attnext.kernels_enabled():
            assert (explain_sdpa(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=True) == []) == native


def test_float16_delegates_on_cpu():
    """attnext's CPU attention has no float16 kernel: torch's SDPA runs, bit for bit."""
    q, k, v = _inputs((2, 2), (2, 2), 6, 6, 8, 8, torch.float16)
    assert explain_sdpa(q, k, v, is_causal=True)
    torch.testing.assert_close(attnext.scaled_dot_product_attention(q, k, v, is_causal=True),
                               F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=0, rtol=0)


@pytest.mark.parametrize("T,S,B", [(0, 5, 2), (4, 0, 2), (4, 5, 0)])
@pytest.mark.parametrize("is_causal", [False, True])
def test_empty(T, S, B, is_causal):
    """Empty T, S (no keys: zero rows, as torch) or batch."""
    q, k, v = _inputs((B, 2), (B, 2), T, S, 8, 8, torch.float32)
    a = attnext.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    b = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    assert a.shape == b.shape
    torch.testing.assert_close(a, b)
    a.sum().backward()
    assert all(t.grad is not None and not t.grad.any() for t in (k, v))


@native_cpu
def test_native_on_nanogpt_views_and_dropout():
    """nanoGPT's call (transposed views, is_causal, dropout): attnext's kernel runs; the dropout
    mask is attnext's (reproducible under torch.manual_seed, a different stream from torch's)."""
    B, T, nh, hs = 2, 16, 4, 8
    x = torch.randn(B, T, 3 * nh * hs, requires_grad=True)
    q, k, v = (t.view(B, T, nh, hs).transpose(1, 2) for t in x.split(nh * hs, dim=2))
    assert explain_sdpa(q, k, v, dropout_p=0.2, is_causal=True) == []
    torch.manual_seed(0)
    a = attnext.scaled_dot_product_attention(q, k, v, dropout_p=0.2, is_causal=True)
    torch.manual_seed(0)
    b = attnext.scaled_dot_product_attention(q, k, v, dropout_p=0.2, is_causal=True)
    c = attnext.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.allclose(a, c)
    a.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_dropout_one_is_torchs():
    """dropout_p=1 (outside attnext's [0, 1)): torch's SDPA, which returns zeros."""
    q, k, v = _inputs((1, 2), (1, 2), 4, 4, 8, 8, torch.float32)
    assert explain_sdpa(q, k, v, dropout_p=1.0)
    assert not attnext.scaled_dot_product_attention(q, k, v, dropout_p=1.0).any()


@pytest.mark.parametrize(
    "mask",
    [
        reference.attention_mask(6, 9, False, (-1, 0)),
        reference.attention_mask(6, 9, True, (-1, 0)),
        reference.attention_mask(6, 9, True, (2, 0)),
        reference.attention_mask(6, 9, False, (1, 3)),
        reference.attention_mask(9, 6, True, (-1, 0)),  # rows that see no key
        reference.attention_mask(6, 6, False, (0, 0)),  # the diagonal only
        torch.ones(6, 9, dtype=torch.bool),
    ],
)
def test_match_band_is_exact(mask):
    band = match_band(mask)
    assert band is not None
    T, S = mask.shape
    assert torch.equal(reference.attention_mask(T, S, band.bottom_right, band.window), mask)


@pytest.mark.parametrize("edit", ["hole", "extra", "strict_lower"])
def test_match_band_rejects(edit):
    m = reference.attention_mask(8, 8, False, (-1, 0)).clone()
    if edit == "hole":
        m[5, 2] = False
    elif edit == "extra":
        m[2, 6] = True
    else:
        m = torch.ones(8, 8, dtype=torch.bool).tril(-1)  # j < i: no (left, right) window expresses it
    assert match_band(m) is None


def test_match_band_key_range():
    """A band over a contiguous range of keys (left padding): cut to the range."""
    m = torch.zeros(4, 9, dtype=torch.bool)
    m[:, 3:] = reference.attention_mask(4, 6, True, (-1, 0))
    band = match_band(m, allow_key_range=True)
    assert band is not None and (band.lo, band.hi) == (3, 9)
    assert torch.equal(reference.attention_mask(4, 6, band.bottom_right, band.window), m[:, 3:])
    assert match_band(m) is None


@pytest.mark.parametrize(
    "case",
    [
        "mixed_dtype", "int", "head_size", "kv_length", "batch", "gqa_heads", "mask_shape", "mask_dtype", "dropout",
        "one_dim",
    ],
)
def test_errors_are_torchs(case):
    """Inputs torch rejects (or takes in its own way: torch 2.13's CPU kernel accepts a value
    length that differs from the key length): attnext hands them to torch, so the error or
    the result is torch's own."""
    q, k, v = (torch.randn(2, 3, 4, 8) for _ in range(3))
    kw = {}
    if case == "mixed_dtype":
        k = k.double()
    elif case == "int":
        q, k, v = q.int(), k.int(), v.int()
    elif case == "head_size":
        k = k[..., :7]
    elif case == "kv_length":
        v = v[:, :, :3]
    elif case == "batch":
        k, v = torch.randn(3, 3, 4, 8), torch.randn(3, 3, 4, 8)
    elif case == "gqa_heads":
        q, kw = torch.randn(2, 4, 4, 8), dict(enable_gqa=True)
    elif case == "mask_shape":
        kw = dict(attn_mask=torch.ones(3, 4, dtype=torch.bool))
    elif case == "mask_dtype":
        kw = dict(attn_mask=torch.ones(4, 4, dtype=torch.int32))
    elif case == "dropout":
        kw = dict(dropout_p=1.5)
    else:
        q, k, v = q[0, 0, 0], k[0, 0, 0], v[0, 0, 0]
    assert explain_sdpa(q, k, v, **kw)
    try:
        expected = F.scaled_dot_product_attention(q, k, v, **kw)
    except Exception as theirs:
        with pytest.raises(type(theirs)) as ours:
            attnext.scaled_dot_product_attention(q, k, v, **kw)
        assert str(ours.value) == str(theirs)
    else:
        torch.testing.assert_close(attnext.scaled_dot_product_attention(q, k, v, **kw), expected, atol=0, rtol=0)


def test_delegated_calls_say_why():
    q, k, v = (torch.randn(1, 2, 4, 8) for _ in range(3))
    reasons = explain_sdpa(q, k, v, attn_mask=torch.zeros(4, 4))
    assert any("float masks" in r for r in reasons)
    reasons = explain_sdpa(q, k, v, attn_mask=torch.ones(4, 4, dtype=torch.bool).tril(), is_causal=True)
    assert any("is_causal" in r for r in reasons)
    # whatever torch does with mask + is_causal on this device, attnext does the same
    m = torch.rand(4, 4) > 0.5
    try:
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=True)
    except RuntimeError:
        with pytest.raises(RuntimeError):
            attnext.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=True)
    else:
        torch.testing.assert_close(attnext.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=True),
                                   expected, atol=0, rtol=0)


@native_cpu
def test_kernels_disabled_delegates():
    q, k, v = (torch.randn(1, 2, 4, 8) for _ in range(3))
    attnext.set_kernels_enabled(False)
    try:
        reasons = explain_sdpa(q, k, v, is_causal=True)
        assert reasons and "disabled" in reasons[0]
        torch.testing.assert_close(attnext.scaled_dot_product_attention(q, k, v, is_causal=True),
                                   F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=0, rtol=0)
    finally:
        attnext.set_kernels_enabled(True)


@native_cpu
def test_compile_fullgraph():
    """The no-mask paths trace without graph breaks (a mask needs a host sync: graph break)."""
    q, k, v = (torch.randn(2, 2, 9, 8, requires_grad=True) for _ in range(3))
    fn = torch.compile(lambda a, b, c: attnext.scaled_dot_product_attention(a, b, c, is_causal=True), fullgraph=True)
    out = fn(q, k, v)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=2e-6, rtol=2e-5)
    out.sum().backward()
    assert q.grad is not None


@pytest.mark.parametrize("case", ["causal", "full", "gqa", "causal_T_gt_S", "int_scale", "mask", "broadcast"])
def test_fast_path_is_the_planned_call(case, monkeypatch):
    # The common call (no mask, no dropout, one batch shape) skips _sdpa_plan; it must be
    # exactly the call the plan makes (bitwise), and everything else must take the plan.
    g = torch.Generator().manual_seed(0)
    qh = 4 if case == "gqa" else 2
    T, S = (9, 5) if case == "causal_T_gt_S" else (6, 6)
    q = torch.randn(2, qh, T, 16, generator=g)
    k, v = (torch.randn(1 if case == "broadcast" else 2, 2, S, 16, generator=g) for _ in range(2))
    kw = dict(is_causal=case not in ("full", "mask"), enable_gqa=case == "gqa")
    if case == "int_scale":
        kw["scale"] = 1
    if case == "mask":
        kw["attn_mask"] = torch.ones(T, S, dtype=torch.bool).tril()
    fast = AF._sdpa_fast(q, k, v, kw.get("attn_mask"), 0.0, kw["is_causal"], kw.get("scale"), kw["enable_gqa"])
    native = attnext.native_available() and attnext.kernels_enabled()
    assert fast == (native and case in ("causal", "full", "gqa", "causal_T_gt_S")), case
    out = AF.scaled_dot_product_attention(q, k, v, **kw)
    monkeypatch.setattr(AF, "_sdpa_fast", lambda *a: False)
    planned = AF.scaled_dot_product_attention(q, k, v, **kw)
    assert torch.equal(out, planned)
    ref = F.scaled_dot_product_attention(q, k, v, **kw)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_small_calls_go_to_torch(monkeypatch):
    # Calls without dropout whose q.numel() x S is under ops._SDPA_SMALL_WORK (default
    # 3 << 19; the suite sets 0) are torch's SDPA itself, said by explain_sdpa; larger
    # calls and dropout keep attnext's kernel.
    monkeypatch.setattr(attnext.ops, "_SDPA_SMALL_WORK", 3 << 19)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 8, 1 if i == 0 else 32, 64, generator=g, requires_grad=True) for i in range(3))
    out = attnext.scaled_dot_product_attention(q, k, v)
    ref = F.scaled_dot_product_attention(q, k, v)
    assert torch.equal(out, ref) and type(out.grad_fn) is type(ref.grad_fn)
    assert any("small call" in r for r in explain_sdpa(q, k, v))
    big = [torch.randn(1, 8, 64, 64, generator=g) for _ in range(3)]  # 8 * 64 * 64 * 64 = 2.1M
    assert not any("small call" in r for r in explain_sdpa(*big, is_causal=True))
    assert not any("small call" in r for r in explain_sdpa(q, k, v, dropout_p=0.1))
    monkeypatch.setattr(attnext.ops, "_SDPA_SMALL_WORK", 0)
    assert not any("small call" in r for r in explain_sdpa(q, k, v))


def test_small_work_setting_is_read_from_the_environment():
    from conftest import assert_python_ok

    assert_python_ok("import attnext\nassert attnext.ops._SDPA_SMALL_WORK == 1000\nprint('ok')", ATTNEXT_SDPA_SMALL_WORK="1000")
    assert_python_ok("import attnext\nassert attnext.ops._SDPA_SMALL_WORK == 3 << 19\nprint('ok')", ATTNEXT_SDPA_SMALL_WORK="")
