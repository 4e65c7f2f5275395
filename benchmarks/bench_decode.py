"""Inference against a KV cache on the CPU: attnext's decode pass vs SDPA.

Cases (mode fwd only, under torch.no_grad(); float32 and bfloat16):
  decode           q (8, 32, 1, 128) against k, v (8, 32, S, 128), S in 1024, 4096, 16384:
                   attnext.causal_attention(q, k, v, align="bottom_right") vs
                   F.scaled_dot_product_attention(q, k, v) (one query row sees every key).
  decode_gqa       q (8, 32, 1, 128) against k, v (8, 8, S, 128): enable_gqa=True on both.
  chunked_prefill  q (8, 32, 128, 128) against S = 4096: attnext align="bottom_right" vs
                   SDPA with the equivalent bool mask ones(T, S).tril(S - T).

Providers (one setup factory each): `attnext` and `sdpa`. The inputs of a case are made
once and shared by its providers (k and v of decode at S = 16384 in float32 are 4 GiB;
they repeat one random block of 1024 positions along S, see make_inputs); each case is
freed before the next. Every provider's output is checked against the
float64 reference (on batch 0 and the first 8 query heads, to keep its copies small)
before anything is timed; the providers of a case are then timed in turn over several
rounds (torch.utils.benchmark.Timer, num_threads=torch.get_num_threads()).

Rates: decode, decode_gqa: GB/s of K and V read (2 * B * Hkv * S * hs * itemsize / time);
chunked_prefill: GFLOP/s of the visible keys (4 * hs FLOPs per visible (query, key) pair,
the same count for SDPA, which computes and masks the rest). The machine's copy
bandwidth (dst.copy_(src) of 512 MiB float32 into a preallocated dst, read + write bytes
counted) is measured in the same run and written as its own row (op "memcpy", provider
"copy"); every decode case also gets a "bandwidth-floor" row: its K and V bytes at that
bandwidth, so floor / attnext is the fraction of the copy bandwidth attnext reaches.

Rows are appended to benchmarks/results/cpu-<model>.csv (common.csv_path).

  python benchmarks/bench_decode.py                       # full (a few minutes on 2 cores)
  python benchmarks/bench_decode.py --quick --csv /tmp/d.csv  # S = 1024 only, float32: a smoke check
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

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
B, H, HS = 8, 32, 128  # batch, query heads, head size: a 7B-class model's attention layer
HKV = 8  # key/value heads of decode_gqa
PREFILL_T = 128  # query rows of a chunked-prefill step
DECODE_S = {False: (1024, 4096, 16384), True: (1024,)}  # {quick: KV lengths}
PREFILL_S = {False: 4096, True: 512}
COPY_BYTES = {False: 512 << 20, True: 64 << 20}
CHECK_HEADS = 8  # query heads checked against the float64 reference
FILL_BLOCK = 1024  # KV positions drawn at random; the rest of the cache repeats them


# ----------------------------------------------------------------------------- cases


class Case:
    """One op at one shape: q (B, H, T, hs), k and v (B, Hkv, S, hs)."""

    def __init__(self, op: str, T: int, S: int, hkv: int = H):
        self.op, self.T, self.S, self.hkv = op, T, S, hkv

    @property
    def shape(self) -> str:
        heads = f"H={H}" if self.hkv == H else f"H={H},Hkv={self.hkv}"
        return f"B={B},{heads},T={self.T},S={self.S},hs={HS}"

    def kv_bytes(self, itemsize: int) -> int:
        return 2 * B * self.hkv * self.S * HS * itemsize

    def flops(self) -> float:
        """4 * hs per visible (query, key) pair; query i sees keys j <= i + S - T."""
        T, S = self.T, self.S
        visible = sum(min(max(i + S - T + 1, 0), S) for i in range(T))
        return 4.0 * B * H * visible * HS

    def rate(self, median_ms: float, itemsize: int) -> float:
        """GB/s of K and V read (decode ops) or GFLOP/s (chunked_prefill)."""
        work = self.flops() if self.op == "chunked_prefill" else self.kv_bytes(itemsize)
        return work / (median_ms * 1e-3) / 1e9


def cases(quick: bool, seq_lens: Optional[Sequence[int]] = None) -> List[Case]:
    """decode and decode_gqa at every S (seq_lens or the defaults), then chunked_prefill
    at its one S."""
    decode_s = list(seq_lens) if seq_lens else list(DECODE_S[quick])
    return ([Case("decode", 1, s) for s in decode_s] + [Case("decode_gqa", 1, s, HKV) for s in decode_s]
            + [Case("chunked_prefill", PREFILL_T, PREFILL_S[quick])])


def make_inputs(case: Case, dtype: torch.dtype, seed: int = 0) -> Tuple[torch.Tensor, ...]:
    """q, k, v in `dtype`. k and v repeat one random block of FILL_BLOCK positions along
    S: drawing 2 Gi normal numbers takes longer than timing them (attention's speed does
    not depend on the values), and the float64 check sees the same tensors."""
    g = torch.Generator().manual_seed(seed)
    q = torch.empty(B, H, case.T, HS, dtype=dtype).normal_(generator=g)
    kv = []
    for _ in range(2):
        t = torch.empty(B, case.hkv, case.S, HS, dtype=dtype)
        block = t[:, :, :FILL_BLOCK].normal_(generator=g)
        for start in range(FILL_BLOCK, case.S, FILL_BLOCK):
            n = min(FILL_BLOCK, case.S - start)
            t[:, :, start:start + n].copy_(block[:, :, :n])
        kv.append(t)
    return (q, *kv)


def make_step(provider: str, case: Case, q, k, v) -> Callable[[], torch.Tensor]:
    """A no-argument callable running one inference step of `provider` on q, k, v."""
    gqa = case.hkv != H
    if provider == "attnext":
        def fn():
            return attnext.causal_attention(q, k, v, align="bottom_right", enable_gqa=gqa)
    elif provider == "sdpa":
        if case.op == "chunked_prefill":  # bottom-right causal as SDPA takes it: an explicit mask
            mask = torch.ones(case.T, case.S, dtype=torch.bool).tril(case.S - case.T)

            def fn():
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        else:  # one query row at the end of the cache sees every key: no mask
            def fn():
                return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    else:
        raise ValueError(provider)

    def step():
        with torch.no_grad():
            return fn()

    return step


def check(outputs: Dict[str, torch.Tensor], case: Case, q, k, v, dtype: torch.dtype) -> None:
    """Every provider's output on batch 0, heads < CHECK_HEADS, against float64."""
    hq = min(CHECK_HEADS, H)
    group = H // case.hkv
    q64 = q[:1, :hq].double()
    k64 = k[:1, : (hq + group - 1) // group].double().repeat_interleave(group, dim=1)[:, :hq]
    v64 = v[:1, : (hq + group - 1) // group].double().repeat_interleave(group, dim=1)[:, :hq]
    ref = reference.causal_attention(q64, k64, v64, HS**-0.5, 0.0, True)[0]
    tol = 2e-4 if dtype == torch.float32 else 3e-2
    for provider, out in outputs.items():
        err = (out[:1, :hq].double() - ref).abs().max().item()
        if not err <= tol * max(1.0, ref.abs().max().item()):
            raise AssertionError(f"bench_decode: {provider} disagrees with the float64 reference at {case.op} "
                                 f"{case.shape} {dtype} (max err {err:.3g})")


def copy_bandwidth(nbytes: int, min_run_time: float) -> Tuple[float, float, float]:
    """(median_ms, iqr_ms, GB/s) of dst.copy_(src), nbytes each, read + write counted."""
    src = torch.empty(nbytes // 4, dtype=torch.float32).normal_()
    dst = torch.empty_like(src)
    t = common.time_cpu(lambda: dst.copy_(src), min_run_time)
    return t.median_ms, t.iqr_ms, 2 * nbytes / (t.median_ms * 1e-3) / 1e9


# ----------------------------------------------------------------------------- run


def run(quick: bool = False, dtypes=None, shapes=None) -> List[Dict]:
    """Check, then time every case; returns one dict per CSV row (common.CSV_COLUMNS),
    with ratio_vs = peer median / attnext median on the peers' (and the floor's) rows.

    shapes: KV lengths S of decode and decode_gqa instead of the default ones, as
    1-tuples ((S,), ...) or ints.
    Extra key not in the CSV: ``seq_len`` (S).
    """
    q, k, v = make_inputs(Case("decode", 1, 64), torch.float32)
    if attnext.explain("causal_attention", q, k, v):
        print("bench_decode: warning: attnext runs its eager fallback here:",
              attnext.explain("causal_attention", q, k, v), file=sys.stderr)
    min_run_time = 0.2 if quick else 1.0  # per provider and case
    rounds = 2 if quick else 4
    dtypes = [d for d in dtypes if d in DTYPES] if dtypes else (["float32"] if quick else ["float32", "bfloat16"])
    seq_lens = [int(s[0]) if isinstance(s, (tuple, list)) else int(s) for s in shapes] if shapes else None
    base = common.base_row("cpu")
    rows: List[Dict] = []

    med, iqr, bw = copy_bandwidth(COPY_BYTES[quick], min_run_time)
    rows.append(dict(base, op="memcpy", shape=f"{COPY_BYTES[quick] >> 20}MiB", dtype="float32", mode="fwd",
                     provider="copy", median_ms=round(med, 4), iqr_ms=round(iqr, 4), gflops_or_gbs=round(bw, 2),
                     ratio_vs="", peer=""))
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        itemsize = torch.empty(0, dtype=dtype).element_size()
        for case in cases(quick, seq_lens):
            q, k, v = make_inputs(case, dtype)
            steps = {p: make_step(p, case, q, k, v) for p in PROVIDERS}
            check({p: step() for p, step in steps.items()}, case, q, k, v, dtype)
            times = common.time_interleaved(steps, min_run_time * len(steps), rounds)
            group = []
            for p, (med, iqr) in times.items():
                group.append(dict(base, op=case.op, shape=case.shape, dtype=dtype_name, mode="fwd", provider=p,
                                  median_ms=round(med, 4), iqr_ms=round(iqr, 4),
                                  gflops_or_gbs=round(case.rate(med, itemsize), 2), ratio_vs="", peer="",
                                  seq_len=case.S))
            if case.op != "chunked_prefill":
                floor_ms = case.kv_bytes(itemsize) / (bw * 1e9) * 1e3
                group.append(dict(base, op=case.op, shape=case.shape, dtype=dtype_name, mode="fwd",
                                  provider="bandwidth-floor", median_ms=round(floor_ms, 4), iqr_ms=0.0,
                                  gflops_or_gbs=round(bw, 2), ratio_vs="", peer="", seq_len=case.S))
            common.add_ratios(group)
            rows += group
            del q, k, v, steps
            gc.collect()
    return rows


def _print(rows: List[Dict]) -> None:
    print(f"{'op':<16}{'shape':<36}{'dtype':<10}{'provider':<16}{'median ms':>11}{'IQR':>9}{'GB/s|GF/s':>11}"
          "  attnext speed-up")
    for r in rows:
        speed = ""
        if r.get("peer"):
            speed = (f"floor / attnext {r['ratio_vs']}" if r["provider"] == "bandwidth-floor"
                     else f"{r['ratio_vs']}x vs {r['provider']}")
        print(f"{r['op']:<16}{r['shape']:<36}{r['dtype']:<10}{r['provider']:<16}{r['median_ms']:>11.3f}"
              f"{r['iqr_ms']:>9.3f}{r['gflops_or_gbs']:>11.1f}  {speed}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_cli_args(ap, "S = 1024 (prefill 512), float32, short timings", DTYPES)
    ap.add_argument("--seq-len", action="append", type=int, metavar="S", help="KV lengths instead of the defaults")
    args = ap.parse_args(argv)
    return common.run_cli(args, lambda: run(args.quick, args.dtype, args.seq_len), _print)


if __name__ == "__main__":
    sys.exit(main())
