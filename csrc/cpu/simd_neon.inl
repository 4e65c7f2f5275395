// VecF for AArch64 NEON (Advanced SIMD, 4 floats). NEON is part of the AArch64
// baseline, so these regions need no target pragma: they are stamped out in an
// ATTNEXT_ARM_NEON block, in a namespace of the including file's choosing (see
// cpu/vec_math.h).
//
// min and max are compare-and-select, not vminq/vmaxq: like x86's minps/maxps and
// the scalar VecF they return the second operand when either is NaN (vminq would
// return NaN), so every ISA treats a NaN in a row the same way.
struct VecF {
  static constexpr int64_t N = 4;
  float32x4_t v;

  static VecF set1(float a) { return {vdupq_n_f32(a)}; }
  static VecF load(const float* p) { return {vld1q_f32(p)}; }
  static uint32x4_t first(int64_t n) {
    static const uint32_t lanes[4] = {0, 1, 2, 3};
    return vcltq_u32(vld1q_u32(lanes), vdupq_n_u32(static_cast<uint32_t>(n < 0 ? 0 : n > 4 ? 4 : n)));
  }
  // Lanes >= n are 0 and their memory is not touched.
  static VecF load_tail(const float* p, int64_t n) {
    float buf[4] = {};
    std::memcpy(buf, p, sizeof(float) * n);
    return load(buf);
  }
  // bfloat16 in memory, widened to float (the bits shifted into the high half).
  static VecF load(const uint16_t* p) { return {vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(p), 16))}; }
  static VecF load_tail(const uint16_t* p, int64_t n) {
    uint16_t buf[4] = {};
    std::memcpy(buf, p, sizeof(uint16_t) * n);
    return load(buf);
  }
  void store(float* p) const { vst1q_f32(p, v); }
  void store_tail(float* p, int64_t n) const {
    float buf[4];
    vst1q_f32(buf, v);
    std::memcpy(p, buf, sizeof(float) * n);
  }
  // AArch64 has no non-temporal hint worth the name for a 16-byte store (STNP is
  // a pair of registers and only a hint): an ordinary store, and no fence needed.
  void stream(float* p) const { vst1q_f32(p, v); }
  static void stream_fence() {}
  // Lanes < n from a, the others from b.
  static VecF select_first(int64_t n, VecF a, VecF b) { return {vbslq_f32(first(n), a.v, b.v)}; }

  VecF operator+(VecF b) const { return {vaddq_f32(v, b.v)}; }
  VecF operator-(VecF b) const { return {vsubq_f32(v, b.v)}; }
  VecF operator*(VecF b) const { return {vmulq_f32(v, b.v)}; }
  static VecF fmadd(VecF a, VecF b, VecF c) { return {vfmaq_f32(c.v, a.v, b.v)}; }
  static VecF min(VecF a, VecF b) { return {vbslq_f32(vcltq_f32(a.v, b.v), a.v, b.v)}; }
  static VecF max(VecF a, VecF b) { return {vbslq_f32(vcgtq_f32(a.v, b.v), a.v, b.v)}; }
  float hsum() const { return vaddvq_f32(v); }
  float hmin() const { return vminvq_f32(v); }
  float hmax() const { return vmaxvq_f32(v); }
  // out[0..3] = the lane sums of a, b, c, d (pairwise adds: one tree for four vectors).
  static void hsum4(VecF a, VecF b, VecF c, VecF d, float* out) {
    vst1q_f32(out, vpaddq_f32(vpaddq_f32(a.v, b.v), vpaddq_f32(c.v, d.v)));
  }

  // exp, within 2 ulp: the algorithm and constants of vec::exp_f32 (and of the
  // AVX2 VecF), 2^n applied as two exponent-bit factors so that results near
  // FLT_MAX and subnormal results round once. NaN stays NaN: the clamps return
  // their second operand (see min/max), vcvtq of NaN is 0, and p is NaN.
  // The softmax's exp: the exp below, 0 where that is subnormal (AVX-512 has a
  // cheaper one).
  static VecF exp_softmax(VecF a) { return exp_ftz(a); }
  // exp, 0 where it would be subnormal (a < vec::kExpNormalMin; NaN stays NaN).
  static VecF exp_ftz(VecF a) {
    const uint32x4_t tiny = vcltq_f32(a.v, vdupq_n_f32(vec::kExpNormalMin));
    return {vbslq_f32(tiny, vdupq_n_f32(0.0f), exp(a).v)};
  }
  static VecF exp(VecF a) {
    float32x4_t x = min(set1(89.0f), a).v;
    x = max(set1(-104.0f), {x}).v;
    const float32x4_t n = vrndnq_f32(vmulq_f32(x, vdupq_n_f32(vec::kLog2e)));  // to nearest, ties to even
    float32x4_t r = vfmsq_f32(x, n, vdupq_n_f32(vec::kLn2Hi));                  // x - n * ln2hi, fused
    r = vfmsq_f32(r, n, vdupq_n_f32(vec::kLn2Lo));
    float32x4_t p = vfmaq_f32(vdupq_n_f32(vec::kExpC5), vdupq_n_f32(vec::kExpC6), r);
    p = vfmaq_f32(vdupq_n_f32(vec::kExpC4), p, r);
    p = vfmaq_f32(vdupq_n_f32(vec::kExpC3), p, r);
    p = vfmaq_f32(vdupq_n_f32(vec::kExpC2), p, r);
    p = vfmaq_f32(vdupq_n_f32(1.0f), p, r);
    p = vfmaq_f32(vdupq_n_f32(1.0f), p, r);
    const int32x4_t ni = vcvtq_s32_f32(n);  // in [-150, 129]
    const int32x4_t n1 = vshrq_n_s32(ni, 1);
    const int32x4_t bias = vdupq_n_s32(127);
    const float32x4_t s1 = vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(n1, bias), 23));
    const float32x4_t s2 = vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(vsubq_s32(ni, n1), bias), 23));
    return {vmulq_f32(vmulq_f32(p, s1), s2)};
  }
};
