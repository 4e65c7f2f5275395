// The tensor-core attention kernels (csrc/cuda/causal_attention_mma.h) run on the host.
//
// No GPU needed: the tile code is written over a primitive set `Ops`; here EmuOps runs
// every block as 128 std::threads and implements each warp-collective primitive from the
// PTX ISA's own description, independently of the kernel's index helpers:
//   ldmatrix .x4 [.trans]  lane 8q + i supplies row i of matrix q; lane L receives the
//                          pair (row L/4, cols 2(L%4) + {0,1}) of matrix q in register q,
//                          with .trans the pair (rows 2(L%4) + {0,1}, col L/4);
//   mma.m16n8k16 (f32 acc) fragments by the ISA's formulas (groupID = lane >> 2,
//                          threadID_in_group = lane % 4; A: row groupID for a0,a1,a4,a5
//                          else +8, col 2 tig + (i & 1) (+8 for i >= 4); B: row 2 tig +
//                          (i & 1) (+8 for i >= 2), col groupID; C: row groupID (c0, c1)
//                          else +8, col 2 tig + (i & 1));
//   mma.m16n8k8 .tf32      A: row groupID for a0, a2 else +8, col tig for a0, a1 else
//                          tig + 4; B: row tig for b0, tig + 4 for b1, col groupID; C as
//                          above; every operand must already be a TF32 value (low 13
//                          mantissa bits 0), as cvt.rna.tf32 leaves it;
//   cp.async               deferred until the issuing thread's cp.async.wait_group lets
//                          its group land (so a missing wait reads stale shared memory),
//                          16-byte alignment and global bounds checked;
//   shared memory          starts as 0xFF bytes (NaN as float16 / bfloat16 / float).
// Every check runs for float16, bfloat16 and float32 on TF32 tensor cores.
// Checks: the warp products alone against plain matrix products; the C-fragment
// (row, col) mapping of the causal mask and of dropout in the softmax / dS steps against
// the definition; whole forward and backward passes (both tile pipelines, every compiled
// head-size class, odd head sizes, strided nanoGPT-style inputs, T != S with both
// alignments, rows that see no key, dropout) against a float64 reference; guard zones
// around every output against stray writes.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "cuda/causal_attention_mma.h"
#include "dropout_hash.h"
#include "emu_block.h"
#include "host_half.h"

namespace {

using attnext_emu::Barrier;
using attnext_emu::die;
using attnext_emu::max_abs;
using attnext_emu::worse;
using attnext::mma::Bf16;
using attnext::mma::F16;
using attnext::mma::kThreads;
using attnext::mma::Params;
using attnext::mma::Tf32;
using attnext::mma::Tiles;

int g_failures = 0;

void check(bool ok, const std::string& what) {
  if (!ok) {
    ++g_failures;
    std::fprintf(stderr, "FAILED: %s\n", what.c_str());
  }
}

// ------------------------------------------------------------------ 16-bit floats

uint16_t f2bf(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);                     // round to nearest even
  return static_cast<uint16_t>(u >> 16);
}
float bf2f(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}
uint16_t f2h(float x) {
  const host_half h = static_cast<host_half>(x);
  uint16_t u;
  std::memcpy(&u, &h, 2);
  return u;
}
float h2f(uint16_t u) {
  host_half h;
  std::memcpy(&h, &u, 2);
  return static_cast<float>(h);
}
float to_f(bool bf16, uint16_t u) { return bf16 ? bf2f(u) : h2f(u); }
uint16_t from_f(bool bf16, float x) { return bf16 ? f2bf(x) : f2h(x); }

// TF32 as cvt.rna.tf32.f32 defines it: the nearest value with 10 mantissa bits, ties
// away from zero (add half a unit of the kept last bit to the magnitude, truncate);
// inf stays inf, NaN stays NaN.
float tf32_rna(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7f800000u) == 0x7f800000u) {
    if (u & 0x007fffffu) u |= 0x00400000u;  // NaN: quiet, payload kept in the top bits
    u &= 0xffffe000u;
  } else {
    u = (u + 0x1000u) & 0xffffe000u;
  }
  float y;
  std::memcpy(&y, &u, 4);
  return y;
}

// Element type E: storage value <-> float, and its name.
template <class E>
float val(typename E::T u) {
  if constexpr (E::kTf32) {
    return u;
  } else {
    return to_f(E::kBf16, u);
  }
}
template <class E>
typename E::T make(float x) {
  if constexpr (E::kTf32) {
    return x;
  } else {
    return from_f(E::kBf16, x);
  }
}
template <class E>
int kind() {
  return E::kTf32 ? 2 : E::kBf16 ? 1 : 0;
}
template <class E>
const char* ename() {
  return E::kTf32 ? "tf32" : E::kBf16 ? "bf16" : "fp16";
}

// --------------------------------------------------------------------- emulated block

// Exchange slots of one warp, two phases: a collective writes slot[phase], meets the
// warp at the barrier, reads; the next collective uses the other phase, so one barrier
// per collective suffices.
struct Warp {
  Barrier bar{32};
  const uint16_t* ptr[2][32];
  uint32_t a[2][32][4];
  uint32_t b[2][32][2];
  float f[2][32];
};

struct Copy {
  void* dst;
  const void* src;
  int bytes;
};

struct Block {
  explicit Block(int threads) : bar(threads) {}
  Barrier bar;
  Warp warp[4];
  const unsigned char* smem_lo = nullptr;
  const unsigned char* smem_hi = nullptr;
};

struct Lane {
  Block* blk;
  int tid;
  int phase = 0;
  std::vector<Copy> open;
  std::deque<std::vector<Copy>> groups;
};

thread_local Lane* me = nullptr;
std::vector<std::pair<const unsigned char*, const unsigned char*>> g_readable;  // global ranges cp.async may read
std::atomic<int> g_emu_errors{0};
int g_kind = 1;  // element type of the problem being run (kind<E>(), for the mma emulation)

void emu_error(const char* what) {
  if (g_emu_errors.fetch_add(1) < 10) std::fprintf(stderr, "emulation error (thread %d): %s\n", me ? me->tid : -1, what);
}

