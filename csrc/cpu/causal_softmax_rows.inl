// The float row kernels of causal_softmax, written once against VecF and
// included once per instruction set (see causal_softmax.cpp).

// Writes a row y[0:S] whose visible prefix y[0:L] is given by full(j) (the
// vector at j, j + N <= L) and tail(j, n) (the vector at j whose lanes >= n
// are 0, n < N), and whose rest is 0. With stream, the aligned whole vectors of
// y are written with non-temporal stores: for outputs far larger than the
// cache this skips the read-for-ownership of each line of y and leaves the
// input's lines in cache. The caller fences (VecF::stream_fence).
template <typename Full, typename Tail>
inline void write_row(float* y, int64_t L, int64_t S, bool stream, Full full, Tail tail) {
  constexpr int64_t N = VecF::N;
  const VecF zero = VecF::set1(0.0f);
  int64_t j = 0;
  if (!stream) {
    for (; j + N <= L; j += N) {
      full(j).store(y + j);
    }
    if (j < L) {
      tail(j, L - j).store_tail(y + j, L - j);
    }
    if (S > L) {
      std::memset(y + L, 0, sizeof(float) * (S - L));
    }
    return;
  }
  const int64_t mis = static_cast<int64_t>((reinterpret_cast<uintptr_t>(y) / sizeof(float)) % N);
  if (mis != 0) {  // up to the first aligned vector
    j = std::min<int64_t>(S, N - mis);
    (L > 0 ? tail(0, std::min(j, L)) : zero).store_tail(y, j);
  }
  for (; j + N <= L; j += N) {
    full(j).stream(y + j);
  }
  if (j < L && j + N <= S) {
    tail(j, L - j).stream(y + j);
    j += N;
  }
  for (; j + N <= S; j += N) {
    zero.stream(y + j);
  }
  if (j < S) {
    (j < L ? tail(j, L - j) : zero).store_tail(y + j, S - j);
  }
}

// y[0:L] = softmax(x[0:L] * scale), y[L:S] = 0 (all NaN if the sum is NaN).
// x may alias y. With a scratch row (S floats, not aliasing x or y) y is
// written with streaming stores, see write_row.
inline void fwd_row_f32(const float* x, float* y, int64_t L, int64_t S, float scale, float* scratch) {
  constexpr int64_t N = VecF::N;
  const VecF vs = VecF::set1(scale);
  // m = max_j(x_j * scale) = scale * (max x or min x, by the sign of scale):
  // rounding is monotonic, so this is exact, and it saves a multiply per element.
  const bool neg = scale < 0.0f;
  VecF vm = VecF::set1(neg ? __builtin_inff() : -__builtin_inff());
  int64_t j = 0;
  if (neg) {
    for (; j + N <= L; j += N) {
      vm = VecF::min(vm, VecF::load(x + j));
    }
    if (j < L) {
      vm = VecF::select_first(L - j, VecF::min(vm, VecF::load_tail(x + j, L - j)), vm);
    }
  } else {
    for (; j + N <= L; j += N) {
      vm = VecF::max(vm, VecF::load(x + j));
    }
    if (j < L) {
      vm = VecF::select_first(L - j, VecF::max(vm, VecF::load_tail(x + j, L - j)), vm);
    }
  }
  // NaN in x may or may not reach m; either way it reaches the sum below and
  // the whole row becomes NaN, as with torch.softmax.
  float* e_out = scratch != nullptr ? scratch : y;
  const float m = (neg ? vm.hmin() : vm.hmax()) * scale;
  const VecF neg_m = VecF::set1(-m);
  VecF acc = VecF::set1(0.0f);
  for (j = 0; j + N <= L; j += N) {
    const VecF e = VecF::exp_ftz(VecF::fmadd(VecF::load(x + j), vs, neg_m));
    e.store(e_out + j);
    acc = acc + e;
  }
  if (j < L) {
    const VecF e = VecF::select_first(L - j, VecF::exp_ftz(VecF::fmadd(VecF::load_tail(x + j, L - j), vs, neg_m)),
                                      VecF::set1(0.0f));
    e.store_tail(e_out + j, L - j);
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
  write_row(
      y, L, S, scratch != nullptr, [&](int64_t i) { return VecF::load(e_out + i) * inv; },
      [&](int64_t i, int64_t n) { return VecF::load_tail(e_out + i, n) * inv; });
}

// dx[0:L] = scale * y * (dy - <dy, y>), dx[L:S] = 0. dx may alias dy or y
// unless stream (see write_row).
inline void bwd_row_f32(const float* dy, const float* y, float* dx, int64_t L, int64_t S, float scale, bool stream) {
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
  write_row(
      dx, L, S, stream, [&](int64_t i) { return vs * VecF::load(y + i) * (VecF::load(dy + i) - dot); },
      [&](int64_t i, int64_t n) {
        return VecF::select_first(n, vs * VecF::load_tail(y + i, n) * (VecF::load_tail(dy + i, n) - dot),
                                  VecF::set1(0.0f));
      });
}
