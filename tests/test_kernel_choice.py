"""Kernel choice by measurement (csrc/cpu/kernel_choice.h): attnext's own float32 GEMM
or the BLAS, attnext's attention tiles or ATen's flash attention, per workload class,
timed on the running CPU at first use, overridable with ATTNEXT_F32_GEMM and
ATTNEXT_ATTENTION_KERNEL, and reported by attnext.explain(...).kernels."""
import pytest
import torch

import attnext
from conftest import assert_python_ok, needs_native


@needs_native
def test_explain_reports_the_gemm_choice():
    a, b = torch.randn(2, 3, 4), torch.randn(2, 4, 5)
    attnext.matmul(a, b)
    ex = attnext.explain("matmul", a, b)
    assert ex == [] and len(ex.kernels) == 1
    assert ex.kernels[0].startswith("float32 GEMM, matmul: ")
    assert ("own AVX-512 kernel" in ex.kernels[0]) or ("BLAS" in ex.kernels[0])
    ex = attnext.explain("causal_attention", *(torch.randn(2, 40, 8) for _ in range(3)))
    # per pass and head-size class: these tensors' class only
    assert ex == [] and any(k.startswith("float32 GEMM, attention tiles (forward, head size <= 64): ") for k in ex.kernels)
    assert any(k.startswith("float32 GEMM, attention tiles (backward, head size <= 64): ") for k in ex.kernels)
    assert not any("head size <= 128" in k or "head size > 128" in k for k in ex.kernels if k.startswith("float32 GEMM"))
    q = torch.randn(2, 40, 96, requires_grad=True)
    attnext.causal_attention(q, q, q).sum().backward()
    kernels = attnext.explain("causal_attention", q, q, q).kernels
    assert any(k.startswith("float32 GEMM, attention tiles (forward, head size <= 128): ") for k in kernels)
    assert any(k.startswith("float32 GEMM, attention tiles (backward, head size <= 128): ") for k in kernels)
    assert not any("head size <= 64" in k for k in kernels if k.startswith("float32 GEMM"))
    # decoding shapes name the decode pass; other dtypes have no GEMM choice to report
    ex = attnext.explain("causal_attention", torch.randn(2, 1, 8), torch.randn(2, 9, 8), torch.randn(2, 9, 8))
    assert any("decode pass" in k for k in ex.kernels)
    assert attnext.explain("matmul", torch.randn(2, 3, 4).double(), torch.randn(2, 4, 5).double()).kernels == []
    # a matrix (or vector) b and a product under 4 MiB: torch.matmul itself, said so
    for a, b in ((torch.randn(3, 4), torch.randn(4, 5)), (torch.randn(8, 4, 16), torch.randn(16))):
        ex = attnext.explain("matmul", a, b)
        assert ex == [] and len(ex.kernels) == 1 and "torch.matmul itself" in ex.kernels[0], ex.kernels
    assert not any("torch.matmul" in k for k in attnext.explain("matmul", torch.randn(1024, 1024, 1), torch.randn(1, 1024)).kernels)


@needs_native
def test_chunked_prefill_has_its_own_gemm_choice():
    # a forward of few query tiles against at least 4x as many keys (chunked prefill) is
    # its own class, measured on a prefill-shaped forward; training shapes are not
    q, k = torch.randn(2, 100, 64), torch.randn(2, 400, 64)
    out = attnext.causal_attention(q, k, k, align="bottom_right")
    ref, _ = attnext.reference.causal_attention(q.double(), k.double(), k.double(), 0.125, bottom_right=True)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    kernels = attnext.explain("causal_attention", q, k, k).kernels
    few = [c for c in kernels if c.startswith("float32 GEMM, attention tiles (forward of few queries against 4x as "
                                              "many keys, head size <= 64): ")]
    assert len(few) == 1 and ("own AVX-512 kernel" in few[0] or "BLAS" in few[0]), kernels


def test_explain_fallback_has_no_kernel_notes(kernels_disabled):
    ex = attnext.explain("matmul", torch.randn(3, 4), torch.randn(4, 5))
    assert ex and ex.kernels == []


