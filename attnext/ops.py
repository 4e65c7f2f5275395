"""attnext's public ops: typed functions, fake kernels, autograd, and the choice
between a native kernel and the eager fallback in :mod:`attnext.reference`.

Per op, in this order: the public function (docstring with every shape and
default), ``register_fake`` for the op and its backward, then ``setup_context`` +
``register_autograd``.
"""
from __future__ import annotations

import math
import os
import warnings
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _autograd, reference
from ._autograd import call as _call

try:
    from . import _C  # noqa: F401  (importing it registers torch.ops.attnext.*)

    _C_ERROR = None
except (ImportError, OSError) as e:  # not built, or built against another torch
    _C = None
    _C_ERROR = f"{type(e).__name__}: {e}"

_BUILD_HINT = (
    "build it with `pip install --no-build-isolation .` (or `-e .`) in an environment that has torch, "
    "a C++ compiler and ninja; see the README"
)

# Dtypes the native kernels take, per device type. Anything else goes to reference.py.
_KERNEL_DTYPES = {
    "cpu": frozenset({torch.float32, torch.float64, torch.bfloat16, torch.float16}),
    "cuda": frozenset({torch.float32, torch.float64, torch.bfloat16, torch.float16}),
    "meta": frozenset({torch.float32, torch.float64, torch.bfloat16, torch.float16}),
}
# Ops whose native kernels take fewer dtypes than the table above.
_ATTENTION_DTYPES = {
    "cpu": frozenset({torch.float32, torch.float64, torch.bfloat16}),
    "cuda": frozenset({torch.float32, torch.float64, torch.bfloat16, torch.float16}),
    "meta": frozenset({torch.float32, torch.float64, torch.bfloat16, torch.float16}),
}
# Device types whose attention kernels take window_size other than causal (-1, 0).
_WINDOW_DEVICES = frozenset({"cpu", "cuda", "meta"})
_CAUSAL_WINDOW = (-1, 0)  # window_size's default
_FULL_WINDOW = (-1, -1)  # every key (the SDPA-signature wrapper's unmasked calls)
_ZERO_TYPES = (float, int)  # a dropout_p the fast path takes (not bool: that is rejected)
_ATTENTION_CPU_DTYPES = _ATTENTION_DTYPES["cpu"]
_CPU_CACHE_MIN_BYTES = 4 << 20  # the CPU output cache's smallest output (output_cache.cpp, kMinBytes)
_STRIDED = torch.strided
_OP_KERNEL_DTYPES = {"causal_attention": _ATTENTION_DTYPES, "causal_attention_qkvpacked": _ATTENTION_DTYPES}
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA", "meta": "Meta"}


def _has_op(op: str) -> bool:
    """Whether the loaded ``_C`` defines ``attnext::<op>`` (a stale build may lack newer ops)."""
    return _C is not None and hasattr(torch.ops.attnext, op)


def _registered_devices(op: str) -> frozenset:
    """Device types with a kernel for ``attnext::<op>`` in the dispatcher (read once, at import)."""
    if _C is None or not _has_op(op):
        return frozenset()
    return frozenset(
        dev for dev, key in _DISPATCH_KEYS.items() if torch._C._dispatch_has_kernel_for_dispatch_key(f"attnext::{op}", key)
    )


_kernels_enabled = os.environ.get("ATTNEXT_DISABLE_KERNELS", "0").strip().lower() in ("", "0", "false", "no", "off")
_warned_no_C = False
_DEVICES = {}  # op -> device types with a registered kernel; filled after the ops are registered


def set_kernels_enabled(enabled: bool) -> None:
    """Turn the native kernels on or off for this process (the fallback is :mod:`attnext.reference`).

    ``ATTNEXT_DISABLE_KERNELS=1`` in the environment when attnext is imported does the same.
    """
    global _kernels_enabled
    _kernels_enabled = bool(enabled)


def kernels_enabled() -> bool:
    """Whether native kernels may be used (see :func:`set_kernels_enabled`)."""
    return _kernels_enabled


def cpu_cache_info() -> dict:
    """The native CPU kernels' output cache: ``cached_bytes`` held now, ``limit_bytes``, ``hits``, ``misses``.

    CPU outputs of 4 MiB and more are allocated from a cache of freed output buffers,
    so that a training loop reuses warm memory instead of page-faulting a fresh
    mapping every step (as PyTorch's CUDA caching allocator does on the GPU). Only
    free buffers are held, at most ``ATTNEXT_CPU_CACHE_MB`` MiB (default 1024; 0
    disables it). All zeros when the extension is not built.
    """
    if not _has_op("_cpu_cache_info"):
        return {"cached_bytes": 0, "limit_bytes": 0, "hits": 0, "misses": 0}
    cached, limit, hits, misses = torch.ops.attnext._cpu_cache_info()
    return {"cached_bytes": cached, "limit_bytes": limit, "hits": hits, "misses": misses}


def empty_cpu_cache() -> None:
    """Free the buffers held by the CPU output cache (see :func:`cpu_cache_info`)."""
    if _has_op("_cpu_cache_empty"):
        torch.ops.attnext._cpu_cache_empty()


def _fallback_reasons(op: str, tensors: Sequence[Tensor], window: Tuple[int, int] = (-1, 0)) -> List[str]:
    """Why ``op`` cannot run its native kernel on these tensors (and, for attention, this
    window_size); empty: it can."""
    global _warned_no_C
    reasons = []
    if _C is None:
        reasons.append(f"the compiled extension attnext._C is not available ({_C_ERROR}); {_BUILD_HINT}")
        if not _warned_no_C:
            _warned_no_C = True
            warnings.warn(
                f"attnext: native kernels unavailable, using the eager fallback ({_C_ERROR}); {_BUILD_HINT}",
                RuntimeWarning,
                stacklevel=3,
            )
        return reasons
    if not _kernels_enabled:
        reasons.append("native kernels are disabled (ATTNEXT_DISABLE_KERNELS=1 or attnext.set_kernels_enabled(False))")
    devices = _DEVICES.get(op, frozenset())
    dtypes = _OP_KERNEL_DTYPES.get(op, _KERNEL_DTYPES)
    for t in tensors:
        dev = t.device.type
        if dev not in devices:
            reasons.append(f"attnext::{op} has no native kernel for device type '{dev}' in this build")
        elif t.dtype not in dtypes.get(dev, ()):
            reasons.append(f"attnext::{op} has no native {dev} kernel for dtype {t.dtype}")
        elif tuple(window) != (-1, 0) and dev not in _WINDOW_DEVICES:
            reasons.append(
                f"attnext::{op} has no native {dev} kernel for window_size={tuple(window)} (only causal, (-1, 0)); "
                "the CPU and CUDA kernels take any window"
            )
    return list(dict.fromkeys(reasons))


class Explanation(list):
    """What :func:`explain` returns: the list of reasons the eager fallback would run
    (empty: the native kernel runs), and in ``.kernels`` which native kernels run and
    why, where attnext chose between its own kernel and a library's on this CPU."""

    def __init__(self, reasons: Sequence[str], kernels: Sequence[str] = ()):
        super().__init__(reasons)
        self.kernels = list(kernels)

    def __repr__(self) -> str:
        return f"Explanation(fallback={list(self)!r}, kernels={self.kernels!r})"


def _head_size_class(hs: int) -> str:
    """The head-size class of the float32 attention GEMM choice (csrc/cpu/gemm_f32.cpp)."""
    return "head size <= 64" if hs <= 64 else "head size <= 128" if hs <= 128 else "head size > 128"


