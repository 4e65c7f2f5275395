// Fused causal attention on the CPU, forward and backward (flash-style).
//
// out = dropout(softmax(scale * q k^T, causal)) v for q: (..., T, hs),
// k: (..., S, hs), v: (..., S, hs_v); the (T, S) weight matrix never exists.
//
// Forward with at most 16 query rows and no dropout (decoding with a KV cache):
// causal_attention_decode.cpp. Otherwise one work item per (batch, query tile of kBq = 64 rows), or per
// batch for short rows (see fwd_impl). The item
// walks key tiles of kBkF = 256 columns left to right up to the causal
// boundary of its last row (the last tile is cut there; nothing above the
// diagonal of the query tile is touched), with an online
// softmax: S = scale q k^T (into a per-thread tile), running max m
// and sum l per row, the output accumulator rescaled by exp(m_old - m_new),
// then O += P v. At the end O /= l and lse = m + log(l) is kept for the
// backward.
//
// Scheduling: work items are handed out one at a time from a shared counter
// to torch's intra-op threads (dynamic scheduling), batch by batch and within a
// batch the longest query tiles first (the tiles near the bottom of the matrix
// see the most keys), so the short tiles fill the end. Causal tiles have
// unequal work, and on a shared machine one thread may lose its core for a
// while: with static chunks everyone would wait for it.
//
// Tile products (float): attnext's AVX-512 kernel (cpu/gemm_f32.inl), which
// reads the operands where they lie; the one operand it needs transposed, K^T
// (and V^T in the backward), is transposed once per batch (forward) or key tile
// (backward) and reused. Without AVX-512, or with ATTNEXT_F32_GEMM=0, and for
// double: the BLAS (which packs its operands on every call).
//
// Backward: D = rowsum(dO * O) first; then one work item per (batch, chunk of
// key tiles of kBk = 64). For each of its key tiles the item walks the query tiles that
// can see it, recomputes P = exp(S - lse), and accumulates
//   dV += P^T dO, dP = dO v^T, dS = scale P (dP - D),
//   dQ += dS k, dK += dS^T q
// (with dropout, P^T dO uses the dropped P and dP is multiplied by the same
// mask). dK/dV of a key tile belong to one item, so they are written without
// races. dQ rows are shared by the key tiles of a batch: with one chunk per
// batch (enough batches to keep every thread busy) they go straight into the
// output; otherwise each chunk owns a copy and the copies are summed after.
//
// Dropout keeps weight (b, t, j) iff a counter-based hash of (seed, offset, b,
// t, j) is >= p * 2^32, so the backward regenerates the forward's mask exactly
// and any tiling or thread count gives the same result; attnext/reference.py
// computes the same hash with torch integer ops.
//
// Types: float and double natively (float accumulation, double for double);
// bfloat16 tiles are widened into per-thread float buffers as they are read
// (no whole-tensor copies) and results rounded once.
// Memory: O(B * T * hs) plus per-thread tiles (and a K^T of at most 4 MiB per
// thread), never O(T * S). Outputs are written through their row strides, so the
// packed op (qkv (..., T, 3, nh, hs)) writes out and dqkv in its own layouts.
// Limits: BLAS takes 32-bit leading dimensions (the LP64 interface torch's
// MKL uses): inputs with larger row strides are copied. hs and hs_v must fit
// an int. At most 16 batch dims (RowIndexer).
// Inputs are read through their strides (nanoGPT's q.transpose(1, 2) views)
// when their rows are unit-stride; otherwise a contiguous copy is made.
#include <ATen/ATen.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <functional>
#include <string>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common.h"
#include "cpu/blas.h"
#include "cpu/attention_rows.h"
#include "cpu/causal_attention_decode.h"
#include "cpu/gemm_f32.h"
#include "cpu/kernel_choice.h"
#include "cpu/parallel.h"
#include "dropout_hash.h"
#include "cpu/vec_math.h"
#include "ops.h"

namespace attnext {

namespace {

// ---- float tile kernels, one copy per instruction set (cpu/causal_attention_tiles.inl)
#if ATTNEXT_X86_SIMD
ATTNEXT_ISA_BEGIN_AVX512
namespace isa_avx512 {
#include "cpu/simd_avx512.inl"
#include "cpu/causal_attention_tiles.inl"
}  // namespace isa_avx512
ATTNEXT_ISA_END
ATTNEXT_ISA_BEGIN_AVX2
namespace isa_avx2 {
#include "cpu/simd_avx2.inl"
#include "cpu/causal_attention_tiles.inl"
}  // namespace isa_avx2
ATTNEXT_ISA_END
#endif
#if ATTNEXT_ARM_NEON
namespace isa_neon {
#include "cpu/simd_neon.inl"
#include "cpu/causal_attention_tiles.inl"
}  // namespace isa_neon
#endif
namespace isa_scalar {
#include "cpu/simd_scalar.inl"
#include "cpu/causal_attention_tiles.inl"
}  // namespace isa_scalar

// ---- bfloat16 products on AVX512-BF16 (cpu/gemm_bf16.inl) or on AArch64's BF16
// extension (cpu/gemm_bf16_neon.inl): the same functions and layouts
#if ATTNEXT_X86_SIMD
ATTNEXT_ISA_BEGIN_AVX512BF16
namespace isa_bf16 {
#include "cpu/gemm_bf16.inl"
}  // namespace isa_bf16
ATTNEXT_ISA_END
#define ATTNEXT_BF16_TILES 1
#elif ATTNEXT_ARM_BF16
ATTNEXT_ISA_BEGIN_ARM_BF16
namespace isa_bf16 {
#include "cpu/gemm_bf16_neon.inl"
}  // namespace isa_bf16
ATTNEXT_ISA_END
#define ATTNEXT_BF16_TILES 1
#else
#define ATTNEXT_BF16_TILES 0
#endif
// AMX (ATen's brgemm on x86-64 CPUs that have it) for the bfloat16 tiles.
#if ATTNEXT_X86_SIMD && defined(CPUBLAS_BRGEMM_BF16BF16F32)
#define ATTNEXT_AMX_BRGEMM 1
#else
#define ATTNEXT_AMX_BRGEMM 0
#endif
#if ATTNEXT_X86_SIMD
ATTNEXT_ISA_BEGIN_AVX512BF16
namespace isa_amx {
#include "cpu/simd_avx512.inl"
#include "cpu/attention_amx_rows.inl"
}  // namespace isa_amx
ATTNEXT_ISA_END
#endif

struct TileKernels {
  decltype(&isa_scalar::attn_fwd_tile_f32) fwd;
  decltype(&isa_scalar::attn_bwd_p_tile_f32) bwd_p;
  decltype(&isa_scalar::attn_bwd_ds_tile_f32) bwd_ds;
  decltype(&isa_scalar::attn_dropout_tile_f32) dropout;
  decltype(&isa_scalar::attn_row_dots_f32) row_dots;
};

const TileKernels& tile_kernels() {
  static const TileKernels k = [] {
    switch (simd::detected_isa()) {
#if ATTNEXT_X86_SIMD
      case simd::Isa::kAvx512:
        return TileKernels{&isa_avx512::attn_fwd_tile_f32, &isa_avx512::attn_bwd_p_tile_f32,
                           &isa_avx512::attn_bwd_ds_tile_f32, &isa_avx512::attn_dropout_tile_f32,
                           &isa_avx512::attn_row_dots_f32};
      case simd::Isa::kAvx2:
        return TileKernels{&isa_avx2::attn_fwd_tile_f32, &isa_avx2::attn_bwd_p_tile_f32,
                           &isa_avx2::attn_bwd_ds_tile_f32, &isa_avx2::attn_dropout_tile_f32,
                           &isa_avx2::attn_row_dots_f32};
#endif
#if ATTNEXT_ARM_NEON
      case simd::Isa::kNeon:
        return TileKernels{&isa_neon::attn_fwd_tile_f32, &isa_neon::attn_bwd_p_tile_f32,
                           &isa_neon::attn_bwd_ds_tile_f32, &isa_neon::attn_dropout_tile_f32,
                           &isa_neon::attn_row_dots_f32};
#endif
      default:
        return TileKernels{&isa_scalar::attn_fwd_tile_f32, &isa_scalar::attn_bwd_p_tile_f32,
                           &isa_scalar::attn_bwd_ds_tile_f32, &isa_scalar::attn_dropout_tile_f32,
                           &isa_scalar::attn_row_dots_f32};
    }
  }();
  return k;
}

// ---- the double tiles: plain loops, std::exp (double is for checking, not speed)
void fwd_tile(double* s, int64_t nr, int64_t nc, int64_t ld, const int64_t* vis, double* m, double* l,
              double* alpha) {
  for (int64_t r = 0; r < nr; ++r) {
    double* x = s + r * ld;
    const int64_t L = vis[r];
    if (L <= 0) {
      std::fill(x, x + nc, 0.0);
      alpha[r] = 1.0;
      continue;
    }
    double mx = -std::numeric_limits<double>::infinity();
    for (int64_t j = 0; j < L; ++j) mx = x[j] > mx ? x[j] : mx;
    const double m_new = std::max(mx, m[r]);
    const double m_sub = m_new == -std::numeric_limits<double>::infinity() ? 0.0 : m_new;  // as the float tile
    double sum = 0;
    for (int64_t j = 0; j < L; ++j) {
      x[j] = std::exp(x[j] - m_sub);
      sum += x[j];
    }
    std::fill(x + L, x + nc, 0.0);
    const double a = m[r] == -std::numeric_limits<double>::infinity() ? 0.0 : std::exp(m[r] - m_new);
    alpha[r] = a;
    l[r] = l[r] * a + sum;
    m[r] = m_new;
  }
}

void bwd_p_tile(double* s, int64_t nr, int64_t nc, int64_t ld, const int64_t* vis, const double* lse) {
  for (int64_t r = 0; r < nr; ++r) {
    double* x = s + r * ld;
    const int64_t L = std::max<int64_t>(vis[r], 0);
    for (int64_t j = 0; j < L; ++j) x[j] = std::exp(x[j] - lse[r]);
    std::fill(x + L, x + nc, 0.0);
  }
}

void bwd_ds_tile(const double* p, double* dp, const double* z, int64_t nr, int64_t nc, int64_t ld,
                 const double* D, double scale) {
  for (int64_t r = 0; r < nr; ++r) {
    for (int64_t j = 0; j < nc; ++j) {
      const double g = (z ? dp[r * ld + j] * z[r * ld + j] : dp[r * ld + j]) - D[r];
      dp[r * ld + j] = scale * p[r * ld + j] * g;
    }
  }
}

void dropout_tile(double* p, double* z, int64_t nr, int64_t nc, int64_t ld, const uint32_t* row_keys, uint32_t col0,
                  uint32_t threshold, double inv_keep) {
  for (int64_t r = 0; r < nr; ++r) {
    for (int64_t j = 0; j < nc; ++j) {
      const double f = dropout_keep(row_keys[r], col0 + static_cast<uint32_t>(j), threshold) ? inv_keep : 0.0;
      if (z) z[r * ld + j] = f;
      if (p) p[r * ld + j] *= f;
    }
  }
}

// The float tiles go to the kernels of the detected instruction set.
void fwd_tile(float* s, int64_t nr, int64_t nc, int64_t ld, const int64_t* vis, float* m, float* l, float* alpha) {
  tile_kernels().fwd(s, nr, nc, ld, vis, m, l, alpha);
}
void bwd_p_tile(float* s, int64_t nr, int64_t nc, int64_t ld, const int64_t* vis, const float* lse) {
  tile_kernels().bwd_p(s, nr, nc, ld, vis, lse);
}
void bwd_ds_tile(const float* p, float* dp, const float* z, int64_t nr, int64_t nc, int64_t ld, const float* D,
                 float scale) {
  tile_kernels().bwd_ds(p, dp, z, nr, nc, ld, D, scale);
}
void dropout_tile(float* p, float* z, int64_t nr, int64_t nc, int64_t ld, const uint32_t* row_keys, uint32_t col0,
                  uint32_t threshold, float inv_keep) {
  tile_kernels().dropout(p, z, nr, nc, ld, row_keys, col0, threshold, inv_keep);
}

// ---- gemm on row-major blocks, via column-major BLAS (C^T = B^T A^T)
template <typename T>
void blas_gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
               int64_t ldb, T beta, T* c, int64_t ldc) {
  // Column-major: C (m, n) = alpha op(A) op(B) + beta C.
  if (m == 0 || n == 0) return;
  const bool have_blas = std::is_same<T, float>::value ? (sgemm_ != nullptr) : (dgemm_ != nullptr);
  if (k > 0 && have_blas) {
    const int mi = static_cast<int>(m), ni = static_cast<int>(n), ki = static_cast<int>(k);
    const int la = static_cast<int>(lda), lb = static_cast<int>(ldb), lc = static_cast<int>(ldc);
    if constexpr (std::is_same<T, float>::value) {
      sgemm_(&ta, &tb, &mi, &ni, &ki, &alpha, a, &la, b, &lb, &beta, c, &lc);
    } else {
      dgemm_(&ta, &tb, &mi, &ni, &ki, &alpha, a, &la, b, &lb, &beta, c, &lc);
    }
    return;
  }
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t i = 0; i < m; ++i) {
      T acc = 0;
      for (int64_t p = 0; p < k; ++p) {
        const T av = ta == 'N' ? a[i + p * lda] : a[p + i * lda];
        const T bv = tb == 'N' ? b[p + j * ldb] : b[j + p * ldb];
        acc += av * bv;
      }
      c[i + j * ldc] = alpha * acc + (beta == T(0) ? T(0) : beta * c[i + j * ldc]);
    }
  }
}

// C (M, N) = alpha A (M, K) B^T + beta C, B: (N, K); all row-major.
template <typename T>
void mm_nt(int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda, const T* B, int64_t ldb, T beta, T* C,
           int64_t ldc) {
  blas_gemm<T>('T', 'N', N, M, K, alpha, B, ldb, A, lda, beta, C, ldc);
}
// C (M, N) = alpha A (M, K) B (K, N) + beta C.
template <typename T>
void mm_nn(int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda, const T* B, int64_t ldb, T beta, T* C,
           int64_t ldc) {
  blas_gemm<T>('N', 'N', N, M, K, alpha, B, ldb, A, lda, beta, C, ldc);
}
// C (M, N) = alpha A^T B + beta C, A: (K, M), B: (K, N).
template <typename T>
void mm_tn(int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda, const T* B, int64_t ldb, T beta, T* C,
           int64_t ldc) {
  blas_gemm<T>('N', 'T', N, M, K, alpha, B, ldb, A, lda, beta, C, ldc);
}

// ---- the float tile products: attnext's AVX-512 kernel (cpu/gemm_f32.h) where
// the CPU runs AVX-512, else the BLAS. The kernel reads its operands where they
// are (no packing per call), which on 64 x 64 tiles is what the BLAS spends a
// fifth of its time on; the one operand it needs transposed (K^T, V^T) is
// transposed once per key tile and reused. Which of the two runs is measured on
// the running CPU (f32_gemm_choice), for the forward and the backward apart and per
// head-size class;
// ATTNEXT_F32_GEMM=0/1 forces the BLAS/the kernel.
// The kernel for the tiles of compute type T: float only.
template <typename T>
F32Gemm own_gemm(bool backward, int64_t hs, bool prefill = false) {
  if constexpr (std::is_same<T, float>::value) {
    return f32_gemm_for(attention_gemm_use(backward, hs, prefill));
  } else {
    return nullptr;
  }
}

// C (M, N) = alpha A B (+ C when accumulate), A element (i, p) at a[i * sa_i + p * sa_p]
// with sa_p == 1 (rows) or sa_i == 1 (A^T stored), B (K, N) row-major.
template <typename T>
void tile_mm(F32Gemm own, int64_t M, int64_t N, int64_t K, T alpha, const T* a, int64_t sa_i, int64_t sa_p,
             const T* b, int64_t ldb, T* c, int64_t ldc, bool accumulate) {
  if constexpr (std::is_same<T, float>::value) {
    if (own != nullptr) {
      own(M, N, K, a, sa_i, sa_p, b, ldb, c, ldc, alpha, accumulate);
      return;
    }
  }
  const T beta = accumulate ? T(1) : T(0);
  if (sa_p == 1) {
    mm_nn<T>(M, N, K, alpha, a, sa_i, b, ldb, beta, c, ldc);
  } else {
    mm_tn<T>(M, N, K, alpha, a, sa_p, b, ldb, beta, c, ldc);
  }
}

