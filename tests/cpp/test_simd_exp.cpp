// The float exp of every instruction set (vec::exp_f32 and VecF::exp for AVX2,
// AVX-512 and NEON) against double-precision std::exp: within 2 ulp on the normal
// range, 0 below it, +inf above it, NaN for NaN, on a dense sweep of floats. The
// AVX-512 softmax exp (VecF::exp_softmax) within 3 ulp on every input the softmax
// gives it (x <= 0, -inf, NaN) and on finite x > 0. The flushing exps (exp_ftz and
// exp_softmax of every instruction set): the same, and exactly 0, never a
// subnormal, where exp is below FLT_MIN (x < vec::kExpNormalMin).
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "check.h"
#include "cpu/vec_math.h"

namespace attnext {
namespace test_isa_scalar {
#include "cpu/simd_scalar.inl"
}  // namespace test_isa_scalar
#if ATTNEXT_X86_SIMD
ATTNEXT_ISA_BEGIN_AVX512
namespace test_isa_avx512 {
#include "cpu/simd_avx512.inl"
void exp_n(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i + VecF::N <= n; i += VecF::N) VecF::exp(VecF::load(x + i)).store(y + i);
}
void exp_softmax_n(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i + VecF::N <= n; i += VecF::N) VecF::exp_softmax(VecF::load(x + i)).store(y + i);
}
void exp_ftz_n(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i + VecF::N <= n; i += VecF::N) VecF::exp_ftz(VecF::load(x + i)).store(y + i);
}
}  // namespace test_isa_avx512
ATTNEXT_ISA_END
ATTNEXT_ISA_BEGIN_AVX2
namespace test_isa_avx2 {
#include "cpu/simd_avx2.inl"
void exp_n(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i + VecF::N <= n; i += VecF::N) VecF::exp(VecF::load(x + i)).store(y + i);
}
void exp_ftz_n(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i + VecF::N <= n; i += VecF::N) VecF::exp_ftz(VecF::load(x + i)).store(y + i);
}
void exp_softmax_n(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i + VecF::N <= n; i += VecF::N) VecF::exp_softmax(VecF::load(x + i)).store(y + i);
}
}  // namespace test_isa_avx2
ATTNEXT_ISA_END
#endif
#if ATTNEXT_ARM_NEON
namespace test_isa_neon {
#include "cpu/simd_neon.inl"
void exp_n(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i + VecF::N <= n; i += VecF::N) VecF::exp(VecF::load(x + i)).store(y + i);
}
void exp_ftz_n(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i + VecF::N <= n; i += VecF::N) VecF::exp_ftz(VecF::load(x + i)).store(y + i);
}
void exp_softmax_n(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i + VecF::N <= n; i += VecF::N) VecF::exp_softmax(VecF::load(x + i)).store(y + i);
}
}  // namespace test_isa_neon
#endif
}  // namespace attnext

using attnext_test::check;

namespace {

float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Every 97th float of [-110, 95] (both signs' bit patterns walked), plus the
// edge values.
std::vector<float> sweep() {
  std::vector<float> xs = {0.0f, -0.0f, 1.0f, -1.0f, 88.0f, 88.72f, 88.73f, -87.33f, -87.34f, attnext::vec::kExpNormalMin,
                           std::nextafter(attnext::vec::kExpNormalMin, 0.0f),
                           std::nextafter(attnext::vec::kExpNormalMin, -1.0f), -103.9f, -104.1f,
                           std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
                           std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::denorm_min()};
  for (uint32_t u = 0; u < 0x42de0000u; u += 97) xs.push_back(from_bits(u));                // [0, 111)
  for (uint32_t u = 0x80000000u; u < 0xc2dc0000u; u += 97) xs.push_back(from_bits(u));      // (-110, -0]
  while (xs.size() % 16 != 0) xs.push_back(0.5f);
  return xs;
}

// Largest error in ulp of the float result over the normal range, and the
// number of inputs with a wrong special value.
void check_exp(const std::string& name, const std::vector<float>& x, const std::vector<float>& y,
               double max_ulp = 2.0, bool ftz = false) {
  double worst = 0;
  int64_t bad = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    if (ftz) {  // never a subnormal; exactly 0 below the threshold
      bad += std::fpclassify(y[i]) == FP_SUBNORMAL;
      bad += x[i] < attnext::vec::kExpNormalMin && y[i] != 0.0f;
    }
    const double ref = std::exp(static_cast<double>(x[i]));
    const float r = static_cast<float>(ref);
    if (std::isnan(x[i])) {
      bad += !std::isnan(y[i]);
    } else if (ref > std::numeric_limits<float>::max()) {
      bad += !(std::isinf(y[i]) && y[i] > 0);
    } else if (ref < std::numeric_limits<float>::min()) {
      // Below FLT_MIN: 0 or a subnormal is acceptable, nothing larger.
      bad += !(y[i] >= 0.0f && y[i] <= std::numeric_limits<float>::min());
    } else {
      const double ulp = std::nextafter(r, std::numeric_limits<float>::infinity()) - r;
      const double err = std::fabs(static_cast<double>(y[i]) - ref) / ulp;
      worst = err > worst || std::isnan(err) ? err : worst;
    }
  }
  std::printf("%s: %zu inputs, max error %.3f ulp, %lld wrong special values\n", name.c_str(), x.size(), worst,
              static_cast<long long>(bad));
  check(worst <= max_ulp, name + ": within " + std::to_string(max_ulp) + " ulp");
  check(bad == 0, name + ": special values");
}

}  // namespace