def _kernel_notes(op: str, tensors: Sequence[Tensor]) -> List[str]:
    """Which native kernel ``op`` runs on these tensors, where that is a choice made by
    measurement on this CPU (csrc/cpu/kernel_choice.h): the verdicts made so far that
    apply to this op and dtype."""
    if not tensors or not all(isinstance(t, Tensor) for t in tensors):
        return []
    t = tensors[0]
    if t.device.type != "cpu" or not _has_op("_kernel_choices"):
        return []
    dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16"}.get(t.dtype)
    attention = op in ("causal_attention", "causal_attention_qkvpacked")
    to_torch = op == "matmul" and len(tensors) == 2 and _matmul_to_torch(*tensors)
    notes = []
    for c in torch.ops.attnext._kernel_choices():
        if dtype == "float32" and c.startswith("float32 GEMM, matmul") and op == "matmul" and not to_torch:
            notes.append(c)
        elif dtype == "float32" and c.startswith("float32 GEMM, attention tiles") and attention:
            if t.dim() >= 1 and _head_size_class(t.shape[-1]) in c:  # q's or qkv's last dim: hs
                notes.append(c)
        elif attention and dtype is not None and c.startswith("attention ") and f", {dtype}," in c:
            notes.append(c)
    if to_torch:
        notes.append(
            "b is a matrix or vector and the product is under 4 MiB: torch.matmul itself (torch folds a's "
            "batch into one GEMM, so there is no broadcast copy to save, and its autograd is C++)"
        )
    if op == "causal_attention" and t.dim() >= 2 and t.shape[-2] <= 16:
        notes.append(
            "T <= 16 query rows without dropout: the CPU decode pass (K and V streamed once, keys split "
            "across threads when batch x heads cannot fill them; ATTNEXT_DECODE=0 turns it off)"
        )
        if dtype == "bfloat16":
            notes.append(
                "T <= 16 query rows, bfloat16 backward: on CPUs with AMX, AMX tiles only for T >= 8 with "
                "T x S > 2048 (they pad every tile to 64 rows); the AVX512-BF16 tiles below that"
            )
    return notes


def explain(op: str, *tensors: Tensor, window_size: Tuple[int, int] = (-1, 0)) -> Explanation:
    """Why ``attnext.<op>(*tensors)`` would take the eager fallback instead of a native kernel.

    Returns a list of human-readable reasons; an empty list means the native kernel runs.
    Its ``.kernels`` attribute says which native kernel runs where attnext chooses by
    measuring both on this CPU at first use of a workload class (its own float32 GEMM
    or the BLAS; its attention tiles or ATen's flash attention), and the decode pass.
    bfloat16 attention tiles are named by what runs them: "attnext tiles (AVX512-BF16
    dot products)", "(AMX brgemm)", "(Arm BF16 dot products, BFDOT)", or plain "attnext
    tiles" where they are widened to float.
    Verdicts appear once the workload has run. ``window_size``: the attention window the call would use (see
    :func:`causal_attention`). Example: ``attnext.explain("causal_softmax", x)``.
    """
    if op not in _PUBLIC_OPS:
        raise ValueError(f"attnext.explain: unknown op {op!r}; expected one of {sorted(_PUBLIC_OPS)}")
    reasons = _fallback_reasons(op, tensors, window=_check_window(window_size))
    return Explanation(reasons, [] if reasons else _kernel_notes(op, tensors))


def _check_tensor(x, name: str, min_dim: int, shape: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"attnext: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.layout != torch.strided:
        raise RuntimeError(f"attnext: {name} must be a dense (strided) tensor, got layout {x.layout}")
    if not x.dtype.is_floating_point:
        raise RuntimeError(
            f"attnext: {name} must be a floating-point tensor (float32, float64, bfloat16 or float16), got {x.dtype}"
        )
    if x.dim() < min_dim:
        raise RuntimeError(f"attnext: {name} must have at least {min_dim} dims {shape}, got shape {tuple(x.shape)}")


def _check_scale(scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"attnext: scale must be a Python number, got {type(scale).__name__}")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"attnext: scale must be a finite number, got {scale}")
    return scale


def _sdpa_small_work() -> int:
    env = os.environ.get("ATTNEXT_SDPA_SMALL_WORK", "").strip()
    if env:
        try:
            return max(0, int(env))
        except ValueError:
            warnings.warn(f"attnext: ignoring ATTNEXT_SDPA_SMALL_WORK={env!r} (expected a whole number)", RuntimeWarning)
    return 3 << 19


# Calls through the SDPA-signature entry points (attnext.functional's
# scaled_dot_product_attention, the Hugging Face attention function) with no dropout and
# q.numel() x S below this go to torch's SDPA: their Python layers cost attnext about
# 7 us a call more than SDPA's, more than its kernel saves on such work. Measured on the
# Intel Xeon (torch 2.13, float32): one token against 32 keys, 8 heads of 64 (16K):
# 14.6 us against SDPA's 9.3; (1, 4, 32, 32, 64) causal (256K) 23.1 against 14.0;
# (2, 4, 48, 48, 64) (1.2M) 41.6 against 39.4; (1, 8, 64, 64, 64) (2.1M) 52.7 against
# 59.5. ATTNEXT_SDPA_SMALL_WORK sets it (0: never); read at import.
_SDPA_SMALL_WORK = _sdpa_small_work()


def _small_sdpa_call(query: Tensor, key: Tensor) -> bool:
    """Whether an SDPA-signature call on these tensors is small enough for torch's SDPA
    to take it (see _SDPA_SMALL_WORK); False for anything that is not a tensor of >= 2 dims."""
    return (
        isinstance(query, Tensor) and isinstance(key, Tensor) and query.dim() >= 2 and key.dim() >= 2
        and query.numel() * key.shape[-2] < _SDPA_SMALL_WORK
    )


def _attention_native_cpu(q: Tensor) -> bool:
    """Whether causal_attention's native CPU kernel takes ``q``'s device and dtype (k and v
    alike): what _fallback_reasons would find nothing against, without building its list."""
    return _kernels_enabled and _attention_cpu_ok and q.is_cpu and q.dtype in _ATTENTION_CPU_DTYPES


def _default_scale(hs: int) -> float:
    """``scale=None``: ``hs ** -0.5``; 1.0 for ``hs == 0``, whose scores are all 0 whatever
    the scale (the causal mean of v, as SDPA gives) where ``0 ** -0.5`` would raise."""
    return hs**-0.5 if hs > 0 else 1.0


def _window_constant(window: Tuple[int, int]) -> Tuple[int, int]:
    """A (left, right) window of ints as causal_attention's fast path knows it: the causal
    and full windows as this module's own tuples (it takes them by identity)."""
    if window == _CAUSAL_WINDOW:
        return _CAUSAL_WINDOW
    return _FULL_WINDOW if window == _FULL_WINDOW else window


def _bottom_right(align: str) -> bool:
    if align == "top_left":
        return False
    if align == "bottom_right":
        return True
    raise ValueError(f"attnext: align must be 'top_left' or 'bottom_right', got {align!r}")


# ----------------------------------------------------------------------------- causal_softmax


def causal_softmax(x: Tensor, scale: float = 1.0, *, align: str = "top_left") -> Tensor:
    """Causal masked softmax: ``softmax(x * scale)`` over the last dim, future keys masked.

    Args:
        x: ``(..., T, S)`` attention scores, any number of batch dims (including none),
            float32/float64/bfloat16/float16, any strides.
        scale: multiplies ``x`` before the softmax (fused; e.g. ``head_size ** -0.5``).
            Any finite number. Default 1.0.
        align: ``"top_left"`` (default; like ``torch.tril`` and SDPA's ``is_causal``):
            query row ``i`` sees key columns ``j <= i``. ``"bottom_right"`` (decoding
            with a KV cache): ``j <= i + S - T``, so the last query sees every key.

    Returns:
        ``(..., T, S)`` contiguous, same dtype as ``x``: equal to
        ``torch.softmax((x * scale).masked_fill(~mask, -inf), -1)``. Entries above the
        diagonal are 0. A row that sees no key at all (bottom-right with ``T > S``) is
        all zeros, never NaN. NaN or +/-inf inside the visible part behave as in
        ``torch.softmax`` of the masked input: where torch's row is NaN, the whole
        row (masked entries included) is NaN. Masked entries are never read.

    Reduced-precision inputs are computed in float32 and rounded once. Differentiable
    (the backward is ``torch.ops.attnext._causal_softmax_backward``, itself
    differentiable, so double backward works).
    """
    bottom_right = _bottom_right(align)
    _check_tensor(x, "x", 2, "(..., T, S)")
    scale = _check_scale(scale)
    if _fallback_reasons("causal_softmax", (x,)):
        return reference.causal_softmax(x, scale, bottom_right)
    return _call("causal_softmax", x, scale, bottom_right)


def _causal_softmax_fake(x, scale=1.0, bottom_right=False):
    torch._check(x.dim() >= 2, lambda: f"attnext: x must have at least 2 dims (..., T, S), got {x.dim()}")
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _causal_softmax_backward_fake(grad_y, y, scale=1.0, bottom_right=False):
    torch._check(grad_y.shape == y.shape, lambda: "attnext: grad_y must have the shape of y")
    return torch.empty_like(y, memory_format=torch.contiguous_format)