// C (M, N) = alpha A B^T (+ C), A (M, K) rows, B (N, K) rows; bt: B^T (K, N) row-major
// (ldbt), which the own kernel reads (the BLAS packs B itself).
template <typename T>
void tile_mm_nt(F32Gemm own, int64_t M, int64_t N, int64_t K, T alpha, const T* a, int64_t lda, const T* b,
                int64_t ldb, const T* bt, int64_t ldbt, T* c, int64_t ldc, bool accumulate) {
  if constexpr (std::is_same<T, float>::value) {
    if (own != nullptr) {
      own(M, N, K, a, lda, 1, bt, ldbt, c, ldc, alpha, accumulate);
      return;
    }
  }
  mm_nt<T>(M, N, K, alpha, a, lda, b, ldb, accumulate ? T(1) : T(0), c, ldc);
}

// ---- tile products that skip what the causal mask hides (own kernel only)
//
// A tile whose first row already sees all its columns (every tile off the diagonal)
// is one call of the kernel, not one per row block: (1, 8, 2048, 64) float32 forward
// 18.5 -> 17.9 ms and backward 41.4 -> 40.7 ms on the Intel Xeon (alternated runs).
//
// vis[r], nondecreasing in r, is how many of the tile's keys query row r sees; on
// the diagonal tiles the upper triangle is zero in P and dS, about half of those
// tiles' work. The own kernel runs block by block of 6 rows (its register block)
// and stops each block at its last visible column (scores) or depth (products with
// P or dS); the BLAS path computes whole tiles.
constexpr int64_t kOwnRows = 6;

// C (nr, nc) = alpha A B^T, A (nr, K) rows, B^T packed (bt, ldbt) for the own kernel
// (b, ldb: B's rows for the BLAS). With the own kernel the columns past a row block's
// last visible one are left as they were, or zeroed up to nc when zero_hidden; the
// callers' tile kernels read only the visible columns otherwise.
template <typename T>
void scores_mm(F32Gemm own, int64_t nr, int64_t nc, int64_t K, T alpha, const T* a, int64_t lda, const T* b,
               int64_t ldb, const T* bt, int64_t ldbt, T* c, int64_t ldc, const int64_t* vis, bool zero_hidden) {
  if constexpr (std::is_same<T, float>::value) {
    if (own != nullptr) {
      if (nr > 0 && vis[0] >= nc) {  // every row sees every column: one call
        own(nr, nc, K, a, lda, 1, bt, ldbt, c, ldc, alpha, false);
        return;
      }
      for (int64_t r0 = 0; r0 < nr; r0 += kOwnRows) {
        const int64_t rb = std::min(kOwnRows, nr - r0), n = vis[r0 + rb - 1];
        if (n > 0) own(rb, n, K, a + r0 * lda, lda, 1, bt, ldbt, c + r0 * ldc, ldc, alpha, false);
      }
      if (zero_hidden) {
        for (int64_t r = 0; r < nr; ++r) std::fill(c + r * ldc + vis[r], c + r * ldc + nc, 0.0f);
      }
      return;
    }
  }
  tile_mm_nt(own, nr, nc, K, alpha, a, lda, b, ldb, bt, ldbt, c, ldc, false);
}

// C (nr, N) += P B, P (nr, nc) zero past vis[r], B (nc, N) rows.
template <typename T>
void rows_mm(F32Gemm own, int64_t nr, int64_t N, int64_t nc, const T* p, int64_t ldp, const T* b, int64_t ldb, T* c,
             int64_t ldc, const int64_t* vis) {
  if constexpr (std::is_same<T, float>::value) {
    if (own != nullptr) {
      if (nr > 0 && vis[0] >= nc) {  // every row sees all nc: one call
        own(nr, N, nc, p, ldp, 1, b, ldb, c, ldc, 1.0f, true);
        return;
      }
      for (int64_t r0 = 0; r0 < nr; r0 += kOwnRows) {
        const int64_t rb = std::min(kOwnRows, nr - r0), depth = vis[r0 + rb - 1];
        if (depth > 0) own(rb, N, depth, p + r0 * ldp, ldp, 1, b, ldb, c + r0 * ldc, ldc, 1.0f, true);
      }
      return;
    }
  }
  tile_mm(own, nr, N, nc, T(1), p, ldp, 1, b, ldb, c, ldc, true);
}

// C (nc, N) += P^T B, P (nr, nc) zero past vis[r], B (nr, N) rows: the key block
// [c0, c0 + 6) starts its depth at the first query row that sees key c0.
template <typename T>
void cols_mm(F32Gemm own, int64_t nr, int64_t nc, int64_t N, const T* p, int64_t ldp, const T* b, int64_t ldb, T* c,
             int64_t ldc, const int64_t* vis) {
  if constexpr (std::is_same<T, float>::value) {
    if (own != nullptr) {
      if (nr > 0 && vis[0] >= nc) {  // every row sees every key: one call
        own(nc, N, nr, p, 1, ldp, b, ldb, c, ldc, 1.0f, true);
        return;
      }
      int64_t first = 0;
      for (int64_t c0 = 0; c0 < nc; c0 += kOwnRows) {
        const int64_t cb = std::min(kOwnRows, nc - c0);
        while (first < nr && vis[first] <= c0) ++first;
        if (first == nr) break;  // no row sees key c0, nor any later key
        own(cb, N, nr - first, p + first * ldp + c0, 1, ldp, b + first * ldb, ldb, c + c0 * ldc, ldc, 1.0f, true);
      }
      return;
    }
  }
  tile_mm(own, nc, N, nr, T(1), p, 1, ldp, b, ldb, c, ldc, true);
}

// dst (C, R) row-major (ldd) = src (R, C)^T as T, src rows at stride lds.
template <typename T, typename in_t>
void transpose_block(const in_t* src, int64_t lds, int64_t R, int64_t C, T* dst, int64_t ldd) {
  if constexpr (std::is_same<T, float>::value && std::is_same<in_t, float>::value) {
    static const F32Transpose fast = f32_transpose_kernel();  // AVX-512: 16 x 16 blocks in registers
    if (fast != nullptr) {
      fast(src, lds, R, C, dst, ldd);
      return;
    }
  }
  constexpr int64_t kB = 16;  // square blocks: both sides stay in L1
  for (int64_t r0 = 0; r0 < R; r0 += kB) {
    const int64_t r1 = std::min(R, r0 + kB);
    for (int64_t c0 = 0; c0 < C; c0 += kB) {
      const int64_t c1 = std::min(C, c0 + kB);
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t c = c0; c < c1; ++c) dst[c * ldd + r] = static_cast<T>(src[r * lds + c]);
      }
    }
  }
}

// The tile products run inside at::parallel_for: see SingleThreadedBlas (cpu/blas.h).

#ifndef ATTNEXT_FWD_KEY_TILE
#define ATTNEXT_FWD_KEY_TILE 256
#endif
constexpr int64_t kBq = 64;  // query rows per tile
constexpr int64_t kBk = 64;  // key columns per tile (backward)
// Query rows per block in the backward: each key tile meets the rows that see it in
// blocks of 256, so the products with P^T and dS^T run 256 deep. Measured on the
// Intel Xeon (AMX, 2 cores, torch 2.13): 5-9% faster than 64-row blocks with the
// BLAS, the same with the own kernel.
constexpr int64_t kBqB = 256;
// Forward key tiles can be wider at no cost in wasted work (a tile is cut at
// the causal boundary of its query tile's last row), and wider tiles mean
// fewer, more efficient BLAS calls.
constexpr int64_t kBkF = ATTNEXT_FWD_KEY_TILE;

struct Dropout {
  bool on = false;
  uint32_t stream = 0;
  uint32_t threshold = 0;
  double inv_keep = 1.0;
  Dropout(double p, int64_t seed, int64_t offset) {
    if (p > 0) {
      on = true;
      stream = dropout_stream_key(seed, offset);
      threshold = dropout_threshold(p);
      inv_keep = 1.0 / (1.0 - p);
    }
  }
};

using Geometry = AttnGeometry;

// D = rowsum(dO * O): (BH * T) in the compute type.
template <typename in_t, typename T>
std::vector<T> rowsum_dout_out(const Rows2D<in_t>& dO, const Rows2D<in_t>& O, const Geometry& g) {
  std::vector<T> D(g.BH * g.T);
  attnext::parallel_for(0, g.BH * g.T, 256, [&](int64_t begin, int64_t end) {
    if constexpr (std::is_same<in_t, float>::value && std::is_same<T, float>::value) {
      // the vector kernel of the detected instruction set, one row at a time
      // (a scalar loop's one chain of dependent adds was 5% of a T = 256 backward)
      for (int64_t i = begin; i < end; ++i) {
        tile_kernels().row_dots(dO.at(i / g.T, i % g.T), 0, O.at(i / g.T, i % g.T), 0, 1, g.hsv, D.data() + i);
      }
      return;
    }
    for (int64_t i = begin; i < end; ++i) {
      const in_t* a = dO.at(i / g.T, i % g.T);
      const in_t* c = O.at(i / g.T, i % g.T);
      T acc = 0;
      for (int64_t j = 0; j < g.hsv; ++j) acc += static_cast<T>(a[j]) * static_cast<T>(c[j]);
      D[i] = acc;
    }
  });
  return D;
}

// Chunks of key tiles per batch in the backward: with enough batches to keep every
// thread busy with whole batches, one (dQ accumulated in place); otherwise the key
// tiles of a batch are split into chunks, each with its own dQ copy, summed after.
int64_t backward_chunks(const Geometry& g) {
  // one unit of a varlen batch: its thread is the only one
  if (at::in_parallel_region() || c10::ParallelGuard::is_enabled()) return 1;
  const int64_t nkt = ceil_div(g.S, kBk);
  const int64_t nthreads = at::get_num_threads();
  if (g.BH % nthreads != 0 && g.BH < 4 * nthreads) {
    return std::max<int64_t>(1, std::min(nkt, ceil_div(2 * nthreads, g.BH)));
  }
  return 1;
}

// Whether the forward's items are whole batches: when whole batches keep every
// thread busy (backward_chunks' rule), and never inside a parallel region (one
// unit of a varlen batch).
bool batch_items(const Geometry& g) {
  if (at::in_parallel_region() || c10::ParallelGuard::is_enabled()) return false;
  const int64_t nthreads = at::get_num_threads();
  return nthreads > 1 && (g.BH % nthreads == 0 || g.BH >= 4 * nthreads);
}

// Key tile kt of chunk `chunk` at step i, or >= nkt when the chunk is done: tiles
// chunk, 2c-1-chunk, 2c+chunk, ... (a boustrophedon deal, so the chunks get about
// the same work although early key tiles have more).
inline int64_t chunk_key_tile(int64_t i, int64_t chunk, int64_t nchunks) {
  return i * nchunks + ((i & 1) ? nchunks - 1 - chunk : chunk);
}

// The backward's probabilities for one (query tile, key tile): s (nr, nc, row
// stride kBk), the scaled scores, becomes P = exp(S - lse) on the visible part
// and 0 after it; with dropout, z gets the tile's factors (0 or 1 / (1 - p))
// and pd = P z. Returns the dropped P (s itself without dropout).
template <typename T>
const T* backward_probs(T* s, int64_t nr, int64_t nc, const Geometry& g, int64_t b, int64_t t0, int64_t k0,
                        const T* lse_rows, const Dropout& drop, int64_t* vis, uint32_t* row_keys, T* z, T* pd) {
  for (int64_t r = 0; r < nr; ++r) vis[r] = std::min(std::max<int64_t>(g.visible(t0 + r) - k0, 0), nc);
  mask_window_start(s, nr, kBk, g, t0, k0, vis);
  bwd_p_tile(s, nr, nc, kBk, vis, lse_rows);
  if (!drop.on) return s;
  for (int64_t r = 0; r < nr; ++r) row_keys[r] = dropout_row_key(drop.stream, b, t0 + r);
  dropout_tile(static_cast<T*>(nullptr), z, nr, nc, kBk, row_keys, static_cast<uint32_t>(k0), drop.threshold,
               static_cast<T>(drop.inv_keep));
  for (int64_t r = 0; r < nr; ++r) {
    for (int64_t c = 0; c < nc; ++c) pd[r * kBk + c] = s[r * kBk + c] * z[r * kBk + c];
  }
  return pd;
}

// dq (..., T, hs), any unit-stride-row layout, = the sum of the per-chunk dQ
// accumulators dq_acc (nchunks, BH, T, hs), rounded once to dq's dtype.
// The backward's lse: as given, or, with a window that leaves some row without any
// key (lse -inf), a copy where those rows are +inf, so that P = exp(S - lse) is 0 on
// the whole tile the row shares with others (not exp(-inf + inf)).
template <typename T>
std::vector<T> window_lse(const at::Tensor& lse, const Geometry& g) {
  bool any_none = false;
  for (int64_t t = 0; t < g.T && !any_none; ++t) any_none = g.sees_none(t) && g.visible(t) > 0;
  if (g.causal() || !any_none) return {};
  std::vector<T> w(lse.const_data_ptr<T>(), lse.const_data_ptr<T>() + g.BH * g.T);
  for (int64_t b = 0; b < g.BH; ++b) {
    for (int64_t t = 0; t < g.T; ++t) {
      if (g.sees_none(t)) w[b * g.T + t] = std::numeric_limits<T>::infinity();
    }
  }
  return w;
}

// The query rows the key tile starting at k0 is seen by start at first_query(k0)
// (the first row whose window reaches past k0) and end before end_query(k1) (the
// first row whose window starts at or after k1, the tile's end).
inline int64_t first_query(const Geometry& g, int64_t k0) {
  if (g.wr < 0) return 0;
  return std::min(g.T, std::max<int64_t>(0, k0 - g.shift - g.wr));
}
inline int64_t end_query(const Geometry& g, int64_t k1) {
  if (g.wl < 0) return g.T;
  return std::min(g.T, std::max<int64_t>(0, k1 + g.wl - g.shift));
}

void reduce_dq_chunks(const at::Tensor& dq_acc, at::Tensor& dq) {
  const at::Tensor total = dq_acc.size(0) == 1 ? dq_acc[0] : dq_acc.sum(0);  // (BH, T, hs)
  dq.copy_(total.view(dq.sizes()));
}

