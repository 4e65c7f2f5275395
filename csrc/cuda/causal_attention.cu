// Fused causal attention on CUDA: host side (checks, path and tile choice, launches).
// Every window_size (left, right) of the op, forward and backward, in both families:
// the kernels mask by the row's window [first(t), visible(t)) and skip key tiles
// outside every row's window (Geometry's wl, wr go into their params).
// Two kernel families:
//  * tensor cores (causal_attention_mma.cuh / .h) on sm_80+: float16 and bfloat16
//    (mma.sync m16n8k16), and float32 as TF32 (m16n8k8, operands rounded to TF32) when
//    torch allows TF32 for CUDA matmuls (torch.backends.cuda.matmul.allow_tf32, or
//    fp32_precision / set_float32_matmul_precision saying so); fp32 accumulation,
//    head sizes up to 256 (rounded up to a compiled class),
//    rows 16-byte aligned;
//  * CUDA cores (causal_attention_kernels.cuh): everything else, exact in float32 and
//    float64, and the fallback of the first.
// The choice (mma_forward / mma_backward) is made per call, forward and backward
// independently: both families read and write the same lse (float32 for half types,
// natural log, -inf for a row that sees no key) and the same dropout mask, so a
// forward on one and a backward on the other agree. ATTNEXT_CUDA_MMA=0 turns the
// tensor-core path off, =require makes a call that cannot take it an error (tests).
// Launches go to the current stream under a device guard; launch errors are checked.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "common.h"
#include "cuda/causal_attention_kernels.cuh"
#include "cuda/causal_attention_mma.cuh"
#include "cuda/cuda_common.h"
#include "cuda/static_switch.h"
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
                   bool bottom_right, int64_t window_left, int64_t window_right) {
  const Geometry g = check_attention_args(q, k, v, scale, dropout_p, bottom_right, window_left, window_right);
  check_cuda_input(q, "q", "(..., T, hs)");
  check_cuda_input(k, "k", "(..., S, hs)");
  check_cuda_input(v, "v", "(..., S, hs_v)");
  return g;
}

at::ScalarType acc_type(at::ScalarType st) { return st == at::kDouble ? at::kDouble : at::kFloat; }

