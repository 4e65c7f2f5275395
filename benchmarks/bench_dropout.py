"""Dropout: attnext.dropout (counter-based mask) vs torch.nn.functional.dropout and
torch.compile of it, on the activations a lecture MultiHeadAttention drops after its
projection ((64, 256, 384), p = 0.2) and on a larger tensor. Forward and
forward+backward; GB/s counts the bytes read and written; ratios from the same run.

    python benchmarks/bench_dropout.py [--quick] [--no-compile] [--no-csv]
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

SHAPES = {"cpu": [(64, 256, 384), (16, 1024, 1024)], "cuda": [(64, 1024, 1024)]}
QUICK_SHAPES = {"cpu": [(8, 64, 128)], "cuda": [(8, 1024, 1024)]}
P = 0.2


def run(quick: bool = False, device: str = "cpu", dtypes=None, use_compile: bool = True, shapes=None) -> List[Dict]:
    rows: List[Dict] = []
    base = common.base_row(device)
    for dtype_name in dtypes or ("float32",):
        dtype = getattr(torch, dtype_name)
        for shape in shapes or (QUICK_SHAPES if quick else SHAPES)[device]:
            x = torch.randn(shape, device=device, dtype=dtype)
            g = torch.randn_like(x)
            providers = {
                "attnext": lambda t: attnext.dropout(t, P),
                "eager": lambda t: F.dropout(t, P, True),
            }
            if use_compile:
                providers["torch.compile"] = torch.compile(lambda t: F.dropout(t, P, True), fullgraph=True)
            for name, fn in providers.items():  # statistics before timing: keep rate and scale
                y = fn(x)
                kept = (y != 0).double().mean().item()
                if not abs(kept - (1 - P)) < 0.01:
                    raise RuntimeError(f"{name}: keep rate {kept:.4f}, expected {1 - P}")
            nbytes = 2 * x.numel() * x.element_size()
            for name, fn in providers.items():
                xg = x.detach().clone().requires_grad_(True)

                def fwd(fn=fn):
                    return fn(x)

                def fwd_bwd(fn=fn, xg=xg):
                    return torch.autograd.grad(fn(xg), xg, g)

                for mode, f, nb in (("fwd", fwd, nbytes), ("fwd+bwd", fwd_bwd, 2 * nbytes)):
                    t = common.time_fn(f, device, quick)
                    rows.append(dict(base, op="dropout", shape="x".join(map(str, shape)), dtype=dtype_name,
                                     mode=mode, provider=name, median_ms=round(t.median_ms, 4),
                                     iqr_ms=round(t.iqr_ms, 4),
                                     gflops_or_gbs=round(nb / (t.median_ms * 1e-3) / 1e9, 2)))
    common.add_ratios(rows)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--no-csv", action="store_true")
    args = p.parse_args(argv)
    rows = run(args.quick, args.device, None, not args.no_compile)
    common.print_table(rows, f"dropout on {common.device_name(args.device)}, torch {torch.__version__}, "
                             f"{torch.get_num_threads()} threads")
    if not args.no_csv:
        print("rows appended to", common.append_csv(rows, args.device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
