"""attnext.varlen_attention (torch.nn.attention.varlen.varlen_attn's arguments) against a
per-sequence loop of torch's SDPA with the bottom-right window mask of each sequence:
forward, gradients with one shared grad_out, lse; empty and one-token sequences,
T_q != T_k per sequence, GQA, seqused_k, windows, dropout, and every bad-input error.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import attnext
from attnext import reference
from attnext.functional import AuxRequest, varlen_attention

WINDOWS = [(-1, -1), (-1, 0), (2, 0), (1, 1)]
LENGTHS = [
    # (query lengths, key lengths): the paths each covers
    ([5, 5, 5], [5, 5, 5]),  # one run of equal lengths: a single strided call
    ([3, 0, 1, 6, 6, 2], [4, 2, 1, 9, 9, 0]),  # empty query seq, one-token seq, T_q < T_k, empty keys
    ([7, 1, 4], [3, 6, 4]),  # T_q > T_k: bottom-right rows that see no key
    ([70], [90]),  # two query tiles
]


def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int32)


def _inputs(lq, lk, H, Hkv, E, Ev, dtype, extra_k=0):
    g = torch.Generator().manual_seed(11)
    q = torch.randn(sum(lq), H, E, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    k = torch.randn(sum(lk) + extra_k, Hkv, E, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    v = torch.randn(sum(lk) + extra_k, Hkv, Ev, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    return q, k, v


def _loop(q, k, v, lq, lk, window, scale=None, used=None):
    """Per sequence: SDPA on (H, T, E) views with reference.attention_mask (bottom-right)."""
    H, Hkv = q.shape[1], k.shape[1]
    cq, ck = _cu(lq).tolist(), _cu(lk).tolist()
    outs, lses = [], []
    for i in range(len(lq)):
        Tk = lk[i] if used is None else used[i]
        qi = q[cq[i]:cq[i + 1]].transpose(0, 1)
        ki = k[ck[i]:ck[i] + Tk].transpose(0, 1).repeat_interleave(H // Hkv, 0)
        vi = v[ck[i]:ck[i] + Tk].transpose(0, 1).repeat_interleave(H // Hkv, 0)
        m = reference.attention_mask(lq[i], Tk, True, window)
        outs.append(F.scaled_dot_product_attention(qi, ki, vi, attn_mask=m, scale=scale).transpose(0, 1))
        s = (qi @ ki.transpose(-2, -1)) * (scale if scale is not None else qi.shape[-1] ** -0.5)
        lses.append(torch.logsumexp(s.masked_fill(~m, -math.inf), dim=-1))  # (H, Tq)
    return torch.cat(outs), torch.cat(lses, dim=1)


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("lq,lk", LENGTHS)
@pytest.mark.parametrize("gqa", [False, True])
def test_matches_loop(lq, lk, window, gqa):
    H, Hkv = (4, 2) if gqa else (3, 3)
    q, k, v = _inputs(lq, lk, H, Hkv, 8, 12, torch.float64)
    out, lse = varlen_attention(q, k, v, _cu(lq), _cu(lk), max(lq), max(lk), window_size=window, enable_gqa=gqa,
                                scale=0.3, return_aux=AuxRequest(lse=True))
    ref, ref_lse = _loop(q, k, v, lq, lk, window, scale=0.3)
    assert out.shape == (sum(lq), H, 12) and lse.shape == (H, sum(lq))
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(lse, ref_lse, atol=1e-12, rtol=1e-10)
    gout = torch.randn_like(out)
    for name, a, b in zip("qkv", torch.autograd.grad(out, (q, k, v), gout), torch.autograd.grad(ref, (q, k, v), gout)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision(dtype):
    """float32 and bfloat16 against the float64 loop; bfloat16 within 2x the loop's own error."""
    lq, lk = [3, 9, 1], [5, 9, 4]
    q, k, v = _inputs(lq, lk, 2, 2, 16, 16, dtype)
    out = varlen_attention(q, k, v, _cu(lq), _cu(lk), 9, 9, window_size=(-1, 0))
    oracle, _ = _loop(*(t.detach().double() for t in (q, k, v)), lq, lk, (-1, 0))
    eager, _ = _loop(q.detach(), k.detach(), v.detach(), lq, lk, (-1, 0))
    err = (out.double() - oracle).abs().max().item()
    if dtype == torch.float32:
        assert err < 2e-5
    else:
        assert err <= 2 * (eager.double() - oracle).abs().max().item() + 2e-3


