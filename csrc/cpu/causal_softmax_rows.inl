// The float row kernels of causal_softmax, written once against VecF and
// included once per instruction set (see causal_softmax.cpp).

// y[0:L] = softmax(x[0:L] * scale), y[L:S] = 0 (all NaN if the sum is NaN).
// x may alias y.
inline void fwd_row_f32(const float* x, float* y, int64_t L, int64_t S, float scale) {
  constexpr int64_t N = VecF::N;
  const VecF vs = VecF::set1(scale);
  VecF vm = VecF::set1(-__builtin_inff());
  int64_t j = 0;
  for (; j + N <= L; j += N) {
    vm = VecF::max(vm, VecF::load(x + j) * vs);
  }
  if (j < L) {
    const VecF z = VecF::load_tail(x + j, L - j) * vs;
    vm = VecF::select_first(L - j, VecF::max(vm, z), vm);
  }
  // NaN in x may or may not reach m; either way it reaches the sum below and
  // the whole row becomes NaN, as with torch.softmax.
  const VecF neg_m = VecF::set1(-vm.hmax());
  VecF acc = VecF::set1(0.0f);
  for (j = 0; j + N <= L; j += N) {
    const VecF e = VecF::exp(VecF::fmadd(VecF::load(x + j), vs, neg_m));
    e.store(y + j);
    acc = acc + e;
  }
  if (j < L) {
    const VecF e = VecF::select_first(L - j, VecF::exp(VecF::fmadd(VecF::load_tail(x + j, L - j), vs, neg_m)),
                                      VecF::set1(0.0f));
    e.store_tail(y + j, L - j);
    acc = acc + e;
  }
  const float sum = acc.hsum();
  if (sum != sum) {
    // NaN/inf in the visible part: torch.softmax of the masked row is NaN
    // everywhere, the masked entries included; so is ours.
    std::fill(y, y + S, std::numeric_limits<float>::quiet_NaN());
    return;
  }
  const VecF inv = VecF::set1(1.0f / sum);
  for (j = 0; j + N <= L; j += N) {
    (VecF::load(y + j) * inv).store(y + j);
  }
  if (j < L) {
    (VecF::load_tail(y + j, L - j) * inv).store_tail(y + j, L - j);
  }
  if (S > L) {
    std::memset(y + L, 0, sizeof(float) * (S - L));
  }
}

// dx[0:L] = scale * y * (dy - <dy, y>), dx[L:S] = 0. dx may alias dy or y.
inline void bwd_row_f32(const float* dy, const float* y, float* dx, int64_t L, int64_t S, float scale) {
  constexpr int64_t N = VecF::N;
  VecF acc = VecF::set1(0.0f);
  int64_t j = 0;
  for (; j + N <= L; j += N) {
    acc = VecF::fmadd(VecF::load(dy + j), VecF::load(y + j), acc);
  }
  if (j < L) {
    acc = VecF::fmadd(VecF::load_tail(dy + j, L - j), VecF::load_tail(y + j, L - j), acc);
  }
  const VecF dot = VecF::set1(acc.hsum());
  const VecF vs = VecF::set1(scale);
  for (j = 0; j + N <= L; j += N) {
    (vs * VecF::load(y + j) * (VecF::load(dy + j) - dot)).store(dx + j);
  }
  if (j < L) {
    (vs * VecF::load_tail(y + j, L - j) * (VecF::load_tail(dy + j, L - j) - dot)).store_tail(dx + j, L - j);
  }
  if (S > L) {
    std::memset(dx + L, 0, sizeof(float) * (S - L));
  }
}
