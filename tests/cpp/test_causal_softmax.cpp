// The CPU causal softmax kernel against an ATen computation (masked_fill + softmax),
// called both directly and through the dispatcher, for every dtype and alignment.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include "check.h"
#include "ops.h"

using attnext_test::check;
using attnext_test::check_close;
using attnext_test::check_throws;

namespace {

at::Tensor aten_causal_softmax(const at::Tensor& x, double scale, bool bottom_right) {
  const int64_t T = x.size(-2), S = x.size(-1);
  const at::Tensor keep = at::ones({T, S}, at::kBool).tril(bottom_right ? S - T : 0);
  at::Tensor y = at::softmax((x.to(at::kDouble) * scale).masked_fill(keep.logical_not(), -INFINITY), -1);
  // Rows with no visible key are zeros by definition.
  return y.masked_fill(keep.any(-1, true).logical_not(), 0.0);
}

at::Tensor aten_backward(const at::Tensor& dy, const at::Tensor& y, double scale, bool bottom_right) {
  const int64_t T = y.size(-2), S = y.size(-1);
  const at::Tensor keep = at::ones({T, S}, at::kBool).tril(bottom_right ? S - T : 0);
  const at::Tensor dyv = dy.to(at::kDouble).masked_fill(keep.logical_not(), 0.0);
  const at::Tensor yv = y.to(at::kDouble).masked_fill(keep.logical_not(), 0.0);
  return scale * yv * (dyv - (dyv * yv).sum(-1, true));
}

}  // namespace

int main() {
  at::manual_seed(0);
  const std::vector<std::vector<int64_t>> shapes = {{1, 1}, {7, 7}, {3, 33, 33}, {2, 3, 17, 40}, {2, 40, 17}};
  const std::vector<std::pair<at::ScalarType, double>> dtypes = {
      {at::kFloat, 1e-5}, {at::kDouble, 1e-12}, {at::kBFloat16, 2e-2}, {at::kHalf, 3e-3}};
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("attnext::causal_softmax", "")
                .typed<at::Tensor(const at::Tensor&, double, bool)>();
  for (const auto& shape : shapes) {
    for (const auto& [dtype, tol] : dtypes) {
      for (const bool br : {false, true}) {
        const std::string name = "shape " + c10::str(at::IntArrayRef(shape)) + " " + c10::toString(dtype) +
                                 (br ? " bottom_right" : " top_left");
        const at::Tensor x = (at::randn(shape, at::kDouble) * 3).to(dtype);
        const at::Tensor ref = aten_causal_softmax(x, 0.6, br);
        const at::Tensor y = attnext::causal_softmax_cpu(x, 0.6, br);
        check(y.scalar_type() == dtype && y.is_contiguous(), name + ": dtype/layout");
        check_close(y, ref, tol, tol, name + ": forward");
        check_close(op.call(x, 0.6, br), ref, tol, tol, name + ": forward via dispatcher");
        const at::Tensor dy = at::randn(shape, at::kDouble).to(dtype);
        const at::Tensor dx = attnext::causal_softmax_backward_cpu(dy, y, 0.6, br);
        check_close(dx, aten_backward(dy, y, 0.6, br), 4 * tol, 4 * tol, name + ": backward");
      }
    }
  }
  // A transposed (non-contiguous) input is read through its strides.
  const at::Tensor base = at::randn({2, 9, 3, 9}, at::kFloat);
  const at::Tensor xt = base.transpose(1, 2);
  check_close(attnext::causal_softmax_cpu(xt, 1.0, false), aten_causal_softmax(xt, 1.0, false), 1e-5, 1e-5,
              "transposed view");
  check_throws([] { attnext::causal_softmax_cpu(at::ones({3}, at::kFloat), 1.0, false); }, "at least 2 dims",
               "1-D input is rejected");
  check_throws([] { attnext::causal_softmax_cpu(at::ones({3, 3}, at::kInt), 1.0, false); },
               "must be a floating-point tensor", "integer input is rejected");
  check_throws([] { attnext::causal_softmax_cpu(at::ones({3, 3}, at::kFloat), NAN, false); },
               "scale must be a finite number", "NaN scale is rejected");
  return attnext_test::finish("test_causal_softmax");
}