@needs_native
@pytest.mark.parametrize("env,expect", [("0", "BLAS ("), ("1", "own AVX-512 kernel (forced by the environment)")])
def test_override(env, expect):
    # Both overrides give the same numbers as the measured choice (within float rounding).
    code = (
        "import torch, attnext\n"
        "from attnext import reference\n"
        "choices = [c for c in torch.ops.attnext._kernel_choices() if c.startswith('float32 GEMM')]\n"
        "if 'needs AVX-512' in choices[0] and %r == '1':\n"
        "    print('ok'); raise SystemExit\n"
        "assert all(%r in c for c in choices), choices\n"
        "torch.manual_seed(0)\n"
        "a, b = torch.randn(3, 200, 300), torch.randn(300, 100)\n"
        "torch.testing.assert_close(attnext.matmul(a, b), a.double().matmul(b.double()).float(), atol=1e-4, rtol=1e-4)\n"
        "q, k, v = (torch.randn(2, 300, 64, requires_grad=True) for _ in range(3))\n"
        "q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))\n"
        "ref = reference.causal_attention(q64, k64, v64, 0.125)[0]\n"
        "out = attnext.causal_attention(q, k, v)\n"
        "torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)\n"
        "# the backward's choice too: two 256-row blocks, the second partial\n"
        "g = torch.randn_like(out)\n"
        "for a, r in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q64, k64, v64), g.double())):\n"
        "    torch.testing.assert_close(a.double(), r, atol=1e-4, rtol=1e-4)\n"
        "print('ok')\n"
    ) % (env, expect)
    assert_python_ok(code, ATTNEXT_F32_GEMM=env)