bool in_smem(const void* p, size_t n) {
  const auto* c = static_cast<const unsigned char*>(p);
  return c >= me->blk->smem_lo && c + n <= me->blk->smem_hi;
}

struct EmuOps {
  static Warp& warp() { return me->blk->warp[me->tid >> 5]; }
  static int lane() { return me->tid & 31; }
  static int next_phase() {
    const int ph = me->phase;
    me->phase ^= 1;
    return ph;
  }

  static void ldsm(uint32_t (&r)[4], const void* pv, bool trans) {
    const auto* p = static_cast<const uint16_t*>(pv);
    if (!in_smem(p, 16) || reinterpret_cast<uintptr_t>(p) % 16 != 0) emu_error("ldmatrix row address");
    Warp& w = warp();
    const int ph = next_phase(), L = lane();
    w.ptr[ph][L] = p;
    w.bar.wait();
    for (int q = 0; q < 4; ++q) {
      uint32_t reg = 0;
      for (int h = 0; h < 2; ++h) {
        uint16_t e;
        if (!trans) {
          e = w.ptr[ph][8 * q + L / 4][2 * (L % 4) + h];
        } else {
          e = w.ptr[ph][8 * q + 2 * (L % 4) + h][L / 4];
        }
        reg |= static_cast<uint32_t>(e) << (16 * h);
      }
      r[q] = reg;
    }
  }
  static void ldsm_x4(uint32_t (&r)[4], const void* p) { ldsm(r, p, false); }
  static void ldsm_x4_t(uint32_t (&r)[4], const void* p) { ldsm(r, p, true); }

  template <class E>
  static void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    if (kind<E>() != g_kind) emu_error("mma element type");
    Warp& w = warp();
    const int ph = next_phase(), L = lane();
    for (int i = 0; i < 4; ++i) w.a[ph][L][i] = a[i];
    w.b[ph][L][0] = b0;
    w.b[ph][L][1] = b1;
    w.bar.wait();
    if constexpr (E::kTf32) {
      mma_tf32(d, w, ph, L);
      return;
    }
    constexpr bool kBf16 = E::kBf16;
    float A[16][16], B[16][8];
    for (int l = 0; l < 32; ++l) {
      const int group = l >> 2, tig = l % 4;
      for (int i = 0; i < 8; ++i) {  // a0..a7: register i / 2, half i % 2 (low to high)
        const int row = (i < 2 || (i >= 4 && i < 6)) ? group : group + 8;
        const int col = tig * 2 + (i & 1) + (i >= 4 ? 8 : 0);
        A[row][col] = to_f(kBf16, static_cast<uint16_t>(w.a[ph][l][i / 2] >> (16 * (i % 2))));
      }
      for (int i = 0; i < 4; ++i) {  // b0..b3
        const int row = tig * 2 + (i & 1) + (i >= 2 ? 8 : 0);
        B[row][group] = to_f(kBf16, static_cast<uint16_t>(w.b[ph][l][i / 2] >> (16 * (i % 2))));
      }
    }
    const int group = L >> 2, tig = L % 4;
    for (int i = 0; i < 4; ++i) {  // c0..c3
      const int row = i < 2 ? group : group + 8;
      const int col = tig * 2 + (i & 1);
      double acc = 0;
      for (int k = 0; k < 16; ++k) acc += double(A[row][k]) * B[k][col];
      d[i] = static_cast<float>(d[i] + acc);
    }
  }

  // m16n8k8 .tf32: one 32-bit element per register
  static void mma_tf32(float (&d)[4], Warp& w, int ph, int L) {
    auto op = [](uint32_t u) {
      if (u & 0x1fffu) emu_error("tf32 operand not rounded to TF32 (low 13 mantissa bits set)");
      float x;
      std::memcpy(&x, &u, 4);
      return x;
    };
    float A[16][8], B[8][8];
    for (int l = 0; l < 32; ++l) {
      const int group = l >> 2, tig = l % 4;
      for (int i = 0; i < 4; ++i) {  // a0..a3
        const int row = (i == 0 || i == 2) ? group : group + 8;
        const int col = (i < 2) ? tig : tig + 4;
        A[row][col] = op(w.a[ph][l][i]);
      }
      B[tig][group] = op(w.b[ph][l][0]);
      B[tig + 4][group] = op(w.b[ph][l][1]);
    }
    const int group = L >> 2, tig = L % 4;
    for (int i = 0; i < 4; ++i) {  // c0..c3
      const int row = i < 2 ? group : group + 8;
      const int col = tig * 2 + (i & 1);
      double acc = 0;
      for (int k = 0; k < 8; ++k) acc += double(A[row][k]) * B[k][col];
      d[i] = static_cast<float>(d[i] + acc);
    }
  }

  static float shfl_xor(float v, int mask) {
    Warp& w = warp();
    const int ph = next_phase(), L = lane();
    w.f[ph][L] = v;
    w.bar.wait();
    return w.f[ph][L ^ mask];
  }
  static void sync() { me->blk->bar.wait(); }

  static void cp_async16(void* dst, const void* src, int bytes) {
    if (!in_smem(dst, 16) || reinterpret_cast<uintptr_t>(dst) % 16 != 0) emu_error("cp.async destination");
    if (reinterpret_cast<uintptr_t>(src) % 16 != 0) emu_error("cp.async source not 16-byte aligned");
    if (bytes < 0 || bytes > 16 || bytes % 2 != 0) emu_error("cp.async src-size");
    if (bytes > 0) {
      const auto* s = reinterpret_cast<const unsigned char*>(src);
      bool ok = false;
      for (const auto& r : g_readable) ok = ok || (s >= r.first && s + bytes <= r.second);
      if (!ok) emu_error("cp.async reads outside the inputs");
    }
    me->open.push_back({dst, src, bytes});
  }
  static void cp_commit() {
    me->groups.push_back(std::move(me->open));
    me->open.clear();
  }
  template <int N>
  static void cp_wait() {
    while (static_cast<int>(me->groups.size()) > N) {
      for (const Copy& c : me->groups.front()) {
        unsigned char tmp[16] = {};
        if (c.bytes > 0) std::memcpy(tmp, c.src, c.bytes);
        std::memcpy(c.dst, tmp, 16);
      }
      me->groups.pop_front();
    }
  }
  static float exp2(float x) { return std::exp2(x); }
  template <class E>
  static uint32_t pack2(float lo, float hi) {
    static_assert(!E::kTf32, "pack2: 16-bit types only");
    return static_cast<uint32_t>(make<E>(lo)) | (static_cast<uint32_t>(make<E>(hi)) << 16);
  }
  template <class E>
  static typename E::T cvt(float x) {
    return make<E>(x);
  }
  static uint32_t tf32(float x) {
    const float y = tf32_rna(x);
    uint32_t u;
    std::memcpy(&u, &y, 4);
    return u;
  }
  static void store_u32(void* p, uint32_t v) {
    if (reinterpret_cast<uintptr_t>(p) % 4 != 0) emu_error("misaligned 32-bit store");
    std::memcpy(p, &v, 4);
  }
};

