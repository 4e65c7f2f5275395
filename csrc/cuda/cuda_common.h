// Host-side helpers shared by attnext's CUDA op files (ATen types -> kernel types).
#pragma once

#include <ATen/ATen.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/causal_softmax_kernels.cuh"  // RowAddr

namespace attnext {

// The CUDA type a kernel uses for an ATen scalar type.
template <typename T>
struct CudaType {
  using type = T;
};
template <>
struct CudaType<at::Half> {
  using type = __half;
};
template <>
struct CudaType<at::BFloat16> {
  using type = __nv_bfloat16;
};

// Row addressing (batch dims and the T dim, any strides) of a (..., T, C) tensor.
inline cuda::RowAddr row_addr(const at::Tensor& t) {
  cuda::RowAddr a{};
  const int64_t nd = t.dim();
  TORCH_CHECK(nd - 2 <= cuda::kMaxBatchDims, "attnext: at most ", cuda::kMaxBatchDims,
              " batch dims are supported on CUDA, got ", nd - 2);
  a.nbatch = static_cast<int>(nd - 2);
  for (int64_t d = 0; d < nd - 2; ++d) {
    a.sizes[d] = t.size(d);
    a.strides[d] = t.stride(d);
  }
  a.stride_t = t.stride(nd - 2);
  return a;
}

}  // namespace attnext
