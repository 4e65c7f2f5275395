// Causal mean ("the efficient bag of words") on the CPU, forward and backward.
//
// Forward: y[t] = (x[0] + ... + x[t]) / (t + 1) over the T dim of x (..., T, C):
// one running sum per column, O(T * C), instead of the lecture's
// (tril / tril.sum(1)) @ x, O(T^2 * C). Backward: the adjoint, a running sum from
// the end, grad_x[t] = sum_{i >= t} grad_y[i] / (i + 1).
//
// Accuracy: the running sums are kept in double for every input dtype, so a float32
// result carries one rounding (<= 0.5 ulp) however long T is; a float32 running sum
// would drift like T * eps. The double adds cost nothing here: the loops are bound
// by memory traffic.
//
// Blocking and parallelism: columns are cut into blocks of kBlock; each
// (batch, column block) pair is one task of at::parallel_for and walks T with its
// block of double accumulators in L1, reading and writing unit-stride rows
// (the inner loop over columns vectorises). Rows need a unit-stride last dim (else
// x is copied once); the other dims may have any strides.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "common.h"
#include "cpu/parallel.h"
#include "ops.h"

namespace attnext {
namespace {

constexpr int64_t kBlock = 256;

// To double; bfloat16/float16 go through float, their own conversion.
template <typename scalar_t>
inline double widen(scalar_t v) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    return v;
  } else {
    return static_cast<double>(static_cast<float>(v));
  }
}

// reverse = false: y[t] = sum_{s <= t} x[s] / (t + 1) (forward).
// reverse = true:  y[t] = sum_{s >= t} x[s] / (s + 1) (backward).
template <typename scalar_t, bool reverse>
void scan_impl(const at::Tensor& x, at::Tensor& y) {
  const int64_t T = x.size(-2), C = x.size(-1);
  const int64_t B = x.numel() / (T * C);
  const int64_t nblocks = (C + kBlock - 1) / kBlock;
  const RowIndexer xr(x);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* yp = y.mutable_data_ptr<scalar_t>();
  // A task streams T * w elements; a thread gets >= 2^18 of them (1 MiB of float32)
  // so that small inputs stay on one thread (the fork/join would cost more).
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(1, T * std::min(C, kBlock)));
  attnext::parallel_for(0, B * nblocks, grain, [&](int64_t begin, int64_t end) {
    double acc[kBlock];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / nblocks, c0 = (task % nblocks) * kBlock;
      const int64_t w = std::min(kBlock, C - c0);
      std::fill(acc, acc + w, 0.0);
      const int64_t xbase = xr.batch_offset(b) + c0;
      scalar_t* ybase = yp + b * T * C + c0;
      for (int64_t u = 0; u < T; ++u) {
        const int64_t t = reverse ? T - 1 - u : u;
        const scalar_t* xrow = xp + xbase + t * xr.stride_t;
        scalar_t* yrow = ybase + t * C;
        const double inv = 1.0 / static_cast<double>(t + 1);
        if constexpr (reverse) {
#pragma omp simd
          for (int64_t j = 0; j < w; ++j) {
            acc[j] += widen(xrow[j]) * inv;
            yrow[j] = static_cast<scalar_t>(acc[j]);
          }
        } else {
#pragma omp simd
          for (int64_t j = 0; j < w; ++j) {
            acc[j] += widen(xrow[j]);
            yrow[j] = static_cast<scalar_t>(acc[j] * inv);
          }
        }
      }
    }
  });
}

void check_input(const at::Tensor& t, const char* name) {
  check_strided(t, name);
  TORCH_CHECK(t.device().is_cpu(), "attnext: ", name, " must be a CPU tensor for the CPU kernel, got ", t.device());
  check_floating(t, name);
  check_min_dim(t, 2, name, "(..., T, C)");
}

template <bool reverse>
at::Tensor scan(const at::Tensor& x_in) {
  const at::Tensor x = unit_stride_rows(x_in);
  at::Tensor y = empty_output(x.sizes(), x.options());
  if (y.numel() == 0) {
    return y;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "causal_mean_cpu",
                                  [&] { scan_impl<scalar_t, reverse>(x, y); });
  return y;
}

}  // namespace

at::Tensor causal_mean_cpu(const at::Tensor& x) {
  check_input(x, "x");
  return scan<false>(x);
}

at::Tensor causal_mean_backward_cpu(const at::Tensor& grad_y) {
  check_input(grad_y, "grad_y");
  return scan<true>(grad_y);
}

TORCH_LIBRARY_IMPL(attnext, CPU, m) {
  m.impl("causal_mean", &causal_mean_cpu);
  m.impl("_causal_mean_backward", &causal_mean_backward_cpu);
}

}  // namespace attnext
