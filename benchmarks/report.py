"""Every benchmark table and figure in the docs, generated from benchmarks/results/*.csv.

Rows are grouped by machine (the CSV's `device` column), whatever file they are in, so a
new results file (benchmarks/results/cpu-<model>.csv, <gpu>.csv) needs no code change.
For every (machine, op, shape, dtype, mode) attnext's newest row is taken with the peers
of the same run (same `date`; a peer the bench no longer runs at that shape is dropped,
not compared across runs); attnext's speedup over a peer is peer median / attnext
median, and for peak-memory modes peer MiB / attnext MiB. The README's headline ends
with the slowest row of each machine over every timed case and peer.

    python benchmarks/report.py [CSV ...]            # full markdown tables on stdout
    python benchmarks/report.py --headline [CSV ...] # the README's short table
    python benchmarks/report.py --plots [CSV ...]    # figures into benchmarks/results/ (--figures-dir)
    python benchmarks/report.py --write              # all three, into README.md and docs/benchmarks.md
    python benchmarks/report.py --check              # exit 1 if those files are out of date

Without CSV arguments: every benchmarks/results/*.csv whose rows were measured on a CPU
(device `cpu-...`); name a GPU file to include it.

Figures, per machine and op: `<machine>_<op>.png`, grouped bars of the speedup (one group
per shape, one bar per peer, a line at 1.0x, one panel per dtype and mode);
`<machine>_<op>_memory.png`, the same for peak memory; `<machine>_<op>_vs_T.png`, speedup
against T, only where the CSV holds a sweep (three or more T at otherwise equal shapes),
or `<machine>_decode_vs_S.png` against the KV length S for decode and decode_gqa together
(where attnext crosses over SDPA): bars at fixed shapes, curves only where the x axis is
a real quantity.
Rows of op `memcpy` (the machine's copy bandwidth, measured by bench_decode.py) give a
line under the machine's tables.
"""
from __future__ import annotations

import csv
import glob
import math
import os
import re
import sys
import textwrap
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
FIGURES = RESULTS  # where figures go (--figures-dir)
MEM_SUFFIX = ":peak_rss_mb"
NOT_A_PEER = ("bandwidth-floor", "gemm-ceiling")  # bounds measured in the same run, not competitors
# The unit of the gflops_or_gbs column, as each benchmark script writes it.
RATE_UNIT = {"causal_softmax": "GB/s", "dropout": "GB/s", "causal_mean": "GB/s", "matmul": "GFLOP/s",
             "causal_attention": "GFLOP/s", "decode": "GB/s", "decode_gqa": "GB/s", "chunked_prefill": "GFLOP/s",
             "CausalSelfAttention": "GFLOP/s", "memcpy": "GB/s"}
# Named dims of the ops whose shape column is positional ("384x256x256", "(8,2048,256)").
POSITIONAL_DIMS = {"causal_softmax": ("B", "T", "S"), "causal_mean": ("B", "T", "C"), "dropout": ("B", "T", "C")}
SWEEP_AXES = ("T", "S")
# The swept dimension of each op's curves (default T, with S = T for the square ops).
SWEEP_AXIS = {"decode": "S", "decode_gqa": "S"}
AXIS_LABEL = {"T": "T (sequence length)", "S": "S (KV cache length)"}
FIGURE_KINDS = ("", "_memory", "_vs_T", "_vs_S")
# {op: the op whose curves figure it is drawn in}: GQA decoding next to plain decoding
CURVE_GROUPS = {"decode_gqa": "decode"}
HEADLINE_FIGURE_OP = "causal_attention"  # the README shows this op's figure for each machine
MIN_SWEEP_POINTS = 3

Case = Tuple[str, str, str, str]  # (op, shape, dtype, mode)


# ---------------------------------------------------------------------------- rows

def default_files() -> List[str]:
    """Every results CSV whose rows were measured on a CPU."""
    out = []
    for path in sorted(glob.glob(os.path.join(RESULTS, "*.csv"))):
        with open(path, newline="") as f:
            devices = {r.get("device", "") for r in csv.DictReader(f)}
        if devices and all(d.startswith("cpu") for d in devices):
            out.append(path)
    return out


