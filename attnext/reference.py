"""Plain eager torch, written like the lecture.

Every function here is both attnext's fallback (no compiled extension, a device or
dtype without a native kernel, ``ATTNEXT_DISABLE_KERNELS=1``) and the oracle the
tests compare the kernels against (in float64). Keep it obvious, not fast.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def causal_mask(T: int, S: int, bottom_right: bool = False, device=None) -> Tensor:
    """The ``(T, S)`` boolean mask of the keys each query may see.

    Top-left alignment (``bottom_right=False``, like ``torch.tril`` and SDPA's
    ``is_causal``): query row ``i`` sees key columns ``j <= i``.
    Bottom-right alignment (decoding with a cache): ``j <= i + S - T``, so the last
    query sees every key.
    """
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=(S - T) if bottom_right else 0)


def attention_mask(T: int, S: int, bottom_right: bool = False, window=(-1, 0), device=None) -> Tensor:
    """The ``(T, S)`` boolean mask of the keys each query sees, for a window around the diagonal.

    Row ``i``'s diagonal key is ``d = i`` (top-left) or ``i + S - T`` (bottom-right); with
    ``window = (left, right)`` it sees keys ``d - left <= j <= d + right``, where ``-1``
    means no limit on that side (FlashAttention's ``window_size``): ``(-1, 0)`` is
    causal (:func:`causal_mask`), ``(W, 0)`` a causal sliding window of ``W + 1`` keys
    (Mistral's, Gemma's), ``(-1, -1)`` full attention (every key).
    """
    left, right = window
    d = torch.arange(T, device=device).view(T, 1) + ((S - T) if bottom_right else 0)
    j = torch.arange(S, device=device).view(1, S)
    keep = torch.ones(T, S, dtype=torch.bool, device=device)
    if right >= 0:
        keep = keep & (j <= d + right)
    if left >= 0:
        keep = keep & (j >= d - left)
    return keep


def causal_softmax(x: Tensor, scale: float = 1.0, bottom_right: bool = False) -> Tensor:
    """``softmax(x * scale)`` over the last dim with the causal mask; x: ``(..., T, S)``.

    A row that sees no key (bottom-right with T > S) is all zeros.
    """
    T, S = x.shape[-2], x.shape[-1]
    tril = causal_mask(T, S, bottom_right, x.device)
    wei = (x * scale).masked_fill(tril == 0, float("-inf"))
    wei = torch.softmax(wei, dim=-1)
    if bottom_right and T > S:
        wei = wei.masked_fill(~tril.any(dim=-1, keepdim=True), 0.0)
    return wei


def causal_softmax_backward(grad_y: Tensor, y: Tensor, scale: float = 1.0, bottom_right: bool = False) -> Tensor:
    """Gradient of :func:`causal_softmax` w.r.t. its input, given its output ``y``.

    ``dx = scale * y * (dy - sum(dy * y))`` over the visible part, zero above the
    diagonal; what ``grad_y`` holds above the diagonal is never used.
    """
    T, S = y.shape[-2], y.shape[-1]
    tril = causal_mask(T, S, bottom_right, y.device)
    grad_y = grad_y.masked_fill(tril == 0, 0.0)
    y = y.masked_fill(tril == 0, 0.0)
    dot = (grad_y * y).sum(dim=-1, keepdim=True)
    return scale * y * (grad_y - dot)


def matmul(a: Tensor, b: Tensor) -> Tensor:
    """The lecture's ``a @ b``: plain ``torch.matmul`` (it materialises broadcast operands)."""
    return torch.matmul(a, b)


def causal_mean(x: Tensor) -> Tensor:
    """Each position's mean over itself and the past, x: ``(..., T, C)``, written like the lecture."""
    T = x.shape[-2]
    tril = torch.tril(torch.ones(T, T, dtype=x.dtype, device=x.device))
    wei = tril / tril.sum(1, keepdim=True)  # (T, T), rows sum to 1
    return wei @ x  # (T, T) @ (..., T, C) -> (..., T, C)
# ----------------------------------------------------------------------------- causal_attention
#
# Dropout mask. Weight (b, t, j) of the (T, S) matrix of batch b (the linear index
# over all batch dims) is kept iff fmix32(row_key(b, t) + j * C) >= floor(p * 2**32),
# a counter-based hash of (seed, offset, b, t, j): the native kernel evaluates the
# same integer steps per tile, so kernel and fallback drop the same weights.
# uint32 arithmetic is emulated in int64 tensors (products split so none overflows).

_M32 = 0xFFFFFFFF
_BATCH_MUL = 0x9E3779B9
_ROW_MUL = 0x85EBCA77
_COL_MUL = 0xC2B2AE3D


def _mul32(a, c: int):
    """``(a * c) mod 2**32`` for uint32 values ``a`` (an int64 tensor or int) and a constant ``c``."""
    lo, hi = c & 0xFFFF, c >> 16
    return (a * lo + (((a * hi) & 0xFFFF) << 16)) & _M32


def _fmix32(h):
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def dropout_stream_key(seed: int, offset: int) -> int:
    """The 32-bit key of the dropout stream ``(seed, offset)`` (both int64)."""
    s, o = seed & 0xFFFFFFFFFFFFFFFF, offset & 0xFFFFFFFFFFFFFFFF
    h = _fmix32((o & _M32) ^ 0x6A09E667)
    h = _fmix32(h ^ (o >> 32))
    h = _fmix32(h ^ (s & _M32))
    return _fmix32(h ^ (s >> 32))


def dropout_keep_mask(
    batch_shape, T: int, S: int, p: float, seed: int, offset: int, device=None, cols: slice = slice(None)
) -> Tensor:
    """The ``(*batch_shape, T, S)`` boolean keep-mask of attention dropout with probability ``p``
    (only the key columns ``cols`` of it, when given: ``(*batch_shape, T, len(cols))``)."""
    stream = dropout_stream_key(seed, offset)
    nb = 1
    for d in batch_shape:
        nb *= d
    b = torch.arange(nb, dtype=torch.int64, device=device).view(*batch_shape, 1, 1) & _M32
    t = torch.arange(T, dtype=torch.int64, device=device).view(T, 1)
    j = torch.arange(S, dtype=torch.int64, device=device)[cols]
    hb = _fmix32((stream + _mul32(b, _BATCH_MUL)) & _M32)
    row_key = _fmix32((hb + _mul32(t, _ROW_MUL)) & _M32)
    h = _fmix32((row_key + _mul32(j, _COL_MUL)) & _M32)
    threshold = int(min(p * 4294967296.0, 4294967295.0))
    return h >= threshold


def causal_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    dropout_p: float = 0.0,
    bottom_right: bool = False,
    seed: int = 0,
    offset: int = 0,
    window=(-1, 0),
):
    """The lecture's attention head on given q, k, v: returns ``(out, lse)``.

    q: ``(..., T, hs)``, k: ``(..., S, hs)``, v: ``(..., S, hs_v)``; out: ``(..., T, hs_v)``,
    lse: ``(..., T)`` the logsumexp of each row of scaled, masked scores (``-inf`` for a
    row that sees no key, whose output is 0). Dropout (``dropout_p > 0``) zeroes the
    weights :func:`dropout_keep_mask` drops and scales the others by ``1 / (1 - p)``.
    ``window``: the keys each row sees around its diagonal (:func:`attention_mask`);
    the default ``(-1, 0)`` is causal.
    """
    T, S = q.shape[-2], k.shape[-2]
    tril = attention_mask(T, S, bottom_right, window, q.device)
    wei = (q @ k.transpose(-2, -1)) * scale  # (..., T, S)
    wei = wei.masked_fill(tril == 0, float("-inf"))
    lse = torch.logsumexp(wei, dim=-1)  # (..., T)
    wei = torch.softmax(wei, dim=-1)
    blind = ~tril.any(dim=-1, keepdim=True)  # rows that see no key: zeros, not NaN
    if blind.any():
        wei = wei.masked_fill(blind, 0.0)
    if dropout_p > 0:
        keep = dropout_keep_mask(q.shape[:-2], T, S, dropout_p, seed, offset, q.device)
        wei = wei * keep.to(wei.dtype) / (1.0 - dropout_p)
    out = wei @ v  # (..., T, hs_v)
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return out, lse.to(lse_dtype)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where derivatives are computed: float64 stays, everything else runs in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def causal_attention_grads(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    dropout_p: float = 0.0,
    bottom_right: bool = False,
    seed: int = 0,
    offset: int = 0,
    window=(-1, 0),
):
    """``(grad_q, grad_k, grad_v)`` of :func:`causal_attention`'s output for ``grad_out``,
    written with differentiable torch ops: the recompute behind every higher derivative
    of the fused head (double backward, forward-over-reverse, torch.func transforms).

    The same formulas as the native backward (``P`` the softmax weights, ``Z`` the
    dropout mask scaled by ``1 / (1 - p)``)::

        grad_v = (P * Z)^T @ grad_out
        dP     = (grad_out @ v^T) * Z
        dS     = P * (dP - rowsum(P * dP))
        grad_q = scale * dS @ k,   grad_k = scale * dS^T @ q

    Memory: it builds the ``(..., T, S)`` weights (several of them, in float32 for
    reduced precision), as the eager head does. A row that sees no key has zero
    gradients, and nothing here turns NaN for it (its scores are replaced by zeros
    before the softmax, and its weights multiplied by zero after it).
    """
    dtype = q.dtype
    wd = _work_dtype(dtype)
    go, q, k, v = (t.to(wd) for t in (grad_out, q, k, v))
    T, S = q.shape[-2], k.shape[-2]
    tril = attention_mask(T, S, bottom_right, window, q.device)
    sees = tril.any(dim=-1, keepdim=True)  # (T, 1): rows with at least one key
    s = (q @ k.transpose(-2, -1)) * scale  # (..., T, S)
    s = s.masked_fill(~tril, float("-inf")).masked_fill(~sees, 0.0)
    P = torch.softmax(s, dim=-1) * sees.to(wd)
    if dropout_p > 0:
        keep = dropout_keep_mask(q.shape[:-2], T, S, dropout_p, seed, offset, q.device)
        Z = keep.to(wd) / (1.0 - dropout_p)
    else:
        Z = None
    PZ = P if Z is None else P * Z
    grad_v = PZ.transpose(-2, -1) @ go  # (..., S, hs_v)
    dP = go @ v.transpose(-2, -1)  # (..., T, S)
    if Z is not None:
        dP = dP * Z
    dS = P * (dP - (P * dP).sum(dim=-1, keepdim=True))
    grad_q = (dS @ k) * scale
    grad_k = (dS.transpose(-2, -1) @ q) * scale
    return grad_q.to(dtype), grad_k.to(dtype), grad_v.to(dtype)


