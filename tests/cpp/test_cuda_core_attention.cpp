// The CUDA-core attention kernels (csrc/cuda/causal_attention_kernels.cuh: the exact
// float32 / float64 path on CUDA, and the fallback of the tensor-core one) run on the
// host, unchanged: the kernel header is compiled by the host compiler against
// tests/cpp/cuda_shim (threadIdx & co. per emulated thread, __syncthreads / __syncwarp
// as barriers, __shfl_xor_sync through exchange slots, shared memory filled with NaN
// before every block). Each block runs as 128 std::threads that do not run in lockstep,
// so a missing barrier shows as a wrong or run-to-run different result.
// Checked against the float64 reference (tests/cpp/emu_block.h): forward out and lse,
// backward dq, dk, dv from the kernel's own lse, for float, double and bfloat16, every
// tile height the host may pick (kRows 1, 2, 4, 8), T = S and T != S with both
// alignments (rows that see no key), hs != hs_v, head sizes that are not multiples of
// 32, nanoGPT-strided inputs, dropout (the mask of dropout_hash.h); outputs in guard
// zones; every forward and backward run twice and compared bit for bit.
// Windows (wl, wr) other than causal: sliding windows narrower and wider than a key
// tile, full attention, bands reaching right of the diagonal, rows that see no key on
// either side. Key tiles that no row sees are filled with NaN (k and v): a forward or
// dQ kernel that visits one (instead of skipping it) turns its rows NaN (0 * NaN in
// P V and dS K), and the dK/dV blocks of such tiles must write zeros. Grouped-query
// heads: k and v as stride-0 views over the head dim (enable_gqa's expand); each
// head's dK, dV is its own slice (autograd sums the group).
#include <cuda_runtime.h>  // tests/cpp/cuda_shim

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "cuda/causal_attention_kernels.cuh"
#include "dropout_hash.h"
#include "emu_block.h"
#include "shim_test.h"

namespace attnext {
namespace cuda {
// the kernels' `extern __shared__ unsigned char smem_raw[]`: blocks run one at a time
constexpr size_t kSmemBytes = size_t(1) << 20;
alignas(16) unsigned char smem_raw[kSmemBytes];
}  // namespace cuda
}  // namespace attnext