def _causal_softmax_setup_context(ctx, inputs, output):
    _, scale, bottom_right = inputs
    ctx.scale = scale
    ctx.bottom_right = bottom_right
    ctx.save_for_backward(output)
    _autograd.save_for_forward(ctx, output)


def _causal_softmax_bwd(ctx, grad_y):
    (y,) = ctx.saved_tensors
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = _call("_causal_softmax_backward", grad_y, y, ctx.scale, ctx.bottom_right)
    return grad_x, None, None


def _causal_softmax_jvp(ctx, tx, *_):
    """ty = s * y * (tx - <tx, y>) on the visible part: the softmax Jacobian is symmetric,
    so the tangent is the backward op applied to tx (native, no extra memory)."""
    (y,) = ctx.saved_tensors
    return _call("_causal_softmax_backward", tx, y, ctx.scale, ctx.bottom_right)


def _causal_softmax_vmap(info, in_dims, x, scale, bottom_right):
    return _autograd.vmap_fold(info, in_dims, (x, scale, bottom_right), "causal_softmax")


def _causal_softmax_backward_setup_context(ctx, inputs, output):
    grad_y, y, scale, bottom_right = inputs
    ctx.scale = scale
    ctx.bottom_right = bottom_right
    ctx.save_for_backward(grad_y, y)
    _autograd.save_for_forward(ctx, grad_y, y)


def _visible(*tensors, bottom_right: bool):
    """The tensors with everything above the causal diagonal set to 0 (None stays None)."""
    ref = next(t for t in tensors if t is not None)
    keep = reference.causal_mask(ref.shape[-2], ref.shape[-1], bottom_right, ref.device)
    return tuple(None if t is None else t.masked_fill(~keep, 0.0) for t in tensors)


def _softmax_bwd_in_y(grad_y, y, t, s, br):
    """The derivative of dx = s * y * (dy - <dy, y>) in y along t (visible part):
    s * (t * (dy - <dy, y>) - y * <dy, t>)."""
    dy, yv, tv = _visible(grad_y, y, t, bottom_right=br)
    return s * (tv * (dy - (dy * yv).sum(-1, keepdim=True)) - yv * (dy * tv).sum(-1, keepdim=True))


def _causal_softmax_backward_bwd(ctx, gg):
    """Double backward: dx = s * y * (dy - <dy, y>) is linear in dy, bilinear in (dy, y)."""
    grad_y, y = ctx.saved_tensors
    s, br = ctx.scale, ctx.bottom_right
    g_grad_y = g_y = None
    if ctx.needs_input_grad[0]:
        # d/d(dy) is the backward op itself applied to gg.
        g_grad_y = _call("_causal_softmax_backward", gg, y, s, br)
    if ctx.needs_input_grad[1]:
        dy, yv, ggv = _visible(grad_y, y, gg, bottom_right=br)
        g_y = s * (ggv * (dy - (dy * yv).sum(-1, keepdim=True)) - dy * (ggv * yv).sum(-1, keepdim=True))
    return g_grad_y, g_y, None, None


def _causal_softmax_backward_jvp(ctx, t_grad_y, t_y, *_):
    grad_y, y = ctx.saved_tensors
    s, br = ctx.scale, ctx.bottom_right
    out = None
    if t_grad_y is not None:
        out = _call("_causal_softmax_backward", t_grad_y, y, s, br)
    if t_y is not None:
        term = _softmax_bwd_in_y(grad_y, y, t_y, s, br)
        out = term if out is None else out + term
    return torch.zeros_like(y) if out is None else out


def _causal_softmax_backward_vmap(info, in_dims, grad_y, y, scale, bottom_right):
    return _autograd.vmap_fold(info, in_dims, (grad_y, y, scale, bottom_right), "_causal_softmax_backward")


# ----------------------------------------------------------------------------- matmul


def matmul(a: Tensor, b: Tensor) -> Tensor:
    """``torch.matmul(a, b)`` without materialising broadcast operands.

    Shapes (exactly torch.matmul's):
        * ``(k) @ (k) -> ()``: dot product.
        * ``(m, k) @ (k) -> (m)`` and ``(..., m, k) @ (k) -> (..., m)``: matrix-vector,
          the vector's appended dim removed from the result.
        * ``(k) @ (k, n) -> (n)`` and ``(k) @ (..., k, n) -> (..., n)``: vector-matrix,
          the vector's prepended dim removed.
        * ``(m, k) @ (k, n) -> (m, n)``.
        * ``(*A, m, k) @ (*B, k, n) -> (*broadcast(A, B), m, n)``: batch dims are
          right-aligned and broadcast both ways (size 1 or missing against any size),
          e.g. ``(3, 1, 2, 2) @ (5, 2, 3) -> (3, 5, 2, 3)``.
        Size-0 dims give empty results (or zeros when ``k == 0``).

    Args:
        a, b: float32/float64/bfloat16/float16 tensors of the same dtype and device,
            at least 1-D, any strides (transposed and sliced views are read in place when
            a GEMM can take their strides; an operand with neither of its last two dims
            unit-stride is copied).

    Returns:
        A new contiguous tensor of the dtype of ``a`` and ``b``; the only memory the
        native kernel allocates. Incompatible shapes, mixed dtypes or devices and 0-D
        inputs raise ``RuntimeError``. Other dtypes (integers, complex) and devices
        without a kernel run ``torch.matmul`` (see :func:`explain`).

    Differentiable; the backward is ``torch.ops.attnext._matmul_backward``, which
    accumulates the gradient of a broadcast operand over the batch it was broadcast
    along with GEMMs (no expanded product), and is itself differentiable.
    """
    if not (isinstance(a, Tensor) and isinstance(b, Tensor)):
        raise TypeError(
            f"attnext.matmul: a and b must be torch.Tensors, got {type(a).__name__} and {type(b).__name__}"
        )
    # Fast path (the tiny lecture case is all overhead): exactly the inputs for which
    # _fallback_reasons would return [] on the CPU.
    if _kernels_enabled and _matmul_cpu_ok and a.is_cpu and b.is_cpu and a.dtype == b.dtype and a.dtype in _CPU_DTYPES:
        if torch.compiler.is_compiling():
            return _matmul_op(a, b)
        if _matmul_to_torch(a, b):
            return torch.matmul(a, b)
        if not (a.requires_grad or b.requires_grad or _autograd.derivative_context()):
            # Nothing to differentiate: skip the Autograd kernel's Python wrapper (about
            # half the cost of a tiny call), as that wrapper itself would.
            with torch._C._AutoDispatchBelowAutograd():
                return _matmul_op(a, b)
        return _call("matmul", a, b)
    if a.dtype != b.dtype:
        raise RuntimeError(f"attnext: matmul: a and b must have the same dtype, got {a.dtype} and {b.dtype}")
    if a.device != b.device:
        raise RuntimeError(f"attnext: matmul: a and b must be on the same device, got {a.device} and {b.device}")
    if _fallback_reasons("matmul", (a, b)):
        _matmul_shape(a.shape, b.shape)  # our error message on the fallback path too
        return reference.matmul(a, b)
    return _call("matmul", a, b)


def _matmul_to_torch(a: Tensor, b: Tensor) -> bool:
    """Whether a CPU ``a @ b`` goes to ``torch.matmul`` itself: ``b`` a matrix or a vector
    (torch folds ``a``'s batch into the rows of one GEMM: there is no broadcast copy to
    save) and a product under 4 MiB (which attnext's output cache would not keep).
    There the same BLAS call with C++ autograd beats attnext's op by its Python
    overhead: (16, 64, 64) @ (64, 64) forward+backward 0.90x, (4, 8, 16) @ (16, 32)
    0.75x, (1, 256, 256) @ (256, 256) 0.88x torch's (Intel Xeon, torch 2.13). Shapes
    that do not match stay with attnext's op, for its error message."""
    if b.dim() == 0 or b.dim() > 2 or a.dim() == 0 or a.shape[-1] != b.shape[0]:
        return False
    rows = math.prod(a.shape[:-1])
    cols = b.shape[-1] if b.dim() == 2 else 1
    return rows * cols * a.element_size() < _CPU_CACHE_MIN_BYTES


