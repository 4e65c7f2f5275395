// VecF for CPUs without AVX2 (and non-x86 builds): one float, plain C++.
// With N = 1 the row loops never reach their tail branches.
struct VecF {
  static constexpr int64_t N = 1;
  float v;

  static VecF set1(float a) { return {a}; }
  static VecF load(const float* p) { return {*p}; }
  static VecF load_tail(const float*, int64_t) { return {0.0f}; }
  static VecF load(const uint16_t* p) { return {::attnext::vec::bf16_to_float(*p)}; }
  static VecF load_tail(const uint16_t*, int64_t) { return {0.0f}; }
  void store(float* p) const { *p = v; }
  void store_tail(float*, int64_t) const {}
  void stream(float* p) const { *p = v; }
  static void stream_fence() {}
  static VecF select_first(int64_t n, VecF a, VecF b) { return n > 0 ? a : b; }

  VecF operator+(VecF b) const { return {v + b.v}; }
  VecF operator-(VecF b) const { return {v - b.v}; }
  VecF operator*(VecF b) const { return {v * b.v}; }
  static VecF fmadd(VecF a, VecF b, VecF c) { return {a.v * b.v + c.v}; }
  static VecF min(VecF a, VecF b) { return {a.v < b.v ? a.v : b.v}; }
  static VecF max(VecF a, VecF b) { return {a.v > b.v ? a.v : b.v}; }
  float hsum() const { return v; }
  float hmin() const { return v; }
  float hmax() const { return v; }
  static void hsum4(VecF a, VecF b, VecF c, VecF d, float* out) {
    out[0] = a.v;
    out[1] = b.v;
    out[2] = c.v;
    out[3] = d.v;
  }
  // The softmax's exp: the exp below, 0 where that is subnormal (AVX-512 has a
  // cheaper one).
  static VecF exp_softmax(VecF a) { return exp_ftz(a); }
  static VecF exp(VecF a) { return {::attnext::vec::exp_f32(a.v)}; }
  // exp, 0 where it would be subnormal (a < vec::kExpNormalMin).
  static VecF exp_ftz(VecF a) { return {::attnext::vec::exp_ftz_f32(a.v)}; }
};
