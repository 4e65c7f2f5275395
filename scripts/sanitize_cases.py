"""Small CUDA cases of every attnext CUDA kernel, for compute-sanitizer.

    compute-sanitizer --tool memcheck python scripts/sanitize_cases.py
    compute-sanitizer --tool racecheck python scripts/sanitize_cases.py --no-cublas

Each case must reach attnext's own CUDA kernel, not the eager fallback: the script
stops if attnext.explain() gives a reason. A few results are checked on the way
(NaN rows, rows that see no key, float64 matmul against torch), so that a kernel
that runs clean but computes the wrong thing fails here too.

--no-cublas leaves out matmul, whose GEMMs are cuBLAS's kernels: racecheck and
synccheck are about the shared memory and barriers of attnext's own kernels, while
memcheck should also see matmul (its strides and leading dims decide what cuBLAS reads).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import attnext  # noqa: E402

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def native(op, *tensors):
    reasons = attnext.explain(op, *tensors)
    assert not reasons, f"{op} would not run its CUDA kernel: {reasons}"


def softmax_case(x, align, scale=0.5):
    x = x.detach().requires_grad_()
    native("causal_softmax", x)
    y = attnext.causal_softmax(x, scale, align=align)
    y.backward(torch.randn_like(y))
    return y


def softmax_cases():
    for dtype in DTYPES:
        opts = dict(device="cuda", dtype=dtype)
        # warp path (S <= 1024, several per-lane widths), block path (S > 1024), S = 1
        for shape in ((2, 3, 7, 5), (2, 33, 33), (1, 40, 1500), (3, 1)):
            for align in ("top_left", "bottom_right"):
                softmax_case(torch.randn(shape, **opts), align)
        # bottom-right with T > S: the first T - S rows see no key and are zeros
        for S in (4, 1100):
            y = softmax_case(torch.randn(2, S + 3, S, **opts), "bottom_right")
            assert (y[:, :3] == 0).all(), "rows that see no key must be zeros"
        # strided views: transposed batch dims (unit-stride rows, read in place) and a
        # transposed matrix (non-unit last stride, copied first)
        for S in (40, 1100):
            softmax_case(torch.randn(2, 8, 3, S, **opts).transpose(1, 2), "top_left")
            softmax_case(torch.randn(2, S, 8, **opts).transpose(-1, -2), "bottom_right")
        # a NaN in a row's visible part makes the whole row NaN, as torch.softmax does,
        # on both paths; row 3 sees x[0:4], so one thread of the block path meets only the NaN
        for S in (40, 1500):
            x = torch.randn(2, 6, S, **opts)
            x[0, 3, 1] = float("nan")
            x[1, 5, 0] = float("nan")
            x[1, 2, 4] = float("nan")  # above the diagonal: never read
            y = softmax_case(x, "top_left")
            assert torch.isnan(y[0, 3]).all() and torch.isnan(y[1, 5]).all(), "a NaN row must be NaN throughout"
            nan_rows = torch.isnan(y).any(-1)
            assert nan_rows.sum().item() == 2, f"unexpected NaN rows: {nan_rows.nonzero().tolist()}"


def mean_cases():
    for dtype in DTYPES:
        opts = dict(device="cuda", dtype=dtype)
        for x in (
            torch.randn(2, 3, 7, 5, **opts),
            torch.randn(2, 7, 3, 5, **opts).transpose(1, 2),  # strided batch / T dims
            torch.randn(2, 5, 7, **opts).transpose(-1, -2),  # non-unit last stride: copied
            torch.randn(1, 300, **opts),
        ):
            x = x.detach().requires_grad_()
            native("causal_mean", x)
            y = attnext.causal_mean(x)
            y.backward(torch.randn_like(y))


def matmul_cases():
    for dtype in DTYPES:
        opts = dict(device="cuda", dtype=dtype)
        pairs = (
            ((2, 3, 4, 5), (5, 6)),  # x @ W: folded into one GEMM
            ((3, 1, 4, 5), (2, 5, 6)),  # batch dims broadcast both ways
            ((5,), (2, 5, 3)),  # vector @ batch
            ((4, 5), (5,)),  # matrix @ vector
            ((5,), (5,)),  # dot
        )
        cases = [(torch.randn(sa, **opts), torch.randn(sb, **opts)) for sa, sb in pairs]
        # a transposed operand ('T' for cuBLAS), an expanded one (batch stride 0), a sliced one
        cases.append((torch.randn(2, 4, 5, **opts), torch.randn(2, 6, 5, **opts).transpose(-1, -2)))
        cases.append((torch.randn(1, 4, 5, **opts).expand(3, 4, 5), torch.randn(3, 5, 2, **opts)))
        cases.append((torch.randn(3, 4, 9, **opts)[..., ::2], torch.randn(5, 2, **opts)))
        for a, b in cases:
            a = a.detach().requires_grad_()
            b = b.detach().requires_grad_()
            native("matmul", a, b)
            y = attnext.matmul(a, b)
            y.backward(torch.randn_like(y))
            if dtype == torch.float64:
                torch.testing.assert_close(y, torch.matmul(a, b))
        # the backward op with one gradient left out and a non-contiguous grad
        a, b = torch.randn(3, 1, 4, 5, **opts), torch.randn(2, 5, 6, **opts)
        g = torch.randn(3, 2, 6, 4, **opts).transpose(-1, -2)
        ga, gb = torch.ops.attnext._matmul_backward(g, a, b, [True, False])
        assert ga.shape == a.shape and gb.shape == (0,)


def attention_cases():
    # Runs once the build has a CUDA causal_attention (csrc/cuda/causal_attention.cu).
    if "cuda" not in attnext.ops._DEVICES.get("causal_attention", ()):
        print("causal_attention: no CUDA kernel in this build, not sanitized")
        return
    for dtype in DTYPES:
        opts = dict(device="cuda", dtype=dtype)
        cases = (
            (torch.randn(2, 3, 17, 16, **opts), torch.randn(2, 3, 17, 16, **opts), torch.randn(2, 3, 17, 8, **opts)),
            # bottom-right with T > S (queries that see no key) and transposed (nanoGPT) views
            (
                torch.randn(2, 40, 3, 16, **opts).transpose(1, 2),
                torch.randn(2, 33, 3, 16, **opts).transpose(1, 2),
                torch.randn(2, 33, 3, 16, **opts).transpose(1, 2),
            ),
        )
        for q, k, v in cases:
            if attnext.explain("causal_attention", q, k, v):
                continue  # a dtype without a native CUDA kernel: nothing of attnext's to check
            for align in ("top_left", "bottom_right"):
                for p in (0.0, 0.25):
                    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
                    out = attnext.causal_attention(q, k, v, dropout_p=p, align=align)
                    out.backward(torch.randn_like(out))


def attention_mma_cases():
    # The tensor-core kernels (float16 / bfloat16, and float32 as TF32 with torch's TF32 switch for
    # CUDA matmuls on; sm_80+): ATTNEXT_CUDA_MMA=require makes any
    # call they cannot take an error, so each case below really runs them. Small shapes that still
    # cover several query and key tiles, both pipelines' prefetch, partial tiles, rows that see no
    # key (bottom-right, T > S), nanoGPT views, a head size that is zero-padded (80 -> 96), dropout.
    if "cuda" not in attnext.ops._DEVICES.get("causal_attention", ()):
        return
    if torch.cuda.get_device_capability()[0] < 8:
        print("causal_attention tensor-core kernels: need sm_80+, not sanitized")
        return
    old = os.environ.get("ATTNEXT_CUDA_MMA")
    os.environ["ATTNEXT_CUDA_MMA"] = "require"
    matmul = torch.backends.cuda.matmul
    new_api = hasattr(matmul, "fp32_precision")
    old_tf32 = matmul.fp32_precision if new_api else matmul.allow_tf32
    if new_api:
        matmul.fp32_precision = "tf32"
    else:
        matmul.allow_tf32 = True
    try:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            opts = dict(device="cuda", dtype=dtype)
            for T, S, hs in ((70, 90, 64), (90, 70, 128), (130, 130, 80), (1, 1, 16)):
                cases = (
                    [torch.randn(2, n, hs, **opts) for n in (T, S, S)],
                    [torch.randn(2, n, 2, hs, **opts).transpose(1, 2) for n in (T, S, S)],
                )
                for q, k, v in cases:
                    for align in ("top_left", "bottom_right"):
                        for p in (0.0, 0.25):
                            q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
                            out = attnext.causal_attention(q, k, v, dropout_p=p, align=align)
                            out.backward(torch.randn_like(out))
            # head sizes 160 (class 192) and 256: dK / dV columns split over two blocks
            for hs in (160, 256):
                q, k, v = (torch.randn(1, 2, 70, hs, **opts).requires_grad_() for _ in range(3))
                out = attnext.causal_attention(q, k, v, dropout_p=0.25, align="bottom_right")
                out.backward(torch.randn_like(out))
                assert torch.isfinite(out).all() and torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()
    finally:
        if new_api:
            matmul.fp32_precision = old_tf32
        else:
            matmul.allow_tf32 = old_tf32
        if old is None:
            del os.environ["ATTNEXT_CUDA_MMA"]
        else:
            os.environ["ATTNEXT_CUDA_MMA"] = old


def attention_window_cases():
    # window_size on both kernel families (ATTNEXT_CUDA_MMA=0: CUDA cores, every dtype;
    # =require: tensor cores, 16-bit types, sm_80+): sliding windows narrower and wider
    # than a key tile (key tiles skipped, query ranges of the dK/dV blocks cut on both
    # sides), full attention, a band right of the diagonal, rows that see no key (bottom-
    # right T > S; (3, -1) top-left with T > S), grouped-query stride-0 k/v, packed qkv.
    if "cuda" not in attnext.ops._DEVICES.get("causal_attention", ()):
        return
    windows = ((10, 0), (70, 0), (-1, -1), (7, 5), (3, -1))
    paths = [("0", DTYPES)]
    if torch.cuda.get_device_capability()[0] >= 8:
        paths.append(("require", (torch.bfloat16, torch.float16)))
    old = os.environ.get("ATTNEXT_CUDA_MMA")
    try:
        for mode, dtypes in paths:
            os.environ["ATTNEXT_CUDA_MMA"] = mode
            for dtype in dtypes:
                opts = dict(device="cuda", dtype=dtype)
                for T, S, align in ((150, 150, "top_left"), (70, 200, "bottom_right"), (150, 70, "bottom_right"),
                                    (150, 70, "top_left")):
                    for window in windows:
                        q, k, v = (torch.randn(2, n, 64, **opts).requires_grad_() for n in (T, S, S))
                        native_window("causal_attention", window, q, k, v)
                        out = attnext.causal_attention(q, k, v, align=align, window_size=window, dropout_p=0.1)
                        out.backward(torch.randn_like(out))
                        assert not torch.isnan(out).any() and not torch.isnan(k.grad).any(), (mode, dtype, window)
                # grouped-query heads: k, v expanded over each group with stride 0
                q = torch.randn(1, 4, 90, 64, **opts).requires_grad_()
                k, v = (torch.randn(1, 2, 90, 64, **opts).requires_grad_() for _ in range(2))
                out = attnext.causal_attention(q, k, v, enable_gqa=True, window_size=(20, 0))
                out.backward(torch.randn_like(out))
                qkv = torch.randn(2, 90, 3, 2, 64, **opts).requires_grad_()
                native_window("causal_attention_qkvpacked", (16, 0), qkv)
                out = attnext.causal_attention_qkvpacked(qkv, window_size=(16, 0))
                out.backward(torch.randn_like(out))
    finally:
        if old is None:
            os.environ.pop("ATTNEXT_CUDA_MMA", None)
        else:
            os.environ["ATTNEXT_CUDA_MMA"] = old


def native_window(op, window, *tensors):
    reasons = attnext.explain(op, *tensors, window_size=window)
    assert not reasons, f"{op} with window_size={window} would not run its CUDA kernel: {reasons}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--no-cublas", action="store_true", help="leave out matmul (cuBLAS kernels)")
    args = p.parse_args()
    assert torch.cuda.is_available(), "needs a GPU"
    assert attnext.native_available(), "attnext._C is not built"
    torch.manual_seed(0)
    softmax_cases()
    mean_cases()
    attention_cases()
    attention_mma_cases()
    attention_window_cases()
    if not args.no_cublas:
        matmul_cases()
    torch.cuda.synchronize()
    print("sanitizer cases ran")


if __name__ == "__main__":
    main()
