// Host entry points of attnext's kernels, for C++ users and the C++ tests.
// Python reaches them through torch.ops.attnext.* (registered in csrc/attnext.cpp).
#pragma once

#include <ATen/ATen.h>

// The extension is built with -fvisibility=hidden; these stay visible for C++ users.
#define ATTNEXT_API __attribute__((visibility("default")))

namespace attnext {

// x: (..., T, S) -> (..., T, S), contiguous.
ATTNEXT_API at::Tensor causal_softmax_cpu(const at::Tensor& x, double scale, bool bottom_right);
// grad_y, y: (..., T, S) -> grad_x (..., T, S), contiguous.
ATTNEXT_API at::Tensor causal_softmax_backward_cpu(const at::Tensor& grad_y, const at::Tensor& y, double scale,
                                       bool bottom_right);

}  // namespace attnext
