// Causal masked softmax on NVIDIA GPUs: the kernels (no ATen includes here).
//
// Row t of each (T, S) matrix sees its visible prefix x[0:L], L = t + 1 (or
// t + 1 + S - T bottom-right), clamped to [0, S]; only that prefix is read.
//  * Short rows (S <= 32 * kMaxPerLane): one warp per row, the row held in
//    registers (kPerLane elements per lane, lane-strided so loads coalesce);
//    max, exp and sum by warp shuffles; one read, one write.
//  * Long rows (any S, no length limit): one block per row; an online
//    (max, sum) pass over the visible prefix with a block reduction, then a
//    write pass (the second read of x is served mostly by L2).
// Accumulation in float (double for double). A row that sees no key is zeros;
// a row whose visible part makes torch.softmax NaN (NaN, +inf, all -inf) is
// NaN throughout, as torch's is. Backward: dx = scale * y * (dy - <dy, y>).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "batch_offset.h"

namespace attnext {
namespace cuda {

constexpr int kMaxBatchDims = 16;  // as the CPU kernels (RowIndexer::kMaxDims) and matmul
constexpr int kMaxPerLane = 32;  // warp path up to S = 1024

// Row addressing for inputs with unit-stride rows and arbitrary batch / T strides.
struct RowAddr {
  int64_t sizes[kMaxBatchDims];
  int64_t strides[kMaxBatchDims];
  int nbatch;
  int64_t stride_t;

  __device__ __forceinline__ int64_t offset(int64_t b, int64_t t) const {
    return t * stride_t + batch_offset(sizes, strides, nbatch, b);
  }
};

struct SoftmaxShape {
  int64_t rows;  // B * T
  int64_t T;
  int64_t S;
  bool bottom_right;
};

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_acc(float v);
template <>
__device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <typename T>
__device__ __forceinline__ T from_acc(double v) { return static_cast<T>(v); }

__device__ __forceinline__ float exp_acc(float v) { return expf(v); }
__device__ __forceinline__ double exp_acc(double v) { return exp(v); }

template <typename A>
__device__ __forceinline__ A quiet_nan();
template <>
__device__ __forceinline__ float quiet_nan<float>() { return __int_as_float(0x7fc00000); }
template <>
__device__ __forceinline__ double quiet_nan<double>() { return __longlong_as_double(0x7ff8000000000000LL); }

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename A>
__device__ __forceinline__ A warp_max(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const A w = __shfl_xor_sync(0xffffffffu, v, o);
    v = w > v ? w : v;
  }
  return v;
}

__device__ __forceinline__ int64_t visible(int64_t t, const SoftmaxShape& s) {
  const int64_t v = t + 1 + (s.bottom_right ? s.S - s.T : 0);
  return v < 0 ? 0 : (v > s.S ? s.S : v);
}

// Where a row of the (B*T, S) problem sits: its batch b, query t, visible length L.
struct RowPos {
  int64_t row, b, t, L;
};

__device__ __forceinline__ RowPos row_pos(int64_t row, const SoftmaxShape& sh) {
  const int64_t b = row / sh.T, t = row % sh.T;
  return {row, b, t, visible(t, sh)};
}

// The row of this warp (warp-per-row kernels).
__device__ __forceinline__ int64_t warp_row() {
  return static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
}

// ---------------------------------------------------------------- warp per row

template <typename T, int kPerLane>
__global__ void causal_softmax_fwd_warp_kernel(const T* __restrict__ x, RowAddr xa, T* __restrict__ y,
                                               SoftmaxShape sh, typename AccOf<T>::type scale) {
  using A = typename AccOf<T>::type;
  const int lane = threadIdx.x & 31;
  if (warp_row() >= sh.rows) return;
  const RowPos r = row_pos(warp_row(), sh);
  const int64_t L = r.L;
  const T* xr = x + xa.offset(r.b, r.t);
  T* yr = y + r.row * sh.S;
  A v[kPerLane];
  A m = -INFINITY;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int64_t j = lane + 32 * i;
    v[i] = j < L ? to_acc(xr[j]) * scale : -INFINITY;
    m = v[i] > m ? v[i] : m;
  }
  m = warp_max(m);
  A sum = 0;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int64_t j = lane + 32 * i;
    v[i] = j < L ? exp_acc(v[i] - m) : A(0);
    sum += v[i];
  }
  sum = warp_sum(sum);
  const bool nan_row = L > 0 && !(sum > A(0));
  const A inv = A(1) / sum;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int64_t j = lane + 32 * i;
    if (j < sh.S) yr[j] = from_acc<T>(nan_row ? quiet_nan<A>() : (j < L ? v[i] * inv : A(0)));
  }
}

template <typename T, int kPerLane>
__global__ void causal_softmax_bwd_warp_kernel(const T* __restrict__ dy, RowAddr dya, const T* __restrict__ y,
                                               RowAddr ya, T* __restrict__ dx, SoftmaxShape sh,
                                               typename AccOf<T>::type scale) {
  using A = typename AccOf<T>::type;
  const int lane = threadIdx.x & 31;
  if (warp_row() >= sh.rows) return;
  const RowPos r = row_pos(warp_row(), sh);
  const int64_t L = r.L;
  const T* dyr = dy + dya.offset(r.b, r.t);
  const T* yr = y + ya.offset(r.b, r.t);
  T* dxr = dx + r.row * sh.S;
  A g[kPerLane], p[kPerLane];
  A dot = 0;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int64_t j = lane + 32 * i;
    g[i] = j < L ? to_acc(dyr[j]) : A(0);
    p[i] = j < L ? to_acc(yr[j]) : A(0);
    dot += g[i] * p[i];
  }
  dot = warp_sum(dot);
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int64_t j = lane + 32 * i;
    if (j < sh.S) dxr[j] = from_acc<T>(j < L ? scale * p[i] * (g[i] - dot) : A(0));
  }
}

