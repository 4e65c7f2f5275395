"""Benchmark attnext.matmul (and attnext.causal_mean) against their peers on the CPU.

Cases:
  broadcast  (64,1,256,64) @ (8,64,256): the issue's case; torch.matmul copies the
             expanded operands (67 MB), attnext reads them through zero strides.
  bmm        (384,256,256) @ (384,256,64): no broadcasting; peer torch.bmm.
  weight     (256,64) @ (128,64,256): a 2-D operand broadcast over a batch (W @ x).
  lecture    (3,1,2,2) @ (5,2,3): per-call overhead.
  causal_mean (8,2048,256): running mean vs the lecture's (tril / tril.sum) @ x and
             a cumsum one-liner.

Providers per case: attnext, torch.matmul, einsum (torch.bmm for bmm); modes fwd
and fwd+bwd. Correctness is checked before anything is timed. Timing:
torch.utils.benchmark.Timer with num_threads=torch.get_num_threads(), median and
IQR; GFLOP/s (matmul: 2*m*n*k per output matrix, x3 for fwd+bwd) or GB/s
(causal_mean: bytes read + written); ratio = peer median / attnext median (> 1:
attnext faster), all from the same run. Peak extra memory: a fresh subprocess per
provider and mode, peak RSS (VmHWM, reset through /proc/self/clear_refs) minus the
RSS with the inputs in place, with the default allocator (large blocks are mmap'ed
and returned on free, so RSS follows the live tensors).

Rows are appended to benchmarks/results/cpu-<model>.csv (common.csv_path). For the command line
(`python -m attnext`): `run(quick)` returns the rows as dicts, `smoke()` is a
sub-second correctness check.

    python benchmarks/bench_matmul.py [--quick] [--no-memory] [--csv PATH] [--md PATH]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from typing import Callable, Dict, List, Optional

import torch
from torch.utils.benchmark import Timer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import attnext  # noqa: E402
from attnext import reference  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as bench_common  # noqa: E402  (benchmarks/common.py)

CSV_COLUMNS = [
    "date", "device", "torch", "git_sha", "op", "shape", "dtype", "mode",
    "provider", "median_ms", "iqr_ms", "gflops_or_gbs", "ratio_vs", "peer",
]
DEFAULT_CSV = bench_common.csv_path("cpu")  # benchmarks/results/cpu-<model>.csv


# ----------------------------------------------------------------------------- cases


def _matmul_flops(sa, sb) -> float:
    out = torch.broadcast_shapes(sa[:-2], sb[:-2])
    batch = 1
    for s in out:
        batch *= s
    return 2.0 * batch * sa[-2] * sa[-1] * sb[-1]


def _cases(quick: bool, shapes=None) -> List[dict]:
    """Each case: name, op, shapes, a make() for the inputs, providers (name -> fn), the
    oracle, the work per fwd call (flops or bytes) and its unit."""
    cases = []

    def mm_case(name, sa, sb, einsum_eq, extra=None):
        providers = {
            "attnext": attnext.matmul,
            "torch.matmul": torch.matmul,
        }
        if extra:
            providers.update(extra)
        if einsum_eq:
            providers["einsum"] = einsum_eq
        cases.append(
            dict(
                name=name, op="matmul", shape=f"{tuple(sa)}@{tuple(sb)}",
                make=lambda g, dt: [torch.randn(sa, generator=g).to(dt), torch.randn(sb, generator=g).to(dt)],
                providers=providers, oracle=lambda a, b: torch.matmul(a.double(), b.double()),
                work=_matmul_flops(sa, sb), unit="GFLOP/s",
            )
        )

    if shapes:  # (a_shape, b_shape) pairs from the command line: torch.matmul is the peer
        for sa, sb in shapes:
            mm_case("custom", tuple(sa), tuple(sb), None)
        return cases
    # (64,1,256,64) @ (8,64,256): the einsum peer contracts the squeezed dim away.
    mm_case("broadcast", (64, 1, 256, 64), (8, 64, 256), lambda a, b: torch.einsum("xij,yjk->xyik", a[:, 0], b))
    if not quick:
        mm_case(
            "bmm", (384, 256, 256), (384, 256, 64), lambda a, b: torch.einsum("bij,bjk->bik", a, b),
            extra={"torch.bmm": torch.bmm},
        )
        # a 2-D operand broadcast over a batch: its gradient is a long reduction
        mm_case("weight", (256, 64), (128, 64, 256), lambda a, b: torch.einsum("ij,bjk->bik", a, b))
    mm_case("lecture", (3, 1, 2, 2), (5, 2, 3), lambda a, b: torch.einsum("xij,yjk->xyik", a[:, 0], b))

    B, T, C = (8, 2048, 256) if not quick else (4, 1024, 128)

    def cumsum_mean(x):
        n = torch.arange(1, x.shape[-2] + 1, dtype=x.dtype, device=x.device).unsqueeze(-1)
        return x.cumsum(-2) / n

    cases.append(
        dict(
            name="causal_mean", op="causal_mean", shape=f"({B},{T},{C})",
            make=lambda g, dt: [torch.randn((B, T, C), generator=g).to(dt)],
            providers={"attnext": attnext.causal_mean, "eager(tril@x)": reference.causal_mean, "cumsum": cumsum_mean},
            oracle=lambda x: reference.causal_mean(x.double()),
            work=2.0 * B * T * C * 4, unit="GB/s",
        )
    )
    return cases


# ----------------------------------------------------------------------------- measuring


def _step(fn: Callable, inputs: List[torch.Tensor], mode: str, grad: Optional[torch.Tensor]) -> Callable:
    if mode == "fwd":
        return lambda: fn(*inputs)
    leaves = [x.detach().requires_grad_() for x in inputs]

    def fwd_bwd():
        for x in leaves:
            x.grad = None
        fn(*leaves).backward(grad)

    return fwd_bwd


def _check(case: dict, inputs, dtype) -> None:
    """Every provider's forward (and attnext's gradients) against the float64 oracle."""
    ref = case["oracle"](*inputs)
    tol = 1e-3 if dtype == torch.float32 else 3e-2
    for name, fn in case["providers"].items():
        out = fn(*inputs)
        if out.shape != ref.shape or not torch.allclose(out.double(), ref, rtol=tol, atol=tol):
            raise AssertionError(f"{case['name']}: provider {name} disagrees with the float64 oracle")
    # gradients in float64 on a slice of the batch (the full float64 problem is slow)
    leaves = [x[:2].detach().double().requires_grad_() for x in inputs]
    g = torch.randn(case["oracle"](*leaves).shape, dtype=torch.float64)
    mine = torch.autograd.grad(case["providers"]["attnext"](*leaves), leaves, g)
    peer_fn = torch.matmul if case["op"] == "matmul" else reference.causal_mean
    theirs = torch.autograd.grad(peer_fn(*leaves), leaves, g)
    for m, t in zip(mine, theirs):
        if not torch.allclose(m, t, rtol=1e-9, atol=1e-9):
            raise AssertionError(f"{case['name']}: attnext gradients disagree with torch")


def _time_interleaved(steps: Dict[str, Callable], rounds: int, min_run_time: float) -> Dict[str, tuple]:
    """(median, IQR) in seconds per provider. The providers take turns, `rounds` times,
    and each one's samples are pooled: on a shared machine the load drifts, and
    turn-taking spreads the drift over every provider instead of biasing the ratio."""
    samples = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            m = Timer("step()", globals={"step": step}, num_threads=torch.get_num_threads()).blocked_autorange(
                min_run_time=min_run_time
            )
            samples[name].extend(m.times)
    out = {}
    for name, ts in samples.items():
        t = torch.tensor(ts, dtype=torch.float64)
        q = torch.quantile(t, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
        out[name] = (q[1], q[2] - q[0])
    return out


_MEM_CHILD = r"""
import json, sys, torch
sys.path.insert(0, {root!r})
import bench_matmul as bm
torch.set_num_threads({threads})
case = [c for c in bm._cases({quick}) if c["name"] == {name!r}][0]
g = torch.Generator().manual_seed(0)
inputs = case["make"](g, getattr(torch, {dtype!r}))
grad = None
if {mode!r} != "fwd":
    grad = torch.randn(case["oracle"](*inputs).shape).to(inputs[0].dtype)
