"""Drop-in functional entries over :func:`attnext.causal_attention`.

* :func:`scaled_dot_product_attention`: ``torch.nn.functional.scaled_dot_product_attention``'s
  signature and results; attnext's kernels run what they express (causal, full, GQA, a
  boolean mask that is a causal/bottom-right/sliding-window band) and torch runs the rest
  (:func:`explain_sdpa` says why).
* :func:`varlen_attention`: ``torch.nn.attention.varlen.varlen_attn``'s packed
  variable-length batches, on the CPU too.

Both are thin Python over ``causal_attention``: no kernel of their own.
"""
from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops, reference
from .ops import Explanation, causal_attention

__all__ = ["scaled_dot_product_attention", "explain_sdpa", "varlen_attention", "AuxRequest", "match_band"]


# ----------------------------------------------------------------------------- band masks


class Band(NamedTuple):
    """A boolean mask recognised as a window around a diagonal, restricted to keys ``[lo, hi)``:
    on ``mask[..., lo:hi]`` it is ``reference.attention_mask(T, hi - lo, bottom_right, window)``
    and it is False outside those columns."""

    bottom_right: bool
    window: Tuple[int, int]
    lo: int
    hi: int


def _row_ends(row: Tensor) -> Tuple[int, int]:
    """First and last True column of a non-empty boolean row."""
    idx = row.nonzero()
    return int(idx[0]), int(idx[-1])


def match_band(mask: Tensor, allow_key_range: bool = False) -> Optional[Band]:
    """Recognise a ``(T, S)`` boolean mask as an attention window (None: it is not one).

    Tries top-left then bottom-right alignment; ``(left, right)`` are read off the first
    and last non-empty rows (a band's first and last visible columns never decrease
    down the rows), then the whole mask is compared with the band they define, so a
    match is exact. With ``allow_key_range`` the band may cover only a contiguous range
    of key columns (a padding mask): the columns no row sees are cut off first.
    Costs a few passes over the mask and one host sync.
    """
    T, S = mask.shape
    if T == 0 or S == 0:
        return Band(False, (-1, -1), 0, S)
    lo, hi = 0, S
    if allow_key_range:
        cols = mask.any(0).nonzero()
        if cols.numel() == 0:  # no row sees any key: attention over no keys (zeros)
            return Band(False, (-1, -1), 0, 0)
        lo, hi = int(cols[0]), int(cols[-1]) + 1
    sub = mask[:, lo:hi]
    Sk = hi - lo
    rows = sub.any(1).nonzero()
    if rows.numel() == 0:
        return None if not allow_key_range else Band(False, (-1, -1), 0, 0)
    i0, i1 = int(rows[0]), int(rows[-1])
    _, last0 = _row_ends(sub[i0])
    first1, _ = _row_ends(sub[i1])
    for bottom_right in (False, True):
        if bottom_right and Sk == T:
            break
        d0 = Sk - T if bottom_right else 0
        right = -1 if last0 == Sk - 1 else last0 - (i0 + d0)
        left = -1 if first1 == 0 else (i1 + d0) - first1
        if right < -1 or left < -1 or (right == -1 and last0 != Sk - 1) or (left == -1 and first1 != 0):
            continue
        cand = reference.attention_mask(T, Sk, bottom_right, (left, right), device=mask.device)
        if torch.equal(sub, cand):
            return Band(bottom_right, (left, right), lo, hi)
    return None


def _match_batched_band(mask: Tensor, T: int, S: int) -> Tuple[Optional[Band], str]:
    """One band for every matrix of an SDPA boolean mask (broadcastable to ``(..., T, S)``)."""
    m = mask.expand(*mask.shape[:-2], T, S) if mask.dim() >= 2 else mask.expand(T, S)
    first = m.reshape(-1, T, S)[0] if m.dim() > 2 else m
    band = match_band(first)
    if band is None:
        return None, "attn_mask is not a causal, bottom-right or sliding-window band"
    if m.dim() > 2 and not torch.equal(m, first.expand_as(m)):
        return None, "attn_mask differs between batch entries"
    return band, ""


# ----------------------------------------------------------------------------- SDPA


