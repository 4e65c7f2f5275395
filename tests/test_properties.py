"""Property-based tests (hypothesis) of every op against reference.py in float64.

Random shapes (size-1 and size-0 dims, T != S, 0-3 batch dims), random strides
(transposed and sliced views), random scales, each dtype with its tolerance,
forward and gradients. The normal suite runs a fast profile; ATTNEXT_HYPOTHESIS=nightly
runs a few thousand examples per property:

    ATTNEXT_HYPOTHESIS=nightly python -m pytest tests/test_properties.py
"""
import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnext
from attnext import reference
from conftest import TOL

settings.register_profile("fast", max_examples=60, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("nightly", max_examples=3000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("ATTNEXT_HYPOTHESIS", "fast"))

DTYPES = [torch.float64, torch.float32, torch.bfloat16]


@st.composite
def strided_tensor(draw, shape, dtype=torch.float64):
    """A float64 tensor of `shape` that is, at random, contiguous, a transposed view or a
    sliced (stepped) view of a bigger tensor."""
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    kind = draw(st.sampled_from(["contiguous", "transposed", "sliced"]))
    if kind == "transposed" and len(shape) >= 2:
        base = torch.randn(*shape[:-2], shape[-1], shape[-2], generator=g, dtype=dtype)
        return base.transpose(-1, -2)
    if kind == "sliced":
        base = torch.randn(*[2 * s + 1 for s in shape], generator=g, dtype=dtype)
        return base[tuple(slice(1, 1 + 2 * s, 2) for s in shape)]
    return torch.randn(*shape, generator=g, dtype=dtype)


batch_dims = st.lists(st.integers(0, 3), min_size=0, max_size=3)


@given(
    batch=batch_dims,
    T=st.integers(0, 40),
    S=st.integers(0, 40),
    scale=st.floats(-4, 4, allow_nan=False),
    align=st.sampled_from(["top_left", "bottom_right"]),
    dtype=st.sampled_from(DTYPES),
    data=st.data(),
)
def test_causal_softmax_matches_reference(batch, T, S, scale, align, dtype, data):
    x64 = data.draw(strided_tensor(tuple(batch) + (T, S)))
    x = x64.to(dtype).requires_grad_(True)
    xr = x64.detach().clone().requires_grad_(True)
    y = attnext.causal_softmax(x, scale, align=align)
    y_ref = reference.causal_softmax(xr, scale, align == "bottom_right")
    assert y.shape == y_ref.shape and y.dtype == dtype
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(y.double(), y_ref, atol=atol, rtol=rtol)
    g = torch.randn(y.shape, dtype=torch.float64)
    (gx,) = torch.autograd.grad(y, x, g.to(dtype))
    (gx_ref,) = torch.autograd.grad(y_ref, xr, g)
    torch.testing.assert_close(gx.double(), gx_ref, atol=4 * atol * (1 + abs(scale)), rtol=4 * rtol)


@given(
    a_batch=st.lists(st.integers(0, 3), min_size=0, max_size=3),
    b_batch=st.lists(st.integers(0, 3), min_size=0, max_size=3),
    n=st.integers(0, 9),
    k=st.integers(0, 9),
    p=st.integers(0, 9),
    a_vec=st.booleans(),
    b_vec=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    data=st.data(),
)
def test_matmul_matches_torch_matmul(a_batch, b_batch, n, k, p, a_vec, b_vec, dtype, data):
    # Make the batch dims broadcastable: where both have a dim, one of them may be 1.
    nb = min(len(a_batch), len(b_batch))
    for i in range(1, nb + 1):
        if a_batch[-i] != b_batch[-i] and a_batch[-i] != 1 and b_batch[-i] != 1:
            b_batch[-i] = 1
    sa = (k,) if a_vec else tuple(a_batch) + (n, k)
    sb = (k,) if b_vec else tuple(b_batch) + (k, p)
    a64 = data.draw(strided_tensor(sa))
    b64 = data.draw(strided_tensor(sb))
    a = a64.to(dtype).requires_grad_(True)
    b = b64.to(dtype).requires_grad_(True)
    ar, br = a64.detach().clone().requires_grad_(True), b64.detach().clone().requires_grad_(True)
    out, ref = attnext.matmul(a, b), torch.matmul(ar, br)
    assert out.shape == ref.shape and out.dtype == dtype
    tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 0.1}[dtype]
    torch.testing.assert_close(out.double(), ref, atol=tol * (1 + k), rtol=tol)
    g = torch.randn(ref.shape, dtype=torch.float64)
    ga, gb = torch.autograd.grad(out, (a, b), g.to(dtype))
    gar, gbr = torch.autograd.grad(ref, (ar, br), g)
    reduce = 1 + max(k, n, p) * (1 + len(a_batch) + len(b_batch)) * 3
    torch.testing.assert_close(ga.double(), gar, atol=tol * reduce, rtol=tol)
    torch.testing.assert_close(gb.double(), gbr, atol=tol * reduce, rtol=tol)


@given(batch=batch_dims, T=st.integers(0, 50), C=st.integers(0, 9), dtype=st.sampled_from(DTYPES), data=st.data())
def test_causal_mean_matches_reference(batch, T, C, dtype, data):
    x64 = data.draw(strided_tensor(tuple(batch) + (T, C)))
    x = x64.to(dtype).requires_grad_(True)
    xr = x64.detach().clone().requires_grad_(True)
    y, ref = attnext.causal_mean(x), reference.causal_mean(xr)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(y.double(), ref, atol=atol, rtol=rtol)
    g = torch.randn(ref.shape, dtype=torch.float64)
    (gx,) = torch.autograd.grad(y, x, g.to(dtype))
    (gxr,) = torch.autograd.grad(ref, xr, g)
    torch.testing.assert_close(gx.double(), gxr, atol=4 * atol * (1 + T) ** 0.5, rtol=4 * rtol)


