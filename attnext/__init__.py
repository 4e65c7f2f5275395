"""attnext: fast, exact causal attention ops for PyTorch.

Ops (also as ``torch.ops.attnext.*`` when the extension is built):
    causal_softmax(x, scale=1.0, *, align="top_left")
    matmul(a, b)           torch.matmul semantics, broadcast operands never copied
    causal_mean(x)         running mean over T ("the efficient bag of words")
    causal_attention(q, k, v, *, scale=None, dropout_p=0.0, align="top_left")
                           the fused attention head: no (T, S) matrix
    dropout(x, p=0.5, training=True)
                           dropout with a counter-based mask (fast on CPU)

Drop-in functions (attnext.functional), thin Python over causal_attention:
    scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                           scale=None, enable_gqa=False)   F.scaled_dot_product_attention's API
    varlen_attention(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, ...)
                           torch.nn.attention.varlen.varlen_attn's packed variable-length batches
Hugging Face transformers: attnext.integrations.transformers.register(), then attn_implementation="attnext".

Modules (attnext.nn): Head, MultiHeadAttention (the lecture's), CausalSelfAttention (nanoGPT's).

Native kernels run where they exist (CPU C++, CUDA); everything else runs the
eager reference in :mod:`attnext.reference`. ``attnext.explain(op, *tensors)``
says why an input would take the fallback. Large CPU outputs come from a cache
of freed buffers: ``attnext.cpu_cache_info()``, ``attnext.empty_cpu_cache()``.
"""
from .ops import (
    _C,
    causal_attention,
    causal_attention_qkvpacked,
    causal_mean,
    causal_softmax,
    cpu_cache_info,
    dropout,
    empty_cpu_cache,
    explain,
    kernels_enabled,
    matmul,
    set_kernels_enabled,
)
from . import nn  # noqa: E402  (after .ops: the modules call the public ops)
from . import functional  # noqa: E402
from .functional import scaled_dot_product_attention, varlen_attention  # noqa: E402

__version__ = "0.2.0"


def native_available() -> bool:
    """Whether the compiled extension ``attnext._C`` loaded."""
    return _C is not None


__all__ = [
    "causal_attention",
    "causal_attention_qkvpacked",
    "causal_mean",
    "causal_softmax",
    "cpu_cache_info",
    "dropout",
    "empty_cpu_cache",
    "explain",
    "functional",
    "kernels_enabled",
    "matmul",
    "native_available",
    "nn",
    "scaled_dot_product_attention",
    "set_kernels_enabled",
    "varlen_attention",
    "__version__",
]
