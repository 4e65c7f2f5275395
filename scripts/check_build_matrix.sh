#!/usr/bin/env bash
# The build's fallbacks, checked on Linux in temporary copies of the tree (macOS without a Mac):
#   (a) clang++ with no OpenMP runtime (Debian's clang without libomp-dev: -fopenmp compiles
#       nothing that includes <omp.h>, as with Apple's clang, which rejects -fopenmp outright)
#       builds the extension with the std::thread fallback (setup.py prints it,
#       torch.ops.attnext._cpu_parallel() says "threads") and a fast test subset passes on
#       2 threads: every op forward and backward, opcheck, compile;
#   (b) a compiler that cannot build anything (CXX=/bin/false) still installs the
#       pure-Python package with `pip install --no-build-isolation`: import works, an op
#       call runs the eager fallback with its warning; with ATTNEXT_REQUIRE_NATIVE=1 the
#       same install fails.
# Usage: scripts/check_build_matrix.sh [python with torch, default .venv/bin/python]
# Installs clang (apt-get, without recommends, so no libomp) when it is missing. Compiles
# through ccache when that is installed (CCACHE_BASEDIR: hits whatever the temp dir).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
python="${1:-${ATTNEXT_PYTHON:-.venv/bin/python}}"
python="$(cd "$(dirname "$python")" && pwd)/$(basename "$python")"  # absolute, venv symlink kept
export MAX_JOBS="${MAX_JOBS:-2}"
unset ATTNEXT_REQUIRE_NATIVE ATTNEXT_FORCE_CUDA
export ATTNEXT_FORCE_CPU=1

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# A bare venv that sees $python's packages (torch, pytest) through a .pth line but not an
# editable attnext there: its import hook would hand out that checkout's attnext._C.
"$python" -m venv --without-pip "$work/venv"
"$python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' \
  >"$("$work/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/with-torch.pth"
py="$work/venv/bin/python"
copy_tree() {  # copy_tree DIR: the tracked files (as in the working tree) into DIR
  mkdir -p "$1"
  (cd "$root" && git ls-files -z | xargs -0 cp --parents -t "$1")
}

echo "--- (a) clang++ without an OpenMP runtime"
if ! command -v clang++ >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends clang >/dev/null
fi
printf '#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n' >"$work/omp.cpp"
mkdir -p "$work/bin"
reject_omp=0
if clang++ -fopenmp "$work/omp.cpp" -o "$work/omp" 2>/dev/null; then
  # libomp-dev is installed: make clang behave as Apple's, which has no -fopenmp and no
  # libomp, so the check is about the compiler without OpenMP and not about libomp.
  echo "(clang++ finds libomp here: using a wrapper that rejects OpenMP, like Apple's clang)"
  reject_omp=1
fi
# The compiler as setup.py sees it: a wrapper that runs the real clang++ through ccache
# (when installed; torch's own ccache prefix is off, it would hash the wrapper's path).
launcher=$(command -v ccache || true)
cat >"$work/bin/clang++" <<EOF
#!/usr/bin/env bash
if [ $reject_omp = 1 ]; then
  for a in "\$@"; do
    case "\$a" in -fopenmp|-fopenmp=*|-lomp|-lgomp) echo "clang: error: unsupported option '\$a'" >&2; exit 1;; esac
  done
fi
exec $launcher $(command -v clang++) "\$@"
EOF
chmod +x "$work/bin/clang++"
cxx="$work/bin/clang++"
tree="$work/clang"
copy_tree "$tree"
(cd "$tree" && ATTNEXT_REQUIRE_NATIVE=1 CXX="$cxx" CC=clang TORCH_NO_COMPILER_WRAPPER=1 CCACHE_BASEDIR="$tree" CCACHE_NOHASHDIR=1 \
    "$python" setup.py -q build_ext --inplace >"$work/clang-build.log" 2>&1) || {
  tail -50 "$work/clang-build.log"; echo "FAIL: the clang build failed"; exit 1; }