// Runs fn(tid, smem) on `threads` threads as one block with `bytes` of shared memory.
void run_block(int threads, size_t bytes, const std::function<void(int, void*)>& fn) {
  std::vector<unsigned char> raw(bytes + 32, 0xFF);
  auto* base = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(raw.data()) + 15) & ~uintptr_t(15));
  Block blk(threads);
  blk.smem_lo = base;
  blk.smem_hi = base + bytes;
  std::vector<std::thread> th;
  th.reserve(threads);
  for (int t = 0; t < threads; ++t) {
    th.emplace_back([&, t] {
      Lane lane{&blk, t, 0, {}, {}};
      me = &lane;
      fn(t, base);
      if (!lane.open.empty() || !lane.groups.empty()) emu_error("cp.async copies still pending at exit");
      me = nullptr;
    });
  }
  for (auto& x : th) x.join();
}

// ------------------------------------------------------------------ warp products

// Matrix of element type E in shared-memory layout [rows][ld] (NaN padding), values from
// rng; vals gets the values as the tensor cores see them (TF32-rounded for Tf32).
template <class E>
std::vector<typename E::T> random_tile(std::mt19937& rng, int rows, int cols, int ld, std::vector<double>& vals) {
  std::normal_distribution<float> nd;
  std::vector<typename E::T> t(rows * ld, make<E>(NAN));
  vals.assign(rows * cols, 0.0);
  for (int r = 0; r < rows; ++r) {
    for (int c = 0; c < cols; ++c) {
      t[r * ld + c] = make<E>(nd(rng));
      const float x = val<E>(t[r * ld + c]);
      vals[r * cols + c] = E::kTf32 ? tf32_rna(x) : x;
    }
  }
  return t;
}

// Element (row, col) of this lane's C fragments of a 16 x (8 * n) product, independently
// of the kernel's helpers: the ISA's C layout.
int c_row_doc(int lane, int i) { return (i < 2) ? (lane >> 2) : (lane >> 2) + 8; }
int c_col_doc(int lane, int i, int nt) { return 8 * nt + (lane % 4) * 2 + (i & 1); }

template <class E>
void test_warp_products() {
  using T = typename E::T;
  g_kind = kind<E>();
  std::mt19937 rng(1);
  // A 16 x 64, B 32 x 64: S = A B^T (16 x 32), 64 / kK k steps
  constexpr int kLd = 64 + attnext::mma::kEpc<E>, kN = 32, kSteps = 64 / attnext::mma::kK<E>;
  std::vector<double> av, bv, vv;
  auto At = random_tile<E>(rng, 16, 64, kLd, av);
  auto Bt = random_tile<E>(rng, kN, 64, kLd, bv);
  // P (16 x 64 floats from registers) times V (64 x 32, [k][n] rows). The 16-bit types
  // get P already rounded (pack2 is exact then); TF32 gets raw floats, so the product
  // only matches if the kernel rounds P (an unrounded operand is an emulation error).
  auto Vt = random_tile<E>(rng, 64, 32, kLd, vv);
  std::vector<float> praw(16 * 64);
  std::vector<double> pv(16 * 64);
  {
    std::normal_distribution<float> nd;
    for (int i = 0; i < 16 * 64; ++i) {
      const float x = nd(rng);
      praw[i] = E::kTf32 ? x : val<E>(make<E>(x));
      pv[i] = E::kTf32 ? tf32_rna(x) : praw[i];
    }
  }
  std::vector<T> smem_img;
  smem_img.insert(smem_img.end(), At.begin(), At.end());
  smem_img.insert(smem_img.end(), Bt.begin(), Bt.end());
  smem_img.insert(smem_img.end(), Vt.begin(), Vt.end());
  const size_t off_b = At.size(), off_v = At.size() + Bt.size();
  std::vector<float> got_s(16 * kN, NAN), got_o(16 * 32, NAN);
  run_block(32, smem_img.size() * sizeof(T), [&](int tid, void* raw) {
    T* sm = static_cast<T*>(raw);
    if (tid == 0) std::memcpy(sm, smem_img.data(), smem_img.size() * sizeof(T));
    EmuOps::warp().bar.wait();
    const int lane = tid;
    float s[kN / 8][4] = {};
    attnext::mma::gemm_abt<EmuOps, E, kLd, kN, kSteps>(s, sm, sm + off_b, lane);
    float p[8][4], o[4][4] = {};
    for (int nt = 0; nt < 8; ++nt) {
      for (int i = 0; i < 4; ++i) p[nt][i] = praw[c_row_doc(lane, i) * 64 + c_col_doc(lane, i, nt)];
    }
    attnext::mma::gemm_pb<EmuOps, E, kLd, 32, kSteps>(o, p, sm + off_v, lane);
    for (int nt = 0; nt < kN / 8; ++nt) {
      for (int i = 0; i < 4; ++i) got_s[c_row_doc(lane, i) * kN + c_col_doc(lane, i, nt)] = s[nt][i];
    }
    for (int nt = 0; nt < 4; ++nt) {
      for (int i = 0; i < 4; ++i) got_o[c_row_doc(lane, i) * 32 + c_col_doc(lane, i, nt)] = o[nt][i];
    }
  });
  double err_s = 0, err_o = 0;
  for (int r = 0; r < 16; ++r) {
    for (int c = 0; c < kN; ++c) {
      double ref = 0;
      for (int k = 0; k < 64; ++k) ref += av[r * 64 + k] * bv[c * 64 + k];
      err_s = worse(err_s, got_s[r * kN + c], ref);
    }
    for (int c = 0; c < 32; ++c) {
      double ref = 0;
      for (int k = 0; k < 64; ++k) ref += pv[r * 64 + k] * vv[k * 32 + c];
      err_o = worse(err_o, got_o[r * 32 + c], ref);
    }
  }
  check(err_s < 1e-3, std::string("gemm_abt (A B^T from ldmatrix) ") + ename<E>() + ": max error " +
                          std::to_string(err_s));
  check(err_o < 1e-3, std::string("gemm_pb (C fragments as A, B from shared memory) ") + ename<E>() +
                          ": max error " + std::to_string(err_o));
  check(g_emu_errors.load() == 0, std::string("warp products ") + ename<E>() + ": no emulation errors");
  g_emu_errors = 0;
}

