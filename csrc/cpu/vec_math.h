// Portable SIMD building blocks for attnext's CPU kernels.
//
// The wheel must run on any x86-64 CPU, so nothing is compiled with -mavx2 or
// -mavx512f globally. Two mechanisms, both chosen at run time:
//  * hot loops with reductions and exp are written with explicit vector types
//    (cpu/simd_avx512.inl, cpu/simd_avx2.inl, cpu/simd_neon.inl,
//    cpu/simd_scalar.inl), stamped out once per instruction set (x86: inside
//    ATTNEXT_ISA_BEGIN/END regions; AArch64: NEON is baseline, so in plain
//    #if ATTNEXT_ARM_NEON blocks) and picked by attnext::simd::detected_isa()
//    (which honours ATTNEXT_CPU_ISA and torch's ATEN_CPU_CAPABILITY);
//  * simple element-wise loops (dtype conversion) are plain C++ marked
//    ATTNEXT_MULTIVERSION: GCC emits AVX-512, AVX2 and baseline clones and the
//    loader picks one (an ifunc).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

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
#define ATTNEXT_ISA_BEGIN_AVX512BF16 \
  _Pragma("clang attribute push(__attribute__((target(\"avx512f,avx512bw,avx512vl,avx512bf16\"))), apply_to = function)")
#define ATTNEXT_ISA_END _Pragma("clang attribute pop")
#else
#define ATTNEXT_ISA_BEGIN_AVX512 \
  _Pragma("GCC push_options") _Pragma("GCC target(\"avx512f,avx512dq,avx512bw,avx512vl,avx2,fma\")")
#define ATTNEXT_ISA_BEGIN_AVX2 _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma\")")
#define ATTNEXT_ISA_BEGIN_AVX512BF16 \
  _Pragma("GCC push_options") _Pragma("GCC target(\"avx512f,avx512bw,avx512vl,avx512bf16\")")
#define ATTNEXT_ISA_END _Pragma("GCC pop_options")
#endif
#else
#define ATTNEXT_X86_SIMD 0
#endif

// AArch64: Advanced SIMD (NEON) is part of the baseline, no target pragma needed.
#if defined(__aarch64__) && defined(__ARM_NEON)
#define ATTNEXT_ARM_NEON 1
#include <arm_neon.h>
#else
#define ATTNEXT_ARM_NEON 0
#endif

// AArch64's BF16 extension (FEAT_BF16: BFDOT, BFCVTN; Neoverse V1/V2/N2, Graviton3
// and 4, Grace, Apple M2 and later) is not baseline: its kernels sit in an
// ATTNEXT_ISA_BEGIN_ARM_BF16 / ATTNEXT_ISA_END region and run only where the CPU
// reports it (simd::bf16_dot_available). GCC (11 and later) declares the BF16
// intrinsics for such a target region: armv8.2-a+bf16 for the baseline build, +bf16
// on top of an Armv9 one (the arch= form would lower it, and warn). clang's
// arm_neon.h (14, at least) declares them only when the whole file is compiled for
// BF16 (-march=...+bf16), so with clang the kernels exist only then; a build that
// targets BF16 throughout needs no region with either compiler.
#if ATTNEXT_ARM_NEON && defined(__ARM_FEATURE_BF16_VECTOR_ARITHMETIC)
#define ATTNEXT_ARM_BF16 1
#define ATTNEXT_ISA_BEGIN_ARM_BF16
#define ATTNEXT_ISA_END
#elif ATTNEXT_ARM_NEON && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define ATTNEXT_ARM_BF16 1
#if __ARM_ARCH >= 9
#define ATTNEXT_ISA_BEGIN_ARM_BF16 _Pragma("GCC push_options") _Pragma("GCC target(\"+bf16\")")
#else
#define ATTNEXT_ISA_BEGIN_ARM_BF16 _Pragma("GCC push_options") _Pragma("GCC target(\"arch=armv8.2-a+bf16\")")
#endif
#define ATTNEXT_ISA_END _Pragma("GCC pop_options")
#else
#define ATTNEXT_ARM_BF16 0
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

