"""attnext's command line.

    python -m attnext            which kernels are built, a correctness smoke of every
                                 op against the reference, and a short timing table
    python -m attnext check      the first two only
    python -m attnext bench      every op's benchmark against its peers (needs the
                                 source checkout's benchmarks/ folder); --quick
    python -m attnext demo       train the lecture's GPT with eager heads and with
                                 attnext's modules, from the same seed
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, Dict, List, Tuple

import torch

import attnext
from attnext import ops, reference

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


class _Probe:
    """Stands in for a tensor of a given device type and dtype when asking for fallback reasons."""

    def __init__(self, device_type: str, dtype: torch.dtype):
        self.device = torch.device(device_type)
        self.dtype = dtype


def _kernel_table() -> None:
    print(f"attnext {attnext.__version__}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    if not attnext.native_available():
        print(f"native extension: NOT available ({ops._C_ERROR})")
        print(f"  every op runs the eager reference; {ops._BUILD_HINT}")
        return
    isa = torch.ops.attnext._cpu_isa()
    # a build older than _cpu_parallel was compiled with OpenMP
    par = torch.ops.attnext._cpu_parallel() if hasattr(torch.ops.attnext, "_cpu_parallel") else "openmp"
    features = ", ".join(torch.ops.attnext._cpu_features()) or "none"
    print(f"native extension: loaded ({os.path.basename(ops._C.__file__)}), CPU kernels use {isa}"
          f" (CPU features: {features}), threads: {par}"
          f"{' (no compiler OpenMP at build time)' if par == 'threads' else ''}")
    if not attnext.kernels_enabled():
        print("native kernels are DISABLED (ATTNEXT_DISABLE_KERNELS=1 or set_kernels_enabled(False))")
    cuda = torch.cuda.is_available()
    print(f"{'op':<24} {'cpu':<6} {'cuda':<6} dtypes with a native kernel")
    for op in sorted(ops._PUBLIC_OPS):
        devs = ops._DEVICES.get(op, frozenset())
        names = ", ".join(str(d).replace("torch.", "") for d in DTYPES
                          if not ops._fallback_reasons(op, [_Probe("cpu", d)]))
        print(f"{op:<24} {'yes' if 'cpu' in devs else 'no':<6} {'yes' if 'cuda' in devs else 'no':<6} {names}")
    print("inputs take the eager fallback (attnext.explain(op, *tensors) says why for a given input) when:")
    for op in sorted(ops._PUBLIC_OPS):
        missing = [str(d).replace("torch.", "") for d in DTYPES if ops._fallback_reasons(op, [_Probe("cpu", d)])]
        if missing:
            print(f"  {op}: CPU tensors of dtype {', '.join(missing)}")
    print("  any op: a device type without a kernel above, another dtype, or kernels disabled")
    if not any("cuda" in ops._DEVICES.get(op, ()) for op in ops._PUBLIC_OPS):
        print("(this build has no CUDA kernels: CUDA tensors run the eager reference)")
    elif not cuda:
        print("(CUDA kernels are built, but no CUDA device is visible)")


def _smoke_cases(device: str) -> List[Tuple[str, Callable, Callable, tuple]]:
    """(name, attnext fn, reference fn, float64 inputs) for every op."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 37, 29, generator=g, dtype=torch.float64).to(device)
    a = torch.randn(3, 1, 2, 2, generator=g, dtype=torch.float64).to(device)
    b = torch.randn(5, 2, 3, generator=g, dtype=torch.float64).to(device)
    h = torch.randn(2, 33, 7, generator=g, dtype=torch.float64).to(device)
    q, k = (torch.randn(2, 3, 37, 16, generator=g, dtype=torch.float64).to(device) for _ in range(2))
    v = torch.randn(2, 3, 37, 24, generator=g, dtype=torch.float64).to(device)
    qkv = torch.randn(2, 37, 3, 3, 16, generator=g, dtype=torch.float64).to(device)  # (B, T, 3, nh, hs)

    def attn_ref(q, k, v, bottom_right=False):
        return reference.causal_attention(q, k, v, q.shape[-1] ** -0.5, 0.0, bottom_right)[0]

    return [
        ("causal_softmax", lambda t: attnext.causal_softmax(t, 0.3), lambda t: reference.causal_softmax(t, 0.3), (x,)),
        (
            "causal_softmax(bottom_right)",
            lambda t: attnext.causal_softmax(t, 0.3, align="bottom_right"),
            lambda t: reference.causal_softmax(t, 0.3, True),
            (x,),
        ),
        ("matmul", attnext.matmul, reference.matmul, (a, b)),
        ("matmul", attnext.matmul, reference.matmul, (x, x.transpose(-1, -2))),
        ("causal_mean", attnext.causal_mean, reference.causal_mean, (h,)),
        ("causal_attention", attnext.causal_attention, attn_ref, (q, k, v)),
        (
            "causal_attention(bottom_right)",
            lambda *t: attnext.causal_attention(*t, align="bottom_right"),
            lambda *t: attn_ref(*t, bottom_right=True),
            (q, k[..., :20, :], v[..., :20, :]),
        ),
        (
            "causal_attention_qkvpacked",
            attnext.causal_attention_qkvpacked,
            lambda t: reference.causal_attention_qkvpacked(t, t.shape[-1] ** -0.5)[0],
            (qkv,),
        ),
        # the same (seed, offset) on both sides: the kernel's mask against the reference's
        ("dropout", lambda t: reference.dropout(t, 0.3, 5, 6) if ops._fallback_reasons("dropout", (t,))
         else torch.ops.attnext.dropout(t, 0.3, 5, 6), lambda t: reference.dropout(t, 0.3, 5, 6), (h,)),
    ]


