// The decode pass's inner loops, written once against VecF and included once per
// instruction set (see causal_attention_decode.cpp). q: nr query rows (row stride
// ldq), float; k, v: nc key/value rows (row strides ldk, ldv) of element type E,
// float or bfloat16 bits (uint16_t: widened in registers as they are loaded, so a
// bfloat16 cache is read at 2 bytes an element); vis[r] in [0, nc]: how many of the
// block's keys row r sees (non-decreasing in r: the causal mask).

#ifndef ATTNEXT_DECODE_PREFETCH
#define ATTNEXT_DECODE_PREFETCH 16
#endif
// How far ahead (in keys) K and V rows are prefetched where the stream would fall behind
// the hardware prefetcher: several query rows per key (grouped-query heads), or bfloat16
// rows (widened as they load). Measured on an AMX Xeon: 15-25% faster there; a float
// cache with one row per key already runs at the copy bandwidth without it.
constexpr int64_t kPrefetchKeys = ATTNEXT_DECODE_PREFETCH;

// <q, k> over hs elements: two accumulators, one horizontal sum.
template <typename E>
inline float decode_dot(const float* qr, const E* kj, int64_t hs) {
  constexpr int64_t N = VecF::N;
  VecF a0 = VecF::set1(0.0f), a1 = VecF::set1(0.0f);
  int64_t c = 0;
  for (; c + 2 * N <= hs; c += 2 * N) {
    a0 = VecF::fmadd(VecF::load(qr + c), VecF::load(kj + c), a0);
    a1 = VecF::fmadd(VecF::load(qr + c + N), VecF::load(kj + c + N), a1);
  }
  for (; c + N <= hs; c += N) a0 = VecF::fmadd(VecF::load(qr + c), VecF::load(kj + c), a0);
  if (c < hs) a1 = VecF::fmadd(VecF::load_tail(qr + c, hs - c), VecF::load_tail(kj + c, hs - c), a1);
  return (a0 + a1).hsum();
}

// s[r * lds + j] = scale * <q_r, k_j> for j < vis[r]. Each key row is read once for
// all query rows (it stays in L1 while they use it): K streams through once. Keys go
// four at a time where a row sees all four (and hs is whole vectors): each chunk of
// the row's q is loaded once for the four keys and the four sums share one reduction
// tree (VecF::hsum4), which costs what one horizontal sum did.
template <typename E>
inline void decode_scores(const float* q, int64_t ldq, int64_t nr, const E* k, int64_t ldk, int64_t nc, int64_t hs,
                          float scale, float* s, int64_t lds, const int64_t* vis) {
  constexpr int64_t N = VecF::N;
  int64_t j = 0;
  if (hs % N == 0) {
    for (; j + 4 <= nc; j += 4) {
      const E* k0 = k + j * ldk;
      const E* k1 = k0 + ldk;
      const E* k2 = k1 + ldk;
      const E* k3 = k2 + ldk;
      if (kPrefetchKeys > 0 && (nr > 1 || sizeof(E) < sizeof(float)) && j + 4 + kPrefetchKeys <= nc) {  // several rows per key: help the stream along
        for (int64_t i = 0; i < 4; ++i) {
          const char* row = reinterpret_cast<const char*>(k + (j + kPrefetchKeys + i) * ldk);
          for (int64_t b = 0; b < hs * static_cast<int64_t>(sizeof(E)); b += 64) __builtin_prefetch(row + b);
        }
      }
      for (int64_t r = nr - 1; r >= 0 && j < vis[r]; --r) {  // the rows that see key j are the last ones
        const float* qr = q + r * ldq;
        float* sr = s + r * lds;
        if (vis[r] < j + 4) {  // the row's causal edge: the keys it sees one by one
          for (int64_t i = j; i < vis[r]; ++i) sr[i] = scale * decode_dot(qr, k + i * ldk, hs);
          continue;
        }
        VecF a0 = VecF::set1(0.0f), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t c = 0; c < hs; c += N) {
          const VecF qc = VecF::load(qr + c);
          a0 = VecF::fmadd(qc, VecF::load(k0 + c), a0);
          a1 = VecF::fmadd(qc, VecF::load(k1 + c), a1);
          a2 = VecF::fmadd(qc, VecF::load(k2 + c), a2);
          a3 = VecF::fmadd(qc, VecF::load(k3 + c), a3);
        }
        float d[4];
        VecF::hsum4(a0, a1, a2, a3, d);
        for (int64_t i = 0; i < 4; ++i) sr[j + i] = scale * d[i];
      }
    }
  }
  for (; j < nc; ++j) {
    const E* kj = k + j * ldk;
    for (int64_t r = nr - 1; r >= 0 && j < vis[r]; --r) s[r * lds + j] = scale * decode_dot(q + r * ldq, kj, hs);
  }
}

