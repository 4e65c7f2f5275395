#!/usr/bin/env bash
# The GPU check, one command, on a machine with an NVIDIA GPU, nvcc and a CUDA torch
# already installed (no network needed):
#   build the CUDA extension, run the test suite (CUDA cases included), run
#   compute-sanitizer memcheck (every kernel, cuBLAS calls included) and racecheck +
#   synccheck (attnext's own kernels) on small cases (scripts/sanitize_cases.py), run the
#   CUDA benchmarks (appending to benchmarks/results/<gpu>.csv), print a short table.
# Fits in one 10-minute call on an H100. Usage: bash scripts/gpu_check.sh [--quick]
set -uo pipefail
cd "$(dirname "$0")/.."
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export PATH="$CUDA_HOME/bin:$PATH"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-16}"
quick="${1:-}"
status=0
out="${OUT:-benchmarks/results}"
mkdir -p "$out"

echo "=== build"
python -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -3 || exit 1
python -c 'import torch, attnext; print(torch.__version__, torch.cuda.get_device_name(), attnext.ops._DEVICES)'

echo "=== tests"
python -m pytest -q -rf --maxfail=40 tests 2>&1 | tee "$out/gpu_tests.log" | tail -45
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "=== compute-sanitizer"
for tool in memcheck racecheck synccheck; do
  # shared-memory hazards and barrier / warp-sync misuse: attnext's own kernels (matmul is cuBLAS's)
  cases_arg=""
  [ "$tool" = memcheck ] || cases_arg="--no-cublas"
  if command -v compute-sanitizer >/dev/null; then
    compute-sanitizer --tool "$tool" --error-exitcode 9 python scripts/sanitize_cases.py $cases_arg \
      > "$out/sanitizer_$tool.log" 2>&1
    rc=$?
    echo "$tool: exit $rc ($(grep -c 'ERROR SUMMARY: 0 errors' "$out/sanitizer_$tool.log") clean summaries)"
    [ "$rc" -eq 0 ] || status=1
  else
    echo "compute-sanitizer not found"; status=1
  fi
done

echo "=== benchmarks"
python benchmarks/bench_causal_softmax.py --device cuda --dtype float32 --dtype bfloat16 $quick 2>&1 | tee "$out/gpu_bench.log" | tail -40
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
python benchmarks/bench_attention_cuda.py $quick 2>&1 | tee "$out/gpu_bench_attention.log" | tail -40
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
for f in benchmarks/results/*.csv; do cp "$f" "$out/" 2>/dev/null || true; done

echo "=== gpu_check exit $status"
exit $status