def _matmul_shape(sa, sb) -> List[int]:
    """torch.matmul's result shape for operand shapes ``sa`` and ``sb``; raises on a mismatch."""
    if len(sa) == 0 or len(sb) == 0:
        raise RuntimeError(
            "attnext: matmul: a and b must have at least 1 dim (a vector or a (batch of) matrices), "
            f"got shapes {tuple(sa)} and {tuple(sb)}"
        )
    a_vec, b_vec = len(sa) == 1, len(sb) == 1
    a2 = (1, *sa) if a_vec else tuple(sa)
    b2 = (*sb, 1) if b_vec else tuple(sb)
    torch._check(
        a2[-1] == b2[-2],
        lambda: f"attnext: matmul: shapes {tuple(sa)} and {tuple(sb)} cannot be multiplied: a's last dim "
        f"({a2[-1]}) must equal b's {'only' if b_vec else 'second-to-last'} dim ({b2[-2]})",
    )
    try:
        batch = list(torch.broadcast_shapes(a2[:-2], b2[:-2]))
    except RuntimeError:
        raise RuntimeError(
            f"attnext: matmul: batch dims of a {tuple(sa)} and b {tuple(sb)} do not broadcast"
        ) from None
    return batch + ([] if a_vec else [a2[-2]]) + ([] if b_vec else [b2[-1]])


def _matmul_fake(a, b):
    torch._check(a.dtype == b.dtype, lambda: "attnext: matmul: a and b must have the same dtype")
    return a.new_empty(_matmul_shape(a.shape, b.shape))


def _matmul_backward_fake(grad, a, b, output_mask):
    torch._check(
        list(grad.shape) == _matmul_shape(a.shape, b.shape), lambda: "attnext: matmul backward: bad grad shape"
    )
    return (
        a.new_empty(a.shape if output_mask[0] else (0,)),
        b.new_empty(b.shape if output_mask[1] else (0,)),
    )


def _matmul_setup_context(ctx, inputs, output):
    a, b = inputs
    ctx.save_for_backward(a, b)
    _autograd.save_for_forward(ctx, a, b)


def _matmul_bwd(ctx, grad):
    a, b = ctx.saved_tensors
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1]]
    grad_a, grad_b = _call("_matmul_backward", grad, a, b, mask)
    return (grad_a if mask[0] else None), (grad_b if mask[1] else None)


def _sum_tangents(*terms):
    """The sum of the terms that are not None (None when all are)."""
    out = None
    for t in terms:
        if t is not None:
            out = t if out is None else out + t
    return out


def _matmul_jvp(ctx, ta, tb):
    """t(a @ b) = ta @ b + a @ tb, each broadcast exactly as the product was."""
    a, b = ctx.saved_tensors
    out = _sum_tangents(
        None if ta is None else _call("matmul", ta, b),
        None if tb is None else _call("matmul", a, tb),
    )
    return out


def _matmul_vmap(info, in_dims, a, b):
    """Both operands matrices (or batches of them): the vmapped dim goes first and the
    operand with fewer batch dims gets size-1 dims after it, so torch.matmul's
    right-aligned broadcasting still pairs the logical batch dims; one call. A vector
    operand (its meaning depends on its rank) runs once per slice."""
    da, db = in_dims
    ra = a.dim() - (da is not None)
    rb = b.dim() - (db is not None)
    if ra < 2 or rb < 2:
        return _autograd.vmap_loop(info, in_dims, (a, b), "matmul")
    nb = max(ra, rb) - 2  # logical batch dims after broadcasting

    def lift(x, d, r):
        if d is None:
            return x  # broadcasts against the vmapped dim as a missing leading dim
        x = x.movedim(d, 0)
        return x.reshape(x.shape[0], *([1] * (nb - (r - 2))), *x.shape[1:])

    return _call("matmul", lift(a, da, ra), lift(b, db, rb)), 0


def _matmul_backward_setup_context(ctx, inputs, output):
    grad, a, b, output_mask = inputs
    ctx.output_mask = list(output_mask)
    ctx.save_for_backward(grad, a, b)
    _autograd.save_for_forward(ctx, grad, a, b)


def _matmul_backward_bwd(ctx, gg_a, gg_b):
    """Double backward. grad_a = G @ B^T and grad_b = A^T @ G (each reduced over its
    broadcast batch) are bilinear, so every term is matmul or its backward again."""
    grad, a, b = ctx.saved_tensors
    use_a = ctx.output_mask[0] and gg_a is not None
    use_b = ctx.output_mask[1] and gg_b is not None
    d_grad = d_a = d_b = None
    if ctx.needs_input_grad[0]:
        d_grad = _sum_tangents(
            _call("matmul", gg_a, b) if use_a else None,
            _call("matmul", a, gg_b) if use_b else None,
        )
        if d_grad is None:
            d_grad = torch.zeros_like(grad)
    if ctx.needs_input_grad[1] and use_b:  # grad_b = A^T G: its derivative in A is G @ gg_b^T
        d_a = _call("_matmul_backward", grad, a, gg_b, [True, False])[0]
    if ctx.needs_input_grad[2] and use_a:  # grad_a = G B^T: its derivative in B is gg_a^T @ G
        d_b = _call("_matmul_backward", grad, gg_a, b, [False, True])[1]
    return d_grad, d_a, d_b, None


def _matmul_backward_jvp(ctx, t_grad, ta, tb, _mask):
    """grad_a = G B^T and grad_b = A^T G (each reduced over its broadcast batch) are
    bilinear: t(grad_a) = tG B^T + G tB^T, t(grad_b) = tA^T G + A^T tG."""
    grad, a, b = ctx.saved_tensors
    mask = ctx.output_mask
    from_g = _call("_matmul_backward", t_grad, a, b, mask) if t_grad is not None else (None, None)
    t_ga = t_gb = None
    if mask[0]:
        t_ga = _sum_tangents(from_g[0], None if tb is None else _call("_matmul_backward", grad, a, tb, [True, False])[0])
    if mask[1]:
        t_gb = _sum_tangents(from_g[1], None if ta is None else _call("_matmul_backward", grad, ta, b, [False, True])[1])
    t_ga = a.new_zeros(a.shape if mask[0] else (0,)) if t_ga is None else t_ga
    t_gb = b.new_zeros(b.shape if mask[1] else (0,)) if t_gb is None else t_gb
    return t_ga, t_gb


def _matmul_backward_vmap(info, in_dims, grad, a, b, output_mask):
    return _autograd.vmap_loop(info, in_dims, (grad, a, b, output_mask), "_matmul_backward")


# ----------------------------------------------------------------------------- causal_mean


def causal_mean(x: Tensor) -> Tensor:
    """The lecture's "efficient bag of words": each position's mean over itself and the past.

    Args:
        x: ``(..., T, C)``, any number of batch dims (including none),
            float32/float64/bfloat16/float16, any strides.

    Returns:
        ``(..., T, C)`` contiguous, same dtype: ``y[..., t, :] = x[..., :t+1, :].mean(-2)``,
        equal to ``(tril / tril.sum(1, keepdim=True)) @ x`` with ``tril`` the ``(T, T)``
        lower-triangular ones, but O(T * C) (a running sum) instead of O(T^2 * C).
        The running sums are kept in float64, so a float32 result is rounded once.

    Differentiable (backward ``torch.ops.attnext._causal_mean_backward``, the reverse
    running sum; double backward is ``causal_mean`` again).
    """
    _check_tensor(x, "x", 2, "(..., T, C)")
    if _fallback_reasons("causal_mean", (x,)):
        return reference.causal_mean(x)
    return _call("causal_mean", x)


def _causal_mean_fake(x):
    torch._check(x.dim() >= 2, lambda: f"attnext: x must have at least 2 dims (..., T, C), got {x.dim()}")
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _causal_mean_backward_fake(grad_y):
    torch._check(grad_y.dim() >= 2, lambda: "attnext: grad_y must have at least 2 dims (..., T, C)")
    return torch.empty_like(grad_y, memory_format=torch.contiguous_format)


def _causal_mean_setup_context(ctx, inputs, output):
    pass  # linear: the backward needs nothing saved


def _causal_mean_bwd(ctx, grad_y):
    return _call("_causal_mean_backward", grad_y) if ctx.needs_input_grad[0] else None


def _causal_mean_backward_bwd(ctx, gg):
    """The backward is linear in grad_y with the transposed weights: its backward is causal_mean."""
    return _call("causal_mean", gg) if ctx.needs_input_grad[0] else None


def _causal_mean_jvp(ctx, tx):
    """Linear: the tangent is the op applied to the tangent."""
    return _call("causal_mean", tx)


def _causal_mean_backward_jvp(ctx, t):
    return _call("_causal_mean_backward", t)


