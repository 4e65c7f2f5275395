// bfloat16 products on AVX512-BF16 (vdpbf16ps: 16 lanes x 2 products, float
// accumulation), for the bfloat16 attention tiles. Included once, inside an
// ATTNEXT_ISA_BEGIN_AVX512BF16 region; called only when
// simd::bf16_dot_available().
//
// Operands are "pairs": one 32-bit word holds two bfloat16 values of
// consecutive k (the low half is the even k).
//   A: word (i, p) at a[i * sa_i + p * sa_p]   (bfloat16 rows: sa_i = ld / 2, sa_p = 1;
//      pairs_t below: sa_i = 1, sa_p = its row stride)
//   B: word (p, j) at b[p * ldb + j]  ("VNNI" layout), ldb >= N rounded up to 16,
//      the words past N zero.
// Products of bfloat16 values are exact in float; each vdpbf16ps adds two of
// them to the float accumulator (round to nearest even, subnormals flushed).

// Lanes < n (n may be <= 0 or >= 16).
inline __mmask16 first16(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xffff) : n <= 0 ? static_cast<__mmask16>(0) : static_cast<__mmask16>((1u << n) - 1u);
}

template <int MR, int NV>
inline void bf16_block(int64_t P, const uint32_t* a, int64_t sa_i, int64_t sa_p, const uint32_t* b, int64_t ldb,
                       float* c, int64_t ldc, int64_t ncols, float alpha, bool accumulate) {
  __m512 acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t p = 0; p < P; ++p) {
    __m512i bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = _mm512_loadu_si512(b + p * ldb + 16 * v);
    for (int r = 0; r < MR; ++r) {
      const __m512i av = _mm512_set1_epi32(static_cast<int>(a[r * sa_i + p * sa_p]));
      for (int v = 0; v < NV; ++v) {
        acc[r][v] = _mm512_dpbf16_ps(acc[r][v], (__m512bh)av, (__m512bh)bv[v]);
      }
    }
  }
  const __m512 va = _mm512_set1_ps(alpha);
  for (int r = 0; r < MR; ++r) {
    for (int v = 0; v < NV; ++v) {
      const int64_t left = ncols - 16 * v;
      const __mmask16 m = first16(left);
      float* cp = c + r * ldc + 16 * v;
      __m512 x = _mm512_mul_ps(acc[r][v], va);
      if (accumulate) x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(m, cp));
      _mm512_mask_storeu_ps(cp, m, x);
    }
  }
}

template <int MR>
inline void bf16_rows(int64_t N, int64_t P, const uint32_t* a, int64_t sa_i, int64_t sa_p, const uint32_t* b,
                      int64_t ldb, float* c, int64_t ldc, float alpha, bool accumulate) {
  int64_t j = 0;
  for (; j + 64 <= N; j += 64) bf16_block<MR, 4>(P, a, sa_i, sa_p, b + j, ldb, c + j, ldc, 64, alpha, accumulate);
  const int64_t rest = N - j;
  if (rest > 48) {
    bf16_block<MR, 4>(P, a, sa_i, sa_p, b + j, ldb, c + j, ldc, rest, alpha, accumulate);
  } else if (rest > 32) {
    bf16_block<MR, 3>(P, a, sa_i, sa_p, b + j, ldb, c + j, ldc, rest, alpha, accumulate);
  } else if (rest > 16) {
    bf16_block<MR, 2>(P, a, sa_i, sa_p, b + j, ldb, c + j, ldc, rest, alpha, accumulate);
  } else if (rest > 0) {
    bf16_block<MR, 1>(P, a, sa_i, sa_p, b + j, ldb, c + j, ldc, rest, alpha, accumulate);
  }
}

// C (M, N) = alpha * A B, or C += alpha * A B when accumulate; C row-major (ldc).
// P = K / 2 pairs.
void gemm_bf16(int64_t M, int64_t N, int64_t P, const uint32_t* a, int64_t sa_i, int64_t sa_p, const uint32_t* b,
               int64_t ldb, float* c, int64_t ldc, float alpha, bool accumulate) {
  if (M <= 0 || N <= 0) return;
  int64_t i = 0;
  for (; i + 4 <= M; i += 4) {
    bf16_rows<4>(N, P, a + i * sa_i, sa_i, sa_p, b, ldb, c + i * ldc, ldc, alpha, accumulate);
  }
  const uint32_t* ai = a + i * sa_i;
  float* ci = c + i * ldc;
  switch (M - i) {
    case 3:
      bf16_rows<3>(N, P, ai, sa_i, sa_p, b, ldb, ci, ldc, alpha, accumulate);
      break;
    case 2:
      bf16_rows<2>(N, P, ai, sa_i, sa_p, b, ldb, ci, ldc, alpha, accumulate);
      break;
    case 1:
      bf16_rows<1>(N, P, ai, sa_i, sa_p, b, ldb, ci, ldc, alpha, accumulate);
      break;
    default:
      break;
  }
}


