"""causal_attention with a window around the diagonal: window_size=(left, right),
FlashAttention's convention (-1 unbounded): (-1, 0) causal, (W, 0) a causal sliding
window (Mistral, Gemma), (-1, -1) full attention, anything in between.

Oracle: reference.causal_attention(..., window=...) (its mask: reference.attention_mask)
in float64, forward and gradients with one shared grad_out.
"""
import pytest
import torch

import attnext
from attnext import ops, reference
from conftest import assert_close_to_oracle

# torch's forward AD (gradcheck's check_forward_ad) loads its jvp decompositions through torch.jit.script
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

WINDOWS = [
    (0, 0),  # each query sees only its diagonal key
    (7, 0),  # a sliding window narrower than a key tile
    (300, 0),  # wider than a 256-key tile: several tiles per row, the first ones partly masked
    (-1, -1),  # full (non-causal) attention
    (5, 3),  # a band: past and future keys
    (-1, 2),  # causal plus two future keys
]
SHAPES = [
    # (batch, T, S, hs, hs_v): the paths each covers
    ((2,), 1, 700, 32, 32),  # decode pass: one row, keys split across threads
    ((1, 2), 5, 300, 16, 24),  # decode pass with a few rows
    ((2,), 70, 70, 16, 16),  # tile kernels: two query tiles
    ((1,), 130, 600, 64, 64),  # several key tiles in the forward (256) and backward (64)
    ((2,), 300, 90, 8, 8),  # T > S: top-left rows past S + left see no key (zero rows)
]


def _run(batch, T, S, hs, hs_v, window, align, dtype, p=0.0):
    g = torch.Generator().manual_seed(5)
    q = torch.randn(*batch, T, hs, generator=g).to(dtype).requires_grad_()
    k = torch.randn(*batch, S, hs, generator=g).to(dtype).requires_grad_()
    v = torch.randn(*batch, S, hs_v, generator=g).to(dtype).requires_grad_()
    gout = torch.randn(*batch, T, hs_v, generator=g, dtype=torch.float64)
    out = attnext.causal_attention(q, k, v, scale=0.3, align=align, window_size=window, dropout_p=p,
                                   generator=torch.Generator().manual_seed(9))
    seed, offset = ops._draw_dropout_seed(torch.Generator().manual_seed(9))
    br = align == "bottom_right"

    def ref(dt):
        a = tuple(t.detach().to(dt).requires_grad_() for t in (q, k, v))
        o, _ = reference.causal_attention(*a, 0.3, p, br, seed, offset, window=window)
        return (o, *torch.autograd.grad(o, a, gout.to(dt)))

    got = (out, *torch.autograd.grad(out, (q, k, v), gout.to(dtype)))
    return got, ref(torch.float64), ref(dtype)


@pytest.mark.parametrize("align", ["top_left", "bottom_right"])
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("batch,T,S,hs,hs_v", SHAPES)
def test_window_matches_reference(batch, T, S, hs, hs_v, window, align):
    got, oracle, _ = _run(batch, T, S, hs, hs_v, window, align, torch.float32)
    for name, a, o in zip(("out", "dq", "dk", "dv"), got, oracle):
        torch.testing.assert_close(a.double(), o, atol=2e-5, rtol=2e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("window", [(7, 0), (-1, -1), (40, 0)])
@pytest.mark.parametrize("batch,T,S,hs,hs_v", [SHAPES[0], SHAPES[3]])
def test_window_bfloat16(batch, T, S, hs, hs_v, window):
    # bfloat16 with a window runs the widening tiles: at most ~2x eager bfloat16's error
    got, oracle, eager = _run(batch, T, S, hs, hs_v, window, "bottom_right", torch.bfloat16)
    for name, a, o, e in zip(("out", "dq", "dk", "dv"), got, oracle, eager):
        assert_close_to_oracle(a, o, e, torch.bfloat16, f"window {window} {name}")


@pytest.mark.parametrize("window", [(7, 0), (-1, -1)])
def test_window_dropout(window):
    # the dropout mask is the causal one's hash: kernel and fallback agree with a window too
    got, oracle, _ = _run((2,), 70, 90, 16, 16, window, "bottom_right", torch.float32, p=0.3)
    for a, o in zip(got, oracle):
        torch.testing.assert_close(a.double(), o, atol=2e-5, rtol=2e-4)


def test_window_rows_outside_are_zero():
    # top-left, T > S + left: rows from S + left on see no key: zeros, finite gradients
    q, k, v = torch.randn(1, 20, 4), torch.randn(1, 6, 4), torch.randn(1, 6, 4)
    out = attnext.causal_attention(q, k, v, window_size=(3, 0))
    assert torch.equal(out[:, 9:], torch.zeros_like(out[:, 9:])) and torch.isfinite(out).all()
    assert out[:, :9].abs().sum() > 0


def test_window_causal_default_is_unchanged():
    q, k, v = (torch.randn(2, 50, 8) for _ in range(3))
    assert torch.equal(attnext.causal_attention(q, k, v), attnext.causal_attention(q, k, v, window_size=(-1, 0)))
    # a window at least as wide as the sequence is the causal result
    torch.testing.assert_close(attnext.causal_attention(q, k, v, window_size=(49, 0)), attnext.causal_attention(q, k, v))


@pytest.mark.parametrize("window", [(4, 0), (-1, -1)])
def test_window_qkvpacked(window):
    qkv = torch.randn(2, 40, 3, 2, 8, requires_grad=True)
    out = attnext.causal_attention_qkvpacked(qkv, window_size=window)
    q, k, v = reference.unpack_qkv(qkv)
    ref = attnext.causal_attention(q, k, v, window_size=window).transpose(-3, -2)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, qkv, g)[0], torch.autograd.grad(ref, qkv, g)[0])


