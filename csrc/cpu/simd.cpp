// Run-time choice of the instruction set for attnext's CPU kernels, and what
// the CPU reports (x86-64: cpuid through __builtin_cpu_supports; AArch64: the
// kernel's hwcaps).
#include <ATen/Version.h>
#include <torch/library.h>

#include <cctype>
#include <cstdlib>
#include <string>
#include <vector>

#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#endif

#include "cpu/parallel.h"
#include "cpu/vec_math.h"

namespace attnext {
namespace simd {

namespace {

// An environment variable, lower-cased; empty when unset.
std::string env_lower(const char* name) {
  const char* env = std::getenv(name);
  std::string s = env == nullptr ? "" : env;
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

// The widest instruction set of this CPU that ATEN_CPU_CAPABILITY allows.
Isa best_isa() {
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
  return Isa::kScalar;
#elif ATTNEXT_ARM_NEON
  // On AArch64 torch reports "DEFAULT" (or "SVE256") for its NEON kernels, so its
  // answer cannot say "no SIMD": read the variable itself, default meaning scalar
  // as it does on x86.
  return env_lower("ATEN_CPU_CAPABILITY") == "default" ? Isa::kScalar : Isa::kNeon;
#else
  return Isa::kScalar;
#endif
}

}  // namespace

Isa detected_isa() {
  static const Isa isa = [] {
    const Isa best = best_isa();
    // ATTNEXT_CPU_ISA caps the choice (scalar < avx2 < avx512; scalar < neon):
    // a narrower set of this architecture is taken, a wider one changes nothing.
    const std::string want = env_lower("ATTNEXT_CPU_ISA");
    if (want.empty() || want == "auto") return best;
    if (want == "scalar") return Isa::kScalar;
#if ATTNEXT_X86_SIMD
    if (want == "avx2") return best == Isa::kAvx512 ? Isa::kAvx2 : best;
    if (want == "avx512") return best;
#elif ATTNEXT_ARM_NEON
    if (want == "neon") return best;
#endif
    TORCH_WARN("attnext: ATTNEXT_CPU_ISA=", want, " names no instruction set of this build's kernels (",
               isa_name(best), " or scalar here); using ", isa_name(best));
    return best;
  }();
  return isa;
}

std::vector<std::string> cpu_features() {
  std::vector<std::string> f;
#if ATTNEXT_X86_SIMD
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2")) f.emplace_back("avx2");
  if (__builtin_cpu_supports("fma")) f.emplace_back("fma");
  if (__builtin_cpu_supports("avx512f")) f.emplace_back("avx512f");
  if (__builtin_cpu_supports("avx512bf16")) f.emplace_back("avx512bf16");
#elif defined(__aarch64__)
  f.emplace_back("neon");  // Advanced SIMD: part of the AArch64 baseline
#if defined(__linux__)
  const unsigned long hw = getauxval(AT_HWCAP), hw2 = getauxval(AT_HWCAP2);
  // Bits of the kernel's uapi asm/hwcap.h (stable ABI), spelled out for old headers.
  if (hw & (1ul << 20)) f.emplace_back("asimddp");  // HWCAP_ASIMDDP: SDOT/UDOT
  if (hw & (1ul << 22)) f.emplace_back("sve");      // HWCAP_SVE
  if (hw2 & (1ul << 1)) f.emplace_back("sve2");     // HWCAP2_SVE2
  if (hw2 & (1ul << 14)) f.emplace_back("bf16");    // HWCAP2_BF16: BFDOT, BFMMLA
  if (hw2 & (1ul << 13)) f.emplace_back("i8mm");    // HWCAP2_I8MM
#endif
#endif
  return f;
}

bool bf16_dot_available() {
  static const bool ok = [] {
    const char* env = std::getenv("ATTNEXT_BF16_DOT");
    if (env != nullptr && std::string(env) == "0") {
      return false;
    }
#if ATTNEXT_X86_SIMD
    __builtin_cpu_init();
    return detected_isa() == Isa::kAvx512 && __builtin_cpu_supports("avx512bf16");
#elif ATTNEXT_ARM_BF16 && defined(__linux__)
    return detected_isa() == Isa::kNeon && (getauxval(AT_HWCAP2) & (1ul << 14)) != 0;  // HWCAP2_BF16
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
    case Isa::kNeon:
      return "neon";
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
  // Which instruction set the CPU kernels use in this process: "avx512", "avx2",
  // "neon" or "scalar".
  m.def("_cpu_isa() -> str", &attnext::simd::cpu_isa);
  // How the CPU kernels' loops run on several threads in this build: "openmp" (compiled with
  // OpenMP, torch's OpenMP pool), "native" (torch's own pool) or "threads" (no compiler
  // OpenMP: std::thread, csrc/cpu/parallel.h).
  m.def("_cpu_parallel() -> str", &attnext::simd::cpu_parallel);
  // The SIMD features the CPU reports (simd::cpu_features), used by kernels or not.
  m.def("_cpu_features() -> str[]", &attnext::simd::cpu_features);
}