// The causal mask and the dropout mask of the softmax step (rows), the dQ step (rows) and
// the dK/dV step (transposed: keys by rows, queries by columns) at the (row, col) the
// fragments really hold.
void test_fragment_masks() {
  g_kind = kind<Bf16>();
  Params p{};
  p.T = 200;
  p.S = 230;
  p.shift = 30;  // bottom-right
  // window (35, 2): row t sees keys t + 25 .. t + 32, both edges cross the tiles below
  p.wl = 35;
  p.wr = 2;
  p.BH = 3;
  p.scale = 0.7f;
  p.scale_log2 = p.scale * attnext::mma::kLog2e;
  p.drop = true;
  p.stream_key = attnext::dropout_stream_key(11, 5);
  p.threshold = attnext::dropout_threshold(0.4);
  p.inv_keep = 1.f / 0.6f;
  // rows t_base + 0..15 see keys [59..74, 97..112): the tile of keys k0 + 0..63 straddles
  // both edges of the window. Transposed (dK/dV): keys k0 + 0..15 by rows, queries
  // qt0 + 0..63 (seeing [15..78, 53..116)) by columns.
  const int64_t b = 2, t_base = 64, k0 = 64, qt0 = 20;
  // the window from its definition (not the kernels' first / visible)
  auto sees = [&](int64_t t, int64_t j) {
    return j >= 0 && j < p.S && j >= t + p.shift - p.wl && j <= t + p.shift + p.wr;
  };
  constexpr int kNt = 8;
  auto score = [](int64_t t, int64_t j) { return 0.01f * float((t * 7 + j * 3) % 23) - 0.1f; };
  auto keep = [&](int64_t t, int64_t j) {
    return attnext::dropout_keep(attnext::dropout_row_key(p.stream_key, b, t), uint32_t(j), p.threshold);
  };
  std::vector<float> got(16 * 64, NAN), got_ds(16 * 64, NAN), got_st(16 * 64, NAN), got_dpt(16 * 64, NAN);
  std::vector<float> stat_lse(64), stat_D(64);
  for (int i = 0; i < 64; ++i) {
    stat_lse[i] = 0.3f + 0.01f * i;
    stat_D[i] = 0.05f * i;
  }
  run_block(32, 16, [&](int lane, void*) {
    int64_t vis[2], fst[2], key[2];
    uint32_t rkey[2];
    float s[kNt][4], o[1][4] = {}, m[2] = {-INFINITY, -INFINITY}, l[2] = {0, 0}, dp[kNt][4], s2[kNt][4];
    float lse2[2], Dr[2];
    for (int h = 0; h < 2; ++h) {
      const int64_t t = t_base + c_row_doc(lane, 2 * h);
      vis[h] = p.visible(t);
      fst[h] = p.first(t);
      rkey[h] = attnext::dropout_row_key(p.stream_key, b, t);
      lse2[h] = 1.0f + 0.1f * h;
      Dr[h] = 0.25f;
      key[h] = k0 + c_row_doc(lane, 2 * h);
    }
    for (int nt = 0; nt < kNt; ++nt) {
      for (int i = 0; i < 4; ++i) {
        const int64_t t = t_base + c_row_doc(lane, i), j = k0 + c_col_doc(lane, i, nt);
        s[nt][i] = s2[nt][i] = score(t, j);
        dp[nt][i] = 0.5f;
      }
    }
    attnext::mma::softmax_step<EmuOps, true>(s, o, m, l, p, k0, fst, vis, rkey, lane);
    attnext::mma::ds_rows<EmuOps, true>(s2, dp, p, k0, fst, vis, rkey, lse2, Dr, lane);
    // dK/dV step: keys k0 + 0..15 by rows, queries t_base + 0..63 by columns
    float st[kNt][4], dpt[kNt][4];
    for (int nt = 0; nt < kNt; ++nt) {
      for (int i = 0; i < 4; ++i) {
        st[nt][i] = 0.1f;
        dpt[nt][i] = 0.5f;
      }
    }
    // stats for queries qt0 + qi (row keys of those queries)
    std::vector<uint32_t> qkey(64);
    for (int qi = 0; qi < 64; ++qi) qkey[qi] = attnext::dropout_row_key(p.stream_key, b, qt0 + qi);
    attnext::mma::ds_cols<EmuOps, true>(st, dpt, p, qt0, key, stat_lse.data(), stat_D.data(), qkey.data(), lane);
    for (int nt = 0; nt < kNt; ++nt) {
      for (int i = 0; i < 4; ++i) {
        const int idx = c_row_doc(lane, i) * 64 + c_col_doc(lane, i, nt);
        got[idx] = s[nt][i] == 0.f ? 0.f : s[nt][i] * std::exp2(m[i >> 1]);  // exp2(z) of kept entries
        got_ds[idx] = s2[nt][i];
        got_st[idx] = st[nt][i];
        got_dpt[idx] = dpt[nt][i];
      }
    }
  });
  int bad = 0, bad_ds = 0, bad_t = 0, hidden = 0, dropped = 0, hidden_t = 0;
  for (int r = 0; r < 16; ++r) {
    const int64_t t = t_base + r;
    for (int c = 0; c < 64; ++c) {
      const int64_t j = k0 + c;
      const bool vis = sees(t, j);
      const bool kept = keep(t, j);
      hidden += !vis;
      dropped += vis && !kept;
      const float want = (vis && kept) ? std::exp2(score(t, j) * p.scale_log2) : 0.f;
      if (!(std::fabs(got[r * 64 + c] - want) <= 1e-4f * (1.f + want))) ++bad;
      const float lse2 = 1.0f + 0.1f * (r >= 8);
      const float pr = std::exp2(score(t, j) * p.scale_log2 - lse2);
      const float want_ds = vis ? pr * (0.5f * (kept ? p.inv_keep : 0.f) - 0.25f) : 0.f;
      if (!(std::fabs(got_ds[r * 64 + c] - want_ds) <= 1e-5f)) ++bad_ds;
      // transposed: key k0 + r (row r), query qt0 + c (column c)
      const int64_t key = k0 + r, q = qt0 + c;
      const bool vis_t = sees(q, key);
      hidden_t += !vis_t;
      const bool kept_t = keep(q, key);
      const float pr_t = std::exp2(0.1f * p.scale_log2 - stat_lse[c]);
      const float want_st = vis_t ? pr_t * (kept_t ? p.inv_keep : 0.f) : 0.f;
      const float want_dpt = vis_t ? pr_t * (0.5f * (kept_t ? p.inv_keep : 0.f) - stat_D[c]) : 0.f;
      if (!(std::fabs(got_st[r * 64 + c] - want_st) <= 1e-5f && std::fabs(got_dpt[r * 64 + c] - want_dpt) <= 1e-5f)) {
        ++bad_t;
      }
    }
  }
  check(hidden > 100 && dropped > 100 && hidden_t > 100 && hidden_t < 900, "mask test covers hidden and dropped entries");
  check(bad == 0, "softmax step: window + dropout mask at the fragment's (row, col): " + std::to_string(bad) + " wrong");
  check(bad_ds == 0, "dQ step: dS at the fragment's (row, col): " + std::to_string(bad_ds) + " wrong");
  check(bad_t == 0, "dK/dV step: P^T Z and dS^T at (key, query): " + std::to_string(bad_t) + " wrong");
}

