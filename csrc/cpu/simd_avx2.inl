// VecF for AVX2 + FMA (8 floats). Included inside ATTNEXT_ISA_BEGIN_AVX2 regions,
// in a namespace of the including file's choosing: see cpu/vec_math.h.
struct VecF {
  static constexpr int64_t N = 8;
  __m256 v;

  static VecF set1(float a) { return {_mm256_set1_ps(a)}; }
  static VecF load(const float* p) { return {_mm256_loadu_ps(p)}; }
  static __m256i first(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  // Lanes >= n are 0 and their memory is not touched.
  static VecF load_tail(const float* p, int64_t n) { return {_mm256_maskload_ps(p, first(n))}; }
  // bfloat16 in memory, widened to float (the bits shifted into the high half).
  static VecF load(const uint16_t* p) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return {_mm256_castsi256_ps(_mm256_slli_epi32(w, 16))};
  }
  static VecF load_tail(const uint16_t* p, int64_t n) {
    uint16_t buf[8] = {};
    std::memcpy(buf, p, sizeof(uint16_t) * n);
    return load(buf);
  }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
  void store_tail(float* p, int64_t n) const { _mm256_maskstore_ps(p, first(n), v); }
  // Non-temporal store to a 32-byte aligned p (bypasses the cache; see stream_fence).
  void stream(float* p) const { _mm256_stream_ps(p, v); }
  static void stream_fence() { _mm_sfence(); }
  // Lanes < n from a, the others from b.
  static VecF select_first(int64_t n, VecF a, VecF b) {
    return {_mm256_blendv_ps(b.v, a.v, _mm256_castsi256_ps(first(n)))};
  }

  VecF operator+(VecF b) const { return {_mm256_add_ps(v, b.v)}; }
  VecF operator-(VecF b) const { return {_mm256_sub_ps(v, b.v)}; }
  VecF operator*(VecF b) const { return {_mm256_mul_ps(v, b.v)}; }
  static VecF fmadd(VecF a, VecF b, VecF c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
  static VecF min(VecF a, VecF b) { return {_mm256_min_ps(a.v, b.v)}; }
  static VecF max(VecF a, VecF b) { return {_mm256_max_ps(a.v, b.v)}; }
  // out[0..3] = the lane sums of a, b, c, d (one reduction tree for four vectors).
  static void hsum4(VecF a, VecF b, VecF c, VecF d, float* out) {
    const __m256 ab = _mm256_add_ps(_mm256_unpacklo_ps(a.v, b.v), _mm256_unpackhi_ps(a.v, b.v));
    const __m256 cd = _mm256_add_ps(_mm256_unpacklo_ps(c.v, d.v), _mm256_unpackhi_ps(c.v, d.v));
    const __m256 s = _mm256_add_ps(_mm256_shuffle_ps(ab, cd, 0x44), _mm256_shuffle_ps(ab, cd, 0xEE));  // per 128 bits: a b c d
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1)));
  }
  float hsum() const {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  float hmin() const {
    __m128 s = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_min_ps(s, _mm_movehl_ps(s, s));
    s = _mm_min_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  float hmax() const {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }

  // exp, within 2 ulp; the algorithm and constants of vec::exp_f32, 2^n applied
  // as two exponent-bit factors so that results near FLT_MAX and subnormal
  // results round once, correctly. NaN stays NaN (min/max return their second
  // operand when either is NaN, and NaN * anything is NaN).
  // The softmax's exp: the exp below, 0 where that is subnormal (AVX-512 has a
  // cheaper one).
  static VecF exp_softmax(VecF a) { return exp_ftz(a); }
  // exp, 0 where it would be subnormal (a < vec::kExpNormalMin; NaN stays NaN).
  static VecF exp_ftz(VecF a) {
    return {_mm256_andnot_ps(_mm256_cmp_ps(a.v, _mm256_set1_ps(vec::kExpNormalMin), _CMP_LT_OQ), exp(a).v)};
  }
  static VecF exp(VecF a) {
    __m256 x = _mm256_min_ps(_mm256_set1_ps(89.0f), a.v);
    x = _mm256_max_ps(_mm256_set1_ps(-104.0f), x);
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(vec::kLog2e)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(vec::kLn2Hi), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(vec::kLn2Lo), r);
    __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(vec::kExpC6), r, _mm256_set1_ps(vec::kExpC5));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(vec::kExpC4));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(vec::kExpC3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(vec::kExpC2));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256i ni = _mm256_cvtps_epi32(n);  // in [-150, 129]
    const __m256i n1 = _mm256_srai_epi32(ni, 1);
    const __m256i bias = _mm256_set1_epi32(127);
    const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
    const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(ni, n1), bias), 23));
    const __m256 y = _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
    return {y};
  }
};
