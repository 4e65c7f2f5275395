"""The examples in examples/ run, as a user would run them (subprocesses), at their
--tiny sizes: nanoGPT training with attnext.nn.CausalSelfAttention (the loss must go down)
and transformers generation with attn_implementation="attnext" (tokens identical to sdpa's)."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(script):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.pop("ATTNEXT_SDPA_SMALL_WORK", None)  # as a user runs them (conftest sets 0 for the suite)
    r = subprocess.run([sys.executable, str(EXAMPLES / script), "--tiny"], capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0, f"{script} failed:\n{r.stdout}\n{r.stderr}"
    return r.stdout


def test_nanogpt_train():
    out = _run("nanogpt_train.py")
    assert "tokens/s" in out and "sample:" in out


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers is not installed")
def test_hf_generate():
    out = _run("hf_generate.py")
    assert "identical tokens" in out
