// The float row kernels of causal_softmax, written once against VecF and
// included once per instruction set (see causal_softmax.cpp).

// dst[0:n] = src[0:n] * mul, dst[n:total] = 0, written with non-temporal
// stores where dst is aligned: the output rows are written once and not read
// again by this kernel, so they need not displace the input from the cache nor
// be read from memory first. The caller issues a store fence (stream_fence).
inline void stream_row(const float* src, float* dst, int64_t n, float mul, int64_t total) {
  constexpr int64_t N = VecF::N;
  int64_t j = 0;
  while (j < total && (reinterpret_cast<uintptr_t>(dst + j) % VecF::kStreamAlign) != 0) {
    dst[j] = j < n ? src[j] * mul : 0.0f;
    ++j;
  }
  const VecF vmul = VecF::set1(mul);
  const VecF zero = VecF::set1(0.0f);
  for (; j + N <= n; j += N) {
    (VecF::load(src + j) * vmul).stream(dst + j);
  }
  if (j < n && j + N <= total) {
    VecF::select_first(n - j, VecF::load_tail(src + j, n - j) * vmul, zero).stream(dst + j);
    j += N;
  }
  for (; j + N <= total; j += N) {
    zero.stream(dst + j);
  }
  for (; j < total; ++j) {
    dst[j] = j < n ? src[j] * mul : 0.0f;
  }
}

// y[0:L] = softmax(x[0:L] * scale), y[L:S] = 0 (all NaN if the sum is NaN).
// x may alias y. With a scratch row `tmp` (L floats), y is written once, with
// streaming stores; without, y is used as the scratch.
inline void fwd_row_f32(const float* x, float* y, int64_t L, int64_t S, float scale, float* tmp) {
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
  float* e_row = tmp != nullptr ? tmp : y;
  for (j = 0; j + N <= L; j += N) {
    const VecF e = VecF::exp(VecF::fmadd(VecF::load(x + j), vs, neg_m));
    e.store(e_row + j);
    acc = acc + e;
  }
  if (j < L) {
    const VecF e = VecF::select_first(L - j, VecF::exp(VecF::fmadd(VecF::load_tail(x + j, L - j), vs, neg_m)),
                                      VecF::set1(0.0f));
    e.store_tail(e_row + j, L - j);
    acc = acc + e;
  }
  const float sum = acc.hsum();
  if (sum != sum) {
    // NaN/inf in the visible part: torch.softmax of the masked row is NaN
    // everywhere, the masked entries included; so is ours.
    std::fill(y, y + S, std::numeric_limits<float>::quiet_NaN());
    return;
  }
  if (tmp != nullptr) {
    stream_row(tmp, y, L, 1.0f / sum, S);
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
// With a scratch row `tmp` (L floats), dx is written once, with streaming stores.
inline void bwd_row_f32(const float* dy, const float* y, float* dx, int64_t L, int64_t S, float scale, float* tmp) {
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
  float* out = tmp != nullptr ? tmp : dx;
  for (j = 0; j + N <= L; j += N) {
    (vs * VecF::load(y + j) * (VecF::load(dy + j) - dot)).store(out + j);
  }
  if (j < L) {
    (vs * VecF::load_tail(y + j, L - j) * (VecF::load_tail(dy + j, L - j) - dot)).store_tail(out + j, L - j);
  }
  if (tmp != nullptr) {
    stream_row(tmp, dx, L, 1.0f, S);
  } else if (S > L) {
    std::memset(dx + L, 0, sizeof(float) * (S - L));
  }
}