// gemm: the float tiles' products on the kernel measured for this head size (-1), the
// BLAS (0) or attnext's AVX-512 kernel (1; what attention_forward_probe times).
template <typename in_t, typename T = at::opmath_type<in_t>>
void fwd_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out, at::Tensor& lse,
              const Geometry& g, double scale_d, const Dropout& drop, int gemm = -1) {
  constexpr bool direct = std::is_same<T, in_t>::value;  // accumulate straight into `out`
  const Rows2D<in_t> Q(q), K(k), V(v);
  const OutRows<in_t> Out(out);
  T* lp = lse.mutable_data_ptr<T>();
  const T scale = static_cast<T>(scale_d);
  const T inv_keep = static_cast<T>(drop.inv_keep);
  const int64_t nqt = ceil_div(g.T, kBq);
  // a chunk of few queries against many keys (chunked prefill) has its own measured
  // choice: transposing all of K for its few query tiles is not paid back
  const bool prefill = nqt < 8 && 4 * g.T <= g.S;
  F32Gemm own = nullptr;
  if constexpr (std::is_same<T, float>::value) {
    own = gemm < 0 ? own_gemm<T>(false, g.hs, prefill) : gemm == 1 ? f32_gemm_kernel() : nullptr;
  }
  // S = Q K^T reads K^T with the own kernel, stored per 256-key tile as a row-major
  // (hs, 256) block: the thread transposes the K rows of the batch it last saw once,
  // columns [0, packed), and later query tiles of that batch reuse them (items run
  // batch by batch); past 4 MiB per thread, K^T is transposed per key tile instead.
  // Per-tile blocks keep each product's operand compact (one (hs, S) block had rows S
  // floats apart: 5% slower forward at (1, 8, 2048, 64) on the Intel Xeon), and their
  // rows are padded to 272 floats so that their stride is never a multiple of 4 KiB
  // (rows 2048 floats apart put every read down a column into the same L1 sets: 13%
  // slower). The BLAS reads the cached K^T too, as a plain (NN) product, where a batch
  // has at least 8 query tiles and K^T fits the 4 MiB; else it reads K's rows (NT) and
  // copies each key tile per call itself. On the Intel Xeon (AMX, 2 cores, torch 2.13), K^T against NT:
  // 2-5% faster from T = 512 to 4096 (hs 64 and 128), 6% slower at T = 256 (4 query
  // tiles) and 11% slower for a 128-row prefill against S = 4096 (2 query tiles: the
  // transposition of all of K is not paid back).
  const bool fits = g.S * g.hs <= (int64_t(1) << 20);
  const bool use_kt = own != nullptr || (nqt >= 8 && fits);
  const bool cache_kt = use_kt && fits;
  const int64_t ldkt = kBkF + 16;
  const int64_t kt_tile = g.hs * ldkt;  // one key tile's K^T block
  const int64_t kt_tiles = cache_kt ? ceil_div(g.S, kBkF) : 1;
  struct Scratch {
    std::vector<T> s, m, l, alpha, o, qbuf, kbuf, vbuf, kt;
    std::vector<int64_t> vis;
    std::vector<uint32_t> row_keys;
    int64_t batch = -1, packed = 0;
  };
  auto make_scratch = [&] {
    const int64_t w = direct ? 0 : 1;  // widened copies only for bfloat16
    Scratch sc;
    sc.s.resize(kBq * kBkF);
    sc.m.resize(kBq);
    sc.l.resize(kBq);
    sc.alpha.resize(kBq);
    sc.o.resize(w * kBq * g.hsv);
    sc.qbuf.resize(w * kBq * g.hs);
    sc.kbuf.resize(use_kt ? 0 : w * kBkF * g.hs);
    sc.vbuf.resize(w * kBkF * g.hsv);
    sc.kt.resize(use_kt ? kt_tiles * kt_tile : 0);
    sc.vis.resize(kBq);
    sc.row_keys.resize(kBq);
    return sc;
  };
  // One query tile of batch b, rows [t0, t0 + kBq).
  auto query_tile = [&](Scratch& sc, int64_t b, int64_t t0) {
    const int64_t nr = std::min(kBq, g.T - t0);
    in_t* out_tile = Out.at(b, t0);  // (nr, hsv), row stride Out.ld
    T* o;                             // (nr, hsv) accumulator, row stride ldo
    int64_t ldo;
    if constexpr (direct) {
      o = out_tile;
      ldo = Out.ld;
    } else {
      o = sc.o.data();
      ldo = std::max<int64_t>(g.hsv, 1);
    }
    T* s = sc.s.data();
    for (int64_t r = 0; r < nr; ++r) std::fill(o + r * ldo, o + r * ldo + g.hsv, T(0));
    std::fill(sc.m.begin(), sc.m.end(), -std::numeric_limits<T>::infinity());
    std::fill(sc.l.begin(), sc.l.end(), T(0));
    if (drop.on) {
      for (int64_t r = 0; r < nr; ++r) sc.row_keys[r] = dropout_row_key(drop.stream, b, t0 + r);
    }
    if (cache_kt && sc.batch != b) {
      sc.batch = b;
      sc.packed = 0;
    }
    const int64_t kv_end = g.visible(t0 + nr - 1);
    const int64_t kv_start = first_key_tile(g, t0, kBkF);  // tiles left of every row's window: skipped
    const Block<T> qb = load_block(Q.at(b, t0), Q.ld, nr, g.hs, sc.qbuf.data());
    for (int64_t k0 = kv_start; k0 < kv_end; k0 += kBkF) {
      const int64_t nc = std::min(kBkF, kv_end - k0);
      const Block<T> vb = load_block(V.at(b, k0), V.ld, nc, g.hsv, sc.vbuf.data());
      for (int64_t r = 0; r < nr; ++r) sc.vis[r] = std::min(std::max<int64_t>(g.visible(t0 + r) - k0, 0), nc);
      if (use_kt) {  // S = Q K^T from K^T columns [k0, k0 + nc)
        const T* kt = sc.kt.data();  // k0 is a multiple of kBkF: tile k0 / kBkF, from its column 0
        if (cache_kt) {
          while (sc.packed < k0 + nc) {  // the columns not transposed yet, tile by tile
            const int64_t c0 = sc.packed, tile = c0 / kBkF, c1 = std::min((tile + 1) * kBkF, k0 + nc);
            transpose_block(K.at(b, c0), K.ld, c1 - c0, g.hs, sc.kt.data() + tile * kt_tile + (c0 - tile * kBkF),
                            ldkt);
            sc.packed = c1;
          }
          kt += (k0 / kBkF) * kt_tile;
        } else {
          transpose_block(K.at(b, k0), K.ld, nc, g.hs, sc.kt.data(), ldkt);
        }
        if (own != nullptr) {
          scores_mm(own, nr, nc, g.hs, scale, qb.p, qb.ld, static_cast<const T*>(nullptr), 0, kt, ldkt, s, kBkF,
                    sc.vis.data(), false);  // S: (nr, nc)
        } else {
          mm_nn<T>(nr, nc, g.hs, scale, qb.p, qb.ld, kt, ldkt, T(0), s, kBkF);  // S: (nr, nc)
        }
      } else {
        const Block<T> kb = load_block(K.at(b, k0), K.ld, nc, g.hs, sc.kbuf.data());
        mm_nt<T>(nr, nc, g.hs, scale, qb.p, qb.ld, kb.p, kb.ld, T(0), s, kBkF);  // S: (nr, nc)
      }
      mask_window_start(s, nr, kBkF, g, t0, k0, sc.vis.data());
      fwd_tile(s, nr, nc, kBkF, sc.vis.data(), sc.m.data(), sc.l.data(), sc.alpha.data());
      if (drop.on) {
        dropout_tile(s, static_cast<T*>(nullptr), nr, nc, kBkF, sc.row_keys.data(), static_cast<uint32_t>(k0),
                     drop.threshold, inv_keep);
      }
      if (k0 > kv_start) rescale_rows(o, nr, g.hsv, ldo, sc.alpha.data());
      rows_mm(own, nr, g.hsv, nc, s, kBkF, vb.p, vb.ld, o, ldo, sc.vis.data());  // O += P V
    }
    finish_rows(o, nr, g.hsv, ldo, sc.m.data(), sc.l.data(), lp + b * g.T + t0,
                [&](int64_t r) { return g.sees_none(t0 + r); });
    if constexpr (!direct) {
      store_block(o, ldo, nr, g.hsv, out_tile, Out.ld);
    }
  };
  // Short rows (at most 8 query tiles) with batches enough to share out whole (as
  // backward_chunks decides): an item is a batch, its query tiles in order, so its K
  // and V are read from memory (and K transposed) by one thread, the transposition
  // running ahead of the products tile by tile. Otherwise an item is a query tile,
  // longest rows first. On the Intel Xeon (2 threads, torch 2.13, three alternated
  // runs): (64, 6, 256, 64) forward 22.1 -> 20.7 ms contiguous, 28.6 -> 27.7 ms packed
  // (with query-tile items both threads read and transposed most batches' K); at
  // T = 2048 no difference beyond noise, so long rows keep the longest-first deal.
  // (A compact copy of strided V rows per batch, tried with batch items: no gain.)
  if (nqt <= 8 && batch_items(g)) {
    // Each tile's Q and output rows and the K, V rows its last row sees beyond those
    // of the tile before it are prefetched while that tile computes. In the packed
    // layout every 256-byte row is a page apart and the hardware prefetcher fetches
    // none ahead: (64, 6, 256, 64) packed forward 27.3 -> 24.8 ms on the Intel Xeon
    // (2 threads; the baseline the mean of 18 runs across the A/B rounds, the output
    // rows 0.9 ms of the gain), contiguous the same.
    // Prefetching the next batch's first tile too (claimed ahead from the counter)
    // was no better.
    auto fetch_tile = [&](int64_t b, int64_t t0) {
      const int64_t nn = std::min(kBq, g.T - t0);
      prefetch_rows(Q.at(b, t0), Q.ld, nn, g.hs);
      prefetch_rows(Out.at(b, t0), Out.ld, nn, g.hsv);
      const int64_t k_lo = std::min(g.S, std::max<int64_t>(0, g.visible(t0) - 1));
      const int64_t k_hi = std::min(g.S, std::max<int64_t>(0, g.visible(t0 + nn - 1)));
      if (k_hi > k_lo) {
        prefetch_rows(K.at(b, k_lo), K.ld, k_hi - k_lo, g.hs);
        prefetch_rows(V.at(b, k_lo), V.ld, k_hi - k_lo, g.hsv);
      }
    };
    parallel_items(g.BH, make_scratch, [&](Scratch& sc, int64_t b) {
      for (int64_t t0 = 0; t0 < g.T; t0 += kBq) {
        if (t0 + kBq < g.T) fetch_tile(b, t0 + kBq);
        query_tile(sc, b, t0);
      }
    });
  } else {
    parallel_items(g.BH * nqt, make_scratch, [&](Scratch& sc, int64_t item) {
      query_tile(sc, item / nqt, (nqt - 1 - item % nqt) * kBq);
    });
  }
}

template <typename in_t, typename T = at::opmath_type<in_t>>
void bwd_impl(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& out, const at::Tensor& lse, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
              const Geometry& g, double scale_d, const Dropout& drop) {
  constexpr bool direct = std::is_same<T, in_t>::value;  // accumulate straight into the outputs
  const Rows2D<in_t> Q(q), K(k), V(v), dO(dout), O(out);
  const std::vector<T> lse_w = window_lse<T>(lse, g);
  const T* lp = lse_w.empty() ? lse.const_data_ptr<T>() : lse_w.data();  // (BH, T), contiguous
  const T scale = static_cast<T>(scale_d);

  const int64_t nkt = ceil_div(g.S, kBk);
  const int64_t nchunks = backward_chunks(g);
  // D = rowsum(dO * O): float with one item per batch, per item from the rows it is
  // about to read anyway (a pass over all of dO and O before was 4-6% of a T = 256
  // backward, at memory speed); otherwise in one pass here
  constexpr bool is_float = std::is_same<in_t, float>::value && std::is_same<T, float>::value;
  const bool d_per_item = is_float && nchunks == 1;
  const std::vector<T> D = d_per_item ? std::vector<T>() : rowsum_dout_out<in_t, T>(dO, O, g);
  const bool dq_in_place = direct && nchunks == 1;
  // dQ accumulates in place (dq's own rows) or in per-chunk copies (BH, T, hs)
  at::Tensor dq_acc = dq_in_place ? dq : at::zeros({nchunks, g.BH, g.T, g.hs}, dq.options().dtype(lse.dtype()));
  const OutRows<T> dQ(dq_acc);
  const OutRows<in_t> dK(dk), dV(dv);

  const F32Gemm own = own_gemm<T>(true, g.hs);  // with it: K^T and V^T transposed once per key tile
  // Rows that are not packed (views inside a (..., T, 3, nh, hs) projection and its
  // gradient, nanoGPT's c_attn through causal_attention_qkvpacked): Q and dO, which
  // every key tile reads again, are copied compact once per item (with prefetching:
  // one short row per page defeats the hardware prefetcher), and dQ accumulates in a
  // compact scratch stored at the item's end, while the batch's Q and dO rows fit
  // 8 MiB per thread (dQ's scratch: at most 4 MiB more). In one process, alternated, on the Intel Xeon: the backward of
  // (8, 12, 1024, 64) in the packed layout 155 ms against 168 without them, (16, 6,
  // 256, 64) the same; compact K, V tiles and dK, dV accumulators gained nothing,
  // nor did any copy in the forward (whose products go to the BLAS, which packs its
  // operands itself).
  const bool rows_fit = g.T * (g.hs + g.hsv) <= (int64_t(1) << 21);
  const bool qd_copy = direct && rows_fit && (Q.ld != g.hs || dO.ld != g.hsv);
  const bool dq_copy = dq_in_place && rows_fit && dQ.ld != g.hs;
  // dQ in place (not dq_copy, whose scratch is stored whole): each item zeroes its
  // batch's rows as it starts (nchunks == 1: the only item of the batch), so they are
  // in cache when the key tiles add to them, not written out by a pass before
  struct Scratch {
    std::vector<T> s, dp, z, pd, dk, dv, qbuf, kbuf, vbuf, dobuf, kt, vt, qc, doc, dqc, d;
    std::vector<int64_t> vis;
    std::vector<uint32_t> row_keys;
  };
  auto make_scratch = [&] {
    const int64_t nz = drop.on ? kBqB * kBk : 0;
    const int64_t w = direct ? 0 : 1;
    const int64_t t = own != nullptr ? 1 : 0;
    return Scratch{std::vector<T>(kBqB * kBk),       std::vector<T>(kBqB * kBk),
                   std::vector<T>(nz),               std::vector<T>(nz),
                   std::vector<T>(w * kBk * g.hs),   std::vector<T>(w * kBk * g.hsv),
                   std::vector<T>(w * kBqB * g.hs),  std::vector<T>(w * kBk * g.hs),
                   std::vector<T>(w * kBk * g.hsv),  std::vector<T>(w * kBqB * g.hsv),
                   std::vector<T>(t * g.hs * kBk),   std::vector<T>(t * g.hsv * kBk),
                   std::vector<T>(qd_copy ? g.T * g.hs : 0), std::vector<T>(qd_copy ? g.T * g.hsv : 0),
                   std::vector<T>(dq_copy ? g.T * g.hs : 0), std::vector<T>(d_per_item ? g.T : 0),
                   std::vector<int64_t>(kBqB),       std::vector<uint32_t>(kBqB)};
  };
  parallel_items(g.BH * nchunks, make_scratch, [&](Scratch& sc, int64_t item) {
    const int64_t b = item / nchunks, chunk = item % nchunks;
    T* dqb = dQ.at(chunk * g.BH + b, 0);  // (T, hs), row stride dQ.ld
    int64_t ldq = dQ.ld;
    if (dq_copy) {  // nchunks == 1: this item is the batch's only one
      dqb = sc.dqc.data();
      ldq = g.hs;
      std::fill(sc.dqc.begin(), sc.dqc.end(), T(0));
    } else if (dq_in_place) {
      for (int64_t t = 0; t < g.T; ++t) std::fill(dqb + t * ldq, dqb + t * ldq + g.hs, T(0));
    }
    if (qd_copy) {  // this batch's Q and dO rows, compact
      load_compact(Q.at(b, 0), Q.ld, g.T, g.hs, sc.qc.data());
      load_compact(dO.at(b, 0), dO.ld, g.T, g.hsv, sc.doc.data());
    }
    const T* Db = d_per_item ? nullptr : D.data() + b * g.T;  // (T), this batch's D
    if constexpr (is_float) {
      if (d_per_item) {
        const float* dor = qd_copy ? sc.doc.data() : dO.at(b, 0);
        tile_kernels().row_dots(dor, qd_copy ? g.hsv : dO.ld, O.at(b, 0), O.ld, g.T, g.hsv, sc.d.data());
        Db = sc.d.data();
      }
    }
    T* s = sc.s.data();
    T* dp = sc.dp.data();
    for (int64_t i = 0;; ++i) {
      const int64_t kt = chunk_key_tile(i, chunk, nchunks);
      if (kt >= nkt) break;
      const int64_t k0 = kt * kBk, nc = std::min(kBk, g.S - k0);
      // The next key tile's K, V rows and the dK, dV rows it writes are prefetched
      // while this one computes, and during the last tile the dQ rows the item stores
      // at its end (up to 256 KiB). In the packed layout (rows a page apart, which the
      // hardware prefetcher does not follow) the first write of each output line waited
      // on memory: (64, 6, 256, 64) packed backward 54.2 -> 46.8 ms on the Intel Xeon
      // (2 threads, alternated runs; K and V alone gained nothing), contiguous the same.
      const int64_t kt_next = chunk_key_tile(i + 1, chunk, nchunks);
      if (kt_next < nkt) {
        const int64_t n_next = std::min(kBk, g.S - kt_next * kBk);
        prefetch_rows(K.at(b, kt_next * kBk), K.ld, n_next, g.hs);
        prefetch_rows(V.at(b, kt_next * kBk), V.ld, n_next, g.hsv);
        prefetch_rows(dK.at(b, kt_next * kBk), dK.ld, n_next, g.hs);
        prefetch_rows(dV.at(b, kt_next * kBk), dV.ld, n_next, g.hsv);
      } else if (dq_copy && g.T * g.hs <= (int64_t(1) << 16)) {
        prefetch_rows(dQ.at(b, 0), dQ.ld, g.T, g.hs);
      }
      in_t* dk_out = dK.at(b, k0);  // (nc, hs), row stride dK.ld
      in_t* dv_out = dV.at(b, k0);  // (nc, hsv), row stride dV.ld
      T* dkt;
      T* dvt;
      int64_t ldk, ldv;
      if constexpr (direct) {
        dkt = dk_out;
        dvt = dv_out;
        ldk = dK.ld;
        ldv = dV.ld;
      } else {
        dkt = sc.dk.data();
        dvt = sc.dv.data();
        ldk = std::max<int64_t>(g.hs, 1);
        ldv = std::max<int64_t>(g.hsv, 1);
      }
      for (int64_t r = 0; r < nc; ++r) {
        std::fill(dkt + r * ldk, dkt + r * ldk + g.hs, T(0));
        std::fill(dvt + r * ldv, dvt + r * ldv + g.hsv, T(0));
      }
      const Block<T> kb = load_block(K.at(b, k0), K.ld, nc, g.hs, sc.kbuf.data());
      const Block<T> vb = load_block(V.at(b, k0), V.ld, nc, g.hsv, sc.vbuf.data());
      if (own != nullptr) {
        transpose_block(kb.p, kb.ld, nc, g.hs, sc.kt.data(), kBk);   // K^T: (hs, nc)
        transpose_block(vb.p, vb.ld, nc, g.hsv, sc.vt.data(), kBk);  // V^T: (hsv, nc)
      }
      const int64_t t_first = first_query(g, k0), t_end = end_query(g, k0 + nc);
      for (int64_t t0 = t_first; t0 < t_end; t0 += kBqB) {
        const int64_t nr = std::min(kBqB, g.T - t0);
        const Block<T> qb = qd_copy ? Block<T>{sc.qc.data() + t0 * g.hs, std::max<int64_t>(g.hs, 1)}
                                    : load_block(Q.at(b, t0), Q.ld, nr, g.hs, sc.qbuf.data());
        const Block<T> dob = qd_copy ? Block<T>{sc.doc.data() + t0 * g.hsv, std::max<int64_t>(g.hsv, 1)}
                                     : load_block(dO.at(b, t0), dO.ld, nr, g.hsv, sc.dobuf.data());
        const int64_t* vis = sc.vis.data();  // set here for the products, again in backward_probs
        for (int64_t r = 0; r < nr; ++r) sc.vis[r] = std::min(std::max<int64_t>(g.visible(t0 + r) - k0, 0), nc);
        scores_mm(own, nr, nc, g.hs, scale, qb.p, qb.ld, kb.p, kb.ld, sc.kt.data(), kBk, s, kBk, vis,
                  false);  // S: (nr, nc)
        T* z = drop.on ? sc.z.data() : nullptr;
        const T* pdrop = backward_probs(s, nr, nc, g, b, t0, k0, lp + b * g.T + t0, drop, sc.vis.data(),
                                         sc.row_keys.data(), z, sc.pd.data());  // P, dropped
        cols_mm(own, nr, nc, g.hsv, pdrop, kBk, dob.p, dob.ld, dvt, ldv, vis);  // dV += P^T dO
        scores_mm(own, nr, nc, g.hsv, T(1), dob.p, dob.ld, vb.p, vb.ld, sc.vt.data(), kBk, dp, kBk, vis,
                  true);  // dP: (nr, nc)
        bwd_ds_tile(s, dp, z, nr, nc, kBk, Db + t0, scale);  // dS, scaled
        rows_mm(own, nr, g.hs, nc, dp, kBk, kb.p, kb.ld, dqb + t0 * ldq, ldq, vis);  // dQ += dS K
        cols_mm(own, nr, nc, g.hs, dp, kBk, qb.p, qb.ld, dkt, ldk, vis);  // dK += dS^T Q
      }
      if constexpr (!direct) {
        store_block(dkt, ldk, nc, g.hs, dk_out, dK.ld);
        store_block(dvt, ldv, nc, g.hsv, dv_out, dV.ld);
      }
    }
    if (dq_copy) store_block(sc.dqc.data(), g.hs, g.T, g.hs, dQ.at(b, 0), dQ.ld);
  });
  if (!dq_in_place) reduce_dq_chunks(dq_acc, dq);
}

