"""attnext as a Hugging Face transformers attention implementation.

    import attnext.integrations.transformers as attnext_hf
    attnext_hf.register()                     # once, before the model is built
    model = AutoModelForCausalLM.from_config(config, attn_implementation="attnext")

:func:`attention_forward` keeps transformers' own ``sdpa_attention_forward``
calling convention (module, query ``(B, H, T, E)``, key/value ``(B, Hkv, S, E)``,
attention_mask, dropout, scaling, is_causal, ...; returns ``((B, T, H, Ev), None)``)
and its masks (``register`` gives the name transformers' ``sdpa_mask``, so the model
builds the same 4-D boolean masks for it as for ``"sdpa"``).

attnext's kernel runs where the call is:

* no mask: causal (top-left, prefill) or full attention (one decoded token), as sdpa's
  ``is_causal`` rule;
* a boolean ``(B or 1, 1, T, S)`` mask that, in each batch entry, is padding (a
  contiguous range of valid keys: left padding, right padding without a cache) and a
  causal band, top-left or bottom-right (KV-cache decoding), optionally a sliding window:
  each entry's valid keys are sliced (views) and runs of entries with the same band are
  one call;

with grouped-query heads read in place (no ``repeat_kv``). Everything else (float or
per-head masks, other patterns, ``position_bias``, ``softcap``, dtypes or devices
without an attnext kernel such as float16 on the CPU) is handed to
``sdpa_attention_forward`` itself, unchanged; :func:`explain` says why for a call, and
:data:`stats` counts both paths.

Results equal sdpa's to rounding. Rows that see no key (the padding rows of a
left-padded prefill) are zeros in both. Dropout uses attnext's mask (a different
random stream from torch's). Recognising a mask reads it on the host (one sync; the
result is cached for the next layers while the same mask tensor is passed), so
``torch.compile`` sees a graph break there.
"""
from __future__ import annotations

import weakref
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import ops
from ..functional import Band, match_band
from ..ops import causal_attention

__all__ = ["register", "attention_forward", "explain", "stats"]

#: How many calls ran attnext's kernel ("attnext") and how many sdpa ("sdpa").
stats = {"attnext": 0, "sdpa": 0}

_mask_cache: dict = {}  # "key": (weakref to the mask, version, T, S), "plan": its bands or reason


