"""Plain eager torch, written like the lecture.

Every function here is both attnext's fallback (no compiled extension, a device or
dtype without a native kernel, ``ATTNEXT_DISABLE_KERNELS=1``) and the oracle the
tests compare the kernels against (in float64). Keep it obvious, not fast.
"""
from __future__ import annotations

import torch
from torch import Tensor


def causal_mask(T: int, S: int, bottom_right: bool = False, device=None) -> Tensor:
    """The ``(T, S)`` boolean mask of the keys each query may see.

    Top-left alignment (``bottom_right=False``, like ``torch.tril`` and SDPA's
    ``is_causal``): query row ``i`` sees key columns ``j <= i``.
    Bottom-right alignment (decoding with a cache): ``j <= i + S - T``, so the last
    query sees every key.
    """
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=(S - T) if bottom_right else 0)


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


def dropout_keep_mask(batch_shape, T: int, S: int, p: float, seed: int, offset: int, device=None) -> Tensor:
    """The ``(*batch_shape, T, S)`` boolean keep-mask of attention dropout with probability ``p``."""
    stream = dropout_stream_key(seed, offset)
    nb = 1
    for d in batch_shape:
        nb *= d
    b = torch.arange(nb, dtype=torch.int64, device=device).view(*batch_shape, 1, 1) & _M32
    t = torch.arange(T, dtype=torch.int64, device=device).view(T, 1)
    j = torch.arange(S, dtype=torch.int64, device=device)
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
):
    """The lecture's attention head on given q, k, v: returns ``(out, lse)``.

    q: ``(..., T, hs)``, k: ``(..., S, hs)``, v: ``(..., S, hs_v)``; out: ``(..., T, hs_v)``,
    lse: ``(..., T)`` the logsumexp of each row of scaled, masked scores (``-inf`` for a
    row that sees no key, whose output is 0). Dropout (``dropout_p > 0``) zeroes the
    weights :func:`dropout_keep_mask` drops and scales the others by ``1 / (1 - p)``.
    """
    T, S = q.shape[-2], k.shape[-2]
    tril = causal_mask(T, S, bottom_right, q.device)
    wei = (q @ k.transpose(-2, -1)) * scale  # (..., T, S)
    wei = wei.masked_fill(tril == 0, float("-inf"))
    lse = torch.logsumexp(wei, dim=-1)  # (..., T)
    wei = torch.softmax(wei, dim=-1)
    if bottom_right and T > S:
        wei = wei.masked_fill(~tril.any(dim=-1, keepdim=True), 0.0)
    if dropout_p > 0:
        keep = dropout_keep_mask(q.shape[:-2], T, S, dropout_p, seed, offset, q.device)
        wei = wei * keep.to(wei.dtype) / (1.0 - dropout_p)
    out = wei @ v  # (..., T, hs_v)
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return out, lse.to(lse_dtype)


def unpack_qkv(qkv: Tensor):
    """The ``(..., nh, T, hs)`` views of q, k and v inside a packed ``(..., T, 3, nh, hs)`` qkv."""
    return tuple(qkv.select(-3, i).transpose(-3, -2) for i in range(3))


def causal_attention_qkvpacked(
    qkv: Tensor, scale: float, dropout_p: float = 0.0, bottom_right: bool = False, seed: int = 0, offset: int = 0
):
    """:func:`causal_attention` on q, k, v packed as ``qkv`` ``(..., T, 3, nh, hs)`` (nanoGPT's
    ``c_attn(x).view(B, T, 3, nh, hs)``): returns ``(out (..., T, nh, hs), lse (..., nh, T))``."""
    q, k, v = unpack_qkv(qkv)
    out, lse = causal_attention(q, k, v, scale, dropout_p, bottom_right, seed, offset)  # (..., nh, T, hs)
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