// exp(x) in float, within 2 ulp (tests/cpp/test_simd_exp.cpp checks every
// ISA against double): x = n*ln2 + r with |r| <= ln2/2 (Cody-Waite, two-part
// ln2), exp(r) by a degree-6 polynomial (relative minimax on that interval,
// error 1.9e-9 before rounding) in Horner form, times 2^n applied as two
// exponent-bit factors so that results near FLT_MAX and subnormal results round
// once. The vector versions in simd_*.inl use the same constants.
// exp(-inf) = 0, exp(NaN) = NaN, exp(x > 88.72...) = +inf.
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f;  // ln2 = kLn2Hi + kLn2Lo, kLn2Hi exact in 9 bits
constexpr float kLn2Lo = -2.12194440e-4f;
// The softmax's exp (VecF::exp_softmax, AVX-512): a degree-5 polynomial on the
// same reduced interval, a relative minimax fit with c0 = c1 = 1; within 3 ulp
// (tests/cpp/test_simd_exp.cpp). Three operations fewer than the degree-6 exp
// with its clamp above; the softmax tiles spend most of their time in it.
constexpr float kExp5C5 = 0x1.106284p-7f;
constexpr float kExp5C4 = 0x1.5729f0p-5f;
constexpr float kExp5C3 = 0x1.5557aep-3f;
constexpr float kExp5C2 = 0x1.fffdfcp-2f;
// exp(x) of float x below this is subnormal (ln 2^-126 = -87.33654...; exp of this
// float is 2^-126 to 5e-6 relative). The softmax's exps (exp_softmax, exp_ftz)
// return 0 there: a weight under 2^-126 of its row's largest is below float's
// resolution of the row's sum, and arithmetic on subnormals takes a microcode
// assist per operation on x86 (a sharp softmax, scores tens apart, made the
// attention forward 3-4x slower on the Intel Xeon before).
constexpr float kExpNormalMin = -87.33654f;
constexpr float kExpC6 = 0x1.6ab98p-10f;
constexpr float kExpC5 = 0x1.126d0cp-7f;
constexpr float kExpC4 = 0x1.55589ap-5f;
constexpr float kExpC3 = 0x1.55540ap-3f;
constexpr float kExpC2 = 0x1.fffffap-2f;

ATTNEXT_INLINE float exp_f32(float x) {
  float xc = x > 89.0f ? 89.0f : x;  // NaN compares false and stays NaN
  xc = xc < -104.0f ? -104.0f : xc;   // exp(-104) rounds to 0
  float n = xc * kLog2e;
  n = (n + 12582912.0f) - 12582912.0f;  // round to nearest integer (1.5 * 2^23 trick)
  n = n == n ? n : 0.0f;                // keep the int conversion defined for NaN input
  // Plain multiply-adds (fused where the target has FMA): a std::fma call would
  // be emulated in software on CPUs without it.
  float r = xc - n * kLn2Hi;
  r = r - n * kLn2Lo;
  float p = kExpC6 * r + kExpC5;
  p = p * r + kExpC4;
  p = p * r + kExpC3;
  p = p * r + kExpC2;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t ni = static_cast<int32_t>(n);  // in [-150, 129]
  const int32_t n1 = ni / 2;
  const float s1 = bits_to_float(static_cast<uint32_t>(n1 + 127) << 23);
  const float s2 = bits_to_float(static_cast<uint32_t>(ni - n1 + 127) << 23);
  return p * s1 * s2;  // NaN x: p is NaN
}

// exp_f32, 0 where it would be subnormal (x < kExpNormalMin); NaN stays NaN.
ATTNEXT_INLINE float exp_ftz_f32(float x) { return x < kExpNormalMin ? 0.0f : exp_f32(x); }

ATTNEXT_INLINE float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

// Round to nearest even, NaN kept a (quiet) NaN: the rounding torch uses.
ATTNEXT_INLINE uint16_t float_to_bf16(float f) {
  const uint32_t u = float_to_bits(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return f != f ? static_cast<uint16_t>(0x7fc0u) : static_cast<uint16_t>(rounded);
}

}  // namespace vec

namespace simd {

enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kNeon = 3 };

// The widest instruction set this CPU has (x86-64: AVX-512, AVX2+FMA; AArch64:
// NEON), capped by ATTNEXT_CPU_ISA (scalar, avx2, avx512, neon) and by torch's
// ATEN_CPU_CAPABILITY (default or avx2 select the narrower kernels, as they do
// for ATen's own). Decided once per process.
Isa detected_isa();
const char* isa_name(Isa isa);

// The SIMD features this CPU reports that matter to attnext's kernels, whether
// or not a kernel uses them yet: x86-64 avx2, fma, avx512f, avx512bf16, amx_bf16;
// AArch64 neon (always), asimddp, sve, sve2, bf16, i8mm (getauxval(AT_HWCAP/2)).
std::vector<std::string> cpu_features();

// Whether the bfloat16 dot-product instructions may be used: on x86-64
// AVX512-BF16 (vdpbf16ps) with the AVX-512 kernels selected, on AArch64 the BF16
// extension (BFDOT; HWCAP2_BF16) with the NEON kernels selected (detected_isa) in a
// build that has its kernels (ATTNEXT_ARM_BF16); and ATTNEXT_BF16_DOT is not 0.
// Decided once per process.
bool bf16_dot_available();

// Orders this thread's earlier non-temporal (streaming) stores before its later
// stores, so another thread that sees the later ones (a parallel_for join) sees
// the streamed data too.
inline void stream_fence() {
#if ATTNEXT_X86_SIMD
  _mm_sfence();
#endif
}

// Outputs at least this large are written with streaming stores by the kernels
// that support them: far larger than a last-level cache, their lines would only
// be read for ownership and evicted again. ATTNEXT_STREAM_BYTES overrides it
// (read once; 0 streams always).
int64_t stream_threshold_bytes();

}  // namespace simd
}  // namespace attnext
