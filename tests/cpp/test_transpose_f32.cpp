// The AVX-512 float transposition (transpose_f32 in cpu/gemm_f32.inl, which
// f32_transpose_kernel returns on AVX-512 CPUs) against the
// plain loop: every combination of full 16 x 16 blocks and ragged edges, padded
// source and destination strides, and nothing written outside the (C, R) result.
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "check.h"
#include "cpu/vec_math.h"

#if ATTNEXT_X86_SIMD
namespace attnext {
ATTNEXT_ISA_BEGIN_AVX512
namespace test_avx512 {
#include "cpu/gemm_f32.inl"
}  // namespace test_avx512
ATTNEXT_ISA_END
}  // namespace attnext
#endif

using attnext_test::check;

int main() {
#if ATTNEXT_X86_SIMD
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
#else
  const bool avx512 = false;
#endif
  if (!avx512) {
    std::printf("transpose_f32: no AVX-512 on this CPU, nothing to test\n");
    return 0;
  }
#if ATTNEXT_X86_SIMD
  const auto fn = &attnext::test_avx512::transpose_f32;
  const int64_t sizes[] = {1, 3, 15, 16, 17, 31, 32, 48, 64, 100, 256, 270};
  int64_t cases = 0;
  for (int64_t R : sizes) {
    for (int64_t C : sizes) {
      const int64_t lds = C + 5, ldd = R + 16 + 3;
      std::vector<float> src(R * lds), dst(C * ldd + 7, -99.0f);
      for (int64_t i = 0; i < R * lds; ++i) src[i] = static_cast<float>(i % 9973) * 0.5f - 7.0f;
      fn(src.data(), lds, R, C, dst.data(), ldd);
      bool ok = true;
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t r = 0; r < ldd; ++r) {
          const float want = r < R ? src[r * lds + c] : -99.0f;  // the padding stays untouched
          ok &= dst[c * ldd + r] == want;
        }
      }
      for (int64_t i = C * ldd; i < C * ldd + 7; ++i) ok &= dst[i] == -99.0f;
      check(ok, "transpose R=" + std::to_string(R) + " C=" + std::to_string(C));
      ++cases;
    }
  }
  std::printf("transpose_f32: %lld shapes\n", static_cast<long long>(cases));
#endif
  return attnext_test::failures() == 0 ? 0 : 1;
}
