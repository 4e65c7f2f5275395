"""Shared benchmark plumbing: timing, machine description, CSV rows, tables.

CPU timings use torch.utils.benchmark.Timer with num_threads=torch.get_num_threads()
(its default is 1). Outputs are allocated fresh on every call, as in a training loop,
with the allocator settings a user has by default (glibc malloc, no THP_MEM_ALLOC_ENABLE).
"""
from __future__ import annotations

import csv
import datetime
import os
import platform
import re
import subprocess
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional

import torch
from torch.utils.benchmark import Timer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "benchmarks", "results")
# ratio_vs, on a peer's row: how many times faster attnext ran than that peer in the
# same run (peer median / attnext median); peer names what it was compared with.
CSV_COLUMNS = [
    "date", "device", "torch", "git_sha", "op", "shape", "dtype", "mode", "provider",
    "median_ms", "iqr_ms", "gflops_or_gbs", "ratio_vs", "peer",
]


@dataclass
class Timing:
    median_ms: float
    iqr_ms: float


def time_cpu(fn: Callable[[], object], min_run_time: float = 1.0) -> Timing:
    """Median and IQR of fn() in ms, after one warm-up call."""
    fn()
    m = Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time
    )
    return Timing(m.median * 1e3, m.iqr * 1e3)


def quantile(xs, q):
    """The q-quantile of xs, linearly interpolated between samples."""
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def time_interleaved(steps, min_run_time, rounds):
    """{provider: (median_ms, iqr_ms)}, measuring the providers in turn, `rounds` times.

    On a shared machine the load changes over seconds; interleaving gives every
    provider the same mix of quiet and busy moments, so the ratios stay fair.
    """
    for step in steps.values():
        step()  # warm-up (first-touch allocations, lazy init)
    samples = {p: [] for p in steps}
    names = list(steps)
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for p in order:
            m = Timer("step()", globals={"step": steps[p]}, num_threads=torch.get_num_threads()).blocked_autorange(
                min_run_time=min_run_time / rounds
            )
            samples[p] += [t * 1e3 for t in m.times]
    return {p: (quantile(ts, 0.5), quantile(ts, 0.75) - quantile(ts, 0.25)) for p, ts in samples.items()}


def time_cuda(fn: Callable[[], object], reps: int = 50) -> Timing:
    """Median and IQR in ms with CUDA events; L2 is flushed before each repetition."""
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    t = torch.tensor(times)
    q = torch.quantile(t, torch.tensor([0.25, 0.5, 0.75]))
    return Timing(q[1].item(), (q[2] - q[0]).item())


def time_fn(fn: Callable[[], object], device: str, quick: bool = False) -> Timing:
    if device == "cuda":
        return time_cuda(fn, reps=10 if quick else 50)
    return time_cpu(fn, min_run_time=0.2 if quick else 1.0)


# vendor_id in /proc/cpuinfo -> the name a model name starts with
CPU_VENDORS = {"GenuineIntel": "Intel", "AuthenticAMD": "AMD"}
# Words of /proc/cpuinfo's model name that say nothing about the part.
_MODEL_NOISE = re.compile(r"\((?:R|TM)\)|\bCPU\b|\bProcessor\b|\b\d+-Core\b|@.*$", re.IGNORECASE)
# Machines whose results predate the ISA tag in device_name keep the name their rows
# already carry, so their new rows land in the same file: the development VM (2 vCPUs
# of an AMD EPYC with AVX512-BF16) was "cpu-AMD-EPYC-2cores".
KNOWN_CPU_NAMES = {"cpu-AMD-EPYC-avx512bf16-2cores": "cpu-AMD-EPYC-2cores"}


def _cpuinfo() -> Dict[str, str]:
    """The first processor's fields in /proc/cpuinfo (empty where there is none)."""
    info: Dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    if info:
                        break
                    continue
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return info


def isa_tag(flags: Iterable[str]) -> str:
    """The widest vector ISA the CPU flags name, the level attnext's kernels and torch's
    BLAS differ by: 'avx512-amx' (Sapphire Rapids and later), 'avx512bf16' (AMD Zen 4,
    Cooper Lake), 'avx512' (Skylake-SP to Ice Lake), 'avx2'; on Arm 'sve' or 'neon'."""
    f = set(flags)
    for tag, needs in (("avx512-amx", ("avx512f", "amx_bf16")), ("avx512bf16", ("avx512f", "avx512_bf16")),
                       ("avx512", ("avx512f",)), ("avx2", ("avx2",)), ("sve", ("sve",)), ("neon", ("asimd",))):
        if all(n in f for n in needs):
            return tag
    return ""


def cpu_name(info: Optional[Dict[str, str]] = None, ncores: Optional[int] = None) -> str:
    """A short, filename-safe name of this CPU: cpu-<vendor and model>-<ISA>-<N>cores.

    The model name alone does not tell machines apart (VMs report "Intel(R) Xeon(R)
    Processor" for Ice Lake and Sapphire Rapids alike), so the widest vector ISA
    (isa_tag) is part of the name: "Intel(R) Xeon(R) Processor" with AMX on 2 CPUs is
    cpu-Intel-Xeon-avx512-amx-2cores, without AVX512-BF16 cpu-Intel-Xeon-avx512-2cores.
    Names in KNOWN_CPU_NAMES are replaced by the older name their results carry.
    """
    info = _cpuinfo() if info is None else info
    vendor = CPU_VENDORS.get(info.get("vendor_id", ""), "")
    model = _MODEL_NOISE.sub(" ", info.get("model name", "")).split()
    if vendor and (not model or model[0] != vendor):
        model.insert(0, vendor)
    if not model:
        model = [platform.processor() or platform.machine() or "unknown"]
    tag = isa_tag((info.get("flags") or info.get("Features") or "").split())
    ncores = os.cpu_count() if ncores is None else ncores
    name = "-".join(["cpu"] + model + ([tag] if tag else []) + [f"{ncores}cores"])
    name = re.sub(r"-{2,}", "-", re.sub(r"[^A-Za-z0-9._-]+", "-", name)).strip("-")
    return KNOWN_CPU_NAMES.get(name, name)


