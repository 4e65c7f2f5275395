// Pieces shared by the C++ tests that run GPU kernel code on the host (test_mma_layout,
// test_cuda_core_attention): a reusable barrier for emulated threads, and a float64
// attention reference (forward and backward, any window, dropout factors).
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <vector>

#include "dropout_hash.h"

namespace attnext_emu {

[[noreturn]] inline void die(const char* msg) {
  std::fprintf(stderr, "FATAL: %s\n", msg);
  std::fflush(stderr);
  std::abort();
}

// A barrier for n threads, reusable (generation counted). A thread left waiting 60 s
// means the emulated threads took different paths to a collective: fatal.
class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void wait() {
    std::unique_lock<std::mutex> lk(m_);
    const uint64_t gen = gen_;
    if (++count_ == n_) {
      count_ = 0;
      ++gen_;
      cv_.notify_all();
      return;
    }
    if (!cv_.wait_for(lk, std::chrono::seconds(60), [&] { return gen_ != gen; })) {
      die("barrier timeout: threads of a warp or block took different paths to a collective");
    }
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
  int n_, count_ = 0;
  uint64_t gen_ = 0;
};

// float64 attention over BH batches: q (BH, T, hs), k (BH, S, hs), v (BH, S, hsv),
// dout (BH, T, hsv), row-major values. Row t sees keys first(t) <= j < visible(t) of the
// window (wl, wr) around the diagonal t + shift (-1: unbounded on that side; the default
// (-1, 0) is causal): visible(t) = clamp(t + shift + wr + 1, 0, S) (S for wr = -1),
// first(t) = clamp(t + shift - wl, 0, S) (0 for wl = -1), written here from the
// definition, not from the kernels' helpers. zfac(b, t, j) is dropout's factor
// (1 / (1 - p) or 0; 1 without dropout). A row that sees no key: out 0, lse -inf, no
// gradient.
struct AttnRef {
  std::vector<double> out, lse, dq, dk, dv;
};

template <class Z>
AttnRef attention_reference(const std::vector<double>& q, const std::vector<double>& k, const std::vector<double>& v,
                            const std::vector<double>& dout, int BH, int T, int S, int hs, int hsv, double scale,
                            int64_t shift, Z zfac, int64_t wl = -1, int64_t wr = 0) {
  AttnRef r;
  r.out.assign(size_t(BH) * T * hsv, 0.0);
  r.lse.assign(size_t(BH) * T, -INFINITY);
  r.dq.assign(size_t(BH) * T * hs, 0.0);
  r.dk.assign(size_t(BH) * S * hs, 0.0);
  r.dv.assign(size_t(BH) * S * hsv, 0.0);
  auto clampS = [&](int64_t x) { return std::min<int64_t>(std::max<int64_t>(x, 0), S); };
  auto visible = [&](int64_t t) { return wr < 0 ? int64_t(S) : clampS(t + shift + wr + 1); };
  auto first = [&](int64_t t) { return wl < 0 ? int64_t(0) : clampS(t + shift - wl); };
  std::vector<double> P;
  for (int b = 0; b < BH; ++b) {
    for (int t = 0; t < T; ++t) {
      const size_t bt = size_t(b) * T + t;
      const int64_t j0 = first(t), n = visible(t);
      if (j0 >= n) continue;
      P.assign(n, 0.0);
      double mx = -INFINITY;
      for (int64_t j = j0; j < n; ++j) {
        double acc = 0;
        for (int c = 0; c < hs; ++c) acc += q[bt * hs + c] * k[(size_t(b) * S + j) * hs + c];
        P[j] = acc * scale;
        mx = std::max(mx, P[j]);
      }
      double sum = 0;
      for (int64_t j = j0; j < n; ++j) sum += std::exp(P[j] - mx);
      const double lse = mx + std::log(sum);
      r.lse[bt] = lse;
      for (int64_t j = j0; j < n; ++j) {
        P[j] = std::exp(P[j] - lse);
        const double pd = P[j] * zfac(b, t, j);
        for (int c = 0; c < hsv; ++c) r.out[bt * hsv + c] += pd * v[(size_t(b) * S + j) * hsv + c];
      }
      double D = 0;
      for (int c = 0; c < hsv; ++c) D += dout[bt * hsv + c] * r.out[bt * hsv + c];
      for (int64_t j = j0; j < n; ++j) {
        const size_t bj = size_t(b) * S + j;
        const double z = zfac(b, t, j);
        double dp = 0;
        for (int c = 0; c < hsv; ++c) dp += dout[bt * hsv + c] * v[bj * hsv + c];
        const double ds = P[j] * (dp * z - D);
        for (int c = 0; c < hs; ++c) {
          r.dq[bt * hs + c] += scale * ds * k[bj * hs + c];
          r.dk[bj * hs + c] += scale * ds * q[bt * hs + c];
        }
        for (int c = 0; c < hsv; ++c) r.dv[bj * hsv + c] += P[j] * z * dout[bt * hsv + c];
      }
    }
  }
  return r;
}

// Dropout's factor for weight (b, t, j) under (stream key, p): 1 / (1 - p) if the mask
// of dropout_hash.h keeps it, else 0; 1 when p == 0. (The includer provides dropout_hash.h.)
struct DropoutFactor {
  uint32_t stream, threshold;
  double p;
  DropoutFactor(uint32_t stream_, double p_)
      : stream(stream_), threshold(::attnext::dropout_threshold(p_)), p(p_) {}
  double operator()(int64_t b, int64_t t, int64_t j) const {
    if (p == 0) return 1.0;
    return ::attnext::dropout_keep(::attnext::dropout_row_key(stream, b, t), uint32_t(j), threshold) ? 1.0 / (1.0 - p)
                                                                                                   : 0.0;
  }
};

inline double max_abs(const std::vector<double>& v) {
  double m = 0;
  for (double x : v) m = std::max(m, std::fabs(x));
  return m;
}

// max(e, |got - ref|), with NaN (anywhere but where ref is NaN) as an infinite error
inline double worse(double e, double got, double ref) {
  const double d = std::fabs(got - ref);
  return std::isnan(d) ? INFINITY : std::max(e, d);
}

}  // namespace attnext_emu
