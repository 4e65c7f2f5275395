"""Double backward (and higher) of the fused attention head, both ops.

The first derivative runs the native backward kernel; when that backward is itself
differentiated (create_graph=True), the op's backward switches to the differentiable
recompute ``reference.causal_attention_grads`` (see attnext/ops.py, _attention_grads).
Oracle: the eager composite ``reference.causal_attention`` differentiated by torch,
in float64, with the same dropout mask (the same generator seed).
"""
import warnings

import pytest
import torch

import attnext
from attnext import reference
from conftest import dropout_seed, needs_native

# (batch, T, S, hs, hs_v, align): the paths each covers
SHAPES = [
    ((2,), 5, 5, 4, 4, "top_left"),  # the lecture's 3-D (B, T, hs)
    ((2, 3), 6, 6, 4, 3, "top_left"),  # nanoGPT's 4-D (B, nh, T, hs), hs_v != hs
    ((2,), 3, 7, 4, 4, "bottom_right"),  # decoding with a cache: T < S
    ((1, 2), 6, 4, 3, 5, "bottom_right"),  # T > S: the first two rows see no key (zero rows, no NaN)
    ((2,), 4, 9, 4, 4, "top_left"),  # T != S top-left: the last keys are never seen
]


_seed_of = dropout_seed