def test_seqused_k_and_spare_keys():
    """seqused_k: only the first seqused_k[i] keys of each slot take part (forward and
    backward: the unused keys get zero gradient); key rows past cu_seq_k[-1] are never read."""
    lq, slots, used = [2, 1, 3], [6, 6, 6], [4, 0, 6]
    q, k, v = _inputs(lq, slots, 2, 2, 8, 8, torch.float64, extra_k=5)
    out = varlen_attention(q, k, v, _cu(lq), _cu(slots), 3, 6, window_size=(-1, 0),
                           seqused_k=torch.tensor(used, dtype=torch.int32))
    ref, _ = _loop(q, k, v, lq, slots, (-1, 0), used=used)
    torch.testing.assert_close(out, ref)
    assert not out[2].any()  # sequence 1 uses no key: a zero row
    out.sum().backward()
    assert not k.grad[4:6].any() and not k.grad[18:].any() and k.grad[:4].any()


def test_dropout_generator():
    """Dropout (an attnext extension): reproducible from the generator, and a run of equal
    lengths draws one mask for the whole run."""
    lq = [4, 4, 6]
    q, k, v = _inputs(lq, lq, 2, 2, 8, 8, torch.float32)
    cu = _cu(lq)
    a = varlen_attention(q, k, v, cu, cu, 6, 6, dropout_p=0.3, generator=torch.Generator().manual_seed(1))
    b = varlen_attention(q, k, v, cu, cu, 6, 6, dropout_p=0.3, generator=torch.Generator().manual_seed(1))
    c = varlen_attention(q, k, v, cu, cu, 6, 6)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.allclose(a, c)
    a.sum().backward()
    assert torch.isfinite(q.grad).all()


def test_batch_invariant():
    """A sequence's output does not depend on the rest of the batch (num_splits=1's promise)."""
    q, k, v = _inputs([5, 7], [5, 7], 2, 2, 8, 8, torch.float32)
    both = varlen_attention(q, k, v, _cu([5, 7]), _cu([5, 7]), 7, 7, window_size=(-1, 0), num_splits=None)
    alone = varlen_attention(q[5:], k[5:], v[5:], _cu([7]), _cu([7]), 7, 7, window_size=(-1, 0))
    torch.testing.assert_close(both[5:], alone, atol=0, rtol=0)


def test_no_sequences():
    q, k, v = _inputs([], [], 2, 2, 8, 8, torch.float32)
    out, lse = varlen_attention(q, k, v, _cu([]), _cu([]), 0, 0, return_aux=AuxRequest(lse=True))
    assert out.shape == (0, 2, 8) and lse.shape == (2, 0)