def _broadcast_batch(shapes: Sequence[Sequence[int]]) -> Optional[Tuple[int, ...]]:
    """The broadcast of ``shapes`` (torch's rules: right-aligned, 1 against any size), or
    None where they do not broadcast. In plain Python: torch.broadcast_shapes costs
    about 11 us a call, more than a whole small attention."""
    first = tuple(shapes[0])
    if all(tuple(sh) == first for sh in shapes[1:]):
        return first
    n = max(len(sh) for sh in shapes)
    out = [1] * n
    for sh in shapes:
        for i, d in enumerate(sh, n - len(sh)):
            if d != 1:
                if out[i] not in (1, d):
                    return None
                out[i] = d
    return tuple(out)


def _sdpa_plan(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """(reasons torch's SDPA must run, or the native call's arguments)."""
    reasons: List[str] = []
    ts = (query, key, value)
    if not all(isinstance(t, Tensor) for t in ts):
        return ["query, key and value are not all tensors"], None
    if any(t.is_nested or t.layout != torch.strided for t in ts):
        return ["nested or non-strided tensors"], None
    if not (query.dtype == key.dtype == value.dtype) or not query.dtype.is_floating_point:
        return ["query, key and value are not all of one floating dtype (torch raises or decides)"], None
    if not (query.device == key.device == value.device):
        return ["query, key and value are on different devices"], None
    min_dim = 3 if enable_gqa else 2
    if min(t.dim() for t in ts) < min_dim:
        return [f"fewer than {min_dim} dims (torch raises)"], None
    T, S, hs = query.shape[-2], key.shape[-2], query.shape[-1]
    if key.shape[-1] != hs or value.shape[-2] != S:
        return ["head sizes of query and key, or the key and value lengths, differ (torch raises)"], None
    if hs == 0:
        return ["head size 0"], None
    nb = 3 if enable_gqa else 2
    batch = _broadcast_batch([t.shape[:-nb] for t in ts])
    if batch is None:
        return ["batch dims do not broadcast (torch raises)"], None
    if enable_gqa:
        H, Hk, Hv = query.shape[-3], key.shape[-3], value.shape[-3]
        if Hk != Hv:
            return ["enable_gqa with different numbers of key and value heads"], None
        if Hk == 0 or H % Hk != 0:
            return ["enable_gqa: query heads not a multiple of key/value heads (torch raises)"], None
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not (0.0 <= dropout_p < 1.0):
        return [f"dropout_p={dropout_p!r} is not a number in [0, 1)"], None
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale)):
        return [f"scale={scale!r} is not a finite Python number"], None
    if not isinstance(is_causal, bool):
        return ["is_causal is not a bool"], None
    band = Band(False, (-1, 0) if is_causal else (-1, -1), 0, S)
    if attn_mask is not None:
        if is_causal:
            return ["attn_mask together with is_causal=True (torch's backends differ: an error or both masks)"], None
        if not isinstance(attn_mask, Tensor) or attn_mask.dtype != torch.bool:
            return ["attn_mask is not a boolean tensor (float masks are added to the scores)"], None
        if attn_mask.device != query.device:
            return ["attn_mask is on another device"], None
        target = (*batch, *query.shape[-3:-2], T, S) if enable_gqa else (*batch, T, S)
        if attn_mask.dim() < 2 or _broadcast_batch([attn_mask.shape, target]) != target:
            return ["attn_mask does not broadcast to the scores' shape (torch raises)"], None
        band, why = _match_batched_band(attn_mask, T, S)
        if band is None:
            return [why], None
    window = band.window
    k_, v_ = key, value
    if (band.lo, band.hi) != (0, S):
        k_, v_ = key[..., band.lo:band.hi, :], value[..., band.lo:band.hi, :]
    # the fallback reasons alone: explain()'s kernel notes query the CPU, which torch.compile cannot trace
    reasons = [] if ops._attention_native_cpu(query) else ops._fallback_reasons(
        "causal_attention", (query, k_, v_), window=window)
    if reasons:
        return [f"attnext would run its eager fallback: {r}" for r in reasons], None
    return [], (batch, band, k_, v_)


def _sdpa_small(query, key, dropout_p) -> bool:
    """A call without dropout small enough that torch's SDPA costs less than attnext's
    Python layers (ops._SDPA_SMALL_WORK): torch runs it."""
    return (not torch.compiler.is_compiling() and dropout_p.__class__ in ops._ZERO_TYPES and dropout_p == 0
            and ops._small_sdpa_call(query, key))