#if ATTNEXT_BF16_TILES
// ---- bfloat16 on CPUs with AVX512-BF16 or AArch64's BF16 extension: the tile
// products in bfloat16
//
// The same algorithm as fwd_impl / bwd_impl, with every product of the tiles
// a bfloat16 x bfloat16 -> float dot product (isa_bf16::gemm_bf16: vdpbf16ps,
// about 5x the float BLAS on the dev VM, or BFDOT). The inputs are bfloat16
// already; P and dS are rounded to bfloat16 before they multiply (as eager
// bfloat16 and SDPA's bfloat16 kernel do); softmax, accumulators and lse stay float. Operands are
// repacked per tile into the pair layouts gemm_bf16 reads (see gemm_bf16.inl).

inline int64_t round16(int64_t n) { return (n + 15) / 16 * 16; }
inline int64_t half_up(int64_t n) { return (n + 1) / 2; }

// Copies rows [r0, r0 + n) of one batch of an input into dst (n, cols), contiguous.
void copy_rows(const Rows2D<at::BFloat16>& X, int64_t b, int64_t r0, int64_t n, int64_t cols, uint16_t* dst) {
  for (int64_t r = 0; r < n; ++r) {
    std::memcpy(dst + r * cols, X.at(b, r0 + r), sizeof(uint16_t) * cols);
  }
}

const uint32_t* words(const uint16_t* p) { return reinterpret_cast<const uint32_t*>(p); }

// ---- AMX through ATen's brgemm micro-kernel (where the CPU has AMX)
//
// The pair layouts of gemm_bf16.inl (bf16_t32, bf16_vnni: rows of (x[2p][c], x[2p+1][c])
// words) are the layout brgemm takes its packed B in on AMX CPUs; amx_available checks
// that once against cpublas::pack, so a CPU or oneDNN that packs otherwise never gets
// here. brgemm has no alpha: scale_rows applies the scale to the visible scores.
#if ATTNEXT_AMX_BRGEMM
bool amx_layout_ok() {
  constexpr int64_t K = 6, N = 32;
  std::vector<uint16_t> rows(K * N), packed(K * N);
  std::vector<uint32_t> mine(K / 2 * N);
  for (int64_t i = 0; i < K * N; ++i) rows[i] = static_cast<uint16_t>(0x3f80 + i);
  at::native::cpublas::pack(K, N, N, N, at::kBFloat16, at::kBFloat16, rows.data(), packed.data());
  isa_bf16::bf16_vnni(rows.data(), N, K, N, mine.data(), N);
  return std::memcmp(packed.data(), mine.data(), sizeof(uint16_t) * K * N) == 0;
}

bool amx_available() {
  static const bool ok = [] {
    const char* env = std::getenv("ATTNEXT_AMX");
    if (env != nullptr && std::string(env) == "0") return false;
    return at::native::cpublas::could_pack(at::kBFloat16) && amx_layout_ok();
  }();
  return ok;
}

// C (M, N) (ldc) = A B (+ C when accumulate): A bfloat16 rows (lda), B in pair layout
// (K / 2 rows of N words, ldb words; K even).
void amx_mm(int64_t M, int64_t N, int64_t K, const void* a, int64_t lda, const uint32_t* b, int64_t ldb, float* c,
            int64_t ldc, bool accumulate) {
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, accumulate, static_cast<const at::BFloat16*>(a),
                              reinterpret_cast<const at::BFloat16*>(b), c);
}

void release_amx(bool used) {
  if (used) at::native::cpublas::brgemm_release();
}
#else
bool amx_available() { return false; }
void amx_mm(int64_t, int64_t, int64_t, const void*, int64_t, const uint32_t*, int64_t, float*, int64_t, bool) {}
void release_amx(bool) {}
#endif

// s[r, j] *= scale on each row's visible prefix vis[r].
void scale_rows(float* s, int64_t nr, int64_t ld, const int64_t* vis, float scale) {
  for (int64_t r = 0; r < nr; ++r) {
    float* row = s + r * ld;
    for (int64_t j = 0; j < vis[r]; ++j) row[j] *= scale;
  }
}

void fwd_bf16dot(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out, at::Tensor& lse,
                 const Geometry& g, double scale_d, const Dropout& drop, bool amx = false) {
  const Rows2D<at::BFloat16> Q(q), K(k), V(v);
  const OutRows<at::BFloat16> Out(out);
  float* lp = lse.mutable_data_ptr<float>();
  const float scale = static_cast<float>(scale_d);
  const float inv_keep = static_cast<float>(drop.inv_keep);
  const int64_t nqt = ceil_div(g.T, kBq);
  const int64_t hp = g.hs / 2, ldv = round16(g.hsv), ldk = round16(g.S);
  // Per thread: K^T and V of the batch last seen, packed for the key columns
  // [0, packed) and reused by the next query tiles of that batch (items run
  // batch by batch, longest tile first).
  struct Scratch {
    std::vector<float> s, m, l, alpha, o;
    std::vector<uint16_t> qa, pa;
    std::vector<uint32_t> kt, vv;
    std::vector<int64_t> vis;
    std::vector<uint32_t> row_keys;
    int64_t batch = -1, packed = 0;
    bool amx = false;
    ~Scratch() { release_amx(amx && !kt.empty()); }  // a moved-from Scratch has no kt
  };
  auto make_scratch = [&] {
    Scratch sc;
    sc.amx = amx;
    sc.s.resize(kBq * kBkF);
    sc.m.resize(kBq);
    sc.l.resize(kBq);
    sc.alpha.resize(kBq);
    sc.o.resize(kBq * g.hsv);
    sc.qa.resize(kBq * g.hs);
    sc.pa.resize(kBq * kBkF);
    sc.kt.resize(hp * ldk);
    sc.vv.resize(half_up(g.S) * ldv);
    sc.vis.resize(kBq);
    sc.row_keys.resize(kBq);
    return sc;
  };
  parallel_items(g.BH * nqt, make_scratch, [&](Scratch& sc, int64_t item) {
    const int64_t b = item / nqt;
    const int64_t t0 = (nqt - 1 - item % nqt) * kBq;
    const int64_t nr = std::min(kBq, g.T - t0);
    const int64_t kv_end = g.visible(t0 + nr - 1);
    if (sc.batch != b) {
      sc.batch = b;
      sc.packed = 0;
    }
    // key tiles start at multiples of kBkF, so pack whole tiles (and V by pairs)
    const int64_t need = std::min(g.S, ceil_div(kv_end, kBkF) * kBkF);
    if (need > sc.packed) {
      const int64_t c0 = sc.packed, n = need - c0;  // c0 is a multiple of kBkF: even
      std::vector<uint16_t> tmp(n * std::max<int64_t>(g.hs, g.hsv));
      copy_rows(K, b, c0, n, g.hs, tmp.data());
      // K^T for columns [c0, need): pack into the columns of kt (row stride ldk)
      isa_bf16::bf16_t32(tmp.data(), g.hs, n, g.hs, sc.kt.data() + c0, ldk);
      copy_rows(V, b, c0, n, g.hsv, tmp.data());
      isa_bf16::bf16_vnni(tmp.data(), g.hsv, n, g.hsv, sc.vv.data() + (c0 / 2) * ldv, ldv);
      sc.packed = need;
    }
    float* o = sc.o.data();
    float* s = sc.s.data();
    std::fill(o, o + nr * g.hsv, 0.0f);
    std::fill(sc.m.begin(), sc.m.end(), -std::numeric_limits<float>::infinity());
    std::fill(sc.l.begin(), sc.l.end(), 0.0f);
    if (drop.on) {
      for (int64_t r = 0; r < nr; ++r) sc.row_keys[r] = dropout_row_key(drop.stream, b, t0 + r);
    }
    copy_rows(Q, b, t0, nr, g.hs, sc.qa.data());
    for (int64_t k0 = 0; k0 < kv_end; k0 += kBkF) {
      const int64_t nc = std::min(kBkF, kv_end - k0);
      for (int64_t r = 0; r < nr; ++r) sc.vis[r] = std::min(std::max<int64_t>(g.visible(t0 + r) - k0, 0), nc);
      if (amx) {  // the same pair layouts are brgemm's packed B (checked: amx_layout_ok)
        amx_mm(nr, nc, g.hs, sc.qa.data(), g.hs, sc.kt.data() + k0, ldk, s, kBkF, false);
        scale_rows(s, nr, kBkF, sc.vis.data(), scale);
      } else {
        isa_bf16::gemm_bf16(nr, nc, hp, words(sc.qa.data()), hp, 1, sc.kt.data() + k0, ldk, s, kBkF, scale, false);
      }
      fwd_tile(s, nr, nc, kBkF, sc.vis.data(), sc.m.data(), sc.l.data(), sc.alpha.data());
      if (drop.on) {
        dropout_tile(s, static_cast<float*>(nullptr), nr, nc, kBkF, sc.row_keys.data(), static_cast<uint32_t>(k0),
                     drop.threshold, inv_keep);
      }
      if (k0 > 0) rescale_rows(o, nr, g.hsv, g.hsv, sc.alpha.data());
      isa_bf16::float_rows_to_bf16(s, kBkF, nr, nc, sc.pa.data(), kBkF);  // P, even-padded
      if (amx) {
        amx_mm(nr, g.hsv, 2 * half_up(nc), sc.pa.data(), kBkF, sc.vv.data() + (k0 / 2) * ldv, ldv, o, g.hsv, true);
      } else {
        isa_bf16::gemm_bf16(nr, g.hsv, half_up(nc), words(sc.pa.data()), kBkF / 2, 1, sc.vv.data() + (k0 / 2) * ldv,
                            ldv, o, g.hsv, 1.0f, true);  // O += P V
      }
    }
    finish_rows(o, nr, g.hsv, g.hsv, sc.m.data(), sc.l.data(), lp + b * g.T + t0,
                [&](int64_t r) { return g.sees_none(t0 + r); });
    for (int64_t r = 0; r < nr; ++r) {
      narrow_bf16_row(o + r * g.hsv, reinterpret_cast<uint16_t*>(Out.at(b, t0 + r)), g.hsv);
    }
  });
}