def _causal_mean_vmap(info, in_dims, x):
    return _autograd.vmap_fold(info, in_dims, (x,), "causal_mean")


def _causal_mean_backward_vmap(info, in_dims, grad_y):
    return _autograd.vmap_fold(info, in_dims, (grad_y,), "_causal_mean_backward")


_PUBLIC_OPS = {
    "causal_softmax": "_causal_softmax_backward",
    "matmul": "_matmul_backward",
    "causal_mean": "_causal_mean_backward",
    "causal_attention": "_causal_attention_backward",
    "dropout": "dropout",  # its own backward: the same mask applied to the gradient
    "causal_attention_qkvpacked": "_causal_attention_qkvpacked_backward",
}
# ----------------------------------------------------------------------------- causal_attention


def _check_attention_args(q, k, v, dropout_p) -> float:
    _check_tensor(q, "q", 2, "(..., T, hs)")
    _check_tensor(k, "k", 2, "(..., S, hs)")
    _check_tensor(v, "v", 2, "(..., S, hs_v)")
    for name, t in (("k", k), ("v", v)):
        if t.device != q.device:
            raise RuntimeError(f"attnext: q and {name} must be on the same device, got {q.device} and {t.device}")
        if t.dtype != q.dtype:
            raise RuntimeError(f"attnext: q and {name} must have the same dtype, got {q.dtype} and {t.dtype}")
    err = _attention_shape_error(q, k, v)
    if err is not None:
        raise RuntimeError(err)
    return _check_dropout_p(dropout_p)


def _attention_shape_error(q, k, v) -> Optional[str]:
    """What is wrong with the shapes of q, k, v (None: nothing), worded as the C++ kernels'
    check_attention_args words it. One source for the public function's error and the fake
    kernel's, so eager calls, the kernels and torch.compile reject the same inputs with the
    same message."""
    for name, t, shape in (("q", q, "(..., T, hs)"), ("k", k, "(..., S, hs)"), ("v", v, "(..., S, hs_v)")):
        if t.dim() < 2:
            return f"attnext: {name} must have at least 2 dims {shape}, got shape {list(t.shape)}"
    if not (q.shape[:-2] == k.shape[:-2] == v.shape[:-2]):
        return (
            "attnext: q, k and v must have the same batch dims, got "
            f"q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}"
        )
    if q.shape[-1] != k.shape[-1]:
        return f"attnext: q and k must have the same head size (last dim), got q {list(q.shape)} and k {list(k.shape)}"
    if k.shape[-2] != v.shape[-2]:
        return (
            f"attnext: k and v must have the same number of keys (dim -2), got k {list(k.shape)} and v {list(v.shape)}"
        )
    return None


def _check_dropout_p(dropout_p) -> float:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"attnext: dropout_p must be a Python number, got {type(dropout_p).__name__}")
    dropout_p = float(dropout_p)
    if not (0.0 <= dropout_p < 1.0):
        raise ValueError(f"attnext: dropout_p must be in [0, 1), got {dropout_p}")
    return dropout_p


def _draw_dropout_seed(generator: Optional[torch.Generator]) -> Tuple[int, int]:
    """(seed, offset) for one dropout call, drawn from ``generator`` (default: torch's CPU generator)."""
    # out-of-place randint (torch.compile traces it; in-place random_ it does not)
    seed, offset = torch.randint(-(2**63), 2**63 - 1, (2,), dtype=torch.int64, generator=generator).tolist()
    return seed, offset


def _draw_dropout(device: torch.device, generator: Optional[torch.Generator]) -> Tuple[int, int, Optional[Tensor]]:
    """(seed, offset, rng) for one dropout call on tensors of ``device``.

    CUDA tensors with a CUDA generator (or none given): ``rng`` is an int64 ``[seed,
    offset]`` tensor drawn on the GPU by torch's CUDA generator (Philox), which the
    kernels read there, and the ints are 0: no host sync, and a CUDA graph that
    captured the call draws a new mask on every replay, as torch's own dropout does.
    Otherwise (seed, offset) are drawn on the host from ``generator`` (default torch's
    CPU generator) and ``rng`` is None.
    """
    if device.type == "cuda" and (generator is None or generator.device.type == "cuda"):
        rng = torch.randint(-(2**63), 2**63 - 1, (2,), dtype=torch.int64, device=device, generator=generator)
        return 0, 0, rng
    if not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active():
        # Under torch.func.vmap(randomness="different") the draw is one seed per slice: keep
        # it a tensor, which the per-slice batching rule of the op hands to each slice.
        rng = torch.randint(-(2**63), 2**63 - 1, (2,), dtype=torch.int64, generator=generator)
        return 0, 0, rng
    seed, offset = _draw_dropout_seed(generator)
    return seed, offset, None


def _host_seed(seed: int, offset: int, rng: Optional[Tensor]) -> Tuple[int, int]:
    """The (seed, offset) values of a call, for the eager reference (reads rng: a sync)."""
    if rng is None:
        return seed, offset
    try:
        return tuple(rng.tolist())
    except RuntimeError as e:  # a seed per vmap slice reaching code that needs one value
        raise RuntimeError(
            "attnext: dropout with a different mask per torch.func.vmap slice (randomness='different') is "
            "supported by the native kernels' forward and first-order backward only; use randomness='same' here"
        ) from e


def _window_input(inputs, index: int) -> Tuple[int, int]:
    """The (window_left, window_right) arguments of an op call's inputs (default causal)."""
    return (inputs[index] if len(inputs) > index else -1, inputs[index + 1] if len(inputs) > index + 1 else 0)


def _rng_input(inputs, index: int) -> Optional[Tensor]:
    """The optional rng argument of an op call's inputs (absent when the caller left it out)."""
    return inputs[index] if len(inputs) > index else None