def load(paths: Sequence[str]) -> "OrderedDict[str, Dict]":
    """{machine: {"cases": {case: {provider: row}}, "files": [...]}}, newest row per provider."""
    machines: "OrderedDict[str, Dict]" = OrderedDict()
    for path in paths:
        with open(path, newline="") as f:
            for r in csv.DictReader(f):  # each file is appended in time order: later rows win
                m = machines.setdefault(r["device"], {"cases": OrderedDict(), "files": [], "copy": OrderedDict()})
                if path not in m["files"]:
                    m["files"].append(path)
                if r["op"] == "memcpy":  # the machine's copy bandwidth: no attnext, not a case
                    m["copy"][r["shape"]] = r
                    continue
                m["cases"].setdefault((r["op"], r["shape"], r["dtype"], r["mode"]), {})[r["provider"]] = r
    for m in machines.values():
        # a case's peers are those of attnext's newest run (one date per run): a peer the
        # bench no longer runs at that shape keeps its old row, which is not a comparison
        m["cases"] = OrderedDict(
            (k, OrderedDict((p, r) for p, r in v.items() if r["date"] == v["attnext"]["date"]))
            for k, v in m["cases"].items() if "attnext" in v)
    return OrderedDict(sorted(machines.items(), key=lambda kv: (not kv[0].startswith("cpu"), kv[0])))


def median(r: Dict) -> float:
    try:
        return float(r["median_ms"])
    except (TypeError, ValueError):
        return float("nan")


def ratios(provs: Dict[str, Dict]) -> "OrderedDict[str, float]":
    """{peer: peer / attnext} (time: speedup; memory: how many times attnext's peak)."""
    ours = median(provs["attnext"])
    out = OrderedDict()
    for name, r in provs.items():
        v = median(r)
        if name == "attnext" or name in NOT_A_PEER or not (ours > 0) or math.isnan(v):
            continue
        out[name] = v / ours
    return out


def is_mem(mode: str) -> bool:
    return mode.endswith(MEM_SUFFIX)


def mode_label(mode: str) -> str:
    return mode.replace(MEM_SUFFIX, " peak RSS")


def torch_versions(m: Dict) -> str:
    return ", ".join(sorted({r["torch"] for provs in m["cases"].values() for r in provs.values()}))


def shas(m: Dict) -> str:
    return ", ".join(sorted({provs["attnext"]["git_sha"] for provs in m["cases"].values()}))


def rel(path: str, start: str) -> str:
    return os.path.relpath(path, start).replace(os.sep, "/")


def safe_name(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "", s.replace(" ", "-"))


def fmt_x(v: float) -> str:
    return f"{v:.2f}x" if v < 100 else f"{v:.0f}x"


# ---------------------------------------------------------------------------- tables

