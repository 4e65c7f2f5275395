"""Shared test helpers: devices, dtype tolerances, the float64 oracle rule, torch's TF32
switches, subprocess runs."""
import contextlib
import os
import platform
import subprocess
import sys

import pytest
import torch

# The suite tests attnext's own attention kernels: on some CPUs ATen's flash attention
# measures faster and would run instead (csrc/cpu/kernel_choice.h); tests of that
# choice set the variable themselves, in subprocesses (tests/test_kernel_choice.py).
os.environ.setdefault("ATTNEXT_ATTENTION_KERNEL", "1")
# Likewise the SDPA-signature entry points hand small calls to torch's SDPA (per-call
# overhead, attnext.ops._SDPA_SMALL_WORK); the suite's shapes are small, so that is off
# here and tested on its own (tests/test_sdpa.py, tests/test_transformers.py).
os.environ.setdefault("ATTNEXT_SDPA_SMALL_WORK", "0")

import attnext  # noqa: E402  (after the environment is set: read once, at first use)


def devices():
    """CPU always; CUDA when a GPU is present (nothing touches CUDA at import time otherwise)."""
    out = ["cpu"]
    if torch.cuda.is_available():
        out.append("cuda")
    return out


# (atol, rtol) against a float64 oracle, per dtype.
TOL = {
    torch.float64: (1e-12, 1e-10),
    torch.float32: (2e-6, 2e-5),
    torch.bfloat16: (1.6e-2, 1.6e-2),
    torch.float16: (2e-3, 2e-3),
}


def assert_close_to_oracle(out, oracle, eager, dtype, what=""):
    """Low precision: the error against the float64 oracle is at most ~2x eager torch's own
    error in that dtype (plus a small absolute floor); full precision: fixed tolerances."""
    out64, oracle64 = out.double(), oracle.double()
    if dtype in (torch.bfloat16, torch.float16):
        err = (out64 - oracle64).abs().max().item()
        eager_err = (eager.double() - oracle64).abs().max().item()
        floor = TOL[dtype][0] / 8
        assert err <= 2 * eager_err + floor, f"{what}: error {err:.3g} vs eager {eager_err:.3g}"
    else:
        atol, rtol = TOL[dtype]
        torch.testing.assert_close(out64, oracle64, atol=atol, rtol=rtol, equal_nan=True, msg=what or None)


@contextlib.contextmanager
def tf32_switch(switch, on=True):
    """TF32 for CUDA matmuls on (or off) inside the block through one of torch's switches; the
    switch's previous value is restored after."""
    m = torch.backends.cuda.matmul
    if switch == "fp32_precision":
        if not hasattr(m, "fp32_precision"):
            pytest.skip("this torch has no torch.backends.cuda.matmul.fp32_precision")
        old = m.fp32_precision
        m.fp32_precision = "tf32" if on else "ieee"
        restore = lambda: setattr(m, "fp32_precision", old)  # noqa: E731
    elif switch == "allow_tf32":
        old = m.allow_tf32
        m.allow_tf32 = on
        restore = lambda: setattr(m, "allow_tf32", old)  # noqa: E731
    else:
        old = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high" if on else "highest")
        restore = lambda: torch.set_float32_matmul_precision(old)  # noqa: E731
    try:
        yield
    finally:
        restore()


def generator(seed: int) -> torch.Generator:
    """A fresh CPU generator at ``seed``: a fixed dropout mask for every call that gets one."""
    return torch.Generator().manual_seed(seed)


def dropout_seed(generator_seed: int):
    """The (seed, offset) the public functions draw from ``generator(generator_seed)``,
    for the reference composites (the same mask as the op's)."""
    return attnext.ops._draw_dropout_seed(generator(generator_seed))


def _subnormals_flushed() -> bool:
    """Whether this thread flushes subnormal floats to zero (FTZ/DAZ in the FPU's control
    register): the smallest normal double halved is a subnormal, or zero when flushed."""
    return sys.float_info.min / 2 == 0.0


@pytest.fixture(autouse=True)
def _ieee_subnormals():
    """Every test starts and ends with IEEE subnormals. torch 2.5's inductor links its
    compiled CPU kernels with -ffast-math, and loading one turns FTZ/DAZ on for the thread
    that ran torch.compile; the tests after it (hypothesis refuses to draw floats when
    subnormals flush) would otherwise depend on which test compiled first."""
    yield
    if _subnormals_flushed():
        torch.set_flush_denormal(False)


needs_native = pytest.mark.skipif(not attnext.native_available(), reason="attnext._C is not built")


@pytest.fixture
def kernels_disabled():
    """Run a block on the reference fallback, restoring the previous setting afterwards."""
    prev = attnext.kernels_enabled()
    attnext.set_kernels_enabled(False)
    try:
        yield
    finally:
        attnext.set_kernels_enabled(prev)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code: str, timeout: float = 600, **env) -> "subprocess.CompletedProcess":
    """Runs ``python -c code`` in the repository root with extra environment variables
    (for settings read once per process, such as ATEN_CPU_CAPABILITY or ATTNEXT_*)."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ, **env), capture_output=True,
                          text=True, timeout=timeout)


def assert_python_ok(code: str, **env) -> None:
    """:func:`run_python` must exit 0 and print ``ok`` (the snippet's last line)."""
    out = run_python(code, **env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ok" in out.stdout, out.stdout[-3000:]


# The CPU kernels a test can run a snippet on: the best one this CPU has ("native")
# and the narrower ones ATTNEXT_CPU_ISA selects here (AVX2 only on x86-64).
CPU_ISAS = ["native", "avx2", "scalar"] if platform.machine().lower() in ("x86_64", "amd64") else ["native", "scalar"]


def assert_python_ok_on_isa(code: str, isa: str) -> None:
    """:func:`assert_python_ok` with attnext's CPU kernels capped at ``isa`` (one of
    :data:`CPU_ISAS`; ``"native"``: no cap)."""
    assert_python_ok(code, **({} if isa == "native" else {"ATTNEXT_CPU_ISA": isa}))