template <typename T>
cuda::AttnParams<T, typename cuda::AccOf<T>::type> make_params(const at::Tensor& q, const at::Tensor& k,
                                                              const at::Tensor& v, const Geometry& g, double scale,
                                                              double dropout_p, const DropoutSeed& ds) {
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
  p.wl = g.wl;
  p.wr = g.wr;
  p.scale = static_cast<A>(scale);
  p.drop = dropout_p > 0.0;
  p.stream_key = p.drop ? dropout_stream_key(ds.seed, ds.offset) : 0u;
  p.rng = p.drop ? ds.device : nullptr;
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
                const Geometry& g, double scale, double dropout_p, const DropoutSeed& ds) {
  using T = typename CudaType<scalar_t>::type;
  using A = typename cuda::AccOf<T>::type;
  const auto p = make_params<T>(q, k, v, g, scale, dropout_p, ds);
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
                const Geometry& g, double scale, double dropout_p, const DropoutSeed& ds) {
  using T = typename CudaType<scalar_t>::type;
  using A = typename cuda::AccOf<T>::type;
  const auto p = make_params<T>(q, k, v, g, scale, dropout_p, ds);
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

// ------------------------------------------------------------- tensor-core path (mma.sync)

static_assert(mma::kThreads == cuda::kAttnThreads, "launch_tiles launches kAttnThreads per block");

// Head-size classes compiled for the tensor-core kernels (hs rounds up to the next one,
// zero-padded in shared memory), forward and backward alike (above 128 the dK/dV kernel
// splits dK and dV's columns over two blocks, Tiles::kKvSplit).
template <typename F>
bool mma_head_switch(int64_t hs, F&& f) {
  return ceil_switch<32, 64, 96, 128, 192, 256>(hs, f);
}
constexpr int64_t kMmaMaxHs = 256;

enum class MmaMode { kOff, kAuto, kRequire };

MmaMode mma_mode() {
  const char* e = std::getenv("ATTNEXT_CUDA_MMA");
  if (e == nullptr) return MmaMode::kAuto;
  if (std::strcmp(e, "0") == 0) return MmaMode::kOff;
  if (std::strcmp(e, "require") == 0) return MmaMode::kRequire;
  return MmaMode::kAuto;
}

// cp.async copies 16 bytes: every row must start on a 16-byte boundary (data pointer,
// and every stride of a dim of size > 1 but the last a multiple of 16 bytes).
bool rows_aligned16(const at::Tensor& t) {
  if (reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 != 0) return false;
  if (t.size(-1) > 1 && t.stride(-1) != 1) return false;
  const int64_t item = static_cast<int64_t>(t.element_size());
  for (int64_t d = 0; d < t.dim() - 1; ++d) {
    if (t.size(d) > 1 && (t.stride(d) * item) % 16 != 0) return false;
  }
  return true;
}

// Calls f(mma::F16{}), f(mma::Bf16{}) or f(mma::Tf32{}) for the tensor-core element type
// of st (float16, bfloat16, float32).
template <typename F>
void mma_elem_switch(at::ScalarType st, F&& f) {
  if (st == at::kBFloat16) {
    f(mma::Bf16{});
  } else if (st == at::kHalf) {
    f(mma::F16{});
  } else {
    TORCH_INTERNAL_ASSERT(st == at::kFloat, "mma_elem_switch: ", st);
    f(mma::Tf32{});
  }
}

mma::Rows mma_rows(const at::Tensor& t) {
  const cuda::RowAddr a = row_addr(t);
  mma::Rows r{};
  static_assert(mma::kMaxBatchDims == cuda::kMaxBatchDims, "same batch-dim limit");
  r.nbatch = a.nbatch;
  for (int d = 0; d < a.nbatch; ++d) {
    r.sizes[d] = a.sizes[d];
    r.strides[d] = a.strides[d];
  }
  r.stride_t = a.stride_t;
  return r;
}

mma::Params mma_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Geometry& g,
                       double scale, double dropout_p, const DropoutSeed& ds) {
  mma::Params p{};
  p.q = q.const_data_ptr();
  p.k = k.const_data_ptr();
  p.v = v.const_data_ptr();
  p.qa = mma_rows(q);
  p.ka = mma_rows(k);
  p.va = mma_rows(v);
  p.BH = g.BH;
  p.T = g.T;
  p.S = g.S;
  p.shift = g.shift;
  p.wl = g.wl;
  p.wr = g.wr;
  p.hs = static_cast<int>(g.hs);
  p.scale = static_cast<float>(scale);
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  p.drop = dropout_p > 0.0;
  p.stream_key = p.drop ? dropout_stream_key(ds.seed, ds.offset) : 0u;
  p.rng = p.drop ? ds.device : nullptr;
  p.threshold = p.drop ? dropout_threshold(dropout_p) : 0u;
  p.inv_keep = static_cast<float>(p.drop ? 1.0 / (1.0 - dropout_p) : 1.0);
  return p;
}

