"""Causal attention on CUDA: attnext vs F.scaled_dot_product_attention(is_causal=True).

4-D (B, nh, T, hs) inputs, where SDPA runs its flash backend, in bfloat16 and float16 at
hs 64 and 128, T 1024 to 8192, with B * nh filling the GPU; and the lecture's 3-D
(B, T, hs) inputs, where SDPA's fused kernels refuse the input and it runs its math path.
Also float32 with TF32 allowed for CUDA matmuls (dtype "float32-tf32", hs 64: attnext's
TF32 tensor-core kernels against SDPA under the same switch).
Forward and forward+backward, TFLOP/s with causal counting half, and peak memory of one
forward+backward. Ratios (peer time / attnext time) come from the same run.

    python benchmarks/bench_attention_cuda.py [--quick] [--no-csv]
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import attnext  # noqa: E402

# (batch dims, T, hs): B * nh * T kept near 2^17 rows so the GPU is full at every T
CASES_4D = [((B, 16), T, hs) for hs in (64, 128) for (B, T) in ((8, 1024), (4, 2048), (2, 4096), (1, 8192))]
CASES_3D = [((64,), 1024, 64), ((16,), 4096, 64)]
QUICK_4D = [((2, 8), 1024, 64)]
QUICK_3D = [((16,), 512, 64)]


def causal_flops(batch, T, hs, mode):
    bh = 1
    for d in batch:
        bh *= d
    fwd = 4 * bh * T * T * hs / 2  # two matmuls, causal half
    return fwd * (3.5 if mode == "fwd+bwd" else 1.0)  # backward: five matmuls, one recomputed


def providers():
    return {
        "attnext": lambda q, k, v: attnext.causal_attention(q, k, v),
        # the same op on its CUDA-core kernels (ATTNEXT_CUDA_MMA=0, set around it by run())
        "attnext-cudacore": lambda q, k, v: attnext.causal_attention(q, k, v),
        "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
    }


# ATTNEXT_CUDA_MMA per provider: the env var is read at every call, forward and backward
PROVIDER_ENV = {"attnext-cudacore": "0"}


class provider_env:
    def __init__(self, name):
        self.value = PROVIDER_ENV.get(name)

    def __enter__(self):
        self.old = os.environ.get("ATTNEXT_CUDA_MMA")
        if self.value is not None:
            os.environ["ATTNEXT_CUDA_MMA"] = self.value

    def __exit__(self, *exc):
        if self.old is None:
            os.environ.pop("ATTNEXT_CUDA_MMA", None)
        else:
            os.environ["ATTNEXT_CUDA_MMA"] = self.old


class tf32_matmuls:
    """TF32 allowed for CUDA matmuls (torch's switch, new API where it exists) inside the block."""

    def __init__(self, on):
        self.on = on

    def __enter__(self):
        if not self.on:
            return
        m = torch.backends.cuda.matmul
        self.new_api = hasattr(m, "fp32_precision")
        if self.new_api:
            self.old = m.fp32_precision
            m.fp32_precision = "tf32"
        else:
            self.old = m.allow_tf32
            m.allow_tf32 = True

    def __exit__(self, *exc):
        if not self.on:
            return
        m = torch.backends.cuda.matmul
        if self.new_api:
            m.fp32_precision = self.old
        else:
            m.allow_tf32 = self.old


def peak_mb(fn, q, k, v, g):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn(q, k, v)
    out.backward(g)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def run(quick: bool = False) -> List[Dict]:
    rows: List[Dict] = []
    base = common.base_row("cuda")
    # (label, dtype, TF32 on)
    dtypes = [("bfloat16", torch.bfloat16, False)]
    if not quick:
        dtypes += [("float16", torch.float16, False), ("float32-tf32", torch.float32, True)]
    for layout, cases in (("4d", QUICK_4D if quick else CASES_4D), ("3d", QUICK_3D if quick else CASES_3D)):
        for label, dtype, tf32 in dtypes:
            for batch, T, hs in cases:
                if tf32 and (hs != 64 or T > 4096):
                    continue  # float32 rows: one head size, within the call's time
                g = torch.Generator(device="cuda").manual_seed(0)
                q, k, v = (torch.randn(*batch, T, hs, device="cuda", dtype=dtype, generator=g).requires_grad_()
                           for _ in range(3))
                grad = torch.randn(*batch, T, hs, device="cuda", dtype=dtype, generator=g)
                ref = attnext.reference.causal_attention(q.detach().double(), k.detach().double(),
                                                         v.detach().double(), hs**-0.5)[0] if T <= 2048 else None
                shape = "x".join(map(str, (*batch, T, hs))) + f" ({layout})"
                for name, fn in providers().items():
                    with provider_env(name), tf32_matmuls(tf32):
                        if ref is not None:
                            err = (fn(q, k, v).double() - ref).abs().max().item()
                            if not err < 5e-2:
                                raise RuntimeError(f"{name} is wrong at {shape} {dtype}: max error {err:.3g}")

                        def fwd(fn=fn):
                            with torch.no_grad():
                                return fn(q, k, v)

                        def fwd_bwd(fn=fn):
                            return torch.autograd.grad(fn(q, k, v), (q, k, v), grad)

                        for mode, f in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
                            t = common.time_fn(f, "cuda", quick)
                            rows.append(dict(base, op="causal_attention", shape=shape, dtype=label,
                                             seq_len=T, mode=mode, provider=name, median_ms=round(t.median_ms, 4),
                                             iqr_ms=round(t.iqr_ms, 4),
                                             gflops_or_gbs=round(causal_flops(batch, T, hs, mode) / (t.median_ms * 1e-3) / 1e9, 1)))
                        rows.append(dict(base, op="causal_attention", shape=shape, dtype=label,
                                         seq_len=T, mode="peak-MiB", provider=name,
                                         median_ms=round(peak_mb(fn, q, k, v, grad), 1), iqr_ms=0.0, gflops_or_gbs=0.0))
                q = k = v = grad = ref = None  # noqa: F841 (free before the next case)
                torch.cuda.empty_cache()
    common.add_ratios(rows)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-csv", action="store_true")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    rows = run(args.quick)
    common.print_table(rows, f"causal_attention on {common.device_name('cuda')}, torch {torch.__version__} "
                             "(GF|GB/s column: GFLOP/s, causal half; peak-MiB rows: MiB in the median column)")
    if not args.no_csv:
        print("rows appended to", common.append_csv(rows, "cuda"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
