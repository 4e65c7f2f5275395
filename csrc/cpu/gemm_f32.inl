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
// row from memory and A as broadcast scalars. Column blocks and then depth slices
// of 128 are the outer loops, so a (128, 64) panel of B stays in L1 while the row
// blocks pass over it. Loads past column N are masked off (they may lie past the
// end of a tensor).

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

// Depth slices: a (slice, 64) panel of B is 32 KiB, so it stays in L1 while the row
// blocks pass over it (a 256-deep panel, 64 KiB, streamed from L2 for each of them:
// 64 x 64 x 256 C += A B 151 -> 167-172 GFLOP/s on the Intel Xeon, one thread).
constexpr int64_t kF32DepthSlice = 128;

void gemm_f32(int64_t M, int64_t N, int64_t K, const float* a, int64_t sa_i, int64_t sa_p, const float* b,
              int64_t ldb, float* c, int64_t ldc, float alpha, bool accumulate) {
  if (M <= 0 || N <= 0) return;
  for (int64_t j = 0; j < N; j += 64) {
    const int64_t n = std::min<int64_t>(64, N - j);
    // K <= 0 still runs once: C = 0 (or C unchanged when accumulating)
    for (int64_t p0 = 0; p0 == 0 || p0 < K; p0 += kF32DepthSlice) {
      const int64_t kd = std::max<int64_t>(0, std::min(kF32DepthSlice, K - p0));
      const float* ap = a + p0 * sa_p;
      const float* bp = b + p0 * ldb + j;
      const bool acc = accumulate || p0 > 0;
      if (n > 48) {
        f32_column_block<4>(M, kd, ap, sa_i, sa_p, bp, ldb, c + j, ldc, n, alpha, acc);
      } else if (n > 32) {
        f32_column_block<3>(M, kd, ap, sa_i, sa_p, bp, ldb, c + j, ldc, n, alpha, acc);
      } else if (n > 16) {
        f32_column_block<2>(M, kd, ap, sa_i, sa_p, bp, ldb, c + j, ldc, n, alpha, acc);
      } else {
        f32_column_block<1>(M, kd, ap, sa_i, sa_p, bp, ldb, c + j, ldc, n, alpha, acc);
      }
    }
  }
}

// dst (C, R) row-major (ldd) = src (R, C)^T, src rows at stride lds: the K^T and V^T
// blocks the kernel's callers read as B. Full 16 x 16 blocks go through registers
// (four rounds of 16 shuffles: pairs, quads, then 128-bit lanes twice); the ragged
// edges element by element.
inline void transpose16_f32(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m512 r[16], t[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * lds);
  // t[2i], t[2i+1]: rows 2i and 2i+1 interleaved, per 128-bit lane (a0 b0 a1 b1 | a2 b2 a3 b3)
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  // r[4q + j]: lane l holds column 4l + j of rows 4q .. 4q + 3
#pragma GCC unroll 4
  for (int q = 0; q < 4; ++q) {
    const __m512 lo0 = t[4 * q], hi0 = t[4 * q + 1], lo1 = t[4 * q + 2], hi1 = t[4 * q + 3];
    r[4 * q + 0] = _mm512_shuffle_ps(lo0, lo1, 0x44);
    r[4 * q + 1] = _mm512_shuffle_ps(lo0, lo1, 0xEE);
    r[4 * q + 2] = _mm512_shuffle_ps(hi0, hi1, 0x44);
    r[4 * q + 3] = _mm512_shuffle_ps(hi0, hi1, 0xEE);
  }
  // for each j: t[j] = columns j, j + 8 of rows 0-7 (lanes: j rows 0-3, j+8 rows 0-3,
  // j rows 4-7, j+8 rows 4-7), t[4 + j] = columns j + 4, j + 12 of rows 0-7, and
  // t[8 + j], t[12 + j] the same of rows 8-15
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
    t[j] = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x88);
    t[4 + j] = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xDD);
    t[8 + j] = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x88);
    t[12 + j] = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xDD);
  }
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
    _mm512_storeu_ps(dst + j * ldd, _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88));
    _mm512_storeu_ps(dst + (j + 8) * ldd, _mm512_shuffle_f32x4(t[j], t[8 + j], 0xDD));
    _mm512_storeu_ps(dst + (j + 4) * ldd, _mm512_shuffle_f32x4(t[4 + j], t[12 + j], 0x88));
    _mm512_storeu_ps(dst + (j + 12) * ldd, _mm512_shuffle_f32x4(t[4 + j], t[12 + j], 0xDD));
  }
}

void transpose_f32(const float* src, int64_t lds, int64_t R, int64_t C, float* dst, int64_t ldd) {
  const int64_t R16 = R / 16 * 16, C16 = C / 16 * 16;
  for (int64_t r0 = 0; r0 < R16; r0 += 16) {
    for (int64_t c0 = 0; c0 < C16; c0 += 16) transpose16_f32(src + r0 * lds + c0, lds, dst + c0 * ldd + r0, ldd);
    for (int64_t r = r0; r < r0 + 16; ++r) {
      for (int64_t c = C16; c < C; ++c) dst[c * ldd + r] = src[r * lds + c];
    }
  }
  for (int64_t r = R16; r < R; ++r) {
    for (int64_t c = 0; c < C; ++c) dst[c * ldd + r] = src[r * lds + c];
  }
}
