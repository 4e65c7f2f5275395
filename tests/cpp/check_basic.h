// Failure counting for attnext's C++ tests, without torch includes (the CUDA-shim
// tests use it too); check.h adds the ATen helpers.
#pragma once

#include <cstdio>
#include <string>

namespace attnext_test {

inline int& failures() {
  static int n = 0;
  return n;
}

inline void check(bool ok, const std::string& what) {
  if (!ok) {
    ++failures();
    std::fprintf(stderr, "FAILED: %s\n", what.c_str());
  }
}

inline int finish(const char* name) {
  if (failures() == 0) {
    std::printf("%s: all checks passed\n", name);
    return 0;
  }
  std::printf("%s: %d checks failed\n", name, failures());
  return 1;
}

}  // namespace attnext_test
