"""Benchmark attnext.causal_attention against its peers on the CPU.

Providers (one setup factory each):
  eager    the lecture's math (q @ k^T * scale, masked_fill, softmax, @ v), 4-D
  sdpa3d   F.scaled_dot_product_attention(is_causal=True) on 3-D (B*nh, T, hs) inputs
           (the lecture's Head shape: SDPA falls to its math path)
  sdpa4d   the same on 4-D (B, nh, T, hs) inputs (SDPA's CPU flash kernel)
  attnext  attnext.causal_attention on 4-D inputs
plus the lecture's MultiHeadAttention module, eager vs attnext.nn.MultiHeadAttention,
and nanoGPT's CausalSelfAttention training step (forward + backward, float32):
attnext.nn.CausalSelfAttention vs nanoGPT's own module (`nanogpt`: c_attn, SDPA with
is_causal=True, c_proj), both loaded with the same state_dict.

Modes fwd and fwd+bwd, float32 and bfloat16. Every provider's output is checked
against the float64 reference before anything is timed. Timing:
torch.utils.benchmark.Timer with num_threads=torch.get_num_threads(), the providers
of a case measured in turn over several rounds (fair ratios on a shared machine),
median and IQR of all their blocked_autorange samples; FLOP/s count causal attention as half the dense work
(fwd 2 matmuls of 2*T*T*hs flops each, halved; bwd 2.5x the fwd). The compute ceiling
of the same run: a "gemm-ceiling" row per case, the time its FLOPs take at torch.mm's
GFLOP/s on 2048^3 in that dtype (not a peer). Default
allocator settings (what a user has). Peak memory: each (provider, case) runs once
in a fresh subprocess that reports the growth of its peak RSS (VmHWM) over the step.

Rows are appended to benchmarks/results/cpu-<model>.csv (common.csv_path: one file per CPU model).

  python benchmarks/bench_attention.py            # full
  python benchmarks/bench_attention.py --quick    # small, for a smoke check
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import attnext  # noqa: E402
from attnext import reference  # noqa: E402
from attnext.demo import MultiHeadAttention as LectureMultiHeadAttention  # noqa: E402  (the lecture module, eager)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as bench_common  # noqa: E402  (benchmarks/common.py)

CSV_COLUMNS = [
    "date", "device", "torch", "git_sha", "op", "shape", "dtype", "mode", "provider",
    "median_ms", "iqr_ms", "gflops_or_gbs", "ratio_vs", "peer",
]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
NAN = float("nan")
PEERS = ["eager", "sdpa3d", "sdpa4d"]

# (B, nh, T, hs): the targets' shapes
CASES_FULL = [(1, 64, 256, 64), (1, 8, 2048, 64)]
CASES_QUICK = [(1, 8, 256, 64)]
# a training sweep in T at (1, 8, ., 64) beside CASES_FULL's T = 2048 (attnext against
# SDPA 4-D only: the crossover figure, benchmarks/results/<cpu>_causal_attention_vs_T.png)
SWEEP_FULL = [(1, 8, T, 64) for T in (512, 1024, 4096)]
# a sharp softmax, as trained models have: q and k of std 8 (scores about 64 apart), so
# that most float32 weights of a row would be subnormal (attnext against SDPA 4-D only)
SHARP_FULL = [((16, 6, 256, 64), 8.0)]
MHA_FULL = dict(B=64, T=256, n_embd=384, num_heads=6)
MHA_QUICK = dict(B=4, T=128, n_embd=384, num_heads=6)
# nanoGPT's CausalSelfAttention: GPT-2 small's layer (n_embd 768, 12 heads) at its block size
NANOGPT_FULL = dict(B=8, T=1024, n_embd=768, n_head=12)
NANOGPT_QUICK = dict(B=2, T=128, n_embd=384, n_head=6)


# ----------------------------------------------------------------------------- providers


def _attention(provider, q, k, v):
    B, nh, T, hs = q.shape
    if provider == "eager":  # the lecture's Head after its projections
        wei = q @ k.transpose(-2, -1) * hs**-0.5  # (B, nh, T, T)
        wei = wei.masked_fill(reference.causal_mask(T, T, device=q.device) == 0, float("-inf"))
        return torch.softmax(wei, dim=-1) @ v
    if provider == "sdpa4d":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if provider == "sdpa3d":
        out = F.scaled_dot_product_attention(
            q.reshape(B * nh, T, hs), k.reshape(B * nh, T, hs), v.reshape(B * nh, T, hs), is_causal=True
        )
        return out.view(B, nh, T, hs)
    if provider == "attnext":
        return attnext.causal_attention(q, k, v)
    raise ValueError(provider)


def make_attention_case(provider, shape, dtype, mode, seed=0, qk_std=1.0):
    """A no-argument callable running one step of `provider`, and its output for checking;
    q and k of standard deviation qk_std, v of 1."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = ((torch.randn(shape, generator=g) * (qk_std if i < 2 else 1.0)).to(dtype).requires_grad_(mode != "fwd")
               for i in range(3))
    grad = torch.randn(shape, generator=g).to(dtype)
    if mode == "fwd":

        def step():
            with torch.no_grad():
                return _attention(provider, q, k, v)

    else:

        def step():
            out = _attention(provider, q, k, v)
            out.backward(grad)
            return out

    return step, (q, k, v, grad)