namespace {

using attnext::cuda::AttnParams;
using attnext::cuda::RowAddr;
using attnext_emu::max_abs;
using attnext_emu::worse;
using shim_test::check;
using shim_test::ename;
using shim_test::make;
using shim_test::Out;
using shim_test::val;

template <class F>
void launch(int64_t blocks, int threads, size_t smem, F&& call) {
  if (smem > attnext::cuda::kSmemBytes) attnext_emu::die("launch: shared memory above the emulation's buffer");
  cuda_shim::launch(blocks, threads, call, attnext::cuda::smem_raw, smem);
}

struct Problem {
  int B, nh, T, S, hs, hsv;
  bool bottom_right;
  double p;      // dropout
  bool nanogpt;  // q, k, v, dout as (B, N, nh, C) memory viewed as (B, nh, N, C)
  int wl = -1, wr = 0;  // window_size
  bool gqa = false;     // k, v: one head expanded over nh (stride 0)
  std::string name() const {
    char buf[200];
    std::snprintf(buf, sizeof buf, "B%d nh%d T%d S%d hs%d hsv%d %s p%.2f %s window(%d,%d)%s", B, nh, T, S, hs, hsv,
                  bottom_right ? "bottom_right" : "top_left", p, nanogpt ? "nanogpt" : "contiguous", wl, wr,
                  gqa ? " gqa" : "");
    return buf;
  }
  // the window, written from its definition (as the reference)
  bool sees(int64_t t, int64_t j) const {
    const int64_t d = t + (bottom_right ? S - T : 0);  // row t's diagonal key
    return (wl < 0 || j >= d - wl) && (wr < 0 || j <= d + wr);
  }
};

// A (B, nh, N, C) input in either layout: memory, its RowAddr, its values (BH, N, C).
template <class T>
struct Input {
  std::vector<T> mem;
  RowAddr rows{};
  std::vector<double> vals;
};

template <class T>
Input<T> make_input(std::mt19937& rng, const Problem& pb, int N, int C, bool expanded = false) {
  Input<T> x;
  std::normal_distribution<double> nd;
  x.mem.resize(size_t(pb.B) * pb.nh * N * C);
  for (auto& e : x.mem) e = make<T>(nd(rng));
  x.rows.nbatch = 2;
  x.rows.sizes[0] = pb.B;
  x.rows.sizes[1] = pb.nh;
  if (pb.nanogpt) {
    x.rows.strides[0] = int64_t(N) * pb.nh * C;
    x.rows.strides[1] = C;
    x.rows.stride_t = int64_t(pb.nh) * C;
  } else {
    x.rows.strides[0] = int64_t(pb.nh) * N * C;
    x.rows.strides[1] = int64_t(N) * C;
    x.rows.stride_t = C;
  }
  if (expanded) x.rows.strides[1] = 0;  // (B, 1, N, C).expand(B, nh, N, C)
  const int BH = pb.B * pb.nh;
  x.vals.resize(size_t(BH) * N * C);
  for (int b = 0; b < BH; ++b) {
    for (int t = 0; t < N; ++t) {
      for (int c = 0; c < C; ++c) x.vals[(size_t(b) * N + t) * C + c] = val(x.mem[x.rows.offset(b, t) + c]);
    }
  }
  return x;
}

// NaN into the rows of k or v (N = S keys) in every aligned block of `tile` keys that no
// query row sees: they must never be read.
template <class T>
int poison_unseen_keys(Input<T>& x, const Problem& pb, int C, int tile) {
  int n = 0;
  for (int k0 = 0; k0 < pb.S; k0 += tile) {
    bool seen = false;
    for (int j = k0; j < std::min(pb.S, k0 + tile) && !seen; ++j) {
      for (int t = 0; t < pb.T && !seen; ++t) seen = pb.sees(t, j);
    }
    if (seen) continue;
    for (int b = 0; b < pb.B * pb.nh; ++b) {
      for (int j = k0; j < std::min(pb.S, k0 + tile); ++j) {
        for (int c = 0; c < C; ++c) {
          x.mem[x.rows.offset(b, j) + c] = make<T>(NAN);
          x.vals[(size_t(b) * pb.S + j) * C + c] = NAN;
        }
      }
    }
    n += std::min(pb.S, k0 + tile) - k0;
  }
  return n;
}

template <class T, int kRows>
void run_problem(const Problem& pb, uint32_t seed) {
  using A = typename attnext::cuda::AccOf<T>::type;
  std::mt19937 rng(seed);
  const int BH = pb.B * pb.nh, T_ = pb.T, S = pb.S, hs = pb.hs, hsv = pb.hsv;
  Input<T> q = make_input<T>(rng, pb, T_, hs), k = make_input<T>(rng, pb, S, hs, pb.gqa),
           v = make_input<T>(rng, pb, S, hsv, pb.gqa);
  Input<T> dout = make_input<T>(rng, pb, T_, hsv);
  const int poisoned = poison_unseen_keys(k, pb, hs, attnext::cuda::kBk);
  poison_unseen_keys(v, pb, hsv, attnext::cuda::kBk);
  const double scale = 1.0 / std::sqrt(double(hs));
  const int64_t shift = pb.bottom_right ? S - T_ : 0;
  const uint32_t stream = attnext::dropout_stream_key(4321, int64_t(seed) * 3);
  const uint32_t threshold = attnext::dropout_threshold(pb.p);
  const attnext_emu::DropoutFactor zfac(stream, pb.p);
  const attnext_emu::AttnRef ref =
      attnext_emu::attention_reference(q.vals, k.vals, v.vals, dout.vals, BH, T_, S, hs, hsv, scale, shift, zfac,
                                       pb.wl, pb.wr);

  AttnParams<T, A> p{};
  p.q = q.mem.data();
  p.k = k.mem.data();
  p.v = v.mem.data();
  p.qa = q.rows;
  p.ka = k.rows;
  p.va = v.rows;
  p.BH = BH;
  p.T = T_;
  p.S = S;
  p.hs = hs;
  p.hsv = hsv;
  p.shift = shift;
  p.wl = pb.wl;
  p.wr = pb.wr;
  p.scale = A(scale);
  p.drop = pb.p > 0;
  p.stream_key = stream;
  p.threshold = threshold;
  p.inv_keep = A(1.0 / (1.0 - pb.p));
  p.rng = nullptr;

  const std::string name = std::string(ename<T>()) + " kRows" + std::to_string(kRows) + " " + pb.name();
  // float64: rounding only; float32: float accumulation; bfloat16: outputs rounded to 8 bits
  const double tol = std::is_same<T, double>::value ? 1e-12 : std::is_same<T, float>::value ? 2e-5 : 1e-2;
  constexpr int kBq = attnext::cuda::kAttnWarps * kRows;
  const int64_t nqt = (T_ + kBq - 1) / kBq;

  // forward, twice
  const size_t n_out = size_t(BH) * T_ * hsv;
  Out<T> out(n_out), out2(n_out);
  Out<A> lse(size_t(BH) * T_), lse2(size_t(BH) * T_);
  const size_t fwd_smem = attnext::cuda::FwdSmem(kRows, hs, hsv).total * sizeof(A);
  for (int run = 0; run < 2; ++run) {
    T* o = (run ? out2 : out).data();
    A* l = (run ? lse2 : lse).data();
    launch(BH * nqt, attnext::cuda::kAttnThreads, fwd_smem,
           [&] { attnext::cuda::causal_attention_fwd_kernel<T, kRows>(p, o, l); });
  }
  double err = 0, err_lse = 0, max_lse = 0;
  bool blind_ok = true;
  for (size_t i = 0; i < n_out; ++i) err = worse(err, val(out.data()[i]), ref.out[i]);
  for (size_t i = 0; i < size_t(BH) * T_; ++i) {
    const double r = ref.lse[i], g = lse.data()[i];
    if (std::isinf(r)) {
      blind_ok = blind_ok && std::isinf(g) && g < 0;
      for (int c = 0; c < hsv; ++c) blind_ok = blind_ok && val(out.data()[i * hsv + c]) == 0.0;
    } else {
      err_lse = worse(err_lse, g, r);
      max_lse = std::max(max_lse, std::fabs(r));
    }
  }
  check(err <= tol * (1 + max_abs(ref.out)), name + ": forward out max error " + std::to_string(err));
  check(err_lse <= (std::is_same<A, double>::value ? 1e-12 : 2e-5) * (1 + max_lse),
        name + ": forward lse max error " + std::to_string(err_lse));
  check(blind_ok, name + ": rows that see no key give zeros and lse -inf");
  check(out.guards_intact() && lse.guards_intact(), name + ": forward writes stay inside out and lse");
  check(out.same_bits(out2) && lse.same_bits(lse2), name + ": forward is the same bit for bit on a second run");

  // backward from the kernel's lse, D = rowsum(dO * out) as the host side computes it
  Out<A> D(size_t(BH) * T_);
  for (size_t i = 0; i < size_t(BH) * T_; ++i) {
    A acc = 0;
    for (int c = 0; c < hsv; ++c) acc += A(dout.vals[i * hsv + c]) * A(val(out.data()[i * hsv + c]));
    D.data()[i] = acc;
  }
  const size_t n_dq = size_t(BH) * T_ * hs, n_dk = size_t(BH) * S * hs, n_dv = size_t(BH) * S * hsv;
  Out<T> dq(n_dq), dk(n_dk), dv(n_dv), dq2(n_dq), dk2(n_dk), dv2(n_dv);
  const int64_t nkt = (S + attnext::cuda::kBk - 1) / attnext::cuda::kBk;
  const size_t kv_smem = attnext::cuda::DkdvSmem(kRows, hs, hsv).total * sizeof(A);
  const size_t q_smem = attnext::cuda::DqSmem(kRows, hs, hsv).total * sizeof(A);
  for (int run = 0; run < 2; ++run) {
    T* gq = (run ? dq2 : dq).data();
    T* gk = (run ? dk2 : dk).data();
    T* gv = (run ? dv2 : dv).data();
    launch(BH * nkt, attnext::cuda::kAttnThreads, kv_smem, [&] {
      attnext::cuda::causal_attention_dkdv_kernel<T, kRows>(p, dout.mem.data(), dout.rows, lse.data(), D.data(), gk,
                                                            gv);
    });
    launch(BH * nqt, attnext::cuda::kAttnThreads, q_smem, [&] {
      attnext::cuda::causal_attention_dq_kernel<T, kRows>(p, dout.mem.data(), dout.rows, lse.data(), D.data(), gq);
    });
  }
  auto cmp = [&](const Out<T>& got, const Out<T>& again, const std::vector<double>& r, const char* what) {
    double e = 0;
    for (size_t i = 0; i < got.n; ++i) e = worse(e, val(got[i]), r[i]);
    check(e <= tol * (1 + max_abs(r)), name + ": " + what + " max error " + std::to_string(e));
    check(got.guards_intact(), name + ": " + what + " writes stay inside the tensor");
    check(got.same_bits(again), name + ": " + what + " is the same bit for bit on a second run");
    return e;
  };
  const double edq = cmp(dq, dq2, ref.dq, "dq"), edk = cmp(dk, dk2, ref.dk, "dk"), edv = cmp(dv, dv2, ref.dv, "dv");
  std::printf("  %s: out %.1e lse %.1e dq %.1e dk %.1e dv %.1e (%d unseen keys NaN)\n", name.c_str(), err, err_lse, edq,
              edk, edv, poisoned);
  std::fflush(stdout);
}

}  // namespace