@pytest.mark.parametrize(
    "case,exc,words",
    [
        ("q_dtype", RuntimeError, "cu_seq_q must have dtype torch.int32"),
        ("k_dtype", RuntimeError, "cu_seq_k must have dtype torch.int32"),
        ("q_2d", RuntimeError, "cu_seq_q must be a 1-D"),
        ("k_len", RuntimeError, "cu_seq_k must have N + 1"),
        ("q_decreasing", RuntimeError, "cu_seq_q must be non-decreasing"),
        ("k_decreasing", RuntimeError, "cu_seq_k must be non-decreasing"),
        ("q_end", RuntimeError, "cu_seq_q must start at 0 and end at total_q"),
        ("k_end", RuntimeError, "cu_seq_k must lie within"),
        ("max_q", RuntimeError, "max_q = 2 is smaller than sequence 1's length 3"),
        ("max_k", RuntimeError, "max_k = 1 is smaller"),
        ("max_type", TypeError, "max_q must be an int"),
        ("window", ValueError, "window_size must be a pair"),
        ("heads", ValueError, "Try setting enable_gqa=True"),
        ("gqa", ValueError, "multiple of kv heads"),
        ("query_2d", RuntimeError, "query must be 3-D"),
        ("kv_shape", RuntimeError, "key and value must have the same total length"),
        ("seqused", RuntimeError, "seqused_k[1] = 9 must lie within [0, 3]"),
        ("seqused_dtype", RuntimeError, "seqused_k must be an int32"),
        ("block_table", NotImplementedError, "block_table"),
        ("cu_k_none", RuntimeError, "cu_seq_k is required"),
    ],
)
def test_errors(case, exc, words):
    lq = [2, 3]
    q, k, v = _inputs(lq, lq, 2, 2, 8, 8, torch.float32)
    args = dict(query=q, key=k, value=v, cu_seq_q=_cu(lq), cu_seq_k=_cu(lq), max_q=3, max_k=3)
    kw = {}
    i32 = torch.int32
    if case == "q_dtype":
        args["cu_seq_q"] = _cu(lq).long()
    elif case == "k_dtype":
        args["cu_seq_k"] = _cu(lq).long()
    elif case == "q_2d":
        args["cu_seq_q"] = _cu(lq)[None]
    elif case == "k_len":
        args["cu_seq_k"] = torch.tensor([0, 5], dtype=i32)
    elif case == "q_decreasing":
        args["cu_seq_q"] = torch.tensor([0, 3, 2, 5], dtype=i32)
        args["cu_seq_k"] = torch.tensor([0, 1, 2, 5], dtype=i32)
    elif case == "k_decreasing":
        args["cu_seq_k"] = torch.tensor([0, 4, 3], dtype=i32)
    elif case == "q_end":
        args["cu_seq_q"] = torch.tensor([0, 2, 4], dtype=i32)
    elif case == "k_end":
        args["cu_seq_k"] = torch.tensor([0, 2, 6], dtype=i32)
    elif case == "max_q":
        args["max_q"] = 2
    elif case == "max_k":
        args["max_k"] = 1
    elif case == "max_type":
        args["max_q"] = 3.0
    elif case == "window":
        kw["window_size"] = (-2, 0)
    elif case == "heads":
        args["key"], args["value"] = k[:, :1], v[:, :1]
        args["query"] = torch.randn(5, 2, 8)
    elif case == "gqa":
        args["query"], kw["enable_gqa"] = torch.randn(5, 3, 8), True
    elif case == "query_2d":
        args["query"] = q[:, 0]
    elif case == "kv_shape":
        args["value"] = v[:4]
    elif case == "seqused":
        kw["seqused_k"] = torch.tensor([1, 9], dtype=i32)
    elif case == "seqused_dtype":
        kw["seqused_k"] = torch.tensor([1, 2])
    elif case == "block_table":
        kw["block_table"] = torch.zeros(2, 1, dtype=i32)
    elif case == "cu_k_none":
        args["cu_seq_k"] = None
    with pytest.raises(exc) as e:
        varlen_attention(**args, **kw)
    assert words in str(e.value)


def test_signature_matches_torch():
    """Every argument of torch's varlen_attn is accepted, in the same order and kinds."""
    import inspect

    varlen = pytest.importorskip("torch.nn.attention.varlen", reason="this torch has no torch.nn.attention.varlen")
    varlen_attn = varlen.varlen_attn

    theirs = inspect.signature(varlen_attn).parameters
    ours = inspect.signature(attnext.varlen_attention).parameters
    assert list(ours)[: len(theirs)] == list(theirs)
    assert [p.kind for p in ours.values()][: len(theirs)] == [p.kind for p in theirs.values()]


# ---- the one-call CPU kernel (attnext::_varlen_attention) and its schedule

needs_native = pytest.mark.skipif(
    not attnext.ops._has_op("_varlen_attention"), reason="needs the compiled CPU kernel (attnext._C)"
)


def _no_runs(*_args, **_kw):
    raise AssertionError("the per-run composition ran where the one-call kernel should")


@needs_native
def test_one_call_kernel_runs_on_cpu(monkeypatch):
    """On the CPU without dropout, forward and first-order backward take the one-call kernel:
    with the per-run composition made to fail, they still run (and match the loop); with
    dropout the per-run composition runs."""
    import attnext.functional as fn

    lq, lk = [3, 0, 9, 1], [5, 2, 9, 4]
    q, k, v = _inputs(lq, lk, 4, 2, 8, 8, torch.float64)
    monkeypatch.setattr(fn, "_varlen_runs", _no_runs)
    out = varlen_attention(q, k, v, _cu(lq), _cu(lk), 9, 9, window_size=(-1, 0), enable_gqa=True)
    ref, _ = _loop(q, k, v, lq, lk, (-1, 0))
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    gout = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), gout), torch.autograd.grad(ref, (q, k, v), gout)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    with pytest.raises(AssertionError, match="per-run composition ran"):
        varlen_attention(q, k, v, _cu(lq), _cu(lk), 9, 9, dropout_p=0.1, enable_gqa=True)