def _smoke(device: str = "cpu") -> bool:
    """Forward and gradients against the reference in float64. Tolerance: the fixed one
    of the dtype, or twice the reference's own error when run in that dtype (the rule
    the tests use for reduced precision)."""
    print(f"\ncorrectness smoke on {device} (max |attnext - reference float64|, forward and gradient):")
    ok_all = True
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 3e-2}

    def run(fn, inputs, gout):
        out = fn(*inputs)
        return out, torch.autograd.grad(out, inputs, gout.to(out.dtype))

    for name, fn, ref, inputs in _smoke_cases(device):
        for dtype, t in tol.items():
            xs = [i.to(dtype).requires_grad_(True) for i in inputs]
            x64 = [i.detach().clone().requires_grad_(True) for i in inputs]
            out64 = ref(*x64)
            gout = torch.ones_like(out64).normal_(generator=torch.Generator(device).manual_seed(1))
            out, grads = run(fn, xs, gout)
            _, grads64 = run(ref, x64, gout)
            e_out, e_grads = run(ref, [i.to(dtype).requires_grad_(True) for i in inputs], gout)

            def err(a, b):
                return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0

            ferr = err(out, out64)
            gerr = max(err(a, b) for a, b in zip(grads, grads64))
            f_ok = ferr <= max(t, 2 * err(e_out, out64))
            g_ok = gerr <= max(10 * t, 2 * max(err(a, b) for a, b in zip(e_grads, grads64)))
            ok = f_ok and g_ok
            ok_all &= ok
            path = "kernel" if not ops._fallback_reasons(name.split("(")[0], xs) else "reference"
            shapes = " @ ".join("x".join(map(str, i.shape)) for i in inputs)
            print(f"  {name:<30} {shapes:<22} {str(dtype).replace('torch.', ''):<9} {path:<9} fwd {ferr:.1e}  "
                  f"grad {gerr:.1e}  {'ok' if ok else 'FAIL'}")
    return ok_all


def _time(fn: Callable[[], object], reps: int = 20) -> float:
    for _ in range(3):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2] * 1e3