def machine_tables(machine: str, m: Dict, figure_dir: Optional[str] = None) -> str:
    """The full speed and memory tables of one machine (and its figures, if figure_dir)."""
    files = ", ".join(f"`{rel(p, ROOT)}`" for p in m["files"])
    lines = [f"### {machine}", "",
             f"torch {torch_versions(m)}; attnext at {shas(m)}; rows from {files}.", ""]
    speed = [(c, p) for c, p in m["cases"].items() if not is_mem(c[3])]
    mem = [(c, p) for c, p in m["cases"].items() if is_mem(c[3])]
    if speed:
        lines += ["| op | shape | dtype | mode | attnext median (IQR) | attnext rate | peers (median) | "
                  "speedup (peer / attnext) |", "|---|---|---|---|---:|---:|---|---|"]
        for (op, shape, dtype, mode), provs in speed:
            a = provs["attnext"]
            iqr = a.get("iqr_ms", "")
            iqr_s = f" ({float(iqr):.2g})" if iqr not in ("", "nan") and not math.isnan(float(iqr)) else ""
            rate = a.get("gflops_or_gbs", "")
            rate_s = (f"{float(rate):.3g} {RATE_UNIT.get(op, '')}".strip()
                      if rate not in ("", "nan") and not math.isnan(float(rate)) and float(rate) > 0 else "")
            peers = "; ".join(f"{n} {median(r):.3g} ms" for n, r in provs.items() if n != "attnext")
            rs = [f"{fmt_x(v)} vs {n}" for n, v in ratios(provs).items()]
            for n in NOT_A_PEER:
                if n in provs and median(provs[n]) > 0:
                    rs.append(f"{median(a) / median(provs[n]):.2f}x the {n} (time / floor)")
            lines.append(f"| {op} | {shape} | {dtype} | {mode} | {median(a):.3g} ms{iqr_s} | {rate_s} | {peers} | "
                         f"{'; '.join(rs)} |")
        lines.append("")
    for shape, r in m.get("copy", {}).items():
        lines += [f"Copy bandwidth (`dst.copy_(src)` of {shape} float32 into a preallocated `dst`, read + write "
                  f"bytes counted; the `bandwidth-floor` rows read K and V at this rate): "
                  f"{float(r['gflops_or_gbs']):.3g} GB/s ({r['date'][:10]}).", ""]
    if mem:
        lines += ["Peak memory: growth of the process's peak RSS over one step, in a fresh process.", "",
                  "| op | shape | dtype | mode | attnext | peers | peer / attnext |", "|---|---|---|---|---:|---|---|"]
        for (op, shape, dtype, mode), provs in mem:
            peers = "; ".join(f"{n} {median(r):.3g} MiB" for n, r in provs.items() if n != "attnext")
            rs = "; ".join(f"{n} {v:.2f}x" for n, v in ratios(provs).items())
            lines.append(f"| {op} | {shape} | {dtype} | {mode_label(mode)} | {median(provs['attnext']):.3g} MiB | "
                         f"{peers} | {rs} |")
        lines.append("")
    if figure_dir is not None:
        for op in ops_of(m):
            for kind, title in (("", "speedup"), ("_memory", "peak memory"), ("_vs_T", "speedup against T"),
                                ("_vs_S", "speedup against S")):
                path = os.path.join(FIGURES, f"{safe_name(machine)}_{safe_name(op)}{kind}.png")
                if os.path.exists(path) and path in _written:
                    lines += [f"![{op}, {title}, {machine}]({rel(path, figure_dir)})", ""]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def markdown(machines: "OrderedDict[str, Dict]", figure_dir: Optional[str] = None) -> str:
    if not machines:
        return "(no rows)\n"
    return "\n".join(machine_tables(name, m, figure_dir) for name, m in machines.items())


def ops_of(m: Dict) -> List[str]:
    return list(OrderedDict.fromkeys(c[0] for c in m["cases"]))


def lowest_row(m: Dict) -> Optional[Tuple[float, Case, str]]:
    """The smallest peer / attnext time ratio over a machine's timed cases (memory rows
    excluded): (ratio, case, peer), or None without any peer."""
    rows = [(v, case, peer) for case, provs in m["cases"].items() if not is_mem(case[3])
            for peer, v in ratios(provs).items()]
    return min(rows) if rows else None


