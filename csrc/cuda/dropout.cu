// attnext.dropout on CUDA: y = x * keep / (1 - p) with the counter-based keep mask of
// dropout_hash.h (the same mask as the CPU kernel and reference.py); one grid-stride
// elementwise pass on the current stream.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common.h"
#include "cuda/cuda_common.h"
#include "dropout_hash.h"

namespace attnext {
namespace {

template <typename T, typename A>
__global__ void dropout_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t n, uint32_t stream_host,
                               const int64_t* rng, uint32_t threshold, A scale) {
  // rng: [seed, offset] drawn on the device (CUDA-graph safe); else the host's key
  const uint32_t stream = rng ? dropout_stream_key(rng[0], rng[1]) : stream_host;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const bool keep = dropout_keep(dropout_block_key(stream, i), static_cast<uint32_t>(i), threshold);
    y[i] = cuda::from_acc<T>(cuda::to_acc(x[i]) * (keep ? scale : A(0)));
  }
}

}  // namespace

at::Tensor dropout_cuda(const at::Tensor& x_in, double p, int64_t seed, int64_t offset,
                        const std::optional<at::Tensor>& rng) {
  check_strided(x_in, "x");
  TORCH_CHECK(x_in.is_cuda(), "attnext: x must be a CUDA tensor for the CUDA kernel, got ", x_in.device());
  check_floating(x_in, "x");
  TORCH_CHECK_VALUE(p >= 0.0 && p < 1.0, "attnext: dropout p must be in [0, 1), got ", p);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t n = x.numel();
  if (n == 0) {
    return y;
  }
  const DropoutSeed ds = device_dropout_seed(seed, offset, rng, x_in);
  const uint32_t stream = dropout_stream_key(ds.seed, ds.offset);
  const uint32_t threshold = dropout_threshold(p);
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((n + threads - 1) / threads,
                                           int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 32);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dropout_cuda", [&] {
    using T = typename CudaType<scalar_t>::type;
    using A = typename cuda::AccOf<T>::type;
    dropout_kernel<T, A><<<static_cast<unsigned>(blocks), threads, 0, at::cuda::getCurrentCUDAStream()>>>(
        reinterpret_cast<const T*>(x.const_data_ptr()), reinterpret_cast<T*>(y.mutable_data_ptr()), n, stream,
        ds.device, threshold, static_cast<A>(1.0 / (1.0 - p)));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

TORCH_LIBRARY_IMPL(attnext, CUDA, m) { m.impl("dropout", &dropout_cuda); }

}  // namespace attnext
