// The bfloat16 pair-product kernels of the attention tiles (cpu/gemm_bf16.inl on
// AVX512-BF16, cpu/gemm_bf16_neon.inl on AArch64's BF16 extension), on the CPU that
// runs the test where it has the instructions: the pair transposes and roundings
// exactly against their definitions (bodies, tails, padding), and gemm_bf16 (every
// row and column tail, both A layouts, alpha, accumulate) against double within the
// rounding bound of the instruction: vdpbf16ps rounds twice per step to nearest,
// BFDOT (without FEAT_EBF16) twice to odd, under one float ulp each.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "check_basic.h"
#include "cpu/vec_math.h"

#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#endif

namespace attnext {
#if ATTNEXT_X86_SIMD
ATTNEXT_ISA_BEGIN_AVX512BF16
namespace test_bf16 {
#include "cpu/gemm_bf16.inl"
}  // namespace test_bf16
ATTNEXT_ISA_END
#define HAVE_KERNELS 1
#elif ATTNEXT_ARM_BF16
ATTNEXT_ISA_BEGIN_ARM_BF16
namespace test_bf16 {
#include "cpu/gemm_bf16_neon.inl"
}  // namespace test_bf16
ATTNEXT_ISA_END
#define HAVE_KERNELS 1
#else
#define HAVE_KERNELS 0
#endif
}  // namespace attnext

#if HAVE_KERNELS
namespace {

using attnext_test::check;
using attnext::vec::bf16_to_float;
using attnext::vec::float_to_bf16;

// What the running CPU has: the instructions the kernels of this build use.
const char* kernels_runnable() {
#if ATTNEXT_X86_SIMD
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16")) {
    return "avx512bf16";
  }
#elif ATTNEXT_ARM_BF16 && defined(__linux__)
  if (getauxval(AT_HWCAP2) & (1ul << 14)) return "arm bf16";  // HWCAP2_BF16
#endif
  return nullptr;
}

uint32_t lcg_state = 12345;
// A float in +-[0.5, 2), exact in bfloat16: no product or sum of a few thousand of
// them is subnormal (which both instructions flush) or overflows.
float random_bf16_value() {
  lcg_state = lcg_state * 1664525u + 1013904223u;
  const float mag = 0.5f + 1.5f * static_cast<float>(lcg_state >> 8) / 16777216.0f;
  const float v = (lcg_state & 1) ? -mag : mag;
  return bf16_to_float(float_to_bf16(v));
}

std::vector<uint16_t> random_bf16(int64_t n) {
  std::vector<uint16_t> x(n);
  for (auto& e : x) e = float_to_bf16(random_bf16_value());
  return x;
}

uint32_t pair(uint16_t even, uint16_t odd) { return uint32_t(even) | uint32_t(odd) << 16; }
int64_t round16(int64_t n) { return (n + 15) / 16 * 16; }

namespace k = attnext::test_bf16;

void check_bf16_vnni() {
  bool ok = true;
  for (int64_t R : {1, 2, 5, 8, 17}) {
    for (int64_t C : {1, 3, 8, 13, 16, 20}) {
      const int64_t lds = C + 3, ldo = round16(C);
      const std::vector<uint16_t> src = random_bf16(R * lds);
      std::vector<uint32_t> out((R + 1) / 2 * ldo, 0xdeadbeefu);
      k::bf16_vnni(src.data(), lds, R, C, out.data(), ldo);
      for (int64_t p = 0; 2 * p < R; ++p) {
        for (int64_t c = 0; c < ldo; ++c) {
          // columns past C are not read (the last row's may lie past the buffer)
          const uint16_t odd = c < C && 2 * p + 1 < R ? src[(2 * p + 1) * lds + c] : 0;
          const uint32_t want = c < C ? pair(src[2 * p * lds + c], odd) : 0u;
          ok &= out[p * ldo + c] == want;
        }
      }
    }
  }
  check(ok, "bf16_vnni: pairs of rows, a missing odd row and the columns past C zero");
}