void bwd_bf16dot(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const at::Tensor& out, const at::Tensor& lse, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
                 const Geometry& g, double scale_d, const Dropout& drop) {
  const Rows2D<at::BFloat16> Q(q), K(k), V(v), dO(dout), O(out);
  const float* lp = lse.const_data_ptr<float>();
  const float scale = static_cast<float>(scale_d);
  const int64_t hp = g.hs / 2, vp = g.hsv / 2;
  const int64_t ldq = round16(g.hs), ldo = round16(g.hsv);

  const std::vector<float> D = rowsum_dout_out<at::BFloat16, float>(dO, O, g);
  const int64_t nkt = ceil_div(g.S, kBk);
  const int64_t nchunks = backward_chunks(g);
  at::Tensor dq_acc = at::zeros({nchunks, g.BH, g.T, g.hs}, dq.options().dtype(at::kFloat));
  float* dqp = dq_acc.mutable_data_ptr<float>();
  const OutRows<at::BFloat16> dK(dk), dV(dv);

  // Per thread: the item's batch of Q and dO as contiguous rows (A operands) and
  // in pair layout (B operands), made once per item; per key tile K^T, V^T
  // and K in pair layout; per tile pair the bfloat16 P and dS.
  struct Scratch {
    std::vector<float> s, dp, z, pd, dkt, dvt;
    std::vector<uint16_t> qrows, dorows, kv_rows, dsa;
    std::vector<uint32_t> qvn, dovn, kt, vt, kvn, pdt, dst;
    std::vector<int64_t> vis;
    std::vector<uint32_t> row_keys;
  };
  auto make_scratch = [&] {
    Scratch sc;
    sc.s.resize(kBq * kBk);
    sc.dp.resize(kBq * kBk);
    if (drop.on) {
      sc.z.resize(kBq * kBk);
      sc.pd.resize(kBq * kBk);
    }
    sc.dkt.resize(kBk * g.hs);
    sc.dvt.resize(kBk * g.hsv);
    sc.qrows.resize(g.T * g.hs);
    sc.dorows.resize(g.T * g.hsv);
    sc.kv_rows.resize(kBk * std::max(g.hs, g.hsv));
    sc.dsa.resize(kBq * kBk);
    sc.qvn.resize(half_up(g.T) * ldq);
    sc.dovn.resize(half_up(g.T) * ldo);
    sc.kt.resize(hp * kBk);
    sc.vt.resize(vp * kBk);
    sc.kvn.resize(kBk / 2 * ldq);
    sc.pdt.resize(kBq / 2 * kBk);
    sc.dst.resize(kBq / 2 * kBk);
    sc.vis.resize(kBq);
    sc.row_keys.resize(kBq);
    return sc;
  };
  parallel_items(g.BH * nchunks, make_scratch, [&](Scratch& sc, int64_t item) {
    const int64_t b = item / nchunks, chunk = item % nchunks;
    float* dqb = dqp + (chunk * g.BH + b) * g.T * g.hs;
    float* s = sc.s.data();
    float* dp = sc.dp.data();
    // Q and dO of batch b as rows, and (when every query tile starts at an even
    // row: t_first(k0) = max(0, k0 - shift) with k0 even) in pair layout, once.
    copy_rows(Q, b, 0, g.T, g.hs, sc.qrows.data());
    copy_rows(dO, b, 0, g.T, g.hsv, sc.dorows.data());
    const bool pairs_once = g.shift % 2 == 0;
    if (pairs_once) {
      isa_bf16::bf16_vnni(sc.qrows.data(), g.hs, g.T, g.hs, sc.qvn.data(), ldq);
      isa_bf16::bf16_vnni(sc.dorows.data(), g.hsv, g.T, g.hsv, sc.dovn.data(), ldo);
    }
    for (int64_t i = 0;; ++i) {
      const int64_t kt = chunk_key_tile(i, chunk, nchunks);
      if (kt >= nkt) break;
      const int64_t k0 = kt * kBk, nc = std::min(kBk, g.S - k0);
      float* dkt = sc.dkt.data();
      float* dvt = sc.dvt.data();
      std::fill(dkt, dkt + nc * g.hs, 0.0f);
      std::fill(dvt, dvt + nc * g.hsv, 0.0f);
      copy_rows(K, b, k0, nc, g.hs, sc.kv_rows.data());
      isa_bf16::bf16_t32(sc.kv_rows.data(), g.hs, nc, g.hs, sc.kt.data(), kBk);         // K^T
      isa_bf16::bf16_vnni(sc.kv_rows.data(), g.hs, nc, g.hs, sc.kvn.data(), ldq);       // K
      copy_rows(V, b, k0, nc, g.hsv, sc.kv_rows.data());
      isa_bf16::bf16_t32(sc.kv_rows.data(), g.hsv, nc, g.hsv, sc.vt.data(), kBk);       // V^T
      const int64_t t_first = std::max<int64_t>(0, k0 - g.shift);
      for (int64_t t0 = t_first; t0 < g.T; t0 += kBq) {
        const int64_t nr = std::min(kBq, g.T - t0);
        const uint32_t* qa = words(sc.qrows.data() + t0 * g.hs);
        const uint32_t* doa = words(sc.dorows.data() + t0 * g.hsv);
        // the pair layouts of Q and dO rows [t0, t0 + nr)
        const uint32_t* qvn = sc.qvn.data() + (pairs_once ? t0 / 2 * ldq : 0);
        const uint32_t* dovn = sc.dovn.data() + (pairs_once ? t0 / 2 * ldo : 0);
        if (!pairs_once) {  // t0 may be odd: pair up from t0, per tile
          isa_bf16::bf16_vnni(sc.qrows.data() + t0 * g.hs, g.hs, nr, g.hs, sc.qvn.data(), ldq);
          isa_bf16::bf16_vnni(sc.dorows.data() + t0 * g.hsv, g.hsv, nr, g.hsv, sc.dovn.data(), ldo);
        }
        isa_bf16::gemm_bf16(nr, nc, hp, qa, hp, 1, sc.kt.data(), kBk, s, kBk, scale, false);  // S
        float* z = drop.on ? sc.z.data() : nullptr;
        const float* pdrop = backward_probs(s, nr, nc, g, b, t0, k0, lp + b * g.T + t0, drop, sc.vis.data(),
                                         sc.row_keys.data(), z, sc.pd.data());  // P, dropped
        isa_bf16::float_pairs_t(pdrop, kBk, nr, nc, sc.pdt.data(), kBk);
        isa_bf16::gemm_bf16(nc, g.hsv, half_up(nr), sc.pdt.data(), 1, kBk, dovn, ldo, dvt, g.hsv, 1.0f,
                            true);  // dV += P^T dO
        isa_bf16::gemm_bf16(nr, nc, vp, doa, vp, 1, sc.vt.data(), kBk, dp, kBk, 1.0f, false);  // dP
        bwd_ds_tile(s, dp, z, nr, nc, kBk, D.data() + b * g.T + t0, scale);  // dS, scaled
        isa_bf16::float_rows_to_bf16(dp, kBk, nr, nc, sc.dsa.data(), kBk);
        isa_bf16::gemm_bf16(nr, g.hs, half_up(nc), words(sc.dsa.data()), kBk / 2, 1, sc.kvn.data(), ldq,
                            dqb + t0 * g.hs, g.hs, 1.0f, true);  // dQ += dS K
        isa_bf16::float_pairs_t(dp, kBk, nr, nc, sc.dst.data(), kBk);
        isa_bf16::gemm_bf16(nc, g.hs, half_up(nr), sc.dst.data(), 1, kBk, qvn, ldq, dkt, g.hs, 1.0f,
                            true);  // dK += dS^T Q
      }
      for (int64_t r = 0; r < nc; ++r) {
        narrow_bf16_row(dkt + r * g.hs, reinterpret_cast<uint16_t*>(dK.at(b, k0 + r)), g.hs);
        narrow_bf16_row(dvt + r * g.hsv, reinterpret_cast<uint16_t*>(dV.at(b, k0 + r)), g.hsv);
      }
    }
  });
  reduce_dq_chunks(dq_acc, dq);
}

#if ATTNEXT_AMX_BRGEMM

// The backward on AMX (no dropout): per key tile of 64 keys, per query tile of 64 rows,
// everything computed transposed, so that no product needs a transposed operand built
// per tile pair: S^T = K Q^T and dP^T = V dO^T (A: the key tile's rows as they are,
// B: Q^T and dO^T packed once per batch), then P^T and dS^T elementwise (lse and D
// broadcast along rows), dV += P^T dO and dK += dS^T Q (B: Q and dO packed once per
// batch), dQ^T += K^T dS^T (A: K^T once per key tile, B: dS^T packed per pair), and dQ^T
// transposed into dQ once per item. Query tiles start at multiples of 64 so their
// packed operands are the batch's; rows of a tile that see none of the key tile get
// P = 0.
void bwd_amx(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
             const at::Tensor& out, const at::Tensor& lse, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
             const Geometry& g, double scale_d) {
  namespace cpublas = at::native::cpublas;
  const Rows2D<at::BFloat16> Q(q), K(k), V(v), dO(dout), O(out);
  const float* lp = lse.const_data_ptr<float>();
  const float scale = static_cast<float>(scale_d);
  const std::vector<float> D = rowsum_dout_out<at::BFloat16, float>(dO, O, g);
  const int64_t nkt = ceil_div(g.S, kBk), nchunks = backward_chunks(g);
  at::Tensor dq_acc = at::zeros({nchunks, g.BH, g.T, g.hs}, dq.options().dtype(at::kFloat));
  float* dqp = dq_acc.mutable_data_ptr<float>();
  const OutRows<at::BFloat16> dK(dk), dV(dv);
  static_assert(kBq == 64 && kBk == 64, "the packed blocks below hold 64 columns");
  constexpr int64_t kNB = 64;
  const auto r16 = [](int64_t n) { return (n + 15) / 16 * 16; };
  const auto even = [](int64_t n) { return n + (n & 1); };
  const int64_t nqt = ceil_div(g.T, kBq), Tp = nqt * kBq;
  const int64_t hs16 = r16(g.hs), hsv16 = r16(g.hsv), nhb = ceil_div(g.hs, kNB), nvb = ceil_div(g.hsv, kNB);
  const int64_t qt_sz = g.hs * kBq, dot_sz = g.hsv * kBq, qp_sz = nhb * kBq * kNB, dop_sz = nvb * kBq * kNB;
  const at::BFloat16 zero(0.0f);
  struct Scratch {
    std::vector<at::BFloat16> tmp, qT, dOT, qP, dOP, krows, vrows, kT, pT, dsT, dsTP;
    std::vector<float> st, dpt, dkacc, dvacc, dqT;
    std::vector<int64_t> visr;
    ~Scratch() {
      if (!qT.empty()) at::native::cpublas::brgemm_release();
    }
  };
  auto make_scratch = [&] {
    Scratch sc;
    sc.tmp.resize(std::max(std::max(g.hs, g.hsv) * Tp, Tp * std::max(hs16, hsv16)));
    sc.qT.resize(nqt * qt_sz);
    sc.dOT.resize(nqt * dot_sz);
    sc.qP.resize(nqt * qp_sz);
    sc.dOP.resize(nqt * dop_sz);
    sc.krows.resize(kBk * g.hs);
    sc.vrows.resize(kBk * g.hsv);
    sc.kT.resize(g.hs * kBk);
    sc.pT.resize(kBk * kBq);
    sc.dsT.resize(kBk * kBq);
    sc.dsTP.resize(kBk * kBq);
    sc.st.resize(kBk * kBq);
    sc.dpt.resize(kBk * kBq);
    sc.dkacc.resize(kBk * g.hs);
    sc.dvacc.resize(kBk * g.hsv);
    sc.dqT.resize(g.hs * Tp);
    sc.visr.resize(kBq);
    return sc;
  };
  // X (rows of one batch, width w) packed per query tile: transposed (K = w, N = the
  // tile's rows) into xT, and as rows (K = the tile's rows, N = blocks of 64 of w) into xP
  auto pack_batch = [&](Scratch& sc, const Rows2D<at::BFloat16>& X, int64_t b, int64_t w, int64_t w16,
                        at::BFloat16* xT, int64_t t_sz, at::BFloat16* xP, int64_t p_sz) {
    at::BFloat16* t = sc.tmp.data();
    for (int64_t d = 0; d < w; ++d) std::fill(t + d * Tp + g.T, t + (d + 1) * Tp, zero);
    isa_amx::bf16_transpose(reinterpret_cast<const uint16_t*>(X.at(b, 0)), X.ld, g.T, w,
                            reinterpret_cast<uint16_t*>(t), Tp);
    for (int64_t i = 0; i < nqt; ++i) {
      const int64_t n16 = r16(std::min(kBq, g.T - i * kBq));
      cpublas::pack(w, n16, Tp, n16, at::kBFloat16, at::kBFloat16, t + i * kBq, xT + i * t_sz);
    }
    for (int64_t r = 0; r < Tp; ++r) {
      at::BFloat16* row = t + r * w16;
      if (r < g.T) {
        std::memcpy(row, X.at(b, r), sizeof(at::BFloat16) * w);
        std::fill(row + w, row + w16, zero);
      } else {
        std::fill(row, row + w16, zero);
      }
    }
    for (int64_t i = 0; i < nqt; ++i) {
      const int64_t ke = even(std::min(kBq, g.T - i * kBq));
      for (int64_t c = 0; c < w; c += kNB) {
        const int64_t n16 = r16(std::min(kNB, w - c));
        cpublas::pack(ke, n16, w16, n16, at::kBFloat16, at::kBFloat16, t + i * kBq * w16 + c,
                      xP + i * p_sz + (c / kNB) * kBq * kNB);
      }
    }
  };
  parallel_items(g.BH * nchunks, make_scratch, [&](Scratch& sc, int64_t item) {
    const int64_t b = item / nchunks, chunk = item % nchunks;
    pack_batch(sc, Q, b, g.hs, hs16, sc.qT.data(), qt_sz, sc.qP.data(), qp_sz);
    pack_batch(sc, dO, b, g.hsv, hsv16, sc.dOT.data(), dot_sz, sc.dOP.data(), dop_sz);
    std::fill(sc.dqT.begin(), sc.dqT.end(), 0.0f);
    const float* lse_b = lp + b * g.T;
    const float* D_b = D.data() + b * g.T;
    for (int64_t i = 0;; ++i) {
      const int64_t kt = chunk_key_tile(i, chunk, nchunks);
      if (kt >= nkt) break;
      const int64_t k0 = kt * kBk, nc = std::min(kBk, g.S - k0), nce = even(nc);
      for (int64_t r = 0; r < nc; ++r) {
        std::memcpy(sc.krows.data() + r * g.hs, K.at(b, k0 + r), sizeof(at::BFloat16) * g.hs);
        std::memcpy(sc.vrows.data() + r * g.hsv, V.at(b, k0 + r), sizeof(at::BFloat16) * g.hsv);
      }
      at::BFloat16* kT = sc.kT.data();  // (hs, 64), zero past nc
      for (int64_t d = 0; d < g.hs; ++d) std::fill(kT + d * kBk + nc, kT + (d + 1) * kBk, zero);
      isa_amx::bf16_transpose(reinterpret_cast<const uint16_t*>(sc.krows.data()), g.hs, nc, g.hs,
                              reinterpret_cast<uint16_t*>(kT), kBk);
      std::fill(sc.dkacc.begin(), sc.dkacc.end(), 0.0f);
      std::fill(sc.dvacc.begin(), sc.dvacc.end(), 0.0f);
      const int64_t t_first = first_query(g, k0) / kBq * kBq;
      for (int64_t t0 = t_first; t0 < g.T; t0 += kBq) {
        const int64_t ti = t0 / kBq, nr = std::min(kBq, g.T - t0), nr16 = r16(nr), nre = even(nr);
        float* st = sc.st.data();
        float* dpt = sc.dpt.data();
        cpublas::brgemm(nc, nr16, g.hs, g.hs, nr16, kBq, false, sc.krows.data(), sc.qT.data() + ti * qt_sz, st);
        cpublas::brgemm(nc, nr16, g.hsv, g.hsv, nr16, kBq, false, sc.vrows.data(), sc.dOT.data() + ti * dot_sz,
                        dpt);
        // P^T = exp(S^T scale - lse) where row t sees key k0 + c, else 0, and dS^T = P^T (dP^T - D)
        // scale, both straight to bfloat16 (0 in the lanes past nr)
        int64_t* visr = sc.visr.data();
        for (int64_t r = 0; r < nr; ++r) visr[r] = std::min(std::max<int64_t>(g.visible(t0 + r) - k0, 0), nc);
        isa_amx::amx_bwd_pds_tile(st, dpt, nc, nr, nr16, kBq, visr, lse_b + t0, D_b + t0, scale,
                                  reinterpret_cast<uint16_t*>(sc.pT.data()), reinterpret_cast<uint16_t*>(sc.dsT.data()),
                                  kBq);
        if (nce > nc) std::fill(sc.dsT.data() + nc * kBq, sc.dsT.data() + nc * kBq + nr16, zero);
        for (int64_t c = 0; c < g.hsv; c += kNB) {  // dV += P^T dO
          const int64_t w = std::min(kNB, g.hsv - c);
          cpublas::brgemm(nc, w, nre, kBq, r16(w), g.hsv, true, sc.pT.data(),
                          sc.dOP.data() + ti * dop_sz + (c / kNB) * kBq * kNB, sc.dvacc.data() + c);
        }
        for (int64_t c = 0; c < g.hs; c += kNB) {  // dK += dS^T Q
          const int64_t w = std::min(kNB, g.hs - c);
          cpublas::brgemm(nc, w, nre, kBq, r16(w), g.hs, true, sc.dsT.data(),
                          sc.qP.data() + ti * qp_sz + (c / kNB) * kBq * kNB, sc.dkacc.data() + c);
        }
        // dQ^T += K^T dS^T
        cpublas::pack(nce, nr16, kBq, nr16, at::kBFloat16, at::kBFloat16, sc.dsT.data(), sc.dsTP.data());
        cpublas::brgemm(g.hs, nr16, nce, kBk, nr16, Tp, true, kT, sc.dsTP.data(), sc.dqT.data() + t0);
      }
      for (int64_t r = 0; r < nc; ++r) {
        narrow_bf16_row(sc.dkacc.data() + r * g.hs, reinterpret_cast<uint16_t*>(dK.at(b, k0 + r)), g.hs);
        narrow_bf16_row(sc.dvacc.data() + r * g.hsv, reinterpret_cast<uint16_t*>(dV.at(b, k0 + r)), g.hsv);
      }
    }
    float* dqb = dqp + (chunk * g.BH + b) * g.T * g.hs;
    transpose_block(sc.dqT.data(), Tp, g.hs, g.T, dqb, g.hs);
  });
  reduce_dq_chunks(dq_acc, dq);
}
#endif

