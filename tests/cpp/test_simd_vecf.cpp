// Every VecF (scalar, AVX2, AVX-512, NEON) against the contract the kernels rely
// on (cpu/vec_math.h): tail loads zero the lanes past n, tail stores write n
// lanes and nothing after them, select_first, bfloat16 widening, horizontal
// reductions (hsum4 included), and min/max returning their second operand when either is NaN
// (so a NaN in a row is treated alike by every instruction set).
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>

#include "check.h"
#include "cpu/vec_math.h"

// The checks, written once against the VecF of the namespace they are stamped into.
#define ATTNEXT_VECF_CHECKS                                                                           \
  inline void run_checks(const std::string& isa) {                                                    \
    using attnext_test::check;                                                                        \
    constexpr int64_t N = VecF::N;                                                                    \
    const float nan = std::numeric_limits<float>::quiet_NaN();                                        \
    float src[64], out[64 + 1];                                                                       \
    uint16_t bf[64];                                                                                  \
    for (int i = 0; i < 64; ++i) {                                                                    \
      src[i] = 0.25f * static_cast<float>(i) - 3.0f;                                                  \
      bf[i] = ::attnext::vec::float_to_bf16(src[i] * 1.5f);                                           \
    }                                                                                                 \
    bool ok_load = true, ok_tail = true, ok_store = true, ok_sel = true, ok_bf = true;                 \
    for (int64_t n = 0; n < N; ++n) {                                                                 \
      VecF::load_tail(src, n).store(out);                                                             \
      for (int64_t i = 0; i < N; ++i) ok_tail &= out[i] == (i < n ? src[i] : 0.0f);                   \
      VecF::load_tail(bf, n).store(out);                                                              \
      for (int64_t i = 0; i < N; ++i) ok_bf &= out[i] == (i < n ? ::attnext::vec::bf16_to_float(bf[i]) : 0.0f); \
      for (int64_t i = 0; i <= N; ++i) out[i] = -7.0f;                                                \
      VecF::load(src).store_tail(out, n);                                                             \
      for (int64_t i = 0; i <= N; ++i) ok_store &= out[i] == (i < n ? src[i] : -7.0f);                \
      VecF::select_first(n, VecF::set1(1.0f), VecF::set1(2.0f)).store(out);                           \
      for (int64_t i = 0; i < N; ++i) ok_sel &= out[i] == (i < n ? 1.0f : 2.0f);                      \
    }                                                                                                 \
    VecF::load(src + 5).store(out);                                                                   \
    for (int64_t i = 0; i < N; ++i) ok_load &= out[i] == src[5 + i];                                  \
    VecF::load(bf + 3).store(out);                                                                    \
    for (int64_t i = 0; i < N; ++i) ok_bf &= out[i] == ::attnext::vec::bf16_to_float(bf[3 + i]);      \
    check(ok_load, isa + ": load/store");                                                             \
    check(ok_tail, isa + ": load_tail zeroes lanes >= n");                                            \
    check(ok_store, isa + ": store_tail writes lanes < n only");                                      \
    check(ok_sel, isa + ": select_first");                                                            \
    check(ok_bf, isa + ": bfloat16 loads widen exactly");                                             \
    /* reductions over values whose sum is exact in float, in any order */                            \
    float sum = 0, mn = src[7], mx = src[7];                                                          \
    for (int64_t i = 0; i < N; ++i) {                                                                 \
      sum += src[7 + i];                                                                              \
      mn = std::fmin(mn, src[7 + i]);                                                                 \
      mx = std::fmax(mx, src[7 + i]);                                                                 \
    }                                                                                                 \
    const VecF r = VecF::load(src + 7);                                                               \
    check(r.hsum() == sum && r.hmin() == mn && r.hmax() == mx, isa + ": hsum, hmin, hmax");          \
    /* hsum4: four vectors' sums at once, each where it belongs (distinct sums, exact) */             \
    float h4[4], want4[4] = {0, 0, 0, 0};                                                             \
    for (int64_t w = 0; w < 4; ++w)                                                                   \
      for (int64_t i = 0; i < N; ++i) want4[w] += src[w * 9 + i] * static_cast<float>(w + 1);        \
    VecF::hsum4(VecF::load(src) * VecF::set1(1.0f), VecF::load(src + 9) * VecF::set1(2.0f),          \
                VecF::load(src + 18) * VecF::set1(3.0f), VecF::load(src + 27) * VecF::set1(4.0f), h4); \
    check(h4[0] == want4[0] && h4[1] == want4[1] && h4[2] == want4[2] && h4[3] == want4[3],          \
          isa + ": hsum4");                                                                           \
    VecF::fmadd(VecF::set1(3.0f), VecF::load(src), VecF::set1(0.5f)).store(out);                      \
    bool ok_fma = true;                                                                               \
    for (int64_t i = 0; i < N; ++i) ok_fma &= out[i] == 3.0f * src[i] + 0.5f;                         \
    check(ok_fma, isa + ": fmadd");                                                                   \
    /* NaN: the second operand wins, in both argument orders */                                       \
    VecF::min(VecF::set1(nan), VecF::set1(1.0f)).store(out);                                          \
    const bool min_a = out[0] == 1.0f;                                                                \
    VecF::min(VecF::set1(1.0f), VecF::set1(nan)).store(out);                                          \
    const bool min_b = std::isnan(out[0]);                                                            \
    VecF::max(VecF::set1(nan), VecF::set1(1.0f)).store(out);                                          \
    const bool max_a = out[0] == 1.0f;                                                                \
    VecF::max(VecF::set1(1.0f), VecF::set1(nan)).store(out);                                          \
    const bool max_b = std::isnan(out[0]);                                                            \
    check(min_a && min_b && max_a && max_b, isa + ": min/max return the second operand on NaN");      \
    std::printf("%s: N = %lld checked\n", isa.c_str(), static_cast<long long>(N));                    \
  }

namespace attnext {
namespace test_isa_scalar {
#include "cpu/simd_scalar.inl"
ATTNEXT_VECF_CHECKS
}  // namespace test_isa_scalar
#if ATTNEXT_X86_SIMD
ATTNEXT_ISA_BEGIN_AVX512
namespace test_isa_avx512 {
#include "cpu/simd_avx512.inl"
ATTNEXT_VECF_CHECKS
}  // namespace test_isa_avx512
ATTNEXT_ISA_END
ATTNEXT_ISA_BEGIN_AVX2
namespace test_isa_avx2 {
#include "cpu/simd_avx2.inl"
ATTNEXT_VECF_CHECKS
}  // namespace test_isa_avx2
ATTNEXT_ISA_END
#endif
#if ATTNEXT_ARM_NEON
namespace test_isa_neon {
#include "cpu/simd_neon.inl"
ATTNEXT_VECF_CHECKS
}  // namespace test_isa_neon
#endif
}  // namespace attnext

int main() {
  attnext::test_isa_scalar::run_checks("scalar");
#if ATTNEXT_X86_SIMD
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    attnext::test_isa_avx2::run_checks("avx2");
  } else {
    std::printf("avx2: not supported by this CPU, not tested\n");
  }
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq")) {
    attnext::test_isa_avx512::run_checks("avx512");
  } else {
    std::printf("avx512: not supported by this CPU, not tested\n");
  }
#endif
#if ATTNEXT_ARM_NEON
  attnext::test_isa_neon::run_checks("neon");
#endif
  return attnext_test::failures() == 0 ? 0 : 1;
}
