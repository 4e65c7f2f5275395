"""The README's benchmark tables, generated from benchmarks/results/<device>.csv.

For every (op, shape, dtype, mode) the newest row of each provider is taken (the
providers of one case are always measured in the same run), and the speedup of
attnext over each peer is peer median / attnext median.

    python benchmarks/report.py [benchmarks/results/cpu.csv] [--plot PNG]   # prints markdown
"""
from __future__ import annotations

import csv
import os
import sys
from collections import OrderedDict

HERE = os.path.dirname(os.path.abspath(__file__))


def latest(rows):
    out = OrderedDict()
    for r in rows:  # the file is appended in time order: later rows win
        out[(r["op"], r["shape"], r["dtype"], r["mode"], r["provider"])] = r
    return out


def markdown(path: str) -> str:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return "(no rows)"
    best = latest(rows)
    cases = OrderedDict()
    for (op, shape, dtype, mode, provider), r in best.items():
        cases.setdefault((op, shape, dtype, mode), {})[provider] = r
    lines = []
    dev = {r["device"] for r in best.values()}
    torch_v = {r["torch"] for r in best.values()}
    shas = sorted({r["git_sha"] for r in best.values()})
    lines.append(f"Machine: {', '.join(sorted(dev))}; torch {', '.join(sorted(torch_v))}; code at {', '.join(shas)}.")
    lines.append("")
    lines.append("| op | shape | dtype | mode | attnext | peers (median) | attnext speedup (peer / attnext) |")
    lines.append("|---|---|---|---|---:|---|---|")
    for (op, shape, dtype, mode), provs in cases.items():
        if "attnext" not in provs:
            continue
        mem = mode.endswith(":peak_rss_mb")
        unit = "MiB" if mem else "ms"
        ours = float(provs["attnext"]["median_ms"])
        peers, ratios = [], []
        for name, r in provs.items():
            if name == "attnext":
                continue
            v = float(r["median_ms"])
            peers.append(f"{name} {v:.3g} {unit}")
            if mem and ours > 0:
                ratios.append(f"{name} uses {v / ours:.2f}x")
            elif name != "bandwidth-floor" and ours > 0:
                ratios.append(f"{v / ours:.2f}x vs {name}")
            elif name == "bandwidth-floor" and v > 0:
                ratios.append(f"{ours / v:.2f}x the floor")
        label = mode.replace(":peak_rss_mb", " peak RSS") if mem else mode
        lines.append(f"| {op} | {shape} | {dtype} | {label} | {ours:.3g} {unit} | {'; '.join(peers)} | "
                     f"{'; '.join(ratios)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="markdown tables (and a speedup plot) from a results CSV")
    p.add_argument("csv", nargs="?", default=os.path.join(HERE, "results", "cpu.csv"))
    p.add_argument("--plot", help="also write the speedup plot (the newest row of every case) here")
    args = p.parse_args(argv)
    print(markdown(args.csv))
    if args.plot:
        sys.path.insert(0, HERE)
        import common

        with open(args.csv) as f:
            rows = list(latest(csv.DictReader(f)).values())
        print("plot:", common.plot_speedups(rows, args.plot), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
