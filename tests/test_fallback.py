"""The kernel-or-fallback choice: every reason, and parity between the two paths."""

import os
import platform

import pytest
import torch

import attnext
from conftest import assert_python_ok, needs_native, run_python



@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("align", ["top_left", "bottom_right"])
def test_parity_kernel_vs_fallback(dtype, align, kernels_disabled):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 37, 29, dtype=dtype, requires_grad=True)
    g = torch.randn(2, 3, 37, 29, dtype=dtype)
    assert attnext.explain("causal_softmax", x)  # the fixture disabled kernels
    y_ref = attnext.causal_softmax(x, 0.3, align=align)
    (gx_ref,) = torch.autograd.grad(y_ref, x, g)
    attnext.set_kernels_enabled(True)
    y = attnext.causal_softmax(x, 0.3, align=align)
    (gx,) = torch.autograd.grad(y, x, g)
    # bfloat16: the fallback rounds x * scale to bfloat16 before the softmax, the kernel does not.
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(gx, gx_ref, **tol)


def test_disabled_reason_is_reported(kernels_disabled):
    reasons = attnext.explain("causal_softmax", torch.ones(2, 2))
    assert any("disabled" in r for r in reasons)


@needs_native
def test_unsupported_dtype_and_device_reasons():
    # A device type with no kernel in this build (and no GPU needed to ask).
    class FakeDevice:
        type = "xpu"

    class FakeTensor:
        device = FakeDevice()
        dtype = torch.float32

    reasons = attnext.explain("causal_softmax", FakeTensor())
    assert any("no native kernel for device type 'xpu'" in r for r in reasons)
    reasons = attnext.explain("causal_softmax", torch.ones(2, 2, dtype=torch.complex64))
    assert any("dtype torch.complex64" in r for r in reasons)


def test_explain_rejects_unknown_op():
    with pytest.raises(ValueError, match="unknown op"):
        attnext.explain("softmax", torch.ones(2, 2))


def test_env_var_disables_kernels():
    code = (
        "import torch, attnext\n"
        "x = torch.randn(3, 5, 5)\n"
        "r = attnext.explain('causal_softmax', x)\n"
        "assert r and 'disabled' in r[0], r\n"
        "torch.testing.assert_close(attnext.causal_softmax(x), attnext.reference.causal_softmax(x))\n"
        "print('ok')\n"
    )
    assert_python_ok(code, ATTNEXT_DISABLE_KERNELS="1")


def test_missing_extension_warns_once_and_falls_back():
    # Make `from . import _C` fail the way an unbuilt checkout does.
    code = (
        "import sys, warnings\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'attnext._C':\n"
        "            raise ImportError('simulated: no compiled extension')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch, attnext\n"
        "assert not attnext.native_available()\n"
        "x = torch.randn(2, 4, 4, requires_grad=True)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    y = attnext.causal_softmax(x, 0.5)\n"
        "    attnext.causal_softmax(x, 0.5)\n"
        "msgs = [str(m.message) for m in w if 'native kernels unavailable' in str(m.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "assert 'pip install' in msgs[0]\n"
        "torch.testing.assert_close(y, attnext.reference.causal_softmax(x, 0.5))\n"
        "y.sum().backward()\n"
        "r = attnext.explain('causal_softmax', x)\n"
        "assert 'not available' in r[0], r\n"
        "print('ok')\n"
    )
    assert_python_ok(code)


_X86 = platform.machine().lower() in ("x86_64", "amd64")