#if ATTNEXT_AMX_BRGEMM
// The forward on AMX without dropout. The algorithm of fwd_bf16dot, with fewer passes:
// Q is brgemm's A in place (its row stride as lda), K^T and V are packed straight from
// their rows into the pair layouts (brgemm's packed B; amx_layout_ok), once per batch
// and thread; the scale rides in the exponent and P is written as bfloat16 by the
// softmax step itself (isa_amx::amx_softmax_tile); the first key tile's P V is stored,
// not added, so O needs no clearing, and only a grown max rescales O; the output rows
// are divided by l and rounded in one pass. With at least 4 batches per thread an item
// is a whole batch (every query tile, longest first), so K and V are packed once per
// batch; otherwise an item is one query tile, longest first, as in fwd_bf16dot.
void fwd_amx(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out, at::Tensor& lse,
             const Geometry& g, double scale_d) {
  const Rows2D<at::BFloat16> Q(q), K(k), V(v);
  const OutRows<at::BFloat16> Out(out);
  float* lp = lse.mutable_data_ptr<float>();
  const float scale = static_cast<float>(scale_d);
  // brgemm has no alpha: a scale <= 0 (allowed, if odd) reverses or flattens the row
  // max, so it is applied to the scores first and the softmax step gets 1.
  const bool fold = scale > 0.0f;
  // query rows per tile: 128 for long rows, where each tile streams K^T and V from L2
  // (measured: about 6% faster at T = 2048 on an AMX Xeon); 64 below
  const int64_t bq = g.T >= 1024 ? 2 * kBq : kBq;
  const int64_t nqt = ceil_div(g.T, bq);
  const int64_t ldv = round16(g.hsv), ldk = round16(g.S);
  const int64_t per = g.BH >= 4 * std::max<int64_t>(1, at::get_num_threads()) ? nqt : 1;
  const int64_t groups = ceil_div(nqt, per);
  struct Scratch {
    std::vector<float> s, m, l, alpha, o;
    std::vector<uint16_t> pa;
    std::vector<uint32_t> kt, vv;
    std::vector<int64_t> vis;
    int64_t batch = -1, packed = 0;
    ~Scratch() { release_amx(!kt.empty()); }  // a moved-from Scratch has no kt
  };
  auto make_scratch = [&] {
    Scratch sc;
    sc.s.resize(bq * kBkF);
    sc.m.resize(bq);
    sc.l.resize(bq);
    sc.alpha.resize(bq);
    sc.o.resize(bq * g.hsv);
    sc.pa.resize(bq * kBkF);
    sc.kt.resize(g.hs / 2 * ldk);
    sc.vv.resize(half_up(g.S) * ldv);
    sc.vis.resize(bq);
    return sc;
  };
  parallel_items(g.BH * groups, make_scratch, [&](Scratch& sc, int64_t item) {
    const int64_t b = item / groups, group = groups - 1 - item % groups;
    if (sc.batch != b) {
      sc.batch = b;
      sc.packed = 0;
    }
    for (int64_t tile = std::min(nqt, (group + 1) * per) - 1; tile >= group * per; --tile) {
      const int64_t t0 = tile * bq, nr = std::min(bq, g.T - t0);
      const int64_t kv_end = g.visible(t0 + nr - 1);
      // key tiles start at multiples of kBkF: pack whole tiles (V by pairs)
      const int64_t need = std::min(g.S, ceil_div(kv_end, kBkF) * kBkF);
      if (need > sc.packed) {
        const int64_t c0 = sc.packed, n = need - c0;  // c0 is a multiple of kBkF: even
        isa_bf16::bf16_t32(reinterpret_cast<const uint16_t*>(K.at(b, c0)), K.ld, n, g.hs, sc.kt.data() + c0, ldk);
        isa_bf16::bf16_vnni(reinterpret_cast<const uint16_t*>(V.at(b, c0)), V.ld, n, g.hsv,
                            sc.vv.data() + (c0 / 2) * ldv, ldv);
        sc.packed = need;
      }
      float* o = sc.o.data();
      float* s = sc.s.data();
      std::fill(sc.m.begin(), sc.m.end(), -std::numeric_limits<float>::infinity());
      std::fill(sc.l.begin(), sc.l.end(), 0.0f);
      for (int64_t k0 = 0; k0 < kv_end; k0 += kBkF) {
        const int64_t nc = std::min(kBkF, kv_end - k0);
        for (int64_t r = 0; r < nr; ++r) sc.vis[r] = std::min(std::max<int64_t>(g.visible(t0 + r) - k0, 0), nc);
        amx_mm(nr, nc, g.hs, Q.at(b, t0), Q.ld, sc.kt.data() + k0, ldk, s, kBkF, false);
        if (!fold) scale_rows(s, nr, kBkF, sc.vis.data(), scale);
        isa_amx::amx_softmax_tile(s, nr, nc, kBkF, sc.vis.data(), fold ? scale : 1.0f, sc.m.data(), sc.l.data(),
                                  sc.alpha.data(), sc.pa.data(), kBkF);
        if (k0 > 0) isa_amx::amx_rescale_rows(o, nr, g.hsv, g.hsv, sc.alpha.data());
        amx_mm(nr, g.hsv, nc + (nc & 1), sc.pa.data(), kBkF, sc.vv.data() + (k0 / 2) * ldv, ldv, o, g.hsv,
               k0 > 0);  // O (+)= P V
      }
      for (int64_t r = 0; r < nr; ++r) {
        isa_amx::amx_finish_row(o + r * g.hsv, g.hsv, sc.m[r], sc.l[r], kv_end == 0 || g.sees_none(t0 + r),
                                reinterpret_cast<uint16_t*>(Out.at(b, t0 + r)), lp + b * g.T + t0 + r);
      }
    }
  });
}
#endif

// Whether the bfloat16 fast path applies: the CPU has the instructions, head
// sizes are even (whole pairs) and row strides fit the gather's 32-bit offsets.
bool use_bf16dot(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Geometry& g) {
  if (q.scalar_type() != at::kBFloat16 || !simd::bf16_dot_available()) return false;
  if (!g.causal()) return false;  // other windows: the widening tiles (mask_window_start, first_query)
  if (g.hs % 2 != 0 || g.hsv % 2 != 0) return false;
  for (const at::Tensor* t : {&q, &k, &v}) {
    if (t->size(-2) > 1 && t->stride(-2) >= (int64_t(1) << 27)) return false;
  }
  return true;
}
#endif

// ---- argument checks and preparation

void check_input(const at::Tensor& t, const char* name, const char* shape) {
  check_strided(t, name);
  TORCH_CHECK(t.device().is_cpu(), "attnext: ", name, " must be a CPU tensor for the CPU kernel, got ", t.device());
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16, "attnext: ", name,
              " must be float32, float64 or bfloat16 for the CPU causal_attention kernel, got ", st);
  check_min_dim(t, 2, name, shape);
}

// Rows the kernel can read in place: unit-stride last dim and a row stride that
// is a valid BLAS leading dimension; anything else is copied.
at::Tensor prepare(const at::Tensor& t) {
  at::Tensor r = t;
  const int64_t d = r.size(-1);
  const bool unit = d <= 1 || r.stride(-1) == 1;
  const bool ld_ok = r.size(-2) <= 1 || (r.stride(-2) >= std::max<int64_t>(d, 1) && r.stride(-2) <= INT32_MAX);
  if (!unit || !ld_ok) {
    r = r.contiguous();
  }
  return r;
}

Geometry check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale, double dropout_p,
                   bool bottom_right, int64_t window_left, int64_t window_right) {
  const Geometry g = check_attention_args(q, k, v, scale, dropout_p, bottom_right, window_left, window_right);
  check_input(q, "q", "(..., T, hs)");
  check_input(k, "k", "(..., S, hs)");
  check_input(v, "v", "(..., S, hs_v)");
  return g;
}

at::ScalarType compute_type(at::ScalarType st) { return st == at::kDouble ? at::kDouble : at::kFloat; }

// The forward into given outputs: out (..., T, hs_v) with unit-stride rows (a
// contiguous tensor or a view of one), lse (..., T) contiguous in the compute type.
void forward_native(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, at::Tensor& out,
                    at::Tensor& lse, const Geometry& g, double scale, double dropout_p, const DropoutSeed& ds) {
  const at::Tensor q = prepare(q_in), k = prepare(k_in), v = prepare(v_in);
  if (decode_applies(q, g, dropout_p)) {  // a few rows against many keys: causal_attention_decode.cpp
    decode_forward(q, k, v, out, lse, g, scale);
    return;
  }
  const Dropout drop(dropout_p, ds.seed, ds.offset);
#if ATTNEXT_BF16_TILES
  if (use_bf16dot(q, k, v, g)) {
#if ATTNEXT_AMX_BRGEMM
    if (!drop.on && amx_available()) {
      fwd_amx(q, k, v, out, lse, g, scale);
      return;
    }
#endif
    fwd_bf16dot(q, k, v, out, lse, g, scale, drop, amx_available());
    return;
  }
#endif
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "causal_attention_cpu",
                                 [&] { fwd_impl<scalar_t>(q, k, v, out, lse, g, scale, drop); });
}

#if ATTNEXT_AMX_BRGEMM
// Whether the AMX backward beats the AVX512-BF16 tiles: it pads every query tile to
// 64 rows and packs each batch's rows whole, a fixed cost per batch and key tile that
// a few rows do not repay. Measured on the Intel Xeon (2 threads, torch 2.13, bf16
// backward, AMX against AVX512-BF16): T = 1, S = 1, 32 heads of 128 448 us against
// 66; T = 8, S = 8, 256 heads of 64 2087 against 441; T = 1, S = 1024 4249 against
// 2936; T = 4, S = 4096 3935 against 3428; T = 8, S = 256 858 against 704; T = 16,
// S = 64 394 against 304; but T = 16, S = 256 1345 against 1733, T = 16, S = 1024 4342
// against 6331, and T = 8, S = 1024 or T = 12, S = 512 within 6%. Above the decode
// pass's rows, AMX throughout.
bool amx_backward_pays(const Geometry& g) {
  return g.T > kDecodeMaxRows || (g.T >= 8 && g.T * g.S > 2048);
}
#endif

// The backward into given outputs dq, dk, dv shaped like q, k, v, with unit-stride
// rows (contiguous tensors or views of one).
void backward_native(const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in,
                     const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse_in, at::Tensor& dq,
                     at::Tensor& dk, at::Tensor& dv, const Geometry& g, double scale, double dropout_p,
                     const DropoutSeed& ds) {
  const at::Tensor q = prepare(q_in), k = prepare(k_in), v = prepare(v_in);
  const at::Tensor dout = prepare(grad_out_in), out = prepare(out_in);
  const at::Tensor lse = lse_in.contiguous();
  const Dropout drop(dropout_p, ds.seed, ds.offset);
#if ATTNEXT_BF16_TILES
  if (use_bf16dot(q, k, v, g)) {
#if ATTNEXT_AMX_BRGEMM
    if (!drop.on && amx_available() && amx_backward_pays(g)) {
      bwd_amx(dout, q, k, v, out, lse, dq, dk, dv, g, scale);
      return;
    }
#endif
    bwd_bf16dot(dout, q, k, v, out, lse, dq, dk, dv, g, scale, drop);
    return;
  }
#endif
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "causal_attention_backward_cpu",
                                 [&] { bwd_impl<scalar_t>(dout, q, k, v, out, lse, dq, dk, dv, g, scale, drop); });
}

// How kernel_choice's verdicts (and so attnext.explain) name attnext's tiles for a
// call: the bfloat16 dot-product tiles by their instructions, AMX where it runs them.
std::string own_tiles_name(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Geometry& g) {
#if ATTNEXT_BF16_TILES
  if (use_bf16dot(q, k, v, g)) {
    if (amx_available()) return "attnext tiles (AMX brgemm)";
#if ATTNEXT_X86_SIMD
    return "attnext tiles (AVX512-BF16 dot products)";
#else
    return "attnext tiles (Arm BF16 dot products, BFDOT)";
#endif
  }
#endif
  return "attnext tiles";
}

// ---- ATen's flash attention as the other kernel, chosen by measurement
//
// torch's own CPU flash attention (at::_scaled_dot_product_flash_attention_for_cpu
// and its backward) computes the same (out, lse) contract. Where the CPU has AMX,
// ATen runs bfloat16 tiles on it and beats attnext's AVX512-BF16 tiles by a wide
// margin; elsewhere attnext's tiles win (on AArch64, its BFDOT or widened tiles against
// ATen's NEON kernels: not measured on hardware yet, so nothing is assumed there either).
// So, per pass, dtype and head-size class, both are timed at first use
// (kernel_choice.h) and the faster runs. Only calls ATen
// can compute exactly take part: no dropout (attnext's mask is its own hash), the
// causal window (top-left alignment or T == S; bottom-right with T < S and T x S
// at most 2^24 goes with a boolean mask: chunked prefill) or the full window (every
// key, ATen without is_causal: its own class), T above the decode pass's rows,
// q/k/v of at most 4 dims without stride-0 batch dims (grouped-query views), hs ==
// hs_v, float32 or bfloat16, finite inputs. ATTNEXT_ATTENTION_KERNEL=0 forces ATen
// where it can run, =1 attnext's kernels.

// The (..., T, hs) tensor as a 4-D (B, H, T, hs) view for ATen's kernel, whose
// outputs are laid out (B, T, H, .). `flat`: every batch dim folded into B and H = 1
// where a view can do it (always for at most 3 dims), so that layout is the contiguous
// (..., T, .) attnext returns and the results are used without a copy; otherwise the
// leading dims are kept (the packed layout (..., T, nh, hs) is then ATen's own).
at::Tensor as4d(const at::Tensor& t, bool flat) {
  if (flat && t.dim() <= 3) return t.dim() == 3 ? t.unsqueeze(1) : t.view({1, 1, t.size(0), t.size(1)});
  if (flat) {
    const std::vector<int64_t> shape{t.size(0) * t.size(1), 1, t.size(2), t.size(3)};
    if (at::detail::computeStride(t.sizes(), t.strides(), shape)) return t.view(shape);
  }
  at::Tensor r = t;
  while (r.dim() < 4) r = r.unsqueeze(0);
  return r;
}

// Whether all of q, k, v (and the backward's extra tensors) fold flat: one decision
// for them all, so their 4-D shapes agree.
bool folds_flat(std::initializer_list<const at::Tensor*> ts) {
  for (const at::Tensor* t : ts) {
    if (t->dim() == 4 && t->size(0) > 1 && t->size(1) > 1 && t->stride(0) != t->size(1) * t->stride(1)) return false;
  }
  return true;
}

// ATen's result `r` reshaped to `sizes`: itself where that is a contiguous view (no
// copy), else copied into a fresh contiguous output.
at::Tensor adopt(const at::Tensor& r, at::IntArrayRef sizes) {
  at::Tensor v = r.reshape(sizes);
  if (v.is_contiguous()) return v;
  at::Tensor out = empty_output(sizes, r.options());
  out.copy_(v);
  return out;
}

// Every key for every query (window (-1, -1), the SDPA signature's unmasked calls):
// ATen's kernel without is_causal, whatever the alignment.
bool full_window(const Geometry& g) { return g.wl < 0 && g.wr < 0; }

