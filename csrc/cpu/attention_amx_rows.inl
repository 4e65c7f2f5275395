// Row kernels of the AMX forward (fwd_amx in causal_attention.cpp), on AVX-512 with
// AVX512-BF16 conversions. Included once, inside an ATTNEXT_ISA_BEGIN_AVX512BF16
// region after simd_avx512.inl (VecF); called only where AMX runs, which implies
// both. Each replaces several passes over a tile of the AVX512-BF16 forward with one.

// exp for weights that are rounded to bfloat16 next (8 significant bits): one-constant
// range reduction and a degree-5 Taylor polynomial, within 1e-5 relative of exp over
// its whole range (against VecF::exp's 2 ulp), in 9 instructions instead of 13. Same
// edges as VecF::exp_ftz: -inf and anything whose exp is subnormal give 0, NaN stays
// NaN (the clamp returns its second operand, the unordered compare keeps it).
inline VecF exp_bf16_weights(VecF a) {
  const __m512 x = _mm512_max_ps(_mm512_set1_ps(-104.0f), a.v);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(::attnext::vec::kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693147180559945f), x);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(1.0f / 120.0f), r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  const __mmask16 normal = _mm512_cmp_ps_mask(a.v, _mm512_set1_ps(::attnext::vec::kExpNormalMin), _CMP_NLT_UQ);
  return {_mm512_maskz_scalef_ps(normal, p, n)};
}

// Online-softmax step on raw scores (brgemm has no alpha), the scale folded into the
// exponent: for each row r, with L = vis[r] visible columns of s (nr x nc, ld),
//   m_new = max(m[r], scale * max_j s[r][j]),   (scale > 0: the max commutes)
//   P[r][j] = exp(fma(s[r][j], scale, -m_new)) for j < L, 0 for j in [L, ncp),
// written as bfloat16 (round to nearest even) into p (row stride ldp) for the P V
// product, whose reduction runs over ncp = nc rounded up to even columns. The sum of
// the unrounded weights goes into l[r] (rescaled by alpha[r] = exp(m_old - m_new)),
// as the other tiles do. A row whose visible scores are all -inf subtracts 0
// (exp(-inf + inf) would be NaN), so it stays empty (l = 0) until a finite score comes.
inline void amx_softmax_tile(const float* s, int64_t nr, int64_t nc, int64_t ld, const int64_t* vis, float scale,
                             float* m, float* l, float* alpha, uint16_t* p, int64_t ldp) {
  constexpr int64_t N = VecF::N;
  const int64_t ncp = nc + (nc & 1);
  const VecF vs = VecF::set1(scale);
  for (int64_t r = 0; r < nr; ++r) {
    const float* x = s + r * ld;
    uint16_t* pr = p + r * ldp;
    const int64_t L = vis[r];
    if (L <= 0) {
      std::memset(pr, 0, sizeof(uint16_t) * ncp);
      alpha[r] = 1.0f;
      continue;
    }
    VecF vm = VecF::set1(-__builtin_inff());
    int64_t j = 0;
    for (; j + N <= L; j += N) vm = VecF::max(vm, VecF::load(x + j));
    if (j < L) vm = VecF::select_first(L - j, VecF::max(vm, VecF::load_tail(x + j, L - j)), vm);
    const float m_old = m[r];
    const float tile_max = vm.hmax() * scale;
    const float m_new = tile_max > m_old ? tile_max : m_old;
    const VecF neg_m = VecF::set1(m_new == -__builtin_inff() ? 0.0f : -m_new);
    VecF acc = VecF::set1(0.0f);
    for (j = 0; j + N <= L; j += N) {
      const VecF e = exp_bf16_weights(VecF::fmadd(VecF::load(x + j), vs, neg_m));
      acc = acc + e;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(pr + j), (__m256i)_mm512_cvtneps_pbh(e.v));
    }
    if (j < L) {
      const int64_t n = L - j;
      const VecF e = VecF::select_first(n, exp_bf16_weights(VecF::fmadd(VecF::load_tail(x + j, n), vs, neg_m)),
                                        VecF::set1(0.0f));
      acc = acc + e;
      _mm256_mask_storeu_epi16(pr + j, VecF::first(n), (__m256i)_mm512_cvtneps_pbh(e.v));
    }
    if (ncp > L) std::memset(pr + L, 0, sizeof(uint16_t) * (ncp - L));
    const float a = m_old == -__builtin_inff() ? 0.0f : ::attnext::vec::exp_f32(m_old - m_new);
    alpha[r] = a;
    l[r] = l[r] * a + acc.hsum();
    m[r] = m_new;
  }
}

// o[r][c] *= alpha[r] for the rows whose max grew (alpha != 1); o rows of hsv, stride ldo.
inline void amx_rescale_rows(float* o, int64_t nr, int64_t hsv, int64_t ldo, const float* alpha) {
  constexpr int64_t N = VecF::N;
  for (int64_t r = 0; r < nr; ++r) {
    if (alpha[r] == 1.0f) continue;
    float* orow = o + r * ldo;
    const VecF a = VecF::set1(alpha[r]);
    int64_t c = 0;
    for (; c + N <= hsv; c += N) (VecF::load(orow + c) * a).store(orow + c);
    if (c < hsv) (VecF::load_tail(orow + c, hsv - c) * a).store_tail(orow + c, hsv - c);
  }
}

