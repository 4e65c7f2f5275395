// Fused causal attention on CUDA: host side (checks, tile choice, launches).
// The kernels and their algorithm are described in causal_attention_kernels.cuh.
// Launches go to the current stream under a device guard; launch errors are checked.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "common.h"
#include "cuda/causal_attention_kernels.cuh"
#include "cuda/cuda_common.h"
#include "dropout_hash.h"

namespace attnext {
namespace {

void check_cuda_input(const at::Tensor& t, const char* name, const char* shape) {
  check_strided(t, name);
  TORCH_CHECK(t.is_cuda(), "attnext: ", name, " must be a CUDA tensor for the CUDA kernel, got ", t.device());
  check_floating(t, name);
  check_min_dim(t, 2, name, shape);
}

using Geometry = AttnGeometry;

Geometry check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale, double dropout_p,
                   bool bottom_right) {
  const Geometry g = check_attention_args(q, k, v, scale, dropout_p, bottom_right);
  check_cuda_input(q, "q", "(..., T, hs)");
  check_cuda_input(k, "k", "(..., S, hs)");
  check_cuda_input(v, "v", "(..., S, hs_v)");
  return g;
}

at::ScalarType acc_type(at::ScalarType st) { return st == at::kDouble ? at::kDouble : at::kFloat; }

template <typename T>
cuda::AttnParams<T, typename cuda::AccOf<T>::type> make_params(const at::Tensor& q, const at::Tensor& k,
                                                              const at::Tensor& v, const Geometry& g, double scale,
                                                              double dropout_p, int64_t seed, int64_t offset) {
  using A = typename cuda::AccOf<T>::type;
  cuda::AttnParams<T, A> p{};
  p.q = reinterpret_cast<const T*>(q.const_data_ptr());
  p.k = reinterpret_cast<const T*>(k.const_data_ptr());
  p.v = reinterpret_cast<const T*>(v.const_data_ptr());
  p.qa = row_addr(q);
  p.ka = row_addr(k);
  p.va = row_addr(v);
  p.BH = g.BH;
  p.T = g.T;
  p.S = g.S;
  p.hs = g.hs;
  p.hsv = g.hsv;
  p.shift = g.shift;
  p.scale = static_cast<A>(scale);
  p.drop = dropout_p > 0.0;
  p.stream_key = p.drop ? dropout_stream_key(seed, offset) : 0u;
  p.threshold = p.drop ? dropout_threshold(dropout_p) : 0u;
  p.inv_keep = static_cast<A>(p.drop ? 1.0 / (1.0 - dropout_p) : 1.0);
  return p;
}

// Rows per warp (query tile = 4 warps x rows) for a kernel whose shared memory
// for `rows` is bytes(rows): the largest of 8, 4, 2, 1 that fits this device's
// opt-in limit, or 0.
template <typename Bytes>
int pick_rows(Bytes bytes) {
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  for (int rows : {8, 4, 2, 1}) {
    if (bytes(rows) <= static_cast<int64_t>(optin)) return rows;
  }
  return 0;
}

// Calls f(std::integral_constant<int, rows>{}) for rows in {8, 4, 2, 1}.
template <typename F>
void rows_switch(int rows, F&& f) {
  switch (rows) {
    case 8:
      f(std::integral_constant<int, 8>{});
      break;
    case 4:
      f(std::integral_constant<int, 4>{});
      break;
    case 2:
      f(std::integral_constant<int, 2>{});
      break;
    default:
      f(std::integral_constant<int, 1>{});
  }
}

template <typename Kernel>
void set_smem(Kernel kernel, int64_t bytes) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

// One launch of a tile kernel: blocks of kAttnThreads threads with `smem` bytes of
// dynamic shared memory (opted in above the 48 KiB default), on the current stream.
template <typename Kernel, typename... Args>
void launch_tiles(Kernel kernel, int64_t blocks, int64_t smem, Args... args) {
  TORCH_CHECK(blocks <= int64_t(0x7fffffff), "attnext: causal_attention on CUDA: too many tiles for one launch (",
              blocks, ")");
  set_smem(kernel, smem);
  kernel<<<static_cast<unsigned>(blocks), cuda::kAttnThreads, static_cast<size_t>(smem),
           at::cuda::getCurrentCUDAStream()>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Query tiles of kRows rows per warp over T.
int64_t query_tiles(int64_t T, int rows) { return (T + cuda::kAttnWarps * rows - 1) / (cuda::kAttnWarps * rows); }

const char* kTooLarge =
    "attnext: causal_attention on CUDA: head sizes (hs, hs_v) too large for this GPU's shared memory in this dtype; "
    "use a smaller head size or float32 (float64 supports head sizes up to about 128)";

template <typename scalar_t>
void launch_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out, at::Tensor& lse,
                const Geometry& g, double scale, double dropout_p, int64_t seed, int64_t offset) {
  using T = typename CudaType<scalar_t>::type;
  using A = typename cuda::AccOf<T>::type;
  const auto p = make_params<T>(q, k, v, g, scale, dropout_p, seed, offset);
  const auto bytes = [&](int rows) { return cuda::FwdSmem(rows, g.hs, g.hsv).total * int64_t(sizeof(A)); };
  const int rows = pick_rows(bytes);
  TORCH_CHECK(rows > 0, kTooLarge, ", got hs = ", g.hs, ", hs_v = ", g.hsv);
  rows_switch(rows, [&](auto r) {
    constexpr int kRows = decltype(r)::value;
    launch_tiles(cuda::causal_attention_fwd_kernel<T, kRows>, g.BH * query_tiles(g.T, kRows), bytes(kRows), p,
                 reinterpret_cast<T*>(out.mutable_data_ptr()), lse.mutable_data_ptr<A>());
  });
}

template <typename scalar_t>
void launch_bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                const at::Tensor& lse, const at::Tensor& D, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
                const Geometry& g, double scale, double dropout_p, int64_t seed, int64_t offset) {
  using T = typename CudaType<scalar_t>::type;
  using A = typename cuda::AccOf<T>::type;
  const auto p = make_params<T>(q, k, v, g, scale, dropout_p, seed, offset);
  const auto da = row_addr(dout);
  const T* dop = reinterpret_cast<const T*>(dout.const_data_ptr());
  const A* lp = lse.const_data_ptr<A>();
  const A* Dp = D.const_data_ptr<A>();

  const auto kv_bytes = [&](int rows) { return cuda::DkdvSmem(rows, g.hs, g.hsv).total * int64_t(sizeof(A)); };
  const int kv_rows = pick_rows(kv_bytes);
  const auto q_bytes = [&](int rows) { return cuda::DqSmem(rows, g.hs, g.hsv).total * int64_t(sizeof(A)); };
  const int q_rows = pick_rows(q_bytes);
  TORCH_CHECK(kv_rows > 0 && q_rows > 0, kTooLarge, ", got hs = ", g.hs, ", hs_v = ", g.hsv);

  rows_switch(kv_rows, [&](auto r) {
    constexpr int kRows = decltype(r)::value;
    launch_tiles(cuda::causal_attention_dkdv_kernel<T, kRows>, g.BH * ((g.S + cuda::kBk - 1) / cuda::kBk),
                 kv_bytes(kRows), p, dop, da, lp, Dp, reinterpret_cast<T*>(dk.mutable_data_ptr()),
                 reinterpret_cast<T*>(dv.mutable_data_ptr()));
  });
  rows_switch(q_rows, [&](auto r) {
    constexpr int kRows = decltype(r)::value;
    launch_tiles(cuda::causal_attention_dq_kernel<T, kRows>, g.BH * query_tiles(g.T, kRows), q_bytes(kRows), p,
                 dop, da, lp, Dp, reinterpret_cast<T*>(dq.mutable_data_ptr()));
  });
}

