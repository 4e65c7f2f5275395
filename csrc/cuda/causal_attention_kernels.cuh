// Fused causal attention on NVIDIA GPUs: the kernels (no ATen includes here).
//
// out = dropout(softmax(scale * q k^T, window)) v, lse = logsumexp per query row,
// the (T, S) matrix never stored. The window (FlashAttention's window_size (left,
// right), relative to the diagonal t + shift): row t sees keys [first(t), visible(t));
// the causal default (-1, 0) is first = 0. A first, exact implementation on CUDA cores:
// every product in the accumulation type (float, or double for double), so
// float32 is exact (no TF32) and float64 serves gradcheck. float16 / bfloat16 on
// sm_80+ normally take the tensor-core kernels (causal_attention_mma.cuh); these are
// their fallback (head sizes above 256 / 128, unaligned rows, older GPUs).
//
// Tiles: a warp owns kRows query rows; its 32 lanes are the 32 keys of the key
// tile (kBk = 32), so a row's max and sum are warp shuffles. Blocks have 4 warps
// (kBq = 4 * kRows query rows). Q, K, V tiles are staged in shared memory in the
// accumulation type (rows padded by one element where lanes read across rows).
//
// Forward: one block per (batch, query tile), longest tiles first. Key tiles
// from the one holding the tile's first row's first key to the last row's last
// visible key (tiles wholly outside every row's window are skipped: cost T x W
// for a sliding window of W keys), online softmax (running
// max m and sum l per row, the output accumulator rescaled by exp(m_old - m_new)),
// O += P V; at the end O /= l and lse = m + log(l). A row that sees no key has
// O = 0 and lse = -inf. NaN in the visible scores makes the row NaN (as torch).
//
// Backward, deterministic, no atomics: D = rowsum(dO * O) (host side), then
//   dkdv kernel: one block per (batch, key tile); walks the query tiles that see
//     it (from the first row whose window reaches the tile to the last whose
//     window starts before the tile's end), recomputes P = exp(S - lse), accumulates dV += P_drop^T dO and
//     dK += scale dS^T Q with dS = P (dP z - D), dP = dO V^T, z the dropout factor;
//   dq kernel: one block per (batch, query tile); walks its key tiles (as the
//     forward) and
//     accumulates dQ += scale dS K.
// S and dP are computed twice (once per kernel): the price of determinism.
//
// Dropout: the counter-based hash of dropout_hash.h, bit-identical to the CPU
// kernel and reference.py for the same (seed, offset).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/causal_softmax_kernels.cuh"  // RowAddr, to_acc, from_acc, exp_acc, warp_sum, warp_max
#include "dropout_hash.h"

namespace attnext {
namespace cuda {

constexpr int kAttnWarps = 4;
constexpr int kAttnThreads = 32 * kAttnWarps;
constexpr int kBk = 32;  // keys per tile: one per lane

template <typename E, typename A>  // E: element type of q, k, v; A: accumulation type
struct AttnParams {
  const E* q;
  const E* k;
  const E* v;
  RowAddr qa, ka, va;
  int64_t BH, T, S, hs, hsv;
  int64_t shift;  // row t's diagonal key: t + shift
  // window_size (left, right) around the diagonal, -1 = unbounded on that side; the
  // defaults are the causal window (the host sets both)
  int64_t wl = -1, wr = 0;
  A scale;
  bool drop;
  uint32_t stream_key, threshold;
  A inv_keep;
  const int64_t* rng;  // [seed, offset] on the device (CUDA-graph safe), or null: stream_key

