"""Drop-in attention modules backed by :func:`attnext.causal_attention`.

Parameter names follow the originals so their state_dicts load unchanged:

* :class:`Head` and :class:`MultiHeadAttention`: the lecture's (karpathy/ng-video-lecture
  ``gpt.py``): ``key``, ``query``, ``value``; ``heads.{i}.key/query/value``, ``proj``.
* :class:`CausalSelfAttention`: nanoGPT's ``model.py``: ``c_attn``, ``c_proj``.

The causal mask is never stored: the originals' ``tril`` / ``bias`` mask buffers are
accepted (and ignored) when loading their state_dicts. Attention dropout is fused
into the kernel and is off in eval mode; the other dropouts (after ``proj`` /
``c_proj``) are :class:`Dropout`, attnext's counter-based dropout.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ops import _CPU_CACHE_MIN_BYTES, causal_attention, causal_attention_qkvpacked, matmul
from .ops import dropout as _dropout


class Dropout(nn.Dropout):
    """``torch.nn.Dropout`` with attnext's counter-based mask (:func:`attnext.dropout`).

    Same arguments, attributes, train/eval behaviour and scaling as ``nn.Dropout``
    (an instance of it, so code that looks for ``nn.Dropout`` still finds it); the mask
    comes from a hash of a (seed, offset) drawn from torch's generator instead of a
    Bernoulli draw per element, which on the CPU is about 30x faster. ``inplace=True``
    is accepted and computes out of place.
    """

    def forward(self, x: Tensor) -> Tensor:
        return _dropout(x, self.p, self.training)


def _linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear(x, weight, bias)`` (x: ``(..., in)``, weight: ``(out, in)`` -> ``(..., out)``).

    Large outputs go through :func:`attnext.matmul`: on the CPU its outputs and
    gradients come from attnext's output cache, so the large activations of a training
    step reuse warm memory instead of page-faulting fresh allocations. Outputs under
    4 MiB, which the cache does not keep, go to ``F.linear`` itself: its autograd is
    C++ and its bias rides in the GEMM, where attnext.matmul's Python autograd
    costs tens of microseconds a step (nanoGPT's module at B = 4, T = 16, C = 64: the
    training step 502 -> 330 us, nanoGPT's own 308; Intel Xeon, torch 2.13).
    """
    if x.dim() == 0 or x.numel() // max(x.shape[-1], 1) * weight.shape[0] * x.element_size() < _CPU_CACHE_MIN_BYTES:
        return F.linear(x, weight, bias)
    y = matmul(x, weight.t())
    if bias is not None:
        y.add_(bias)  # in place: matmul saves its inputs, not its output
    return y


