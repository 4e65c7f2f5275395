// Row addressing shared by the CPU kernels (RowIndexer, common.h) and the CUDA
// kernels (RowAddr, causal_softmax_kernels.cuh; mma::Rows, causal_attention_mma.h):
// plain C++, no torch or CUDA includes, callable on the host and the device.
#pragma once

#include <cstdint>

#ifndef ATTNEXT_HD
#if defined(__CUDACC__)
#define ATTNEXT_HD __host__ __device__ __forceinline__
#else
#define ATTNEXT_HD inline __attribute__((always_inline))
#endif
#endif

namespace attnext {

// Element offset of batch b, a linear index over n batch dims numbered as in a
// contiguous tensor (the last dim fastest), for dims of the given sizes and strides.
ATTNEXT_HD int64_t batch_offset(const int64_t* sizes, const int64_t* strides, int64_t n, int64_t b) {
  int64_t off = 0;
  for (int64_t d = n - 1; d >= 0; --d) {
    const int64_t i = b % sizes[d];
    b /= sizes[d];
    off += i * strides[d];
  }
  return off;
}

}  // namespace attnext
