"""Causal softmax: attnext vs eager masked_fill + softmax vs torch.compile of it.

Modes: fwd, bwd (backward only, from a saved output), fwd+bwd. Also reports this
machine's copy bandwidth and the forward's bandwidth floor: the bytes it must move
(read the visible part of x, write all of y) at that bandwidth.

    python benchmarks/bench_causal_softmax.py [--quick] [--device cpu|cuda] [--no-compile]
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import attnext  # noqa: E402

SHAPES = {"cpu": [(384, 256, 256), (64, 1024, 1024)], "cuda": [(768, 1024, 1024), (96, 4096, 4096)]}
QUICK_SHAPES = {"cpu": [(8, 128, 128)], "cuda": [(64, 1024, 1024)]}


def visible_elements(T: int, S: int) -> int:
    return sum(min(t + 1, S) for t in range(T))


def make_eager(T: int, S: int, device: str):
    # As the lecture's Head does: a tril buffer made once, masked_fill + softmax per call.
    tril = torch.tril(torch.ones(T, S, device=device))

    def eager(x, scale):
        return torch.softmax((x * scale).masked_fill(tril == 0, float("-inf")), dim=-1)

    return eager


def copy_bandwidth(device: str, nbytes: int = 256 << 20) -> float:
    """GB/s of a large device copy into a preallocated buffer (read + write counted)."""
    a = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    b = torch.empty_like(a)
    t = common.time_fn(lambda: b.copy_(a), device)
    return 2 * nbytes / (t.median_ms * 1e-3) / 1e9


def run(quick: bool = False, device: str = "cpu", dtypes=None, use_compile: bool = True,
        shapes=None) -> List[Dict]:
    """Rows for benchmarks/results (see common.CSV_COLUMNS), attnext vs eager vs torch.compile."""
    dtypes = dtypes or ("float32",)
    rows: List[Dict] = []
    base = common.base_row(device)
    bw = copy_bandwidth(device, (32 << 20) if quick else (256 << 20))
    shapes = shapes or (QUICK_SHAPES if quick else SHAPES)[device]
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        for shape in shapes:
            B, T, S = shape
            scale = 0.125
            x = torch.randn(shape, device=device, dtype=dtype)
            g = torch.randn(shape, device=device, dtype=dtype)
            eager = make_eager(T, S, device)
            providers = {"eager": eager, "attnext": lambda x, s: attnext.causal_softmax(x, s)}
            if use_compile:
                providers["torch.compile"] = torch.compile(eager, fullgraph=True)
            # Correctness before timing.
            ref = eager(x.double(), scale)
            for name, fn in providers.items():
                err = (fn(x, scale).double() - ref).abs().max().item()
                tol = 1e-5 if dtype == torch.float32 else 2e-2
                if not err <= tol:
                    raise RuntimeError(f"{name} is wrong at {shape} {dtype_name}: max error {err:.3g}")
            itemsize = x.element_size()
            vis = B * visible_elements(T, S)
            fwd_bytes = (vis + B * T * S) * itemsize  # read visible x, write all of y
            bwd_bytes = (2 * vis + B * T * S) * itemsize  # read visible dy and y, write all of dx
            for name, fn in providers.items():
                xg = x.detach().clone().requires_grad_(True)
                y_saved = fn(xg, scale)

                def fwd():
                    return fn(x, scale)

                def bwd():
                    return torch.autograd.grad(y_saved, xg, g, retain_graph=True)

                def fwd_bwd():
                    return torch.autograd.grad(fn(xg, scale), xg, g)

                modes = [("fwd", fwd, fwd_bytes), ("bwd", bwd, bwd_bytes), ("fwd+bwd", fwd_bwd, fwd_bytes + bwd_bytes)]
                if name == "torch.compile":
                    # A compiled backward donates its buffers and cannot be re-run from a
                    # retained graph, so it is timed only as part of fwd+bwd.
                    modes = [m for m in modes if m[0] != "bwd"]
                for mode, f, nbytes in modes:
                    t = common.time_fn(f, device, quick)
                    rows.append(dict(base, op="causal_softmax", shape="x".join(map(str, shape)), dtype=dtype_name,
                                     seq_len=T, mode=mode, provider=name, median_ms=round(t.median_ms, 4),
                                     iqr_ms=round(t.iqr_ms, 4), gflops_or_gbs=round(nbytes / (t.median_ms * 1e-3) / 1e9, 2)))
            floor_ms = fwd_bytes / (bw * 1e9) * 1e3
            rows.append(dict(base, op="causal_softmax", shape="x".join(map(str, shape)), dtype=dtype_name,
                             mode="fwd", provider="bandwidth-floor", median_ms=round(floor_ms, 4), iqr_ms=0.0,
                             gflops_or_gbs=round(bw, 2)))
    common.add_ratios(rows)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small shapes, short timings (a smoke run)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", action="append", choices=["float32", "bfloat16", "float16", "float64"])
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer")
    p.add_argument("--no-csv", action="store_true", help="do not append to benchmarks/results")
    args = p.parse_args(argv)
    rows = run(args.quick, args.device, tuple(args.dtype or ["float32"]), not args.no_compile)
    common.print_table(rows, f"causal_softmax on {common.device_name(args.device)}, torch {torch.__version__}, "
                             f"{torch.get_num_threads()} threads")
    if not args.no_csv and (not args.quick or args.device == "cuda"):
        print("appended to", common.append_csv(rows, args.device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