def causal_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    align: str = "top_left",
    generator: Optional[torch.Generator] = None,
    enable_gqa: bool = False,
    window_size: Tuple[int, int] = _CAUSAL_WINDOW,
) -> Tensor:
    """Fused causal attention head: ``dropout(softmax(q @ k^T * scale, causal)) @ v``.

    The ``(T, S)`` weight matrix is never materialised (memory ``O(T * hs)`` per batch).

    Args:
        q: ``(..., T, hs)`` queries, any number of batch dims (the lecture's
            ``(B, T, hs)``, nanoGPT's ``(B, nh, T, hs)``), float32/float64/bfloat16
            natively, and float16 on CUDA (other floating dtypes run the eager
            fallback), any strides (views such as
            ``x.view(B, T, nh, hs).transpose(1, 2)`` are read in place). On CUDA
            (sm_80+) float16/bfloat16 run on tensor cores, and so does float32, as TF32,
            when torch allows TF32 for CUDA matmuls
            (``torch.backends.cuda.matmul.fp32_precision = "tf32"``, ``allow_tf32``
            or ``torch.set_float32_matmul_precision("high")``); otherwise float32 is
            exact, as are the CPU kernels.
        k: ``(..., S, hs)`` keys: same batch dims, dtype and device as ``q``, same ``hs``.
        v: ``(..., S, hs_v)`` values; ``hs_v`` may differ from ``hs``.
        scale: multiplies ``q @ k^T``; ``None`` (default) means ``hs ** -0.5`` (1 when
            ``hs == 0``, where every score is 0: the causal mean of ``v``, as SDPA gives).
        dropout_p: probability of zeroing each attention weight after the softmax
            (kept weights are scaled by ``1 / (1 - dropout_p)``), in ``[0, 1)``.
            Default 0.0: no dropout and no extra cost. Pass 0.0 in eval mode.
        align: ``"top_left"`` (default; like ``torch.tril`` and SDPA's ``is_causal``):
            query ``i`` sees keys ``j <= i``. ``"bottom_right"`` (decoding with a
            KV cache): ``j <= i + S - T``.
        generator: where the dropout mask's (seed, offset) are drawn from; default
            torch's default generator of ``q``'s device, so ``torch.manual_seed`` makes
            a training step reproducible. On CUDA the draw stays on the GPU (an int64
            ``rng`` tensor the kernels read), so CUDA-graph capture replays fresh
            masks. Unused when ``dropout_p == 0``.
        enable_gqa: grouped-query (and multi-query) attention, as
            ``F.scaled_dot_product_attention(..., enable_gqa=True)``: q is
            ``(..., H, T, hs)``, k and v ``(..., Hkv, S, hs)`` with ``H % Hkv == 0``,
            and query head ``h`` uses key/value head ``h // (H // Hkv)``. K and V are
            never repeated: the kernels read them through stride-0 views (decoding
            streams each key/value head once for its whole group); their gradients
            are summed over each group. Default False: q, k, v need equal batch dims.
        window_size: ``(left, right)``, the keys each query sees around its diagonal
            key ``d`` (``d = i`` top-left, ``i + S - T`` bottom-right): ``d - left <= j
            <= d + right``, ``-1`` meaning no limit on that side (FlashAttention's
            convention). Default ``(-1, 0)``: causal. ``(W, 0)``: a causal sliding
            window of ``W + 1`` keys (Mistral, Gemma); key tiles wholly outside it
            are never touched, so the cost grows as ``T * W``. ``(-1, -1)``: full,
            non-causal attention (every key).

    Returns:
        ``(..., T, hs_v)`` contiguous, same dtype as ``q``. A query that sees no key
        (bottom-right with ``T > S``, or outside its window) gets a zero row.

    Differentiable in ``q``, ``k`` and ``v``: the backward
    (``torch.ops.attnext._causal_attention_backward``) recomputes the weights from the
    saved per-row logsumexp and regenerates the forward's dropout mask from the same
    (seed, offset). The mask is a counter-based hash of (seed, offset, batch, row,
    column), identical in the native kernel and the fallback. Under
    ``torch.compile(fullgraph=True)`` drawing the seed (an unbacked SymInt) needs
    ``torch._dynamo.config.capture_scalar_outputs = True`` when ``dropout_p > 0``.
    """
    bottom_right = _bottom_right(align)
    # the windows the fast path takes, known by identity (a caller's own tuple, which
    # might hold floats or bools, is checked)
    window = window_size if (window_size is _CAUSAL_WINDOW or window_size is _FULL_WINDOW) else None
    wl, wr = _check_window(window_size) if window is None else window
    if enable_gqa:
        q, k, v = _gqa_views(q, k, v)  # (..., Hkv, g, T, hs), k and v expanded over g
    # Fast path: the common call (causal or full window, no dropout, plain tensors of
    # one kernel dtype on the CPU) goes straight to the kernel, whose own checks
    # (csrc/common.h check_attention_args) word every shape error as
    # _check_attention_args does. The Python checks below cost about 6 us, as much
    # as the whole of a small call (B = 1, one head, T = 16: 16.4 -> 10 us; SDPA 5.8).
    if (
        window is not None and not torch.compiler.is_compiling()  # (traced: the checked path)
        and dropout_p.__class__ in _ZERO_TYPES and dropout_p == 0
        and (scale is None or scale.__class__ is float) and _kernels_enabled and _attention_cpu_ok
        and q.__class__ is Tensor and k.__class__ is Tensor and v.__class__ is Tensor
        and q.is_cpu and k.is_cpu and v.is_cpu and q.dtype in _ATTENTION_CPU_DTYPES
        and k.dtype == q.dtype and v.dtype == q.dtype and q.layout == _STRIDED and k.layout == _STRIDED
        and v.layout == _STRIDED and q.dim() >= 2 and k.dim() >= 2 and v.dim() >= 2
    ):
        if scale is None:
            scale = _default_scale(q.shape[-1])
        elif not math.isfinite(scale):
            raise ValueError(f"attnext: scale must be a finite number, got {scale}")
        out = _call("causal_attention", q, k, v, scale, 0.0, bottom_right, 0, 0, None, wl, wr)[0]
        return out.flatten(-4, -3) if enable_gqa else out
    dropout_p = _check_attention_args(q, k, v, dropout_p)
    scale = _default_scale(q.shape[-1]) if scale is None else _check_scale(scale)
    seed, offset, rng = 0, 0, None
    if dropout_p > 0:
        seed, offset, rng = _draw_dropout(q.device, generator)
    if _fallback_reasons("causal_attention", (q, k, v), window=(wl, wr)):
        hs = _host_seed(seed, offset, rng)
        out, _ = reference.causal_attention(q, k, v, scale, dropout_p, bottom_right, *hs, window=(wl, wr))
    else:
        out, _ = _call("causal_attention", q, k, v, scale, dropout_p, bottom_right, seed, offset, rng, wl, wr)
    return out.flatten(-4, -3) if enable_gqa else out


def _check_window(window_size) -> Tuple[int, int]:
    """window_size as two ints >= -1 (see :func:`causal_attention`)."""
    ok = isinstance(window_size, (tuple, list)) and len(window_size) == 2
    ok = ok and all(isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in window_size)
    if not ok:
        raise ValueError(
            "attnext: window_size must be a pair (left, right) of ints >= -1 (-1: no limit on that side; "
            f"(-1, 0) causal, (W, 0) a sliding window, (-1, -1) full attention), got {window_size!r}"
        )
    return int(window_size[0]), int(window_size[1])


def _gqa_views(q: Tensor, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Grouped-query heads as plain batch dims, without copies: q ``(..., H, T, hs)`` seen as
    ``(..., Hkv, g, T, hs)`` and k, v ``(..., Hkv, S, hs)`` expanded to ``(..., Hkv, g, S, hs)``
    (stride 0 over g), so query head ``h`` meets key/value head ``h // g``."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(t, name, 3, "(..., heads, T or S, head size) with enable_gqa=True")
    H, Hkv = q.shape[-3], k.shape[-3]
    if v.shape[-3] != Hkv:
        raise RuntimeError(
            f"attnext: k and v must have the same number of heads (dim -3), got k {list(k.shape)} and v {list(v.shape)}"
        )
    if Hkv == 0 or H % Hkv != 0:
        raise RuntimeError(
            "attnext: with enable_gqa=True the number of query heads (q's dim -3) must be a multiple of the number "
            f"of key/value heads (k's dim -3), got q {list(q.shape)} and k {list(k.shape)}"
        )
    g = H // Hkv
    q = q.unflatten(-3, (Hkv, g))
    k = k.unsqueeze(-3).expand(*k.shape[:-2], g, *k.shape[-2:])
    v = v.unsqueeze(-3).expand(*v.shape[:-2], g, *v.shape[-2:])
    return q, k, v


def _causal_attention_fake(q, k, v, scale, dropout_p=0.0, bottom_right=False, seed=0, offset=0, rng=None,
                           window_left=-1, window_right=0):
    err = _attention_shape_error(q, k, v)
    torch._check(err is None, lambda: err)
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))
    lse = q.new_empty(q.shape[:-1], dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
    return out, lse


def _causal_attention_backward_fake(grad_out, q, k, v, out, lse, scale, dropout_p=0.0, bottom_right=False, seed=0,
                                    offset=0, rng=None, window_left=-1, window_right=0):
    torch._check(grad_out.shape == out.shape, lambda: "attnext: grad_out must have the shape of out")
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        torch.empty_like(k, memory_format=torch.contiguous_format),
        torch.empty_like(v, memory_format=torch.contiguous_format),
    )


def _causal_attention_setup_context(ctx, inputs, output):
    q, k, v, scale, dropout_p, bottom_right, seed, offset = inputs[:8]
    out, lse = output
    ctx.args = (scale, dropout_p, bottom_right, seed, offset)
    ctx.window = _window_input(inputs, 9)
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, _rng_input(inputs, 8))
    _autograd.save_for_forward(ctx, q, k, v, _rng_input(inputs, 8))


def _attention_grads(ctx, grad_out, q, k, v, out, lse, rng):
    """(grad_q, grad_k, grad_v): the native backward for a first derivative; when the
    backward is itself differentiated (create_graph=True, forward-over-reverse, torch.func
    transforms), the differentiable recompute :func:`reference.causal_attention_grads`
    (it builds the (T, S) weights: memory as the eager head's backward)."""
    scale, dropout_p, bottom_right, seed, offset = ctx.args
    if _autograd.higher_order_requested():
        return reference.causal_attention_grads(
            grad_out, q, k, v, scale, dropout_p, bottom_right, *_host_seed(seed, offset, rng), window=ctx.window
        )
    return _call("_causal_attention_backward", grad_out, q, k, v, out, lse, *ctx.args, rng, *ctx.window)