def causal_attention_jvp(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    tq,
    tk,
    tv,
    scale: float,
    dropout_p: float = 0.0,
    bottom_right: bool = False,
    seed: int = 0,
    offset: int = 0,
    window=(-1, 0),
    block: int = 256,
):
    """Forward-mode derivative of :func:`causal_attention`: the tangents ``(t_out, t_lse)``
    of ``(out, lse)`` along tangents ``tq``, ``tk``, ``tv`` (each may be None: zero),
    without the ``(T, S)`` matrix.

    With ``tS = scale * (tq @ k^T + q @ tk^T)``, the softmax's tangent is
    ``tP = P * (tS - mu)``, ``mu = rowsum(P * tS)``, so ::

        t_out = sum_j P_j Z_j (tv_j + (tS_j - mu) v_j) = sum_j P_j Z_j (tv_j + tS_j v_j) - mu * out
        t_lse = mu

    Every row sum is streamed over key blocks of ``block`` columns with the online
    softmax's running max (as the forward kernels do), so memory is ``O(T * block)``
    per batch, not ``O(T * S)``. Returns tensors in ``q``'s dtype (``t_lse`` in lse's).
    """
    dtype = q.dtype
    wd = _work_dtype(dtype)
    T, S = q.shape[-2], k.shape[-2]
    q, k, v = (t.to(wd) for t in (q, k, v))
    tq, tk, tv = (None if t is None else t.to(wd) for t in (tq, tk, tv))
    batch = q.shape[:-2]
    hs_v = v.shape[-1]
    m = q.new_full((*batch, T, 1), float("-inf"))  # running max
    l = q.new_zeros((*batch, T, 1))  # sum_j e_j
    mu = q.new_zeros((*batch, T, 1))  # sum_j e_j tS_j
    acc = q.new_zeros((*batch, T, hs_v))  # sum_j e_j Z_j v_j
    tacc = q.new_zeros((*batch, T, hs_v))  # sum_j e_j Z_j (tv_j + tS_j v_j)
    mask = attention_mask(T, S, bottom_right, window, q.device)  # (T, S) booleans: 1 byte each
    for j0 in range(0, S, block):
        j1 = min(S, j0 + block)
        visible = mask[:, j0:j1]  # (T, Bk)
        kb, vb = k.narrow(-2, j0, j1 - j0), v.narrow(-2, j0, j1 - j0)
        s = ((q @ kb.transpose(-2, -1)) * scale).masked_fill(~visible, float("-inf"))  # (..., T, Bk)
        ts = q.new_zeros(()) if tq is None else tq @ kb.transpose(-2, -1)
        if tk is not None:
            ts = ts + q @ tk.narrow(-2, j0, j1 - j0).transpose(-2, -1)
        ts = (ts * scale).expand_as(s).masked_fill(~visible, 0.0)
        m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
        m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        alpha = torch.exp(m - m_safe)  # 0 while a row has seen no finite score
        e = torch.exp(s - m_safe)  # (..., T, Bk), 0 where masked
        eZ = e
        if dropout_p > 0:
            keep = dropout_keep_mask(batch, T, S, dropout_p, seed, offset, q.device, slice(j0, j1))
            eZ = e * keep.to(wd) / (1.0 - dropout_p)
        l = l * alpha + e.sum(dim=-1, keepdim=True)
        mu = mu * alpha + (e * ts).sum(dim=-1, keepdim=True)
        acc = acc * alpha + eZ @ vb
        tacc = tacc * alpha + (eZ * ts) @ vb
        if tv is not None:
            tacc = tacc + eZ @ tv.narrow(-2, j0, j1 - j0)
        m = m_new
    seen = l > 0
    inv_l = torch.where(seen, 1.0 / torch.where(seen, l, torch.ones_like(l)), torch.zeros_like(l))
    out = acc * inv_l
    mu = mu * inv_l
    t_out = tacc * inv_l - mu * out
    lse_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return t_out.to(dtype), mu.squeeze(-1).to(lse_dtype)