def device_name(device: str) -> str:
    """The `device` column and results file stem: the GPU's name, or cpu_name()."""
    if device == "cuda":
        return torch.cuda.get_device_name().replace(" ", "-")
    return cpu_name()


def git_sha() -> str:
    """The checkout's short sha, '-dirty' if code has uncommitted changes (edits to the
    results and to Markdown files, such as the README's tables, do not count)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                    ":(exclude)benchmarks/results", ":(exclude)*.md"], cwd=ROOT, capture_output=True, text=True,
                                   timeout=10).stdout
            return out.stdout.strip() + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    import attnext

    return f"v{attnext.__version__}"


def csv_path(device: str) -> str:
    """benchmarks/results/<device_name>.csv: one file per CPU model (or GPU)."""
    return os.path.join(RESULTS_DIR, f"{device_name(device)}.csv")


def append_csv(rows: List[Dict], device: str, path: Optional[str] = None) -> str:
    path = path or csv_path(device)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        if new:
            w.writeheader()
        for r in rows:
            w.writerow(r)
    return path


def base_row(device: str) -> Dict:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": device_name(device),
        "torch": torch.__version__,
        "git_sha": git_sha(),
    }


def add_ratios(rows: List[Dict], ours: str = "attnext") -> None:
    """For each (op, shape, dtype, mode) group, one extra row per peer: ratio_vs = peer / attnext."""
    groups: Dict[tuple, List[Dict]] = {}
    for r in rows:
        groups.setdefault((r["op"], r["shape"], r["dtype"], r["mode"]), []).append(r)
    for members in groups.values():
        mine = [r for r in members if r["provider"] == ours]
        if not mine:
            continue
        for r in members:
            if r["provider"] != ours:
                r["peer"] = ours
                r["ratio_vs"] = round(r["median_ms"] / mine[0]["median_ms"], 3)


def print_table(rows: List[Dict], title: str = "") -> None:
    """Median (IQR) per provider and, for each peer, how many times faster attnext is."""
    if title:
        print(title)
    hdr = f"{'op':<19} {'shape':<34} {'dtype':<9} {'mode':<8} {'provider':<16} {'median ms':>10} {'IQR':>7} {'GF|GB/s':>8} {'attnext x':>9}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        ratio = r.get("ratio_vs", "")
        ratio_s = f"{ratio:.2f}x" if isinstance(ratio, float) else ""
        print(
            f"{r['op']:<19} {r['shape']:<34} {r['dtype']:<9} {r['mode']:<8} {r['provider']:<16} "
            f"{r['median_ms']:>10.3f} {r['iqr_ms']:>7.3f} {r.get('gflops_or_gbs', 0):>8.1f} {ratio_s:>9}"
        )


def plot_speedups(rows: List[Dict], path: str) -> Optional[str]:
    """One panel per op: attnext's fwd+bwd speedup over each peer (peer median /
    attnext median) against sequence length, or against the case's shape."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    series: Dict[tuple, List[tuple]] = {}
    ours = {(r["op"], r["shape"], r["dtype"], r["mode"]): float(r["median_ms"]) for r in rows
            if r["provider"] == "attnext"}
    for r in rows:
        key = (r["op"], r["shape"], r["dtype"], r["mode"])
        if r["mode"] != "fwd+bwd" or r["provider"] in ("attnext", "bandwidth-floor", "gemm-ceiling") or key not in ours:
            continue
        x = r.get("seq_len") or r["shape"]
        x = str(x) if len(str(x)) <= 24 else str(x)[:10] + ".." + str(x)[-12:]
        series.setdefault((r["op"], r["provider"], r["dtype"]), []).append((x, float(r["median_ms"]) / ours[key]))
    if not series:
        return None
    ops_ = sorted({k[0] for k in series})
    ncols = min(3, len(ops_))
    nrows = (len(ops_) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.9 * nrows), squeeze=False)
    for ax in axes.flat[len(ops_):]:
        ax.axis("off")
    for ax, op in zip(axes.flat, ops_):
        for (o, peer, dtype), pts in sorted(series.items()):
            if o == op:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"vs {peer} ({dtype})")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_title(f"{op} (fwd+bwd)")
        ax.set_xlabel("sequence length / shape")
        ax.set_ylabel("attnext speedup (x)")
        ax.tick_params(axis="x", labelsize=7, labelrotation=15)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- a script's command line


def add_cli_args(ap, quick_help: str, dtypes) -> None:
    """The options every inference benchmark script takes: --quick, --dtype, --csv,
    --no-csv, --threads (see :func:`run_cli`)."""
    ap.add_argument("--quick", action="store_true", help=quick_help)
    ap.add_argument("--dtype", action="append", choices=list(dtypes), help="default: float32 and bfloat16")
    ap.add_argument("--csv", default=None,
                    help="where rows are appended (default benchmarks/results/cpu-<model>.csv; "
                         "--quick runs append only here)")
    ap.add_argument("--no-csv", action="store_true", help="print only")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")


def run_cli(args, run: Callable[[], List[Dict]], show: Callable[[List[Dict]], None]) -> int:
    """Sets the thread count, runs the benchmark, prints its rows and appends them to the
    CSV (a --quick run only where --csv names a file)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run()
    show(rows)
    if not args.no_csv and (args.csv or not args.quick):
        print(f"appended {len(rows)} rows to {append_csv(rows, 'cpu', args.csv)}")
    return 0