def _causal_attention_bwd(ctx, grad_out, grad_lse):
    q, k, v, out, lse, rng = ctx.saved_tensors
    gq = gk = gv = None
    if any(ctx.needs_input_grad[:3]):
        gq, gk, gv = _attention_grads(ctx, grad_out, q, k, v, out, lse, rng)
        gq = gq if ctx.needs_input_grad[0] else None
        gk = gk if ctx.needs_input_grad[1] else None
        gv = gv if ctx.needs_input_grad[2] else None
    return gq, gk, gv, None, None, None, None, None, None, None, None


def _causal_attention_jvp(ctx, tq, tk, tv, *_):
    """Forward mode without the (T, S) matrix: :func:`reference.causal_attention_jvp`
    streams key blocks with the online softmax (memory O(T * block) per batch)."""
    q, k, v, rng = ctx.saved_tensors
    scale, dropout_p, bottom_right, seed, offset = ctx.args
    t_out, _ = reference.causal_attention_jvp(
        q, k, v, tq, tk, tv, scale, dropout_p, bottom_right, *_host_seed(seed, offset, rng), window=ctx.window
    )
    return t_out, None


def _attention_vmap(name: str, dropout_index: int):
    """Batching rule of an attention op: fold the vmapped dim into the batch dims, except
    with dropout, whose mask hashes the linear batch index (then once per slice, so every
    slice keeps the mask it has outside vmap)."""

    def rule(info, in_dims, *args):
        if args[dropout_index] > 0:
            return _autograd.vmap_loop(info, in_dims, args, name)
        return _autograd.vmap_fold(info, in_dims, args, name)

    return rule


def _no_derivative(name: str, public: str):
    """Backward and forward-mode rules of an op that has no derivative of its own: a clear error."""

    def rule(ctx, *_):
        raise RuntimeError(
            f"attnext: torch.ops.attnext.{name} is not differentiable on its own; differentiate "
            f"attnext.{public} instead (its backward switches to a differentiable recompute when a "
            "higher-order derivative is requested)"
        )

    return rule


def _save_nothing(ctx, inputs, output):
    pass


def _varlen_attention_fake(q, k, v, cu_seq_q, cu_seq_k, seqused_k, scale, window_left=-1, window_right=-1):
    torch._check(q.dim() == 3 and k.dim() == 3 and v.dim() == 3, lambda: "attnext: query, key and value must be 3-D")
    out = q.new_empty((q.shape[0], q.shape[1], v.shape[2]))
    lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
    return out, lse


def _varlen_attention_backward_fake(grad_out, q, k, v, out, lse, cu_seq_q, cu_seq_k, seqused_k, scale,
                                    window_left=-1, window_right=-1):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _no_vmap(name: str, public: str):
    def rule(info, in_dims, *args):
        raise RuntimeError(f"attnext: torch.ops.attnext.{name} has no vmap rule; call attnext.{public} under vmap")

    return rule


def causal_attention_qkvpacked(
    qkv: Tensor,
    *,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    align: str = "top_left",
    generator: Optional[torch.Generator] = None,
    window_size: Tuple[int, int] = (-1, 0),
) -> Tensor:
    """:func:`causal_attention` with q, k and v packed in one tensor, as a fused
    projection produces them (nanoGPT's ``c_attn(x).view(B, T, 3, nh, hs)``).

    Args:
        qkv: ``(..., T, 3, nh, hs)``: ``qkv[..., 0, :, :]`` are the queries,
            ``[..., 1, :, :]`` the keys and ``[..., 2, :, :]`` the values of ``nh`` heads
            (at least 4 dims; any strides; dtypes as :func:`causal_attention`).
        scale, dropout_p, align, generator, window_size: as :func:`causal_attention`;
            ``scale=None`` means ``hs ** -0.5`` (1 when ``hs == 0``).

    Returns:
        ``out`` ``(..., T, nh, hs)``, contiguous: head ``h``'s output at
        ``out[..., h, :]``, so ``out.view(..., T, nh * hs)`` is the heads side by side
        (``torch.cat`` over heads) without a copy. Equal to
        ``causal_attention(q, k, v).transpose(-3, -2)`` on the views
        ``q = qkv[..., 0, :, :].transpose(-3, -2)`` (and k, v alike), dropout mask
        included (the same (seed, offset) draws the same mask).

    Differentiable: the backward
    (``torch.ops.attnext._causal_attention_qkvpacked_backward``) returns one
    ``(..., T, 3, nh, hs)`` gradient, where separate q, k, v inputs would have
    their three gradients concatenated by autograd.
    """
    _check_tensor(qkv, "qkv", 4, "(..., T, 3, nh, hs)")
    if qkv.shape[-3] != 3:
        raise RuntimeError(
            "attnext: qkv must have size 3 in dim -3 (q, k and v of shape (..., T, 3, nh, hs)), "
            f"got shape {tuple(qkv.shape)}"
        )
    bottom_right = _bottom_right(align)
    wl, wr = _check_window(window_size)
    dropout_p = _check_dropout_p(dropout_p)
    scale = _default_scale(qkv.shape[-1]) if scale is None else _check_scale(scale)
    seed, offset, rng = 0, 0, None
    if dropout_p > 0:
        seed, offset, rng = _draw_dropout(qkv.device, generator)
    if _fallback_reasons("causal_attention_qkvpacked", (qkv,), window=(wl, wr)):
        hs = _host_seed(seed, offset, rng)
        out, _ = reference.causal_attention_qkvpacked(qkv, scale, dropout_p, bottom_right, *hs, window=(wl, wr))
        return out
    out, _ = _call("causal_attention_qkvpacked", qkv, scale, dropout_p, bottom_right, seed, offset, rng, wl, wr)
    return out


def _qkvpacked_check(qkv):
    torch._check(qkv.dim() >= 4, lambda: f"attnext: qkv must have at least 4 dims (..., T, 3, nh, hs), got {qkv.dim()}")
    torch._check(qkv.shape[-3] == 3, lambda: "attnext: qkv must have size 3 in dim -3 (..., T, 3, nh, hs)")


def _causal_attention_qkvpacked_fake(qkv, scale, dropout_p=0.0, bottom_right=False, seed=0, offset=0, rng=None,
                                     window_left=-1, window_right=0):
    _qkvpacked_check(qkv)
    *batch, T, _, nh, hs = qkv.shape
    out = qkv.new_empty((*batch, T, nh, hs))
    lse = qkv.new_empty((*batch, nh, T), dtype=torch.float64 if qkv.dtype == torch.float64 else torch.float32)
    return out, lse


def _causal_attention_qkvpacked_backward_fake(grad_out, qkv, out, lse, scale, dropout_p=0.0, bottom_right=False,
                                              seed=0, offset=0, rng=None, window_left=-1, window_right=0):
    _qkvpacked_check(qkv)
    torch._check(grad_out.shape == out.shape, lambda: "attnext: grad_out must have the shape of out")
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


def _causal_attention_qkvpacked_setup_context(ctx, inputs, output):
    qkv, scale, dropout_p, bottom_right, seed, offset = inputs[:6]
    out, lse = output
    ctx.args = (scale, dropout_p, bottom_right, seed, offset)
    ctx.window = _window_input(inputs, 7)
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(qkv, out, lse, _rng_input(inputs, 6))
    _autograd.save_for_forward(ctx, qkv, _rng_input(inputs, 6))


def _causal_attention_qkvpacked_bwd(ctx, grad_out, grad_lse):
    qkv, out, lse, rng = ctx.saved_tensors
    gqkv = None
    if ctx.needs_input_grad[0]:
        if _autograd.higher_order_requested():  # as _attention_grads, on the q, k, v views
            scale, dropout_p, bottom_right, seed, offset = ctx.args
            grads = reference.causal_attention_grads(
                grad_out.transpose(-3, -2), *reference.unpack_qkv(qkv), scale, dropout_p, bottom_right,
                *_host_seed(seed, offset, rng), window=ctx.window,
            )  # 3 x (..., nh, T, hs)
            gqkv = torch.stack([g.transpose(-3, -2) for g in grads], dim=-3)  # (..., T, 3, nh, hs)
        else:
            gqkv = _call("_causal_attention_qkvpacked_backward", grad_out, qkv, out, lse, *ctx.args, rng, *ctx.window)
    return gqkv, None, None, None, None, None, None, None, None


def _causal_attention_qkvpacked_jvp(ctx, tqkv, *_):
    qkv, rng = ctx.saved_tensors
    scale, dropout_p, bottom_right, seed, offset = ctx.args
    t_out, _ = reference.causal_attention_jvp(
        *reference.unpack_qkv(qkv), *reference.unpack_qkv(tqkv), scale, dropout_p, bottom_right,
        *_host_seed(seed, offset, rng), window=ctx.window,
    )  # (..., nh, T, hs)
    return t_out.transpose(-3, -2).contiguous(), None


