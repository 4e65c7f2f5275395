// The float tile kernels of causal_attention, written once against VecF and
// included once per instruction set (see causal_attention.cpp). A tile is a
// row-major (nr, nc) block of scores with leading dimension ld; vis[r] in
// [0, nc] is how many of its columns query row r may see (the causal mask).

// Online-softmax step of the forward. In place: s becomes exp(s - m_new) on the
// visible prefix of each row and 0 after it; m (running max) and l (running sum
// of exp) are updated and alpha[r] = exp(m_old - m_new) is what the row's output
// accumulator must be multiplied by before this tile's P V is added.
inline void attn_fwd_tile_f32(float* s, int64_t nr, int64_t nc, int64_t ld, const int64_t* vis, float* m,
                              float* l, float* alpha) {
  // In groups of 16 rows, phase by phase (every row's maximum, then the rows' new
  // maxima and alpha, then every row's exp and sum), so that no row's exp pass waits
  // on its own horizontal maximum: the rows' short dependency chains overlap.
  constexpr int64_t N = VecF::N;
  constexpr int64_t kG = 16;
  float neg_m[kG];
  for (int64_t g0 = 0; g0 < nr; g0 += kG) {
    const int64_t gn = std::min(kG, nr - g0);
    for (int64_t i = 0; i < gn; ++i) {  // the tile's maximum per row
      const int64_t L = vis[g0 + i];
      const float* x = s + (g0 + i) * ld;
      VecF vm = VecF::set1(-__builtin_inff());
      int64_t j = 0;
      for (; j + N <= L; j += N) vm = VecF::max(vm, VecF::load(x + j));
      if (j < L) vm = VecF::select_first(L - j, VecF::max(vm, VecF::load_tail(x + j, L - j)), vm);
      neg_m[i] = vm.hmax();  // (the tile's maximum for now; -inf where L <= 0)
    }
    for (int64_t i = 0; i < gn; ++i) {  // new maxima and the accumulators' factors
      const int64_t r = g0 + i;
      if (vis[r] <= 0) {
        alpha[r] = 1.0f;
        continue;
      }
      const float m_old = m[r];
      const float m_new = neg_m[i] > m_old ? neg_m[i] : m_old;
      // every visible score so far -inf: subtract 0, not -inf (exp(-inf + inf) would
      // be NaN), so the row stays empty (l = 0) until a finite score comes
      neg_m[i] = m_new == -__builtin_inff() ? 0.0f : -m_new;
      alpha[r] = m_old == -__builtin_inff() ? 0.0f : ::attnext::vec::exp_f32(m_old - m_new);
      m[r] = m_new;
    }
    for (int64_t i = 0; i < gn; ++i) {  // P = exp(s - m_new) on the visible prefix, 0 after it
      const int64_t r = g0 + i, L = vis[r];
      float* x = s + r * ld;
      if (L <= 0) {
        std::memset(x, 0, sizeof(float) * nc);
        continue;
      }
      const VecF vneg = VecF::set1(neg_m[i]);
      VecF acc = VecF::set1(0.0f);
      int64_t j = 0;
      for (; j + N <= L; j += N) {
        const VecF e = VecF::exp_softmax(VecF::load(x + j) + vneg);
        e.store(x + j);
        acc = acc + e;
      }
      if (j < L) {
        const VecF e =
            VecF::select_first(L - j, VecF::exp_softmax(VecF::load_tail(x + j, L - j) + vneg), VecF::set1(0.0f));
        e.store_tail(x + j, L - j);
        acc = acc + e;
      }
      if (nc > L) std::memset(x + L, 0, sizeof(float) * (nc - L));
      l[r] = l[r] * alpha[r] + acc.hsum();
    }
  }
}

// Backward: s becomes P = exp(s - lse[r]) on the visible prefix, 0 after it.
inline void attn_bwd_p_tile_f32(float* s, int64_t nr, int64_t nc, int64_t ld, const int64_t* vis,
                                const float* lse) {
  constexpr int64_t N = VecF::N;
  for (int64_t r = 0; r < nr; ++r) {
    float* x = s + r * ld;
    const int64_t L = vis[r];
    if (L <= 0) {
      std::memset(x, 0, sizeof(float) * nc);
      continue;
    }
    const VecF neg = VecF::set1(-lse[r]);
    int64_t j = 0;
    for (; j + N <= L; j += N) {
      VecF::exp_softmax(VecF::load(x + j) + neg).store(x + j);
    }
    if (j < L) {
      VecF::exp_softmax(VecF::load_tail(x + j, L - j) + neg).store_tail(x + j, L - j);
    }
    if (nc > L) {
      std::memset(x + L, 0, sizeof(float) * (nc - L));
    }
  }
}