def _timing_table() -> None:
    print("\nshort timing table (CPU, float32, median ms of 20 calls, eager = the lecture's torch code;"
          "\nthe full benchmarks with torch.compile/SDPA peers: python -m attnext bench):")
    rows: List[Dict] = []
    x = torch.randn(64, 256, 256)
    g = torch.randn_like(x)
    tril = torch.tril(torch.ones(256, 256))

    def eager_softmax(t):
        return torch.softmax((t * 0.125).masked_fill(tril == 0, float("-inf")), -1)

    a, b = torch.randn(64, 1, 256, 64), torch.randn(8, 64, 256)
    ga = torch.randn(64, 8, 256, 256)
    h = torch.randn(16, 512, 128)
    tril_h = torch.tril(torch.ones(512, 512))
    wei_h = tril_h / tril_h.sum(1, keepdim=True)
    qa, ka, va = (torch.randn(1, 64, 256, 64) for _ in range(3))
    tril_a = torch.tril(torch.ones(256, 256))
    d = torch.randn(64, 256, 384)

    def eager_attention(q, k, v):
        wei = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        return torch.softmax(wei.masked_fill(tril_a == 0, float("-inf")), -1) @ v

    cases = [
        ("causal_softmax 64x256x256", lambda t: attnext.causal_softmax(t, 0.125), eager_softmax, (x,), g),
        ("causal_attention 64h T256 hs64", attnext.causal_attention, eager_attention, (qa, ka, va), qa),
        ("matmul (64,1,256,64)@(8,64,256)", attnext.matmul, torch.matmul, (a, b), ga),
        ("causal_mean 16x512x128", attnext.causal_mean, lambda t: wei_h @ t, (h,), h),
        ("dropout p=0.2 64x256x384", lambda t: attnext.dropout(t, 0.2),
         lambda t: torch.nn.functional.dropout(t, 0.2, True), (d,), d),
    ]
    print(f"  {'case':<32} {'mode':<8} {'eager':>9} {'attnext':>9} {'speedup':>8}")
    for name, ours, eager, inp, grad in cases:
        leaves = [i.clone().requires_grad_(True) for i in inp]
        for mode in ("fwd", "fwd+bwd"):
            if mode == "fwd":
                te, ta = _time(lambda: eager(*inp)), _time(lambda: ours(*inp))
            else:
                te = _time(lambda: torch.autograd.grad(eager(*leaves), leaves, grad))
                ta = _time(lambda: torch.autograd.grad(ours(*leaves), leaves, grad))
            print(f"  {name:<32} {mode:<8} {te:>9.3f} {ta:>9.3f} {te / ta:>7.2f}x")
            rows.append(dict(case=name, mode=mode, eager=te, attnext=ta))


BENCH_OPS = ("causal_softmax", "matmul", "attention", "decode", "sdpa", "dropout")


def _bench_modules(bench_dir: str, ops_wanted):
    """The benchmarks/bench_<op>.py modules present in this checkout, in BENCH_OPS order."""
    sys.path.insert(0, bench_dir)
    mods = []
    for op in ops_wanted:
        path = os.path.join(bench_dir, f"bench_{op}.py")
        if os.path.exists(path):
            mods.append((op, __import__(f"bench_{op}")))
    return mods


def _call_run(mod, common, device: str, **kwargs) -> List[Dict]:
    """Calls mod.run with the keyword arguments it accepts, and puts its rows in the one
    convention of benchmarks/common.py (device name; ratios on the peers' rows)."""
    import inspect

    params = inspect.signature(mod.run).parameters
    if "device" not in params and device != "cpu":
        print(f"(bench_{mod.__name__[6:]} has no {device} benchmark)", file=sys.stderr)
        return []
    kwargs["device"] = device
    rows, seen = [], set()
    for r in mod.run(**{k: v for k, v in kwargs.items() if k in params and v is not None}):
        key = (r["op"], r["shape"], r["dtype"], r["mode"], r["provider"])
        if key not in seen:  # one row per provider and case
            seen.add(key)
            rows.append(r)
    for r in rows:
        r["device"] = common.device_name(device)
        r["ratio_vs"], r["peer"] = "", ""
    common.add_ratios(rows)
    return rows


def _parse_shape(text: str, op: str):
    """'64x1024x1024' -> (64, 1024, 1024); matmul: '64x1x256x64@8x64x256' -> two shapes."""

    def dims(t):
        out = tuple(int(d) for d in t.lower().split("x") if d)
        if not out or any(d < 0 for d in out):
            raise ValueError(f"bad shape {t!r}")
        return out

    if op == "matmul":
        if text.count("@") != 1:
            raise ValueError(f"matmul shapes are A@B, e.g. 64x1x256x64@8x64x256, got {text!r}")
        a, b = text.split("@")
        return dims(a), dims(b)
    want = {"causal_softmax": 3, "attention": 4, "decode": 1}.get(op)  # dropout: any shape
    shape = dims(text)
    if want is not None and len(shape) != want:
        raise ValueError(f"{op} shapes have {want} dims, got {text!r}")
    return shape