def _qkv(batch, T, S, hs, hs_v, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(*batch, T, hs, generator=g, dtype=dtype)
    k = torch.randn(*batch, S, hs, generator=g, dtype=dtype)
    v = torch.randn(*batch, S, hs_v, generator=g, dtype=dtype)
    return q, k, v


def _attn(p, align, gen_seed=7):
    """attnext.causal_attention with a fixed dropout mask (a fresh generator per call)."""

    def f(q, k, v):
        return attnext.causal_attention(
            q, k, v, scale=0.4, dropout_p=p, align=align, generator=torch.Generator().manual_seed(gen_seed)
        )

    return f


def _attn_ref(p, align, gen_seed=7):
    seed, offset = _seed_of(gen_seed)

    def f(q, k, v):
        return reference.causal_attention(q, k, v, 0.4, p, align == "bottom_right", seed, offset)[0]

    return f


def _second_order(f, q, k, v, g):
    """d/d(q, k, v) of <grad_{q,k,v} <f, g>, w>: a Hessian-vector product of every input pair."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = f(q, k, v)
    gq, gk, gv = torch.autograd.grad(out, (q, k, v), g, create_graph=True)
    w = [torch.linspace(-1, 1, t.numel(), dtype=t.dtype).view_as(t) for t in (gq, gk, gv)]
    scalar = sum((a * b).sum() for a, b in zip((gq, gk, gv), w))
    return (gq, gk, gv), torch.autograd.grad(scalar, (q, k, v))


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("batch,T,S,hs,hs_v,align", SHAPES)
def test_double_backward_matches_eager(batch, T, S, hs, hs_v, align, p):
    q, k, v = _qkv(batch, T, S, hs, hs_v)
    g = torch.randn(*batch, T, hs_v, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the old bug: zeros plus a UserWarning
        first, second = _second_order(_attn(p, align), q, k, v, g)
    first_ref, second_ref = _second_order(_attn_ref(p, align), q, k, v, g)
    for name, a, b in zip("qkv", first + second, first_ref + second_ref):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)
    # Not vacuous: the second derivatives are not all zero.
    assert sum(t.abs().sum() for t in second_ref) > 0


@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize(
    "batch,T,S,hs,hs_v,align",
    [
        ((2,), 4, 4, 3, 3, "top_left"),  # 3-D
        ((1, 2), 4, 4, 3, 2, "top_left"),  # 4-D, hs_v != hs
        ((1, 2), 5, 3, 3, 2, "bottom_right"),  # T > S: rows without keys
    ],
)
def test_gradgradcheck_causal_attention(batch, T, S, hs, hs_v, align, p):
    q, k, v = (t.requires_grad_() for t in _qkv(batch, T, S, hs, hs_v))
    f = _attn(p, align)
    assert torch.autograd.gradcheck(f, (q, k, v))
    assert torch.autograd.gradgradcheck(f, (q, k, v))


def test_gradgradcheck_nanogpt_views():
    # nanoGPT's non-contiguous (B, nh, T, hs) views of one (B, T, 3 * C) projection
    B, T, nh, hs = 2, 5, 2, 3
    x = torch.randn(B, T, 3 * nh * hs, dtype=torch.float64, requires_grad=True)

    def f(x):
        q, k, v = x.split(nh * hs, dim=2)
        q, k, v = (t.view(B, T, nh, hs).transpose(1, 2) for t in (q, k, v))
        return attnext.causal_attention(q, k, v)

    assert torch.autograd.gradgradcheck(f, (x,))


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("align", ["top_left", "bottom_right"])
def test_gradgradcheck_qkvpacked(align, p):
    qkv = torch.randn(2, 5, 3, 2, 3, dtype=torch.float64, requires_grad=True)

    def f(qkv):
        return attnext.causal_attention_qkvpacked(
            qkv, dropout_p=p, align=align, generator=torch.Generator().manual_seed(3)
        )

    assert torch.autograd.gradcheck(f, (qkv,))
    assert torch.autograd.gradgradcheck(f, (qkv,))


def test_qkvpacked_double_backward_matches_unpacked():
    # The packed op's higher derivatives equal the unpacked op's on the same views.
    qkv = torch.randn(2, 6, 3, 2, 4, dtype=torch.float64)
    g = torch.randn(2, 6, 2, 4, dtype=torch.float64)

    def packed(qkv):
        qkv = qkv.detach().requires_grad_()
        out = attnext.causal_attention_qkvpacked(qkv, dropout_p=0.2, generator=torch.Generator().manual_seed(1))
        (gx,) = torch.autograd.grad(out, qkv, g, create_graph=True)
        return torch.autograd.grad(gx.pow(2).sum(), qkv)[0]

    def unpacked(qkv):
        qkv = qkv.detach().requires_grad_()
        q, k, v = reference.unpack_qkv(qkv)
        out = attnext.causal_attention(q, k, v, dropout_p=0.2, generator=torch.Generator().manual_seed(1))
        (gx,) = torch.autograd.grad(out.transpose(-3, -2), qkv, g, create_graph=True)
        return torch.autograd.grad(gx.pow(2).sum(), qkv)[0]

    a, b = packed(qkv), unpacked(qkv)
    assert a.abs().sum() > 0
    torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("batch,T,S,hs,hs_v,align", [((2, 2), 33, 33, 16, 16, "top_left"), ((2,), 9, 40, 8, 8,
                                                                                                "bottom_right")])
def test_double_backward_low_precision(batch, T, S, hs, hs_v, align):
    # bfloat16 (and float32): the recompute runs in float32; its error against the float64
    # oracle is at most ~2x eager torch's own error in that dtype.
    from conftest import assert_close_to_oracle

    q, k, v = _qkv(batch, T, S, hs, hs_v)
    g = torch.randn(*batch, T, hs_v, dtype=torch.float64)
    _, oracle = _second_order(_attn_ref(0.1, align), q, k, v, g)
    for dtype in (torch.float32, torch.bfloat16):
        args = [t.to(dtype) for t in (q, k, v)]
        _, got = _second_order(_attn(0.1, align), *args, g.to(dtype))
        _, eager = _second_order(_attn_ref(0.1, align), *args, g.to(dtype))
        for name, a, o, e in zip("qkv", got, oracle, eager):
            assert a.dtype == dtype
            assert_close_to_oracle(a, o, e, dtype, f"{dtype} second derivative in {name}")


def test_third_order():
    # The recompute is plain torch, so every further derivative exists too.
    q, k, v = (t.requires_grad_() for t in _qkv((1,), 4, 4, 3, 3))
    f = _attn(0.0, "top_left")
    fr = _attn_ref(0.0, "top_left")

    def third(fn):
        out = fn(q, k, v).pow(2).sum()
        (gq,) = torch.autograd.grad(out, q, create_graph=True)
        (gqq,) = torch.autograd.grad(gq.sum(), q, create_graph=True)
        return torch.autograd.grad(gqq.pow(2).sum(), (q, k, v))

    for a, b in zip(third(f), third(fr)):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


@needs_native
def test_first_order_backward_stays_native(monkeypatch):
    # A plain .backward() must not pay for higher-order support: the recompute is not called.
    def boom(*args, **kwargs):
        raise AssertionError("the differentiable recompute ran for a first-order backward")

    monkeypatch.setattr(reference, "causal_attention_grads", boom)
    q, k, v = (t.requires_grad_() for t in _qkv((2,), 8, 8, 4, 4, dtype=torch.float32))
    attnext.causal_attention(q, k, v).sum().backward()
    qkv = torch.randn(2, 8, 3, 2, 4, requires_grad=True)
    attnext.causal_attention_qkvpacked(qkv).sum().backward()
    assert q.grad is not None and qkv.grad is not None
    # ... and create_graph=True does call it.
    out = attnext.causal_attention(q, k, v).sum()
    with pytest.raises(AssertionError, match="recompute ran"):
        torch.autograd.grad(out, q, create_graph=True)
