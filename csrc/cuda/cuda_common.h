// Host-side helpers shared by attnext's CUDA op files (ATen types -> kernel types).
#pragma once

#include <ATen/ATen.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/version.h>

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

// Whether float32 may run on TF32 (tensor cores in our kernels, CUBLAS_COMPUTE_32F_FAST_TF32
// in cuBLAS): torch's precision for CUDA matmuls, the one torch.matmul and SDPA's math path
// follow, and not inside an at::NoTF32Guard (as torch's cuBLAS calls). Every attnext CUDA op
// reads it here. Read through the per-backend setting where torch has one
// (torch.backends.cuda.matmul.fp32_precision; the legacy switches allow_tf32 and
// set_float32_matmul_precision set it too): allowTF32CuBLAS() raises when only the new
// API was used. torch 2.10+ has it as enums, 2.9 as strings; before 2.9 there is only
// the legacy switch.
inline bool tf32_allowed() {
  if (at::NoTF32Guard::should_disable_tf32()) return false;
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 10)
  return at::globalContext().float32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL) ==
         at::Float32Precision::TF32;
#elif TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR == 9
  return at::globalContext().float32Precision("cuda", "matmul") == "tf32";
#else
  return at::globalContext().allowTF32CuBLAS();
#endif
}

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