def make_mha_case(provider, cfg, dtype, mode, seed=0):
    torch.manual_seed(seed)
    hs = cfg["n_embd"] // cfg["num_heads"]
    p = cfg.get("dropout", 0.0)
    lecture = LectureMultiHeadAttention(cfg["num_heads"], hs, cfg["n_embd"], cfg["T"], p).to(dtype)
    if provider == "attnext":
        module = attnext.nn.MultiHeadAttention(cfg["num_heads"], hs, cfg["n_embd"], cfg["T"], p).to(dtype)
        module.load_state_dict(lecture.state_dict())
    else:
        module = lecture
    return _module_step(module, cfg, dtype, mode, seed, zero_grad=False)


def _module_step(module, cfg, dtype, mode, seed, zero_grad):
    """(step, x): one forward (no grad) or forward+backward of ``module`` on a fixed
    (B, T, n_embd) input and grad_out; zero_grad: clear the gradients first, as a
    training step does."""
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(cfg["B"], cfg["T"], cfg["n_embd"], generator=g).to(dtype).requires_grad_(mode != "fwd")
    grad = torch.randn(cfg["B"], cfg["T"], cfg["n_embd"], generator=g).to(dtype)

    def step():
        if mode == "fwd":
            with torch.no_grad():
                return module(x)
        if zero_grad:
            module.zero_grad(set_to_none=True)
            x.grad = None
        out = module(x)
        out.backward(grad)
        return out

    return step, x


def make_nanogpt_case(provider, cfg, dtype, mode="fwd+bwd", seed=0):
    """One training step (zero_grad, forward, backward) of nanoGPT's module or attnext's,
    in train mode, dropout 0, bias True; both hold the same weights. Returns the step
    and the module."""
    torch.manual_seed(seed)
    config = SimpleNamespace(n_embd=cfg["n_embd"], n_head=cfg["n_head"], block_size=cfg["T"], dropout=0.0, bias=True)
    nano = reference.NanoGPTCausalSelfAttention(config, flash=True).to(dtype)  # nanoGPT on torch >= 2.0
    if provider == "attnext":
        module = attnext.nn.CausalSelfAttention(config).to(dtype)
        module.load_state_dict(nano.state_dict())
    elif provider == "nanogpt":
        module = nano
    else:
        raise ValueError(provider)
    module.train()
    step, _ = _module_step(module, cfg, dtype, mode, seed, zero_grad=True)
    return step, module


