// causal_attention_qkvpacked on CUDA: the CUDA causal_attention kernels over the
// (..., nh, T, hs) views of q, k and v inside qkv (..., T, 3, nh, hs), read in
// place through their strides. Unlike the CPU kernels (which write the packed
// layouts directly), the CUDA kernels write contiguous outputs, so out is
// transposed into (..., T, nh, hs) and the three gradients stacked into
// (..., T, 3, nh, hs): one copy of each, on the current stream.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "common.h"

namespace attnext {
namespace {

std::tuple<at::Tensor, at::Tensor> attention_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                double scale, double dropout_p, bool bottom_right, int64_t seed,
                                                int64_t offset, const std::optional<at::Tensor>& rng,
                                                int64_t window_left, int64_t window_right) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("attnext::causal_attention", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&, double, double, bool,
                                 c10::SymInt, c10::SymInt, const std::optional<at::Tensor>&, int64_t, int64_t)>();
  return op.call(q, k, v, scale, dropout_p, bottom_right, seed, offset, rng, window_left, window_right);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_op(const at::Tensor& grad_out, const at::Tensor& q,
                                                                     const at::Tensor& k, const at::Tensor& v,
                                                                     const at::Tensor& out, const at::Tensor& lse,
                                                                     double scale, double dropout_p,
                                                                     bool bottom_right, int64_t seed, int64_t offset,
                                                                     const std::optional<at::Tensor>& rng,
                                                                     int64_t window_left, int64_t window_right) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("attnext::_causal_attention_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const at::Tensor&, double, double, bool, c10::SymInt, c10::SymInt, const std::optional<at::Tensor>&,
              int64_t, int64_t)>();
  return op.call(grad_out, q, k, v, out, lse, scale, dropout_p, bottom_right, seed, offset, rng, window_left,
                 window_right);
}

std::tuple<at::Tensor, at::Tensor> causal_attention_qkvpacked_cuda(const at::Tensor& qkv, double scale,
                                                                   double dropout_p, bool bottom_right, int64_t seed,
                                                                   int64_t offset, const std::optional<at::Tensor>& rng,
                                                                   int64_t window_left, int64_t window_right) {
  check_qkvpacked(qkv, "qkv");
  const auto [q, k, v] = unpack_qkv(qkv);  // 3 x (..., nh, T, hs) views
  auto [out_rows, lse] =
      attention_op(q, k, v, scale, dropout_p, bottom_right, seed, offset, rng, window_left, window_right);
  return {out_rows.transpose(-3, -2).contiguous(), lse};  // (..., T, nh, hs), (..., nh, T)
}

at::Tensor causal_attention_qkvpacked_backward_cuda(const at::Tensor& grad_out, const at::Tensor& qkv,
                                                    const at::Tensor& out, const at::Tensor& lse, double scale,
                                                    double dropout_p, bool bottom_right, int64_t seed, int64_t offset,
                                                    const std::optional<at::Tensor>& rng, int64_t window_left,
                                                    int64_t window_right) {
  check_qkvpacked(qkv, "qkv");
  check_min_dim(grad_out, 3, "grad_out", "(..., T, nh, hs)");
  check_min_dim(out, 3, "out", "(..., T, nh, hs)");
  const auto [q, k, v] = unpack_qkv(qkv);
  auto [dq, dk, dv] = attention_backward_op(grad_out.transpose(-3, -2), q, k, v, out.transpose(-3, -2), lse, scale,
                                            dropout_p, bottom_right, seed, offset, rng, window_left, window_right);
  return at::stack({dq.transpose(-3, -2), dk.transpose(-3, -2), dv.transpose(-3, -2)}, -3);  // (..., T, 3, nh, hs)
}

}  // namespace

TORCH_LIBRARY_IMPL(attnext, CUDA, m) {
  m.impl("causal_attention_qkvpacked", &causal_attention_qkvpacked_cuda);
  m.impl("_causal_attention_qkvpacked_backward", &causal_attention_qkvpacked_backward_cuda);
}

}  // namespace attnext