@given(
    batch=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    T=st.integers(1, 40),
    S=st.integers(1, 40),
    hs=st.sampled_from([1, 3, 16, 24]),
    hs_v=st.sampled_from([1, 5, 16]),
    align=st.sampled_from(["top_left", "bottom_right"]),
    dtype=st.sampled_from([torch.float64, torch.float32]),
    scale=st.one_of(st.none(), st.floats(0.05, 2.0)),
    data=st.data(),
)
def test_causal_attention_matches_reference(batch, T, S, hs, hs_v, align, dtype, scale, data):
    q64 = data.draw(strided_tensor(tuple(batch) + (T, hs)))
    k64 = data.draw(strided_tensor(tuple(batch) + (S, hs)))
    v64 = data.draw(strided_tensor(tuple(batch) + (S, hs_v)))
    qs = [t.to(dtype).requires_grad_(True) for t in (q64, k64, v64)]
    rs = [t.detach().clone().requires_grad_(True) for t in (q64, k64, v64)]
    s = hs**-0.5 if scale is None else scale
    out = attnext.causal_attention(*qs, scale=scale, align=align)
    ref, _ = reference.causal_attention(*rs, s, 0.0, align == "bottom_right")
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.double(), ref, atol=10 * atol, rtol=10 * rtol)
    g = torch.randn(ref.shape, dtype=torch.float64)
    grads = torch.autograd.grad(out, qs, g.to(dtype))
    grads_ref = torch.autograd.grad(ref, rs, g)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got.double(), want, atol=50 * atol, rtol=50 * rtol)


@given(
    batch=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    T=st.integers(1, 300),
    S=st.integers(1, 300),
    hs=st.sampled_from([2, 5, 16, 64]),
    hs_v=st.sampled_from([2, 3, 16, 64]),
    align=st.sampled_from(["top_left", "bottom_right"]),
    dropout_p=st.sampled_from([0.0, 0.3]),
    data=st.data(),
)
def test_causal_attention_bfloat16_within_twice_eager(batch, T, S, hs, hs_v, align, dropout_p, data):
    # bfloat16 by the flash-attention rule: error vs the float64 oracle at most twice
    # eager bfloat16's, on whichever bfloat16 path this CPU takes, plus a floor of 4
    # bfloat16 ulps of the largest oracle value. Eager gets some gradients exactly in
    # tiny cases (a row that sees one key has dq = 0), where the fused backward's
    # D = rowsum(dO * O) sums hs_v products of the rounded output (as FlashAttention's
    # does): for dq and dk the floor grows with sqrt(hs_v). A wrong mask or index
    # errs by the values' own size.
    q64 = data.draw(strided_tensor(tuple(batch) + (T, hs)))
    k64 = data.draw(strided_tensor(tuple(batch) + (S, hs)))
    v64 = data.draw(strided_tensor(tuple(batch) + (S, hs_v)))
    br = align == "bottom_right"
    seed = (data.draw(st.integers(-(2**63), 2**63 - 1)), data.draw(st.integers(-(2**63), 2**63 - 1)))
    rs = [t.detach().clone().requires_grad_(True) for t in (q64, k64, v64)]
    bs = [t.detach().bfloat16().requires_grad_(True) for t in (q64, k64, v64)]
    es = [t.detach().bfloat16().requires_grad_(True) for t in (q64, k64, v64)]
    oracle = reference.causal_attention(*rs, hs**-0.5, dropout_p, br, *seed)[0]
    out = torch.ops.attnext.causal_attention(*bs, hs**-0.5, dropout_p, br, *seed)[0]
    eager = reference.causal_attention(*es, hs**-0.5, dropout_p, br, *seed)[0]
    g = torch.randn(oracle.shape, dtype=torch.float64)
    got = (out, *torch.autograd.grad(out, bs, g.bfloat16()))
    ref = (eager, *torch.autograd.grad(eager, es, g.bfloat16()))
    want = (oracle, *torch.autograd.grad(oracle, rs, g))
    ulps4 = 2.0**-6 * max([o.abs().max().item() for o in want if o.numel()] + [1.0])
    floors = (ulps4, ulps4 * hs_v**0.5, ulps4 * hs_v**0.5, ulps4)  # out, dq, dk, dv
    for a, e, o, floor in zip(got, ref, want, floors):
        err = (a.double() - o).abs().max().item() if o.numel() else 0.0
        eager_err = (e.double() - o).abs().max().item() if o.numel() else 0.0
        assert err <= 2 * eager_err + floor, (err, eager_err, floor)


@given(
    shape=st.lists(st.integers(0, 7), min_size=0, max_size=4),
    p=st.floats(0.0, 0.99),
    dtype=st.sampled_from(DTYPES),
    data=st.data(),
)
def test_dropout_matches_reference_mask(shape, p, dtype, data):
    x = (data.draw(strided_tensor(tuple(shape))) if shape else torch.randn((), dtype=torch.float64)).to(dtype)
    seed = (data.draw(st.integers(-(2**63), 2**63 - 1)), data.draw(st.integers(-(2**63), 2**63 - 1)))
    if p == 0.0:
        return
    y = torch.ops.attnext.dropout(x, p, *seed)
    r = reference.dropout(x, p, *seed)
    assert y.shape == x.shape and y.dtype == dtype
    assert torch.equal(y == 0, r == 0)
    torch.testing.assert_close(y, r, atol=0, rtol=0 if dtype != torch.bfloat16 else 1e-2)