@pytest.mark.parametrize("window", [(2, 0), (-1, -1), (1, 1)])
def test_window_derivatives(window):
    # gradcheck, gradgradcheck (recompute) and forward mode (streamed jvp) with a window
    q, k, v = (torch.randn(1, 5, 3, dtype=torch.float64, requires_grad=True) for _ in range(3))
    f = lambda q, k, v: attnext.causal_attention(q, k, v, window_size=window)  # noqa: E731
    assert torch.autograd.gradcheck(f, (q, k, v), check_forward_ad=True)
    assert torch.autograd.gradgradcheck(f, (q, k, v))


def test_window_gqa():
    q = torch.randn(1, 4, 30, 8, requires_grad=True)
    k, v = torch.randn(1, 2, 30, 8, requires_grad=True), torch.randn(1, 2, 30, 8, requires_grad=True)
    out = attnext.causal_attention(q, k, v, enable_gqa=True, window_size=(5, 0))
    ref = reference.causal_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), 8**-0.5,
                                     window=(5, 0))[0]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_attention_mask_matches_causal_mask():
    for T, S in ((4, 4), (3, 7), (7, 3)):
        for br in (False, True):
            assert torch.equal(reference.attention_mask(T, S, br), reference.causal_mask(T, S, br))


@pytest.mark.parametrize("bad", [(-2, 0), (0, -2), (1,), (1, 2, 3), (1.0, 0), "(-1, 0)", (True, 0), None])
def test_window_bad_input(bad):
    q = torch.randn(1, 4, 8)
    with pytest.raises(ValueError, match="window_size must be a pair"):
        attnext.causal_attention(q, q, q, window_size=bad)


def test_explain_window_on_cpu_runs_native():
    q = torch.randn(1, 4, 8)
    assert attnext.explain("causal_attention", q, q, q, window_size=(3, 0)) == ([] if attnext.native_available()
                                                                              else attnext.explain("causal_attention", q, q, q))


@pytest.mark.skipif(not attnext.native_available(), reason="attnext._C not built")
def test_explain_window_reason_for_a_device_whose_kernels_are_causal_only(monkeypatch):
    # CPU and CUDA kernels take every window; the reason stays for a device whose kernels
    # would not (here the CPU, made causal-only by hand): it names the window.
    monkeypatch.setattr(ops, "_WINDOW_DEVICES", frozenset({"meta"}))
    q = torch.randn(1, 4, 8)
    reasons = attnext.explain("causal_attention", q, q, q, window_size=(3, 0))
    assert any("window_size=(3, 0)" in r for r in reasons)
    assert not attnext.explain("causal_attention", q, q, q)  # the causal window is unaffected
    out = attnext.causal_attention(q, q, q, window_size=(3, 0))  # the fallback runs it
    torch.testing.assert_close(out, reference.causal_attention(q, q, q, 8**-0.5, window=(3, 0))[0])


def test_window_devices_include_cuda():
    # the CUDA kernels (both families) take every window: no fallback for CUDA windows
    assert {"cpu", "cuda"} <= ops._WINDOW_DEVICES