def _sdpa_fast(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> bool:
    """Whether the call is one _sdpa_plan would give attnext unchanged, by cheap checks:
    no mask, no dropout, a float (or no) scale, plain strided CPU tensors of one kernel
    dtype with the same batch dims (with enable_gqa: key/value heads dividing the query
    heads), a nonzero head size, key and value of one length. Anything else goes
    through _sdpa_plan."""
    if not (
        attn_mask is None and not torch.compiler.is_compiling()  # (traced: the plan)
        and dropout_p.__class__ in ops._ZERO_TYPES and dropout_p == 0
        and (scale is None or (scale.__class__ is float and math.isfinite(scale))) and is_causal.__class__ is bool
        and enable_gqa.__class__ is bool and query.__class__ is Tensor and key.__class__ is Tensor
        and value.__class__ is Tensor and ops._attention_native_cpu(query) and key.is_cpu and value.is_cpu
        and key.dtype == query.dtype and value.dtype == query.dtype and not query.is_nested
        and not key.is_nested and not value.is_nested and query.layout == ops._STRIDED
        and key.layout == ops._STRIDED and value.layout == ops._STRIDED
    ):
        return False
    nb = 3 if enable_gqa else 2
    qs, ks, vs = query.shape, key.shape, value.shape
    if not (len(qs) >= nb and len(ks) == len(qs) and len(vs) == len(qs)):
        return False
    if not (qs[-1] > 0 and ks[-1] == qs[-1] and vs[-2] == ks[-2]):
        return False
    if enable_gqa:
        H, Hk = qs[-3], ks[-3]
        if not (vs[-3] == Hk and Hk > 0 and H % Hk == 0):
            return False
    return qs[:-nb] == ks[:-nb] == vs[:-nb]


def explain_sdpa(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
) -> Explanation:
    """Why :func:`scaled_dot_product_attention` with these arguments would hand the call
    to ``torch.nn.functional.scaled_dot_product_attention``.

    Returns an :class:`attnext.ops.Explanation`: a list of reasons (empty: attnext's
    kernel runs), whose ``.kernels`` says which window and alignment the native call uses
    and what :func:`attnext.explain` reports for it.
    """
    if _sdpa_small(query, key, dropout_p):
        return Explanation([
            f"a small call (query elements x keys = {query.numel() * key.shape[-2]} < "
            f"{ops._SDPA_SMALL_WORK}, ATTNEXT_SDPA_SMALL_WORK): torch's SDPA costs less per call than "
            "attnext's Python layers"
        ])
    reasons, plan = _sdpa_plan(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if reasons:
        return Explanation(reasons)
    _, band, k_, v_ = plan
    note = f"attnext.causal_attention(window_size={band.window}, align={'bottom_right' if band.bottom_right else 'top_left'}"
    note += f", keys {band.lo}:{band.hi})" if (band.lo, band.hi) != (0, key.shape[-2]) else ")"
    return Explanation([], [note] + ops.explain("causal_attention", query, k_, v_, window_size=band.window).kernels)


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
) -> Tensor:
    """``torch.nn.functional.scaled_dot_product_attention``, with attnext's kernels where they apply.

    Same signature, shapes, broadcasting, dtypes, errors and results (forward and
    gradients) as torch's: query ``(..., L, E)``, key ``(..., S, E)``, value ``(..., S, Ev)``
    with batch dims that broadcast (``enable_gqa=True``: query ``(..., Hq, L, E)``, key and
    value ``(..., H, S, E)``, ``Hq % H == 0``); returns ``(..., L, Ev)`` in query's dtype.

    attnext's kernel (:func:`attnext.causal_attention`, never building the ``(L, S)``
    weights) runs when its native kernel takes the inputs (:func:`attnext.explain`) and
    the call is one of:

    * ``is_causal=True`` without a mask (top-left, as torch: query ``i`` sees keys ``j <= i``);
    * no mask (full attention, ``window_size=(-1, -1)``);
    * a boolean ``attn_mask``, equal in every batch entry, that is exactly a causal band:
      top-left or bottom-right (KV-cache) aligned, optionally a sliding window or any
      ``(left, right)`` window (:func:`match_band`, one pass over the mask and a host sync);

    each with or without ``enable_gqa`` (key/value heads read through stride-0 views,
    never repeated). Batch dims that broadcast are expanded as views (no copies; the
    gradients of broadcast inputs are summed by autograd, as torch's are).

    Everything else is handed to torch's function unchanged, so it gives torch's result
    or torch's error: float masks, other boolean masks, a mask with ``is_causal=True``
    (torch's CPU kernel ANDs the two, its math kernel raises), non-float or mixed dtypes,
    shapes torch rejects, ``dropout_p`` outside ``[0, 1)``, head size 0, float16 on the
    CPU (attnext's CPU kernel has none), devices without attnext's windows.
    :func:`explain_sdpa` returns the reason for a given call.

    Differences from torch, where attnext runs:

    * ``dropout_p > 0``: the same distribution and ``1 / (1 - p)`` scaling, but the mask is
      attnext's counter-based hash (drawn from torch's default generator, so
      ``torch.manual_seed`` makes it reproducible), a different stream from torch's: the
      same seed gives different masks than torch's SDPA.
    * A query that sees no key (bottom-right with ``L > S``, a window, ``S == 0``) gets a
      zero row and zero gradient. torch 2.13 on the CPU also returns zeros for such rows
      (its math backend used NaN before 2.5); other devices' torch backends may differ.
    * Rounding: attnext accumulates in float (double for float64) with a different
      summation order, so results agree with torch to rounding, not bit for bit.
    """
    if _sdpa_small(query, key, dropout_p):
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
            enable_gqa=enable_gqa,
        )
    if _sdpa_fast(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
        # the common call (no mask, no dropout, q, k, v of one batch shape): _sdpa_plan's
        # checks hold by construction (about 5 us less, on a call that may take 10)
        return causal_attention(
            query, key, value, scale=scale, align="top_left",
            enable_gqa=enable_gqa and query.shape[-3] != key.shape[-3],
            window_size=ops._CAUSAL_WINDOW if is_causal else ops._FULL_WINDOW,
        )
    reasons, plan = _sdpa_plan(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if reasons:
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
            enable_gqa=enable_gqa,
        )
    batch, band, k_, v_ = plan
    nb = 3 if enable_gqa else 2

    def expand(t):  # views: stride 0 over broadcast dims (none where t has the batch already)
        return t if t.shape[:-nb] == batch else t.expand(*batch, *t.shape[-nb:])

    q, k, v = expand(query), expand(k_), expand(v_)
    window = ops._window_constant(band.window)  # causal_attention's fast path knows its own tuples
    return causal_attention(
        q, k, v, scale=None if scale is None else float(scale), dropout_p=float(dropout_p),
        align="bottom_right" if band.bottom_right else "top_left", enable_gqa=enable_gqa and q.shape[-3] != k.shape[-3],
        window_size=window,
    )


# ----------------------------------------------------------------------------- varlen


class AuxRequest(NamedTuple):
    """Which auxiliary outputs :func:`varlen_attention` returns (as
    ``torch.nn.attention.varlen.AuxRequest``): ``lse``, the per-row logsumexp."""

    lse: bool = False


def _offsets(cu: Tensor, name: str, n: Optional[int]) -> List[int]:
    if not isinstance(cu, Tensor):
        raise TypeError(f"attnext: {name} must be a torch.Tensor of int32 offsets, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise RuntimeError(f"attnext: {name} must have dtype torch.int32 (as FlashAttention's), got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 1:
        raise RuntimeError(f"attnext: {name} must be a 1-D tensor of N + 1 offsets, got shape {tuple(cu.shape)}")
    if n is not None and cu.numel() != n:
        raise RuntimeError(f"attnext: {name} must have N + 1 = {n} entries (as cu_seq_q), got {cu.numel()}")
    vals = cu.tolist()
    if any(b < a for a, b in zip(vals, vals[1:])):
        raise RuntimeError(f"attnext: {name} must be non-decreasing (cumulative sequence offsets), got {vals}")
    return vals


def _runs(lengths: Sequence[Tuple[int, ...]]) -> List[Tuple[int, int]]:
    """Maximal ranges [i, j) of adjacent sequences with equal length tuples."""
    runs, i = [], 0
    for j in range(1, len(lengths) + 1):
        if j == len(lengths) or lengths[j] != lengths[i]:
            runs.append((i, j))
            i = j
    return runs


def _lse(q: Tensor, k: Tensor, v: Tensor, scale: float, bottom_right: bool, window) -> Tensor:
    """The rows' logsumexp (``-inf`` for a row that sees no key), without autograd."""
    with torch.no_grad():
        if not ops._fallback_reasons("causal_attention", (q, k, v), window=window):
            _, lse = torch.ops.attnext.causal_attention(q, k, v, scale, 0.0, bottom_right, 0, 0, None, *window)
        else:
            _, lse = reference.causal_attention(q, k, v, scale, 0.0, bottom_right, window=window)
    return lse


def varlen_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    cu_seq_q: Tensor,
    cu_seq_k: Tensor,
    max_q: int,
    max_k: int,
    *,
    return_aux: Optional[AuxRequest] = None,
    scale: Optional[float] = None,
    window_size: Tuple[int, int] = (-1, -1),
    enable_gqa: bool = False,
    seqused_k: Optional[Tensor] = None,
    block_table: Optional[Tensor] = None,
    num_splits: Optional[int] = None,
    dropout_p: float = 0.0,
    generator: Optional[torch.Generator] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Attention over a batch of sequences of different lengths packed end to end, with the
    arguments of ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention's varlen API),
    on every device attnext runs on.

    Args:
        query: ``(total_q, H, E)``: the queries of all N sequences, one after another.
        key: ``(total_k, Hkv, E)``; value: ``(total_k, Hkv, Ev)``. ``Hkv == H`` unless
            ``enable_gqa``.
        cu_seq_q: ``(N + 1,)`` int32, non-decreasing: sequence ``i``'s queries are rows
            ``cu_seq_q[i]:cu_seq_q[i + 1]``; ``cu_seq_q[0] == 0`` and ``cu_seq_q[N] == total_q``.
        cu_seq_k: ``(N + 1,)`` int32, non-decreasing, within ``[0, total_k]``: sequence ``i``'s
            keys and values are rows ``cu_seq_k[i]:cu_seq_k[i + 1]``.
        max_q, max_k: at least the longest query / key sequence (an error otherwise; the
            per-sequence computation does not need them to be tight).
        return_aux: ``AuxRequest(lse=True)`` also returns the logsumexp of every row,
            ``(H, total_q)``, float32 (float64 for float64 inputs), ``-inf`` for a row that sees
            no key (FlashAttention's CUDA kernel writes ``+inf`` there). The shape is what
            torch's op returns (its fake kernel and FlashAttention); torch's docstring says
            ``(T_q, H_q)``. Not differentiable (torch's backward ignores it too); computed by
            an extra forward pass without dropout.
        scale: multiplies ``q @ k^T``; ``None``: ``E ** -0.5``.
        window_size: ``(left, right)`` around each query's diagonal key, ``-1`` unbounded;
            default ``(-1, -1)`` full attention, ``(-1, 0)`` causal, ``(W, 0)`` a sliding
            window. Aligned bottom-right in every sequence (FlashAttention's varlen): query
            ``t`` of a sequence with ``Tq`` queries and ``Tk`` keys has diagonal key
            ``t + Tk - Tq``; a query that sees no key gets a zero row.
        enable_gqa: query head ``h`` uses key/value head ``h // (H // Hkv)``; errors as torch's.
        seqused_k: ``(N,)`` int32: only the first ``seqused_k[i]`` keys of sequence ``i``
            take part (a KV-cache slot larger than the sequence). Unlike torch's, the
            backward works too (the unused keys get zero gradient).
        block_table: paged KV caches are not supported (an error).
        num_splits: accepted and ignored: a sequence's result never depends on the rest
            of the batch (what ``num_splits=1`` asks of torch).
        dropout_p, generator: attention dropout, an attnext extension (torch's varlen has
            none): as :func:`attnext.causal_attention`, one (seed, offset) draw per call
            of it (per run of equal-length sequences).

    Returns:
        ``(total_q, H, Ev)`` in query's dtype (and the lse, see ``return_aux``).
        Differentiable in query, key and value.

    Cost: on the CPU (no dropout), one kernel call for the whole batch
    (``attnext::_varlen_attention``): the work of every sequence is cut into units (a
    sequence, a query head, a range of its rows) of at most ~1/8 of a thread's share of
    the visible query-key pairs, and the threads take them longest first, so the batch is
    balanced by tokens, not by sequence count; each unit runs the kernel the measured
    choice gives for its shape (``attnext.explain``'s ``.kernels``). Elsewhere, with
    dropout, under torch.func transforms, forward-mode AD or torch.compile: one
    :func:`attnext.causal_attention` call per run of adjacent sequences with equal
    lengths (those are one strided batch, read in place). Output: written in place (CPU
    kernel) or one copy. The offsets are read on the host once (a device sync on
    accelerators). A backward that is itself differentiated recomputes through the
    per-run calls.
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise TypeError(f"attnext: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise RuntimeError(f"attnext: {name} must be 3-D (total, heads, head size), got shape {tuple(t.shape)}")
    if block_table is not None:
        raise NotImplementedError("attnext: varlen_attention does not support block_table (paged KV caches)")
    if cu_seq_k is None:
        raise RuntimeError("attnext: cu_seq_k is required (cumulative key offsets, int32 (N + 1,))")
    Hq, Hkv = query.shape[1], key.shape[1]
    if not enable_gqa and Hq != Hkv:
        raise ValueError(
            f"Expect query and key/value to have the same number of heads but got Hq={Hq} and Hkv={Hkv}. "
            "Try setting enable_gqa=True for GQA."
        )
    if enable_gqa and (Hkv == 0 or Hq % Hkv != 0):
        raise ValueError(
            f"Expect number of query heads to be a multiple of kv heads for GQA but got Hq={Hq} and Hkv={Hkv}."
        )
    if key.shape[0] != value.shape[0] or key.shape[1] != value.shape[1]:
        raise RuntimeError(
            f"attnext: key and value must have the same total length and heads, got key {tuple(key.shape)} "
            f"and value {tuple(value.shape)}"
        )
    wl, wr = ops._check_window(tuple(window_size) if isinstance(window_size, list) else window_size)
    cq = _offsets(cu_seq_q, "cu_seq_q", None)
    ck = _offsets(cu_seq_k, "cu_seq_k", len(cq))
    N = len(cq) - 1
    if cq[0] != 0 or cq[-1] != query.shape[0]:
        raise RuntimeError(
            f"attnext: cu_seq_q must start at 0 and end at total_q = query.shape[0] = {query.shape[0]}, "
            f"got {cq[0]} ... {cq[-1]}"
        )
    if ck[0] < 0 or ck[-1] > key.shape[0]:
        raise RuntimeError(
            f"attnext: cu_seq_k must lie within [0, total_k = key.shape[0] = {key.shape[0]}], got {ck[0]} ... {ck[-1]}"
        )
    lq = [b - a for a, b in zip(cq, cq[1:])]
    span = [b - a for a, b in zip(ck, ck[1:])]
    lk = list(span)
    if seqused_k is not None:
        if not isinstance(seqused_k, Tensor) or seqused_k.dtype != torch.int32 or seqused_k.shape != (N,):
            raise RuntimeError(f"attnext: seqused_k must be an int32 tensor of shape (N,) = ({N},)")
        lk = seqused_k.tolist()
        bad = [i for i in range(N) if not 0 <= lk[i] <= span[i]]
        if bad:
            i = bad[0]
            raise RuntimeError(
                f"attnext: seqused_k[{i}] = {lk[i]} must lie within [0, {span[i]}] (sequence {i}'s keys in cu_seq_k)"
            )
    for name, m, lens in (("max_q", max_q, lq), ("max_k", max_k, lk)):
        if isinstance(m, bool) or not isinstance(m, int):
            raise TypeError(f"attnext: {name} must be an int, got {type(m).__name__}")
        if lens and m < max(lens):
            i = lens.index(max(lens))
            raise RuntimeError(f"attnext: {name} = {m} is smaller than sequence {i}'s length {lens[i]}")
    scale = ops._default_scale(query.shape[-1]) if scale is None else ops._check_scale(scale)
    want_lse = return_aux is not None and return_aux.lse

    args = (cq, ck, lq, span, lk, scale, (wl, wr), enable_gqa)
    if _native_varlen(query, key, value, dropout_p):
        used = seqused_k if seqused_k is not None else None
        out, lse = _VarlenNative.apply(query, key, value, cu_seq_q.cpu(), cu_seq_k.cpu(), used, scale, wl, wr, args)
        return (out, lse) if want_lse else out
    return _varlen_runs(query, key, value, *args, dropout_p, generator, want_lse)


def _native_varlen(query: Tensor, key: Tensor, value: Tensor, dropout_p: float) -> bool:
    """Whether the one-call CPU kernel takes this varlen call: CPU tensors of a kernel dtype,
    no dropout, and no transform that needs the per-run composition (torch.func,
    forward-mode AD, torch.compile)."""
    return (
        dropout_p == 0.0
        and query.device.type == "cpu"
        and ops._has_op("_varlen_attention")
        and not ops._fallback_reasons("causal_attention", (query, key, value), window=(-1, -1))
        and not torch.compiler.is_compiling()
        and not torch._C._are_functorch_transforms_active()
        and torch.autograd.forward_ad._current_level < 0
    )


class _VarlenNative(torch.autograd.Function):
    """The CPU kernel of a whole varlen batch (``attnext::_varlen_attention``) and its
    backward. A backward that is itself differentiated (``create_graph=True``) recomputes
    through the per-run composition, whose every op has its derivatives."""

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, used, scale, wl, wr, args):
        out, lse = torch.ops.attnext._varlen_attention(q, k, v, cu_q, cu_k, used, scale, wl, wr)
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, used)
        ctx.params = (scale, wl, wr, args)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):
        q, k, v, out, lse, cu_q, cu_k, used = ctx.saved_tensors
        scale, wl, wr, args = ctx.params
        if torch.is_grad_enabled():  # create_graph: differentiable gradients, recomputed
            with torch.enable_grad():
                o = _varlen_runs(q, k, v, *args, 0.0, None, False)
                grads = torch.autograd.grad(o, (q, k, v), grad_out, create_graph=True, allow_unused=True)
            grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, (q, k, v))]
        else:
            grads = torch.ops.attnext._varlen_attention_backward(
                grad_out.contiguous(), q, k, v, out, lse, cu_q, cu_k, used, scale, wl, wr
            )
        return (*grads, None, None, None, None, None, None, None)


def _varlen_runs(query, key, value, cq, ck, lq, span, lk, scale, window, enable_gqa, dropout_p, generator, want_lse):
    """varlen_attention as one :func:`causal_attention` call per run of adjacent sequences
    of equal lengths (every device; dropout; torch.func and forward-mode AD)."""
    (wl, wr), Hq, Hkv = window, query.shape[1], key.shape[1]
    outs, lses = [], []
    for i, j in _runs(list(zip(lq, span, lk))):
        n, Tq, Tk = j - i, lq[i], lk[i]
        if Tq == 0:
            continue
        q = query[cq[i]:cq[j]].unflatten(0, (n, Tq)).transpose(1, 2)  # (n, H, Tq, E)
        k = key[ck[i]:ck[i] + n * span[i]].unflatten(0, (n, span[i]))[:, :Tk].transpose(1, 2)  # (n, Hkv, Tk, E)
        v = value[ck[i]:ck[i] + n * span[i]].unflatten(0, (n, span[i]))[:, :Tk].transpose(1, 2)  # (n, Hkv, Tk, Ev)
        o = causal_attention(
            q, k, v, scale=scale, dropout_p=dropout_p, align="bottom_right", generator=generator,
            enable_gqa=enable_gqa and Hq != Hkv, window_size=(wl, wr),
        )  # (n, H, Tq, Ev)
        outs.append(o.transpose(1, 2).flatten(0, 1))  # (n * Tq, H, Ev)
        if want_lse:
            if enable_gqa and Hq != Hkv:
                g = Hq // Hkv
                k = k.unsqueeze(2).expand(n, Hkv, g, Tk, k.shape[-1]).flatten(1, 2)  # (n, H, Tk, E)
                v = v.unsqueeze(2).expand(n, Hkv, g, Tk, v.shape[-1]).flatten(1, 2)
            lses.append(_lse(q, k, v, scale, True, (wl, wr)).permute(1, 0, 2).reshape(Hq, n * Tq))
    if not outs:
        out = query.new_zeros((0, Hq, value.shape[-1]))
    else:
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
    if not want_lse:
        return out
    lse_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    lse = torch.cat(lses, dim=1) if lses else torch.empty((Hq, 0), dtype=lse_dtype, device=query.device)
    return out, lse.to(lse_dtype)