// ---------------------------------------------------------------- block per row

// Online (max, sum) pair merge; an empty side (s == 0, max -inf) contributes
// nothing. A side whose sum is NaN (it saw a NaN) keeps its NaN whatever its
// max, even -inf: NaN * exp(-inf - mm) is NaN, so the row still ends up NaN.
template <typename A>
__device__ __forceinline__ void merge(A& m, A& s, A m2, A s2) {
  const A mm = m2 > m ? m2 : m;
  const A a = s == A(0) ? A(0) : s * exp_acc(m - mm);
  const A c = s2 == A(0) ? A(0) : s2 * exp_acc(m2 - mm);
  m = mm;
  s = a + c;
}

template <typename A>
__device__ void block_reduce_max_sum(A& m, A& s, A* sm_m, A* sm_s) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const A m2 = __shfl_xor_sync(0xffffffffu, m, o);
    const A s2 = __shfl_xor_sync(0xffffffffu, s, o);
    merge(m, s, m2, s2);
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
  if (lane == 0) {
    sm_m[warp] = m;
    sm_s[warp] = s;
  }
  __syncthreads();
  if (warp == 0) {
    m = lane < nwarps ? sm_m[lane] : A(-INFINITY);
    s = lane < nwarps ? sm_s[lane] : A(0);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const A m2 = __shfl_xor_sync(0xffffffffu, m, o);
      const A s2 = __shfl_xor_sync(0xffffffffu, s, o);
      merge(m, s, m2, s2);
    }
    if (lane == 0) {
      sm_m[0] = m;
      sm_s[0] = s;
    }
  }
  __syncthreads();
  m = sm_m[0];
  s = sm_s[0];
}

template <typename A>
__device__ A block_sum(A v, A* sm) {
  v = warp_sum(v);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
  if (lane == 0) sm[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < nwarps ? sm[lane] : A(0);
    v = warp_sum(v);
    if (lane == 0) sm[0] = v;
  }
  __syncthreads();
  return sm[0];
}

template <typename T>
__global__ void causal_softmax_fwd_block_kernel(const T* __restrict__ x, RowAddr xa, T* __restrict__ y,
                                                SoftmaxShape sh, typename AccOf<T>::type scale) {
  using A = typename AccOf<T>::type;
  __shared__ A sm_m[32], sm_s[32];
  const RowPos r = row_pos(blockIdx.x, sh);
  const int64_t L = r.L;
  const T* xr = x + xa.offset(r.b, r.t);
  T* yr = y + r.row * sh.S;
  A m = -INFINITY, s = 0;
  for (int64_t j = threadIdx.x; j < L; j += blockDim.x) {
    const A z = to_acc(xr[j]) * scale;
    if (z > m) {
      // s == 0 exactly while nothing is seen yet; a NaN sum stays NaN (as in merge).
      s = (s == A(0) ? A(0) : s * exp_acc(m - z)) + A(1);
      m = z;
    } else if (z != -INFINITY) {
      s += exp_acc(z - m);  // NaN z lands here and poisons the sum, as in torch
    }
  }
  block_reduce_max_sum(m, s, sm_m, sm_s);
  const bool nan_row = L > 0 && (!(s > A(0)) || m == INFINITY);
  const A inv = A(1) / s;
  for (int64_t j = threadIdx.x; j < sh.S; j += blockDim.x) {
    A out = A(0);
    if (nan_row) {
      out = quiet_nan<A>();
    } else if (j < L) {
      out = exp_acc(to_acc(xr[j]) * scale - m) * inv;
    }
    yr[j] = from_acc<T>(out);
  }
}

template <typename T>
__global__ void causal_softmax_bwd_block_kernel(const T* __restrict__ dy, RowAddr dya, const T* __restrict__ y,
                                                RowAddr ya, T* __restrict__ dx, SoftmaxShape sh,
                                                typename AccOf<T>::type scale) {
  using A = typename AccOf<T>::type;
  __shared__ A sm[32];
  const RowPos r = row_pos(blockIdx.x, sh);
  const int64_t L = r.L;
  const T* dyr = dy + dya.offset(r.b, r.t);
  const T* yr = y + ya.offset(r.b, r.t);
  T* dxr = dx + r.row * sh.S;
  A dot = 0;
  for (int64_t j = threadIdx.x; j < L; j += blockDim.x) dot += to_acc(dyr[j]) * to_acc(yr[j]);
  dot = block_sum(dot, sm);
  for (int64_t j = threadIdx.x; j < sh.S; j += blockDim.x) {
    dxr[j] = from_acc<T>(j < L ? scale * to_acc(yr[j]) * (to_acc(dyr[j]) - dot) : A(0));
  }
}

}  // namespace cuda
}  // namespace attnext
