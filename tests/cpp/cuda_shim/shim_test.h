// Helpers of the tests that run CUDA kernel headers on the shim (test_cuda_*.cpp):
// failure counting (check_basic.h), the element types' conversions to and from double, and output
// buffers with guard zones.
#pragma once

#include <cstdio>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "../check_basic.h"
#include "cuda_bf16.h"

namespace shim_test {

using attnext_test::check;
using attnext_test::failures;
using attnext_test::finish;

// Element types: storage <-> double, and the name
inline double val(float x) { return x; }
inline double val(double x) { return x; }
inline double val(__nv_bfloat16 x) { return __bfloat162float(x); }
template <class T>
T make(double x) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    return __float2bfloat16_rn(float(x));
  } else {
    return static_cast<T>(x);
  }
}
template <class T>
const char* ename() {
  return std::is_same<T, double>::value ? "float64" : std::is_same<T, float>::value ? "float32" : "bfloat16";
}

// n elements of T with guard zones (0x5A bytes) before and after.
template <class T>
struct Out {
  static constexpr size_t kGuard = 40;
  std::vector<T> mem;
  size_t n;
  explicit Out(size_t n_) : mem(n_ + 2 * kGuard), n(n_) { std::memset(mem.data(), 0x5A, mem.size() * sizeof(T)); }
  T* data() { return mem.data() + kGuard; }
  const T& operator[](size_t i) const { return mem[kGuard + i]; }
  bool guards_intact() const {
    const auto* b = reinterpret_cast<const unsigned char*>(mem.data());
    for (size_t i = 0; i < kGuard * sizeof(T); ++i) {
      if (b[i] != 0x5A || b[(kGuard + n) * sizeof(T) + i] != 0x5A) return false;
    }
    return true;
  }
  bool same_bits(const Out& o) const { return std::memcmp(mem.data(), o.mem.data(), mem.size() * sizeof(T)) == 0; }
};

}  // namespace shim_test