def register(name: str = "attnext") -> str:
    """Register :func:`attention_forward` in transformers' ``AttentionInterface`` (and
    transformers' sdpa mask builder in its ``AttentionMaskInterface``) under ``name``, so
    ``attn_implementation=name`` works in ``from_pretrained``/``from_config`` and
    ``model.set_attn_implementation``. Returns ``name``. Needs ``transformers`` (the
    ``attnext[hf]`` extra)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


def _mask_bands(mask: Tensor) -> Tuple[Optional[List[Band]], str]:
    """One band per batch entry of a (B, 1, T, S) boolean mask, or the reason there is none."""
    key = (mask.shape, mask._version, mask.data_ptr())
    ref = _mask_cache.get("ref")
    if ref is not None and ref() is mask and _mask_cache.get("key") == key:
        return _mask_cache["plan"]
    bands: Optional[List[Band]] = []
    why = ""
    for b in range(mask.shape[0]):
        band = match_band(mask[b, 0], allow_key_range=True)
        if band is None:
            bands, why = None, f"the mask of batch entry {b} is not padding plus a causal or sliding-window band"
            break
        bands.append(band)
    _mask_cache.update(ref=weakref.ref(mask), key=key, plan=(bands, why))
    return bands, why


def _plan(module, query, key, value, attention_mask, is_causal, kwargs, dropout=0.0):
    """(reasons sdpa must run, or the list of (batch range, band) calls)."""
    if not dropout and ops._small_sdpa_call(query, key):
        return [f"a small call (query elements x keys < {ops._SDPA_SMALL_WORK}, ATTNEXT_SDPA_SMALL_WORK): "
                "sdpa costs less per call than attnext's Python layers"], None
    if kwargs.get("position_bias") is not None:
        return ["position_bias (an additive float bias)"], None
    if kwargs.get("softcap") is not None:
        return ["softcap (sdpa raises)"], None
    if kwargs.get("output_attentions", False):
        return ["output_attentions=True"], None
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return ["query, key and value are not 4-D (B, heads, T, head size)"], None
    B, Hq, T, _ = query.shape
    S = key.shape[2]
    Hkv = key.shape[1]
    if value.shape[1] != Hkv or Hkv == 0 or Hq % Hkv != 0:
        return [f"{Hq} query heads over {Hkv} key and {value.shape[1]} value heads"], None
    if key.shape[0] != B or value.shape[0] != B:
        return ["query, key and value batch sizes differ"], None
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = T > 1 and attention_mask is None and is_causal  # sdpa_attention_forward's rule
    if attention_mask is None:
        bands = [(0, B, Band(False, (-1, 0) if is_causal else (-1, -1), 0, S))]
    else:
        if not isinstance(attention_mask, Tensor) or attention_mask.dtype != torch.bool:
            return ["the attention mask is not a boolean tensor"], None
        if attention_mask.dim() != 4 or attention_mask.shape[1] != 1 or attention_mask.shape[0] not in (1, B) \
                or tuple(attention_mask.shape[2:]) != (T, S):
            return [f"the attention mask has shape {tuple(attention_mask.shape)}, not (B or 1, 1, T, S)"], None
        per_entry, why = _mask_bands(attention_mask)
        if per_entry is None:
            return [why], None
        if len(per_entry) == 1:
            per_entry = per_entry * B
        bands, b0 = [], 0
        for b in range(1, B + 1):
            if b == B or per_entry[b] != per_entry[b0]:
                bands.append((b0, b, per_entry[b0]))
                b0 = b
    reasons = []
    if not ops._attention_native_cpu(query):
        for _, _, band in bands[:1]:
            reasons += ops._fallback_reasons("causal_attention", (query, key, value), window=band.window)
    if reasons:
        return [f"attnext would run its eager fallback: {r}" for r in reasons], None
    return [], bands


def explain(module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
            is_causal: Optional[bool] = None, **kwargs) -> List[str]:
    """Why :func:`attention_forward` with these arguments would run transformers' sdpa
    instead of attnext's kernel (empty: attnext runs)."""
    reasons, _ = _plan(module, query, key, value, attention_mask, is_causal, kwargs, kwargs.get("dropout", 0.0))
    return reasons


def attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Optional[Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    is_causal: Optional[bool] = None,
    **kwargs,
) -> Tuple[Tensor, None]:
    """transformers' attention-function convention (as ``sdpa_attention_forward``) on attnext.

    query ``(B, H, T, E)``, key ``(B, Hkv, S, E)``, value ``(B, Hkv, S, Ev)`` (``H`` a
    multiple of ``Hkv``: grouped-query heads, read in place), ``attention_mask`` ``None`` or
    the 4-D boolean mask of ``sdpa_mask``, ``dropout`` the attention dropout (0 in eval),
    ``scaling`` (``None``: ``E ** -0.5``), ``is_causal`` (``None``: ``module.is_causal``).
    Returns ``(attn_output (B, T, H, Ev) contiguous, None)``.
    """
    reasons, bands = _plan(module, query, key, value, attention_mask, is_causal, kwargs, dropout)
    if reasons:
        stats["sdpa"] += 1
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    stats["attnext"] += 1
    gqa = query.shape[1] != key.shape[1]
    outs = []
    B, S = query.shape[0], key.shape[2]
    for b0, b1, band in bands:
        q, k, v = query, key, value
        if (b0, b1) != (0, B):
            q, k, v = q[b0:b1], k[b0:b1], v[b0:b1]
        if (band.lo, band.hi) != (0, S):
            k, v = k[:, :, band.lo:band.hi], v[:, :, band.lo:band.hi]
        window = ops._window_constant(band.window)  # causal_attention's fast path knows its own tuples
        outs.append(causal_attention(
            q, k, v, scale=None if scaling is None else float(scaling), dropout_p=float(dropout),
            align="bottom_right" if band.bottom_right else "top_left", enable_gqa=gqa, window_size=window,
        ))  # (b1 - b0, H, T, Ev)
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out.transpose(1, 2).contiguous(), None