grep "attnext setup" "$work/clang-build.log"
grep -q "no usable OpenMP" "$work/clang-build.log" || { echo "FAIL: setup.py did not report the OpenMP fallback"; exit 1; }
(cd "$tree" && PYTHONPATH="$tree" "$py" - <<'EOF'
import os, torch, attnext
assert os.path.dirname(attnext.__file__) == os.path.join(os.getcwd(), "attnext"), attnext.__file__
assert attnext.native_available(), attnext.ops._C_ERROR
assert attnext.ops._C.__file__.startswith(os.getcwd()), attnext.ops._C.__file__
assert torch.ops.attnext._cpu_parallel() == "threads", torch.ops.attnext._cpu_parallel()
print("clang build:", attnext.ops._C.__file__, "parallel:", torch.ops.attnext._cpu_parallel())
EOF
)
# Every op forward and backward against the oracles, opcheck and compile, on 2 threads
# (so the std::thread path runs), the dropout mask's thread independence.
# The slowest cases (~70% of these files' time: dropout gradchecks, bfloat16 error sweeps,
# subprocess runs) stay with the full suite.
fast="not gradcheck_with_dropout_fixed_seed and not rng_tensor_replaces_the_ints and not bfloat16_dot_path and not bfloat16_within_twice_eager and not subprocess and not narrower_instruction_sets"
(cd "$tree" && PYTHONPATH="$tree" OMP_NUM_THREADS=2 ATTNEXT_EXPECT_CPU_PARALLEL=threads "$py" -m pytest -q -x \
    -p no:cacheprovider tests/test_causal_softmax.py tests/test_matmul.py tests/test_causal_mean.py \
    tests/test_dropout.py tests/test_attention_decode.py tests/test_fallback.py \
    tests/test_attention.py -k "$fast")

echo "--- (b) no working compiler: the pure-Python package installs"
site="$work/site"  # installed with --target: the environment of $python stays as it is
tree="$work/nocc"
copy_tree "$tree"
(cd "$tree" && CXX=/bin/false "$python" -m pip install -v --no-build-isolation --no-deps --target "$site" . \
    >"$work/nocc-install.log" 2>&1) || { tail -40 "$work/nocc-install.log"; echo "FAIL: install without a compiler"; exit 1; }
grep -o "\[attnext setup\].*" "$work/nocc-install.log" | sort -u
grep -q "installing WITHOUT native kernels" "$work/nocc-install.log" || { echo "FAIL: no warning at install"; exit 1; }
(cd "$work" && PYTHONPATH="$site" "$py" - <<'EOF'
import os, sys, warnings, torch, attnext
assert attnext.__file__.startswith(os.environ["PYTHONPATH"]), attnext.__file__
assert not attnext.native_available() and not any(f.startswith("_C") for f in os.listdir(os.path.dirname(attnext.__file__)))
x = torch.randn(2, 5, 5, requires_grad=True)
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    y = attnext.causal_softmax(x)
assert any("native kernels unavailable" in str(m.message) for m in w), [str(m.message) for m in w]
y.sum().backward()
expected = torch.softmax(x.masked_fill(torch.ones(5, 5).triu(1).bool(), float("-inf")), -1)
torch.testing.assert_close(y, expected)
print("pure-Python install: fallback op and its gradient ok")
EOF
)
if (cd "$tree" && ATTNEXT_REQUIRE_NATIVE=1 CXX=/bin/false "$python" -m pip install -q --no-build-isolation \
    --no-deps --target "$work/site-required" . >"$work/nocc-require.log" 2>&1); then
  echo "FAIL: ATTNEXT_REQUIRE_NATIVE=1 install succeeded without a compiler"; exit 1
fi
grep -q "ATTNEXT_REQUIRE_NATIVE=1" "$work/nocc-require.log" || { tail -20 "$work/nocc-require.log"; echo "FAIL: no reason given"; exit 1; }
echo "ATTNEXT_REQUIRE_NATIVE=1 without a compiler: the install fails, as it should"
echo "build matrix: ok"
