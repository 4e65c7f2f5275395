// attnext's own float32 GEMM on AVX-512 (cpu/gemm_f32.cpp, kernel in cpu/gemm_f32.inl).
//
// Why: on the dev VM (AMD EPYC with full-width AVX-512) the kernel runs at about
// 260 GFLOP/s on one core, while the MKL that torch ships takes its generic AMD
// path there (about 205 GFLOP/s on two cores) and repacks its operands on every
// call, which dominates small tiles. Used by causal_attention's float tiles and by
// matmul's float32 GEMMs; ATTNEXT_F32_GEMM=0 (read once) turns both back to the BLAS.
#pragma once

#include <cstdint>

namespace attnext {

// C (M, N) = alpha * A B, or C += alpha * A B when accumulate; C row-major (ldc).
// A element (i, p) at a[i * sa_i + p * sa_p] (rows: sa_p = 1; A^T stored: sa_i = 1);
// B (K, N) row-major (ldb). No packing, no threads: for operands already in cache.
using F32Gemm = void (*)(int64_t M, int64_t N, int64_t K, const float* a, int64_t sa_i, int64_t sa_p, const float* b,
                         int64_t ldb, float* c, int64_t ldc, float alpha, bool accumulate);

// The kernel above where the CPU runs AVX-512 and ATTNEXT_F32_GEMM is not "0"; else nullptr.
F32Gemm f32_gemm_kernel();

// C (m, n) row-major (ldc) = A B (+ C when accumulate) for operands of any size:
// A (i, p) at a[i * sa_i + p * sa_p], B (p, j) at b[p * sb_p + j * sb_j] (either of
// sb_p, sb_j may be the unit one; a B whose rows are not unit-stride is transposed
// in blocks into a per-thread buffer). Blocked for the caches and split over row
// blocks with at::parallel_for (so it runs on one thread inside a parallel region).
// Requires f32_gemm_kernel() != nullptr.
void f32_gemm_blocked(int64_t m, int64_t n, int64_t k, const float* a, int64_t sa_i, int64_t sa_p, const float* b,
                      int64_t sb_p, int64_t sb_j, float* c, int64_t ldc, bool accumulate);

}  // namespace attnext