@needs_native
@pytest.mark.parametrize(
    "var, value, expected",
    [
        ("ATEN_CPU_CAPABILITY", "default", ("scalar",)),
        ("ATTNEXT_CPU_ISA", "scalar", ("scalar",)),
        ("ATTNEXT_CPU_ISA", "SCALAR", ("scalar",)),  # read case-insensitively
        pytest.param("ATEN_CPU_CAPABILITY", "avx2", ("avx2", "scalar"),
                     marks=pytest.mark.skipif(not _X86, reason="x86-64 only")),
        pytest.param("ATTNEXT_CPU_ISA", "avx2", ("avx2", "scalar"),
                     marks=pytest.mark.skipif(not _X86, reason="x86-64 only")),
        pytest.param("ATTNEXT_CPU_ISA", "neon", ("neon",),
                     marks=pytest.mark.skipif(platform.machine() != "aarch64", reason="AArch64 only")),
    ],
)
def test_narrower_instruction_sets_give_the_same_answers(var, value, expected):
    # ATEN_CPU_CAPABILITY caps the kernels' instruction set (as it does torch's own), and
    # ATTNEXT_CPU_ISA caps attnext's alone: checks the AVX2 and scalar row kernels on a
    # machine that would pick AVX-512 (or the scalar ones on an ARM one), and the
    # attention's float tiles and decode pass on them.
    code = (
        "import torch, attnext\n"
        "from attnext import reference\n"
        "torch.manual_seed(0)\n"
        "for shape in [(3, 1, 1), (2, 37, 29), (2, 29, 37), (1, 64, 64)]:\n"
        "    for br in (False, True):\n"
        "        x = torch.randn(shape, dtype=torch.float64) * 3\n"
        "        align = 'bottom_right' if br else 'top_left'\n"
        "        for dt in (torch.float32, torch.bfloat16):\n"
        "            xd = x.to(dt).requires_grad_(True)\n"
        "            y = attnext.causal_softmax(xd, 0.7, align=align)\n"
        "            ref = reference.causal_softmax(x, 0.7, br)\n"
        "            tol = 2e-6 if dt == torch.float32 else 1e-2\n"
        "            assert (y.double() - ref).abs().max() < tol, (shape, br, dt)\n"
        "            g = torch.randn(shape, dtype=torch.float64)\n"
        "            (gx,) = torch.autograd.grad(y, xd, g.to(dt))\n"
        "            gref = reference.causal_softmax_backward(g, ref, 0.7, br)\n"
        "            assert (gx.double() - gref).abs().max() < 50 * tol, (shape, br, dt)\n"
        "# the attention tiles' online softmax (16-row groups, ragged tails) and the decode pass\n"
        "for T, S in ((70, 70), (5, 40), (300, 300)):\n"
        "    q = torch.randn(2, 3, T, 24, dtype=torch.float64)\n"
        "    k, v = (torch.randn(2, 3, S, 24, dtype=torch.float64) for _ in range(2))\n"
        "    qf, kf, vf = (t.float().requires_grad_() for t in (q, k, v))\n"
        "    o = attnext.causal_attention(qf, kf, vf, align='bottom_right')\n"
        "    ref = reference.causal_attention(q, k, v, 24 ** -0.5, 0.0, True)[0]\n"
        "    assert (o.double() - ref).abs().max() < 2e-5, (T, S)\n"
        "    g = torch.randn(o.shape, dtype=torch.float64)\n"
        "    grads = torch.autograd.grad(o, (qf, kf, vf), g.float())\n"
        "    qd, kd, vd = (t.requires_grad_() for t in (q, k, v))\n"
        "    refs = torch.autograd.grad(reference.causal_attention(qd, kd, vd, 24 ** -0.5, 0.0, True)[0], (qd, kd, vd), g)\n"
        "    for a, r in zip(grads, refs):\n"
        "        assert (a.double() - r).abs().max() < 1e-4, (T, S)\n"
        "print(torch.ops.attnext._cpu_isa())\n"
    )
    out = run_python(code, **{var: value})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() in expected


@needs_native
def test_cpu_parallel_backend_is_reported():
    # How the CPU kernels' loops use several threads (setup.py's OpenMP decision):
    # "native" exactly where torch itself uses its own thread pool, else "openmp" (compiled
    # with OpenMP) or "threads" (no compiler OpenMP: csrc/cpu/parallel.h's std::threads).
    mode = torch.ops.attnext._cpu_parallel()
    native_pool = "parallel backend: native thread pool" in torch.__config__.parallel_info()
    assert mode == "native" if native_pool else mode in ("openmp", "threads")
    # scripts/check_build_matrix.sh builds with a compiler that has no OpenMP and says so here
    expected = os.environ.get("ATTNEXT_EXPECT_CPU_PARALLEL")
    if expected:
        assert mode == expected


@needs_native
def test_unknown_cpu_isa_setting_warns_and_keeps_the_best():
    # The choice is made once, in C++ (a c10 warning on stderr), and falls back to the best.
    code = "import torch, attnext\nprint(torch.ops.attnext._cpu_isa())\n"
    best = run_python(code)
    out = run_python(code, ATTNEXT_CPU_ISA="sse9")
    assert out.returncode == 0, out.stderr
    assert "ATTNEXT_CPU_ISA=sse9" in out.stderr
    assert "ATTNEXT_CPU_ISA" not in best.stderr
    assert out.stdout.strip() == best.stdout.strip() != ""


@needs_native
def test_cpu_features_name_what_the_isa_needs():
    # The features are the CPU's (cpuid or hwcaps), the ISA is capped by settings:
    # whatever the kernels use, the CPU must report.
    feats = set(torch.ops.attnext._cpu_features())
    isa = torch.ops.attnext._cpu_isa()
    needs = {"avx512": {"avx2", "fma", "avx512f"}, "avx2": {"avx2", "fma"}, "neon": {"neon"}, "scalar": set()}
    assert needs[isa] <= feats, (isa, feats)
    if platform.machine() == "aarch64":
        assert "neon" in feats and not any(f.startswith("avx") for f in feats)
    elif _X86:
        assert "neon" not in feats
