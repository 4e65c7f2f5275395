// Causal masked softmax on CUDA: host side (checks, dispatch, launches).
// The kernels and their algorithm are described in causal_softmax_kernels.cuh.
// Launches go to the current stream under a device guard; launch errors are checked.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common.h"
#include "cuda/causal_softmax_kernels.cuh"
#include "cuda/cuda_common.h"
#include "cuda/static_switch.h"

namespace attnext {
namespace {

void check_cuda_input(const at::Tensor& t, const char* name) {
  check_strided(t, name);
  TORCH_CHECK(t.is_cuda(), "attnext: ", name, " must be a CUDA tensor for the CUDA kernel, got ", t.device());
  check_floating(t, name);
  check_min_dim(t, 2, name, "(..., T, S)");
}

constexpr int kWarpsPerBlock = 4;
constexpr int kBlockThreads = 512;

// Elements per lane on the warp path; past 32 * kMaxPerLane, kMaxPerLane + 1 (the
// block path). Decided in int64 so that no row length can wrap to a small int.
int per_lane_of(int64_t S) {
  return S > int64_t(32) * cuda::kMaxPerLane ? cuda::kMaxPerLane + 1 : static_cast<int>((S + 31) / 32);
}

template <typename scalar_t>
void launch_fwd(const at::Tensor& x, at::Tensor& y, double scale, bool bottom_right) {
  using T = typename CudaType<scalar_t>::type;
  using A = typename cuda::AccOf<T>::type;
  const cuda::SoftmaxShape sh{y.numel() / y.size(-1), y.size(-2), y.size(-1), bottom_right};
  const auto xa = row_addr(x);
  const T* xp = reinterpret_cast<const T*>(x.const_data_ptr<scalar_t>());
  T* yp = reinterpret_cast<T*>(y.mutable_data_ptr<scalar_t>());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int per_lane = per_lane_of(sh.S);
  const bool warp_path = pow2_switch<cuda::kMaxPerLane>(per_lane, [&](auto p) {
    const int64_t blocks = (sh.rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
    cuda::causal_softmax_fwd_warp_kernel<T, decltype(p)::value>
        <<<static_cast<unsigned>(blocks), 32 * kWarpsPerBlock, 0, stream>>>(xp, xa, yp, sh, static_cast<A>(scale));
  });
  if (!warp_path) {
    cuda::causal_softmax_fwd_block_kernel<T>
        <<<static_cast<unsigned>(sh.rows), kBlockThreads, 0, stream>>>(xp, xa, yp, sh, static_cast<A>(scale));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void launch_bwd(const at::Tensor& dy, const at::Tensor& y, at::Tensor& dx, double scale, bool bottom_right) {
  using T = typename CudaType<scalar_t>::type;
  using A = typename cuda::AccOf<T>::type;
  const cuda::SoftmaxShape sh{dx.numel() / dx.size(-1), dx.size(-2), dx.size(-1), bottom_right};
  const auto dya = row_addr(dy), ya = row_addr(y);
  const T* dyp = reinterpret_cast<const T*>(dy.const_data_ptr<scalar_t>());
  const T* yp = reinterpret_cast<const T*>(y.const_data_ptr<scalar_t>());
  T* dxp = reinterpret_cast<T*>(dx.mutable_data_ptr<scalar_t>());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int per_lane = per_lane_of(sh.S);
  const bool warp_path = pow2_switch<cuda::kMaxPerLane>(per_lane, [&](auto p) {
    const int64_t blocks = (sh.rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
    cuda::causal_softmax_bwd_warp_kernel<T, decltype(p)::value><<<static_cast<unsigned>(blocks), 32 * kWarpsPerBlock,
                                                                  0, stream>>>(dyp, dya, yp, ya, dxp, sh,
                                                                               static_cast<A>(scale));
  });
  if (!warp_path) {
    cuda::causal_softmax_bwd_block_kernel<T><<<static_cast<unsigned>(sh.rows), kBlockThreads, 0, stream>>>(
        dyp, dya, yp, ya, dxp, sh, static_cast<A>(scale));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void check_grid(int64_t rows) {
  TORCH_CHECK(rows <= int64_t(0x7fffffff), "attnext: too many rows for one CUDA launch: ", rows);
}

}  // namespace

at::Tensor causal_softmax_cuda(const at::Tensor& x_in, double scale, bool bottom_right) {
  check_cuda_input(x_in, "x");
  check_scale(scale);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = unit_stride_rows(x_in);
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (y.numel() == 0) {
    return y;
  }
  check_grid(y.numel() / y.size(-1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "causal_softmax_cuda",
                                  [&] { launch_fwd<scalar_t>(x, y, scale, bottom_right); });
  return y;
}

at::Tensor causal_softmax_backward_cuda(const at::Tensor& grad_y_in, const at::Tensor& y_in, double scale,
                                        bool bottom_right) {
  check_cuda_input(grad_y_in, "grad_y");
  check_cuda_input(y_in, "y");
  check_same(grad_y_in, "grad_y", y_in, "y");
  TORCH_CHECK(grad_y_in.sizes() == y_in.sizes(), "attnext: grad_y must have the shape of y ", y_in.sizes(),
              ", got ", grad_y_in.sizes());
  check_scale(scale);
  const c10::cuda::CUDAGuard guard(y_in.device());
  const at::Tensor dy = unit_stride_rows(grad_y_in);
  const at::Tensor y = unit_stride_rows(y_in);
  at::Tensor dx = at::empty(y.sizes(), y.options().memory_format(at::MemoryFormat::Contiguous));
  if (dx.numel() == 0) {
    return dx;
  }
  check_grid(dx.numel() / dx.size(-1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "causal_softmax_backward_cuda",
                                  [&] { launch_bwd<scalar_t>(dy, y, dx, scale, bottom_right); });
  return dx;
}

TORCH_LIBRARY_IMPL(attnext, CUDA, m) {
  m.impl("causal_softmax", &causal_softmax_cuda);
  m.impl("_causal_softmax_backward", &causal_softmax_backward_cuda);
}

}  // namespace attnext