// o_r += sum_{j < vis[r]} p[r * ldp + j] * v_j, four value rows at a time (one
// load and store of o per four rows of V), each value row read once for all rows.
template <typename E>
inline void decode_pv(const float* p, int64_t ldp, int64_t nr, const E* v, int64_t ldv, int64_t nc, int64_t hsv,
                      float* o, int64_t ldo, const int64_t* vis) {
  constexpr int64_t N = VecF::N;
  int64_t j = 0;
  for (; j + 4 <= nc; j += 4) {
    if (kPrefetchKeys > 0 && (nr > 1 || sizeof(E) < sizeof(float)) && j + 4 + kPrefetchKeys <= nc) {
      for (int64_t i = 0; i < 4; ++i) {
        const char* row = reinterpret_cast<const char*>(v + (j + kPrefetchKeys + i) * ldv);
        for (int64_t b = 0; b < hsv * static_cast<int64_t>(sizeof(E)); b += 64) __builtin_prefetch(row + b);
      }
    }
    const E* v0 = v + j * ldv;
    const E* v1 = v0 + ldv;
    const E* v2 = v1 + ldv;
    const E* v3 = v2 + ldv;
    for (int64_t r = nr - 1; r >= 0 && j < vis[r]; --r) {
      const float* pr = p + r * ldp + j;
      // keys past vis[r] have p = 0 (the softmax step cleared them): adding them is exact
      const VecF p0 = VecF::set1(pr[0]), p1 = VecF::set1(pr[1]), p2 = VecF::set1(pr[2]), p3 = VecF::set1(pr[3]);
      float* orow = o + r * ldo;
      int64_t c = 0;
      for (; c + N <= hsv; c += N) {
        VecF acc = VecF::load(orow + c);
        acc = VecF::fmadd(p0, VecF::load(v0 + c), acc);
        acc = VecF::fmadd(p1, VecF::load(v1 + c), acc);
        acc = VecF::fmadd(p2, VecF::load(v2 + c), acc);
        acc = VecF::fmadd(p3, VecF::load(v3 + c), acc);
        acc.store(orow + c);
      }
      if (c < hsv) {
        const int64_t n = hsv - c;
        VecF acc = VecF::load_tail(orow + c, n);
        acc = VecF::fmadd(p0, VecF::load_tail(v0 + c, n), acc);
        acc = VecF::fmadd(p1, VecF::load_tail(v1 + c, n), acc);
        acc = VecF::fmadd(p2, VecF::load_tail(v2 + c, n), acc);
        acc = VecF::fmadd(p3, VecF::load_tail(v3 + c, n), acc);
        acc.store_tail(orow + c, n);
      }
    }
  }
  for (; j < nc; ++j) {
    const E* vj = v + j * ldv;
    for (int64_t r = nr - 1; r >= 0 && j < vis[r]; --r) {
      const VecF pj = VecF::set1(p[r * ldp + j]);
      float* orow = o + r * ldo;
      int64_t c = 0;
      for (; c + N <= hsv; c += N) VecF::fmadd(pj, VecF::load(vj + c), VecF::load(orow + c)).store(orow + c);
      if (c < hsv) {
        const int64_t n = hsv - c;
        VecF::fmadd(pj, VecF::load_tail(vj + c, n), VecF::load_tail(orow + c, n)).store_tail(orow + c, n);
      }
    }
  }
}

inline void decode_scores_f32(const float* q, int64_t ldq, int64_t nr, const float* k, int64_t ldk, int64_t nc,
                              int64_t hs, float scale, float* s, int64_t lds, const int64_t* vis) {
  decode_scores<float>(q, ldq, nr, k, ldk, nc, hs, scale, s, lds, vis);
}
inline void decode_scores_bf16(const float* q, int64_t ldq, int64_t nr, const uint16_t* k, int64_t ldk, int64_t nc,
                               int64_t hs, float scale, float* s, int64_t lds, const int64_t* vis) {
  decode_scores<uint16_t>(q, ldq, nr, k, ldk, nc, hs, scale, s, lds, vis);
}
inline void decode_pv_f32(const float* p, int64_t ldp, int64_t nr, const float* v, int64_t ldv, int64_t nc,
                          int64_t hsv, float* o, int64_t ldo, const int64_t* vis) {
  decode_pv<float>(p, ldp, nr, v, ldv, nc, hsv, o, ldo, vis);
}
inline void decode_pv_bf16(const float* p, int64_t ldp, int64_t nr, const uint16_t* v, int64_t ldv, int64_t nc,
                           int64_t hsv, float* o, int64_t ldo, const int64_t* vis) {
  decode_pv<uint16_t>(p, ldp, nr, v, ldv, nc, hsv, o, ldo, vis);
}
