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