// -------------------------------------------------------------------- whole passes

struct Problem {
  int B, nh, T, S, hs;
  bool bottom_right;
  double p;         // dropout
  bool nanogpt;     // q, k, v as (B, T, nh, hs) memory viewed as (B, nh, T, hs)
  int ld;           // row stride in memory (>= hs, multiple of 8): ld > hs is a sliced view
  int stages;       // backward pipelines: 1 or 2
  int wl = -1, wr = 0;  // window_size
  bool gqa = false;     // k, v: one head expanded over nh (stride 0)
  std::string name() const {
    char buf[200];
    std::snprintf(buf, sizeof buf, "B%d nh%d T%d S%d hs%d %s p%.2f %s ld%d stages%d window(%d,%d)%s", B, nh, T, S, hs,
                  bottom_right ? "bottom_right" : "top_left", p, nanogpt ? "nanogpt" : "3d", ld, stages, wl, wr,
                  gqa ? " gqa" : "");
    return buf;
  }
  // the window, written from its definition (as the reference)
  bool sees(int64_t t, int64_t j) const {
    const int64_t d = t + (bottom_right ? S - T : 0);  // row t's diagonal key
    return (wl < 0 || j >= d - wl) && (wr < 0 || j <= d + wr);
  }
};

template <class E>
struct TensorE {  // a (B, nh, N, hs) tensor of E::T in memory of either layout, 16-byte aligned
  std::vector<typename E::T> mem;
  size_t off;  // elements to a 16-byte boundary
  attnext::mma::Rows rows;
  std::vector<double> val;  // (BH, N, hs) values
  const typename E::T* data() const { return mem.data() + off; }
};

template <class E>
TensorE<E> make_input(std::mt19937& rng, const Problem& pb, int N, bool expanded = false) {
  using T = typename E::T;
  TensorE<E> x;
  const size_t n = size_t(pb.B) * pb.nh * N * pb.ld;
  x.mem.assign(n + 16 / sizeof(T), T(0));
  x.off = (16 - reinterpret_cast<uintptr_t>(x.mem.data()) % 16) % 16 / sizeof(T);
  std::normal_distribution<float> nd;
  std::memset(&x.rows, 0, sizeof x.rows);
  x.rows.nbatch = 2;
  x.rows.sizes[0] = pb.B;
  x.rows.sizes[1] = pb.nh;
  if (pb.nanogpt) {
    x.rows.strides[0] = int64_t(N) * pb.nh * pb.ld;
    x.rows.strides[1] = pb.ld;
    x.rows.stride_t = int64_t(pb.nh) * pb.ld;
  } else {
    x.rows.strides[0] = int64_t(pb.nh) * N * pb.ld;
    x.rows.strides[1] = int64_t(N) * pb.ld;
    x.rows.stride_t = pb.ld;
  }
  if (expanded) x.rows.strides[1] = 0;  // (B, 1, N, hs).expand(B, nh, N, hs)
  for (auto& e : x.mem) e = make<E>(nd(rng));  // the padding columns hold values that must not be read
  const int BH = pb.B * pb.nh;
  x.val.resize(size_t(BH) * N * pb.hs);
  for (int b = 0; b < BH; ++b) {
    const int64_t bo = x.rows.batch_offset(b);
    for (int t = 0; t < N; ++t) {
      for (int c = 0; c < pb.hs; ++c) x.val[(size_t(b) * N + t) * pb.hs + c] = val<E>(x.data()[bo + t * x.rows.stride_t + c]);
    }
  }
  return x;
}