bool aten_can_run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Geometry& g,
                  double dropout_p) {
  const auto st = q.scalar_type();
  if (st != at::kFloat && st != at::kBFloat16) return false;
  const bool full = full_window(g);
  if (dropout_p != 0.0 || !(g.causal() || full) || g.T <= kDecodeMaxRows || g.hs != g.hsv) return false;
  if (q.dim() > 4 || g.S == 0) return false;
  // bottom-right with T != S (chunked prefill) goes to ATen with a (T, S) mask: small ones only
  if (!full && g.shift != 0 && (g.shift < 0 || g.T * g.S > (int64_t(1) << 24))) return false;
  for (const at::Tensor* t : {&k, &v}) {
    for (int64_t d = 0; d < t->dim() - 2; ++d) {
      if (t->size(d) > 1 && t->stride(d) == 0) return false;
    }
  }
  return true;
}

// ATen's kernel treats a row whose scores are all -inf (output 0, lse 0) or NaN
// differently from torch.softmax, which attnext's kernels follow (NaN rows). Such
// rows show in the logsumexp, non-finite or exactly 0 (which a row of finite scores
// almost never is): checked on lse (BH x T floats, nothing beside the attention),
// and the call rerun on attnext's kernels when one is found.
bool lse_plain(const at::Tensor& lse) {
  const at::Tensor l = lse.contiguous();
  const float* p = l.data_ptr<float>();
  const int64_t n = l.numel();
  bool plain = true;
  for (int64_t i = 0; i < n; ++i) plain &= std::isfinite(p[i]) && p[i] != 0.0f;
  return plain;
}

// ATen's mask for a bottom-right call with T != S (ATen's is_causal is top-left):
// (T, S) in the inputs' dtype (which ATen requires), 0 where a row sees the key and
// -inf where it does not. None for top-left calls.
std::optional<at::Tensor> aten_mask(const Geometry& g, at::ScalarType st) {
  if (g.shift == 0 || full_window(g)) return std::nullopt;
  const at::Tensor hidden = at::ones({g.T, g.S}, at::TensorOptions().dtype(at::kBool)).triu(g.shift + 1);
  return at::zeros({g.T, g.S}, at::TensorOptions().dtype(st)).masked_fill_(hidden, -INFINITY);
}

// ATen's is_causal for a call it can run: top-left causal (or T == S); a bottom-right
// call with T != S goes with aten_mask instead, the full window with neither.
bool aten_causal(const Geometry& g) { return !full_window(g) && g.shift == 0; }

// Whether this pass runs ATen's kernel: measured once per (pass, dtype, head-size
// class, length class, mask or full window). The probe is one workload of the class: 4 heads of 256
// queries and keys for T <= 256, two heads of 1024 above; a bottom-right call (ATen
// with a mask) probes half as many queries against those keys (a few ms, once).
bool use_aten(bool backward, at::ScalarType st, const Geometry& call) {
  static const int forced = kernel_override("ATTNEXT_ATTENTION_KERNEL");
  const int64_t cls = call.hs <= 32 ? 32 : call.hs <= 64 ? 64 : call.hs <= 128 ? 128 : 256;
  const bool long_rows = call.T > 256, full = full_window(call), masked = !full && call.shift != 0;
  const std::string what = std::string("attention ") + (backward ? "backward" : "forward") + ", " +
                           (st == at::kBFloat16 ? "bfloat16" : "float32") + ", head size <= " + std::to_string(cls) +
                           (long_rows ? ", T > 256" : ", T <= 256") +
                           (full ? ", full window" : masked ? ", bottom-right T != S" : "");
  if (const KernelChoice* known = find_kernel(what)) return !known->own;
  const int64_t heads = long_rows ? 2 : 4, len = long_rows ? 1024 : 256, rows = masked ? len / 2 : len;
  auto opts = at::TensorOptions().dtype(st);
  auto gen = [&](double salt, int64_t n) {
    return at::arange(heads * n * cls, opts.dtype(at::kFloat)).mul_(0.37 + 0.01 * salt).sin_().to(st).view(
        {1, heads, n, cls});
  };
  const at::Tensor q = gen(1, rows), k = gen(2, len), v = gen(3, len), go = gen(4, rows);
  const double scale = 1.0 / std::sqrt(static_cast<double>(cls));
  const Geometry g = check_attention_args(q, k, v, scale, 0.0, masked, -1, full ? -1 : 0);
  const std::optional<at::Tensor> mask = aten_mask(g, st);
  const bool causal = aten_causal(g);
  at::Tensor out = at::empty_like(q), lse = at::empty({1, heads, rows}, opts.dtype(at::kFloat));
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  const DropoutSeed ds{};
  forward_native(q, k, v, out, lse, g, scale, 0.0, ds);
  std::function<void()> own, lib;
  if (backward) {
    own = [=]() mutable { backward_native(go, q, k, v, out, lse, dq, dk, dv, g, scale, 0.0, ds); };
    lib = [=] {
      at::_scaled_dot_product_flash_attention_for_cpu_backward(go, q, k, v, out, lse, 0.0, causal, mask, scale);
    };
  } else {
    own = [=]() mutable { forward_native(q, k, v, out, lse, g, scale, 0.0, ds); };
    lib = [=] { at::_scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, mask, scale); };
  }
  return !choose_kernel(what, own_tiles_name(q, k, v, g), "ATen flash attention", own, lib, forced).own;
}

// ATen's forward where it can run and is chosen and its logsumexp is plain: (out,
// lse) in ATen's 4-D shapes (as4d with `flat`), else nothing (attnext's kernels run).
std::optional<std::tuple<at::Tensor, at::Tensor>> aten_forward(const at::Tensor& q, const at::Tensor& k,
                                                                const at::Tensor& v, const Geometry& g, double scale,
                                                                double dropout_p, bool flat) {
  if (g.BH * g.T == 0 || !aten_can_run(q, k, v, g, dropout_p) || !use_aten(false, q.scalar_type(), g)) return {};
  flat = flat && folds_flat({&q, &k, &v});
  auto [o, l] = at::_scaled_dot_product_flash_attention_for_cpu(as4d(q, flat), as4d(k, flat), as4d(v, flat), 0.0,
                                                                aten_causal(g), aten_mask(g, q.scalar_type()), scale);
  if (!lse_plain(l)) return {};
  return std::make_tuple(std::move(o), std::move(l));
}

// attnext's backward kernels; empty problems give zero gradients.
void backward_into(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& out, const at::Tensor& lse, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
                   const Geometry& g, double scale, double dropout_p, const DropoutSeed& ds) {
  if (g.BH * g.T == 0 || g.BH * g.S == 0) {
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return;
  }
  backward_native(grad_out, q, k, v, out, lse, dq, dk, dv, g, scale, dropout_p, ds);
}

// ATen's backward on the same terms: (dq, dk, dv) in ATen's 4-D shapes, or nothing.
std::optional<std::tuple<at::Tensor, at::Tensor, at::Tensor>> aten_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const Geometry& g, double scale, double dropout_p, bool flat) {
  if (g.BH * g.T == 0 || g.BH * g.S == 0) return {};
  if (!aten_can_run(q, k, v, g, dropout_p) || !lse_plain(lse) || !use_aten(true, q.scalar_type(), g)) return {};
  flat = flat && folds_flat({&q, &k, &v, &grad_out, &out});
  const at::Tensor q4 = as4d(q, flat);
  const at::Tensor lse4 = lse.reshape(q4.sizes().slice(0, 3));
  return at::_scaled_dot_product_flash_attention_for_cpu_backward(as4d(grad_out, flat), q4, as4d(k, flat),
                                                                  as4d(v, flat), as4d(out, flat), lse4, 0.0,
                                                                  aten_causal(g), aten_mask(g, q.scalar_type()), scale);
}

// The checks of the backward's extra inputs: grad_out and out shaped (..., T, hs_v)
// like q's batch, lse (..., T) in the compute type.
void check_backward_inputs(const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& lse,
                           const at::Tensor& q, const Geometry& g) {
  check_input(grad_out, "grad_out", "(..., T, hs_v)");
  check_input(out, "out", "(..., T, hs_v)");
  check_same(q, "q", grad_out, "grad_out");
  check_same(q, "q", out, "out");
  std::vector<int64_t> out_sizes = q.sizes().vec();
  out_sizes.back() = g.hsv;
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(out_sizes), "attnext: grad_out must have shape ",
              at::IntArrayRef(out_sizes), ", got ", grad_out.sizes());
  TORCH_CHECK(out.sizes() == at::IntArrayRef(out_sizes), "attnext: out must have shape ", at::IntArrayRef(out_sizes),
              ", got ", out.sizes());
  const at::ScalarType ct = compute_type(q.scalar_type());
  TORCH_CHECK(lse.device().is_cpu() && lse.scalar_type() == ct, "attnext: lse must be a CPU ", ct, " tensor, got ",
              lse.scalar_type(), " on ", lse.device());
  TORCH_CHECK(lse.sizes() == q.sizes().slice(0, q.dim() - 1), "attnext: lse must have shape ",
              q.sizes().slice(0, q.dim() - 1), ", got ", lse.sizes());
}

}  // namespace

std::function<void()> attention_forward_probe(int64_t hs, bool own, bool prefill) {
  const int64_t heads = prefill ? 4 : 8, rows = prefill ? 128 : 256, len = prefill ? 1024 : 256;
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  auto gen = [&](double salt, int64_t n) {
    return at::arange(heads * n * hs, opts).mul_(0.37 + 0.01 * salt).sin_().view({1, heads, n, hs});
  };
  const at::Tensor q = gen(1, rows), k = gen(2, len), v = gen(3, len);
  const double scale = 1.0 / std::sqrt(static_cast<double>(hs));
  const Geometry g = check_attention_args(q, k, v, scale, 0.0, prefill);
  at::Tensor out = at::empty_like(q), lse = at::empty({1, heads, rows}, opts);
  const Dropout drop(0.0, 0, 0);
  return [=]() mutable { fwd_impl<float>(q, k, v, out, lse, g, scale, drop, own ? 1 : 0); };
}

std::tuple<at::Tensor, at::Tensor> causal_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                        double scale, double dropout_p, bool bottom_right,
                                                        int64_t seed, int64_t offset,
                                                        const std::optional<at::Tensor>& rng, int64_t window_left,
                                                        int64_t window_right) {
  const Geometry g = check_qkv(q, k, v, scale, dropout_p, bottom_right, window_left, window_right);
  // out: (..., T, hs_v) in the input dtype; lse: (..., T) in the compute dtype
  std::vector<int64_t> out_sizes = q.sizes().vec();
  out_sizes.back() = g.hsv;
  std::vector<int64_t> lse_sizes(q.sizes().begin(), q.sizes().end() - 1);
  if (auto r = aten_forward(q, k, v, g, scale, dropout_p, /*flat=*/true)) {
    return {adopt(std::get<0>(*r), out_sizes), std::get<1>(*r).reshape(lse_sizes)};
  }
  at::Tensor out = empty_output(out_sizes, q.options());
  at::Tensor lse = at::empty(lse_sizes, q.options().dtype(compute_type(q.scalar_type())));
  if (lse.numel() != 0) forward_native(q, k, v, out, lse, g, scale, dropout_p, host_dropout_seed(seed, offset, rng));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, double scale, double dropout_p, bool bottom_right, int64_t seed, int64_t offset,
    const std::optional<at::Tensor>& rng, int64_t window_left, int64_t window_right) {
  const Geometry g = check_qkv(q, k, v, scale, dropout_p, bottom_right, window_left, window_right);
  check_backward_inputs(grad_out, out, lse, q, g);
  if (auto r = aten_backward(grad_out, q, k, v, out, lse, g, scale, dropout_p, /*flat=*/true)) {
    return {adopt(std::get<0>(*r), q.sizes()), adopt(std::get<1>(*r), k.sizes()), adopt(std::get<2>(*r), v.sizes())};
  }
  at::Tensor dq = empty_output(q.sizes(), q.options());
  at::Tensor dk = empty_output(k.sizes(), q.options());
  at::Tensor dv = empty_output(v.sizes(), q.options());
  backward_into(grad_out, q, k, v, out, lse, dq, dk, dv, g, scale, dropout_p, host_dropout_seed(seed, offset, rng));
  return {dq, dk, dv};
}

// ---- the packed layout: qkv (..., T, 3, nh, hs) -> out (..., T, nh, hs)
//
// The same kernels over the (..., nh, T, hs) views of q, k, v inside qkv; out and
// dqkv are written in the packed layouts directly, so a module that projects x to
// one (B, T, 3C) tensor needs no split gradients to be concatenated and no
// transposed copy of the output.

std::tuple<at::Tensor, at::Tensor> causal_attention_qkvpacked_cpu(const at::Tensor& qkv, double scale,
                                                                  double dropout_p, bool bottom_right, int64_t seed,
                                                                  int64_t offset, const std::optional<at::Tensor>& rng,
                                                                  int64_t window_left, int64_t window_right) {
  check_qkvpacked(qkv, "qkv");
  const auto [q, k, v] = unpack_qkv(qkv);  // 3 x (..., nh, T, hs) views
  const Geometry g = check_qkv(q, k, v, scale, dropout_p, bottom_right, window_left, window_right);
  std::vector<int64_t> out_sizes = qkv.sizes().vec();
  out_sizes.erase(out_sizes.end() - 3);  // (..., T, nh, hs)
  std::vector<int64_t> lse_sizes(q.sizes().begin(), q.sizes().end() - 1);  // (..., nh, T)
  // ATen lays its output out (B, T, nh, hs): the packed output's own layout
  if (auto r = aten_forward(q, k, v, g, scale, dropout_p, /*flat=*/false)) {
    return {adopt(std::get<0>(*r).transpose(1, 2), out_sizes), std::get<1>(*r).reshape(lse_sizes)};
  }
  at::Tensor out = empty_output(out_sizes, qkv.options());
  at::Tensor out_rows = out.transpose(-3, -2);  // (..., nh, T, hs) view
  at::Tensor lse = at::empty(lse_sizes, qkv.options().dtype(compute_type(qkv.scalar_type())));
  if (lse.numel() != 0) {
    forward_native(q, k, v, out_rows, lse, g, scale, dropout_p, host_dropout_seed(seed, offset, rng));
  }
  return {out, lse};
}

at::Tensor causal_attention_qkvpacked_backward_cpu(const at::Tensor& grad_out, const at::Tensor& qkv,
                                                   const at::Tensor& out, const at::Tensor& lse, double scale,
                                                   double dropout_p, bool bottom_right, int64_t seed, int64_t offset,
                                                   const std::optional<at::Tensor>& rng, int64_t window_left,
                                                   int64_t window_right) {
  check_qkvpacked(qkv, "qkv");
  const auto [q, k, v] = unpack_qkv(qkv);
  const Geometry g = check_qkv(q, k, v, scale, dropout_p, bottom_right, window_left, window_right);
  check_min_dim(grad_out, 3, "grad_out", "(..., T, nh, hs)");
  check_min_dim(out, 3, "out", "(..., T, nh, hs)");
  const at::Tensor grad_rows = grad_out.transpose(-3, -2), out_rows = out.transpose(-3, -2);
  check_backward_inputs(grad_rows, out_rows, lse, q, g);
  at::Tensor dqkv = empty_output(qkv.sizes(), qkv.options());
  auto [dq, dk, dv] = unpack_qkv(dqkv);
  if (auto r = aten_backward(grad_rows, q, k, v, out_rows, lse, g, scale, dropout_p, /*flat=*/false)) {
    dq.copy_(std::get<0>(*r).reshape(dq.sizes()));
    dk.copy_(std::get<1>(*r).reshape(dk.sizes()));
    dv.copy_(std::get<2>(*r).reshape(dv.sizes()));
    return dqkv;
  }
  backward_into(grad_rows, q, k, v, out_rows, lse, dq, dk, dv, g, scale, dropout_p,
                host_dropout_seed(seed, offset, rng));
  return dqkv;
}