void check_bf16_t32() {
  bool ok = true;
  for (int64_t R : {1, 3, 4, 5, 16, 19, 33}) {
    for (int64_t C : {2, 4, 6, 8, 10, 16}) {
      // odd row strides: the 32-bit words sit at 2-byte alignment
      const int64_t lds = C + 3, ldo = round16(R) + 4;
      const std::vector<uint16_t> src = random_bf16(R * lds);
      std::vector<uint32_t> out(C / 2 * ldo, 0xdeadbeefu);
      k::bf16_t32(src.data(), lds, R, C, out.data(), ldo);
      for (int64_t p = 0; p < C / 2; ++p) {
        for (int64_t r = 0; r < ldo; ++r) {
          const uint32_t got = out[p * ldo + r];
          if (r < R) {
            ok &= got == pair(src[r * lds + 2 * p], src[r * lds + 2 * p + 1]);
          } else if (r < round16(R)) {
            ok &= got == 0u;
          } else {
            ok &= got == 0xdeadbeefu;  // past the rows rounded up to 16: untouched
          }
        }
      }
    }
  }
  check(ok, "bf16_t32: word transpose, rows up to a multiple of 16 zero, nothing past them written");
}

// n floats: exact ties (half a bfloat16 ulp above a bfloat16 value, odd or even),
// values just above and below ties, others, and a NaN.
std::vector<float> rounding_inputs(int64_t n) {
  static const uint32_t low_bits[] = {0x8000u, 0x8001u, 0x7fffu, 0x1234u, 0xc000u, 0x0u};
  std::vector<float> x(n);
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t high = static_cast<uint32_t>(float_to_bf16(random_bf16_value())) << 16;
    x[i] = attnext::vec::bits_to_float(high | low_bits[i % 6]);
  }
  if (n > 5) x[5] = std::nanf("");
  return x;
}

bool same_bf16(uint16_t got, float x) {
  if (std::isnan(x)) return std::isnan(bf16_to_float(got));
  return got == float_to_bf16(x);
}

void check_roundings() {
  bool ok_rows = true, ok_pairs = true;
  for (int64_t C : {1, 5, 8, 9, 17}) {
    for (int64_t R : {1, 2, 5, 7}) {
      const int64_t ldx = C + 2;
      const std::vector<float> x = rounding_inputs(R * ldx);
      // rows: C values, then a 0 when C is odd, then nothing touched
      const int64_t ldo = C + C % 2 + 2;
      std::vector<uint16_t> rows(R * ldo, 0xbeef);
      k::float_rows_to_bf16(x.data(), ldx, R, C, rows.data(), ldo);
      for (int64_t r = 0; r < R; ++r) {
        for (int64_t c = 0; c < ldo; ++c) {
          const uint16_t got = rows[r * ldo + c];
          ok_rows &= c < C ? same_bf16(got, x[r * ldx + c]) : c < C + C % 2 ? got == 0 : got == 0xbeef;
        }
      }
      // pairs of rows, transposed: word (p, c) = (x[2p][c], x[2p + 1][c])
      const int64_t ldp = C + 3;
      std::vector<uint32_t> pairs((R + 1) / 2 * ldp, 0xdeadbeefu);
      k::float_pairs_t(x.data(), ldx, R, C, pairs.data(), ldp);
      for (int64_t p = 0; 2 * p < R; ++p) {
        for (int64_t c = 0; c < ldp; ++c) {
          const uint32_t got = pairs[p * ldp + c];
          if (c >= C) {
            ok_pairs &= got == 0xdeadbeefu;
            continue;
          }
          ok_pairs &= same_bf16(static_cast<uint16_t>(got & 0xffff), x[2 * p * ldx + c]);
          ok_pairs &= 2 * p + 1 < R ? same_bf16(static_cast<uint16_t>(got >> 16), x[(2 * p + 1) * ldx + c])
                                    : (got >> 16) == 0;
        }
      }
    }
  }
  check(ok_rows, "float_rows_to_bf16: rounded to nearest even, odd column padded, nothing else written");
  check(ok_pairs, "float_pairs_t: rounded pairs of rows, a missing odd row zero, nothing past C written");
}

