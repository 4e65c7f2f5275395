#!/usr/bin/env bash
# attnext on AArch64, checked on an x86-64 machine: cross-compile, run under qemu.
#
#   1. tools: Debian's aarch64 cross g++ and qemu-user (apt-get, when missing);
#   2. an arm64 sysroot (Debian's python3.11 and the libraries it and torch need,
#      `apt-get download` + `dpkg -x`), torch's aarch64 CPU wheel and the tests'
#      Python dependencies, all cached under ~/.cache/attnext/aarch64 and reused;
#   3. the extension (attnext/_C*.so, with setup.py's flags) and the C++ tests
#      (tests/cpp, as CMakeLists.txt builds them) cross-compiled against the wheel's
#      headers and libraries, with ninja (and ccache when it is there) in
#      build/aarch64;
#   4. the C++ tests under qemu-aarch64;
#   5. _cpu_isa / _cpu_features under qemu's cortex-a57 (NEON only) and max
#      (SVE, BF16, I8MM, dot product) CPUs, and the ISA overrides;
#   6. a subset of the Python tests under qemu (every op, forward and backward,
#      against the reference; no torch.compile, too slow there), once on the NEON
#      kernels with the BF16 extension's bfloat16 tiles (max) and once on the scalar
#      ones (ATEN_CPU_CAPABILITY=default), and the bfloat16 attention tests on the
#      NEON kernels of a CPU without BF16 (cortex-a57: the widened-float tiles); each
#      run checks which bfloat16 tiles ran (the kernel verdicts explain reports). attnext
#      comes from this tree plus the aarch64 _C in a temporary copy (the tree's x86
#      attnext/_C*.so is never touched).
#
# Needs root (apt-get) the first time. Environment:
#   ATTNEXT_AARCH64_CACHE  cache folder (default ~/.cache/attnext/aarch64)
#   ATTNEXT_AARCH64_TORCH  torch version for the wheel (default 2.8.0: a CPU build;
#                          2.13's aarch64 wheel is a CUDA build that needs CUDA's libraries)
#   MAX_JOBS               parallel compiles (default 2)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
cache="${ATTNEXT_AARCH64_CACHE:-$HOME/.cache/attnext/aarch64}"
torch_version="${ATTNEXT_AARCH64_TORCH:-2.8.0}"
jobs="${MAX_JOBS:-2}"
start=$(date +%s)
say() { printf -- '--- %s (t=%ss)\n' "$1" "$(($(date +%s) - start))"; }
mkdir -p "$cache"