// NaN into the rows of k or v (N = S keys) in every aligned block of `tile` keys that no
// query row sees: they must never be read (a forward or dQ block that visits such a tile
// instead of skipping it makes its rows NaN: 0 * NaN in P V and dS K).
template <class E>
int poison_unseen_keys(TensorE<E>& x, const Problem& pb, int tile) {
  int n = 0;
  for (int k0 = 0; k0 < pb.S; k0 += tile) {
    const int k1 = std::min(pb.S, k0 + tile);
    bool seen = false;
    for (int j = k0; j < k1 && !seen; ++j) {
      for (int t = 0; t < pb.T && !seen; ++t) seen = pb.sees(t, j);
    }
    if (seen) continue;
    for (int b = 0; b < pb.B * pb.nh; ++b) {
      const int64_t bo = x.rows.batch_offset(b);
      for (int j = k0; j < k1; ++j) {
        for (int c = 0; c < pb.hs; ++c) {
          x.mem[x.off + bo + j * x.rows.stride_t + c] = make<E>(NAN);
          x.val[(size_t(b) * pb.S + j) * pb.hs + c] = NAN;
        }
      }
    }
    n += k1 - k0;
  }
  return n;
}

// An output buffer of E::T with guard zones (0xAB bytes) before and after.
template <class E>
struct OutE {
  using T = typename E::T;
  static constexpr size_t kGuard = 64;
  std::vector<T> mem;
  explicit OutE(size_t n) : mem(n + 2 * kGuard + 8) { std::memset(mem.data(), 0xAB, mem.size() * sizeof(T)); }
  T* data() {
    auto* p = mem.data() + kGuard;
    while (reinterpret_cast<uintptr_t>(p) % 16 != 0) ++p;
    return p;
  }
  bool guards_intact(size_t n) {
    const auto* lo = reinterpret_cast<const unsigned char*>(mem.data());
    const auto* d = reinterpret_cast<const unsigned char*>(data());
    const auto* hi = lo + mem.size() * sizeof(T);
    for (const auto* q = lo; q < d; ++q) if (*q != 0xAB) return false;
    for (const auto* q = d + n * sizeof(T); q < hi; ++q) if (*q != 0xAB) return false;
    return true;
  }
};