def _nanogpt_flops(cfg, mode):
    """c_attn and c_proj (8*B*T*C^2) plus causal attention (2*B*T^2*C); backward 2x the
    projections, 2.5x the attention."""
    B, T, C = cfg["B"], cfg["T"], cfg["n_embd"]
    proj, attn = 8.0 * B * T * C * C, 2.0 * B * T * T * C
    return proj + attn if mode == "fwd" else 3 * proj + 3.5 * attn


# ----------------------------------------------------------------------------- measuring


_time_interleaved = bench_common.time_interleaved  # {provider: (median_ms, iqr_ms)}, providers in turn


def _attention_flops(B, nh, T, hs, mode):
    fwd = 4.0 * B * nh * T * T * hs / 2  # QK^T and PV, causal half
    return fwd if mode == "fwd" else 3.5 * fwd


def _check(outputs, ref, dtype):
    tol = 2e-4 if dtype == torch.float32 else 5e-2
    for provider, out in outputs.items():
        err = (out.double() - ref).abs().max().item()
        if err > tol * max(1.0, ref.abs().max().item()):
            raise AssertionError(f"bench_attention: {provider} disagrees with the float64 reference (max err {err:.3g})")


def _peak_memory_mb(kind, provider, spec, dtype_name, mode, repeats=3):
    """Peak RSS growth (MiB) of one step: the median over `repeats` fresh processes
    (one process reads up to about 0.2 MiB high or low, as the allocator happens to
    reuse already-resident pages or not)."""
    runs = sorted(_peak_memory_once(kind, provider, spec, dtype_name, mode) for _ in range(repeats))
    return runs[len(runs) // 2]


def _peak_memory_once(kind, provider, spec, dtype_name, mode):
    """Peak RSS growth (MiB) of one step, measured in a fresh process."""
    if kind == "attention":
        make = f"b.make_attention_case({provider!r}, {tuple(spec)!r}, dtype, {mode!r})"
        warm = f"b.make_attention_case({provider!r}, (1, 2, 64, 16), dtype, {mode!r})"
    elif kind == "nanogpt":
        make = f"b.make_nanogpt_case({provider!r}, {dict(spec)!r}, dtype, {mode!r})"
        warm = f"b.make_nanogpt_case({provider!r}, dict(B=1, T=16, n_embd=12, n_head=2), dtype, {mode!r})"
    else:
        make = f"b.make_mha_case({provider!r}, {dict(spec)!r}, dtype, {mode!r})"
        warm = f"b.make_mha_case({provider!r}, dict(B=1, T=16, n_embd=12, num_heads=2), dtype, {mode!r})"
    # VmHWM (this process's own peak RSS; getrusage's ru_maxrss would start at the
    # parent's peak, inherited through fork), reset to the current RSS just before
    # the step by writing 5 to /proc/self/clear_refs.
    code = "\n".join([
        "import json, sys, torch",
        f"sys.path.insert(0, {ROOT!r}); sys.path.insert(0, {HERE!r})",
        "import bench_attention as b",
        "def kib(field):",
        "    for line in open('/proc/self/status'):",
        "        if line.startswith(field): return int(line.split()[1])",
        f"dtype = b.DTYPES[{dtype_name!r}]",
        f"{warm}[0]()",  # libraries' one-time buffers (BLAS, thread pools) are not the provider's
        f"step, _ = {make}",
        "open('/proc/self/clear_refs', 'w').write('5')",
        "before = kib('VmRSS:')",
        "step()",
        "print(json.dumps((kib('VmHWM:') - before) / 1024.0))",
    ])
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        return float("nan")
    return float(json.loads(r.stdout.strip().splitlines()[-1]))






def run(quick: bool = False, shapes=None, dtypes=None) -> list:
    """Measure everything; returns one dict per CSV row (see CSV_COLUMNS).

    Numbers are floats (NaN where a column does not apply). Peak-memory rows have
    mode ``"<mode>:peak_rss_mb"`` and the MiB in ``median_ms`` (and ``peak_mb``).
    Extra keys not in the CSV: ``peak_mb``, ``seq_len``.
    """
    if attnext.explain("causal_attention", torch.empty(1, 1, dtype=torch.float32)):
        print("bench_attention: warning: attnext runs its eager fallback here:", attnext.explain(
            "causal_attention", torch.empty(1, 1)), file=sys.stderr)
    min_run_time = 0.2 if quick else 1.0  # per provider and case
    rounds = 2 if quick else 4
    # shapes: (B, nh, T, hs) cases instead of the default ones; dtypes: names from DTYPES
    cases = [tuple(c) for c in shapes] if shapes else (CASES_QUICK if quick else CASES_FULL)
    dtypes = [d for d in dtypes if d in DTYPES] if dtypes else (["float32"] if quick else ["float32", "bfloat16"])
    modes = ["fwd", "fwd+bwd"]
    common = dict(
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        device=bench_common.device_name("cpu"),
        torch=torch.__version__,
        git_sha=bench_common.git_sha(),
    )
    rows = []
    providers = ["attnext"] + PEERS
    ceiling = {d: _gemm_ceiling(DTYPES[d], quick, rounds) for d in dtypes}  # GFLOP/s of torch.mm, this run
    for shape in cases:
        B, nh, T, hs = shape
        ref_q, ref_k, ref_v = (None,) * 3
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            for mode in modes:
                # correctness first: every provider's output against the float64 reference
                outs = {}
                for p in providers:
                    step, (q, k, v, _) = make_attention_case(p, shape, dtype, mode)
                    outs[p] = step().detach()
                ref = reference.causal_attention(q.detach().double(), k.detach().double(), v.detach().double(), hs**-0.5)[0]
                _check(outs, ref, dtype)
                steps = {p: make_attention_case(p, shape, dtype, mode)[0] for p in providers}
                times = _time_interleaved(steps, min_run_time * len(steps), rounds)
                flops = _attention_flops(B, nh, T, hs, mode)
                for p, (med, iqr) in times.items():
                    base = dict(common, op="causal_attention", shape=f"B={B},nh={nh},T={T},hs={hs}", dtype=dtype_name,
                                mode=mode, provider=p, median_ms=round(med, 3), iqr_ms=round(iqr, 3),
                                gflops_or_gbs=round(flops / (med * 1e-3) / 1e9, 2), seq_len=T)
                    if p == "attnext":
                        for peer in PEERS:
                            if peer in times:
                                rows.append(dict(base, ratio_vs=round(times[peer][0] / med, 3), peer=peer))
                    else:
                        rows.append(dict(base, ratio_vs="", peer=""))
                # the time these FLOPs take at torch.mm's rate (not a peer: a ceiling)
                rows.append(dict(common, op="causal_attention", shape=f"B={B},nh={nh},T={T},hs={hs}",
                                 dtype=dtype_name, mode=mode, provider="gemm-ceiling",
                                 median_ms=round(flops / (ceiling[dtype_name] * 1e9) * 1e3, 3), iqr_ms=0.0,
                                 gflops_or_gbs=round(ceiling[dtype_name], 1), ratio_vs="", peer="", seq_len=T))
                if not quick:
                    for p in providers:
                        mb = _peak_memory_mb("attention", p, shape, dtype_name, mode)
                        rows.append(dict(common, op="causal_attention", shape=f"B={B},nh={nh},T={T},hs={hs}",
                                         dtype=dtype_name, mode=mode + ":peak_rss_mb", provider=p,
                                         median_ms=round(mb, 2), iqr_ms=NAN, gflops_or_gbs=NAN, ratio_vs="",
                                         peer="", peak_mb=round(mb, 2), seq_len=T))
    # the sweep in T: attnext and SDPA 4-D, checked against each other (a float64
    # reference of T = 4096 would be the largest allocation of the run)
    sweep = [(shape, 1.0) for shape in SWEEP_FULL] + SHARP_FULL
    for shape, qk_std in ([] if (quick or shapes) else sweep):
        B, nh, T, hs = shape
        shape_s = f"B={B},nh={nh},T={T},hs={hs}" + (f",qk_std={qk_std:g}" if qk_std != 1.0 else "")
        for dtype_name in (dtypes if qk_std == 1.0 else ["float32"]):
            dtype = DTYPES[dtype_name]
            for mode in modes:
                made = {p: make_attention_case(p, shape, dtype, mode, qk_std=qk_std) for p in ("attnext", "sdpa4d")}
                outs = {p: step().detach() for p, (step, _) in made.items()}
                _check({"attnext": outs["attnext"]}, outs["sdpa4d"].double(), dtype)
                times = _time_interleaved({p: step for p, (step, _) in made.items()}, min_run_time * 2, rounds)
                flops = _attention_flops(B, nh, T, hs, mode)
                for p, (med, iqr) in times.items():
                    rows.append(dict(common, op="causal_attention", shape=shape_s,
                                     dtype=dtype_name, mode=mode, provider=p, median_ms=round(med, 3),
                                     iqr_ms=round(iqr, 3), gflops_or_gbs=round(flops / (med * 1e-3) / 1e9, 2),
                                     ratio_vs=round(times["sdpa4d"][0] / med, 3) if p == "attnext" else "",
                                     peer="sdpa4d" if p == "attnext" else "", seq_len=T))
                rows.append(dict(common, op="causal_attention", shape=shape_s,
                                 dtype=dtype_name, mode=mode, provider="gemm-ceiling",
                                 median_ms=round(flops / (ceiling[dtype_name] * 1e9) * 1e3, 3), iqr_ms=0.0,
                                 gflops_or_gbs=round(ceiling[dtype_name], 1), ratio_vs="", peer="", seq_len=T))
                del made, outs
    # the lecture's MultiHeadAttention module, eager vs fused; without dropout and with
    # the lecture's training dropout (0.2; the two then draw different masks)
    mha_cfgs = [] if shapes else ([MHA_QUICK] if quick else [MHA_FULL, dict(MHA_FULL, dropout=0.2)])
    for cfg in mha_cfgs:
        shape_s = ",".join(f"{k}={v}" for k, v in cfg.items())
        for mode in modes:
            if cfg.get("dropout", 0.0) == 0.0:
                outs = {}
                for p in ("attnext", "eager"):
                    step, _ = make_mha_case(p, cfg, torch.float32, mode)
                    outs[p] = step().detach()
                _check({"attnext": outs["attnext"]}, outs["eager"].double(), torch.float32)
            steps = {p: make_mha_case(p, cfg, torch.float32, mode)[0] for p in ("attnext", "eager")}
            times = _time_interleaved(steps, min_run_time * len(steps), rounds)
            for p, (med, iqr) in times.items():
                rows.append(dict(common, op="MultiHeadAttention", shape=shape_s, dtype="float32", mode=mode, provider=p,
                                 median_ms=round(med, 3), iqr_ms=round(iqr, 3), gflops_or_gbs=NAN,
                                 ratio_vs=round(times["eager"][0] / med, 3) if p == "attnext" else "",
                                 peer="eager" if p == "attnext" else ""))
            if not quick:
                for p in ("attnext", "eager"):
                    mb = _peak_memory_mb("mha", p, cfg, "float32", mode)
                    rows.append(dict(common, op="MultiHeadAttention", shape=shape_s, dtype="float32",
                                     mode=mode + ":peak_rss_mb", provider=p, median_ms=round(mb, 2), iqr_ms=NAN,
                                     gflops_or_gbs=NAN, ratio_vs="", peer="", peak_mb=round(mb, 2)))
    # nanoGPT's CausalSelfAttention, one training step: attnext's module vs nanoGPT's own
    nano_cfgs = [] if shapes else [NANOGPT_QUICK if quick else NANOGPT_FULL]
    for cfg in nano_cfgs:
        shape_s = ",".join(f"{k}={v}" for k, v in cfg.items())
        mode, providers = "fwd+bwd", ("attnext", "nanogpt")
        made = {p: make_nanogpt_case(p, cfg, torch.float32, mode) for p in providers}
        outs = {p: step().detach() for p, (step, _) in made.items()}
        _check({"attnext": outs["attnext"]}, outs["nanogpt"].double(), torch.float32)
        grads = {p: dict(m.named_parameters()) for p, (_, m) in made.items()}
        for name, w in grads["nanogpt"].items():  # and every weight's gradient
            _check({f"attnext {name}.grad": grads["attnext"][name].grad}, w.grad.double(), torch.float32)
        steps = {p: step for p, (step, _) in made.items()}
        times = _time_interleaved(steps, min_run_time * len(steps), rounds)
        flops = _nanogpt_flops(cfg, mode)
        for p, (med, iqr) in times.items():
            rows.append(dict(common, op="CausalSelfAttention", shape=shape_s, dtype="float32", mode=mode, provider=p,
                             median_ms=round(med, 3), iqr_ms=round(iqr, 3),
                             gflops_or_gbs=round(flops / (med * 1e-3) / 1e9, 2),
                             ratio_vs=round(times["nanogpt"][0] / med, 3) if p == "attnext" else "",
                             peer="nanogpt" if p == "attnext" else "", seq_len=cfg["T"]))
        del made, steps, grads, outs
        if not quick:
            for p in providers:
                mb = _peak_memory_mb("nanogpt", p, cfg, "float32", mode)
                rows.append(dict(common, op="CausalSelfAttention", shape=shape_s, dtype="float32",
                                 mode=mode + ":peak_rss_mb", provider=p, median_ms=round(mb, 2), iqr_ms=NAN,
                                 gflops_or_gbs=NAN, ratio_vs="", peer="", peak_mb=round(mb, 2), seq_len=cfg["T"]))
    return rows


def _gemm_ceiling(dtype, quick: bool, rounds: int) -> float:
    """GFLOP/s of torch.mm on (n, n) @ (n, n) in `dtype` (n = 2048; 512 with --quick),
    measured in this run: the compute ceiling the attention rows' GFLOP/s are read
    against (MKL's sgemm for float32, oneDNN for bfloat16, AMX where the CPU has it)."""
    n = 512 if quick else 2048
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(dtype) for _ in range(2))
    c = torch.empty(n, n, dtype=dtype)
    med, _ = _time_interleaved({"mm": lambda: torch.mm(a, b, out=c)}, 0.2 if quick else 1.0, rounds)["mm"]
    return 2 * n**3 / (med * 1e-3) / 1e9


def _print(rows):
    print(f"{'op':<21}{'shape':<30}{'dtype':<10}{'mode':<22}{'provider':<9}{'median ms':>10}{'IQR':>8}"
          f"{'GFLOP/s':>9}{'peak MiB':>9}  attnext speed-up")
    for r in rows:
        speed = f"{r['ratio_vs']}x vs {r['peer']}" if r.get("peer") else ""
        print(f"{r['op']:<21}{r['shape']:<30}{r['dtype']:<10}{r['mode']:<22}{r['provider']:<9}"
              f"{r['median_ms']!s:>10}{r['iqr_ms']!s:>8}{r['gflops_or_gbs']!s:>9}{r.get('peak_mb', '')!s:>9}  {speed}")




def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes, float32 only, no memory runs")
    ap.add_argument("--csv", default=None,
                    help="where rows are appended (default benchmarks/results/cpu-<model>.csv; --quick runs append only here)")
    ap.add_argument("--no-csv", action="store_true", help="print only")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args.quick)
    _print(rows)
    if not args.no_csv and (args.csv or not args.quick):
        path = bench_common.append_csv(rows, "cpu", args.csv)
        print(f"appended {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
