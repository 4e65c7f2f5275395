// Portable SIMD building blocks for attnext's CPU kernels.
//
// The wheel must run on any x86-64 CPU, so nothing is compiled with -mavx2 or
// -mavx512f globally. Two mechanisms, both chosen at run time:
//  * hot loops with reductions and exp are written with explicit vector types
//    (cpu/simd_avx512.inl, cpu/simd_avx2.inl, cpu/simd_scalar.inl), stamped out
//    once per instruction set inside ATTNEXT_ISA_BEGIN/END regions and picked by
//    attnext::simd::detected_isa() (which honours torch's ATEN_CPU_CAPABILITY);
//  * simple element-wise loops (dtype conversion) are plain C++ marked
//    ATTNEXT_MULTIVERSION: GCC emits AVX-512, AVX2 and baseline clones and the
//    loader picks one (an ifunc).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(ATTNEXT_NO_MULTIVERSION)
#define ATTNEXT_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define ATTNEXT_MULTIVERSION
#endif

#define ATTNEXT_INLINE inline __attribute__((always_inline))

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(ATTNEXT_NO_MULTIVERSION)
#define ATTNEXT_X86_SIMD 1
#include <immintrin.h>
#if defined(__clang__)
#define ATTNEXT_ISA_BEGIN_AVX512 \
  _Pragma("clang attribute push(__attribute__((target(\"avx512f,avx512dq,avx512bw,avx512vl,avx2,fma\"))), apply_to = function)")
#define ATTNEXT_ISA_BEGIN_AVX2 _Pragma("clang attribute push(__attribute__((target(\"avx2,fma\"))), apply_to = function)")
#define ATTNEXT_ISA_END _Pragma("clang attribute pop")
#else
#define ATTNEXT_ISA_BEGIN_AVX512 \
  _Pragma("GCC push_options") _Pragma("GCC target(\"avx512f,avx512dq,avx512bw,avx512vl,avx2,fma\")")
#define ATTNEXT_ISA_BEGIN_AVX2 _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma\")")
#define ATTNEXT_ISA_END _Pragma("GCC pop_options")
#endif
#else
#define ATTNEXT_X86_SIMD 0
#endif

namespace attnext {
namespace vec {

ATTNEXT_INLINE float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

ATTNEXT_INLINE uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// exp(x) in float, about 1 ulp on the normal range, branch-free so that it
// vectorises. x = n*ln2 + r with |r| <= ln2/2, exp(r) by a degree-6 minimax
// polynomial, 2^n built in the exponent bits. exp(-inf) = 0, exp(NaN) = NaN,
// results below FLT_MIN flush to 0 and above FLT_MAX are +inf.
ATTNEXT_INLINE float exp_f32(float x) {
  constexpr float kHi = 88.0f;            // 2^127 > exp(88): the exponent trick cannot overflow
  constexpr float kLo = -87.33654475f;    // exp(kLo) = FLT_MIN
  constexpr float kOverflow = 88.72283935f;
  float xc = x > kHi ? kHi : x;           // NaN compares false and stays NaN
  xc = xc < kLo ? kLo : xc;
  float n = xc * 1.44269504088896341f;
  n = (n + 12582912.0f) - 12582912.0f;    // round to nearest integer (1.5 * 2^23 trick)
  n = n == n ? n : 0.0f;                  // keep the int conversion defined for NaN input
  float r = xc - n * 0.693359375f;        // Cody-Waite: ln2 = 0.693359375 - 2.12194440e-4
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const int32_t ni = static_cast<int32_t>(n);
  const float pow2n = bits_to_float(static_cast<uint32_t>(ni + 127) << 23);
  float y = p * pow2n;
  y = x < kLo ? 0.0f : y;
  y = x > kOverflow ? std::numeric_limits<float>::infinity() : y;
  return y;
}

ATTNEXT_INLINE float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

// Round to nearest even, NaN kept a (quiet) NaN: the rounding torch uses.
ATTNEXT_INLINE uint16_t float_to_bf16(float f) {
  const uint32_t u = float_to_bits(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return f != f ? static_cast<uint16_t>(0x7fc0u) : static_cast<uint16_t>(rounded);
}

}  // namespace vec

namespace simd {

enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

// The widest instruction set both this CPU and torch's ATEN_CPU_CAPABILITY
// setting allow (so ATEN_CPU_CAPABILITY=default or =avx2 selects the narrower
// kernels, as it does for ATen's own). Decided once per process.
Isa detected_isa();
const char* isa_name(Isa isa);

}  // namespace simd
}  // namespace attnext
