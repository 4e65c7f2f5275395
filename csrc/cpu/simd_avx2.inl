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
  void store(float* p) const { _mm256_storeu_ps(p, v); }
  void store_tail(float* p, int64_t n) const { _mm256_maskstore_ps(p, first(n), v); }
  // Lanes < n from a, the others from b.
  static VecF select_first(int64_t n, VecF a, VecF b) {
    return {_mm256_blendv_ps(b.v, a.v, _mm256_castsi256_ps(first(n)))};
  }

  VecF operator+(VecF b) const { return {_mm256_add_ps(v, b.v)}; }
  VecF operator-(VecF b) const { return {_mm256_sub_ps(v, b.v)}; }
  VecF operator*(VecF b) const { return {_mm256_mul_ps(v, b.v)}; }
  static VecF fmadd(VecF a, VecF b, VecF c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
  static VecF max(VecF a, VecF b) { return {_mm256_max_ps(a.v, b.v)}; }
  float hsum() const {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  float hmax() const {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }

  // exp, about 1 ulp; the same algorithm as vec::exp_f32 (2^n from the exponent
  // bits, inputs clamped so that it cannot overflow, then 0 / inf patched in).
  static VecF exp(VecF a) {
    const __m256 lo = _mm256_set1_ps(-87.33654475f);
    __m256 x = _mm256_min_ps(_mm256_set1_ps(88.0f), a.v);  // NaN stays NaN
    x = _mm256_max_ps(lo, x);
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
    y = _mm256_blendv_ps(y, _mm256_setzero_ps(), _mm256_cmp_ps(a.v, lo, _CMP_LT_OQ));
    y = _mm256_blendv_ps(y, _mm256_set1_ps(__builtin_inff()),
                         _mm256_cmp_ps(a.v, _mm256_set1_ps(88.72283935f), _CMP_GT_OQ));
    return {y};
  }
};