ATEN_ROUTE = (
    "import torch, attnext, torch.nn.functional as F\n"
    "from attnext import reference\n"
    "torch.manual_seed(0)\n"
    "for dtype in (torch.float32, torch.bfloat16):\n"
    "    # (2, 3, 40, 32) both as a contiguous tensor and as nanoGPT's transposed view\n"
    "    # (whose batch dims do not fold into one), 3-D and 2-D (unbatched) inputs\n"
    "    for shape, view in (((2, 3, 40, 32), False), ((2, 3, 40, 32), True), ((1, 2, 300, 64), False),\n"
    "                        ((3, 40, 16), False), ((40, 16), False)):\n"
    "        if view:\n"
    "            base = [torch.randn(2, 40, 3, 32, dtype=dtype, requires_grad=True) for _ in range(3)]\n"
    "            q, k, v = (t.transpose(1, 2) for t in base)\n"
    "        else:\n"
    "            q, k, v = base = [torch.randn(*shape, dtype=dtype, requires_grad=True) for _ in range(3)]\n"
    "        out = attnext.causal_attention(q, k, v)\n"
    "        assert out.shape == shape and out.is_contiguous(), (shape, out.stride())\n"
    "        g = torch.randn_like(out)\n"
    "        grads = torch.autograd.grad(out, base, g)\n"
    "        grads = [t.transpose(1, 2) for t in grads] if view else grads\n"
    "        assert all(t.shape == shape for t in grads)\n"
    "        # SDPA's flash path, on 4-D views as the route runs it (3-D inputs would take its math path)\n"
    "        qs, ks, vs = (t.detach().requires_grad_() for t in (q, k, v))\n"
    "        four = lambda t: t if t.dim() == 4 else four(t.unsqueeze(0))\n"
    "        ref = F.scaled_dot_product_attention(four(qs), four(ks), four(vs), is_causal=True).view_as(out)\n"
    "        ref_grads = torch.autograd.grad(ref, (qs, ks, vs), g)\n"
    "        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))\n"
    "        o64 = reference.causal_attention(q64, k64, v64, shape[-1] ** -0.5)[0]\n"
    "        g64 = torch.autograd.grad(o64, (q64, k64, v64), g.double())\n"
    "        err = lambda a, b: (a.double() - b).abs().max().item()\n"
    "        tol = 1e-5 if dtype == torch.float32 else 2e-3\n"
    "        # within SDPA's own error against the float64 oracle (what a user gets from torch)\n"
    "        assert err(out, o64) <= 1.5 * err(ref, o64) + tol, (dtype, shape)\n"
    "        for a, r, o in zip(grads, ref_grads, g64):\n"
    "            assert err(a, o) <= 1.5 * err(r, o) + tol, (dtype, shape)\n"
    "    # the packed layout on the route: ATen's output is laid out as the packed output\n"
    "    qkv = torch.randn(2, 40, 3, 3, 32, dtype=dtype, requires_grad=True)\n"
    "    out = attnext.causal_attention_qkvpacked(qkv)\n"
    "    assert out.shape == (2, 40, 3, 32) and out.is_contiguous()\n"
    "    g = torch.randn_like(out)\n"
    "    (dqkv,) = torch.autograd.grad(out, qkv, g)\n"
    "    q64, k64, v64 = (t.detach().double().transpose(1, 2).requires_grad_() for t in qkv.unbind(2))\n"
    "    o64 = reference.causal_attention(q64, k64, v64, 32 ** -0.5)[0]\n"
    "    tol = 2e-5 if dtype == torch.float32 else 3e-2\n"
    "    torch.testing.assert_close(out.double(), o64.transpose(1, 2), atol=tol, rtol=tol)\n"
    "    ref = torch.stack([t.transpose(1, 2) for t in torch.autograd.grad(o64, (q64, k64, v64), g.double().transpose(1, 2))], 2)\n"
    "    torch.testing.assert_close(dqkv.double(), ref, atol=tol * 4, rtol=tol * 4)\n"
    "# chunked prefill (bottom-right, T < S): ATen with a mask; against the float64 oracle\n"
    "for dtype, tol in ((torch.float32, 2e-5), (torch.bfloat16, 3e-2)):\n"
    "    q = torch.randn(2, 2, 40, 32, dtype=dtype, requires_grad=True)\n"
    "    k, v = (torch.randn(2, 2, 100, 32, dtype=dtype, requires_grad=True) for _ in range(2))\n"
    "    out = attnext.causal_attention(q, k, v, align='bottom_right')\n"
    "    g = torch.randn_like(out)\n"
    "    grads = torch.autograd.grad(out, (q, k, v), g)\n"
    "    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))\n"
    "    o64 = reference.causal_attention(q64, k64, v64, 32 ** -0.5, 0.0, True)[0]\n"
    "    torch.testing.assert_close(out.double(), o64, atol=tol, rtol=tol)\n"
    "    for a, r in zip(grads, torch.autograd.grad(o64, (q64, k64, v64), g.double())):\n"
    "        torch.testing.assert_close(a.double(), r, atol=tol * 4, rtol=tol * 4)\n"
    "# the full window (every key; SDPA's unmasked calls): ATen without is_causal, T != S too\n"
    "for dtype, tol in ((torch.float32, 2e-5), (torch.bfloat16, 3e-2)):\n"
    "    for align in ('top_left', 'bottom_right'):\n"
    "        q = torch.randn(2, 2, 40, 32, dtype=dtype, requires_grad=True)\n"
    "        k, v = (torch.randn(2, 2, 60, 32, dtype=dtype, requires_grad=True) for _ in range(2))\n"
    "        out = attnext.causal_attention(q, k, v, align=align, window_size=(-1, -1))\n"
    "        g = torch.randn_like(out)\n"
    "        grads = torch.autograd.grad(out, (q, k, v), g)\n"
    "        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))\n"
    "        o64 = reference.causal_attention(q64, k64, v64, 32 ** -0.5, 0.0, align == 'bottom_right',\n"
    "                                         window=(-1, -1))[0]\n"
    "        torch.testing.assert_close(out.double(), o64, atol=tol, rtol=tol)\n"
    "        for a, r in zip(grads, torch.autograd.grad(o64, (q64, k64, v64), g.double())):\n"
    "            torch.testing.assert_close(a.double(), r, atol=tol * 4, rtol=tol * 4)\n"
    "assert any('full window' in c for c in torch.ops.attnext._kernel_choices())\n"
    "# rows whose scores are all -inf: torch.softmax's NaN, as attnext's kernels give\n"
    "q = torch.randn(1, 300, 16).abs() + 0.1\n"
    "k, v = torch.randn(1, 300, 16), torch.randn(1, 300, 16)\n"
    "k[:, :100, 0] = float('-inf')\n"
    "out = attnext.causal_attention(q, k, v)\n"
    "ref = reference.causal_attention(q.double(), k.double(), v.double(), 0.25)[0]\n"
    "assert torch.equal(out.isnan(), ref.isnan()) and out[:, :100].isnan().all()\n"
    "choices = [c for c in torch.ops.attnext._kernel_choices() if c.startswith('attention ')]\n"
    "assert choices and all(EXPECT in c for c in choices), choices\n"
    "print('ok')\n"
)


