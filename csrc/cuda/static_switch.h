// Compile-time specialisation from a run-time value, in one place: the kernels'
// per-lane register counts (and later head sizes) go through these helpers
// instead of repeated `case` blocks.
#pragma once

#include <utility>

namespace attnext {

// Calls f(std::integral_constant<int, P>{}) for the smallest P in {1, 2, 4, ..., kMax}
// with P >= n; returns false (and calls nothing) if n > kMax.
template <int kMax, typename F>
bool pow2_switch(int n, F&& f) {
  if (n <= 1) {
    f(std::integral_constant<int, 1>{});
    return true;
  }
  if constexpr (kMax > 1) {
    if (n <= 2) {
      f(std::integral_constant<int, 2>{});
      return true;
    }
  }
  if constexpr (kMax > 2) {
    if (n <= 4) {
      f(std::integral_constant<int, 4>{});
      return true;
    }
  }
  if constexpr (kMax > 4) {
    if (n <= 8) {
      f(std::integral_constant<int, 8>{});
      return true;
    }
  }
  if constexpr (kMax > 8) {
    if (n <= 16) {
      f(std::integral_constant<int, 16>{});
      return true;
    }
  }
  if constexpr (kMax > 16) {
    if (n <= 32) {
      f(std::integral_constant<int, 32>{});
      return true;
    }
  }
  return false;
}

}  // namespace attnext