def unpack_qkv(qkv: Tensor):
    """The ``(..., nh, T, hs)`` views of q, k and v inside a packed ``(..., T, 3, nh, hs)`` qkv."""
    return tuple(qkv.select(-3, i).transpose(-3, -2) for i in range(3))


def causal_attention_qkvpacked(
    qkv: Tensor, scale: float, dropout_p: float = 0.0, bottom_right: bool = False, seed: int = 0, offset: int = 0,
    window=(-1, 0),
):
    """:func:`causal_attention` on q, k, v packed as ``qkv`` ``(..., T, 3, nh, hs)`` (nanoGPT's
    ``c_attn(x).view(B, T, 3, nh, hs)``): returns ``(out (..., T, nh, hs), lse (..., nh, T))``."""
    q, k, v = unpack_qkv(qkv)
    out, lse = causal_attention(q, k, v, scale, dropout_p, bottom_right, seed, offset, window)  # (..., nh, T, hs)
    return out.transpose(-3, -2).contiguous(), lse


# ----------------------------------------------------------------------------- dropout


def dropout_keep_flat(shape, p: float, seed: int, offset: int, device=None) -> Tensor:
    """The boolean keep-mask of :func:`dropout` for a tensor of ``shape``.

    Element ``n`` (its row-major index) is kept iff the attention mask's hash of
    ``(seed, offset, b=n >> 32, t=0, j=n & (2**32 - 1))`` is ``>= floor(p * 2**32)``.
    """
    numel = 1
    for d in shape:
        numel *= d
    stream = dropout_stream_key(seed, offset)
    n = torch.arange(numel, dtype=torch.int64, device=device)
    hb = _fmix32((stream + _mul32(n >> 32, _BATCH_MUL)) & _M32)
    key = _fmix32(hb)  # row t = 0
    h = _fmix32((key + _mul32(n & _M32, _COL_MUL)) & _M32)
    threshold = int(min(p * 4294967296.0, 4294967295.0))
    return (h >= threshold).view(shape)