@needs_native
@pytest.mark.parametrize("env,expect", [("0", "ATen flash attention (forced"), ("auto", "(measured on this CPU")])
def test_attention_route(env, expect):
    # ATen's kernel forced (and measured): results within SDPA's own error, derivatives
    # included, and rows of non-finite scores still follow torch.softmax.
    assert_python_ok("EXPECT = %r\n" % expect + ATEN_ROUTE, ATTNEXT_ATTENTION_KERNEL=env)


@needs_native
def test_attention_route_not_for_what_aten_cannot_compute():
    # dropout, windows, bottom-right with T > S, decode shapes and GQA views stay on
    # attnext's kernels even when ATen is forced: results equal to the forced-own run.
    code = (
        "import torch, attnext\n"
        "torch.manual_seed(0)\n"
        "q, k, v = (torch.randn(2, 4, 64, 16) for _ in range(3))\n"
        "outs = [attnext.causal_attention(q, k, v, dropout_p=0.2, generator=torch.Generator().manual_seed(1)),\n"
        "        attnext.causal_attention(q, k, v, window_size=(5, 0)),\n"
        "        attnext.causal_attention(k, q[:, :, :40], q[:, :, :40], align='bottom_right'),\n"
        "        attnext.causal_attention(q[:, :, :3], k, v, align='bottom_right'),\n"
        "        attnext.causal_attention(q, k[:, :2], v[:, :2], enable_gqa=True)]\n"
        "torch.save(outs, OUT)\n"
        "print('ok')\n"
    )
    import tempfile, os
    with tempfile.TemporaryDirectory() as d:
        a, b = os.path.join(d, "a.pt"), os.path.join(d, "b.pt")
        assert_python_ok(f"OUT = {a!r}\n" + code, ATTNEXT_ATTENTION_KERNEL="0")
        assert_python_ok(f"OUT = {b!r}\n" + code, ATTNEXT_ATTENTION_KERNEL="1")
        for x, y in zip(torch.load(a), torch.load(b)):
            assert torch.equal(x, y)


AMX_TILES = (
    "import torch, attnext\n"
    "from attnext import reference\n"
    "g = torch.Generator().manual_seed(3)\n"
    "errs = []\n"
    "# (batch, heads, q rows, keys, head size, head size of v, bottom-right, scale, q/k/v as\n"
    "# nanoGPT's strided views of one qkv): odd lengths, key tiles cut at the causal boundary\n"
    "# and at odd widths, T < S, T > S (rows that see no key), several key tiles of 256,\n"
    "# enough batches for whole-batch work items, a negative scale, 128-row tiles (T >= 1024)\n"
    "for B, H, T, S, hs, hsv, br, sc, views in (\n"
    "        (2, 3, 1, 1, 16, 16, False, None, False), (2, 3, 77, 77, 64, 32, False, None, False),\n"
    "        (2, 3, 300, 300, 64, 64, False, None, False), (2, 3, 33, 517, 128, 64, True, None, False),\n"
    "        (2, 3, 600, 600, 32, 48, False, None, False), (4, 3, 130, 130, 64, 64, False, None, True),\n"
    "        (3, 4, 97, 45, 32, 32, True, None, False), (3, 4, 70, 70, 32, 32, False, -0.3, False),\n"
    "        (1, 2, 1100, 1100, 64, 64, False, None, False)):\n"
    "    if views:\n"
    "        qkv = torch.randn(B, T, 3 * H * hs, generator=g).bfloat16()\n"
    "        q, k, v = (t.view(B, T, H, hs).transpose(1, 2).requires_grad_() for t in qkv.split(H * hs, 2))\n"
    "    else:\n"
    "        q = torch.randn(B, H, T, hs, generator=g).bfloat16().requires_grad_()\n"
    "        k = torch.randn(B, H, S, hs, generator=g).bfloat16().requires_grad_()\n"
    "        v = torch.randn(B, H, S, hsv, generator=g).bfloat16().requires_grad_()\n"
    "    scale = hs ** -0.5 if sc is None else sc\n"
    "    out = attnext.causal_attention(q, k, v, scale=scale, align='bottom_right' if br else 'top_left')\n"
    "    go = torch.randn(out.shape, generator=g).bfloat16()\n"
    "    grads = torch.autograd.grad(out, (q, k, v), go)\n"
    "    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))\n"
    "    ref = reference.causal_attention(q64, k64, v64, scale, 0.0, br)[0]\n"
    "    refs = torch.autograd.grad(ref, (q64, k64, v64), go.double())\n"
    "    errs.append((out.double() - ref).abs().max().item())\n"
    "    errs += [(a.double() - r).abs().max().item() / (r.abs().max().item() + 1.0) for a, r in zip(grads, refs)]\n"
    "kernels = attnext.explain('causal_attention', q, k, v).kernels\n"
    "torch.save((errs, kernels), OUT)\n"
    "print('ok')\n"
)


