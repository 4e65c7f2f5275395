// float products on AVX-512 for the float attention tiles. Included once, in the
// AVX-512 region of causal_attention.cpp; used when the CPU runs AVX-512 (see
// tile_gemm_f32 there).
//
// C (M, N) = alpha * A B, or C += alpha * A B when accumulate; C row-major (ldc).
//   A: element (i, p) at a[i * sa_i + p * sa_p]: rows of a row-major block
//      (sa_i = its ld, sa_p = 1) or columns of one (A^T: sa_i = 1, sa_p = its ld);
//   B: element (p, j) at b[p * ldb + j], a row-major (K, N) block.
// The tiles are small (at most 64 x 256 x 256) and already in L1/L2, so nothing
// is packed: a register block of MR rows x NV vectors of 16 columns takes its B
// row from memory and A as broadcast scalars. Column blocks are the outer loop,
// so a (K, 64) panel of B stays in L1 while the row blocks pass over it. Loads
// past column N are masked off (they may lie past the end of a tensor).

inline __mmask16 f32_lanes(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xffff)
                 : n <= 0 ? static_cast<__mmask16>(0) : static_cast<__mmask16>((1u << n) - 1u);
}

template <int MR, int NV>
inline void f32_block(int64_t K, const float* a, int64_t sa_i, int64_t sa_p, const float* b, int64_t ldb, float* c,
                      int64_t ldc, int64_t ncols, float alpha, bool accumulate) {
  // (the fixed-count loops are unrolled so that acc lives in registers)
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  const __mmask16 last = f32_lanes(ncols - 16 * (NV - 1));
  for (int64_t p = 0; p < K; ++p) {
    const float* bp = b + p * ldb;
    __m512 bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      bv[v] = _mm512_maskz_loadu_ps(v == NV - 1 ? last : static_cast<__mmask16>(0xffff), bp + 16 * v);
    }
    const float* ap = a + p * sa_p;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512 av = _mm512_set1_ps(ap[r * sa_i]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(av, bv[v], acc[r][v]);
    }
  }
  const __m512 va = _mm512_set1_ps(alpha);
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const __mmask16 m = v == NV - 1 ? last : static_cast<__mmask16>(0xffff);
      float* cp = c + r * ldc + 16 * v;
      __m512 x = _mm512_mul_ps(acc[r][v], va);
      if (accumulate) x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(m, cp));
      _mm512_mask_storeu_ps(cp, m, x);
    }
  }
}

// Rows [0, M) of one column block of `ncols` <= 16 * NV columns.
template <int NV>
inline void f32_column_block(int64_t M, int64_t K, const float* a, int64_t sa_i, int64_t sa_p, const float* b,
                             int64_t ldb, float* c, int64_t ldc, int64_t ncols, float alpha, bool accumulate) {
  constexpr int kMR = 6;  // 6 x 4 accumulators + 4 B vectors + 1 broadcast: 29 of 32 registers
  int64_t i = 0;
  for (; i + kMR <= M; i += kMR) {
    f32_block<kMR, NV>(K, a + i * sa_i, sa_i, sa_p, b, ldb, c + i * ldc, ldc, ncols, alpha, accumulate);
  }
  const float* ai = a + i * sa_i;
  float* ci = c + i * ldc;
  switch (M - i) {
    case 5:
      f32_block<5, NV>(K, ai, sa_i, sa_p, b, ldb, ci, ldc, ncols, alpha, accumulate);
      break;
    case 4:
      f32_block<4, NV>(K, ai, sa_i, sa_p, b, ldb, ci, ldc, ncols, alpha, accumulate);
      break;
    case 3:
      f32_block<3, NV>(K, ai, sa_i, sa_p, b, ldb, ci, ldc, ncols, alpha, accumulate);
      break;
    case 2:
      f32_block<2, NV>(K, ai, sa_i, sa_p, b, ldb, ci, ldc, ncols, alpha, accumulate);
      break;
    case 1:
      f32_block<1, NV>(K, ai, sa_i, sa_p, b, ldb, ci, ldc, ncols, alpha, accumulate);
      break;
    default:
      break;
  }
}

void gemm_f32(int64_t M, int64_t N, int64_t K, const float* a, int64_t sa_i, int64_t sa_p, const float* b,
              int64_t ldb, float* c, int64_t ldc, float alpha, bool accumulate) {
  if (M <= 0 || N <= 0) return;
  for (int64_t j = 0; j < N; j += 64) {
    const int64_t n = std::min<int64_t>(64, N - j);
    if (n > 48) {
      f32_column_block<4>(M, K, a, sa_i, sa_p, b + j, ldb, c + j, ldc, n, alpha, accumulate);
    } else if (n > 32) {
      f32_column_block<3>(M, K, a, sa_i, sa_p, b + j, ldb, c + j, ldc, n, alpha, accumulate);
    } else if (n > 16) {
      f32_column_block<2>(M, K, a, sa_i, sa_p, b + j, ldb, c + j, ldc, n, alpha, accumulate);
    } else {
      f32_column_block<1>(M, K, a, sa_i, sa_p, b + j, ldb, c + j, ldc, n, alpha, accumulate);
    }
  }
}
