// The CUDA causal-softmax kernels (csrc/cuda/causal_softmax_kernels.cuh: a warp per row
// for rows up to 1024, a block of 512 threads per row beyond) run on the host, unchanged,
// through tests/cpp/cuda_shim (see test_cuda_core_attention.cpp; here the kernels' own
// `__shared__` arrays are static, shared by the one block that runs at a time).
// Checked against a float64 softmax with torch's semantics (a row that sees no key is
// zeros; a visible NaN or +inf, or all visible -inf, makes the row NaN): forward and
// backward, float32 / float64 / bfloat16, every per-lane width the host picks from (1,
// 2, 4, 8, 16, 32) and the block path, both alignments, T != S, strided (sliced) input
// rows, a row count that leaves warps of the last block without a row; guard zones,
// each kernel run twice and compared bit for bit.
#define CUDA_SHIM_STATIC_SHARED
#include <cuda_runtime.h>  // tests/cpp/cuda_shim

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cuda/causal_softmax_kernels.cuh"
#include "emu_block.h"
#include "shim_test.h"

namespace {

using attnext::cuda::RowAddr;
using attnext::cuda::SoftmaxShape;
using attnext_emu::worse;
using shim_test::check;
using shim_test::ename;
using shim_test::make;
using shim_test::Out;
using shim_test::val;

constexpr int kWarpsPerBlock = 4;    // as csrc/cuda/causal_softmax.cu
constexpr int kBlockThreads = 512;   // as csrc/cuda/causal_softmax.cu

// A (B, T, S) tensor whose rows are `ld` >= S apart (a slice of wider rows).
template <class T>
struct Rows3 {
  std::vector<T> mem;
  RowAddr addr{};
  int B, T_, S, ld;
  Rows3(int B_, int T__, int S_, int ld_) : mem(size_t(B_) * T__ * ld_), B(B_), T_(T__), S(S_), ld(ld_) {
    addr.nbatch = 1;
    addr.sizes[0] = B;
    addr.strides[0] = int64_t(T_) * ld;
    addr.stride_t = ld;
  }
  T& at(int b, int t, int j) { return mem[(size_t(b) * T_ + t) * ld + j]; }
};

// kPerLane 0: the block path.
template <class T, int kPerLane>
void run_case(int B, int T_, int S, bool bottom_right, uint32_t seed, bool specials) {
  using A = typename attnext::cuda::AccOf<T>::type;
  std::mt19937 rng(seed);
  std::normal_distribution<double> nd;
  const int ld = S + 3;
  Rows3<T> x(B, T_, S, ld), dy(B, T_, S, ld), y_in(B, T_, S, ld);
  for (auto& e : x.mem) e = make<T>(2 * nd(rng));
  for (auto& e : dy.mem) e = make<T>(nd(rng));
  const int64_t rows = int64_t(B) * T_;
  const int64_t shift = bottom_right ? S - T_ : 0;
  auto visible = [&](int64_t t) { return std::min<int64_t>(std::max<int64_t>(t + 1 + shift, 0), S); };
  // special rows (batch 0): a NaN, a +inf, all -inf, a -inf among finite values, +inf / NaN hidden
  std::vector<int> nan_row(rows, 0);
  if (specials) {
    for (int t = 0; t < T_; ++t) {
      const int64_t L = visible(t);
      if (L < 3) continue;
      switch (t % 5) {
        case 1: x.at(0, t, L / 2) = make<T>(NAN); break;
        case 2: x.at(0, t, L - 1) = make<T>(INFINITY); break;
        case 3: for (int64_t j = 0; j < L; ++j) x.at(0, t, j) = make<T>(-INFINITY); break;
        case 4: x.at(0, t, 0) = make<T>(-INFINITY); break;  // finite row, one zero weight
        default:  // +inf and NaN just past the visible prefix: hidden, so they must not matter
          if (L < S) x.at(0, t, L) = make<T>(INFINITY);
          if (L + 1 < S) x.at(0, t, L + 1) = make<T>(NAN);
          break;
      }
    }
  }
  const double scale = 0.7;
  // float64 reference, torch's semantics
  std::vector<double> ref(size_t(rows) * S, 0.0), ref_dx(size_t(rows) * S, 0.0);
  for (int b = 0; b < B; ++b) {
    for (int t = 0; t < T_; ++t) {
      const int64_t L = visible(t), row = int64_t(b) * T_ + t;
      if (L == 0) continue;
      double mx = -INFINITY;
      bool bad = false;
      for (int64_t j = 0; j < L; ++j) {
        const double z = val(x.at(b, t, j)) * scale;
        bad = bad || std::isnan(z) || z == INFINITY;
        mx = std::max(mx, z);
      }
      if (bad || mx == -INFINITY) {
        for (int64_t j = 0; j < S; ++j) ref[row * S + j] = NAN;
        nan_row[row] = 1;
        continue;
      }
      double sum = 0;
      for (int64_t j = 0; j < L; ++j) sum += std::exp(val(x.at(b, t, j)) * scale - mx);
      for (int64_t j = 0; j < L; ++j) ref[row * S + j] = std::exp(val(x.at(b, t, j)) * scale - mx) / sum;
    }
  }
  // backward input y: the reference rounded to T (NaN rows: plain values, their dx is only
  // checked where defined); dx = scale * y * (dy - <dy, y>) on the visible prefix
  for (int b = 0; b < B; ++b) {
    for (int t = 0; t < T_; ++t) {
      const int64_t L = visible(t), row = int64_t(b) * T_ + t;
      double dot = 0;
      for (int64_t j = 0; j < S; ++j) {
        const double yv = nan_row[row] ? 1.0 / double(L) : ref[row * S + j];
        y_in.at(b, t, j) = make<T>(j < L ? yv : 0.0);
      }
      for (int64_t j = 0; j < L; ++j) dot += val(dy.at(b, t, j)) * val(y_in.at(b, t, j));
      for (int64_t j = 0; j < L; ++j) {
        ref_dx[row * S + j] = scale * val(y_in.at(b, t, j)) * (val(dy.at(b, t, j)) - dot);
      }
    }
  }

  const SoftmaxShape sh{rows, T_, S, bottom_right};
  const size_t n = size_t(rows) * S;
  Out<T> y(n), y2(n), dx(n), dx2(n);
  const int64_t warp_blocks = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  for (int run = 0; run < 2; ++run) {
    T* yo = (run ? y2 : y).data();
    T* dxo = (run ? dx2 : dx).data();
    if constexpr (kPerLane > 0) {
      cuda_shim::launch(warp_blocks, 32 * kWarpsPerBlock, [&] {
        attnext::cuda::causal_softmax_fwd_warp_kernel<T, kPerLane>(x.mem.data(), x.addr, yo, sh, A(scale));
      });
      cuda_shim::launch(warp_blocks, 32 * kWarpsPerBlock, [&] {
        attnext::cuda::causal_softmax_bwd_warp_kernel<T, kPerLane>(dy.mem.data(), dy.addr, y_in.mem.data(),
                                                                   y_in.addr, dxo, sh, A(scale));
      });
    } else {
      cuda_shim::launch(rows, kBlockThreads, [&] {
        attnext::cuda::causal_softmax_fwd_block_kernel<T>(x.mem.data(), x.addr, yo, sh, A(scale));
      });
      cuda_shim::launch(rows, kBlockThreads, [&] {
        attnext::cuda::causal_softmax_bwd_block_kernel<T>(dy.mem.data(), dy.addr, y_in.mem.data(), y_in.addr, dxo,
                                                          sh, A(scale));
      });
    }
  }
  const double tol = std::is_same<T, double>::value ? 1e-13 : std::is_same<T, float>::value ? 1e-6 : 8e-3;
  double err = 0, err_dx = 0;
  bool nan_ok = true;
  int nan_rows = 0;
  for (int64_t row = 0; row < rows; ++row) {
    nan_rows += nan_row[row];
    for (int64_t j = 0; j < S; ++j) {
      const double got = val(y[row * S + j]);
      if (nan_row[row]) {
        nan_ok = nan_ok && std::isnan(got);
      } else {
        err = worse(err, got, ref[row * S + j]);
        err_dx = worse(err_dx, val(dx[row * S + j]), ref_dx[row * S + j]);
      }
    }
  }
  char buf[200];
  std::snprintf(buf, sizeof buf, "%s %s B%d T%d S%d %s%s", ename<T>(),
                kPerLane > 0 ? ("warp kPerLane" + std::to_string(kPerLane)).c_str() : "block", B, T_, S,
                bottom_right ? "bottom_right" : "top_left", specials ? " specials" : "");
  const std::string name = buf;
  check(err <= tol, name + ": forward max error " + std::to_string(err));
  check(err_dx <= tol * 4, name + ": backward max error " + std::to_string(err_dx));
  check(nan_ok, name + ": rows with a visible NaN / +inf / only -inf are NaN throughout");
  check(!specials || nan_rows >= 2, name + ": the special rows are there");
  check(y.guards_intact() && dx.guards_intact(), name + ": writes stay inside y and dx");
  check(y.same_bits(y2) && dx.same_bits(dx2), name + ": the same bits on a second run");
  std::printf("  %s: y err %.1e, dx err %.1e, %d NaN rows\n", name.c_str(), err, err_dx, nan_rows);
  std::fflush(stdout);
}

}  // namespace

int main() {
  // warp path: S within 32 * kPerLane, rows not a multiple of the 4 warps of a block
  run_case<float, 1>(2, 7, 20, false, 1, true);
  run_case<float, 2>(1, 9, 50, true, 2, true);
  run_case<float, 4>(2, 5, 100, false, 3, false);
  run_case<float, 8>(1, 6, 200, true, 4, true);
  run_case<float, 16>(1, 5, 500, false, 5, false);
  run_case<float, 32>(1, 5, 1024, true, 6, true);
  run_case<double, 2>(2, 13, 40, false, 7, true);
  run_case<__nv_bfloat16, 4>(1, 10, 120, true, 8, true);
  // T > S bottom-right: rows that see no key
  run_case<float, 1>(1, 30, 8, true, 9, false);
  // block path (S > 1024): long and short visible prefixes, both alignments
  run_case<float, 0>(1, 6, 1500, true, 10, true);
  run_case<float, 0>(2, 6, 1100, false, 11, true);
  run_case<double, 0>(1, 2, 2100, true, 12, false);
  run_case<__nv_bfloat16, 0>(1, 6, 1300, true, 13, true);
  return shim_test::finish("test_cuda_softmax");
}