// out (R, C + C % 2) bfloat16 rows = x (R, C) float rounded (to nearest even),
// the odd column padded with 0: an A operand with sa_i = ldo / 2, sa_p = 1.
void float_rows_to_bf16(const float* x, int64_t ldx, int64_t R, int64_t C, uint16_t* out, int64_t ldo) {
  for (int64_t r = 0; r < R; ++r) {
    const float* xr = x + r * ldx;
    uint16_t* orow = out + r * ldo;
    for (int64_t c = 0; c < C; c += 16) {
      const __mmask16 m = first16(C - c);
      const __m256bh h = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, xr + c));
      _mm256_mask_storeu_epi16(orow + c, m, (__m256i)h);
    }
    if (C % 2) orow[C] = 0;
  }
}

// out[p * ldo + c] = (bf16(x[2p][c]), bf16(x[2p + 1][c])) for p < ceil(R / 2),
// c < C (a missing odd row is 0): x^T as an A operand, sa_i = 1, sa_p = ldo.
void float_pairs_t(const float* x, int64_t ldx, int64_t R, int64_t C, uint32_t* out, int64_t ldo) {
  // word i of the result: bf16 i of the even row (low half), bf16 i of the odd row (high half)
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                              22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  for (int64_t p = 0; 2 * p < R; ++p) {
    const float* x0 = x + 2 * p * ldx;
    const float* x1 = 2 * p + 1 < R ? x0 + ldx : nullptr;
    uint32_t* orow = out + p * ldo;
    for (int64_t c = 0; c < C; c += 16) {
      const __mmask16 m = first16(C - c);
      const __m512 even = _mm512_maskz_loadu_ps(m, x0 + c);
      const __m512 odd = x1 ? _mm512_maskz_loadu_ps(m, x1 + c) : _mm512_setzero_ps();
      const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(odd, even);  // [even | odd]
      _mm512_mask_storeu_epi32(orow + c, m, _mm512_permutexvar_epi16(interleave, both));
    }
  }
}

// out[p * ldo + c] = (src[2p][c], src[2p + 1][c]) for p < ceil(R / 2), c < C
// (a missing odd row is 0), and 0 for c in [C, ldo): src (R, C) bfloat16 rows
// as a B operand (k = the row index).
void bf16_vnni(const uint16_t* src, int64_t lds, int64_t R, int64_t C, uint32_t* out, int64_t ldo) {
  for (int64_t p = 0; 2 * p < R; ++p) {
    const uint16_t* s0 = src + 2 * p * lds;
    const uint16_t* s1 = 2 * p + 1 < R ? s0 + lds : nullptr;
    uint32_t* orow = out + p * ldo;
    for (int64_t c = 0; c < ldo; c += 16) {
      const __mmask16 m = first16(C - c);
      const __m512i lo = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, s0 + c));
      const __m512i hi = s1 ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, s1 + c)) : _mm512_setzero_si512();
      _mm512_storeu_si512(orow + c, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
    }
  }
}

// out[p * ldo + r] = (src[r][2p], src[r][2p + 1]) for p < C / 2 (C even), r < R,
// and 0 for r in [R, R rounded up to 16): the transpose of src (R, C) bfloat16
// rows as a B operand (k = the column index).
void bf16_t32(const uint16_t* src, int64_t lds, int64_t R, int64_t C, uint32_t* out, int64_t ldo) {
  // element offsets of 16 consecutive rows (lds < 2^27: checked by the caller)
  const __m512i rows = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                          _mm512_set1_epi32(static_cast<int>(lds)));
  for (int64_t r0 = 0; r0 < R; r0 += 16) {
    const __mmask16 m = first16(R - r0);  // masked lanes are not read, and are 0
    const uint16_t* base = src + r0 * lds;
    for (int64_t p = 0; 2 * p < C; ++p) {
      const __m512i w = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m, rows, base + 2 * p, 2);
      _mm512_storeu_si512(out + p * ldo + r0, w);
    }
  }
}
