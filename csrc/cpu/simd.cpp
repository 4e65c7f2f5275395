// Run-time choice of the instruction set for attnext's CPU kernels.
#include <ATen/Version.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>

#include "cpu/parallel.h"
#include "cpu/vec_math.h"

namespace attnext {
namespace simd {

Isa detected_isa() {
  static const Isa isa = [] {
#if ATTNEXT_X86_SIMD
    // torch's own choice, which already honours ATEN_CPU_CAPABILITY
    // ("AVX512", "AVX2", "DEFAULT", ...), capped by what this CPU reports.
    const std::string cap = at::get_cpu_capability();
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
    if (cap == "AVX512" && avx512) {
      return Isa::kAvx512;
    }
    if ((cap == "AVX512" || cap == "AVX2") && avx2) {
      return Isa::kAvx2;
    }
#endif
    return Isa::kScalar;
  }();
  return isa;
}

bool bf16_dot_available() {
  static const bool ok = [] {
#if ATTNEXT_X86_SIMD
    const char* env = std::getenv("ATTNEXT_BF16_DOT");
    if (env != nullptr && std::string(env) == "0") {
      return false;
    }
    __builtin_cpu_init();
    return detected_isa() == Isa::kAvx512 && __builtin_cpu_supports("avx512bf16");
#else
    return false;
#endif
  }();
  return ok;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "scalar";
  }
}

int64_t stream_threshold_bytes() {
  static const int64_t bytes = [] {
    const char* env = std::getenv("ATTNEXT_STREAM_BYTES");
    if (env != nullptr && *env != '\0') {
      char* end = nullptr;
      const long long v = std::strtoll(env, &end, 10);
      if (end != nullptr && *end == '\0' && v >= 0) {
        return static_cast<int64_t>(v);
      }
    }
    return int64_t(64) << 20;
  }();
  return bytes;
}

namespace {
std::string cpu_isa() { return isa_name(detected_isa()); }
std::string cpu_parallel() { return parallel_backend(); }
}  // namespace

}  // namespace simd
}  // namespace attnext

TORCH_LIBRARY_FRAGMENT(attnext, m) {
  // Which instruction set the CPU kernels use in this process: "avx512", "avx2" or "scalar".
  m.def("_cpu_isa() -> str", &attnext::simd::cpu_isa);
  // How the CPU kernels' loops run on several threads in this build: "openmp" (compiled with
  // OpenMP, torch's OpenMP pool), "native" (torch's own pool) or "threads" (no compiler
  // OpenMP: std::thread, csrc/cpu/parallel.h).
  m.def("_cpu_parallel() -> str", &attnext::simd::cpu_parallel);
}