class _drop_mask_buffers:
    """A load_state_dict pre-hook that discards the originals' causal-mask buffers.

    A module-level class rather than a closure, so that modules holding it can be
    pickled whole (torch.save(module), copy.deepcopy, multiprocessing).
    """

    def __init__(self, names):
        self.names = tuple(names)

    def __call__(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        for name in self.names:
            state_dict.pop(prefix + name, None)


class Head(nn.Module):
    """One head of causal self-attention, as the lecture's ``Head``, fused.

    Args:
        n_embd: channels C of the input.
        head_size: hs, the size of each of key, query and value.
        block_size: the longest sequence the lecture's ``tril`` allowed; inputs longer
            than this are rejected as the lecture's module would.
        dropout: dropout on the attention weights (training mode only). Default 0.0.

    Input ``(B, T, C)`` with ``T <= block_size``, output ``(B, T, hs)``.
    """

    def __init__(self, n_embd: int, head_size: int, block_size: int, dropout: float = 0.0):
        super().__init__()
        self.key = nn.Linear(n_embd, head_size, bias=False)
        self.query = nn.Linear(n_embd, head_size, bias=False)
        self.value = nn.Linear(n_embd, head_size, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.block_size = block_size
        self._register_load_state_dict_pre_hook(_drop_mask_buffers(("tril",)))

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        if T > self.block_size:
            raise ValueError(f"attnext.nn.Head: sequence length {T} exceeds block_size {self.block_size}")
        k = self.key(x)  # (B, T, hs)
        q = self.query(x)  # (B, T, hs)
        v = self.value(x)  # (B, T, hs)
        p = self.dropout.p if self.training else 0.0
        return causal_attention(q, k, v, scale=k.shape[-1] ** -0.5, dropout_p=p)  # (B, T, hs)


class MultiHeadAttention(nn.Module):
    """The lecture's ``MultiHeadAttention``: all heads in one fused call.

    Args:
        num_heads: nh.
        head_size: hs of each head.
        n_embd: channels C of the input (and of the output, after ``proj``).
        block_size: the longest sequence allowed.
        dropout: dropout on the attention weights and after ``proj`` (training only).

    Input ``(B, T, C)``, output ``(B, T, C)``. The heads' key/query/value weights
    (``heads.{i}.key.weight`` ...) are stacked into one ``(3 * nh * hs, C)`` projection
    per call, whose output ``(B, T, 3, nh, hs)`` goes to
    :func:`attnext.causal_attention_qkvpacked` as it is: all heads in one call, the
    heads' outputs side by side without ``torch.cat``, and one ``(B, T, 3 * nh * hs)``
    gradient in the backward.
    """

    def __init__(self, num_heads: int, head_size: int, n_embd: int, block_size: int, dropout: float = 0.0):
        super().__init__()
        self.heads = nn.ModuleList([Head(n_embd, head_size, block_size, dropout) for _ in range(num_heads)])
        self.proj = nn.Linear(head_size * num_heads, n_embd)
        self.dropout = Dropout(dropout)
        self.num_heads = num_heads
        self.head_size = head_size
        self.block_size = block_size

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        if T > self.block_size:
            raise ValueError(
                f"attnext.nn.MultiHeadAttention: sequence length {T} exceeds block_size {self.block_size}"
            )
        nh, hs = self.num_heads, self.head_size
        w = torch.cat(
            [h.query.weight for h in self.heads] + [h.key.weight for h in self.heads] + [h.value.weight for h in self.heads]
        )  # (3 * nh * hs, C)
        qkv = _linear(x, w).view(B, T, 3, nh, hs)  # q, k, v of every head
        p = self.heads[0].dropout.p if self.training else 0.0
        out = causal_attention_qkvpacked(qkv, scale=hs**-0.5, dropout_p=p)  # (B, T, nh, hs)
        out = out.view(B, T, nh * hs)  # the heads side by side, as torch.cat(dim=-1)
        return self.dropout(_linear(out, self.proj.weight, self.proj.bias))


class CausalSelfAttention(nn.Module):
    """nanoGPT's ``CausalSelfAttention`` with the fused kernel.

    Construct with nanoGPT's ``config`` (any object with ``n_embd``, ``n_head``,
    ``block_size``, ``dropout``, ``bias``) or with those as keywords.

    Input ``(B, T, C)`` with ``C == n_embd`` and ``T <= block_size``, output ``(B, T, C)``.
    """

    def __init__(
        self,
        config=None,
        *,
        n_embd: int = None,
        n_head: int = None,
        block_size: int = None,
        dropout: float = 0.0,
        bias: bool = True,
    ):
        super().__init__()
        if config is not None:
            n_embd, n_head, block_size = config.n_embd, config.n_head, config.block_size
            dropout, bias = config.dropout, config.bias
        if n_embd is None or n_head is None or block_size is None:
            raise TypeError("attnext.nn.CausalSelfAttention: give a config or n_embd, n_head and block_size")
        if n_embd % n_head != 0:
            raise ValueError(f"attnext.nn.CausalSelfAttention: n_embd ({n_embd}) must be a multiple of n_head ({n_head})")
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.attn_dropout = nn.Dropout(dropout)
        self.resid_dropout = Dropout(dropout)
        self.n_head = n_head
        self.n_embd = n_embd
        self.dropout = dropout
        self.block_size = block_size
        self._register_load_state_dict_pre_hook(_drop_mask_buffers(("bias",)))

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.size()
        if T > self.block_size:
            raise ValueError(
                f"attnext.nn.CausalSelfAttention: sequence length {T} exceeds block_size {self.block_size}"
            )
        # c_attn's output (B, T, 3C) is q, k, v of every head: (B, T, 3, nh, hs) as it is
        qkv = _linear(x, self.c_attn.weight, self.c_attn.bias).view(B, T, 3, self.n_head, C // self.n_head)
        y = causal_attention_qkvpacked(qkv, dropout_p=self.dropout if self.training else 0.0)  # (B, T, nh, hs)
        y = y.view(B, T, C)  # re-assemble all head outputs side by side
        return self.resid_dropout(_linear(y, self.c_proj.weight, self.c_proj.bias))
