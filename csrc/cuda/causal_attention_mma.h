// Tensor-core causal attention (sm_80+) for float16 / bfloat16, and for float32 as TF32
// where torch allows it: the tile algorithms.
//
// Plain C++ (no CUDA, no torch includes): every function here is written over a small
// set of warp primitives, the `Ops` template argument, so the same code runs
//   * on the GPU with PtxOps (causal_attention_mma.cuh): ldmatrix, mma.sync (m16n8k16
//     for 16-bit inputs, m16n8k8 .tf32 for float32) with fp32 accumulation, cp.async,
//     warp shuffles, __syncthreads;
//   * on the host in tests/cpp/test_mma_layout.cpp, where 128 threads emulate a block and
//     the primitives implement the PTX ISA's documented fragment layouts independently:
//     the index math below is checked by running it, not by reading it.
// Ops provides: ldsm_x4 / ldsm_x4_t (ldmatrix .x4 [.trans] of b16 elements; p = this
// lane's row address), mma<E>(d, a, b0, b1) (d += A B, one instruction of element type
// E), shfl_xor, sync, cp_async16(dst, src, bytes: the first `bytes` of 16 from src, zeros
// after), cp_commit, cp_wait<N>, exp2, pack2<E>(lo, hi) (two floats rounded to one
// 32-bit pair of 16-bit E, lo in the low half), cvt<E>(x) (one float to E's storage
// type), tf32(x) (a float rounded to TF32, cvt.rna: the bits of a float with the low 13
// mantissa bits 0), store_u32.
//
// Element types (E): F16, Bf16 (2-byte storage, mma.m16n8k16) and Tf32 (float storage,
// mma.m16n8k8 on operands rounded to TF32). One mma "k step" is 32 bytes of a row in
// every case (16 halves or 8 floats), A is 4 and B 2 registers, C the same 16x8 f32
// fragment, and the ldmatrix patterns below read 16-byte rows (8 halves or 4 floats), so
// the tile code is written once in bytes; only pack_a and gemm_pb's B operand differ.
//
// FlashAttention-2 blocking, 4 warps (128 threads) per block, one m16 row block per warp:
//  forward  one block per (batch, 64 query rows); K/V tiles of kFwdBn keys stream through
//           shared memory (V(j) is fetched while S(j) = Q K(j)^T is computed, K(j+1) while
//           P V(j) is); online softmax in registers (row max by quad shuffles, log2
//           domain); P goes from the S accumulators straight into the P V mma as A
//           fragments; key tiles outside every row's window (above the diagonal, left
//           of a sliding window) are never visited, tiles its edges cross are masked.
//           out = O / l in the input dtype, lse = m + log(l) in float (natural log; -inf
//           and a zero row for a row that sees no key), as the CUDA-core kernel.
//  dK/dV    one block per (batch, 64 keys) (two above hs 128, each owning half of the
//           columns), warp w owns keys 16w..16w+15 and accumulates its columns of
//           dK, dV (16 x hs each) in registers over the query tiles that see its keys
//           (the rows whose windows reach the key tile, nothing else):
//           S^T = K Q^T, P^T = exp2(S^T scale log2e - lse log2e), dP^T = V dO^T,
//           dV += (P Z)^T dO, dS^T = P^T (dP^T Z - D), dK += dS^T Q (scale at the end).
//  dQ       one block per (batch, 64 query rows): S, dP, dS as above by rows, dQ += dS K.
// No atomics: every output element is written by exactly one thread. Z is dropout's
// factor (1/(1-p) or 0) from dropout_hash.h, so the mask is the CPU kernel's bit for bit.
// Shared tiles are [rows][hs rounded up to kHd, + 16 bytes]: the 16-byte pad puts the 8
// rows of every ldmatrix 8x8 matrix in distinct banks; columns hs..kHd and rows past the
// end are zero-filled by cp.async (src-size < 16), so padding adds zeros.
// Inputs are read through row strides (any batch / T strides, unit-stride rows whose
// start addresses are 16-byte aligned: the host side checks and otherwise falls back).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "batch_offset.h"
#include "dropout_hash.h"

#if defined(__CUDACC__)
#define ATTNEXT_MMA_FN __device__ __forceinline__
#define ATTNEXT_MMA_HD __host__ __device__ __forceinline__ constexpr
#define ATTNEXT_UNROLL _Pragma("unroll")
#else
#define ATTNEXT_MMA_FN inline
#define ATTNEXT_MMA_HD inline constexpr
#define ATTNEXT_UNROLL
#endif