// Why the tensor-core kernels cannot take this call; empty when they can (up to the
// per-kernel checks of mma_kernel_unfit).
std::string mma_unsupported(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor* dout,
                            const Geometry& g) {
  const at::ScalarType st = q.scalar_type();
  if (st == at::kFloat) {
    if (!tf32_allowed()) return "float32 without TF32 (torch.backends.cuda.matmul.fp32_precision is not 'tf32'): exact kernel";
  } else if (st != at::kHalf && st != at::kBFloat16) {
    return "the dtype is not float16, bfloat16 or float32";
  }
  if (g.hs != g.hsv) return "hs != hs_v";
  if (g.hs == 0) return "head size 0";
  if (g.hs > kMmaMaxHs) return "head size " + std::to_string(g.hs) + " > " + std::to_string(kMmaMaxHs);
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  if (prop->major < 8) return "compute capability " + std::to_string(prop->major) + "." + std::to_string(prop->minor) + " < 8.0";
  if (!rows_aligned16(q)) return "q rows are not 16-byte aligned";
  if (!rows_aligned16(k)) return "k rows are not 16-byte aligned";
  if (!rows_aligned16(v)) return "v rows are not 16-byte aligned";
  if (dout != nullptr && !rows_aligned16(*dout)) return "grad_out rows are not 16-byte aligned";
  return "";
}

int smem_optin() {
  int dev = 0, optin = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  return optin;
}

// Why this instantiation cannot run on the current GPU: a build without sm_80+ code
// for it (its body would be the trap), or more shared memory than the opt-in limit.
template <typename Kernel>
std::string mma_kernel_unfit(Kernel kernel, int64_t smem) {
  cudaFuncAttributes attr{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  if (attr.ptxVersion < 80) {
    return "this build has no sm_80+ code for this GPU (TORCH_CUDA_ARCH_LIST; the kernel's PTX version is " +
           std::to_string(attr.ptxVersion) + ")";
  }
  if (smem > smem_optin()) return "needs " + std::to_string(smem) + " bytes of shared memory per block";
  return "";
}

void mma_fail_if_required(MmaMode mode, bool done, const std::string& why, const char* direction) {
  TORCH_CHECK(done || mode != MmaMode::kRequire, "attnext: ATTNEXT_CUDA_MMA=require, but the tensor-core ",
              direction, " of causal_attention cannot take this call: ", why);
}

int64_t mma_query_tiles(int64_t T) { return (T + mma::kBm - 1) / mma::kBm; }

// The forward on tensor cores if it can take the call; false (nothing written) if not.
bool mma_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out, at::Tensor& lse,
                 const Geometry& g, double scale, double dropout_p, const DropoutSeed& ds) {
  const MmaMode mode = mma_mode();
  if (mode == MmaMode::kOff) return false;
  std::string why = mma_unsupported(q, k, v, nullptr, g);
  bool done = false;
  if (why.empty()) {
    mma::Params p = mma_params(q, k, v, g, scale, dropout_p, ds);
    p.out = out.mutable_data_ptr();
    p.lse_out = lse.mutable_data_ptr<float>();
    mma_head_switch(g.hs, [&](auto hd) {
      constexpr int kHd = decltype(hd)::value;
      mma_elem_switch(q.scalar_type(), [&](auto elem) {
        using E = decltype(elem);
        const auto kernel = mma::causal_attention_fwd_mma_kernel<E, kHd>;
        const int64_t smem = mma::Tiles<kHd, E>::fwd_smem();
        why = mma_kernel_unfit(kernel, smem);
        if (!why.empty()) return;
        launch_tiles(kernel, g.BH * mma_query_tiles(g.T), smem, p);
        done = true;
      });
    });
  }
  mma_fail_if_required(mode, done, why, "forward");
  return done;
}

