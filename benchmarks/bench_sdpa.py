"""The SDPA-compatible entries on the CPU: attnext.scaled_dot_product_attention,
attnext.varlen_attention and a sliding window, each against torch's SDPA doing the same.

Cases (float32 and bfloat16):
  sdpa_nanogpt    q, k, v (16, 6, 256, 64), is_causal=True (nanoGPT's shakespeare-char
                  model): attnext.scaled_dot_product_attention vs F.scaled_dot_product_attention;
                  fwd and fwd+bwd.
  sdpa_full       q, k, v (4, 12, 256, 64) without a mask (every key: an encoder's
                  self-attention, BERT-base-shaped); fwd and fwd+bwd.
  varlen          8 sequences of mixed lengths (VARLEN_LENS, 3,023 tokens), 8 heads of 64,
                  causal: attnext.varlen_attention on the packed (total, H, hs) tensors vs
                  SDPA on the zero-padded (8, 8, 1024, 64) batch with a causal + key-padding
                  bool mask (the usual way to run such a batch); fwd and fwd+bwd.
  sliding_window  (1, 8, 8192, 64), a causal window of W = 1024 keys:
                  attnext.causal_attention(window_size=(W, 0)) vs SDPA with the equivalent
                  bool mask; fwd only (SDPA's masked backward at T = 8192 builds 2 GiB of
                  weights per call).
  sdpa_decode_small  one token against 128 keys, 8 heads of 64 (fwd): small enough that
                  attnext.scaled_dot_product_attention hands it to torch's SDPA; the row
                  is the wrapper's own cost.
  sdpa_decode_gqa one token, 32 query heads over 8 key/value heads of 128, 1024 keys,
                  B = 1, enable_gqa=True (fwd): the grouped decode pass against SDPA's GQA.
  window_sweep    attnext alone on that window at T = 2048 ... 16384 (fwd): its GFLOP/s
                  (visible pairs only) stays flat as T grows when its cost grows as T x W,
                  not T^2 (SDPA with a mask cannot run T = 16384 on a small machine).

Providers: `attnext` and `sdpa`. Outputs are checked against each other (the float64
reference agrees with both, tests/test_sdpa.py) before anything is timed; providers are
timed in turn over several rounds (common.time_interleaved, num_threads=torch's).
GFLOP/s count 4 * hs FLOPs per visible (query, key) pair forward and 2.5x that backward,
the same count for both providers (SDPA computes and masks the rest; the padded batch's
padding is not counted). Rows are appended to benchmarks/results/cpu-<model>.csv.

  python benchmarks/bench_sdpa.py                          # full (minutes on 2 cores)
  python benchmarks/bench_sdpa.py --quick --no-csv         # small sizes: a smoke check
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import attnext  # noqa: E402
from attnext import reference  # noqa: E402

import common  # noqa: E402  (benchmarks/common.py)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PROVIDERS = ("attnext", "sdpa")
NANOGPT = {False: (16, 6, 256, 64), True: (2, 2, 64, 32)}  # B, nh, T, hs
VARLEN_LENS = {False: [512, 37, 256, 1024, 130, 700, 64, 300], True: [50, 7, 33, 64]}
VARLEN_H, VARLEN_HS = {False: 8, True: 2}, {False: 64, True: 32}
SLIDING = {False: (1, 8, 8192, 64, 1024), True: (1, 2, 512, 32, 64)}  # B, H, T, hs, W
SWEEP_T = {False: (2048, 4096, 8192, 16384), True: (256, 512)}
DECODE_SMALL = {False: (8, 128, 64), True: (8, 128, 64)}  # H, S, hs
FULL = {False: (4, 12, 256, 64), True: (2, 2, 128, 32)}  # B, nh, T, hs
DECODE_GQA = {False: (32, 8, 1024, 128), True: (8, 2, 256, 64)}  # H, Hkv, S, hs


def _visible(T: int, S: int, window) -> int:
    return int(reference.attention_mask(T, S, True, window).sum())


def _leaves(*shape, dtype, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g).to(dtype).requires_grad_() for _ in range(n)]


def _step(fn: Callable[[], torch.Tensor], leaves, mode: str) -> Callable[[], object]:
    if mode == "fwd":
        def step():
            with torch.no_grad():
                return fn()
        return step
    grad = None

    def step():
        nonlocal grad
        out = fn()
        grad = torch.ones_like(out) if grad is None else grad
        return torch.autograd.grad(out, leaves, grad)
    return step


def case_nanogpt(quick: bool, dtype) -> Tuple[str, Dict[str, Callable], List, float]:
    B, nh, T, hs = NANOGPT[quick]
    q, k, v = _leaves(B, nh, T, hs, dtype=dtype)
    fns = {"attnext": lambda: attnext.scaled_dot_product_attention(q, k, v, is_causal=True),
           "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)}
    return f"B={B},H={nh},T={T},hs={hs}", fns, [q, k, v], 4.0 * B * nh * hs * _visible(T, T, (-1, 0))


def case_varlen(quick: bool, dtype):
    lens, H, hs = VARLEN_LENS[quick], VARLEN_H[quick], VARLEN_HS[quick]
    N, Tmax, total = len(lens), max(lens), sum(lens)
    q, k, v = _leaves(total, H, hs, dtype=dtype)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    # the padded batch: (N, H, Tmax, hs), sequence i in rows [0, len_i); queries see keys j <= i < len_i
    index = torch.cat([torch.arange(n) + i * Tmax for i, n in enumerate(lens)])
    valid = torch.arange(Tmax)[None, :] < torch.tensor(lens)[:, None]  # (N, Tmax)
    mask = torch.ones(Tmax, Tmax, dtype=torch.bool).tril()[None] & valid[:, None, :]  # (N, Tmax, Tmax)
    mask = mask.unsqueeze(1)  # (N, 1, Tmax, Tmax)

    def padded(t):  # (total, H, hs) -> (N, H, Tmax, hs), differentiable
        out = t.new_zeros(N * Tmax, H, hs).index_copy(0, index, t)
        return out.view(N, Tmax, H, hs).transpose(1, 2)

    def sdpa():
        o = F.scaled_dot_product_attention(padded(q), padded(k), padded(v), attn_mask=mask)
        return o.transpose(1, 2).reshape(N * Tmax, H, hs)[index]

    fns = {"attnext": lambda: attnext.varlen_attention(q, k, v, cu, cu, Tmax, Tmax, window_size=(-1, 0)),
           "sdpa": sdpa}
    flops = 4.0 * H * hs * sum(n * (n + 1) // 2 for n in lens)
    return f"N={N},total={total},max={Tmax},H={H},hs={hs}", fns, [q, k, v], flops


def case_sliding(quick: bool, dtype):
    B, H, T, hs, W = SLIDING[quick]
    q, k, v = _leaves(B, H, T, hs, dtype=dtype)
    mask = reference.attention_mask(T, T, False, (W, 0))
    fns = {"attnext": lambda: attnext.causal_attention(q, k, v, window_size=(W, 0)),
           "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)}
    return f"B={B},H={H},T={T},hs={hs},W={W}", fns, [q, k, v], 4.0 * B * H * hs * _visible(T, T, (W, 0))


def case_decode_small(quick: bool, dtype):
    """One token against 128 cached keys, 8 heads of 64: a call whose cost is mostly
    per-call overhead, which attnext.scaled_dot_product_attention hands to torch's SDPA
    (ops._SDPA_SMALL_WORK): the row measures what the wrapper itself costs."""
    H, S, hs = DECODE_SMALL[quick]
    q = _leaves(1, H, 1, hs, dtype=dtype, n=1)[0]
    k, v = _leaves(1, H, S, hs, dtype=dtype, n=2, seed=1)
    fns = {"attnext": lambda: attnext.scaled_dot_product_attention(q, k, v),
           "sdpa": lambda: F.scaled_dot_product_attention(q, k, v)}
    return f"B=1,H={H},T=1,S={S},hs={hs}", fns, [q, k, v], 4.0 * H * hs * S


def case_decode_gqa(quick: bool, dtype):
    """One token of a grouped-query model (Llama-shaped: 32 query heads over 8 key/value
    heads of 128) against 1024 cached keys, B = 1, through the SDPA signature."""
    H, Hkv, S, hs = DECODE_GQA[quick]
    q = _leaves(1, H, 1, hs, dtype=dtype, n=1)[0]
    k, v = _leaves(1, Hkv, S, hs, dtype=dtype, n=2, seed=1)
    fns = {"attnext": lambda: attnext.scaled_dot_product_attention(q, k, v, enable_gqa=True),
           "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)}
    return f"B=1,H={H},Hkv={Hkv},T=1,S={S},hs={hs}", fns, [q, k, v], 4.0 * H * hs * S


def case_full(quick: bool, dtype):
    """An unmasked call (every key: an encoder's self-attention, BERT-base-shaped):
    attnext.scaled_dot_product_attention vs F.scaled_dot_product_attention."""
    B, nh, T, hs = FULL[quick]
    q, k, v = _leaves(B, nh, T, hs, dtype=dtype)
    fns = {"attnext": lambda: attnext.scaled_dot_product_attention(q, k, v),
           "sdpa": lambda: F.scaled_dot_product_attention(q, k, v)}
    return f"B={B},H={nh},T={T},hs={hs}", fns, [q, k, v], 4.0 * B * nh * hs * T * T


CASES = {"sdpa_nanogpt": (case_nanogpt, ("fwd", "fwd+bwd")), "sdpa_full": (case_full, ("fwd", "fwd+bwd")),
         "varlen": (case_varlen, ("fwd", "fwd+bwd")),
         "sliding_window": (case_sliding, ("fwd",)), "sdpa_decode_small": (case_decode_small, ("fwd",)),
         "sdpa_decode_gqa": (case_decode_gqa, ("fwd",))}


def check(fns: Dict[str, Callable], op: str, dtype) -> None:
    with torch.no_grad():
        a, b = (fns[p]().double() for p in PROVIDERS)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    err = (a - b).abs().max().item()
    if not err <= tol * max(1.0, b.abs().max().item()):
        raise AssertionError(f"bench_sdpa: attnext and sdpa disagree at {op} {dtype} (max err {err:.3g})")


def run(quick: bool = False, dtypes=None) -> List[Dict]:
    """Check, then time every case; one dict per CSV row (common.CSV_COLUMNS), with
    ratio_vs = sdpa median / attnext median on the sdpa rows."""
    min_run_time = 0.2 if quick else 1.0
    rounds = 2 if quick else 4
    dtypes = [d for d in dtypes if d in DTYPES] if dtypes else ["float32", "bfloat16"]
    base = common.base_row("cpu")
    rows: List[Dict] = []
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        for op, (make, modes) in CASES.items():
            shape, fns, leaves, flops = make(quick, dtype)
            check(fns, op, dtype)
            for mode in modes:
                steps = {p: _step(fns[p], leaves, mode) for p in PROVIDERS}
                times = common.time_interleaved(steps, min_run_time * len(steps), rounds)
                work = flops * (1.0 if mode == "fwd" else 3.5)
                group = [dict(base, op=op, shape=shape, dtype=dtype_name, mode=mode, provider=p,
                              median_ms=round(med, 4), iqr_ms=round(iqr, 4),
                              gflops_or_gbs=round(work / (med * 1e-3) / 1e9, 2), ratio_vs="", peer="")
                         for p, (med, iqr) in times.items()]
                common.add_ratios(group)
                rows += group
            del fns, leaves
            gc.collect()
        B, H, _, hs, W = SLIDING[quick]
        for T in SWEEP_T[quick]:
            q, k, v = _leaves(B, H, T, hs, dtype=dtype)
            step = _step(lambda: attnext.causal_attention(q, k, v, window_size=(W, 0)), [q, k, v], "fwd")
            med, iqr = common.time_interleaved({"attnext": step}, min_run_time, rounds)["attnext"]
            work = 4.0 * B * H * hs * _visible(T, T, (W, 0))
            rows.append(dict(base, op="window_sweep", shape=f"B={B},H={H},T={T},hs={hs},W={W}", dtype=dtype_name,
                             mode="fwd", provider="attnext", median_ms=round(med, 4), iqr_ms=round(iqr, 4),
                             gflops_or_gbs=round(work / (med * 1e-3) / 1e9, 2), ratio_vs="", peer=""))
            del q, k, v, step
            gc.collect()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_cli_args(ap, "small sizes, short timings (a smoke check)", DTYPES)
    args = ap.parse_args(argv)
    return common.run_cli(args, lambda: run(args.quick, args.dtype),
                          lambda rows: common.print_table(rows, "attnext's SDPA-compatible entries vs torch's SDPA (CPU)"))


if __name__ == "__main__":
    sys.exit(main())