def headline(machines: "OrderedDict[str, Dict]", link: str = "docs/benchmarks.md",
             figure_dir: Optional[str] = None) -> str:
    """One row per (op, dtype), one column per machine: fwd+bwd speedup over the fastest
    peer measured in the same run, lowest to highest over the shapes measured."""
    cells: "OrderedDict[Tuple[str, str], Dict[str, str]]" = OrderedDict()
    for name, m in machines.items():
        per: "OrderedDict[Tuple[str, str], List[Tuple[float, str]]]" = OrderedDict()
        for (op, shape, dtype, mode), provs in m["cases"].items():
            if mode != "fwd+bwd":
                continue
            rs = ratios(provs)
            if not rs:
                continue
            peer = min(rs, key=rs.get)  # the fastest peer gives the smallest ratio
            per.setdefault((op, dtype), []).append((rs[peer], peer))
        for key, vals in per.items():
            (lo, lo_peer), (hi, hi_peer) = min(vals), max(vals)
            if len(vals) == 1:
                cell = f"{fmt_x(lo)} ({lo_peer})"
            elif len({p for _, p in vals}) == 1:
                cell = f"{fmt_x(lo)[:-1]}-{fmt_x(hi)} ({lo_peer})"
            else:  # the fastest peer differs between shapes: name it at both ends
                cell = f"{fmt_x(lo)} ({lo_peer}) to {fmt_x(hi)} ({hi_peer})"
            cells.setdefault(key, {})[name] = cell
    if not cells:
        return "(no rows)\n"
    names = list(machines)
    lines = ["| op | dtype | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for (op, dtype), row in cells.items():
        lines.append(f"| {op} | {dtype} | " + " | ".join(row.get(n, "not measured") for n in names) + " |")
    lines += ["", "Forward+backward, attnext's speedup over the fastest peer measured in the same run "
              "(named in brackets), lowest to highest over the shapes measured; "
              f"every shape, mode and peer: [{link}]({link})."]
    slowest = [(name, lowest_row(m)) for name, m in machines.items()]
    if any(low is not None for _, low in slowest):
        lines += ["", "The slowest row of each CPU, over every shape, mode (forward too) and peer:", ""]
        for name, low in slowest:
            if low is not None:
                v, (op, shape, dtype, mode), peer = low
                lines.append(f"- {name}: {fmt_x(v)} vs {peer}, {op} {shape} {dtype} {mode_label(mode)}")
    if figure_dir is not None:  # the headline op's figure of each machine
        for name in names:
            path = os.path.join(FIGURES, f"{safe_name(name)}_{HEADLINE_FIGURE_OP}.png")
            if path in _written and os.path.exists(path):
                lines += ["", f"![{HEADLINE_FIGURE_OP} speedups, {name}]({rel(path, figure_dir)})"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- figures

_written: set = set()


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _wrap(shape: str) -> str:
    if "@" in shape:
        return shape.replace("@", "\n@ ")
    return "\n".join(textwrap.wrap(shape.replace(",", ", "), 18)).replace(", ", ",")


def _bars(plt, machine: str, m: Dict, op: str, memory: bool, path: str) -> Optional[str]:
    panels: "OrderedDict[Tuple[str, str], List[Tuple[str, Dict[str, float]]]]" = OrderedDict()
    for (o, shape, dtype, mode), provs in m["cases"].items():
        if o != op or is_mem(mode) != memory:
            continue
        rs = ratios(provs)
        if rs:
            panels.setdefault((dtype, mode), []).append((shape, rs))
    if not panels:
        return None
    dtypes = list(OrderedDict.fromkeys(d for d, _ in panels))
    modes = list(OrderedDict.fromkeys(md for _, md in panels))
    peers = list(OrderedDict.fromkeys(p for groups in panels.values() for _, rs in groups for p in rs))
    colors = {p: plt.cm.tab10(i % 10) for i, p in enumerate(peers)}
    nbars = max(len(rs) for groups in panels.values() for _, rs in groups)
    ngroups = max(len(g) for g in panels.values())
    # One row per dtype, one column per mode.
    what = "each peer's peak memory as a multiple of attnext's" if memory else "speedup of attnext over each peer"
    title = f"{op}: {what} (dashed: 1.0x)\n{machine}, torch {torch_versions(m)}; dtype: {', '.join(dtypes)}"
    width = max(4.6, min(7.0, 1.2 + 0.45 * ngroups * max(2, nbars))) * len(modes)
    width = max(width, 0.08 * max(len(line) for line in title.split("\n")))  # the title fits (10 pt)
    fig, axes = plt.subplots(len(dtypes), len(modes), squeeze=False, figsize=(width, 3.3 * len(dtypes) + 1.0))
    for i, dtype in enumerate(dtypes):
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            groups = panels.get((dtype, mode))
            if not groups:
                ax.axis("off")
                continue
            vals = [v for _, rs in groups for v in rs.values()]
            log = max(vals) / max(min(vals), 1e-9) > 20 or max(vals) > 50
            width = 0.8 / max(2, max(len(rs) for _, rs in groups))
            for g, (shape, rs) in enumerate(groups):
                for b, (peer, v) in enumerate(rs.items()):
                    x = g + (b - (len(rs) - 1) / 2) * width
                    ax.bar(x, v, width * 0.92, color=colors[peer])
                    ax.annotate(fmt_x(v), (x, v), ha="center", va="bottom", fontsize=7, xytext=(0, 1),
                                textcoords="offset points")
            ax.axhline(1.0, color="black", lw=1.0, ls="--")
            if log:
                ax.set_yscale("log")
                ax.set_ylim(min(0.5, min(vals) / 1.5), max(vals) * 2.5)
            else:
                ax.set_ylim(0, max(max(vals), 1.0) * 1.15)
            ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}x"))
            ax.yaxis.set_minor_formatter(plt.NullFormatter())
            ax.set_xlim(-0.6, len(groups) - 0.4)
            ax.set_xticks(range(len(groups)))
            ax.set_xticklabels([_wrap(s) for s, _ in groups], fontsize=7)
            ax.set_title(f"{dtype}, {mode_label(mode)}", fontsize=9)
            ax.set_ylabel("peer MiB / attnext MiB" if memory else "peer time / attnext time", fontsize=8)
            ax.tick_params(axis="y", labelsize=7)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[p]) for p in peers]
    fig.legend(handles, [f"vs {p}" for p in peers], loc="upper center", bbox_to_anchor=(0.5, 1.0 - 0.48 / fig.get_figheight()),
               ncol=min(len(peers), 5), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1.0 - 0.3 / fig.get_figheight()))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parse_shape(op: str, shape: str) -> Optional[Dict[str, str]]:
    if "=" in shape:
        return dict(kv.split("=", 1) for kv in shape.split(",") if "=" in kv)
    dims = POSITIONAL_DIMS.get(op)
    parts = re.findall(r"\d+", shape)
    if dims and len(parts) == len(dims) and "@" not in shape:
        return dict(zip(dims, parts))
    return None