def dropout(x: Tensor, p: float, seed: int, offset: int) -> Tensor:
    """``x * (keep / (1 - p))`` with :func:`dropout_keep_flat`'s mask, scaled as torch's dropout scales."""
    keep = dropout_keep_flat(x.shape, p, seed, offset, x.device)
    return x * (keep.to(x.dtype) * (1.0 / (1.0 - p)))


# ----------------------------------------------------------------------------- nanoGPT's module


class NanoGPTCausalSelfAttention(nn.Module):
    """nanoGPT's ``CausalSelfAttention`` (karpathy/nanoGPT model.py), written as it is there:
    the oracle of ``attnext.nn.CausalSelfAttention`` in the tests and its peer in the
    benchmarks. ``flash=False``: the eager path (the ``(T, T)`` weights, the ``bias``
    mask buffer); ``flash=True``: the path nanoGPT takes with torch >= 2.0,
    ``F.scaled_dot_product_attention(..., is_causal=True)``, without the buffer.

    ``config``: ``n_embd``, ``n_head``, ``block_size``, ``dropout``, ``bias``. x: ``(B, T, C)``.
    """

    def __init__(self, config, flash: bool = False):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.flash = flash
        if not flash:
            n = config.block_size
            self.register_buffer("bias", torch.tril(torch.ones(n, n)).view(1, 1, n, n))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if self.flash:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=None, dropout_p=self.dropout if self.training else 0, is_causal=True
            )
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
            att = F.softmax(att, dim=-1)
            att = self.attn_dropout(att)
            y = att @ v  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))