# ---- 1. tools
say "tools"
missing=()
command -v aarch64-linux-gnu-g++ >/dev/null || missing+=(g++-aarch64-linux-gnu)
command -v qemu-aarch64 >/dev/null || missing+=(qemu-user)
command -v ninja >/dev/null || missing+=(ninja-build)
command -v ccache >/dev/null || missing+=(ccache)
if [ "${#missing[@]}" -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# ---- 2. sysroot, torch wheel, Python dependencies (each cached once complete)
sysroot="$cache/sysroot"
if [ ! -e "$sysroot/.complete" ]; then
  say "arm64 sysroot (Debian packages)"
  if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    dpkg --add-architecture arm64
  fi
  apt-get update -qq
  rm -rf "$sysroot" "$cache/debs"
  mkdir -p "$sysroot" "$cache/debs"
  chmod 777 "$cache/debs"  # apt-get download fetches as user _apt
  pkgs=(python3.11-minimal libpython3.11-minimal libpython3.11-stdlib libpython3.11 libpython3.11-dev
        libc6 libc6-dev linux-libc-dev libstdc++6 libgcc-s1 libgomp1 libexpat1 zlib1g libffi8 libssl3
        libbz2-1.0 liblzma5 libsqlite3-0 libuuid1 libcrypt1 libncursesw6 libtinfo6 libreadline8)
  (cd "$cache/debs" && apt-get download -qq "${pkgs[@]/%/:arm64}")
  for deb in "$cache/debs"/*.deb; do dpkg -x "$deb" "$sysroot"; done
  rm -rf "$cache/debs"
  touch "$sysroot/.complete"
fi
site="$cache/site-$torch_version"
if [ ! -e "$site/.complete" ]; then
  say "torch $torch_version aarch64 wheel + Python test dependencies"
  rm -rf "$site"
  pip_arm=(pip install -q --disable-pip-version-check --target "$site" --platform manylinux_2_28_aarch64
           --platform manylinux2014_aarch64 --platform linux_aarch64 --python-version 3.11 --implementation cp
           --only-binary=:all:)
  # torch without its dependencies: pip would judge their markers by this x86 machine
  # (and fetch CUDA and triton wheels); the ones an import and the tests need, by name.
  quiet() { grep -v -e '^WARNING: Location' -e '^WARNING: Running pip as' || true; }
  python3 -m "${pip_arm[@]}" --no-deps "torch==$torch_version" 2>&1 | quiet
  python3 -m "${pip_arm[@]}" filelock typing-extensions sympy networkx jinja2 fsspec numpy \
    pytest hypothesis expecttest 2>&1 | quiet
  touch "$site/.complete"
fi
torch_dir="$site/torch"
torch_libs=("$torch_dir/lib")
[ -d "$site/torch.libs" ] && torch_libs+=("$site/torch.libs")
# The wheel's C++ ABI (torch.compiled_with_cxx11_abi(), without a 30 s import under
# qemu): libc10 exports std::string functions under the new ABI's __cxx11 names or not.
if [ "$(aarch64-linux-gnu-nm -D --defined-only "$torch_dir/lib/libc10.so" | grep -c 'St7__cxx1112basic_string')" -gt 0 ]; then
  abi=1
else
  abi=0
fi
py_inc="$sysroot/usr/include/python3.11"
py_plat_inc="$sysroot/usr/include/aarch64-linux-gnu/python3.11"

# ---- 3. cross-compile: a ninja file, so an unchanged tree rebuilds nothing
say "cross-compile (torch $torch_version headers, _GLIBCXX_USE_CXX11_ABI=$abi, $jobs jobs)"
out="$root/build/aarch64"
mkdir -p "$out"
cxx=aarch64-linux-gnu-g++
if command -v ccache >/dev/null; then
  export CCACHE_DIR="${CCACHE_DIR:-$cache/ccache}"
  export CCACHE_BASEDIR="$root"  # paths in the tree hashed relative: hits from a clone elsewhere
  cxx="ccache $cxx"
fi
rpath=$(IFS=:; echo "${torch_libs[*]}")
{
  echo "cxx = $cxx"
  # setup.py's flags (-O3 -fopenmp -fvisibility=hidden -std=c++17) and torch's includes
  echo "cflags = -O3 -fPIC -fopenmp -fvisibility=hidden -std=c++17 -D_GLIBCXX_USE_CXX11_ABI=$abi" \
       "-I$root/csrc -I$torch_dir/include -I$torch_dir/include/torch/csrc/api/include -I$py_inc -idirafter $sysroot/usr/include" \
       "-Wno-deprecated-declarations"
  echo "ldflags = -fopenmp -L$torch_dir/lib -Wl,-rpath,$rpath -Wl,-rpath-link,$rpath -Wl,--allow-shlib-undefined"
  echo "rule cc"
  echo "  command = \$cxx -MMD -MF \$out.d \$cflags \$extra -c \$in -o \$out"
  echo "  depfile = \$out.d"
  echo "  deps = gcc"
  echo "  description = CXX \$out"
  echo "rule so"
  echo "  command = \$cxx -shared \$in -o \$out \$ldflags -ltorch -ltorch_cpu -lc10 \$libs"
  echo "rule exe"
  echo "  command = \$cxx \$in -o \$out \$ldflags -Wl,-rpath,$out -L$out -lattnext -ltorch -ltorch_cpu -lc10 -lpthread"
  objs=()
  for src in csrc/cpu/*.cpp; do
    o="obj/$(basename "${src%.cpp}").o"
    echo "build $o: cc $root/$src"
    objs+=("$o")
  done
  # The Python module and the libtorch library differ only in csrc/attnext.cpp.
  echo "build obj/attnext_py.o: cc $root/csrc/attnext.cpp"
  echo "  extra = -DATTNEXT_PYTHON_MODULE"
  echo "build obj/attnext_lib.o: cc $root/csrc/attnext.cpp"
  echo "build _C.so: so obj/attnext_py.o ${objs[*]}"
  echo "  libs = -ltorch_python"
  echo "build libattnext.so: so obj/attnext_lib.o ${objs[*]}"
  tests=()
  for src in tests/cpp/test_*.cpp; do
    name=$(basename "${src%.cpp}")
    echo "build obj/$name.o: cc $root/$src"
    [[ "$name" == test_cuda_* ]] && echo "  extra = -I$root/tests/cpp/cuda_shim"
    echo "build $name: exe obj/$name.o | libattnext.so"
    tests+=("$name")
  done
  echo "default _C.so ${tests[*]}"
} >"$out/build.ninja"
ninja -C "$out" -j "$jobs" | grep -v -e '^\[' -e '^ninja: Entering' || true
ninja -C "$out" -j "$jobs" >/dev/null  # fails here (with the compiler's message above) if anything did not build

export QEMU_LD_PREFIX="$sysroot"
run_arm() { LD_LIBRARY_PATH="$rpath" qemu-aarch64 "$@"; }

# ---- 4. C++ tests. All are compiled, and all run but the CUDA kernels on emulated
# blocks (test_cuda_core_attention, test_cuda_softmax, test_mma_layout) and the
# output cache's threads (test_output_cache): code without ISA-specific paths, a
# minute or more each under qemu, and run natively by ctest
# (ATTNEXT_AARCH64_CPP_ALL=1 runs them here too).
say "C++ tests under qemu-aarch64"
failed=0
for t in "${tests[@]}"; do
  if [[ "$t" =~ ^test_(cuda_core_attention|cuda_softmax|mma_layout|output_cache)$ ]] && [ "${ATTNEXT_AARCH64_CPP_ALL:-0}" != "1" ]; then
    echo "built, not run: $t"
    continue
  fi
  t0=$(date +%s)
  if run_arm "$out/$t" >"$out/$t.log" 2>&1; then
    echo "PASS $t ($(($(date +%s) - t0))s)"
  else
    echo "FAIL $t"; cat "$out/$t.log"; failed=$((failed + 1))
  fi
done
grep -h "VecF::exp\|exp_f32" "$out/test_simd_exp.log" || true
grep -h "checked" "$out/test_simd_vecf.log" || true
# qemu-user's default CPU (max) has the BF16 extension: its kernels must have run.
grep -q "kernels on arm bf16" "$out/test_gemm_bf16.log" || { echo "FAIL test_gemm_bf16 did not run the BF16 kernels"; failed=$((failed + 1)); }
grep -h "gemm_bf16:" "$out/test_gemm_bf16.log" || true
[ "$failed" -eq 0 ] || { echo "$failed C++ test(s) failed under qemu"; exit 1; }

# ---- 5 and 6: Python, attnext from a temporary copy of the tree plus the aarch64 _C
tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
git ls-files -z attnext tests | xargs -0 cp --parents -t "$tree"
cp pyproject.toml "$tree/"
cp "$out/_C.so" "$tree/attnext/_C.cpython-311-aarch64-linux-gnu.so"

# Every import of torch costs ~30 s under qemu, so the ISA checks share the processes
# of the test runs where they can: each run first checks _cpu_isa and _cpu_features,
# and after its tests that the bfloat16 attention verdicts name the expected tiles.
say "ISA choice and CPU features under qemu"
all_features="['asimddp', 'bf16', 'i8mm', 'neon', 'sve', 'sve2']"  # what qemu's max CPU reports
py_arm() {  # env assignments, then --, then python arguments; runs in the copy of the tree
  local envs=()
  while [ "$1" != "--" ]; do envs+=("$1"); shift; done
  shift
  (cd "$tree" && env "${envs[@]}" ATTNEXT_ATTENTION_KERNEL=1 QEMU_LD_PREFIX="$sysroot" LD_LIBRARY_PATH="$rpath" \
     PYTHONPATH="$tree:$site" qemu-aarch64 "$sysroot/usr/bin/python3.11" "$@")
}
# (python -c puts the current folder first on sys.path: the copy's attnext, with the aarch64 _C)
check_then_pytest='
import sys, torch, attnext
got = (torch.ops.attnext._cpu_isa(), str(sorted(torch.ops.attnext._cpu_features())))
want = (sys.argv[1], sys.argv[2])
print("ISA and features:", got)
if got != want:
    sys.exit(f"FAIL: expected {want}")
import pytest
rc = pytest.main(sys.argv[4:])
tiles = [c for c in torch.ops.attnext._kernel_choices() if ", bfloat16," in c]
print("bfloat16 attention tiles:", tiles)
if rc == 0 and (not tiles or not all(sys.argv[3] in c for c in tiles)):
    sys.exit(f"FAIL: expected every bfloat16 verdict to name {sys.argv[3]!r}")
sys.exit(rc)
'
# (ATTNEXT_ATTENTION_KERNEL=1: attnext's tiles, whose verdicts say which ran)
bfdot_tiles="attnext tiles (Arm BF16 dot products, BFDOT) (forced"
widened_tiles="attnext tiles (forced"
# The bfloat16 attention tests (forward and gradients within twice eager's error of the
# float64 oracle; the largest shapes left out) and the tile name check.
bf16_selection=(
  tests/test_attention.py::test_bfloat16_within_twice_eager_every_path
  tests/test_attention.py::test_bfloat16_strided_views_and_chunked_backward
  tests/test_kernel_choice.py::test_bfloat16_tiles_are_named_by_their_instructions
)
bf16_skip='every_path and (batch1 or batch6)'

# A CPU with NEON alone (no false features): its bfloat16 tiles widen to float.
say "bfloat16 attention tests under qemu's cortex-a57 (NEON, no BF16)"
py_arm QEMU_CPU=cortex-a57 -- -c "$check_then_pytest" neon "['neon']" "$widened_tiles" \
  -q -x -p no:cacheprovider "${bf16_selection[@]}" -k "not ($bf16_skip)"

# One selection for both runs: every op's forward and backward against the
# reference (float32, bfloat16 and float64 gradients), on the shapes that reach
# the vector loops' bodies and tails, NaN/inf rows, strided views, dropout masks,
# decode and grouped-query heads; no torch.compile, opcheck, gradcheck of large
# cases or property tests (minutes each under qemu).
selection=(
  tests/test_causal_softmax.py::test_forward_and_grad_match_oracle
  tests/test_causal_softmax.py::test_non_finite_inputs_behave_like_torch_softmax
  tests/test_causal_softmax.py::test_large_magnitudes_do_not_overflow
  tests/test_causal_softmax.py::test_fully_masked_rows_are_zero_not_nan
  tests/test_causal_softmax.py::test_non_contiguous_views
  tests/test_causal_softmax.py::test_rows_sum_to_one_and_first_row_is_one_hot
  tests/test_causal_softmax.py::test_scales
  tests/test_causal_softmax.py::test_kernel_is_used_by_default
  tests/test_attention.py::test_float32_matches_reference
  tests/test_attention.py::test_non_finite_scores_behave_as_torch_softmax
  tests/test_attention.py::test_dropout_matches_reference_mask_and_fallback
  tests/test_attention.py::test_lse_matches_logsumexp
  tests/test_attention.py::test_transposed_views_like_nanogpt
  tests/test_attention.py::test_matches_sdpa_float32
  tests/test_attention.py::test_fallback_parity
  "${bf16_selection[@]}"  # (bfloat16 strided views among them)
  tests/test_attention_qkvpacked.py
  tests/test_attention_decode.py::test_decode_matches_reference
  tests/test_attention_decode.py::test_decode_lse_matches_reference
  tests/test_attention_decode.py::test_decode_inf_and_nan
  tests/test_attention_decode.py::test_decode_gradients
  tests/test_attention_decode.py::test_gqa_matches_sdpa
  tests/test_attention_decode.py::test_decode_strided_views
  tests/test_causal_mean.py::test_forward_backward_float64
  tests/test_causal_mean.py::test_dtypes
  tests/test_causal_mean.py::test_non_contiguous_input
  tests/test_dropout.py::test_matches_reference_mask
  tests/test_dropout.py::test_backward_applies_the_same_mask_and_gradchecks
  tests/test_dropout.py::test_native_kernel_runs_and_matches_fallback
  tests/test_matmul.py::test_forward_dtypes
  tests/test_matmul.py::test_gradients_float64
  tests/test_matmul.py::test_strided_views
  tests/test_matmul.py::test_reduced_precision_gradients
)
# Left out: float64 and float16 cases where the float32 and bfloat16 ones run the
# vector code (softmax rows, non-finite attention scores), and the slowest shapes
# under qemu (20-40 s each; smaller shapes of the same tests stay): large tiles,
# long decode rows, the packed backward past its copy budget (minutes; portable
# C++, run natively).
skip='(match_oracle and (dtype1 or dtype3)) or (non_finite_scores and dtype0)'
skip+=' or 520-520 or 200-200 or 150-64 or 2100 or 3000 or too_long_to_copy or compile or opcheck or hypothesis'
skip+=' or slow or cuda'
skip+=" or ($bf16_skip)"
# NEON with the BF16 extension's tiles (ATTNEXT_CPU_ISA=neon: the ISA override names
# the best one, a no-op), then the scalar kernels through torch's own override.
say "Python tests under qemu's max CPU, ATTNEXT_CPU_ISA=neon (BFDOT bfloat16 tiles)"
py_arm QEMU_CPU=max ATTNEXT_CPU_ISA=neon -- -c "$check_then_pytest" neon "$all_features" "$bfdot_tiles" \
  -q -x -p no:cacheprovider "${selection[@]}" -k "not ($skip)"
say "Python tests under qemu's max CPU, ATEN_CPU_CAPABILITY=default (scalar)"
py_arm QEMU_CPU=max ATEN_CPU_CAPABILITY=default -- -c "$check_then_pytest" scalar "$all_features" "$widened_tiles" \
  -q -x -p no:cacheprovider "${selection[@]}" -k "not ($skip)"
say "done"
