// Host stand-in for <cuda_fp16.h> (see cuda_runtime.h here): __half as raw bits with the
// conversions the kernels use, through the compiler's half type (../host_half.h).
#pragma once

#include <cstdint>
#include <cstring>

#include "../host_half.h"

struct __half {
  uint16_t bits;
};
inline float __half2float(__half h) {
  host_half f;
  std::memcpy(&f, &h.bits, 2);
  return static_cast<float>(f);
}
inline __half __float2half_rn(float x) {
  const host_half f = static_cast<host_half>(x);
  __half h;
  std::memcpy(&h.bits, &f, 2);
  return h;
}