void check_gemm() {
  bool ok = true;
  double worst = 0;  // largest error as a fraction of the bound
  for (int64_t P : {1, 3, 16, 40}) {
    for (int64_t M : {1, 2, 3, 4, 5, 7, 9}) {
      for (int64_t N : {1, 3, 4, 5, 13, 16, 17, 33, 50}) {
        for (bool a_rows : {true, false}) {
          for (bool accumulate : {false, true}) {
            // A: (M, P) words as rows (sa_i = lda, sa_p = 1) or transposed (sa_i = 1, sa_p = lda)
            const int64_t lda = (a_rows ? P : M) + 1;
            const std::vector<uint16_t> a16 = random_bf16(2 * (a_rows ? M : P) * lda);
            const uint32_t* a = reinterpret_cast<const uint32_t*>(a16.data());
            const int64_t sa_i = a_rows ? lda : 1, sa_p = a_rows ? 1 : lda;
            // B: (P, N) words, ldb = N rounded up to 16 (+16), the words past N zero
            const int64_t ldb = round16(N) + 16;
            std::vector<uint16_t> b16 = random_bf16(2 * P * ldb);
            for (int64_t p = 0; p < P; ++p)
              for (int64_t j = N; j < ldb; ++j) b16[2 * (p * ldb + j)] = b16[2 * (p * ldb + j) + 1] = 0;
            const uint32_t* b = reinterpret_cast<const uint32_t*>(b16.data());
            const int64_t ldc = N + 3;
            std::vector<float> c(M * ldc);
            for (auto& e : c) e = random_bf16_value();
            const std::vector<float> c0 = c;
            const float alpha = 0.37f;
            k::gemm_bf16(M, N, P, a, sa_i, sa_p, b, ldb, c.data(), ldc, alpha, accumulate);
            for (int64_t i = 0; i < M; ++i) {
              for (int64_t j = 0; j < ldc; ++j) {
                const float got = c[i * ldc + j];
                if (j >= N) {
                  ok &= got == c0[i * ldc + j];  // past N: untouched
                  continue;
                }
                double exact = 0, mag = 0;
                for (int64_t p = 0; p < P; ++p) {
                  const uint32_t wa = a[i * sa_i + p * sa_p], wb = b[p * ldb + j];
                  for (int sh : {0, 16}) {
                    const double prod = double(bf16_to_float(static_cast<uint16_t>(wa >> sh))) *
                                        double(bf16_to_float(static_cast<uint16_t>(wb >> sh)));
                    exact += prod;
                    mag += std::fabs(prod);
                  }
                }
                const double base = accumulate ? double(c0[i * ldc + j]) : 0.0;
                const double want = double(alpha) * exact + base;
                // 2 roundings per pair step of at most one ulp (2^-23 relative) of a
                // partial sum bounded by mag, then alpha's product and the add
                const double bound = (2.0 * P + 2.0) * 0x1p-23 * (double(alpha) * mag + std::fabs(base));
                const double err = std::fabs(double(got) - want);
                worst = std::max(worst, err / bound);
                ok &= err <= bound;
              }
            }
          }
        }
      }
    }
  }
  char buf[160];
  std::snprintf(buf, sizeof buf, "gemm_bf16: within the dot-product rounding bound of double (worst %.3f of it)",
                worst);
  check(ok, buf);
  std::printf("%s\n", buf);
}

}  // namespace
#endif

int main() {
#if HAVE_KERNELS
  const char* isa = kernels_runnable();
  if (isa == nullptr) {
    std::printf("bfloat16 dot-product kernels: this CPU lacks their instructions, not tested\n");
    return attnext_test::finish("test_gemm_bf16");
  }
  std::printf("bfloat16 dot-product kernels on %s\n", isa);
  check_bf16_vnni();
  check_bf16_t32();
  check_roundings();
  check_gemm();
#else
  std::printf("bfloat16 dot-product kernels: none in this build\n");
#endif
  return attnext_test::finish("test_gemm_bf16");
}