  // The dropout stream: from rng when the call drew its seed on the device.
  __device__ __forceinline__ uint32_t key() const { return rng ? dropout_stream_key(rng[0], rng[1]) : stream_key; }
  // The keys row t sees: [first(t), visible(t)), both clamped to [0, S] (as the CPU
  // kernels' AttnGeometry); nondecreasing in t.
  __device__ __forceinline__ int64_t visible(int64_t t) const {
    if (wr < 0) return S;
    const int64_t v = t + shift + wr + 1;
    return v < 0 ? 0 : (v > S ? S : v);
  }
  __device__ __forceinline__ int64_t first(int64_t t) const {
    if (wl < 0) return 0;
    const int64_t f = t + shift - wl;
    return f < 0 ? 0 : (f > S ? S : f);
  }
  __device__ __forceinline__ bool sees(int64_t t, int64_t j) const { return first(t) <= j && j < visible(t); }
  // whether row t sees no key at all: its output is 0 and its lse -inf
  __device__ __forceinline__ bool sees_none(int64_t t) const { return first(t) >= visible(t); }
  // The first key tile (of width tile) a query tile starting at row t0 needs: its first
  // row has the leftmost window.
  __device__ __forceinline__ int64_t first_key_tile(int64_t t0, int64_t tile) const { return first(t0) / tile * tile; }
  // The query rows that see some key of [k0, k1): from first_query(k0) (the first row
  // whose window reaches past k0) to before end_query(k1) (the first row whose window
  // starts at or after k1).
  __device__ __forceinline__ int64_t first_query(int64_t k0) const {
    if (wr < 0) return 0;
    const int64_t t = k0 - shift - wr;
    return t < 0 ? 0 : (t > T ? T : t);
  }
  __device__ __forceinline__ int64_t end_query(int64_t k1) const {
    if (wl < 0) return T;
    const int64_t t = k1 + wl - shift;
    return t < 0 ? 0 : (t > T ? T : t);
  }
  // The factor dropout applies to weight (b, t, j): 1/(1-p) if kept, else 0.
  __device__ __forceinline__ A drop_factor(uint32_t row_key, int64_t j) const {
    return dropout_keep(row_key, static_cast<uint32_t>(j), threshold) ? inv_keep : A(0);
  }
};

// Shared-memory layout of the forward, in elements of A.
struct FwdSmem {
  int64_t q, k, v, p, o, total;
  __host__ __device__ FwdSmem(int rows, int64_t hs, int64_t hsv) {
    const int64_t bq = kAttnWarps * rows;
    q = 0;                        // [bq][hs + 1]
    k = q + bq * (hs + 1);        // [kBk][hs + 1]
    v = k + kBk * (hs + 1);       // [kBk][hsv]
    p = v + kBk * hsv;            // [bq][kBk]
    o = p + bq * kBk;             // [bq][hsv]
    total = o + bq * hsv;
  }
};

// Stages rows [r0, r0 + n) (n <= nmax) of one batch of x into sm (row stride ld),
// zero-filling rows n..nmax-1. All threads of the block take part.
template <typename T, typename A>
__device__ __forceinline__ void stage_rows(A* sm, int64_t ld, const T* x, const RowAddr& xa, int64_t b, int64_t r0,
                                           int64_t n, int64_t nmax, int64_t cols) {
  for (int64_t i = threadIdx.x; i < nmax * cols; i += blockDim.x) {
    const int64_t r = i / cols, c = i % cols;
    sm[r * ld + c] = r < n ? to_acc(x[xa.offset(b, r0 + r) + c]) : A(0);
  }
}

template <typename T, int kRows>
__global__ void __launch_bounds__(kAttnThreads)
    causal_attention_fwd_kernel(AttnParams<T, typename AccOf<T>::type> p, T* __restrict__ out,
                                typename AccOf<T>::type* __restrict__ lse) {
  using A = typename AccOf<T>::type;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  A* sm = reinterpret_cast<A*>(smem_raw);
  constexpr int kBq = kAttnWarps * kRows;
  const FwdSmem L(kRows, p.hs, p.hsv);
  A* Qs = sm + L.q;
  A* Ks = sm + L.k;
  A* Vs = sm + L.v;
  A* Ps = sm + L.p;
  A* Os = sm + L.o;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t nqt = (p.T + kBq - 1) / kBq;
  const int64_t item = blockIdx.x;
  const int64_t b = item % p.BH;
  const int64_t t0 = (nqt - 1 - item / p.BH) * kBq;  // longest tiles first
  const int64_t nr = min(static_cast<int64_t>(kBq), p.T - t0);

  stage_rows<T, A>(Qs, p.hs + 1, p.q, p.qa, b, t0, nr, kBq, p.hs);
  for (int64_t i = threadIdx.x; i < kBq * p.hsv; i += blockDim.x) Os[i] = A(0);

  A m[kRows], l[kRows];
  uint32_t row_key[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    m[r] = -INFINITY;
    l[r] = A(0);
    row_key[r] = p.drop ? dropout_row_key(p.key(), b, t0 + warp * kRows + r) : 0u;
  }
  const int64_t kv_end = p.visible(t0 + nr - 1);
  for (int64_t k0 = p.first_key_tile(t0, kBk); k0 < kv_end; k0 += kBk) {
    const int64_t nc = min(static_cast<int64_t>(kBk), kv_end - k0);
    __syncthreads();  // the previous tile's K, V and P are no longer read
    stage_rows<T, A>(Ks, p.hs + 1, p.k, p.ka, b, k0, nc, kBk, p.hs);
    stage_rows<T, A>(Vs, p.hsv, p.v, p.va, b, k0, nc, kBk, p.hsv);
    __syncthreads();
    // S for this warp's rows, lane = key k0 + lane
    A s[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) s[r] = A(0);
    const A* krow = Ks + lane * (p.hs + 1);
    for (int64_t d = 0; d < p.hs; ++d) {
      const A kv = krow[d];
#pragma unroll
      for (int r = 0; r < kRows; ++r) s[r] += Qs[(warp * kRows + r) * (p.hs + 1) + d] * kv;
    }
    A alpha[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int64_t t = t0 + warp * kRows + r;
      const bool vis = t < p.T && p.sees(t, k0 + lane);
      const A z = vis ? s[r] * p.scale : A(-INFINITY);
      const A mx = warp_max(z);
      const A m_new = mx != mx ? mx : max(m[r], mx);
      // Visible entries only: NaN or +inf scores make e and so l NaN, and the row
      // NaN, as in torch.softmax and the CPU kernel. While every visible score so far
      // is -inf, 0 is subtracted instead of m (-inf - -inf would be NaN): the row
      // stays empty until a finite score arrives.
      const A m_sub = m_new == A(-INFINITY) ? A(0) : m_new;
      A e = vis ? exp_acc(z - m_sub) : A(0);
      alpha[r] = m[r] == A(-INFINITY) ? A(0) : exp_acc(m[r] - m_new);
      l[r] = l[r] * alpha[r] + warp_sum(e);
      m[r] = m_new;
      if (p.drop) e *= p.drop_factor(row_key[r], k0 + lane);
      Ps[(warp * kRows + r) * kBk + lane] = e;
    }
    __syncwarp();
    // O = O * alpha + P V for this warp's rows, lane over the output columns
    for (int64_t d = lane; d < p.hsv; d += 32) {
      A o[kRows];
#pragma unroll
      for (int r = 0; r < kRows; ++r) o[r] = Os[(warp * kRows + r) * p.hsv + d] * alpha[r];
      for (int c = 0; c < kBk; ++c) {
        const A vv = Vs[c * p.hsv + d];
#pragma unroll
        for (int r = 0; r < kRows; ++r) o[r] += Ps[(warp * kRows + r) * kBk + c] * vv;
      }
#pragma unroll
      for (int r = 0; r < kRows; ++r) Os[(warp * kRows + r) * p.hsv + d] = o[r];
    }
  }
  __syncthreads();  // Os was zeroed by all threads (and no key tile may have run)
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int64_t t = t0 + warp * kRows + r;
    if (t >= p.T) continue;
    const bool any = l[r] != A(0);  // NaN != 0: a NaN row stays NaN
    // l == 0: a row that sees no key is 0 (lse -inf); one whose scores were all -inf
    // is NaN, as torch.softmax of it
    const bool blind = p.sees_none(t);
    const A inv = any ? A(1) / l[r] : A(0);
    const A empty = blind ? A(0) : A(NAN);
    T* orow = out + (b * p.T + t) * p.hsv;
    for (int64_t d = lane; d < p.hsv; d += 32) {
      orow[d] = from_acc<T>(any ? Os[(warp * kRows + r) * p.hsv + d] * inv : empty);
    }
    if (lane == 0) lse[b * p.T + t] = any ? m[r] + log(l[r]) : (blind ? A(-INFINITY) : A(NAN));
  }
}

// Shared-memory layout of the dK/dV kernel, in elements of A.
struct DkdvSmem {
  int64_t k, v, q, dout, pd, ds, dk, dv, stats, total;
  __host__ __device__ DkdvSmem(int rows, int64_t hs, int64_t hsv) {
    const int64_t bq = kAttnWarps * rows;
    k = 0;                         // [kBk][hs + 1]
    v = k + kBk * (hs + 1);        // [kBk][hsv + 1]
    q = v + kBk * (hsv + 1);       // [bq][hs + 1]
    dout = q + bq * (hs + 1);      // [bq][hsv + 1]
    pd = dout + bq * (hsv + 1);    // [bq][kBk]  dropped P
    ds = pd + bq * kBk;            // [bq][kBk]  dS
    dk = ds + bq * kBk;            // [kBk][hs]
    dv = dk + kBk * hs;            // [kBk][hsv]
    stats = dv + kBk * hsv;        // [2][bq]    lse, D
    total = stats + 2 * bq;
  }
};

// Shared-memory layout of the dQ kernel, in elements of A.
struct DqSmem {
  int64_t q, dout, k, v, ds, dq, stats, total;
  __host__ __device__ DqSmem(int rows, int64_t hs, int64_t hsv) {
    const int64_t bq = kAttnWarps * rows;
    q = 0;                         // [bq][hs + 1]
    dout = q + bq * (hs + 1);      // [bq][hsv + 1]
    k = dout + bq * (hsv + 1);     // [kBk][hs + 1]
    v = k + kBk * (hs + 1);        // [kBk][hsv + 1]
    ds = v + kBk * (hsv + 1);      // [bq][kBk]
    dq = ds + bq * kBk;            // [bq][hs]
    stats = dq + bq * hs;          // [2][bq]
    total = stats + 2 * bq;
  }
};

// For this warp's rows (query rows t0 + warp * kRows + r, staged in Qs / dOs) and
// lane's key k0 + lane (staged in Ks / Vs): P (undropped), the dropout factor z
// and dS = P (dP z - D). Scores outside the window give P = dS = 0, and so do the
// rows that see no key (lse -inf).
template <typename T, typename A, int kRows>
__device__ __forceinline__ void recompute_p_ds(const AttnParams<T, A>& p, int64_t b, int64_t t0, int64_t k0,
                                               const A* Qs, const A* dOs, const A* Ks, const A* Vs,
                                               const A* lse_s, const A* D_s, A* P, A* Z, A* dS) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  A s[kRows], dp[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) s[r] = dp[r] = A(0);
  const A* krow = Ks + lane * (p.hs + 1);
  for (int64_t d = 0; d < p.hs; ++d) {
    const A kv = krow[d];
#pragma unroll
    for (int r = 0; r < kRows; ++r) s[r] += Qs[(warp * kRows + r) * (p.hs + 1) + d] * kv;
  }
  const A* vrow = Vs + lane * (p.hsv + 1);
  for (int64_t d = 0; d < p.hsv; ++d) {
    const A vv = vrow[d];
#pragma unroll
    for (int r = 0; r < kRows; ++r) dp[r] += dOs[(warp * kRows + r) * (p.hsv + 1) + d] * vv;
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int rr = warp * kRows + r;
    const int64_t t = t0 + rr;
    const bool vis = t < p.T && k0 + lane < p.S && p.sees(t, k0 + lane) && lse_s[rr] != A(-INFINITY);
    const A pr = vis ? exp_acc(s[r] * p.scale - lse_s[rr]) : A(0);
    const A z = p.drop ? p.drop_factor(dropout_row_key(p.key(), b, t), k0 + lane) : A(1);
    P[r] = pr;
    Z[r] = z;
    dS[r] = vis ? pr * (dp[r] * z - D_s[rr]) : A(0);
  }
}