std::vector<int64_t> out_shape(const at::Tensor& q, int64_t hsv) {
  std::vector<int64_t> s = q.sizes().vec();
  s.back() = hsv;
  return s;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> causal_attention_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                         const at::Tensor& v_in, double scale, double dropout_p,
                                                         bool bottom_right, int64_t seed, int64_t offset) {
  const Geometry g = check_qkv(q_in, k_in, v_in, scale, dropout_p, bottom_right);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const auto opts = q_in.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor out = at::empty(out_shape(q_in, g.hsv), opts);
  at::Tensor lse = at::empty(q_in.sizes().slice(0, q_in.dim() - 1), opts.dtype(acc_type(q_in.scalar_type())));
  if (lse.numel() == 0) {
    return {out, lse};
  }
  const at::Tensor q = unit_stride_rows(q_in), k = unit_stride_rows(k_in), v = unit_stride_rows(v_in);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "causal_attention_cuda", [&] {
    launch_fwd<scalar_t>(q, k, v, out, lse, g, scale, dropout_p, seed, offset);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_attention_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, double scale, double dropout_p, bool bottom_right,
    int64_t seed, int64_t offset) {
  const Geometry g = check_qkv(q_in, k_in, v_in, scale, dropout_p, bottom_right);
  check_same(q_in, "q", grad_out_in, "grad_out");
  check_same(q_in, "q", out_in, "out");
  check_cuda_input(grad_out_in, "grad_out", "(..., T, hs_v)");
  check_cuda_input(out_in, "out", "(..., T, hs_v)");
  const auto oshape = out_shape(q_in, g.hsv);
  TORCH_CHECK(grad_out_in.sizes() == at::IntArrayRef(oshape), "attnext: grad_out must have shape ",
              at::IntArrayRef(oshape), ", got ", grad_out_in.sizes());
  TORCH_CHECK(out_in.sizes() == at::IntArrayRef(oshape), "attnext: out must have shape ", at::IntArrayRef(oshape),
              ", got ", out_in.sizes());
  const at::ScalarType at_acc = acc_type(q_in.scalar_type());
  TORCH_CHECK(lse_in.device() == q_in.device() && lse_in.scalar_type() == at_acc, "attnext: lse must be a ", at_acc,
              " tensor on ", q_in.device(), ", got ", lse_in.scalar_type(), " on ", lse_in.device());
  TORCH_CHECK(lse_in.sizes() == q_in.sizes().slice(0, q_in.dim() - 1), "attnext: lse must have shape ",
              q_in.sizes().slice(0, q_in.dim() - 1), ", got ", lse_in.sizes());
  const c10::cuda::CUDAGuard guard(q_in.device());
  const auto opts = q_in.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor dq = at::empty(q_in.sizes(), opts);
  at::Tensor dk = at::empty(k_in.sizes(), opts);
  at::Tensor dv = at::empty(v_in.sizes(), opts);
  if (g.BH * g.T == 0 || g.BH * g.S == 0) {
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  const at::Tensor q = unit_stride_rows(q_in), k = unit_stride_rows(k_in), v = unit_stride_rows(v_in);
  const at::Tensor dout = unit_stride_rows(grad_out_in);
  const at::Tensor lse = lse_in.contiguous();
  // D = rowsum(dO * O) in the accumulation type, (BH * T) contiguous
  const at::Tensor D = (grad_out_in.to(at_acc) * out_in.to(at_acc)).sum(-1).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "causal_attention_backward_cuda", [&] {
    launch_bwd<scalar_t>(dout, q, k, v, lse, D, dq, dk, dv, g, scale, dropout_p, seed, offset);
  });
  return {dq, dk, dv};
}

TORCH_LIBRARY_IMPL(attnext, CUDA, m) {
  m.impl("causal_attention", &causal_attention_cuda);
  m.impl("_causal_attention_backward", &causal_attention_backward_cuda);
}

}  // namespace attnext
