"""Kernel choice by measurement: attnext's own float32 GEMM or the BLAS, per workload,
timed on the running CPU at first use (csrc/cpu/gemm_f32.cpp), overridable with
ATTNEXT_F32_GEMM, and reported by attnext.explain(...).kernels."""
import pytest
import torch

import attnext
from conftest import assert_python_ok, needs_native


@needs_native
def test_explain_reports_the_gemm_choice():
    ex = attnext.explain("matmul", torch.randn(3, 4), torch.randn(4, 5))
    assert ex == [] and len(ex.kernels) == 1
    assert ex.kernels[0].startswith("float32 GEMM, matmul: ")
    assert ("own AVX-512 kernel" in ex.kernels[0]) or ("BLAS" in ex.kernels[0])
    ex = attnext.explain("causal_attention", *(torch.randn(2, 40, 8) for _ in range(3)))
    assert ex == [] and any(k.startswith("float32 GEMM, attention tiles: ") for k in ex.kernels)
    # decoding shapes name the decode pass; other dtypes have no GEMM choice to report
    ex = attnext.explain("causal_attention", torch.randn(2, 1, 8), torch.randn(2, 9, 8), torch.randn(2, 9, 8))
    assert any("decode pass" in k for k in ex.kernels)
    assert attnext.explain("matmul", torch.randn(3, 4).double(), torch.randn(4, 5).double()).kernels == []


def test_explain_fallback_has_no_kernel_notes(kernels_disabled):
    ex = attnext.explain("matmul", torch.randn(3, 4), torch.randn(4, 5))
    assert ex and ex.kernels == []


@needs_native
@pytest.mark.parametrize("env,expect", [("0", "BLAS ("), ("1", "own AVX-512 kernel (ATTNEXT_F32_GEMM=1)")])
def test_override(env, expect):
    # Both overrides give the same numbers as the measured choice (within float rounding).
    code = (
        "import torch, attnext\n"
        "from attnext import reference\n"
        "choices = torch.ops.attnext._f32_gemm_choices()\n"
        "if 'needs AVX-512' in choices[0] and %r == '1':\n"
        "    print('ok'); raise SystemExit\n"
        "assert all(%r in c for c in choices), choices\n"
        "torch.manual_seed(0)\n"
        "a, b = torch.randn(3, 200, 300), torch.randn(300, 100)\n"
        "torch.testing.assert_close(attnext.matmul(a, b), a.double().matmul(b.double()).float(), atol=1e-4, rtol=1e-4)\n"
        "q, k, v = (torch.randn(2, 300, 64) for _ in range(3))\n"
        "ref = reference.causal_attention(q.double(), k.double(), v.double(), 0.125)[0]\n"
        "torch.testing.assert_close(attnext.causal_attention(q, k, v).double(), ref, atol=1e-5, rtol=1e-5)\n"
        "print('ok')\n"
    ) % (env, expect)
    assert_python_ok(code, ATTNEXT_F32_GEMM=env)