// Backward: dp becomes dS = scale * P * (dP * Z - D[r]), Z the dropout
// multipliers (nullptr: no dropout).
inline void attn_bwd_ds_tile_f32(const float* p, float* dp, const float* z, int64_t nr, int64_t nc, int64_t ld,
                                 const float* D, float scale) {
  constexpr int64_t N = VecF::N;
  const VecF vs = VecF::set1(scale);
  for (int64_t r = 0; r < nr; ++r) {
    const float* pr = p + r * ld;
    float* d = dp + r * ld;
    const float* zr = z ? z + r * ld : nullptr;
    const VecF vD = VecF::set1(D[r]);
    int64_t j = 0;
    if (zr) {
      for (; j + N <= nc; j += N) {
        const VecF g = VecF::fmadd(VecF::load(d + j), VecF::load(zr + j), VecF::set1(0.0f) - vD);
        (vs * VecF::load(pr + j) * g).store(d + j);
      }
      if (j < nc) {
        const int64_t n = nc - j;
        const VecF g = VecF::fmadd(VecF::load_tail(d + j, n), VecF::load_tail(zr + j, n), VecF::set1(0.0f) - vD);
        (vs * VecF::load_tail(pr + j, n) * g).store_tail(d + j, n);
      }
    } else {
      for (; j + N <= nc; j += N) {
        (vs * VecF::load(pr + j) * (VecF::load(d + j) - vD)).store(d + j);
      }
      if (j < nc) {
        const int64_t n = nc - j;
        (vs * VecF::load_tail(pr + j, n) * (VecF::load_tail(d + j, n) - vD)).store_tail(d + j, n);
      }
    }
  }
}

// Backward: out[r] = sum_j a[r, j] b[r, j] for rows r in [0, nr) of length n
// (D = rowsum(dO * O)), a and b rows at strides lda, ldb.
inline void attn_row_dots_f32(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t nr, int64_t n,
                              float* out) {
  constexpr int64_t N = VecF::N;
  for (int64_t r = 0; r < nr; ++r) {
    const float* x = a + r * lda;
    const float* y = b + r * ldb;
    VecF acc0 = VecF::set1(0.0f), acc1 = VecF::set1(0.0f);
    int64_t j = 0;
    for (; j + 2 * N <= n; j += 2 * N) {
      acc0 = VecF::fmadd(VecF::load(x + j), VecF::load(y + j), acc0);
      acc1 = VecF::fmadd(VecF::load(x + j + N), VecF::load(y + j + N), acc1);
    }
    for (; j + N <= n; j += N) acc0 = VecF::fmadd(VecF::load(x + j), VecF::load(y + j), acc0);
    if (j < n) acc1 = VecF::fmadd(VecF::load_tail(x + j, n - j), VecF::load_tail(y + j, n - j), acc1);
    out[r] = (acc0 + acc1).hsum();
  }
}

// Dropout multipliers of a tile: z[r, j] = keep ? inv_keep : 0, where keep is the
// counter-based hash of (row key, absolute column col0 + j) (see dropout_keep).
// p (optional) is multiplied by z in place.
inline void attn_dropout_tile_f32(float* p, float* z, int64_t nr, int64_t nc, int64_t ld, const uint32_t* row_keys,
                                  uint32_t col0, uint32_t threshold, float inv_keep) {
  for (int64_t r = 0; r < nr; ++r) {
    const uint32_t rk = row_keys[r];
    float* pr = p ? p + r * ld : nullptr;
    float* zr = z ? z + r * ld : nullptr;
    if (zr && pr) {
#pragma omp simd
      for (int64_t j = 0; j < nc; ++j) {
        const float f = ::attnext::dropout_keep(rk, col0 + static_cast<uint32_t>(j), threshold) ? inv_keep : 0.0f;
        zr[j] = f;
        pr[j] *= f;
      }
    } else if (pr) {
#pragma omp simd
      for (int64_t j = 0; j < nc; ++j) {
        pr[j] *= ::attnext::dropout_keep(rk, col0 + static_cast<uint32_t>(j), threshold) ? inv_keep : 0.0f;
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < nc; ++j) {
        zr[j] = ::attnext::dropout_keep(rk, col0 + static_cast<uint32_t>(j), threshold) ? inv_keep : 0.0f;
      }
    }
  }
}