// The end of a query tile, straight into the bfloat16 output row: out = o / l (rounded
// to nearest even), lse = m + log(l); zeros and -inf for a row that sees no key
// (none), NaN for a row whose visible scores were all -inf (l = 0), as finish_rows.
inline void amx_finish_row(const float* o, int64_t hsv, float m, float l, bool none, uint16_t* out, float* lse) {
  constexpr int64_t N = VecF::N;
  if (none || l == 0.0f) {
    const float fill = none ? 0.0f : std::numeric_limits<float>::quiet_NaN();
    const uint16_t h = ::attnext::vec::float_to_bf16(fill);
    for (int64_t c = 0; c < hsv; ++c) out[c] = h;
    *lse = none ? -std::numeric_limits<float>::infinity() : std::numeric_limits<float>::quiet_NaN();
    return;
  }
  const VecF inv = VecF::set1(1.0f / l);
  int64_t c = 0;
  for (; c + N <= hsv; c += N) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + c), (__m256i)_mm512_cvtneps_pbh((VecF::load(o + c) * inv).v));
  }
  if (c < hsv) {
    const int64_t n = hsv - c;
    _mm256_mask_storeu_epi16(out + c, VecF::first(n), (__m256i)_mm512_cvtneps_pbh((VecF::load_tail(o + c, n) * inv).v));
  }
  *lse = m + std::log(l);
}

// The backward's elementwise step on one (key tile x query tile) pair, transposed as
// bwd_amx computes it: row c < nc of S^T and dP^T (row stride ld) holds key c's scores
// and dP against the tile's queries r < nr (lanes; rows padded to nr16). Query r sees
// key c where c < visr[r] (visr non-decreasing in r, so each key row's visible queries
// are a suffix). One pass writes, as bfloat16 rows of ldo elements,
//   P^T[c][r]  = exp(fma(S^T[c][r], scale, -lse[r]))   where r sees c, else 0,
//   dS^T[c][r] = P^T[c][r] * (dP^T[c][r] - D[r]) * scale (from the unrounded P),
// and 0 in the lanes [nr, nr16), for the products that follow (dV += P^T dO,
// dK += dS^T Q, dQ^T += K^T dS^T). lse and D: the tile's nr rows, contiguous.
inline void amx_bwd_pds_tile(const float* st, const float* dpt, int64_t nc, int64_t nr, int64_t nr16, int64_t ld,
                             const int64_t* visr, const float* lse, const float* D, float scale, uint16_t* pT,
                             uint16_t* dsT, int64_t ldo) {
  constexpr int64_t N = VecF::N;
  static_assert(N == 16, "lanes are one __mmask16");
  const VecF vs = VecF::set1(scale);
  int64_t r0 = 0;  // the first query that sees key c
  for (int64_t c = 0; c < nc; ++c) {
    while (r0 < nr && visr[r0] <= c) ++r0;
    const float* x = st + c * ld;
    const float* dp = dpt + c * ld;
    uint16_t* pr = pT + c * ldo;
    uint16_t* dr = dsT + c * ldo;
    for (int64_t r = 0; r < nr16; r += N) {
      const __mmask16 valid = VecF::first(std::min<int64_t>(N, std::max<int64_t>(nr - r, 0)));
      const __mmask16 seen = valid & static_cast<__mmask16>(~VecF::first(std::min<int64_t>(N, std::max<int64_t>(r0 - r, 0))));
      if (seen == 0) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(pr + r), _mm256_setzero_si256());
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dr + r), _mm256_setzero_si256());
        continue;
      }
      const __m512 neg_lse = _mm512_sub_ps(_mm512_setzero_ps(), _mm512_maskz_loadu_ps(valid, lse + r));
      const VecF e = VecF::exp_ftz(VecF::fmadd(VecF{_mm512_maskz_loadu_ps(seen, x + r)}, vs, VecF{neg_lse}));
      const __m512 p = _mm512_maskz_mov_ps(seen, e.v);
      const __m512 g = _mm512_sub_ps(_mm512_maskz_loadu_ps(seen, dp + r), _mm512_maskz_loadu_ps(valid, D + r));
      const __m512 ds = _mm512_maskz_mul_ps(seen, _mm512_mul_ps(p, g), vs.v);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(pr + r), (__m256i)_mm512_cvtneps_pbh(p));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dr + r), (__m256i)_mm512_cvtneps_pbh(ds));
    }
  }
}

// dst[c * ldd + r] = src[r * lds + c] for r < R, c < C (C even; 16-bit elements): 16 rows
// at a time, two columns per 32-bit gather (the low half is the even column), split into
// the two destination rows. lds * 15 must fit a 32-bit element offset (the callers'
// row strides are below 2^27: use_bf16dot).
inline void bf16_transpose(const uint16_t* src, int64_t lds, int64_t R, int64_t C, uint16_t* dst, int64_t ldd) {
  const __m512i rows = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                          _mm512_set1_epi32(static_cast<int>(lds)));
  for (int64_t r0 = 0; r0 < R; r0 += 16) {
    const __mmask16 m = VecF::first(std::min<int64_t>(16, R - r0));
    const uint16_t* base = src + r0 * lds;
    for (int64_t c = 0; c < C; c += 2) {
      const __m512i w = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m, rows, base + c, 2);
      _mm256_mask_storeu_epi16(dst + c * ldd + r0, m, _mm512_cvtepi32_epi16(w));
      _mm256_mask_storeu_epi16(dst + (c + 1) * ldd + r0, m, _mm512_cvtepi32_epi16(_mm512_srli_epi32(w, 16)));
    }
  }
}
