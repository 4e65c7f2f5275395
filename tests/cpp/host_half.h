// The compiler's IEEE half type for host-side tests: _Float16, or __fp16 (the same
// format and rounding) on AArch64 with GCC < 13, which has no _Float16 in C++.
#pragma once

#if defined(__aarch64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13
using host_half = __fp16;
#else
using host_half = _Float16;
#endif