int main() {
  // Problem: B, nh, T, S, hs, hs_v, bottom_right, p, nanogpt
  // float32 at every tile height: several query tiles, key tiles of 32 with a partial last
  run_problem<float, 1>({1, 2, 37, 37, 16, 16, false, 0.0, false}, 1);
  run_problem<float, 2>({2, 1, 70, 70, 64, 64, false, 0.0, true}, 2);
  run_problem<float, 4>({1, 2, 70, 70, 40, 24, false, 0.2, false}, 3);
  run_problem<float, 8>({1, 1, 100, 100, 64, 64, false, 0.0, false}, 4);
  // T != S, both alignments: bottom-right with T > S has rows that see no key
  run_problem<float, 4>({1, 2, 90, 40, 32, 32, true, 0.0, true}, 5);
  run_problem<float, 2>({1, 1, 40, 90, 20, 36, true, 0.3, false}, 6);
  run_problem<float, 4>({1, 1, 40, 90, 64, 64, false, 0.0, false}, 7);
  run_problem<float, 1>({1, 1, 90, 40, 33, 33, false, 0.1, true}, 8);
  // T = S = 1; head size above one lane stride (hs 100 > 32 columns per lane pass)
  run_problem<float, 1>({2, 1, 1, 1, 8, 8, false, 0.0, false}, 9);
  run_problem<float, 2>({1, 1, 50, 50, 100, 100, false, 0.25, true}, 10);
  // float64 (gradcheck's dtype): near-exact
  run_problem<double, 1>({1, 2, 45, 45, 16, 8, false, 0.0, false}, 11);
  run_problem<double, 2>({1, 1, 70, 50, 24, 24, true, 0.2, true}, 12);
  // bfloat16 on CUDA cores (the tensor-core path's fallback): float accumulation
  run_problem<__nv_bfloat16, 4>({1, 2, 70, 70, 64, 64, false, 0.2, true}, 13);
  run_problem<__nv_bfloat16, 8>({1, 1, 60, 90, 48, 48, true, 0.0, false}, 14);
  // Windows (..., wl, wr[, gqa]). Sliding (W, 0): W = 10 < a key tile (most tiles
  // skipped, the first visited tile masked on the left), W = 45 > a tile and not a
  // multiple of it, with dropout; bottom-right with T < S (keys 0..89 seen by no row:
  // NaN, whole tiles skipped)
  run_problem<float, 2>({1, 2, 100, 100, 32, 32, false, 0.0, false, 10, 0}, 15);
  run_problem<float, 4>({1, 1, 130, 130, 40, 24, false, 0.2, true, 45, 0}, 16);
  run_problem<float, 8>({1, 1, 40, 150, 32, 32, true, 0.0, false, 20, 0}, 17);
  // full attention (-1, -1), T < S and T > S; a band (7, 5) right of the diagonal too
  run_problem<float, 1>({1, 2, 40, 70, 16, 16, false, 0.0, false, -1, -1}, 18);
  run_problem<float, 4>({1, 1, 90, 40, 24, 24, true, 0.1, true, -1, -1}, 19);
  run_problem<double, 2>({1, 1, 70, 70, 24, 16, false, 0.0, true, 7, 5}, 20);
  run_problem<float, 2>({1, 1, 75, 75, 32, 32, true, 0.0, false, 40, 33}, 21);
  // rows that see no key: bottom-right T > S (rows 0..49 see nothing, and a window of
  // 5); a window (3, -1) top-left with T > S (rows from 23 on start past the last key);
  // (0, 0): each row sees its diagonal key only
  run_problem<float, 4>({1, 1, 90, 40, 32, 32, true, 0.0, false, 5, 0}, 22);
  run_problem<double, 1>({1, 1, 60, 20, 16, 16, false, 0.0, false, 3, -1}, 23);
  run_problem<float, 2>({1, 1, 50, 50, 16, 16, false, 0.0, false, 0, 0}, 24);
  // bfloat16 sliding window with dropout; grouped-query k, v (stride 0 over nh), causal
  // and windowed
  run_problem<__nv_bfloat16, 4>({1, 2, 70, 70, 64, 64, false, 0.2, true, 16, 0}, 25);
  run_problem<float, 2>({2, 3, 50, 50, 32, 32, false, 0.0, false, -1, 0, true}, 26);
  run_problem<float, 4>({1, 4, 70, 70, 32, 32, false, 0.1, true, 20, 0, true}, 27);
  return shim_test::finish("test_cuda_core_attention");
}