def sweeps(m: Dict, op: str) -> "OrderedDict[Tuple, List[Tuple[int, Dict[str, float]]]]":
    """{(dtype, mode, fixed params): [(x, {peer: speedup})]} with MIN_SWEEP_POINTS or more
    values x of the op's sweep axis (SWEEP_AXIS: T, or S for the decode ops)."""
    axis = SWEEP_AXIS.get(op, "T")
    varying = SWEEP_AXES if axis == "T" else (axis,)  # T sweeps of the square ops move S with T
    out: "OrderedDict[Tuple, List[Tuple[int, Dict[str, float]]]]" = OrderedDict()
    for (o, shape, dtype, mode), provs in m["cases"].items():
        p = parse_shape(o, shape) if o == op and not is_mem(mode) else None
        if not p or axis not in p:
            continue
        fixed = tuple((k, v) for k, v in p.items() if k not in varying)
        out.setdefault((dtype, mode, fixed), []).append((int(p[axis]), ratios(provs)))
    return OrderedDict((k, sorted(v)) for k, v in out.items() if len({t for t, _ in v}) >= MIN_SWEEP_POINTS)


def _curves(plt, machine: str, m: Dict, ops: Sequence[str], path: str) -> Optional[str]:
    """attnext's speedup over each peer against the sweep axis of `ops` (one op, or a
    CURVE_GROUPS group drawn together): one panel per (dtype, mode), one line per
    (op, fixed shape, peer)."""
    axis = SWEEP_AXIS.get(ops[0], "T")
    panels: "OrderedDict[Tuple[str, str], List[Tuple[str, str, List[Tuple[int, float]]]]]" = OrderedDict()
    for op in ops:
        for (dtype, mode, fixed), pts in sweeps(m, op).items():
            fixed_s = ",".join(f"{k}={v}" for k, v in fixed)
            for peer in OrderedDict.fromkeys(p for _, rs in pts for p in rs):
                xy = [(x, rs[peer]) for x, rs in pts if peer in rs]
                if len(xy) >= MIN_SWEEP_POINTS:  # a peer measured at one or two points is no curve
                    label = f"vs {peer}" if len(ops) == 1 else f"{op} vs {peer}"
                    panels.setdefault((dtype, mode), []).append((label, fixed_s, xy))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), squeeze=False, figsize=(5.4 * len(panels), 4.2))
    for ax, ((dtype, mode), lines) in zip(axes[0], panels.items()):
        one_shape = len({f for _, f, _ in lines}) == 1
        for label, fixed_s, xy in lines:
            ax.plot([x for x, _ in xy], [y for _, y in xy], marker="o",
                    label=label if one_shape else f"{label}: {fixed_s}")
        ax.axhline(1.0, color="black", lw=1.0, ls="--")
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.set_xlabel(AXIS_LABEL[axis])
        ax.set_ylabel("peer time / attnext time")
        ax.set_title(f"{dtype}, {mode}" + (f"; {lines[0][1]}" if one_shape else ""), fontsize=9)
        ax.legend(fontsize=7)
    what = ", ".join(ops)
    fig.suptitle(f"{what}: attnext's speedup against {axis} (dashed: 1.0x)\n{machine}, torch {torch_versions(m)}; "
                 f"dtype: {', '.join(OrderedDict.fromkeys(d for d, _ in panels))}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plots(machines: "OrderedDict[str, Dict]") -> List[str]:
    """Write every figure; returns their paths (empty if matplotlib is missing)."""
    plt = _plt()
    if plt is None:
        print("report.py: matplotlib is not installed (pip install -e '.[bench]'): no figures", file=sys.stderr)
        return []
    out = []
    for machine, m in machines.items():
        for op in ops_of(m):
            base = os.path.join(FIGURES, f"{safe_name(machine)}_{safe_name(op)}")
            group = [op] + [o for o, head in CURVE_GROUPS.items() if head == op]
            for p in (_bars(plt, machine, m, op, False, base + ".png"),
                      _bars(plt, machine, m, op, True, base + "_memory.png"),
                      None if op in CURVE_GROUPS else
                      _curves(plt, machine, m, group, f"{base}_vs_{SWEEP_AXIS.get(op, 'T')}.png")):
                if p:
                    out.append(p)
                    _written.add(p)
    return out


# ---------------------------------------------------------------------------- documents

BEGIN = "<!-- BEGIN generated by benchmarks/report.py: {} -->"
END = "<!-- END generated by benchmarks/report.py: {} -->"


def replace_block(text: str, name: str, body: str) -> str:
    b, e = BEGIN.format(name), END.format(name)
    i, j = text.find(b), text.find(e)
    if i < 0 or j < i:
        raise SystemExit(f"report.py: no '{b}' ... '{e}' block to fill")
    return text[: i + len(b)] + "\n" + body.rstrip() + "\n" + text[j:]


def documents(machines: "OrderedDict[str, Dict]") -> Dict[str, Dict[str, str]]:
    """{file: {block name: generated markdown}} for README.md and docs/benchmarks.md."""
    docs_dir = os.path.join(ROOT, "docs")
    return {
        os.path.join(ROOT, "README.md"): {"headline": headline(machines, "docs/benchmarks.md", figure_dir=ROOT)},
        os.path.join(docs_dir, "benchmarks.md"): {"tables": markdown(machines, figure_dir=docs_dir)},
    }


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="benchmark tables and figures from results CSVs")
    p.add_argument("csv", nargs="*", help="results files (default: every CPU file in benchmarks/results)")
    p.add_argument("--headline", action="store_true", help="print the README's short table instead")
    p.add_argument("--plots", action="store_true", help="write the figures into benchmarks/results/")
    p.add_argument("--write", action="store_true", help="figures, then README.md's and docs/benchmarks.md's tables")
    p.add_argument("--check", action="store_true", help="exit 1 if README.md or docs/benchmarks.md is out of date")
    p.add_argument("--figures-dir", default=RESULTS, help="where --plots writes (default benchmarks/results)")
    args = p.parse_args(argv)
    global FIGURES
    FIGURES = os.path.abspath(args.figures_dir)
    os.makedirs(FIGURES, exist_ok=True)
    machines = load(args.csv or default_files())
    if args.write or args.check:
        if args.write:
            for path in plots(machines):
                print("figure:", rel(path, ROOT), file=sys.stderr)
        else:  # the figures that would be written are the ones on disk
            for machine, m in machines.items():
                for op in ops_of(m):
                    for kind in FIGURE_KINDS:
                        _written.add(os.path.join(FIGURES, f"{safe_name(machine)}_{safe_name(op)}{kind}.png"))
        stale = []
        for path, blocks in documents(machines).items():
            with open(path) as f:
                old = f.read()
            new = old
            for name, body in blocks.items():
                new = replace_block(new, name, body)
            if new != old:
                stale.append(rel(path, ROOT))
                if args.write:
                    with open(path, "w") as f:
                        f.write(new)
        if args.check and stale:
            print("out of date (run python benchmarks/report.py --write):", ", ".join(stale), file=sys.stderr)
            return 1
        print(("updated: " + ", ".join(stale)) if args.write and stale else "up to date", file=sys.stderr)
        return 0
    if args.plots:
        for path in plots(machines):
            print("figure:", rel(path, ROOT), file=sys.stderr)
    print(headline(machines) if args.headline else markdown(machines), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