int main() {
  const std::vector<float> x = sweep();
  std::vector<float> y(x.size());
  for (size_t i = 0; i < x.size(); ++i) y[i] = attnext::vec::exp_f32(x[i]);
  check_exp("vec::exp_f32", x, y);
  for (size_t i = 0; i < x.size(); ++i) y[i] = attnext::test_isa_scalar::VecF::exp({x[i]}).v;
  check_exp("scalar VecF::exp", x, y);
  for (size_t i = 0; i < x.size(); ++i) y[i] = attnext::test_isa_scalar::VecF::exp_ftz({x[i]}).v;
  check_exp("scalar VecF::exp_ftz", x, y, 2.0, true);
  for (size_t i = 0; i < x.size(); ++i) y[i] = attnext::test_isa_scalar::VecF::exp_softmax({x[i]}).v;
  check_exp("scalar VecF::exp_softmax", x, y, 2.0, true);
#if ATTNEXT_X86_SIMD
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    attnext::test_isa_avx2::exp_n(x.data(), y.data(), static_cast<int64_t>(x.size()));
    check_exp("avx2 VecF::exp", x, y);
    attnext::test_isa_avx2::exp_ftz_n(x.data(), y.data(), static_cast<int64_t>(x.size()));
    check_exp("avx2 VecF::exp_ftz", x, y, 2.0, true);
    attnext::test_isa_avx2::exp_softmax_n(x.data(), y.data(), static_cast<int64_t>(x.size()));
    check_exp("avx2 VecF::exp_softmax", x, y, 2.0, true);
  } else {
    std::printf("avx2: not supported by this CPU, not tested\n");
  }
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq")) {
    attnext::test_isa_avx512::exp_n(x.data(), y.data(), static_cast<int64_t>(x.size()));
    check_exp("avx512 VecF::exp", x, y);
    attnext::test_isa_avx512::exp_ftz_n(x.data(), y.data(), static_cast<int64_t>(x.size()));
    check_exp("avx512 VecF::exp_ftz", x, y, 2.0, true);
    std::vector<float> xs;  // the sweep without +inf (exp_softmax's callers never pass it)
    for (float v : x) {
      if (!(std::isinf(v) && v > 0)) xs.push_back(v);
    }
    while (xs.size() % 16 != 0) xs.push_back(-0.5f);
    std::vector<float> ys(xs.size());
    attnext::test_isa_avx512::exp_softmax_n(xs.data(), ys.data(), static_cast<int64_t>(xs.size()));
    check_exp("avx512 VecF::exp_softmax", xs, ys, 3.0, true);
  } else {
    std::printf("avx512: not supported by this CPU, not tested\n");
  }
#endif
#if ATTNEXT_ARM_NEON
  attnext::test_isa_neon::exp_n(x.data(), y.data(), static_cast<int64_t>(x.size()));
  check_exp("neon VecF::exp", x, y);
  attnext::test_isa_neon::exp_ftz_n(x.data(), y.data(), static_cast<int64_t>(x.size()));
  check_exp("neon VecF::exp_ftz", x, y, 2.0, true);
  attnext::test_isa_neon::exp_softmax_n(x.data(), y.data(), static_cast<int64_t>(x.size()));
  check_exp("neon VecF::exp_softmax", x, y, 2.0, true);
#endif
  return attnext_test::failures() == 0 ? 0 : 1;
}
