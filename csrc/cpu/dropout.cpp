// attnext.dropout on the CPU: y = x * keep / (1 - p), keep[n] from the counter-based
// hash of dropout_hash.h (the same mask as the CUDA kernel and reference.py), one
// pass, parallel over elements. torch's CPU dropout draws a Bernoulli per element
// from a generator (measured 35 ms for 6.3M floats on the dev VM); the hash is a
// few integer operations per element and vectorises.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common.h"
#include "cpu/parallel.h"
#include "cpu/vec_math.h"
#include "dropout_hash.h"
#include "ops.h"

namespace attnext {
namespace {

// y[i] = x[i] * (keep ? scale : 0) for i < n, element index j0 + i of the 2^32 block
// with key `key`. A multiply (not a select), so a dropped NaN stays NaN, as in torch.
ATTNEXT_MULTIVERSION void drop_f32(const float* x, float* y, int64_t n, uint32_t key, uint32_t j0, uint32_t threshold,
                                   float scale) {
  for (int64_t i = 0; i < n; ++i) {
    const bool keep = fmix32(key + (j0 + static_cast<uint32_t>(i)) * kColMul) >= threshold;
    y[i] = x[i] * (keep ? scale : 0.0f);
  }
}

ATTNEXT_MULTIVERSION void drop_f64(const double* x, double* y, int64_t n, uint32_t key, uint32_t j0,
                                   uint32_t threshold, double scale) {
  for (int64_t i = 0; i < n; ++i) {
    const bool keep = fmix32(key + (j0 + static_cast<uint32_t>(i)) * kColMul) >= threshold;
    y[i] = x[i] * (keep ? scale : 0.0);
  }
}

template <typename T>
void drop_any(const T* x, T* y, int64_t n, uint32_t key, uint32_t j0, uint32_t threshold, float scale) {
  for (int64_t i = 0; i < n; ++i) {
    const bool keep = fmix32(key + (j0 + static_cast<uint32_t>(i)) * kColMul) >= threshold;
    y[i] = static_cast<T>(static_cast<float>(x[i]) * (keep ? scale : 0.0f));
  }
}

void drop_block(const float* x, float* y, int64_t n, uint32_t key, uint32_t j0, uint32_t thr, double scale) {
  drop_f32(x, y, n, key, j0, thr, static_cast<float>(scale));
}
void drop_block(const double* x, double* y, int64_t n, uint32_t key, uint32_t j0, uint32_t thr, double scale) {
  drop_f64(x, y, n, key, j0, thr, scale);
}
template <typename T>
void drop_block(const T* x, T* y, int64_t n, uint32_t key, uint32_t j0, uint32_t thr, double scale) {
  drop_any(x, y, n, key, j0, thr, static_cast<float>(scale));
}

}  // namespace

at::Tensor dropout_cpu(const at::Tensor& x_in, double p, int64_t seed, int64_t offset,
                       const std::optional<at::Tensor>& rng) {
  check_strided(x_in, "x");
  TORCH_CHECK(x_in.device().is_cpu(), "attnext: x must be a CPU tensor for the CPU kernel, got ", x_in.device());
  check_floating(x_in, "x");
  TORCH_CHECK_VALUE(p >= 0.0 && p < 1.0, "attnext: dropout p must be in [0, 1), got ", p);
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = empty_output(x.sizes(), x.options());
  const int64_t N = x.numel();
  if (N == 0) {
    return y;
  }
  const DropoutSeed ds = host_dropout_seed(seed, offset, rng);
  const uint32_t stream = dropout_stream_key(ds.seed, ds.offset);
  const uint32_t threshold = dropout_threshold(p);
  const double scale = 1.0 / (1.0 - p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dropout_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    attnext::parallel_for(0, N, 1 << 14, [&](int64_t begin, int64_t end) {
      // pieces that do not cross a 2^32-element block (one key each)
      for (int64_t n0 = begin; n0 < end;) {
        const int64_t block_end = std::min(end, ((n0 >> 32) + 1) << 32);
        drop_block(xp + n0, yp + n0, block_end - n0, dropout_block_key(stream, n0), static_cast<uint32_t>(n0),
                   threshold, scale);
        n0 = block_end;
      }
    });
  });
  return y;
}

TORCH_LIBRARY_IMPL(attnext, CPU, m) { m.impl("dropout", &dropout_cpu); }

}  // namespace attnext
