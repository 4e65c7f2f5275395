// VecF for AVX-512 (16 floats). Included inside ATTNEXT_ISA_BEGIN_AVX512 regions,
// in a namespace of the including file's choosing: see cpu/vec_math.h.
struct VecF {
  static constexpr int64_t N = 16;
  __m512 v;

  static VecF set1(float a) { return {_mm512_set1_ps(a)}; }
  static VecF load(const float* p) { return {_mm512_loadu_ps(p)}; }
  static __mmask16 first(int64_t n) { return static_cast<__mmask16>((1u << n) - 1u); }
  // Lanes >= n are 0 and their memory is not touched.
  static VecF load_tail(const float* p, int64_t n) { return {_mm512_maskz_loadu_ps(first(n), p)}; }
  // bfloat16 in memory, widened to float (the bits shifted into the high half).
  static VecF load(const uint16_t* p) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return {_mm512_castsi512_ps(_mm512_slli_epi32(w, 16))};
  }
  static VecF load_tail(const uint16_t* p, int64_t n) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(first(n), p));
    return {_mm512_castsi512_ps(_mm512_slli_epi32(w, 16))};
  }
  void store(float* p) const { _mm512_storeu_ps(p, v); }
  void store_tail(float* p, int64_t n) const { _mm512_mask_storeu_ps(p, first(n), v); }
  // Non-temporal store to a 64-byte aligned p (bypasses the cache; see stream_fence).
  void stream(float* p) const { _mm512_stream_ps(p, v); }
  static void stream_fence() { _mm_sfence(); }
  // Lanes < n from a, the others from b.
  static VecF select_first(int64_t n, VecF a, VecF b) { return {_mm512_mask_blend_ps(first(n), b.v, a.v)}; }

  VecF operator+(VecF b) const { return {_mm512_add_ps(v, b.v)}; }
  VecF operator-(VecF b) const { return {_mm512_sub_ps(v, b.v)}; }
  VecF operator*(VecF b) const { return {_mm512_mul_ps(v, b.v)}; }
  static VecF fmadd(VecF a, VecF b, VecF c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
  static VecF min(VecF a, VecF b) { return {_mm512_min_ps(a.v, b.v)}; }
  static VecF max(VecF a, VecF b) { return {_mm512_max_ps(a.v, b.v)}; }
  float hsum() const { return _mm512_reduce_add_ps(v); }
  float hmin() const { return _mm512_reduce_min_ps(v); }
  float hmax() const { return _mm512_reduce_max_ps(v); }
  // out[0..3] = the lane sums of a, b, c, d (one reduction tree for four vectors).
  static void hsum4(VecF a, VecF b, VecF c, VecF d, float* out) {
    const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a.v, b.v), _mm512_unpackhi_ps(a.v, b.v));
    const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c.v, d.v), _mm512_unpackhi_ps(c.v, d.v));
    const __m512 s = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, 0x44), _mm512_shuffle_ps(ab, cd, 0xEE));  // per 128 bits: a b c d
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(s), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(s), 1)));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
  }

  // exp, within 2 ulp: the algorithm and constants of vec::exp_f32, with
  // scalef (p * 2^n) over/underflowing exactly to inf/0. NaN stays NaN
  // (min/max return their second operand when either is NaN).
  static VecF exp(VecF a) {
    __m512 x = _mm512_min_ps(_mm512_set1_ps(89.0f), a.v);
    x = _mm512_max_ps(_mm512_set1_ps(-104.0f), x);
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(vec::kLog2e)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(vec::kLn2Hi), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(vec::kLn2Lo), r);
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(vec::kExpC6), r, _mm512_set1_ps(vec::kExpC5));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(vec::kExpC4));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(vec::kExpC3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(vec::kExpC2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return {_mm512_scalef_ps(p, n)};
  }

  // The softmax's exp: for the shifted scores x - max (x <= 0, or x = -inf, NaN)
  // within 3 ulp, 0 where exp is subnormal (x < vec::kExpNormalMin), exp(-inf) = 0,
  // NaN stays NaN; finite x > 0 up to 2^21 are right
  // too (+inf past 88.72), +inf is not. Against exp: no clamp above, the rounding
  // of x log2(e) by adding and subtracting 1.5 * 2^23 (two operations, where
  // roundscale is two and the product one more), a degree-5 polynomial.
  static VecF exp_softmax(VecF a) {
    const __m512 x = _mm512_max_ps(_mm512_set1_ps(-104.0f), a.v);
    const __m512 shift = _mm512_set1_ps(0x1.8p23f);
    const __m512 n = _mm512_sub_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(vec::kLog2e), shift), shift);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(vec::kLn2Hi), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(vec::kLn2Lo), r);
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(vec::kExp5C5), r, _mm512_set1_ps(vec::kExp5C4));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(vec::kExp5C3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(vec::kExp5C2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    // 0 where exp is subnormal (vec::kExpNormalMin); NaN (unordered) is kept
    const __mmask16 normal = _mm512_cmp_ps_mask(a.v, _mm512_set1_ps(vec::kExpNormalMin), _CMP_NLT_UQ);
    return {_mm512_maskz_scalef_ps(normal, p, n)};
  }

  // exp, 0 where it would be subnormal (a < vec::kExpNormalMin; NaN stays NaN).
  static VecF exp_ftz(VecF a) {
    const __mmask16 normal = _mm512_cmp_ps_mask(a.v, _mm512_set1_ps(vec::kExpNormalMin), _CMP_NLT_UQ);
    return {_mm512_maskz_mov_ps(normal, exp(a).v)};
  }
};
