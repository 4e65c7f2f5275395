"""attnext.matmul against torch.matmul: shapes, values, dtypes, gradients, errors, memory."""
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import attnext
from attnext import reference
from conftest import tf32_switch

native = pytest.mark.skipif(not attnext.native_available(), reason="attnext._C not built")

# (shape of a, shape of b, what the case covers)
SHAPES = [
    # the lecture, verbatim
    ((3, 1, 2, 2), (5, 2, 3), "lecture: a's size-1 batch dim against b's missing one -> (3, 5, 2, 3)"),
    ((6, 4, 2), (3, 1, 2, 2), "lecture: both operands broadcast -> (3, 6, 4, 2)"),
    # 1-D operands
    ((7,), (7,), "dot product -> 0-dim"),
    ((5, 7), (7,), "matrix-vector, appended dim removed -> (5,)"),
    ((7,), (7, 4), "vector-matrix, prepended dim removed -> (4,)"),
    ((2, 3, 5, 7), (7,), "batched matrix-vector (folded into one GEMV)"),
    ((7,), (3, 7, 4), "vector @ batch: grad of the vector summed over the batch"),
    # 2-D
    ((33, 70), (70, 45), "plain matrices, BLAS path"),
    ((2, 3), (3, 2), "tiny matrices, loop path"),
    # N-D
    ((4, 17, 24), (4, 24, 19), "bmm-like, equal batches"),
    ((5, 17, 24), (24, 19), "x @ W: batch folded into the GEMM rows (grad_b: into its reduction)"),
    ((17, 24), (5, 24, 19), "W @ x: grad_a accumulated over the batch with beta=1 GEMMs"),
    ((6, 1, 40, 24), (3, 24, 40), "the issue's (64,1,256,64) @ (8,64,256), scaled down"),
    ((1, 3, 9, 8), (2, 1, 8, 5), "size-1 batch dims on both sides"),
    ((2, 1, 3, 1, 6, 4), (3, 1, 5, 4, 7), "6-D, interleaved broadcasting"),
    ((1, 1, 9, 8), (8, 5), "all-ones batch dims on a, b batch-free"),
    # size-0 dims
    ((0, 4, 5), (5, 3), "empty batch"),
    ((2, 0, 5), (2, 5, 3), "m = 0"),
    ((2, 4, 0), (2, 0, 3), "k = 0: zeros"),
    ((3, 4, 5), (0, 1, 5, 2), "batch broadcast against 0"),
    ((4, 5), (5, 0), "n = 0"),
    ((0,), (0,), "empty dot product: 0"),
    ((4, 0), (0,), "matrix-vector with k = 0: zeros"),
]
IDS = [f"{sa}@{sb}" for sa, sb, _ in SHAPES]