# ----------------------------------------------------------------------------- dropout


def dropout(x: Tensor, p: float = 0.5, training: bool = True, *, generator: Optional[torch.Generator] = None) -> Tensor:
    """Dropout as ``torch.nn.functional.dropout``: zero each element with probability ``p``,
    scale the others by ``1 / (1 - p)``.

    Args:
        x: any shape, floating dtype, any strides.
        p: in ``[0, 1]``. ``p == 0`` or ``training=False`` returns ``x`` itself (as torch
            does); ``p == 1`` returns zeros.
        training: apply dropout only when true.
        generator: where the mask's (seed, offset) are drawn from; default torch's default
            generator of ``x``'s device, so ``torch.manual_seed`` makes a step reproducible
            (on CUDA drawn on the GPU: CUDA-graph capture replays fresh masks).

    Returns:
        A new contiguous tensor of ``x``'s shape and dtype. The mask is a counter-based
        hash of (seed, offset, element index) rather than a Bernoulli draw per element
        (torch's CPU dropout measured 35 ms for 6.3M floats on the dev VM; this one
        about 2 ms); the same on CPU, CUDA and in the fallback
        (:func:`attnext.reference.dropout`). Differentiable: the backward applies the
        same mask to the gradient (the op is its own backward, so double backward works).
    """
    _check_tensor(x, "x", 0, "")
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"attnext: dropout p must be a Python number, got {type(p).__name__}")
    p = float(p)
    if not (0.0 <= p <= 1.0):
        raise ValueError(f"attnext: dropout p must be in [0, 1], got {p}")
    if not training or p == 0.0:
        return x
    if p == 1.0:
        return x * 0.0
    seed, offset, rng = _draw_dropout(x.device, generator)
    if _fallback_reasons("dropout", (x,)):
        return reference.dropout(x, p, *_host_seed(seed, offset, rng))
    return _call("dropout", x, p, seed, offset, rng)


def _dropout_fake(x, p, seed, offset, rng=None):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _dropout_setup_context(ctx, inputs, output):
    _, ctx.p, ctx.seed, ctx.offset = inputs[:4]
    ctx.save_for_backward(_rng_input(inputs, 4))
    _autograd.save_for_forward(ctx, _rng_input(inputs, 4))


def _dropout_bwd(ctx, grad):
    if not ctx.needs_input_grad[0]:
        return None, None, None, None, None
    (rng,) = ctx.saved_tensors
    return _call("dropout", grad, ctx.p, ctx.seed, ctx.offset, rng), None, None, None, None


def _dropout_jvp(ctx, tx, *_):
    """Linear in x: the same mask applied to the tangent."""
    (rng,) = ctx.saved_tensors
    return _call("dropout", tx, ctx.p, ctx.seed, ctx.offset, rng)


def _dropout_vmap(info, in_dims, *args):
    # The mask hashes each element's row-major index: once per slice keeps every
    # slice's mask what it is outside vmap.
    return _autograd.vmap_loop(info, in_dims, args, "dropout")


# Every op's fake kernel and derivative rules (reverse, forward, vmap: see attnext/_autograd.py).
if _has_op("causal_softmax"):
    torch.library.register_fake("attnext::causal_softmax")(_causal_softmax_fake)
    torch.library.register_fake("attnext::_causal_softmax_backward")(_causal_softmax_backward_fake)
    _autograd.register(
        "causal_softmax", setup_context=_causal_softmax_setup_context, backward=_causal_softmax_bwd,
        jvp=_causal_softmax_jvp, vmap=_causal_softmax_vmap,
    )
    _autograd.register(
        "_causal_softmax_backward", setup_context=_causal_softmax_backward_setup_context,
        backward=_causal_softmax_backward_bwd, jvp=_causal_softmax_backward_jvp, vmap=_causal_softmax_backward_vmap,
    )
if _has_op("matmul"):
    torch.library.register_fake("attnext::matmul")(_matmul_fake)
    torch.library.register_fake("attnext::_matmul_backward")(_matmul_backward_fake)
    _autograd.register(
        "matmul", setup_context=_matmul_setup_context, backward=_matmul_bwd, jvp=_matmul_jvp, vmap=_matmul_vmap
    )
    _autograd.register(
        "_matmul_backward", setup_context=_matmul_backward_setup_context, backward=_matmul_backward_bwd,
        jvp=_matmul_backward_jvp, vmap=_matmul_backward_vmap,
    )
if _has_op("causal_mean"):
    torch.library.register_fake("attnext::causal_mean")(_causal_mean_fake)
    torch.library.register_fake("attnext::_causal_mean_backward")(_causal_mean_backward_fake)
    _autograd.register(
        "causal_mean", setup_context=_causal_mean_setup_context, backward=_causal_mean_bwd, jvp=_causal_mean_jvp,
        vmap=_causal_mean_vmap,
    )
    _autograd.register(
        "_causal_mean_backward", setup_context=_causal_mean_setup_context, backward=_causal_mean_backward_bwd,
        jvp=_causal_mean_backward_jvp, vmap=_causal_mean_backward_vmap,
    )
if _has_op("dropout"):
    torch.library.register_fake("attnext::dropout")(_dropout_fake)
    _autograd.register(
        "dropout", setup_context=_dropout_setup_context, backward=_dropout_bwd, jvp=_dropout_jvp, vmap=_dropout_vmap
    )
if _has_op("causal_attention"):
    torch.library.register_fake("attnext::causal_attention")(_causal_attention_fake)
    torch.library.register_fake("attnext::_causal_attention_backward")(_causal_attention_backward_fake)
    _autograd.register(
        "causal_attention", setup_context=_causal_attention_setup_context, backward=_causal_attention_bwd,
        jvp=_causal_attention_jvp, vmap=_attention_vmap("causal_attention", 4),
    )
    _autograd.register(
        "_causal_attention_backward", setup_context=_save_nothing,
        backward=_no_derivative("_causal_attention_backward", "causal_attention"),
        jvp=_no_derivative("_causal_attention_backward", "causal_attention"),
        vmap=_attention_vmap("_causal_attention_backward", 7),
    )
if _has_op("causal_attention_qkvpacked"):
    torch.library.register_fake("attnext::causal_attention_qkvpacked")(_causal_attention_qkvpacked_fake)
    torch.library.register_fake("attnext::_causal_attention_qkvpacked_backward")(
        _causal_attention_qkvpacked_backward_fake
    )
    _autograd.register(
        "causal_attention_qkvpacked", setup_context=_causal_attention_qkvpacked_setup_context,
        backward=_causal_attention_qkvpacked_bwd, jvp=_causal_attention_qkvpacked_jvp,
        vmap=_attention_vmap("causal_attention_qkvpacked", 2),
    )
    _autograd.register(
        "_causal_attention_qkvpacked_backward", setup_context=_save_nothing,
        backward=_no_derivative("_causal_attention_qkvpacked_backward", "causal_attention_qkvpacked"),
        jvp=_no_derivative("_causal_attention_qkvpacked_backward", "causal_attention_qkvpacked"),
        vmap=_attention_vmap("_causal_attention_qkvpacked_backward", 5),
    )
if _C is not None:
    _DEVICES = {op: _registered_devices(op) for op in _PUBLIC_OPS}
_CPU_DTYPES = _KERNEL_DTYPES["cpu"]
_matmul_cpu_ok = "cpu" in _DEVICES.get("matmul", ())
_attention_cpu_ok = "cpu" in _DEVICES.get("causal_attention", ())
_matmul_op = torch.ops.attnext.matmul.default if _matmul_cpu_ok else None
if _has_op("_varlen_attention"):
    # the one-call CPU kernel of attnext.varlen_attention, whose autograd.Function
    # (attnext/functional.py) gives its derivatives; called on their own they have none
    torch.library.register_fake("attnext::_varlen_attention")(_varlen_attention_fake)
    torch.library.register_fake("attnext::_varlen_attention_backward")(_varlen_attention_backward_fake)
    for _name in ("_varlen_attention", "_varlen_attention_backward"):
        _autograd.register(
            _name, setup_context=_save_nothing, backward=_no_derivative(_name, "varlen_attention"),
            jvp=_no_derivative(_name, "varlen_attention"), vmap=_no_vmap(_name, "varlen_attention"),
        )
