// attnext's own float32 GEMM on AVX-512 (cpu/gemm_f32.cpp, kernel in cpu/gemm_f32.inl).
//
// Why: on an AMD EPYC with full-width AVX-512 the kernel runs at about 260 GFLOP/s
// on one core, while the MKL that torch ships takes its generic AMD path there and
// repacks its operands on every call, which dominates small tiles. On Intel CPUs
// MKL uses AVX-512 itself and can be the faster one. So whether a workload runs
// the own kernel or the BLAS is measured on the running CPU (f32_gemm_choice), per
// workload class, once per process: causal_attention's forward tiles, its backward
// tiles and matmul's float32 GEMMs. ATTNEXT_F32_GEMM=0 forces the BLAS, =1 the own kernel (read once).
#pragma once

#include <cstdint>
#include <functional>
#include <string>

namespace attnext {

// C (M, N) = alpha * A B, or C += alpha * A B when accumulate; C row-major (ldc).
// A element (i, p) at a[i * sa_i + p * sa_p] (rows: sa_p = 1; A^T stored: sa_i = 1);
// B (K, N) row-major (ldb). No packing, no threads: for operands already in cache.
using F32Gemm = void (*)(int64_t M, int64_t N, int64_t K, const float* a, int64_t sa_i, int64_t sa_p, const float* b,
                         int64_t ldb, float* c, int64_t ldc, float alpha, bool accumulate);

// The kernel above where the CPU runs AVX-512 and ATTNEXT_F32_GEMM is not "0"; else nullptr.
F32Gemm f32_gemm_kernel();

// dst (C, R) row-major (ldd) = src (R, C)^T, src rows at stride lds (no overlap).
using F32Transpose = void (*)(const float* src, int64_t lds, int64_t R, int64_t C, float* dst, int64_t ldd);

// An AVX-512 transposition (16 x 16 blocks in registers) where the CPU runs AVX-512,
// whatever ATTNEXT_F32_GEMM says; else nullptr.
F32Transpose f32_transpose_kernel();

// The float32 workloads whose GEMM is chosen by measurement.
enum class GemmUse {
  // causal_attention's forward tile products (Q K^T: 64 x 256 x hs, P V: 64 x hs x 256)
  // and its backward's five products per (256-row block, 64-key tile), one thread each,
  // per head-size class: hs <= 64, hs <= 128, larger (attention_gemm_use)
  kAttentionForward64,
  kAttentionForward128,
  kAttentionForwardLarge,
  kAttentionBackward64,
  kAttentionBackward128,
  kAttentionBackwardLarge,
  // the forward of a chunk of few queries against many keys (4 T <= S, fewer than 8
  // query tiles: chunked prefill), where transposing all of K is not paid back
  kAttentionPrefill64,
  kAttentionPrefill128,
  kAttentionPrefillLarge,
  kMatmul,          // matmul's GEMMs (transformer projections), threaded
  kCount
};

// The attention workload of a pass (forward or backward) at head size hs; prefill:
// a forward with 4 T <= S and fewer than 8 query tiles.
GemmUse attention_gemm_use(bool backward, int64_t hs, bool prefill = false);

// A real float32 causal attention forward (causal_attention.cpp) on the forward's
// probe workload at head size hs, with its tile products on the own kernel (own) or
// the BLAS: what the forward's choice times. Training (prefill false): 8 heads of 256
// queries and keys; prefill: 4 heads of 128 queries against 1024 keys, bottom-right.
// The inputs are made once, by this call; the function runs one forward.
std::function<void()> attention_forward_probe(int64_t hs, bool own, bool prefill);

// Which GEMM a workload runs and why (for attnext.explain).
struct GemmChoice {
  bool own = false;       // the own kernel (true) or the BLAS
  std::string why;        // "measured: own 12.3 us, BLAS 15.1 us" or the override
};

// Decided on first use, per workload, by timing both on a representative problem
// (about 1-4 ms, interleaved, best of several rounds); cached for the process.
// Without AVX-512 or without a BLAS there is nothing to choose.
const GemmChoice& f32_gemm_choice(GemmUse use);

// The kernel for a workload: f32_gemm_kernel() where its measured choice is the own
// kernel, else nullptr (the BLAS).
F32Gemm f32_gemm_for(GemmUse use);

// C (m, n) row-major (ldc) = A B (+ C when accumulate) for operands of any size:
// A (i, p) at a[i * sa_i + p * sa_p], B (p, j) at b[p * sb_p + j * sb_j] (either of
// sb_p, sb_j may be the unit one; a B whose rows are not unit-stride is transposed
// in blocks into a per-thread buffer). Blocked for the caches and split over row
// blocks with at::parallel_for (so it runs on one thread inside a parallel region).
// Requires f32_gemm_kernel() != nullptr.
void f32_gemm_blocked(int64_t m, int64_t n, int64_t k, const float* a, int64_t sa_i, int64_t sa_p, const float* b,
                      int64_t sb_p, int64_t sb_j, float* c, int64_t ldc, bool accumulate);

}  // namespace attnext