@needs_native
@pytest.mark.parametrize("window", [(-1, 0), (40, 0), (-1, -1), (30, 5)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_long_and_short_sequences(window, dtype):
    """One long sequence among short ones: its rows are cut into several units (at
    multiples of the query tile; a tail of decode size stays with the previous unit),
    run on the threads beside the short ones: forward, lse and gradients equal the
    per-sequence loop; T_q < T_k (a KV cache) in the long one too."""
    lq, lk = [2, 300, 1, 17, 5, 81], [2, 340, 3, 17, 9, 81]
    q, k, v = _inputs(lq, lk, 4, 2, 16, 8, dtype)
    out, lse = varlen_attention(q, k, v, _cu(lq), _cu(lk), 300, 340, window_size=window, enable_gqa=True,
                                return_aux=AuxRequest(lse=True))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = _loop(q64, k64, v64, lq, lk, window)
    tol = dict(atol=1e-12, rtol=1e-10) if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(out.double(), ref, **tol)
    torch.testing.assert_close(lse.double(), ref_lse, **tol)
    gout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), gout)
    for name, a, b in zip("qkv", grads, torch.autograd.grad(ref, (q64, k64, v64), gout.double())):
        torch.testing.assert_close(a.double(), b, **tol, msg=lambda m: f"d{name}: {m}")


@needs_native
def test_batch_invariant_bits_with_cut_rows():
    """A long sequence whose rows are cut into units when the batch is large gives the
    same bits as alone (the cuts keep its query tiles), forward and backward."""
    lq = [260, 3, 3, 3]
    q, k, v = _inputs(lq, lq, 2, 2, 16, 16, torch.float32)
    cu = _cu(lq)
    both = varlen_attention(q, k, v, cu, cu, 260, 260, window_size=(-1, 0))
    alone = varlen_attention(q[:260], k[:260], v[:260], _cu([260]), _cu([260]), 260, 260, window_size=(-1, 0))
    torch.testing.assert_close(both[:260], alone, atol=0, rtol=0)


@needs_native
def test_double_backward_recomputes():
    """A differentiated backward of the one-call kernel (create_graph) recomputes through
    the per-run composition: gradgradcheck in float64."""
    lq, lk = [3, 4], [4, 4]
    q, k, v = _inputs(lq, lk, 2, 1, 4, 4, torch.float64)
    f = lambda q, k, v: varlen_attention(q, k, v, _cu(lq), _cu(lk), 4, 4, window_size=(-1, 0), enable_gqa=True)
    assert torch.autograd.gradgradcheck(f, (q, k, v))


@needs_native
def test_private_ops_errors_and_opcheck():
    """The private ops check their own arguments (they are reachable as torch.ops), have
    no derivative of their own (a clear error), and pass opcheck."""
    lq = [2, 3]
    q, k, v = _inputs(lq, lq, 2, 2, 8, 8, torch.float32)
    op = torch.ops.attnext._varlen_attention
    with pytest.raises(RuntimeError, match="cu_seq_q must be a 1-D int32"):
        op(q, k, v, _cu(lq).long(), _cu(lq), None, 0.5, -1, -1)
    with pytest.raises(RuntimeError, match="cu_seq_k must be non-decreasing"):
        op(q, k, v, _cu(lq), torch.tensor([0, 4, 3], dtype=torch.int32), None, 0.5, -1, -1)
    with pytest.raises(RuntimeError, match="must start at 0 and end at total_q"):
        op(q, k, v, torch.tensor([0, 2, 4], dtype=torch.int32), _cu(lq), None, 0.5, -1, -1)
    with pytest.raises(RuntimeError, match="multiple of the key/value heads"):
        op(torch.randn(5, 3, 8), k, v, _cu(lq), _cu(lq), None, 0.5, -1, -1)
    out, lse = op(q, k, v, _cu(lq), _cu(lq), None, 0.5, -1, 0)
    with pytest.raises(RuntimeError, match="not differentiable on its own"):
        out.sum().backward()
    args = (q.detach(), k.detach(), v.detach(), _cu(lq), _cu(lq), None, 0.5, -1, 0)
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
    out, lse = op(*args)
    bargs = (torch.randn_like(out), *args[:3], out, lse, *args[3:])
    torch.library.opcheck(torch.ops.attnext._varlen_attention_backward, bargs, test_utils=("test_schema", "test_faketensor"))