template <typename T, int kRows>
__global__ void __launch_bounds__(kAttnThreads)
    causal_attention_dkdv_kernel(AttnParams<T, typename AccOf<T>::type> p, const T* __restrict__ dout, RowAddr da,
                                 const typename AccOf<T>::type* __restrict__ lse,
                                 const typename AccOf<T>::type* __restrict__ D, T* __restrict__ dk,
                                 T* __restrict__ dv) {
  using A = typename AccOf<T>::type;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  A* sm = reinterpret_cast<A*>(smem_raw);
  constexpr int kBq = kAttnWarps * kRows;
  const DkdvSmem L(kRows, p.hs, p.hsv);
  A *Ks = sm + L.k, *Vs = sm + L.v, *Qs = sm + L.q, *dOs = sm + L.dout;
  A *PDs = sm + L.pd, *dSs = sm + L.ds, *dKs = sm + L.dk, *dVs = sm + L.dv;
  A *lse_s = sm + L.stats, *D_s = sm + L.stats + kBq;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t nkt = (p.S + kBk - 1) / kBk;
  const int64_t b = blockIdx.x / nkt;
  const int64_t k0 = (blockIdx.x % nkt) * kBk;
  const int64_t nc = min(static_cast<int64_t>(kBk), p.S - k0);

  stage_rows<T, A>(Ks, p.hs + 1, p.k, p.ka, b, k0, nc, kBk, p.hs);
  stage_rows<T, A>(Vs, p.hsv + 1, p.v, p.va, b, k0, nc, kBk, p.hsv);
  for (int64_t i = threadIdx.x; i < kBk * p.hs; i += blockDim.x) dKs[i] = A(0);
  for (int64_t i = threadIdx.x; i < kBk * p.hsv; i += blockDim.x) dVs[i] = A(0);

  // the query rows that see some key of this tile
  const int64_t t_first = p.first_query(k0), t_end = p.end_query(k0 + nc);
  for (int64_t t0 = t_first; t0 < t_end; t0 += kBq) {
    const int64_t nr = min(static_cast<int64_t>(kBq), p.T - t0);
    __syncthreads();  // the previous query tile is no longer read
    stage_rows<T, A>(Qs, p.hs + 1, p.q, p.qa, b, t0, nr, kBq, p.hs);
    stage_rows<T, A>(dOs, p.hsv + 1, dout, da, b, t0, nr, kBq, p.hsv);
    for (int i = threadIdx.x; i < kBq; i += blockDim.x) {
      lse_s[i] = i < nr ? lse[b * p.T + t0 + i] : A(-INFINITY);
      D_s[i] = i < nr ? D[b * p.T + t0 + i] : A(0);
    }
    __syncthreads();
    A P[kRows], Z[kRows], dS[kRows];
    recompute_p_ds<T, A, kRows>(p, b, t0, k0, Qs, dOs, Ks, Vs, lse_s, D_s, P, Z, dS);
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      PDs[(warp * kRows + r) * kBk + lane] = P[r] * Z[r];
      dSs[(warp * kRows + r) * kBk + lane] = dS[r];
    }
    __syncthreads();
    // dV[c] += sum_r PD[r][c] dO[r], dK[c] += sum_r dS[r][c] Q[r]: warp w owns keys
    // c = w, w + 4, ...; lanes run over the columns.
    for (int c = warp; c < kBk; c += kAttnWarps) {
      for (int64_t d = lane; d < p.hsv; d += 32) {
        A acc = dVs[c * p.hsv + d];
        for (int r = 0; r < kBq; ++r) acc += PDs[r * kBk + c] * dOs[r * (p.hsv + 1) + d];
        dVs[c * p.hsv + d] = acc;
      }
      for (int64_t d = lane; d < p.hs; d += 32) {
        A acc = dKs[c * p.hs + d];
        for (int r = 0; r < kBq; ++r) acc += dSs[r * kBk + c] * Qs[r * (p.hs + 1) + d];
        dKs[c * p.hs + d] = acc;
      }
    }
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < nc * p.hs; i += blockDim.x) {
    dk[(b * p.S + k0) * p.hs + i] = from_acc<T>(dKs[i] * p.scale);
  }
  for (int64_t i = threadIdx.x; i < nc * p.hsv; i += blockDim.x) {
    dv[(b * p.S + k0) * p.hsv + i] = from_acc<T>(dVs[i]);
  }
}

