"""The command line end to end: python -m attnext [check|bench|demo], in quick modes."""
import csv
import os
import subprocess
import sys

import pytest
import torch

from conftest import needs_native

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, timeout=600, env=None):
    return subprocess.run([sys.executable, "-m", "attnext", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, **(env or {})))


def test_check_lists_kernels_and_passes_smoke():
    out = run_cli("check")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "causal_softmax" in out.stdout
    assert "all smoke checks passed" in out.stdout


def test_bad_arguments_give_usage_errors():
    out = run_cli("frobnicate")
    assert out.returncode == 2 and "usage" in out.stderr.lower()
    out = run_cli("demo", "--iters", "0")
    assert out.returncode == 2 and "--iters must be positive" in out.stderr
    out = run_cli("demo", "--n-embd", "30", "--n-head", "4")
    assert out.returncode == 2 and "divisible" in out.stderr
    out = run_cli("bench", "--op", "nosuchop")
    assert out.returncode == 2 and "usage" in out.stderr.lower()
    out = run_cli("bench", "--shape", "4x4")
    assert out.returncode == 2 and "--shape needs exactly one --op" in out.stderr
    out = run_cli("bench", "--op", "causal_softmax", "--shape", "4x4")
    assert out.returncode == 2 and "causal_softmax shapes have 3 dims" in out.stderr
    out = run_cli("bench", "--op", "matmul", "--shape", "4x4x4")
    assert out.returncode == 2 and "matmul shapes are A@B" in out.stderr


@needs_native
def test_bench_quick_writes_csv_with_promised_columns(tmp_path):
    csv_path = tmp_path / "results.csv"
    plot_path = tmp_path / "speedup.png"
    out = run_cli("bench", "--quick", "--op", "causal_softmax", "--no-compile", "--csv", str(csv_path),
                  "--plot", str(plot_path))
    assert out.returncode == 0, out.stdout + out.stderr
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert rows, "no rows written"
    for col in ("date", "device", "torch", "git_sha", "op", "shape", "dtype", "mode", "provider", "median_ms",
                "iqr_ms", "gflops_or_gbs", "ratio_vs", "peer"):
        assert col in rows[0], col
    providers = {r["provider"] for r in rows}
    assert {"attnext", "eager"} <= providers
    assert all(float(r["median_ms"]) > 0 for r in rows)
    assert rows[0]["torch"] == torch.__version__
    assert "speedup" in out.stdout.lower() or "attnext x" in out.stdout


def test_demo_same_first_loss_with_dropout_zero():
    from attnext import demo

    cfg = demo.Config(batch_size=2, block_size=8, n_embd=16, n_head=2, n_layer=1, dropout=0.0, max_iters=2,
                      eval_interval=2, eval_iters=1, seed=3)
    text = demo.default_corpus(5_000)
    results = demo.run(cfg, text, progress=False, plot_path=None, sample_tokens=0)
    eager, fused = results
    assert eager.first_loss == pytest.approx(fused.first_loss, rel=1e-5, abs=1e-6)
    assert eager.steps == fused.steps


def test_demo_cli_quick_runs(tmp_path):
    data = tmp_path / "tiny.txt"
    data.write_text("hello attention, hello causal world. " * 200)
    out = run_cli("demo", "--quick", "--no-progress", "--data", str(data), "--plot", str(tmp_path / "p.png"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "speedup of attnext over eager" in out.stdout
    assert "sample from the attnext model" in out.stdout
