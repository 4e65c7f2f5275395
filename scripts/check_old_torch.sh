#!/usr/bin/env bash
# The oldest torch the README promises (2.5.1), tested: a venv with torch==2.5.1 and the
# setuptools a Python 3.11 venv comes with (65.5: the pyproject metadata must work there)
# is made once at ~/.cache/attnext/venv-torch-2.5.1 and reused (torch 2.5.1 on x86_64
# from PyPI is the CUDA 12.4 build: ~5 GB with its nvidia-* wheels, ~8 min to install).
# In a temporary copy of the tree it builds a wheel with `pip wheel --no-build-isolation`
# (CPU kernels, ATTNEXT_REQUIRE_NATIVE=1: a failed build fails), builds the same extension
# in place (ninja reuses the objects) and runs a representative subset of the suite:
# every op forward and backward against the oracles, opcheck, fake kernels, torch.compile,
# the hypothesis properties (after compile: FTZ, see tests/conftest.py), the fallback rules.
#   ATTNEXT_OLD_TORCH=2.6.0 scripts/check_old_torch.sh   another version, its own venv
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
version="${ATTNEXT_OLD_TORCH:-2.5.1}"
venv="${ATTNEXT_OLD_TORCH_VENV:-$HOME/.cache/attnext/venv-torch-$version}"
py="$venv/bin/python"
export MAX_JOBS="${MAX_JOBS:-2}"
export ATTNEXT_REQUIRE_NATIVE=1 ATTNEXT_FORCE_CPU=1
unset ATTNEXT_FORCE_CUDA

if ! "$py" -c "import torch, pytest, hypothesis, expecttest, ninja, wheel, sys
sys.exit(torch.__version__.split('+')[0] != '$version')" 2>/dev/null; then
  echo "(creating $venv: torch==$version from the package index)"
  rm -rf "$venv"
  mkdir -p "$(dirname "$venv")"
  python3 -m venv "$venv"
  # No setuptools upgrade on purpose: the venv's own (65.5 on Python 3.11) is what a
  # user with --no-build-isolation has.
  "$py" -m pip install -q "torch==$version" wheel ninja numpy "pytest>=7" "hypothesis>=6" expecttest
fi
"$py" -c 'import torch, setuptools; print(f"torch {torch.__version__}, setuptools {setuptools.__version__}")'

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tree="$work/tree"
mkdir -p "$tree"
git ls-files -z | xargs -0 cp --parents -t "$tree"
cd "$tree"
# Warm runs recompile nothing that did not change: the compiler through ccache (when
# installed) by a wrapper with the real compiler's path, torch's own ccache prefix off.
ccache=()
if command -v ccache >/dev/null; then
  printf '#!/bin/sh\nexec ccache %s "$@"\n' "$(command -v "${CXX:-c++}")" >"$work/cxx"
  chmod +x "$work/cxx"
  ccache=(env CXX="$work/cxx" TORCH_NO_COMPILER_WRAPPER=1 CCACHE_BASEDIR="$tree" CCACHE_NOHASHDIR=1)
fi
"${ccache[@]}" "$py" -m pip wheel -q --no-build-isolation --no-deps -w "$work/dist" . >"$work/wheel.log" 2>&1 || {
  tail -60 "$work/wheel.log"; echo "FAIL: pip wheel against torch $version"; exit 1; }
ls "$work/dist"
"$py" -c 'import re, sys, zipfile; z = zipfile.ZipFile(sys.argv[1])
meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
sys.exit(not re.search(r"^License(-Expression)?: BSD-3-Clause$", meta, re.M))' \
  "$work"/dist/attnext-*.whl || {
  echo "FAIL: the wheel's metadata has no license"; exit 1; }
"${ccache[@]}" "$py" setup.py -q build_ext --inplace >"$work/build.log" 2>&1 || {
  tail -60 "$work/build.log"; echo "FAIL: build_ext against torch $version"; exit 1; }
PYTHONPATH="$tree" "$py" -c 'import attnext, torch; assert attnext.native_available(), attnext.ops._C_ERROR
print("built against torch", torch.__version__, "CPU kernels:", torch.ops.attnext._cpu_isa(), torch.ops.attnext._cpu_parallel())'
# The slowest cases (~70% of these files' time: dropout gradchecks, bfloat16 error sweeps,
# subprocess runs) stay with the full suite.
fast="not gradcheck_with_dropout_fixed_seed and not rng_tensor_replaces_the_ints and not bfloat16_dot_path and not bfloat16_within_twice_eager and not subprocess and not narrower_instruction_sets"
PYTHONPATH="$tree" "$py" -m pytest -q -p no:cacheprovider \
  tests/test_causal_softmax.py tests/test_matmul.py tests/test_causal_mean.py tests/test_dropout.py \
  tests/test_attention.py tests/test_attention_decode.py tests/test_attention_qkvpacked.py \
  tests/test_compile.py tests/test_properties.py tests/test_fallback.py tests/test_compat.py \
  -k "$fast"
echo "torch $version: ok"