template <class E, int kHd>
void run_problem(const Problem& pb, uint32_t seed) {
  using Elem = typename E::T;
  using L = Tiles<kHd, E>;
  g_kind = kind<E>();
  std::mt19937 rng(seed);
  const int BH = pb.B * pb.nh, T = pb.T, S = pb.S, hs = pb.hs;
  TensorE<E> q = make_input<E>(rng, pb, T), k = make_input<E>(rng, pb, S, pb.gqa), v = make_input<E>(rng, pb, S, pb.gqa);
  TensorE<E> dout = make_input<E>(rng, pb, T);
  // every kernel's key tiles (kFwdBn, kDqBn, kKvBn) divide kKvBn: an unseen block of
  // kKvBn keys is unseen tiles for each
  static_assert(L::kKvBn % L::kFwdBn == 0 && L::kKvBn % L::kDqBn == 0, "tile sizes divide kKvBn");
  const int poisoned = poison_unseen_keys(k, pb, L::kKvBn);
  poison_unseen_keys(v, pb, L::kKvBn);
  const double scale = 1.0 / std::sqrt(double(hs));
  const int64_t shift = pb.bottom_right ? S - T : 0;
  const uint32_t stream = attnext::dropout_stream_key(1234, int64_t(seed) * 7);
  const uint32_t threshold = attnext::dropout_threshold(pb.p);
  const attnext_emu::DropoutFactor zfac(stream, pb.p);

  // float64 reference
  const attnext_emu::AttnRef ref =
      attnext_emu::attention_reference(q.val, k.val, v.val, dout.val, BH, T, S, hs, hs, scale, shift, zfac, pb.wl,
                                       pb.wr);
  const std::vector<double>& ref_out = ref.out;
  const std::vector<double>& ref_lse = ref.lse;

  Params p{};
  p.q = q.data();
  p.k = k.data();
  p.v = v.data();
  p.dout = dout.data();
  p.qa = q.rows;
  p.ka = k.rows;
  p.va = v.rows;
  p.da = dout.rows;
  p.BH = BH;
  p.T = T;
  p.S = S;
  p.shift = shift;
  p.wl = pb.wl;
  p.wr = pb.wr;
  p.hs = hs;
  p.scale = float(scale);
  p.scale_log2 = float(scale * 1.4426950408889634);
  p.drop = pb.p > 0;
  p.stream_key = stream;
  p.threshold = threshold;
  p.inv_keep = float(1.0 / (1.0 - pb.p));
  g_readable.clear();
  for (const TensorE<E>* x : {&q, &k, &v, &dout}) {
    const auto* lo = reinterpret_cast<const unsigned char*>(x->mem.data());
    g_readable.push_back({lo, lo + x->mem.size() * sizeof(Elem)});
  }

  // forward
  const size_t n_out = size_t(BH) * T * hs;
  OutE<E> out(n_out);
  std::vector<float> lse(size_t(BH) * T + 2, 12345.f);
  p.out = out.data();
  p.lse_out = lse.data() + 1;
  const int64_t nqt = (T + attnext::mma::kBm - 1) / attnext::mma::kBm;
  for (int64_t item = 0; item < BH * nqt; ++item) {
    run_block(kThreads, size_t(L::fwd_smem()), [&](int tid, void* sm) {
      attnext::mma::fwd_block<EmuOps, E, kHd>(p, item, tid, static_cast<Elem*>(sm));
    });
  }
  const std::string name = std::string(ename<E>()) + " kHd" + std::to_string(kHd) + " " + pb.name();
  // observed: max error / max |ref| <= 6e-3 (bf16), 6e-4 (fp16); one wrong weight of a short row costs ~0.05.
  // TF32 rounds the inputs too (fp16 rounds them in the test's inputs already), with the same 10-bit mantissa.
  const double tol = E::kBf16 ? 1.2e-2 : 2e-3, atol = E::kBf16 ? 1e-3 : 2e-4;
  std::vector<double> got_out(n_out);
  for (size_t i = 0; i < n_out; ++i) got_out[i] = val<E>(out.data()[i]);
  double err = 0, err_lse = 0;
  bool lse_inf_ok = true, zero_rows_ok = true;
  for (size_t i = 0; i < n_out; ++i) err = worse(err, got_out[i], ref_out[i]);
  for (size_t i = 0; i < size_t(BH) * T; ++i) {
    const double r = ref_lse[i], g = lse[i + 1];
    if (std::isinf(r)) {
      lse_inf_ok = lse_inf_ok && std::isinf(g) && g < 0;
      for (int c = 0; c < hs; ++c) zero_rows_ok = zero_rows_ok && out.data()[i * hs + c] == 0;
    } else {
      err_lse = worse(err_lse, g, r);
    }
  }
  check(err <= tol * max_abs(ref_out) + atol, name + ": forward out max error " + std::to_string(err));
  double max_lse = 0;  // over rows that see keys (the others are -inf, checked above)
  for (double x : ref_lse) max_lse = std::isinf(x) ? max_lse : std::max(max_lse, std::fabs(x));
  check(err_lse <= 2e-4 * (1 + max_lse), name + ": forward lse max error " + std::to_string(err_lse));
  check(lse_inf_ok && zero_rows_ok, name + ": rows that see no key give lse -inf and zeros");
  check(out.guards_intact(n_out) && lse[0] == 12345.f && lse[size_t(BH) * T + 1] == 12345.f,
        name + ": forward writes stay inside out and lse");

  std::printf("  %s: out err %.2e (max |ref| %.2f), lse err %.2e (%d unseen keys NaN)\n", name.c_str(), err,
              max_abs(ref_out), err_lse, poisoned);
  std::fflush(stdout);

  // backward from the kernel's out and lse, D = rowsum(dO * out) as the host computes it
  std::vector<float> D(size_t(BH) * T);
  for (size_t i = 0; i < size_t(BH) * T; ++i) {
    double acc = 0;
    for (int c = 0; c < hs; ++c) acc += dout.val[i * hs + c] * got_out[i * hs + c];
    D[i] = float(acc);
  }
  const std::vector<double>&ref_dq = ref.dq, &ref_dk = ref.dk, &ref_dv = ref.dv;
  {
    const size_t n_dq = size_t(BH) * T * hs, n_kv = size_t(BH) * S * hs;
    OutE<E> dq(n_dq), dk(n_kv), dv(n_kv);
    p.lse = lse.data() + 1;
    p.D = D.data();
    p.dq = dq.data();
    p.dk = dk.data();
    p.dv = dv.data();
    for (int64_t item = 0; item < BH * nqt; ++item) {
      run_block(kThreads, size_t(L::dq_smem(pb.stages)), [&](int tid, void* sm) {
        attnext::mma::dq_block<EmuOps, E, kHd>(p, item, tid, static_cast<Elem*>(sm), pb.stages);
      });
    }
    const int64_t nkt = (S + L::kKvBn - 1) / L::kKvBn;
    for (int64_t item = 0; item < BH * nkt * L::kKvSplit; ++item) {
      run_block(kThreads, size_t(L::dkdv_smem(pb.stages)), [&](int tid, void* sm) {
        attnext::mma::dkdv_block<EmuOps, E, kHd>(p, item, tid, static_cast<Elem*>(sm), pb.stages);
      });
    }
    auto cmp = [&](OutE<E>& got, const std::vector<double>& ref, size_t n, const char* what) {
      double e = 0;
      for (size_t i = 0; i < n; ++i) e = worse(e, val<E>(got.data()[i]), ref[i]);
      std::printf("    %s err %.2e (max |ref| %.2f)\n", what, e, max_abs(ref));
      check(e <= tol * max_abs(ref) + atol, name + ": " + what + " max error " + std::to_string(e) +
                                                   " (max |ref| " + std::to_string(max_abs(ref)) + ")");
      check(got.guards_intact(n), name + ": " + what + " writes stay inside the tensor");
    };
    cmp(dq, ref_dq, n_dq, "dq");
    cmp(dk, ref_dk, n_kv, "dk");
    cmp(dv, ref_dv, n_kv, "dv");
  }
  check(g_emu_errors.load() == 0, name + ": no emulation errors (alignment, bounds, pending copies)");
  g_emu_errors = 0;
}

}  // namespace