namespace attnext {
namespace mma {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kBm = 16 * kWarps;  // query rows per forward / dQ block: one m16 block per warp
constexpr int kMaxBatchDims = 16;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Element types. T: the storage type (raw 16-bit values for the half types); kK: the k
// extent of one mma instruction (32 bytes of T); kEpc: elements per 16-byte chunk.
struct F16 {
  using T = uint16_t;
  static constexpr bool kBf16 = false, kTf32 = false;
  static constexpr int kBytes = 2;
};
struct Bf16 {
  using T = uint16_t;
  static constexpr bool kBf16 = true, kTf32 = false;
  static constexpr int kBytes = 2;
};
struct Tf32 {
  using T = float;
  static constexpr bool kBf16 = false, kTf32 = true;
  static constexpr int kBytes = 4;
};
template <class E>
constexpr int kK = 32 / E::kBytes;
template <class E>
constexpr int kEpc = 16 / E::kBytes;

// Tile sizes for a head size rounded up to kHd (a multiple of 32, <= 256) and element
// type E. Register budget (fp32 accumulators per thread): forward O kHd/2 + S kFwdBn/2;
// dQ dQ kHd/2 + S, dP kDqBn/2 each; dK/dV 2 kKvCols + S^T, dP^T kKvBm/2 each, where
// kKvCols = kHd up to 128 and kHd / 2 above: a dK/dV block then owns half of the
// columns of dK and dV (kKvSplit = 2 blocks per key tile; S^T and dP^T, full-width dot
// products, are computed by both). Tiles shrink with the row's bytes, so float32 (twice a
// 16-bit row) gets half the keys / queries: shared memory for two blocks per SM, the
// forward's registers (O is 16 x kHd per warp either way) without spills, and the
// 16-bit backward up to kHd 256 within the 99 KiB of an sm_86 / sm_89 block.
template <int kHd, class E>
struct Tiles {
  static_assert(kHd % 32 == 0 && kHd >= 32 && kHd <= 256, "kHd: a multiple of 32 in [32, 256]");
  static constexpr int kRowBytes = kHd * E::kBytes;
  static constexpr int kLd = kHd + kEpc<E>;                // shared row stride, elements (+16 bytes)
  // keys per forward / dQ K/V tile: 16 where a 32-key tile's S (and dP) fragments made
  // ptxas spill next to the 16 x kHd accumulator (kHd 256; TF32 above 128 in the dQ kernel)
  static constexpr int kFwdBn = kRowBytes <= 256 ? 64 : (kHd >= 256 || kRowBytes > 512) ? 16 : 32;
  static constexpr int kDqBn = kRowBytes <= 256 ? 64 : (kHd >= 256 || (E::kTf32 && kHd > 128)) ? 16 : 32;
  static constexpr int kKvBn = 16 * kWarps;                  // keys per dK/dV block
  static constexpr int kKvBm = kRowBytes <= 128 ? 64 : kRowBytes <= 256 ? 32 : 16;  // queries per dK/dV tile
  static constexpr int kKvSplit = kHd > 128 ? 2 : 1;         // dK/dV blocks per key tile
  static constexpr int kKvCols = kHd / kKvSplit;             // dK, dV columns per dK/dV block
  static constexpr int64_t kRow = int64_t(kLd) * E::kBytes;  // bytes per shared row
  // Dynamic shared memory, bytes. stages: 2 = the next K/V (or Q/dO) tile is prefetched
  // into a second buffer while this one is used, 1 = loaded after it (less memory).
  static constexpr int64_t fwd_smem() { return int64_t(kBm + 2 * kFwdBn) * kRow; }
  static constexpr int64_t dq_smem(int stages) { return (int64_t(2 * kBm) + 2 * stages * kDqBn) * kRow; }
  static constexpr int64_t dkdv_smem(int stages) {
    return (int64_t(2 * kKvBn) + 2 * stages * kKvBm) * kRow + int64_t(stages) * kKvBm * 3 * 4;
  }
};

// ------------------------------------------------------------------ fragment layouts
// mma.m16n8k16 (.f16 / .bf16 inputs, .f32 accumulators), PTX ISA "Matrix Fragments for
// mma.m16n8k16 with floating point type": lane = 4 * group + tig (group = lane / 4 is
// the row group, tig = lane % 4 the thread in the group).
//   C/D 16x8 f32, c0..c3:  row = group (c0, c1) or group + 8 (c2, c3), col = 2 tig + (i & 1)
//   A 16x16, four 32-bit registers of two elements (low half first):
//        reg r holds row group + 8 (r & 1), cols 2 tig + {0, 1} + 8 (r >> 1)
//   B 16x8 (k x n), two registers: reg r holds k = 2 tig + {0, 1} + 8 r, n = group
// So the C fragments of two adjacent n8 tiles (columns 16 kk .. 16 kk + 15) rounded to
// 16 bits are exactly the A fragment of k-step kk of the next product: the P V, dS K,
// P^T dO and dS^T Q products take their A operand from registers (pack_a below).
// mma.m16n8k8 .tf32 ("... m16n8k8 with .tf32 type"): C as above;
//   A 16x8, four registers of one element: reg r holds row group + 8 (r & 1), col tig + 4 (r >> 1)
//   B 8x8, two registers: reg r holds k = tig + 4 r, n = group
// Here a C fragment's column pair (2 tig, 2 tig + 1) is not an A fragment's (tig,
// tig + 4), but a product sums over k in any order: pack_a maps logical k tig to column
// 2 tig and tig + 4 to 2 tig + 1, and gemm_pb reads B's rows in the same order.
ATTNEXT_MMA_HD int c_row(int lane, int i) { return (lane >> 2) + 8 * (i >> 1); }
ATTNEXT_MMA_HD int c_col(int lane, int i) { return 2 * (lane & 3) + (i & 1); }

// ldmatrix .x4: lane supplies the address of row (lane & 7) of 8x8 b16 matrix (lane >> 3),
// and receives in register q the pair (row lane / 4, cols 2 (lane % 4) + {0, 1}) of
// matrix q, or with .trans the pair (rows 2 (lane % 4) + {0, 1}, col lane / 4). On float
// rows a matrix is 8 x 4 floats and a register the float (row lane / 4, col lane % 4).
// Pattern A: matrix q at (row 8 (q & 1), 16-byte chunk (q >> 1)) of a 16-row block.
//   Without .trans on a row-major [m][k] block: registers = the A fragment (either
//   element type). With .trans on a [k][n] block of halves: registers = B fragments
//   {b0, b1} of n tile 0, then of n tile 1.
// Pattern B: matrix q at (row 8 (q >> 1), chunk (q & 1)). Without .trans on an [n][k]
//   block (B^T stored by rows, e.g. K for Q K^T): B fragments of n tiles 0 and 1.
// Column offsets are in elements: chunk c starts at element c * epc (kEpc<E>).
ATTNEXT_MMA_HD int ldsm_a_row(int lane) { return (lane & 7) + 8 * ((lane >> 3) & 1); }
ATTNEXT_MMA_HD int ldsm_a_col(int lane, int epc) { return epc * (lane >> 4); }
ATTNEXT_MMA_HD int ldsm_b_row(int lane) { return (lane & 7) + 8 * (lane >> 4); }
ATTNEXT_MMA_HD int ldsm_b_col(int lane, int epc) { return epc * ((lane >> 3) & 1); }

// --------------------------------------------------------------------------- params

// Rows of a (..., T, C) tensor: any batch and T strides, unit-stride rows.
struct Rows {
  int64_t sizes[kMaxBatchDims];
  int64_t strides[kMaxBatchDims];
  int nbatch;
  int64_t stride_t;
  ATTNEXT_HD int64_t batch_offset(int64_t b) const { return ::attnext::batch_offset(sizes, strides, nbatch, b); }
};

// Tensors hold E::T elements (the kernels cast). out, dq, dk, dv are contiguous
// (BH, T or S, hs); lse, D contiguous (BH, T) floats.
struct Params {
  const void* q;
  const void* k;
  const void* v;
  const void* dout;
  Rows qa, ka, va, da;
  void* out;         // forward
  float* lse_out;    // forward
  const float* lse;  // backward
  const float* D;    // backward: rowsum(dO * O)
  void* dq;
  void* dk;
  void* dv;
  int64_t BH, T, S;
  int64_t shift;  // row t's diagonal key: t + shift
  // window_size (left, right) around the diagonal, -1 = unbounded on that side; the
  // defaults are the causal window (the host sets both)
  int64_t wl = -1, wr = 0;
  int hs;         // head size (q, k, v alike)
  float scale;
  float scale_log2;  // scale * log2(e): scores in the log2 domain
  bool drop;
  uint32_t stream_key, threshold;
  float inv_keep;
  const int64_t* rng;  // [seed, offset] on the device (CUDA-graph safe), or null: stream_key

