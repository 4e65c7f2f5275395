// Causal mean on CUDA: y[t] = (x[0] + ... + x[t]) / (t + 1) over the T dim of
// x (..., T, C), and its adjoint grad_x[t] = sum_{i >= t} grad_y[i] / (i + 1).
//
// One thread per (batch, column) walks T with a double running sum (one rounding
// per output, as on the CPU); neighbouring threads take neighbouring columns, so
// every step's loads and stores coalesce. Rows need a unit-stride last dim (else
// the input is copied once); batch and T strides are arbitrary. Launches go to the
// current stream under a device guard.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common.h"
#include "cuda/causal_softmax_kernels.cuh"  // to_acc / from_acc conversions
#include "cuda/cuda_common.h"

namespace attnext {
namespace {

template <typename T>
__device__ __forceinline__ T store_from_double(double v) {
  return cuda::from_acc<T>(static_cast<typename cuda::AccOf<T>::type>(v));
}

// reverse = false: forward (prefix means); true: backward (suffix sums of g / (i + 1)).
template <typename T, bool kReverse>
__global__ void causal_mean_kernel(const T* __restrict__ x, cuda::RowAddr xa, T* __restrict__ y, int64_t B, int64_t Tn,
                                   int64_t C) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= B * C) return;
  const int64_t b = idx / C, c = idx % C;
  T* yb = y + b * Tn * C + c;
  double run = 0.0;
  for (int64_t s = 0; s < Tn; ++s) {
    const int64_t t = kReverse ? Tn - 1 - s : s;
    const double v = static_cast<double>(cuda::to_acc(x[xa.offset(b, t) + c]));
    if (kReverse) {
      run += v / static_cast<double>(t + 1);
      yb[t * C] = store_from_double<T>(run);
    } else {
      run += v;
      yb[t * C] = store_from_double<T>(run / static_cast<double>(t + 1));
    }
  }
}

template <bool kReverse>
at::Tensor run(const at::Tensor& x_in, const char* name) {
  check_strided(x_in, name);
  TORCH_CHECK(x_in.is_cuda(), "attnext: ", name, " must be a CUDA tensor for the CUDA kernel, got ", x_in.device());
  check_floating(x_in, name);
  check_min_dim(x_in, 2, name, "(..., T, C)");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = unit_stride_rows(x_in);
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (y.numel() == 0) return y;
  const int64_t Tn = x.size(-2), C = x.size(-1), B = x.numel() / (Tn * C);
  const int64_t threads = 256, blocks = (B * C + threads - 1) / threads;
  TORCH_CHECK(blocks <= int64_t(0x7fffffff), "attnext: causal_mean input too large for one launch");
  const auto xa = row_addr(x);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "causal_mean_cuda", [&] {
    using T = typename CudaType<scalar_t>::type;
    causal_mean_kernel<T, kReverse><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
        reinterpret_cast<const T*>(x.const_data_ptr<scalar_t>()), xa,
        reinterpret_cast<T*>(y.mutable_data_ptr<scalar_t>()), B, Tn, C);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

}  // namespace

at::Tensor causal_mean_cuda(const at::Tensor& x) { return run<false>(x, "x"); }
at::Tensor causal_mean_backward_cuda(const at::Tensor& grad_y) { return run<true>(grad_y, "grad_y"); }

TORCH_LIBRARY_IMPL(attnext, CUDA, m) {
  m.impl("causal_mean", &causal_mean_cuda);
  m.impl("_causal_mean_backward", &causal_mean_backward_cuda);
}

}  // namespace attnext