@needs_native
@pytest.mark.skipif(not torch.cpu._is_amx_tile_supported(), reason="this CPU has no AMX")
def test_amx_tiles_match_the_avx512_bf16_tiles(tmp_path):
    # The bfloat16 forward and backward on AMX (ATen's brgemm) against the float64
    # oracle (gradients: relative to 1 + their largest entry), within the error of the
    # AVX512-BF16 tiles they replace (ATTNEXT_AMX=0) on the same inputs; the kernel
    # notes name them.
    a, b = tmp_path / "amx.pt", tmp_path / "dot.pt"
    assert_python_ok(f"OUT = {str(a)!r}\n" + AMX_TILES, ATTNEXT_ATTENTION_KERNEL="1")
    assert_python_ok(f"OUT = {str(b)!r}\n" + AMX_TILES, ATTNEXT_ATTENTION_KERNEL="1", ATTNEXT_AMX="0")
    (amx, notes), (dot, dot_notes) = torch.load(a), torch.load(b)
    tiles = [n for n in notes if "attnext tiles" in n]
    assert len(tiles) >= 2 and all("AMX brgemm" in n for n in tiles), notes
    assert not any("AMX" in n for n in dot_notes), dot_notes
    for e_amx, e_dot in zip(amx, dot):
        assert e_amx <= 1.5 * e_dot + 4e-3, (amx, dot)


def _expected_bf16_tiles() -> str:
    """The name kernel_choice gives attnext's bfloat16 tiles on this CPU and environment
    (what csrc/cpu/causal_attention.cpp's own_tiles_name decides), from what the extension
    reports: the dot-product tiles where the CPU has the instructions and the ISA that
    carries them is selected, else the widened-float tiles."""
    import os

    isa, features = torch.ops.attnext._cpu_isa(), set(torch.ops.attnext._cpu_features())
    if os.environ.get("ATTNEXT_BF16_DOT") == "0":
        return "attnext tiles"
    if isa == "avx512" and "avx512bf16" in features:
        amx = torch.cpu._is_amx_tile_supported() and os.environ.get("ATTNEXT_AMX") != "0"
        return "attnext tiles (AMX brgemm)" if amx else "attnext tiles (AVX512-BF16 dot products)"
    if isa == "neon" and "bf16" in features:
        return "attnext tiles (Arm BF16 dot products, BFDOT)"
    return "attnext tiles"


@needs_native
def test_bfloat16_tiles_are_named_by_their_instructions():
    # explain names the bfloat16 tiles that ran: AVX512-BF16 (or AMX) on x86-64, the BF16
    # extension's BFDOT on AArch64 (scripts/check_aarch64.sh runs this under qemu CPUs with
    # and without it), widened float elsewhere ("attnext tiles" and then the verdict).
    import os

    if os.environ.get("ATTNEXT_ATTENTION_KERNEL") == "0":
        pytest.skip("ATTNEXT_ATTENTION_KERNEL=0: the verdicts name ATen's kernel only")
    q, k, v = (torch.randn(1, 2, 40, 64, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    out = attnext.causal_attention(q, k, v)
    out.sum().backward()
    notes = attnext.explain("causal_attention", q, k, v).kernels
    # this call's class (explain lists every bfloat16 verdict made so far)
    tiles = [n for n in notes if n.startswith("attention ") and ", bfloat16, head size <= 64, T <= 256:" in n]
    assert len(tiles) == 2, notes  # forward and backward
    want = _expected_bf16_tiles()
    others = ("AVX512-BF16", "BFDOT", "AMX")
    for n in tiles:
        assert want in n, (want, n)
        if want == "attnext tiles":  # widened: no dot-product kernel named
            assert not any(o in n for o in others), n