def _pair(sa, sb, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(sa, generator=g, dtype=dtype), torch.randn(sb, generator=g, dtype=dtype)


@pytest.mark.parametrize("sa,sb,why", SHAPES, ids=IDS)
def test_forward_float64(sa, sb, why):
    a, b = _pair(sa, sb)
    out = attnext.matmul(a, b)
    ref = torch.matmul(a, b)
    assert out.shape == ref.shape
    assert out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_lecture_cases_verbatim():
    a, b = torch.randn(3, 1, 2, 2), torch.randn(5, 2, 3)
    assert attnext.matmul(a, b).shape == (3, 5, 2, 3)
    a, b = torch.randn(6, 4, 2), torch.randn(3, 1, 2, 2)
    assert attnext.matmul(a, b).shape == (3, 6, 4, 2)
    torch.testing.assert_close(attnext.matmul(a, b), a @ b)


# (dtype, rtol/atol against the float64 oracle for O(1) values and k <= 70)
DTYPES = [(torch.float32, 2e-5), (torch.bfloat16, None), (torch.float16, None)]


@pytest.mark.parametrize("dtype,tol", DTYPES, ids=lambda v: str(v))
@pytest.mark.parametrize("sa,sb,why", SHAPES, ids=IDS)
def test_forward_dtypes(sa, sb, why, dtype, tol):
    a64, b64 = _pair(sa, sb)
    a, b = a64.to(dtype), b64.to(dtype)
    out = attnext.matmul(a, b)
    assert out.dtype == dtype
    oracle = torch.matmul(a.double(), b.double())
    if tol is not None:
        torch.testing.assert_close(out.double(), oracle, rtol=tol, atol=tol)
    else:  # reduced precision: within 2x eager torch's own error in that dtype (+ one rounding)
        err = (out.double() - oracle).abs().max().item() if out.numel() else 0.0
        eager = (torch.matmul(a, b).double() - oracle).abs().max().item() if out.numel() else 0.0
        ulp = 2.0 ** (-7 if dtype == torch.bfloat16 else -10) * max(1.0, oracle.abs().max().item() if out.numel() else 1.0)
        assert err <= 2 * eager + ulp


# Strided views: read in place when a GEMM can take the strides, copied otherwise.
VIEWS = [
    ("transposed a and b (a 'T' GEMM on both)", lambda a, b: (a.transpose(-1, -2), b.transpose(-1, -2)), (4, 12, 9), (4, 11, 12)),
    ("nanoGPT k.transpose(-2, -1) on b", lambda a, b: (a, b.transpose(-2, -1)), (2, 3, 10, 8), (2, 3, 10, 8)),
    ("row-sliced (ld > cols)", lambda a, b: (a[..., :5, :7], b[..., :7, :3]), (3, 9, 11), (3, 10, 6)),
    ("column step 2: neither dim unit-stride, a copied", lambda a, b: (a[..., ::2], b), (3, 6, 14), (7, 5)),
    ("non-contiguous batch dims", lambda a, b: (a.transpose(0, 1), b.permute(1, 0, 2, 3)), (5, 4, 6, 7), (5, 4, 7, 3)),
    ("expanded (stride-0) batch dim given by the caller", lambda a, b: (a.expand(6, 4, 5), b), (1, 4, 5), (6, 5, 3)),
    ("stride-0 rows inside a matrix (expand of a row): copied", lambda a, b: (a.expand(2, 4, 5), b), (2, 1, 5), (5, 3)),
]


@pytest.mark.parametrize("why,make,sa,sb", VIEWS, ids=[v[0] for v in VIEWS])
def test_strided_views(why, make, sa, sb):
    a0, b0 = _pair(sa, sb)
    a, b = make(a0, b0)
    torch.testing.assert_close(attnext.matmul(a, b), torch.matmul(a, b), rtol=1e-12, atol=1e-12)
    a.requires_grad_() if a.is_leaf else None
    a_, b_ = a.detach().requires_grad_(), b.detach().requires_grad_()
    g = torch.randn(torch.matmul(a, b).shape, dtype=a.dtype)
    ga, gb = torch.autograd.grad(attnext.matmul(a_, b_), (a_, b_), g)
    ra, rb = torch.autograd.grad(torch.matmul(a_, b_), (a_, b_), g)
    torch.testing.assert_close(ga, ra)
    torch.testing.assert_close(gb, rb)


@pytest.mark.parametrize("sa,sb,why", SHAPES, ids=IDS)
def test_gradients_float64(sa, sb, why):
    """Forward and both gradients with one shared grad_out against torch.matmul."""
    a, b = _pair(sa, sb)
    a1, b1 = a.clone().requires_grad_(), b.clone().requires_grad_()
    a2, b2 = a.clone().requires_grad_(), b.clone().requires_grad_()
    out, ref = attnext.matmul(a1, b1), torch.matmul(a2, b2)
    grad_out = torch.randn(ref.shape, dtype=ref.dtype)
    out.backward(grad_out)
    ref.backward(grad_out)
    torch.testing.assert_close(a1.grad, a2.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(b1.grad, b2.grad, rtol=1e-10, atol=1e-10)


def test_gradient_one_input():
    """needs_input_grad honoured: only b requires grad."""
    a, b = _pair((4, 1, 6, 5), (3, 5, 2))
    b.requires_grad_()
    (gb,) = torch.autograd.grad(attnext.matmul(a, b).sum(), (b,))
    (rb,) = torch.autograd.grad(torch.matmul(a, b).sum(), (b,))
    torch.testing.assert_close(gb, rb)


GRADCHECK_SHAPES = [
    ((3, 1, 2, 2), (5, 2, 3)),
    ((6, 4, 2), (3, 1, 2, 2)),
    ((4,), (4,)),
    ((3, 4), (4,)),
    ((4,), (2, 4, 3)),
    ((2, 3, 4), (4, 5)),
    ((3, 4), (2, 4, 5)),
]


@pytest.mark.parametrize("sa,sb", GRADCHECK_SHAPES, ids=[f"{a}@{b}" for a, b in GRADCHECK_SHAPES])
def test_gradcheck_gradgradcheck(sa, sb):
    a, b = _pair(sa, sb)
    a.requires_grad_()
    b.requires_grad_()
    assert torch.autograd.gradcheck(attnext.matmul, (a, b))
    assert torch.autograd.gradgradcheck(attnext.matmul, (a, b))


@native
@pytest.mark.parametrize("sa,sb", GRADCHECK_SHAPES + [((2, 0, 3), (3, 4))], ids=lambda v: str(v))
def test_opcheck(sa, sb):
    a, b = _pair(sa, sb)
    torch.library.opcheck(torch.ops.attnext.matmul, (a, b))
    torch.library.opcheck(torch.ops.attnext.matmul, (a.requires_grad_(), b.requires_grad_()))
    g = torch.randn(torch.matmul(a, b).shape, dtype=a.dtype)
    for mask in ([True, True], [True, False], [False, True]):
        torch.library.opcheck(torch.ops.attnext._matmul_backward, (g, a.detach(), b.detach(), mask))


@native
def test_backward_op_mask_and_shapes():
    a, b = _pair((4, 1, 6, 5), (3, 5, 2))
    g = torch.randn(4, 3, 6, 2, dtype=a.dtype)
    ga, gb = torch.ops.attnext._matmul_backward(g, a, b, [True, False])
    assert ga.shape == a.shape and gb.shape == (0,)
    ga, gb = torch.ops.attnext._matmul_backward(g, a, b, [False, True])
    assert ga.shape == (0,) and gb.shape == b.shape


@native
def test_compile_fullgraph():
    torch._dynamo.reset()

    def f(a, b):
        return attnext.matmul(a, b).sin()

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    a, b = _pair((3, 1, 4, 5), (2, 5, 6))
    a.requires_grad_()
    b.requires_grad_()
    out = cf(a, b)
    torch.testing.assert_close(out, torch.matmul(a, b).sin())
    ga, gb = torch.autograd.grad(out.sum(), (a, b))
    ra, rb = torch.autograd.grad(torch.matmul(a, b).sin().sum(), (a, b))
    torch.testing.assert_close(ga, ra)
    torch.testing.assert_close(gb, rb)


@pytest.mark.parametrize("sa,sb,why", SHAPES[:8], ids=IDS[:8])
def test_fallback_parity(sa, sb, why):
    a, b = _pair(sa, sb, torch.float32)
    fast = attnext.matmul(a, b)
    attnext.set_kernels_enabled(False)
    try:
        assert attnext.explain("matmul", a, b)
        slow = attnext.matmul(a, b)
    finally:
        attnext.set_kernels_enabled(True)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(slow, reference.matmul(a, b))


@native
def test_explain_native_runs():
    a, b = _pair((3, 4), (4, 5), torch.float32)
    assert attnext.explain("matmul", a, b) == []


def test_integer_dtypes_fall_back_to_torch_matmul():
    a = torch.randint(-5, 5, (2, 3, 4))
    b = torch.randint(-5, 5, (4, 5))
    assert attnext.explain("matmul", a, b)  # no native integer kernel: torch.matmul runs
    assert torch.equal(attnext.matmul(a, b), torch.matmul(a, b))


@native
def test_native_op_rejects_integers():
    a = torch.randint(-5, 5, (3, 4))
    with pytest.raises(RuntimeError, match="a must be a floating-point tensor"):
        torch.ops.attnext.matmul(a, a.T)


@pytest.mark.parametrize("kernels", [True, False], ids=["native", "fallback"])
@pytest.mark.parametrize(
    "sa,sb,match",
    [
        ((3, 4), (5, 6), r"cannot be multiplied: a's last dim \(4\) must equal b's second-to-last dim \(5\)"),
        ((3, 4), (5,), r"cannot be multiplied: a's last dim \(4\) must equal b's only dim \(5\)"),
        ((2, 3, 4), (3, 4, 5), "do not broadcast"),
        ((), (3,), "at least 1 dim"),
        ((3,), (), "at least 1 dim"),
    ],
)
def test_shape_errors(sa, sb, match, kernels):
    a, b = torch.randn(sa), torch.randn(sb)
    attnext.set_kernels_enabled(kernels)
    try:
        with pytest.raises(RuntimeError, match=match):
            attnext.matmul(a, b)
    finally:
        attnext.set_kernels_enabled(True)


def test_dtype_and_device_mismatch_errors():
    with pytest.raises(RuntimeError, match="same dtype, got torch.float32 and torch.float64"):
        attnext.matmul(torch.randn(2, 3), torch.randn(3, 2, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="same device"):
        attnext.matmul(torch.randn(2, 3), torch.randn(3, 2, device="meta"))
    with pytest.raises(TypeError, match="must be torch.Tensors"):
        attnext.matmul(torch.randn(2, 3), [[1.0], [2.0], [3.0]])


@native
def test_native_op_errors():
    with pytest.raises(RuntimeError, match="same dtype"):
        torch.ops.attnext.matmul(torch.randn(2, 3), torch.randn(3, 2, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="0-dim"):
        torch.ops.attnext.matmul(torch.randn(()), torch.randn(3))
    with pytest.raises(RuntimeError, match="grad must have the shape"):
        torch.ops.attnext._matmul_backward(torch.randn(2, 2), torch.randn(2, 3), torch.randn(3, 4), [True, True])


def _allocated_bytes(fn):
    """Bytes allocated on the CPU while fn runs (profiler memory events, allocations only)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(max(e.self_cpu_memory_usage, 0) for e in prof.events())


@native
def test_no_broadcast_copies_forward_and_backward():
    """(16,1,64,32) @ (8,32,64): the forward allocates exactly its output, the backward
    exactly the two gradients; torch.matmul's expanded copies show up in the same
    measurement, so the measurement is not blind."""
    a, b = torch.randn(16, 1, 64, 32), torch.randn(8, 32, 64)
    out_bytes = 16 * 8 * 64 * 64 * 4
    assert _allocated_bytes(lambda: torch.ops.attnext.matmul(a, b)) == out_bytes
    assert _allocated_bytes(lambda: torch.matmul(a, b)) >= out_bytes + 16 * 8 * 64 * 32 * 4
    g = torch.randn(16, 8, 64, 64)
    grads = a.numel() * 4 + b.numel() * 4
    assert _allocated_bytes(lambda: torch.ops.attnext._matmul_backward(g, a, b, [True, True])) == grads
    # transposed views go to the GEMM as they are
    at, bt = a.transpose(-1, -2).contiguous().transpose(-1, -2), b.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert _allocated_bytes(lambda: torch.ops.attnext.matmul(at, bt)) == out_bytes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "sa,sb",
    [((6, 1, 40, 24), (3, 24, 40)), ((17, 24), (5, 24, 19)), ((5, 17, 24), (24, 19))],
    ids=["both broadcast", "2-D a, batched b", "x @ W folded"],
)
def test_reduced_precision_gradients(sa, sb, dtype):
    """Broadcast gradients are accumulated in float and rounded once: their error against
    the float64 oracle is at most ~2x eager torch's in the same dtype."""
    a64, b64 = _pair(sa, sb)
    g64 = torch.randn(torch.matmul(a64, b64).shape, dtype=torch.float64)
    ra, rb = torch.autograd.grad(torch.matmul(a64.requires_grad_(), b64.requires_grad_()), (a64, b64), g64)

    def grads(fn):
        a = a64.detach().to(dtype).requires_grad_()
        b = b64.detach().to(dtype).requires_grad_()
        return torch.autograd.grad(fn(a, b), (a, b), g64.to(dtype))

    for mine, eager, ref in zip(grads(attnext.matmul), grads(torch.matmul), (ra, rb)):
        assert mine.dtype == dtype
        err = (mine.double() - ref).abs().max().item()
        eager_err = (eager.double() - ref).abs().max().item()
        ulp = 2.0 ** (-7 if dtype == torch.bfloat16 else -10) * ref.abs().max().item()
        assert err <= 2 * eager_err + ulp


@native
def test_compile_dynamic_shapes():
    """The fake kernel's shape rule under symbolic sizes (dynamic=True), 1-D cases included."""
    torch._dynamo.reset()
    f = torch.compile(lambda a, b: attnext.matmul(a, b) * 2, fullgraph=True, dynamic=True, backend="aot_eager")
    for sa, sb in [((3, 1, 4, 5), (2, 5, 6)), ((4, 1, 7, 5), (3, 5, 2)), ((5,), (2, 5, 3)), ((6, 5), (5,))]:
        a, b = _pair(sa, sb)
        a.requires_grad_()
        b.requires_grad_()
        y = f(a, b)
        torch.testing.assert_close(y, torch.matmul(a, b) * 2)
        ga, gb = torch.autograd.grad(y.sum(), (a, b))
        ra, rb = torch.autograd.grad((torch.matmul(a, b) * 2).sum(), (a, b))
        torch.testing.assert_close(ga, ra)
        torch.testing.assert_close(gb, rb)


@native
def test_compile_inductor():
    """The default backend (inductor) around matmul and causal_mean, forward and backward."""
    torch._dynamo.reset()
    f = torch.compile(lambda a, b, x: attnext.matmul(a, b).relu() + attnext.causal_mean(x), fullgraph=True)
    a, b = _pair((3, 1, 4, 5), (2, 5, 6), torch.float32)
    x = torch.randn(3, 2, 4, 6)
    for t in (a, b, x):
        t.requires_grad_()
    y = f(a, b, x)
    ref = torch.matmul(a, b).relu() + reference.causal_mean(x)
    torch.testing.assert_close(y, ref)
    got = torch.autograd.grad(y.sum(), (a, b, x))
    want = torch.autograd.grad(ref.sum(), (a, b, x))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@native
def test_portable_gemm_path_subprocess():
    """ATTNEXT_MATMUL_BLAS=0: the path a torch without exported BLAS symbols takes
    (ATen's mm on views), forward and gradients, float32 and bfloat16."""
    import os
    import subprocess
    import sys

    code = r"""
import torch, attnext
for dt, tol in ((torch.float32, 1e-4), (torch.bfloat16, 5e-2)):
    for sa, sb in (((6, 1, 40, 24), (3, 24, 40)), ((17, 24), (5, 24, 19)), ((5, 17, 24), (24, 19))):
        a = torch.randn(sa).to(dt).requires_grad_(); b = torch.randn(sb).to(dt).requires_grad_()
        out = attnext.matmul(a, b)
        ref = torch.matmul(a.double(), b.double())
        assert torch.allclose(out.double(), ref, rtol=tol, atol=tol * 10), (dt, sa, sb)
        g = torch.randn(ref.shape).to(dt)
        ga, gb = torch.autograd.grad(out, (a, b), g)
        ra, rb = torch.autograd.grad(ref, (a, b), g.double())
        assert torch.allclose(ga.double(), ra.double(), rtol=tol, atol=tol * 10)
        assert torch.allclose(gb.double(), rb.double(), rtol=tol, atol=tol * 10)
print("ok")
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, ATTNEXT_MATMUL_BLAS="0", ATTNEXT_F32_GEMM="0",
               PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


# float32 GEMMs large enough for the blocked driver of attnext's own AVX-512 GEMM (where
# the CPU has AVX-512; the BLAS elsewhere): sizes off every block size (6-row and 96-row
# blocks, 16/64/256 columns, 384-deep blocks), transposed operands (B transposed into
# the driver's buffer, A read as columns), folded x @ W and batched entries in parallel.
OWN_GEMM_CASES = [
    ("k > 384: depth blocks accumulate", (1000, 777), (777, 300), lambda a, b: (a, b)),
    ("x @ W^T folded, n > 256, B transposed", (4, 130, 65), (520, 65), lambda a, b: (a, b.t())),
    ("A transposed (columns)", (97, 301), (97, 35), lambda a, b: (a.t(), b)),
    ("batched entries", (3, 50, 40), (3, 40, 33), lambda a, b: (a, b)),
]


def _own_gemm_check(sa, sb, make):
    g = torch.Generator().manual_seed(0)
    a64, b64 = (torch.randn(s, generator=g, dtype=torch.float64) for s in (sa, sb))
    a64, b64 = make(a64, b64)
    a, b = (t.float().requires_grad_() for t in (a64, b64))
    out = attnext.matmul(a, b)
    ref = torch.matmul(a64, b64)
    k = a64.shape[-1]
    tol = 2e-6 * k**0.5 * 4
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    gout = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    ga, gb = torch.autograd.grad(out, (a, b), gout.float())
    ra = gout @ b64.transpose(-1, -2)
    rb = a64.transpose(-1, -2) @ gout
    rb = rb.sum(0) if rb.dim() > b64.dim() else rb  # W's gradient summed over the folded batch
    torch.testing.assert_close(ga.double(), ra, rtol=tol * 10, atol=tol * 10)
    torch.testing.assert_close(gb.double(), rb, rtol=tol * 10, atol=tol * 10)


@native
@pytest.mark.parametrize("why,sa,sb,make", OWN_GEMM_CASES, ids=[c[0] for c in OWN_GEMM_CASES])
def test_float32_own_gemm_sizes_and_layouts(why, sa, sb, make):
    _own_gemm_check(sa, sb, make)


@native
def test_float32_blas_path_subprocess():
    """ATTNEXT_F32_GEMM=0: the same cases through the BLAS (the path of a CPU without AVX-512)."""
    from conftest import assert_python_ok

    code = (
        "import sys; sys.path.insert(0, 'tests')\n"
        "import test_matmul as t\n"
        "for _, sa, sb, make in t.OWN_GEMM_CASES:\n"
        "    t._own_gemm_check(sa, sb, make)\n"
        "print('ok')\n"
    )
    assert_python_ok(code, ATTNEXT_F32_GEMM="0")


def test_grad_modes():
    """The no-grad fast path and the autograd path agree; no graph where none is wanted."""
    a, b = _pair((3, 1, 4, 5), (2, 5, 6))
    out = attnext.matmul(a, b)
    assert out.grad_fn is None and not out.requires_grad
    a.requires_grad_()
    with torch.no_grad():
        assert attnext.matmul(a, b).grad_fn is None
    with torch.inference_mode():
        torch.testing.assert_close(attnext.matmul(a, b), out)
    y = attnext.matmul(a, b)
    assert y.requires_grad and y.grad_fn is not None
    torch.testing.assert_close(y, out)


# ------------------------------------------------------------------ CUDA float32: TF32 as torch.matmul
# The CUDA kernel runs float32 GEMMs on TF32 (CUBLAS_COMPUTE_32F_FAST_TF32) exactly when torch
# allows TF32 for CUDA matmuls, through whichever of torch's switches. It once read
# allowTF32CuBLAS(), which raises on torch >= 2.9 when TF32 was set through fp32_precision alone.
HAVE_CUDA_MATMUL = (
    torch.cuda.is_available()
    and attnext.native_available()
    and torch._C._dispatch_has_kernel_for_dispatch_key("attnext::matmul", "CUDA")
)
cuda_matmul = pytest.mark.skipif(not HAVE_CUDA_MATMUL, reason="no GPU, or attnext built without CUDA kernels")


def _float32_cuda_errors(fn, a64, b64, g64):
    """Max error of fn's forward and gradients in float32 on CUDA against float64, each relative
    to the largest value of its oracle."""
    a64, b64 = a64.detach().requires_grad_(), b64.detach().requires_grad_()
    want = [torch.matmul(a64, b64)]
    want += torch.autograd.grad(want[0], (a64, b64), g64)
    a, b = (t.detach().to("cuda", torch.float32).requires_grad_() for t in (a64, b64))
    got = [fn(a, b)]
    got += torch.autograd.grad(got[0], (a, b), g64.to("cuda", torch.float32))
    return [((x.double().cpu() - w).abs().max() / w.abs().max()).item() for x, w in zip(got, want)]


@cuda_matmul
@pytest.mark.parametrize("switch", ["fp32_precision", "allow_tf32", "set_float32_matmul_precision"])
@pytest.mark.parametrize(
    "sa,sb",
    [((4, 96, 512), (512, 80)), ((3, 1, 64, 256), (5, 256, 48))],
    ids=["x @ W folded", "both broadcast (beta=1 backward)"],
)
def test_cuda_float32_follows_torchs_tf32_switch(switch, sa, sb):
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("TF32 needs compute capability 8.0+")
    a64, b64 = _pair(sa, sb, seed=5)
    g64 = torch.randn(torch.broadcast_shapes(sa[:-2], sb[:-2]) + (sa[-2], sb[-1]), dtype=torch.float64)
    assert attnext.explain("matmul", a64.cuda().float(), b64.cuda().float()) == []
    with tf32_switch(switch, on=False):
        exact = _float32_cuda_errors(attnext.matmul, a64, b64, g64)
    with tf32_switch(switch, on=True):
        tf32 = _float32_cuda_errors(attnext.matmul, a64, b64, g64)  # must not raise
        eager_tf32 = _float32_cuda_errors(torch.matmul, a64, b64, g64)
    for what, e, t, eager in zip(("out", "grad_a", "grad_b"), exact, tf32, eager_tf32):
        assert e < 1e-5, (what, e)  # float32 without TF32: exact GEMMs
        assert t > 1e-5, (what, t)  # TF32 (10-bit mantissa) shows
        assert t <= 2 * max(eager, 2.0**-11), (what, t, eager)  # and is torch.matmul's TF32


@pytest.mark.parametrize("sa,sb,to_torch", [
    ((2, 3), (3, 4), True),  # tiny matrix product
    ((16, 64, 64), (64, 64), True),  # a batch folded into one GEMM by torch
    ((8, 4, 16), (16,), True),  # matrix-vector
    ((1100, 1000), (1000, 1000), False),  # a product of 4 MiB or more: attnext's op (output cache)
    ((2, 8, 16), (2, 16, 4), False),  # batched b: attnext's op
    ((3, 1, 2, 2), (5, 2, 3), False),  # broadcast: attnext's op
    ((2, 3), (4, 5), False),  # a mismatch: attnext's op, for its error message
])
def test_cpu_route_to_torch_matmul(sa, sb, to_torch):
    # A matrix or vector b with a product under 4 MiB runs torch.matmul itself (torch
    # folds a's batch into one GEMM, and its autograd is C++): exactly torch's values
    # and gradient graph; everything else attnext's op, as explain says.
    g = torch.Generator().manual_seed(0)
    a = torch.randn(sa, generator=g, requires_grad=True)
    b = torch.randn(sb, generator=g, requires_grad=True)
    routed = to_torch and attnext.native_available() and attnext.kernels_enabled()
    notes = attnext.explain("matmul", a, b).kernels
    assert any("torch.matmul itself" in n for n in notes) == routed, notes
    if sa[-1] != sb[0 if len(sb) == 1 else -2]:
        with pytest.raises(RuntimeError, match="attnext: matmul: shapes"):
            attnext.matmul(a, b)
        return
    out = attnext.matmul(a, b)
    ref = torch.matmul(a, b)
    assert ("attnext" not in type(out.grad_fn).__name__) == (routed or not attnext.native_available()
                                                             or not attnext.kernels_enabled())
    if routed:
        assert torch.equal(out, ref) and type(out.grad_fn) is type(ref.grad_fn)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    go = torch.randn(ref.shape, generator=g)
    for x, y in zip(torch.autograd.grad(out, (a, b), go), torch.autograd.grad(ref, (a, b), go)):
        torch.testing.assert_close(x, y, atol=1e-3, rtol=1e-4)