// The backward on tensor cores if it can take the call; false (nothing written) if not.
// Each kernel prefetches the next tile into a second buffer when two fit in shared memory.
bool mma_backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& lse, const at::Tensor& D, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
                  const Geometry& g, double scale, double dropout_p, const DropoutSeed& ds) {
  const MmaMode mode = mma_mode();
  if (mode == MmaMode::kOff) return false;
  std::string why = mma_unsupported(q, k, v, &dout, g);
  bool done = false;
  if (why.empty()) {
    mma::Params p = mma_params(q, k, v, g, scale, dropout_p, ds);
    p.dout = dout.const_data_ptr();
    p.da = mma_rows(dout);
    p.lse = lse.const_data_ptr<float>();
    p.D = D.const_data_ptr<float>();
    p.dq = dq.mutable_data_ptr();
    p.dk = dk.mutable_data_ptr();
    p.dv = dv.mutable_data_ptr();
    mma_head_switch(g.hs, [&](auto hd) {
      constexpr int kHd = decltype(hd)::value;
      mma_elem_switch(q.scalar_type(), [&](auto elem) {
        using E = decltype(elem);
        using L = mma::Tiles<kHd, E>;
        const auto dq_kernel = mma::causal_attention_dq_mma_kernel<E, kHd>;
        const auto kv_kernel = mma::causal_attention_dkdv_mma_kernel<E, kHd>;
        why = mma_kernel_unfit(dq_kernel, L::dq_smem(1));
        if (why.empty()) why = mma_kernel_unfit(kv_kernel, L::dkdv_smem(1));
        if (!why.empty()) return;
        const int optin = smem_optin();
        const int dq_stages = L::dq_smem(2) <= optin ? 2 : 1;
        const int kv_stages = L::dkdv_smem(2) <= optin ? 2 : 1;
        launch_tiles(kv_kernel, g.BH * ((g.S + L::kKvBn - 1) / L::kKvBn) * L::kKvSplit, L::dkdv_smem(kv_stages), p,
                     kv_stages);
        launch_tiles(dq_kernel, g.BH * mma_query_tiles(g.T), L::dq_smem(dq_stages), p, dq_stages);
        done = true;
      });
    });
  }
  mma_fail_if_required(mode, done, why, "backward");
  return done;
}

std::vector<int64_t> out_shape(const at::Tensor& q, int64_t hsv) {
  std::vector<int64_t> s = q.sizes().vec();
  s.back() = hsv;
  return s;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> causal_attention_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                         const at::Tensor& v_in, double scale, double dropout_p,
                                                         bool bottom_right, int64_t seed, int64_t offset,
                                                         const std::optional<at::Tensor>& rng, int64_t window_left,
                                                         int64_t window_right) {
  const Geometry g = check_qkv(q_in, k_in, v_in, scale, dropout_p, bottom_right, window_left, window_right);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const DropoutSeed ds = device_dropout_seed(seed, offset, rng, q_in);
  const auto opts = q_in.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor out = at::empty(out_shape(q_in, g.hsv), opts);
  at::Tensor lse = at::empty(q_in.sizes().slice(0, q_in.dim() - 1), opts.dtype(acc_type(q_in.scalar_type())));
  if (lse.numel() == 0) {
    return {out, lse};
  }
  const at::Tensor q = unit_stride_rows(q_in), k = unit_stride_rows(k_in), v = unit_stride_rows(v_in);
  if (mma_forward(q, k, v, out, lse, g, scale, dropout_p, ds)) {
    return {out, lse};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "causal_attention_cuda", [&] {
    launch_fwd<scalar_t>(q, k, v, out, lse, g, scale, dropout_p, ds);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_attention_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, double scale, double dropout_p, bool bottom_right,
    int64_t seed, int64_t offset, const std::optional<at::Tensor>& rng, int64_t window_left, int64_t window_right) {
  const Geometry g = check_qkv(q_in, k_in, v_in, scale, dropout_p, bottom_right, window_left, window_right);
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
  const DropoutSeed ds = device_dropout_seed(seed, offset, rng, q_in);
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
  if (mma_backward(dout, q, k, v, lse, D, dq, dk, dv, g, scale, dropout_p, ds)) {
    return {dq, dk, dv};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "causal_attention_backward_cuda", [&] {
    launch_bwd<scalar_t>(dout, q, k, v, lse, D, dq, dk, dv, g, scale, dropout_p, ds);
  });
  return {dq, dk, dv};
}

TORCH_LIBRARY_IMPL(attnext, CUDA, m) {
  m.impl("causal_attention", &causal_attention_cuda);
  m.impl("_causal_attention_backward", &causal_attention_backward_cuda);
}

}  // namespace attnext
