// Host entry points of attnext's kernels, for C++ users and the C++ tests.
// Python reaches them through torch.ops.attnext.* (registered in csrc/attnext.cpp).
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>

// The extension is built with -fvisibility=hidden; these stay visible for C++ users.
#define ATTNEXT_API __attribute__((visibility("default")))

namespace attnext {

// x: (..., T, S) -> (..., T, S), contiguous.
ATTNEXT_API at::Tensor causal_softmax_cpu(const at::Tensor& x, double scale, bool bottom_right);
// grad_y, y: (..., T, S) -> grad_x (..., T, S), contiguous.
ATTNEXT_API at::Tensor causal_softmax_backward_cpu(const at::Tensor& grad_y, const at::Tensor& y, double scale,
                                       bool bottom_right);

// torch.matmul semantics; a: (..., m, k) or (k), b: (..., k, n) or (k), batch
// dims broadcast -> (broadcast batch..., m, n) minus the 1-D dims, contiguous.
ATTNEXT_API at::Tensor matmul_cpu(const at::Tensor& a, const at::Tensor& b);
// grad: matmul(a, b)'s shape -> (grad_a like a, grad_b like b), contiguous; an
// entry not asked for by output_mask is an empty (0,) tensor.
ATTNEXT_API std::tuple<at::Tensor, at::Tensor> matmul_backward_cpu(const at::Tensor& grad, const at::Tensor& a,
                                                                   const at::Tensor& b,
                                                                   std::array<bool, 2> output_mask);

// x: (..., T, C) -> (..., T, C), y[t] = mean(x[0..t]), contiguous.
ATTNEXT_API at::Tensor causal_mean_cpu(const at::Tensor& x);
// grad_y: (..., T, C) -> grad_x (..., T, C), contiguous.
ATTNEXT_API at::Tensor causal_mean_backward_cpu(const at::Tensor& grad_y);
// q: (..., T, hs), k: (..., S, hs), v: (..., S, hs_v) -> (out (..., T, hs_v), lse (..., T)).
// window_left/right: the keys each query sees around its diagonal (-1: unbounded; (-1, 0) causal).
ATTNEXT_API std::tuple<at::Tensor, at::Tensor> causal_attention_cpu(const at::Tensor& q, const at::Tensor& k,
                                                                    const at::Tensor& v, double scale,
                                                                    double dropout_p, bool bottom_right, int64_t seed,
                                                                    int64_t offset,
                                                                    const std::optional<at::Tensor>& rng = std::nullopt,
                                                                    int64_t window_left = -1, int64_t window_right = 0);
// -> (grad_q, grad_k, grad_v), shaped like q, k, v, contiguous.
ATTNEXT_API std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, double scale, double dropout_p, bool bottom_right, int64_t seed, int64_t offset,
    const std::optional<at::Tensor>& rng = std::nullopt, int64_t window_left = -1, int64_t window_right = 0);
// qkv: (..., T, 3, nh, hs) -> (out (..., T, nh, hs) contiguous, lse (..., nh, T)).
ATTNEXT_API std::tuple<at::Tensor, at::Tensor> causal_attention_qkvpacked_cpu(const at::Tensor& qkv, double scale,
                                                                              double dropout_p, bool bottom_right,
                                                                              int64_t seed, int64_t offset,
                                                                              const std::optional<at::Tensor>& rng =
                                                                                  std::nullopt,
                                                                              int64_t window_left = -1,
                                                                              int64_t window_right = 0);
// -> grad_qkv (..., T, 3, nh, hs), contiguous.
ATTNEXT_API at::Tensor causal_attention_qkvpacked_backward_cpu(const at::Tensor& grad_out, const at::Tensor& qkv,
                                                               const at::Tensor& out, const at::Tensor& lse,
                                                               double scale, double dropout_p, bool bottom_right,
                                                               int64_t seed, int64_t offset,
                                                               const std::optional<at::Tensor>& rng = std::nullopt,
                                                               int64_t window_left = -1, int64_t window_right = 0);
// y = x * keep / (1 - p) with the counter-based keep mask of (seed, offset); contiguous.
// rng (every op with dropout): an int64 tensor [seed, offset] replacing the two ints.
ATTNEXT_API at::Tensor dropout_cpu(const at::Tensor& x, double p, int64_t seed, int64_t offset,
                                   const std::optional<at::Tensor>& rng = std::nullopt);

}  // namespace attnext