// ---- variable-length batches: q (total_q, H, E), k (total_k, Hkv, E), v (total_k, Hkv, Ev)
//
// Sequence i has queries [cu_q[i], cu_q[i + 1]) and keys [cu_k[i], cu_k[i] + Tk_i), Tk_i
// = cu_k[i + 1] - cu_k[i] or seqused_k[i]; its queries are aligned bottom-right on its keys
// and see the (window_left, window_right) band. The work of all sequences is one list of
// units (sequence, query head, rows) cut so that no unit costs more than a slice of the
// total (visible query-key pairs), taken longest first by the threads from one counter:
// a batch of one long and many short sequences keeps every thread busy, where a call per
// sequence would leave them idle. Each unit runs the kernels of a one-head call (attnext's
// tiles or ATen's flash attention, whichever the measured choice gives for its shape) on
// its thread; their own parallel_for runs inline there.

struct VarlenSeq {
  int64_t q0, k0, Tq, Tk;
};

std::vector<VarlenSeq> varlen_sequences(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cu_q,
                                        const at::Tensor& cu_k, const std::optional<at::Tensor>& seqused_k) {
  for (const auto& [t, name] : {std::pair<const at::Tensor*, const char*>{&cu_q, "cu_seq_q"}, {&cu_k, "cu_seq_k"}}) {
    TORCH_CHECK(t->scalar_type() == at::kInt && t->dim() == 1 && t->device().is_cpu(), "attnext: ", name,
                " must be a 1-D int32 CPU tensor, got ", t->scalar_type(), " of shape ", t->sizes(), " on ",
                t->device());
  }
  TORCH_CHECK(cu_q.numel() >= 1 && cu_k.numel() == cu_q.numel(),
              "attnext: cu_seq_q and cu_seq_k must have the same length N + 1 >= 1, got ", cu_q.numel(), " and ",
              cu_k.numel());
  const int64_t N = cu_q.numel() - 1;
  const at::Tensor cq = cu_q.contiguous(), ck = cu_k.contiguous();
  const int32_t* a = cq.const_data_ptr<int32_t>();
  const int32_t* c = ck.const_data_ptr<int32_t>();
  const int32_t* used = nullptr;
  at::Tensor su;
  if (seqused_k) {
    TORCH_CHECK(seqused_k->scalar_type() == at::kInt && seqused_k->dim() == 1 && seqused_k->numel() == N &&
                    seqused_k->device().is_cpu(),
                "attnext: seqused_k must be an int32 CPU tensor of shape (N,) = (", N, "), got ",
                seqused_k->scalar_type(), " of shape ", seqused_k->sizes());
    su = seqused_k->contiguous();
    used = su.const_data_ptr<int32_t>();
  }
  TORCH_CHECK(a[0] == 0 && a[N] == q.size(0), "attnext: cu_seq_q must start at 0 and end at total_q = ", q.size(0),
              ", got ", a[0], " ... ", a[N]);
  std::vector<VarlenSeq> seqs(N);
  for (int64_t i = 0; i < N; ++i) {
    TORCH_CHECK(a[i + 1] >= a[i], "attnext: cu_seq_q must be non-decreasing, got ", a[i], " then ", a[i + 1]);
    TORCH_CHECK(c[i + 1] >= c[i] && c[i] >= 0 && c[i + 1] <= k.size(0),
                "attnext: cu_seq_k must be non-decreasing within [0, total_k = ", k.size(0), "], got ", c[i],
                " then ", c[i + 1]);
    int64_t tk = c[i + 1] - c[i];
    if (used) {
      TORCH_CHECK(used[i] >= 0 && used[i] <= tk, "attnext: seqused_k[", i, "] = ", used[i], " must lie within [0, ",
                  tk, "]");
      tk = used[i];
    }
    seqs[i] = VarlenSeq{a[i], c[i], a[i + 1] - a[i], tk};
  }
  return seqs;
}

Geometry varlen_geometry(const VarlenSeq& s, int64_t E, int64_t Ev, int64_t wl, int64_t wr) {
  Geometry g{};
  g.BH = 1;
  g.T = s.Tq;
  g.S = s.Tk;
  g.hs = E;
  g.hsv = Ev;
  g.shift = s.Tk - s.Tq;
  g.wl = wl;
  g.wr = wr;
  return g;
}

void check_varlen_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_input(q, "query", "(total_q, H, E)");
  check_input(k, "key", "(total_k, Hkv, E)");
  check_input(v, "value", "(total_k, Hkv, Ev)");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "attnext: query, key and value must be 3-D, got ",
              q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  check_same(q, "query", k, "key");
  check_same(q, "query", v, "value");
  TORCH_CHECK(k.size(0) == v.size(0) && k.size(1) == v.size(1) && q.size(2) == k.size(2),
              "attnext: key and value must have the same total length and heads, and query and key the same head "
              "size, got ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "attnext: the query heads (", q.size(1),
              ") must be a multiple of the key/value heads (", k.size(1), ")");
}

// The rows [t0, t0 + nt) of sequence s, head h of x (total, heads, d): a (nt, d) view.
at::Tensor varlen_rows(const at::Tensor& x, int64_t start, int64_t nt, int64_t h) {
  return x.narrow(0, start, nt).select(1, h);
}

struct VarlenUnit {
  int64_t seq, head, t0, nt, cost;
};

// The units of a pass: per sequence with queries and keys, per head, rows cut (where
// split_rows[seq]) so that a unit costs at most ~1/8 of a thread's share, at multiples of
// the kernels' query tile. Sequences on ATen's kernel and every backward keep whole
// sequences (the backward's dK, dV sum over every row): a sequence's result is the same
// whatever else is in the batch.
std::vector<VarlenUnit> varlen_units(const std::vector<VarlenSeq>& seqs, int64_t H, int64_t E, int64_t Ev,
                                     int64_t wl, int64_t wr, const std::vector<char>& split_rows) {
  std::vector<std::vector<int64_t>> row_cost(seqs.size());
  int64_t total = 0;
  for (size_t i = 0; i < seqs.size(); ++i) {
    if (seqs[i].Tq == 0 || seqs[i].Tk == 0) continue;
    const Geometry g = varlen_geometry(seqs[i], E, Ev, wl, wr);
    auto& rc = row_cost[i];
    rc.resize(g.T);
    for (int64_t t = 0; t < g.T; ++t) {
      rc[t] = std::max<int64_t>(g.visible(t) - g.first(t), 0) + 16;  // + a row's fixed work
      total += rc[t] * H;
    }
  }
  const int64_t slice = std::max<int64_t>(total / (8 * std::max(at::get_num_threads(), 1)), 1);
  std::vector<VarlenUnit> units;
  for (size_t i = 0; i < seqs.size(); ++i) {
    const auto& rc = row_cost[i];
    for (int64_t t0 = 0; t0 < static_cast<int64_t>(rc.size());) {
      int64_t t1 = t0, cost = 0;
      while (t1 < static_cast<int64_t>(rc.size())) {
        const int64_t end = std::min<int64_t>(t1 + kBq, rc.size());
        int64_t c = 0;
        for (int64_t t = t1; t < end; ++t) c += rc[t];
        // a cut at a multiple of the query tile keeps every row's tiles (and so its bits)
        // those of a whole-sequence call; a tail of decode size is never cut off
        if (split_rows[i] && t1 > t0 && cost + c > slice && static_cast<int64_t>(rc.size()) - t1 > kDecodeMaxRows) {
          break;
        }
        cost += c;
        t1 = end;
      }
      for (int64_t h = 0; h < H; ++h) units.push_back(VarlenUnit{static_cast<int64_t>(i), h, t0, t1 - t0, cost});
      t0 = t1;
    }
  }
  std::stable_sort(units.begin(), units.end(),
                   [](const VarlenUnit& x, const VarlenUnit& y) { return x.cost > y.cost; });
  return units;
}

// Per sequence, whether its pass runs ATen's flash attention (the measured choice, on
// its whole rows), decided before the threads start: a first use measures there.
std::vector<char> varlen_aten_choices(const std::vector<VarlenSeq>& seqs, const at::Tensor& q, const at::Tensor& k,
                                      const at::Tensor& v, int64_t wl, int64_t wr, bool backward) {
  (void)own_gemm<float>(backward, q.size(-1));
  std::vector<char> aten(seqs.size(), 0);
  for (size_t i = 0; i < seqs.size(); ++i) {
    const VarlenSeq& s = seqs[i];
    if (s.Tq == 0 || s.Tk == 0) continue;
    const Geometry g = varlen_geometry(s, q.size(2), v.size(2), wl, wr);
    const at::Tensor qs = varlen_rows(q, s.q0, s.Tq, 0), ks = varlen_rows(k, s.k0, s.Tk, 0),
                     vs = varlen_rows(v, s.k0, s.Tk, 0);
    aten[i] = aten_can_run(qs, ks, vs, g, 0.0) && use_aten(backward, q.scalar_type(), g);
  }
  return aten;
}

// Runs body(unit) for every unit on torch's intra-op threads, the next unit from a counter.
template <typename Body>
void run_units(const std::vector<VarlenUnit>& units, Body body) {
  const int64_t n = static_cast<int64_t>(units.size());
  if (n == 0) return;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t u = next.fetch_add(1); u < n; u = next.fetch_add(1)) body(units[u]);
  });
}

std::tuple<at::Tensor, at::Tensor> varlen_attention_cpu(const at::Tensor& q, const at::Tensor& k,
                                                        const at::Tensor& v, const at::Tensor& cu_seq_q,
                                                        const at::Tensor& cu_seq_k,
                                                        const std::optional<at::Tensor>& seqused_k, double scale,
                                                        int64_t window_left, int64_t window_right) {
  check_varlen_qkv(q, k, v);
  check_scale(scale);
  TORCH_CHECK_VALUE(window_left >= -1 && window_right >= -1,
                    "attnext: window_size must be a pair of ints >= -1 (-1: no limit on that side), got (",
                    window_left, ", ", window_right, ")");
  const std::vector<VarlenSeq> seqs = varlen_sequences(q, k, cu_seq_q, cu_seq_k, seqused_k);
  const int64_t H = q.size(1), E = q.size(2), Ev = v.size(2), G = H / k.size(1);
  at::Tensor out = empty_output({q.size(0), H, Ev}, q.options());
  at::Tensor lse = at::empty({H, q.size(0)}, q.options().dtype(compute_type(q.scalar_type())));
  // rows that see no key: sequences without keys here (the kernels write the others)
  for (const VarlenSeq& s : seqs) {
    if (s.Tq > 0 && s.Tk == 0) {
      out.narrow(0, s.q0, s.Tq).zero_();
      lse.narrow(1, s.q0, s.Tq).fill_(-INFINITY);
    }
  }
  const std::vector<char> aten = varlen_aten_choices(seqs, q, k, v, window_left, window_right, false);
  std::vector<char> split(seqs.size());
  for (size_t i = 0; i < seqs.size(); ++i) split[i] = !aten[i];
  const std::vector<VarlenUnit> units = varlen_units(seqs, H, E, Ev, window_left, window_right, split);
  const at::Tensor q_ = q, k_ = k, v_ = v;
  run_units(units, [&](const VarlenUnit& unit) {
    const VarlenSeq& s = seqs[unit.seq];
    Geometry g = varlen_geometry(s, E, Ev, window_left, window_right);
    g.T = unit.nt;
    g.shift += unit.t0;
    const at::Tensor qu = varlen_rows(q_, s.q0 + unit.t0, unit.nt, unit.head);
    const at::Tensor ku = varlen_rows(k_, s.k0, s.Tk, unit.head / G), vu = varlen_rows(v_, s.k0, s.Tk, unit.head / G);
    at::Tensor ou = varlen_rows(out, s.q0 + unit.t0, unit.nt, unit.head);
    at::Tensor lu = lse.select(0, unit.head).narrow(0, s.q0 + unit.t0, unit.nt);
    if (aten[unit.seq]) {
      if (auto r = aten_forward(qu, ku, vu, g, scale, 0.0, /*flat=*/true)) {
        ou.copy_(std::get<0>(*r).reshape(ou.sizes()));
        lu.copy_(std::get<1>(*r).reshape(lu.sizes()));
        return;
      }
    }
    forward_native(qu, ku, vu, ou, lu, g, scale, 0.0, DropoutSeed{});
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& cu_seq_q, const at::Tensor& cu_seq_k,
    const std::optional<at::Tensor>& seqused_k, double scale, int64_t window_left, int64_t window_right) {
  check_varlen_qkv(q, k, v);
  check_scale(scale);
  TORCH_CHECK_VALUE(window_left >= -1 && window_right >= -1,
                    "attnext: window_size must be a pair of ints >= -1 (-1: no limit on that side), got (",
                    window_left, ", ", window_right, ")");
  const std::vector<VarlenSeq> seqs = varlen_sequences(q, k, cu_seq_q, cu_seq_k, seqused_k);
  const int64_t H = q.size(1), E = q.size(2), Ev = v.size(2), Hkv = k.size(1), G = H / Hkv;
  check_input(grad_out, "grad_out", "(total_q, H, Ev)");
  check_same(q, "query", grad_out, "grad_out");
  check_same(q, "query", out, "out");
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({q.size(0), H, Ev}) && out.sizes() == grad_out.sizes(),
              "attnext: grad_out and out must have shape (total_q, H, Ev) = ", at::IntArrayRef({q.size(0), H, Ev}),
              ", got ", grad_out.sizes(), " and ", out.sizes());
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({H, q.size(0)}) && lse.scalar_type() == compute_type(q.scalar_type()),
              "attnext: lse must be a ", compute_type(q.scalar_type()), " tensor of shape (H, total_q) = ",
              at::IntArrayRef({H, q.size(0)}), ", got ", lse.scalar_type(), " ", lse.sizes());
  const at::Tensor lse_c = lse.contiguous();
  at::Tensor dq = at::zeros(q.sizes(), q.options());
  // dK, dV per query head (the group's sum is taken after): keys of no sequence stay 0
  at::Tensor dk = at::zeros({k.size(0), H, E}, q.options()), dv = at::zeros({k.size(0), H, Ev}, q.options());
  const std::vector<char> aten = varlen_aten_choices(seqs, q, k, v, window_left, window_right, true);
  const std::vector<VarlenUnit> units =
      varlen_units(seqs, H, E, Ev, window_left, window_right, std::vector<char>(seqs.size(), 0));
  run_units(units, [&](const VarlenUnit& unit) {
    const VarlenSeq& s = seqs[unit.seq];
    const Geometry g = varlen_geometry(s, E, Ev, window_left, window_right);
    const int64_t h = unit.head;
    const at::Tensor qu = varlen_rows(q, s.q0, s.Tq, h), gu = varlen_rows(grad_out, s.q0, s.Tq, h);
    const at::Tensor ou = varlen_rows(out, s.q0, s.Tq, h), lu = lse_c.select(0, h).narrow(0, s.q0, s.Tq);
    const at::Tensor ku = varlen_rows(k, s.k0, s.Tk, h / G), vu = varlen_rows(v, s.k0, s.Tk, h / G);
    at::Tensor dqu = varlen_rows(dq, s.q0, s.Tq, h), dku = varlen_rows(dk, s.k0, s.Tk, h),
               dvu = varlen_rows(dv, s.k0, s.Tk, h);
    if (aten[unit.seq]) {
      if (auto r = aten_backward(gu, qu, ku, vu, ou, lu, g, scale, 0.0, /*flat=*/true)) {
        dqu.copy_(std::get<0>(*r).reshape(dqu.sizes()));
        dku.copy_(std::get<1>(*r).reshape(dku.sizes()));
        dvu.copy_(std::get<2>(*r).reshape(dvu.sizes()));
        return;
      }
    }
    backward_into(gu, qu, ku, vu, ou, lu, dqu, dku, dvu, g, scale, 0.0, DropoutSeed{});
  });
  if (G > 1) {
    return {dq, dk.view({k.size(0), Hkv, G, E}).sum(2), dv.view({k.size(0), Hkv, G, Ev}).sum(2)};
  }
  return {dq, dk, dv};
}

TORCH_LIBRARY_IMPL(attnext, CPU, m) {
  m.impl("causal_attention", &causal_attention_cpu);
  m.impl("_causal_attention_backward", &causal_attention_backward_cpu);
  m.impl("causal_attention_qkvpacked", &causal_attention_qkvpacked_cpu);
  m.impl("_causal_attention_qkvpacked_backward", &causal_attention_qkvpacked_backward_cpu);
  m.impl("_varlen_attention", &varlen_attention_cpu);
  m.impl("_varlen_attention_backward", &varlen_attention_backward_cpu);
}

}  // namespace attnext