template <typename T, int kRows>
__global__ void __launch_bounds__(kAttnThreads)
    causal_attention_dq_kernel(AttnParams<T, typename AccOf<T>::type> p, const T* __restrict__ dout, RowAddr da,
                               const typename AccOf<T>::type* __restrict__ lse,
                               const typename AccOf<T>::type* __restrict__ D, T* __restrict__ dq) {
  using A = typename AccOf<T>::type;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  A* sm = reinterpret_cast<A*>(smem_raw);
  constexpr int kBq = kAttnWarps * kRows;
  const DqSmem L(kRows, p.hs, p.hsv);
  A *Qs = sm + L.q, *dOs = sm + L.dout, *Ks = sm + L.k, *Vs = sm + L.v, *dSs = sm + L.ds, *dQs = sm + L.dq;
  A *lse_s = sm + L.stats, *D_s = sm + L.stats + kBq;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t nqt = (p.T + kBq - 1) / kBq;
  const int64_t item = blockIdx.x;
  const int64_t b = item % p.BH;
  const int64_t t0 = (nqt - 1 - item / p.BH) * kBq;
  const int64_t nr = min(static_cast<int64_t>(kBq), p.T - t0);

  stage_rows<T, A>(Qs, p.hs + 1, p.q, p.qa, b, t0, nr, kBq, p.hs);
  stage_rows<T, A>(dOs, p.hsv + 1, dout, da, b, t0, nr, kBq, p.hsv);
  for (int64_t i = threadIdx.x; i < kBq * p.hs; i += blockDim.x) dQs[i] = A(0);
  for (int i = threadIdx.x; i < kBq; i += blockDim.x) {
    lse_s[i] = i < nr ? lse[b * p.T + t0 + i] : A(-INFINITY);
    D_s[i] = i < nr ? D[b * p.T + t0 + i] : A(0);
  }
  const int64_t kv_end = p.visible(t0 + nr - 1);
  for (int64_t k0 = p.first_key_tile(t0, kBk); k0 < kv_end; k0 += kBk) {
    const int64_t nc = min(static_cast<int64_t>(kBk), kv_end - k0);
    __syncthreads();  // the previous key tile and dS are no longer read
    stage_rows<T, A>(Ks, p.hs + 1, p.k, p.ka, b, k0, nc, kBk, p.hs);
    stage_rows<T, A>(Vs, p.hsv + 1, p.v, p.va, b, k0, nc, kBk, p.hsv);
    __syncthreads();
    A P[kRows], Z[kRows], dS[kRows];
    recompute_p_ds<T, A, kRows>(p, b, t0, k0, Qs, dOs, Ks, Vs, lse_s, D_s, P, Z, dS);
#pragma unroll
    for (int r = 0; r < kRows; ++r) dSs[(warp * kRows + r) * kBk + lane] = dS[r];
    __syncwarp();
    // dQ[r] += sum_c dS[r][c] K[c] for this warp's rows, lanes over the columns
    for (int64_t d = lane; d < p.hs; d += 32) {
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const int rr = warp * kRows + r;
        A acc = dQs[rr * p.hs + d];
        for (int c = 0; c < kBk; ++c) acc += dSs[rr * kBk + c] * Ks[c * (p.hs + 1) + d];
        dQs[rr * p.hs + d] = acc;
      }
    }
  }
  __syncthreads();  // dQs was zeroed by all threads (and no key tile may have run)
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int rr = warp * kRows + r;
    const int64_t t = t0 + rr;
    if (t >= p.T) continue;
    for (int64_t d = lane; d < p.hs; d += 32) dq[(b * p.T + t) * p.hs + d] = from_acc<T>(dQs[rr * p.hs + d] * p.scale);
  }
}

}  // namespace cuda
}  // namespace attnext