step = bm._step(case["providers"][{provider!r}], inputs, {mode!r}, grad)
def kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = kb("VmRSS:")
step()
print(json.dumps({{"peak_extra_mb": (kb("VmHWM:") - base) / 1024.0}}))
"""


def _peak_extra_mb(case_name: str, provider: str, mode: str, dtype: str, quick: bool) -> Optional[float]:
    """Peak RSS growth of one call in a fresh process (None where Linux's counters are missing)."""
    code = _MEM_CHILD.format(
        root=os.path.join(ROOT, "benchmarks"), quick=quick, threads=torch.get_num_threads(), name=case_name, dtype=dtype, mode=mode, provider=provider
    )
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
        return json.loads(res.stdout.strip().splitlines()[-1])["peak_extra_mb"]
    except Exception:  # no /proc (not Linux), or the child failed: report no number
        return None






def run(quick: bool = False, memory: bool = True, dtype: torch.dtype = torch.float32, shapes=None,
        dtypes=None) -> List[Dict]:
    """Check, then time every case/provider/mode; returns one dict per row of cpu-<model>.csv
    (plus ``peak_extra_mb`` where measured). Peer rows carry no ratio; attnext rows
    are repeated once per peer with ``ratio_vs`` = peer median / attnext median."""
    rounds, min_run_time = (2, 0.2) if quick else (5, 0.4)
    common = dict(
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        device=bench_common.device_name("cpu"), torch=torch.__version__, git_sha=bench_common.git_sha(),
    )
    if dtypes:  # names, from the command line: one run per dtype
        return [r for d in dtypes for r in run(quick, memory, getattr(torch, d), shapes)]
    dtype_name = str(dtype).replace("torch.", "")
    rows = []
    for case in _cases(quick, shapes):
        g = torch.Generator().manual_seed(0)
        inputs = case["make"](g, dtype)
        _check(case, inputs, dtype)
        out_shape = case["oracle"](*inputs).shape
        grad = torch.randn(out_shape).to(dtype)
        for mode in ("fwd", "fwd+bwd"):
            results = {}
            steps = {name: _step(fn, inputs, mode, grad if mode != "fwd" else None)
                     for name, fn in case["providers"].items()}
            for step in steps.values():
                step()  # warm-up
            timings = _time_interleaved(steps, rounds, min_run_time)
            for name in case["providers"]:
                median, iqr = timings[name]
                work = case["work"] * (3.0 if (mode == "fwd+bwd" and case["op"] == "matmul") else 1.0)
                if case["op"] == "causal_mean" and mode == "fwd+bwd":
                    work *= 2.0
                peak = None
                if memory and (not quick or case["name"] == "broadcast"):
                    peak = _peak_extra_mb(case["name"], name, mode, dtype_name, quick)
                results[name] = dict(
                    common, op=case["op"], shape=case["shape"], dtype=dtype_name, mode=mode, provider=name,
                    median_ms=median * 1e3, iqr_ms=iqr * 1e3, gflops_or_gbs=work / median / 1e9, unit=case["unit"],
                    peak_extra_mb=peak,
                )
            mine = results["attnext"]
            for name, r in results.items():
                if name == "attnext":
                    continue
                rows.append(dict(r, ratio_vs="", peer=""))
                rows.append(dict(mine, ratio_vs=r["median_ms"] / mine["median_ms"], peer=name))
    return rows


def smoke() -> List[str]:
    """A sub-second correctness check for the command line's smoke test: the lecture's
    two cases, a broadcast case with gradients, 1-D operands and causal_mean, against
    torch in float64. Returns one line per check; raises AssertionError on a mismatch."""
    lines = []
    g = torch.Generator().manual_seed(0)
    for sa, sb in [((3, 1, 2, 2), (5, 2, 3)), ((6, 4, 2), (3, 1, 2, 2)), ((7,), (3, 7, 4)), ((5, 7), (7,))]:
        a = torch.randn(sa, generator=g, dtype=torch.float64, requires_grad=True)
        b = torch.randn(sb, generator=g, dtype=torch.float64, requires_grad=True)
        out, ref = attnext.matmul(a, b), torch.matmul(a, b)
        assert out.shape == ref.shape and torch.allclose(out, ref), f"matmul {sa} @ {sb}: forward mismatch"
        go = torch.randn(ref.shape, generator=g, dtype=torch.float64)
        mine, theirs = torch.autograd.grad(out, (a, b), go), torch.autograd.grad(ref, (a, b), go)
        assert all(torch.allclose(m, t) for m, t in zip(mine, theirs)), f"matmul {sa} @ {sb}: gradient mismatch"
        lines.append(f"matmul {sa} @ {sb} -> {tuple(out.shape)}: forward and gradients match torch.matmul")
    x = torch.randn(2, 9, 5, generator=g, dtype=torch.float64)
    assert torch.allclose(attnext.causal_mean(x), reference.causal_mean(x)), "causal_mean mismatch"
    lines.append("causal_mean (2, 9, 5): matches (tril / tril.sum) @ x")
    return lines


def _print_table(rows: List[Dict]) -> None:
    seen = set()
    print(f"{'op':<12} {'shape':<28} {'mode':<8} {'provider':<14} {'median ms':>10} {'IQR ms':>8} "
          f"{'rate':>14} {'peak extra MB':>14} {'attnext speedup':>16}")
    for r in rows:
        key = (r["shape"], r["mode"], r["provider"], r["peer"])
        if key in seen:
            continue
        seen.add(key)
        peak = "" if r.get("peak_extra_mb") is None else f"{r['peak_extra_mb']:.1f}"
        ratio = f"{r['ratio_vs']:.2f}x vs {r['peer']}" if r["peer"] else ""
        print(f"{r['op']:<12} {r['shape']:<28} {r['mode']:<8} {r['provider']:<14} {r['median_ms']:>10.3f} "
              f"{r['iqr_ms']:>8.3f} {r['gflops_or_gbs']:>8.2f} {r['unit']:<5} {peak:>14} {ratio:>16}")




def _markdown(rows: List[Dict]) -> str:
    """The README table: one line per (case, mode, peer)."""
    lines = [
        f"CPU: {rows[0]['device']}, torch {rows[0]['torch']}, attnext {rows[0]['git_sha']}, {rows[0]['date']}, "
        f"{rows[0]['dtype']}; default allocator.",
        "",
        "| op | shape | mode | attnext ms | peer | peer ms | speedup | attnext peak extra MB | peer peak extra MB |",
        "|---|---|---|---:|---|---:|---:|---:|---:|",
    ]
    by_key = {(r["shape"], r["mode"], r["provider"]): r for r in rows if r["peer"] == ""}
    for r in rows:
        if r["provider"] != "attnext" or not r["peer"]:
            continue
        p = by_key[(r["shape"], r["mode"], r["peer"])]
        fmt = lambda v: "" if v is None else f"{v:.1f}"  # noqa: E731
        lines.append(
            f"| {r['op']} | {r['shape']} | {r['mode']} | {r['median_ms']:.3f} | {r['peer']} | {p['median_ms']:.3f} | "
            f"{r['ratio_vs']:.2f}x | {fmt(r.get('peak_extra_mb'))} | {fmt(p.get('peak_extra_mb'))} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller/fewer cases, shorter timing")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-provider peak memory subprocesses")
    ap.add_argument("--csv", default=None,
                    help="append rows here (default benchmarks/results/cpu-<model>.csv; --quick runs append only here)")
    ap.add_argument("--md", default=None, help="also write the markdown table here")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N) first (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not attnext.native_available():
        print("warning: attnext._C is not built; 'attnext' times the eager fallback", file=sys.stderr)
    rows = run(quick=args.quick, memory=not args.no_memory)
    _print_table(rows)
    if args.csv or not args.quick:
        bench_common.append_csv(rows, "cpu", args.csv)
    md = _markdown(rows)
    print()
    print(md)
    if args.md:
        with open(args.md, "w") as f:
            f.write(md)


if __name__ == "__main__":
    main()