def _bench(argv: List[str]) -> int:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    bench_dir = os.path.join(here, "benchmarks")
    p = argparse.ArgumentParser(prog="python -m attnext bench",
                                description="every op's benchmark against its peers, in one run")
    p.add_argument("--op", action="append", choices=BENCH_OPS, help="ops to run (default: all)")
    p.add_argument("--device", action="append", choices=["cpu", "cuda"], help="default: cpu, and cuda if present")
    p.add_argument("--dtype", action="append", choices=["float32", "bfloat16", "float16", "float64"],
                   help="default: each benchmark's own")
    p.add_argument("--shape", action="append", metavar="SHAPE",
                   help="sizes to run instead of the defaults (needs one --op): causal_softmax BxTxS, "
                        "attention BxNHxTxHS, decode S (the KV cache length), matmul AxBx..@CxDx.., "
                        "dropout any AxBx.. (repeatable)")
    p.add_argument("--quick", action="store_true", help="small sizes, short timings (a smoke run)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile peers (they compile for minutes)")
    p.add_argument("--csv", help="append rows here instead of benchmarks/results/<device>.csv (cpu-<model>.csv for a CPU)")
    p.add_argument("--plot", default=None,
                   help="speedup plot path (default speedup_<device>.png beside the CSV the rows go to, "
                        "<device> as in the CSV)")
    args = p.parse_args(argv)
    if not os.path.isdir(bench_dir):
        print("attnext bench: the benchmarks/ folder of the source checkout is needed "
              "(install with `pip install --no-build-isolation -e .` from a clone)", file=sys.stderr)
        return 2
    shapes = None
    if args.shape:
        if not args.op or len(args.op) != 1:
            p.error("--shape needs exactly one --op")
        try:
            shapes = [_parse_shape(s_, args.op[0]) for s_ in args.shape]
        except ValueError as e:
            p.error(f"--shape: {e}")
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    if "cuda" in devices and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    mods = _bench_modules(bench_dir, args.op or BENCH_OPS)
    import common  # benchmarks/common.py

    try:
        from tqdm import tqdm
    except ImportError:  # progress is a nicety
        tqdm = None
    jobs = [(dev, op, mod) for dev in devices for op, mod in mods]
    rows_by_device: Dict[str, List[Dict]] = {dev: [] for dev in devices}
    bar = tqdm(jobs, desc="bench", unit="op", file=sys.stderr) if tqdm else jobs
    for dev, op, mod in bar:
        if tqdm:
            bar.set_postfix(op=op, device=dev)
        rows_by_device[dev] += _call_run(mod, common, dev, quick=args.quick,
                                         dtypes=tuple(args.dtype) if args.dtype else None,
                                         use_compile=not args.no_compile, shapes=shapes)
    for dev, all_rows in rows_by_device.items():
        if not all_rows:
            continue
        common.print_table(all_rows, f"\n{common.device_name(dev)}, torch {torch.__version__}, "
                                     f"{torch.get_num_threads()} threads ('attnext x' = peer time / attnext time)")
        path = common.append_csv(all_rows, dev, args.csv)
        print(f"rows appended to {path}")
        # beside the CSV the rows went to: a run aimed at another file never replaces the committed figure
        plot_path = args.plot or os.path.join(os.path.dirname(os.path.abspath(path)),
                                              f"speedup_{common.device_name(dev)}.png")
        saved = common.plot_speedups(all_rows, plot_path)
        print(f"speedup plot: {saved}" if saved else "(no plot: matplotlib missing or no ratios)")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m attnext", description="attnext: kernels, checks and benchmarks")
    sub = p.add_subparsers(dest="cmd")
    sub.add_parser("check", help="which kernels are built, and a correctness smoke of every op")
    sub.add_parser("bench", help="every op's benchmark against its peers (see bench --help)", add_help=False)
    sub.add_parser("demo", help="train the lecture's GPT with eager heads and with attnext (see demo --help)",
                   add_help=False)
    if argv and argv[0] == "bench":
        return _bench(argv[1:])
    if argv and argv[0] == "demo":
        from attnext import demo

        return demo.main(argv[1:])
    args = p.parse_args(argv)
    _kernel_table()
    ok = _smoke("cpu")
    if torch.cuda.is_available() and attnext.native_available():
        ok &= _smoke("cuda")
    if args.cmd is None:
        _timing_table()
    print("\nall smoke checks passed" if ok else "\nSOME SMOKE CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