  // The dropout stream: from rng when the call drew its seed on the device.
  ATTNEXT_HD uint32_t key() const { return rng ? dropout_stream_key(rng[0], rng[1]) : stream_key; }
  // The keys row t sees: [first(t), visible(t)), both clamped to [0, S] (as the CPU
  // kernels' AttnGeometry); nondecreasing in t.
  ATTNEXT_HD int64_t visible(int64_t t) const {
    if (wr < 0) return S;
    const int64_t n = t + shift + wr + 1;
    return n < 0 ? 0 : (n > S ? S : n);
  }
  ATTNEXT_HD int64_t first(int64_t t) const {
    if (wl < 0) return 0;
    const int64_t f = t + shift - wl;
    return f < 0 ? 0 : (f > S ? S : f);
  }
  // whether row t sees no key at all: its output is 0 and its lse -inf
  ATTNEXT_HD bool sees_none(int64_t t) const { return first(t) >= visible(t); }
  // The query rows that see some key of [k0, k1): from first_query(k0) (the first row
  // whose window reaches past k0) to before end_query(k1) (the first row whose window
  // starts at or after k1).
  ATTNEXT_HD int64_t first_query(int64_t k0) const {
    if (wr < 0) return 0;
    const int64_t t = k0 - shift - wr;
    return t < 0 ? 0 : (t > T ? T : t);
  }
  ATTNEXT_HD int64_t end_query(int64_t k1) const {
    if (wl < 0) return T;
    const int64_t t = k1 + wl - shift;
    return t < 0 ? 0 : (t > T ? T : t);
  }
  // Whether the rows [t_lo, t_hi] all see all keys [k_lo, k_hi] (windows are
  // nondecreasing in t): a tile where this holds needs no mask.
  ATTNEXT_HD bool all_see(int64_t t_lo, int64_t t_hi, int64_t k_lo, int64_t k_hi) const {
    return visible(t_lo) > k_hi && first(t_hi) <= k_lo;
  }
};

// ------------------------------------------------------------------------ building blocks

// Rows [0, n) of x + base + r * stride (row r of the tile) into sm[r][kLd] for r < kRows,
// columns [0, hs); zeros in rows >= n and columns >= hs up to kHd. All threads take part;
// the copies land at the caller's next cp_wait.
template <class Ops, class E, int kRows, int kHd>
ATTNEXT_MMA_FN void load_rows(typename E::T* sm, const void* x_, int64_t base, int64_t stride, int64_t n, int hs,
                              int tid) {
  using T = typename E::T;
  constexpr int kE = kEpc<E>, kChunks = kHd / kE, kLd = kHd + kE, kTotal = kRows * kChunks;
  const T* x = static_cast<const T*>(x_);
  ATTNEXT_UNROLL
  for (int it = 0; it < (kTotal + kThreads - 1) / kThreads; ++it) {
    const int i = it * kThreads + tid;
    if (kTotal % kThreads != 0 && i >= kTotal) break;
    const int r = i / kChunks, c = (i % kChunks) * kE;
    const bool ok = r < n && c < hs;
    const int bytes = ok ? E::kBytes * (hs - c < kE ? hs - c : kE) : 0;
    Ops::cp_async16(sm + r * kLd + c, ok ? x + base + r * stride + c : x, bytes);
  }
}

// Registers read from shared memory as mma operands: TF32 operands are rounded (cvt.rna);
// 16-bit ones are used as they are.
template <class Ops, class E, int N>
ATTNEXT_MMA_FN void to_operand(uint32_t (&r)[N]) {
  if constexpr (E::kTf32) {
    ATTNEXT_UNROLL
    for (int i = 0; i < N; ++i) {
      float x;
      std::memcpy(&x, &r[i], 4);
      r[i] = Ops::tf32(x);
    }
  }
}

// acc (16 x kN, C fragments of kN / 8 n tiles) += A B^T over kSteps k steps (kK<E>
// columns each): A = 16 rows at As, B = kN rows at Bs, both row-major with stride kLd.
template <class Ops, class E, int kLd, int kN, int kSteps>
ATTNEXT_MMA_FN void gemm_abt(float (&acc)[kN / 8][4], const typename E::T* As, const typename E::T* Bs, int lane) {
  static_assert(kN % 16 == 0, "pairs of n tiles");
  ATTNEXT_UNROLL
  for (int kk = 0; kk < kSteps; ++kk) {
    uint32_t a[4];
    Ops::ldsm_x4(a, As + ldsm_a_row(lane) * kLd + kk * kK<E> + ldsm_a_col(lane, kEpc<E>));
    to_operand<Ops, E>(a);
    ATTNEXT_UNROLL
    for (int np = 0; np < kN / 16; ++np) {
      uint32_t b[4];
      Ops::ldsm_x4(b, Bs + (np * 16 + ldsm_b_row(lane)) * kLd + kk * kK<E> + ldsm_b_col(lane, kEpc<E>));
      to_operand<Ops, E>(b);
      Ops::template mma<E>(acc[2 * np], a, b[0], b[1]);
      Ops::template mma<E>(acc[2 * np + 1], a, b[2], b[3]);
    }
  }
}

// The A fragment of k-step kk from C fragments c: 16-bit types take columns 16 kk ..
// 16 kk + 15 (two n tiles) in the m16n8k16 A layout; TF32 takes the n tile kk, its
// column pair (2 tig, 2 tig + 1) as logical k (tig, tig + 4).
template <class Ops, class E, int kNt>
ATTNEXT_MMA_FN void pack_a(uint32_t (&a)[4], const float (&c)[kNt][4], int kk) {
  if constexpr (E::kTf32) {
    a[0] = Ops::tf32(c[kk][0]);  // row g,     col 2t     (logical k t)
    a[1] = Ops::tf32(c[kk][2]);  // row g + 8, col 2t
    a[2] = Ops::tf32(c[kk][1]);  // row g,     col 2t + 1 (logical k t + 4)
    a[3] = Ops::tf32(c[kk][3]);  // row g + 8, col 2t + 1
  } else {
    a[0] = Ops::template pack2<E>(c[2 * kk][0], c[2 * kk][1]);          // row g,     cols 2t, 2t+1
    a[1] = Ops::template pack2<E>(c[2 * kk][2], c[2 * kk][3]);          // row g + 8, cols 2t, 2t+1
    a[2] = Ops::template pack2<E>(c[2 * kk + 1][0], c[2 * kk + 1][1]);  // row g,     cols 8 + 2t, ..
    a[3] = Ops::template pack2<E>(c[2 * kk + 1][2], c[2 * kk + 1][3]);  // row g + 8, cols 8 + 2t, ..
  }
}

// acc (16 x kN) += P B: P = 16 x (kSteps kK<E>) from this warp's C fragments p (rounded
// to E), B = those rows at Bs ([k][n], row-major, stride kLd). 16-bit B comes by
// ldmatrix.trans; TF32 B by 32-bit shared loads in pack_a's k order (row k0 + 2 tig for
// b0, + 1 for b1, column n0 + group: with kLd = 4 mod 32 the 32 lanes hit 32 banks).
template <class Ops, class E, int kLd, int kN, int kSteps>
ATTNEXT_MMA_FN void gemm_pb(float (&acc)[kN / 8][4], const float (&p)[kSteps * kK<E> / 8][4],
                            const typename E::T* Bs, int lane) {
  static_assert(kN % 16 == 0, "pairs of n tiles");
  ATTNEXT_UNROLL
  for (int kk = 0; kk < kSteps; ++kk) {
    uint32_t a[4];
    pack_a<Ops, E, kSteps * kK<E> / 8>(a, p, kk);
    if constexpr (E::kTf32) {
      const float* b_row = Bs + (kk * 8 + 2 * (lane & 3)) * kLd + (lane >> 2);
      ATTNEXT_UNROLL
      for (int nt = 0; nt < kN / 8; ++nt) {
        Ops::template mma<E>(acc[nt], a, Ops::tf32(b_row[8 * nt]), Ops::tf32(b_row[kLd + 8 * nt]));
      }
    } else {
      ATTNEXT_UNROLL
      for (int np = 0; np < kN / 16; ++np) {
        uint32_t b[4];
        Ops::ldsm_x4_t(b, Bs + (kk * 16 + ldsm_a_row(lane)) * kLd + np * 16 + ldsm_a_col(lane, kEpc<E>));
        Ops::template mma<E>(acc[2 * np], a, b[0], b[1]);
        Ops::template mma<E>(acc[2 * np + 1], a, b[2], b[3]);
      }
    }
  }
}

// Writes the pair (x0, x1) to row[c], row[c + 1] where c, c + 1 < n (n = row length).
template <class Ops, class E>
ATTNEXT_MMA_FN void store_pair(typename E::T* row, int c, int n, float x0, float x1) {
  if constexpr (!E::kTf32) {
    if ((n & 1) == 0) {
      if (c < n) Ops::store_u32(row + c, Ops::template pack2<E>(x0, x1));  // 4-byte aligned: n, c even
      return;
    }
  }
  if (c < n) row[c] = Ops::template cvt<E>(x0);
  if (c + 1 < n) row[c + 1] = Ops::template cvt<E>(x1);
}

// Columns [k0, k0 + n) of the tile that row limit `vis` lets through: the index of the
// first column it hides, clamped to [0, n]. With the row's first key as `vis`: the
// first column it shows.
ATTNEXT_MMA_HD int first_hidden(int64_t vis, int64_t k0, int n) {
  const int64_t d = vis - k0;
  return d < 0 ? 0 : (d > n ? n : static_cast<int>(d));
}

// ---------------------------------------------------------------------------- forward

// One online-softmax step on this warp's scores s (C fragments: row (lane >> 2) + 8 h for
// elements 2h, 2h + 1; key k0 + 8 nt + 2 (lane & 3) + (i & 1)). In place: s becomes the
// unnormalised weights exp2(z - m) of the kept entries (dropped and hidden ones 0); m
// (log2 units) and l (this thread's part of the row sum, all weights, dropout or not)
// are updated and o is rescaled by exp2(m_old - m_new). Hidden entries (key outside the
// row's window [fst, vis)) count as absent, visible ones as they are: a NaN or +inf
// score makes l and so the row NaN, as torch.softmax and the CUDA-core kernel do. While every visible
// score so far is -inf the step subtracts 0 instead of m (-inf - -inf would be NaN), so
// the row stays empty until a finite score arrives; a row that saw keys but only -inf
// scores ends NaN (see the end of the forward).
template <class Ops, bool kMask, int kNt, int kDt>
ATTNEXT_MMA_FN void softmax_step(float (&s)[kNt][4], float (&o)[kDt][4], float (&m)[2], float (&l)[2],
                                 const Params& p, int64_t k0, const int64_t (&fst)[2], const int64_t (&vis)[2],
                                 const uint32_t (&rkey)[2], int lane) {
  const int c0 = 2 * (lane & 3);
  ATTNEXT_UNROLL
  for (int h = 0; h < 2; ++h) {
    const int lo = first_hidden(fst[h], k0, 8 * kNt), lim = first_hidden(vis[h], k0, 8 * kNt);
    float mx = m[h];
    ATTNEXT_UNROLL
    for (int nt = 0; nt < kNt; ++nt) {
      ATTNEXT_UNROLL
      for (int e = 0; e < 2; ++e) {
        float& x = s[nt][2 * h + e];
        const int j = 8 * nt + c0 + e;
        x = (kMask && (j >= lim || j < lo)) ? -INFINITY : x * p.scale_log2;
        mx = fmaxf(mx, x);
      }
    }
    mx = fmaxf(mx, Ops::shfl_xor(mx, 1));
    mx = fmaxf(mx, Ops::shfl_xor(mx, 2));
    const float alpha = m[h] == -INFINITY ? 0.f : Ops::exp2(m[h] - mx);
    const float msub = mx == -INFINITY ? 0.f : mx;
    m[h] = mx;
    float sum = 0.f;
    ATTNEXT_UNROLL
    for (int nt = 0; nt < kNt; ++nt) {
      ATTNEXT_UNROLL
      for (int e = 0; e < 2; ++e) {
        const int j = 8 * nt + c0 + e;
        float& x = s[nt][2 * h + e];
        const float w = (kMask && (j >= lim || j < lo)) ? 0.f : Ops::exp2(x - msub);
        sum += w;
        const bool keep = !p.drop || dropout_keep(rkey[h], static_cast<uint32_t>(k0 + j), p.threshold);
        x = keep ? w : 0.f;
      }
    }
    l[h] = l[h] * alpha + sum;
    ATTNEXT_UNROLL
    for (int dt = 0; dt < kDt; ++dt) {
      o[dt][2 * h] *= alpha;
      o[dt][2 * h + 1] *= alpha;
    }
  }
}

// One block: query rows [t0, t0 + 64) of batch b, item = blockIdx.x (longest tiles first).
template <class Ops, class E, int kHd>
ATTNEXT_MMA_FN void fwd_block(const Params& p, int64_t item, int tid, typename E::T* smem) {
  using L = Tiles<kHd, E>;
  using T = typename E::T;
  constexpr int kLd = L::kLd, kBn = L::kFwdBn, kNt = kBn / 8, kDt = kHd / 8;
  T* Qs = smem;             // [kBm][kLd]
  T* Ks = Qs + kBm * kLd;   // [kBn][kLd]
  T* Vs = Ks + kBn * kLd;   // [kBn][kLd]
  const int lane = tid & 31, warp = tid >> 5;
  const int64_t nqt = (p.T + kBm - 1) / kBm;
  const int64_t b = item % p.BH;
  const int64_t t0 = (nqt - 1 - item / p.BH) * kBm;
  const int64_t nr = p.T - t0 < kBm ? p.T - t0 : kBm;
  // keys [kt0 kBn, kv_end) are seen by some row: the first row has the leftmost window
  // start, the last the rightmost end; nkt tiles from kt0 on
  const int64_t kv_end = p.visible(t0 + nr - 1), kt0 = p.first(t0) / kBn;
  const int64_t nkt = kv_end > kt0 * kBn ? (kv_end + kBn - 1) / kBn - kt0 : 0;
  const int64_t kb = p.ka.batch_offset(b), vb = p.va.batch_offset(b);
  const int64_t wt0 = t0 + 16 * warp;  // this warp's rows: wt0 .. wt0 + 15

  int64_t row[2], vis[2], fst[2];
  uint32_t rkey[2];
  ATTNEXT_UNROLL
  for (int h = 0; h < 2; ++h) {
    row[h] = t0 + 16 * warp + c_row(lane, 2 * h);
    vis[h] = p.visible(row[h]);
    fst[h] = p.first(row[h]);
    rkey[h] = p.drop ? dropout_row_key(p.key(), b, row[h]) : 0u;
  }
  float o[kDt][4];
  ATTNEXT_UNROLL
  for (int dt = 0; dt < kDt; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

  if (nkt > 0) {
    load_rows<Ops, E, kBm, kHd>(Qs, p.q, p.qa.batch_offset(b) + t0 * p.qa.stride_t, p.qa.stride_t, nr, p.hs, tid);
    const int64_t ks = kt0 * kBn;
    load_rows<Ops, E, kBn, kHd>(Ks, p.k, kb + ks * p.ka.stride_t, p.ka.stride_t, kv_end - ks < kBn ? kv_end - ks : kBn,
                                p.hs, tid);
    Ops::cp_commit();
  }
  for (int64_t j = 0; j < nkt; ++j) {
    const int64_t k0 = (kt0 + j) * kBn;
    Ops::template cp_wait<0>();
    Ops::sync();  // K(j) (and Q) landed; every warp is done with V(j - 1)
    const int64_t nv = kv_end - k0 < kBn ? kv_end - k0 : kBn;
    load_rows<Ops, E, kBn, kHd>(Vs, p.v, vb + k0 * p.va.stride_t, p.va.stride_t, nv, p.hs, tid);
    Ops::cp_commit();
    float s[kNt][4];
    ATTNEXT_UNROLL
    for (int nt = 0; nt < kNt; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
    gemm_abt<Ops, E, kLd, kBn, kHd / kK<E>>(s, Qs + 16 * warp * kLd, Ks, lane);
    if (!p.all_see(wt0, wt0 + 15, k0, k0 + kBn - 1)) {
      softmax_step<Ops, true>(s, o, m, l, p, k0, fst, vis, rkey, lane);
    } else {
      softmax_step<Ops, false>(s, o, m, l, p, k0, fst, vis, rkey, lane);
    }
    Ops::template cp_wait<0>();
    Ops::sync();  // V(j) landed; every warp is done with K(j)
    if (j + 1 < nkt) {
      const int64_t k1 = k0 + kBn;
      load_rows<Ops, E, kBn, kHd>(Ks, p.k, kb + k1 * p.ka.stride_t, p.ka.stride_t,
                               kv_end - k1 < kBn ? kv_end - k1 : kBn, p.hs, tid);
      Ops::cp_commit();
    }
    gemm_pb<Ops, E, kLd, kHd, kBn / kK<E>>(o, s, Vs, lane);
  }

  float lsum[2];
  ATTNEXT_UNROLL
  for (int h = 0; h < 2; ++h) {
    lsum[h] = l[h] + Ops::shfl_xor(l[h], 1);
    lsum[h] += Ops::shfl_xor(lsum[h], 2);
  }
  const int c0 = 2 * (lane & 3);
  ATTNEXT_UNROLL
  for (int h = 0; h < 2; ++h) {
    if (row[h] >= p.T) continue;
    const bool any = lsum[h] != 0.f;  // NaN != 0: a NaN row stays NaN
    // l == 0: a row that sees no key is 0 (lse -inf), whatever the tile's P V products
    // made of its zero weights (0 * inf in v is NaN); one whose scores were all -inf is
    // NaN, as torch.softmax of it
    const bool blind = p.sees_none(row[h]);
    const float inv = any ? p.inv_keep / lsum[h] : NAN;
    T* orow = static_cast<T*>(p.out) + (b * p.T + row[h]) * p.hs;
    ATTNEXT_UNROLL
    for (int dt = 0; dt < kDt; ++dt) {
      const float x0 = blind ? 0.f : o[dt][2 * h] * inv, x1 = blind ? 0.f : o[dt][2 * h + 1] * inv;
      store_pair<Ops, E>(orow, 8 * dt + c0, p.hs, x0, x1);
    }
    if ((lane & 3) == 0) {
      p.lse_out[b * p.T + row[h]] = any ? m[h] * kLn2 + logf(lsum[h]) : (blind ? -INFINITY : NAN);
    }
  }
}

// --------------------------------------------------------------------------- backward

// dQ block, per key tile: s (scores) and dp (dO V^T) by rows as in the forward; in place s
// becomes dS = P (dP Z - D) with P = exp2(s scale log2e - lse log2e), hidden entries 0.
template <class Ops, bool kMask, int kNt>
ATTNEXT_MMA_FN void ds_rows(float (&s)[kNt][4], const float (&dp)[kNt][4], const Params& p, int64_t k0,
                            const int64_t (&fst)[2], const int64_t (&vis)[2], const uint32_t (&rkey)[2],
                            const float (&lse2)[2], const float (&Dr)[2], int lane) {
  const int c0 = 2 * (lane & 3);
  ATTNEXT_UNROLL
  for (int h = 0; h < 2; ++h) {
    const int lo = first_hidden(fst[h], k0, 8 * kNt), lim = first_hidden(vis[h], k0, 8 * kNt);
    ATTNEXT_UNROLL
    for (int nt = 0; nt < kNt; ++nt) {
      ATTNEXT_UNROLL
      for (int e = 0; e < 2; ++e) {
        const int j = 8 * nt + c0 + e;
        const int i = 2 * h + e;
        const bool on = (!kMask || (j < lim && j >= lo)) && lse2[h] != -INFINITY;
        const float pr = on ? Ops::exp2(s[nt][i] * p.scale_log2 - lse2[h]) : 0.f;
        const float z = !p.drop ? 1.f
                        : dropout_keep(rkey[h], static_cast<uint32_t>(k0 + j), p.threshold) ? p.inv_keep
                                                                                            : 0.f;
        s[nt][i] = on ? pr * (dp[nt][i] * z - Dr[h]) : 0.f;
      }
    }
  }
}

template <class Ops, class E, int kHd>
ATTNEXT_MMA_FN void dq_block(const Params& p, int64_t item, int tid, typename E::T* smem, int stages) {
  using L = Tiles<kHd, E>;
  using T = typename E::T;
  constexpr int kLd = L::kLd, kBn = L::kDqBn, kNt = kBn / 8, kDt = kHd / 8;
  T* Qs = smem;              // [kBm][kLd]
  T* dOs = Qs + kBm * kLd;   // [kBm][kLd]
  T* KV = dOs + kBm * kLd;   // per stage: K [kBn][kLd], V [kBn][kLd]
  const int lane = tid & 31, warp = tid >> 5;
  const int64_t nqt = (p.T + kBm - 1) / kBm;
  const int64_t b = item % p.BH;
  const int64_t t0 = (nqt - 1 - item / p.BH) * kBm;
  const int64_t nr = p.T - t0 < kBm ? p.T - t0 : kBm;
  // key tiles kt0 .. kt0 + nkt - 1, as in the forward
  const int64_t kv_end = p.visible(t0 + nr - 1), kt0 = p.first(t0) / kBn;
  const int64_t nkt = kv_end > kt0 * kBn ? (kv_end + kBn - 1) / kBn - kt0 : 0;
  const int64_t kb = p.ka.batch_offset(b), vb = p.va.batch_offset(b);
  const int64_t wt0 = t0 + 16 * warp;  // this warp's rows: wt0 .. wt0 + 15

  int64_t row[2], vis[2], fst[2];
  uint32_t rkey[2];
  float lse2[2], Dr[2];
  ATTNEXT_UNROLL
  for (int h = 0; h < 2; ++h) {
    row[h] = t0 + 16 * warp + c_row(lane, 2 * h);
    vis[h] = p.visible(row[h]);
    fst[h] = p.first(row[h]);
    rkey[h] = p.drop ? dropout_row_key(p.key(), b, row[h]) : 0u;
    lse2[h] = row[h] < p.T ? p.lse[b * p.T + row[h]] * kLog2e : -INFINITY;
    Dr[h] = row[h] < p.T ? p.D[b * p.T + row[h]] : 0.f;
  }
  float dq[kDt][4];
  ATTNEXT_UNROLL
  for (int dt = 0; dt < kDt; ++dt) dq[dt][0] = dq[dt][1] = dq[dt][2] = dq[dt][3] = 0.f;

  const auto load_kv = [&](int64_t j, int buf) {
    const int64_t k0 = (kt0 + j) * kBn, n = kv_end - k0 < kBn ? kv_end - k0 : kBn;
    T* Ks = KV + buf * 2 * kBn * kLd;
    load_rows<Ops, E, kBn, kHd>(Ks, p.k, kb + k0 * p.ka.stride_t, p.ka.stride_t, n, p.hs, tid);
    load_rows<Ops, E, kBn, kHd>(Ks + kBn * kLd, p.v, vb + k0 * p.va.stride_t, p.va.stride_t, n, p.hs, tid);
  };
  if (nkt > 0) {
    load_rows<Ops, E, kBm, kHd>(Qs, p.q, p.qa.batch_offset(b) + t0 * p.qa.stride_t, p.qa.stride_t, nr, p.hs, tid);
    load_rows<Ops, E, kBm, kHd>(dOs, p.dout, p.da.batch_offset(b) + t0 * p.da.stride_t, p.da.stride_t, nr, p.hs,
                             tid);
    load_kv(0, 0);
    Ops::cp_commit();
  }
  for (int64_t j = 0; j < nkt; ++j) {
    const int64_t k0 = (kt0 + j) * kBn;
    const int buf = stages == 2 ? static_cast<int>(j & 1) : 0;
    if (stages == 2 && j + 1 < nkt) {
      load_kv(j + 1, buf ^ 1);  // that buffer was last read before the previous iteration's closing sync
      Ops::cp_commit();
      Ops::template cp_wait<1>();
    } else {
      Ops::template cp_wait<0>();
    }
    Ops::sync();  // tile j landed for every thread
    const T* Ks = KV + buf * 2 * kBn * kLd;
    const T* Vs = Ks + kBn * kLd;
    float s[kNt][4], dp[kNt][4];
    ATTNEXT_UNROLL
    for (int nt = 0; nt < kNt; ++nt) {
      s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
      dp[nt][0] = dp[nt][1] = dp[nt][2] = dp[nt][3] = 0.f;
    }
    gemm_abt<Ops, E, kLd, kBn, kHd / kK<E>>(s, Qs + 16 * warp * kLd, Ks, lane);
    gemm_abt<Ops, E, kLd, kBn, kHd / kK<E>>(dp, dOs + 16 * warp * kLd, Vs, lane);
    if (!p.all_see(wt0, wt0 + 15, k0, k0 + kBn - 1)) {
      ds_rows<Ops, true>(s, dp, p, k0, fst, vis, rkey, lse2, Dr, lane);
    } else {
      ds_rows<Ops, false>(s, dp, p, k0, fst, vis, rkey, lse2, Dr, lane);
    }
    gemm_pb<Ops, E, kLd, kHd, kBn / kK<E>>(dq, s, Ks, lane);  // dQ += dS K
    Ops::sync();  // every warp is done with tile j's buffer
    if (stages == 1 && j + 1 < nkt) {
      load_kv(j + 1, 0);
      Ops::cp_commit();
    }
  }

  const int c0 = 2 * (lane & 3);
  ATTNEXT_UNROLL
  for (int h = 0; h < 2; ++h) {
    if (row[h] >= p.T) continue;
    T* drow = static_cast<T*>(p.dq) + (b * p.T + row[h]) * p.hs;
    ATTNEXT_UNROLL
    for (int dt = 0; dt < kDt; ++dt) {
      store_pair<Ops, E>(drow, 8 * dt + c0, p.hs, dq[dt][2 * h] * p.scale, dq[dt][2 * h + 1] * p.scale);
    }
  }
}

// dK/dV block, per query tile: st = S^T and dpt = dP^T by key rows (row = key (lane >> 2)
// + 8 (i >> 1) of the warp's 16, column = query t0 + 8 nt + 2 (lane & 3) + (i & 1)). In
// place: st becomes P^T Z (dropped weights, for dV), dpt becomes dS^T. Per-query lse
// (log2 units), D and dropout row keys come from shared memory (stats of this tile).
template <class Ops, bool kMask, int kNt>
ATTNEXT_MMA_FN void ds_cols(float (&st)[kNt][4], float (&dpt)[kNt][4], const Params& p, int64_t t0,
                            const int64_t (&key)[2], const float* lse2, const float* Dq, const uint32_t* rkey,
                            int lane) {
  const int c0 = 2 * (lane & 3);
  ATTNEXT_UNROLL
  for (int nt = 0; nt < kNt; ++nt) {
    ATTNEXT_UNROLL
    for (int i = 0; i < 4; ++i) {
      const int qi = 8 * nt + c0 + (i & 1);
      const int64_t kj = key[i >> 1];
      const bool on = (!kMask || (kj < p.visible(t0 + qi) && kj >= p.first(t0 + qi))) && lse2[qi] != -INFINITY;
      const float pr = on ? Ops::exp2(st[nt][i] * p.scale_log2 - lse2[qi]) : 0.f;
      const float z = !p.drop ? 1.f
                      : dropout_keep(rkey[qi], static_cast<uint32_t>(kj), p.threshold) ? p.inv_keep
                                                                                       : 0.f;
      dpt[nt][i] = on ? pr * (dpt[nt][i] * z - Dq[qi]) : 0.f;
      st[nt][i] = pr * z;
    }
  }
}

template <class Ops, class E, int kHd>
ATTNEXT_MMA_FN void dkdv_block(const Params& p, int64_t item, int tid, typename E::T* smem, int stages) {
  using L = Tiles<kHd, E>;
  using T = typename E::T;
  constexpr int kLd = L::kLd, kBn = L::kKvBn, kBq = L::kKvBm, kNt = kBq / 8, kCols = L::kKvCols, kDt = kCols / 8;
  static_assert(kBn == 16 * kWarps, "one m16 block of keys per warp");
  static_assert(kCols % 16 == 0, "pairs of n tiles");
  T* Ks = smem;             // [kBn][kLd]
  T* Vs = Ks + kBn * kLd;   // [kBn][kLd]
  T* QD = Vs + kBn * kLd;   // per stage: Q [kBq][kLd], dO [kBq][kLd]
  float* stats = reinterpret_cast<float*>(QD + 2 * stages * kBq * kLd);  // per stage: lse2, D, row key [kBq]
  const int lane = tid & 31, warp = tid >> 5;
  // item = (key tile * kKvSplit + column part) * BH + b: key tile 0 (the most query tiles) first
  const int64_t b = item % p.BH;
  const int col0 = static_cast<int>((item / p.BH) % L::kKvSplit) * kCols;  // this block's dK, dV columns
  const int64_t n0 = (item / p.BH / L::kKvSplit) * kBn;
  const int64_t nc = p.S - n0 < kBn ? p.S - n0 : kBn;
  // the query rows that see some key of [n0, n0 + nc): [t_first, t_end)
  const int64_t t_first = p.first_query(n0), t_end = p.end_query(n0 + nc);
  const int64_t nqt = t_first < t_end ? (t_end - t_first + kBq - 1) / kBq : 0;
  const int64_t qb = p.qa.batch_offset(b), db = p.da.batch_offset(b);
  const int64_t warp_key0 = n0 + 16 * warp;  // this warp's keys: warp_key0 .. warp_key0 + 15

  int64_t key[2];
  ATTNEXT_UNROLL
  for (int h = 0; h < 2; ++h) key[h] = n0 + 16 * warp + c_row(lane, 2 * h);
  float dk[kDt][4], dv[kDt][4];
  ATTNEXT_UNROLL
  for (int dt = 0; dt < kDt; ++dt) {
    dk[dt][0] = dk[dt][1] = dk[dt][2] = dk[dt][3] = 0.f;
    dv[dt][0] = dv[dt][1] = dv[dt][2] = dv[dt][3] = 0.f;
  }

  // Q, dO rows of query tile j into stage buffer buf (cp.async), and its stats (plain
  // stores, visible to the block after the next sync).
  const auto load_q = [&](int64_t j, int buf) {
    const int64_t t0 = t_first + j * kBq, n = p.T - t0 < kBq ? p.T - t0 : kBq;
    T* Qs = QD + buf * 2 * kBq * kLd;
    load_rows<Ops, E, kBq, kHd>(Qs, p.q, qb + t0 * p.qa.stride_t, p.qa.stride_t, n, p.hs, tid);
    load_rows<Ops, E, kBq, kHd>(Qs + kBq * kLd, p.dout, db + t0 * p.da.stride_t, p.da.stride_t, n, p.hs, tid);
    float* st = stats + buf * 3 * kBq;
    if (tid < kBq) {
      const int64_t t = t0 + tid;
      st[tid] = t < p.T ? p.lse[b * p.T + t] * kLog2e : -INFINITY;
      st[kBq + tid] = t < p.T ? p.D[b * p.T + t] : 0.f;
      reinterpret_cast<uint32_t*>(st + 2 * kBq)[tid] = p.drop ? dropout_row_key(p.key(), b, t) : 0u;
    }
  };
  if (nqt > 0) {
    load_rows<Ops, E, kBn, kHd>(Ks, p.k, p.ka.batch_offset(b) + n0 * p.ka.stride_t, p.ka.stride_t, nc, p.hs, tid);
    load_rows<Ops, E, kBn, kHd>(Vs, p.v, p.va.batch_offset(b) + n0 * p.va.stride_t, p.va.stride_t, nc, p.hs, tid);
    load_q(0, 0);
    Ops::cp_commit();
  }
  for (int64_t j = 0; j < nqt; ++j) {
    const int64_t t0 = t_first + j * kBq;
    const int buf = stages == 2 ? static_cast<int>(j & 1) : 0;
    if (stages == 2 && j + 1 < nqt) {
      load_q(j + 1, buf ^ 1);  // that buffer was last read before the previous iteration's closing sync
      Ops::cp_commit();
      Ops::template cp_wait<1>();
    } else {
      Ops::template cp_wait<0>();
    }
    Ops::sync();  // tile j (and K, V) landed for every thread
    const T* Qs = QD + buf * 2 * kBq * kLd;
    const T* dOs = Qs + kBq * kLd;
    const float* st_lse = stats + buf * 3 * kBq;
    float st[kNt][4], dpt[kNt][4];
    ATTNEXT_UNROLL
    for (int nt = 0; nt < kNt; ++nt) {
      st[nt][0] = st[nt][1] = st[nt][2] = st[nt][3] = 0.f;
      dpt[nt][0] = dpt[nt][1] = dpt[nt][2] = dpt[nt][3] = 0.f;
    }
    gemm_abt<Ops, E, kLd, kBq, kHd / kK<E>>(st, Ks + 16 * warp * kLd, Qs, lane);    // S^T = K Q^T
    gemm_abt<Ops, E, kLd, kBq, kHd / kK<E>>(dpt, Vs + 16 * warp * kLd, dOs, lane);  // dP^T = V dO^T
    // every (query, key) of the tile is visible when the tile's first query sees the
    // warp's last key and its last query the warp's first key
    if (!p.all_see(t0, t0 + kBq - 1, warp_key0, warp_key0 + 15)) {
      ds_cols<Ops, true>(st, dpt, p, t0, key, st_lse, st_lse + kBq,
                         reinterpret_cast<const uint32_t*>(st_lse + 2 * kBq), lane);
    } else {
      ds_cols<Ops, false>(st, dpt, p, t0, key, st_lse, st_lse + kBq,
                          reinterpret_cast<const uint32_t*>(st_lse + 2 * kBq), lane);
    }
    gemm_pb<Ops, E, kLd, kCols, kBq / kK<E>>(dv, st, dOs + col0, lane);  // dV += (P Z)^T dO
    gemm_pb<Ops, E, kLd, kCols, kBq / kK<E>>(dk, dpt, Qs + col0, lane);  // dK += dS^T Q
    Ops::sync();  // every warp is done with tile j's buffer
    if (stages == 1 && j + 1 < nqt) {
      load_q(j + 1, 0);
      Ops::cp_commit();
    }
  }

  const int c0 = 2 * (lane & 3);
  ATTNEXT_UNROLL
  for (int h = 0; h < 2; ++h) {
    if (key[h] >= p.S) continue;
    T* krow = static_cast<T*>(p.dk) + (b * p.S + key[h]) * p.hs;
    T* vrow = static_cast<T*>(p.dv) + (b * p.S + key[h]) * p.hs;
    ATTNEXT_UNROLL
    for (int dt = 0; dt < kDt; ++dt) {
      store_pair<Ops, E>(krow, col0 + 8 * dt + c0, p.hs, dk[dt][2 * h] * p.scale, dk[dt][2 * h + 1] * p.scale);
      store_pair<Ops, E>(vrow, col0 + 8 * dt + c0, p.hs, dv[dt][2 * h], dv[dt][2 * h + 1]);
    }
  }
}

}  // namespace mma
}  // namespace attnext
