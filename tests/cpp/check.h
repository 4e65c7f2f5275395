// A minimal assertion helper for attnext's C++ tests (ctest runs each binary;
// a non-zero exit is a failure).
#pragma once

#include <ATen/ATen.h>

#include "check_basic.h"

#include <cstdio>
#include <string>

namespace attnext_test {

inline void check_close(const at::Tensor& a, const at::Tensor& b, double atol, double rtol, const std::string& what) {
  const bool ok = a.sizes() == b.sizes() && at::allclose(a.to(at::kDouble), b.to(at::kDouble), rtol, atol, true);
  if (!ok && a.sizes() == b.sizes()) {
    const double err = (a.to(at::kDouble) - b.to(at::kDouble)).abs().nan_to_num(1e300).max().item<double>();
    std::fprintf(stderr, "  %s: max abs error %g\n", what.c_str(), err);
  }
  check(ok, what);
}

// Runs a callable and checks that it throws a c10::Error whose message contains `needle`.
template <typename F>
void check_throws(F&& f, const std::string& needle, const std::string& what) {
  try {
    f();
  } catch (const c10::Error& e) {
    const std::string msg = e.what();
    check(msg.find(needle) != std::string::npos, what + " (message: " + msg.substr(0, 200) + ")");
    return;
  }
  check(false, what + " (no exception)");
}

}  // namespace attnext_test