int main() {
  test_warp_products<Bf16>();
  test_warp_products<F16>();
  test_warp_products<Tf32>();
  test_fragment_masks();
  std::printf("warp products and fragment masks checked (%d failures so far)\n", g_failures);
  // Problem: B, nh, T, S, hs, bottom_right, p, nanogpt, ld, stages
  // kHd 64: T = S, top-left, one and several query / key tiles, nanoGPT strides, dropout
  run_problem<Bf16, 64>({1, 2, 70, 70, 64, false, 0.0, true, 64, 2}, 1);
  run_problem<F16, 64>({2, 1, 130, 130, 64, false, 0.0, false, 64, 1}, 2);
  // dropout where single weights are large enough that one wrong mask bit shows
  run_problem<Bf16, 64>({1, 2, 20, 20, 64, false, 0.3, false, 64, 2}, 3);
  run_problem<F16, 64>({1, 1, 100, 100, 64, true, 0.25, true, 64, 1}, 4);
  // T != S, both alignments: bottom-right with T > S has rows that see no key
  run_problem<Bf16, 64>({1, 2, 90, 40, 64, true, 0.0, false, 64, 2}, 5);
  run_problem<Bf16, 64>({1, 1, 40, 150, 64, true, 0.2, false, 64, 1}, 6);
  run_problem<F16, 64>({1, 1, 40, 150, 64, false, 0.0, true, 64, 2}, 7);
  run_problem<Bf16, 64>({1, 1, 150, 40, 64, false, 0.0, false, 64, 2}, 8);
  // bottom-right shift 14: query 0 sees keys 0..14, so the first dK/dV tile's first query
  // misses exactly the last key of warp 0 (the boundary of that kernel's mask test)
  run_problem<F16, 64>({1, 1, 50, 64, 64, true, 0.0, false, 64, 2}, 17);
  // T = 1, S = 1
  run_problem<Bf16, 64>({2, 1, 1, 1, 64, false, 0.0, false, 64, 2}, 9);
  // head sizes rounded up with zero padding: 16 -> 32, 20 (partial 16-byte chunk,
  // sliced rows of 24), 80 -> 96, 100 (ld 104) -> 128
  run_problem<Bf16, 32>({1, 2, 33, 33, 16, false, 0.0, true, 16, 2}, 10);
  run_problem<F16, 32>({1, 1, 50, 60, 20, true, 0.1, false, 24, 1}, 11);
  run_problem<Bf16, 96>({1, 1, 77, 77, 80, false, 0.0, true, 80, 2}, 12);
  run_problem<Bf16, 128>({1, 1, 70, 90, 100, true, 0.2, false, 104, 2}, 13);
  run_problem<F16, 128>({1, 1, 66, 66, 128, false, 0.0, false, 128, 1}, 14);
  // 192, 256: dK / dV columns split over two blocks, 16-query dK/dV tiles
  run_problem<Bf16, 192>({1, 1, 70, 70, 160, false, 0.0, false, 160, 2}, 15);
  run_problem<Bf16, 256>({1, 1, 70, 90, 256, true, 0.2, true, 256, 2}, 16);
  // hs 200 in class 256 (the second column block half real), hs 130 in class 192 (its
  // second column block 2 real columns of 96), the other pipeline
  run_problem<F16, 256>({1, 1, 50, 70, 200, false, 0.1, true, 200, 1}, 28);
  run_problem<Bf16, 192>({1, 2, 40, 40, 130, true, 0.0, false, 136, 2}, 29);
  // float32 on TF32 tensor cores: every tile class of Tiles<kHd, Tf32> (32-key forward
  // and dQ tiles above kHd 64, 32-query dK/dV tiles above kHd 32), several tiles each
  // way, both pipelines, nanoGPT strides, T != S both ways, rows that see no key, dropout
  run_problem<Tf32, 32>({1, 2, 70, 70, 18, false, 0.0, true, 20, 2}, 20);  // hs 18: a partial 16-byte chunk
  run_problem<Tf32, 64>({2, 1, 130, 130, 64, false, 0.2, false, 64, 1}, 21);
  run_problem<Tf32, 64>({1, 1, 90, 40, 64, true, 0.0, true, 64, 2}, 22);
  run_problem<Tf32, 96>({1, 1, 77, 100, 80, false, 0.0, true, 80, 2}, 23);
  run_problem<Tf32, 128>({1, 1, 100, 130, 100, true, 0.25, false, 104, 1}, 24);
  run_problem<Tf32, 128>({1, 2, 66, 66, 128, false, 0.0, true, 128, 2}, 25);
  run_problem<Tf32, 192>({1, 1, 70, 70, 160, false, 0.0, true, 160, 2}, 27);
  run_problem<Tf32, 256>({1, 1, 70, 90, 256, true, 0.2, false, 256, 2}, 26);
  // Windows (..., wl, wr[, gqa]). Sliding (W, 0): W = 20 < a key tile (whole tiles
  // skipped: keys no row sees are NaN), W = 100 > a tile and not a multiple of it, with
  // dropout, both pipelines; bottom-right with T < S (keys 0..129 seen by no row)
  run_problem<Bf16, 64>({1, 2, 200, 200, 64, false, 0.0, false, 64, 2, 20, 0}, 40);
  run_problem<F16, 64>({1, 1, 230, 230, 64, false, 0.2, true, 64, 1, 100, 0}, 41);
  run_problem<Bf16, 64>({1, 1, 70, 230, 64, true, 0.0, false, 64, 2, 30, 0}, 42);
  // full attention (-1, -1) both ways of T != S; bands (7, 5) and (40, 70) right of the diagonal
  run_problem<F16, 64>({1, 1, 70, 130, 64, false, 0.0, false, 64, 2, -1, -1}, 43);
  run_problem<Bf16, 64>({1, 1, 130, 70, 64, true, 0.1, true, 64, 1, -1, -1}, 44);
  run_problem<Bf16, 64>({1, 1, 150, 150, 64, false, 0.0, false, 64, 2, 7, 5}, 45);
  run_problem<F16, 64>({1, 1, 150, 150, 64, true, 0.0, false, 64, 1, 40, 70}, 46);
  // rows that see no key: bottom-right T > S with a window; top-left (3, -1), T > S (rows
  // from 83 on start past the last key); (0, 0): the diagonal key only
  run_problem<Bf16, 64>({1, 1, 150, 70, 64, true, 0.0, false, 64, 2, 10, 0}, 47);
  run_problem<F16, 64>({1, 1, 150, 80, 64, false, 0.0, false, 64, 2, 3, -1}, 48);
  run_problem<Bf16, 64>({1, 1, 90, 90, 64, false, 0.0, false, 64, 1, 0, 0}, 49);
  // other tile classes with windows: 32-key forward tiles and split dK/dV columns (kHd
  // 256 16-bit), TF32 (kHd 64 and 128)
  run_problem<Bf16, 256>({1, 1, 150, 150, 256, false, 0.0, false, 256, 2, 40, 0}, 50);
  run_problem<Tf32, 64>({1, 1, 200, 200, 64, false, 0.0, true, 64, 2, 50, 0}, 51);
  run_problem<Tf32, 128>({1, 1, 100, 130, 100, true, 0.0, false, 104, 1, 20, 10}, 52);
  // grouped-query k, v (stride 0 over nh): causal and windowed
  run_problem<Bf16, 64>({2, 3, 70, 70, 64, false, 0.0, false, 64, 2, -1, 0, true}, 53);
  run_problem<F16, 64>({1, 4, 130, 130, 64, false, 0.1, true, 64, 1, 30, 0, true}, 54);
  if (g_failures == 0) {
    std::printf("test_mma_layout: all checks passed\n");
    return 0;
  }
  std::printf("test_mma_layout: %d checks failed\n", g_failures);
  return 1;
}
