// Compile-time specialisation from a run-time value, in one place: the kernels'
// per-lane register counts, head-size classes and element types go through these
// helpers instead of repeated `case` blocks.
#pragma once

#include <cstdint>
#include <type_traits>
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

// Calls f(std::integral_constant<int, D>{}) for the first D of kDims (ascending) with
// n <= D, e.g. a head size rounded up to a compiled tile width; returns false (and calls
// nothing) if n is above them all.
template <int... kDims, typename F>
bool ceil_switch(int64_t n, F&& f) {
  bool done = false;
  ((!done && n <= kDims ? (f(std::integral_constant<int, kDims>{}), done = true) : false), ...);
  return done;
}

// Calls f(std::true_type{}) or f(std::false_type{}).
template <typename F>
void bool_switch(bool b, F&& f) {
  if (b) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

}  // namespace attnext
