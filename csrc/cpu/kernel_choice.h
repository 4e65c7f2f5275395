// Kernel choice by measurement, in one place: where attnext has its own CPU kernel
// beside a library's (its float32 GEMM vs the BLAS; its attention tiles vs ATen's
// flash attention), the two are timed on the running CPU at first use of a workload
// class and the faster one runs for the rest of the process. No vendor is assumed:
// the same wheel picks differently on an AMD EPYC (where MKL takes a generic path)
// and on an Intel Xeon with AMX (where ATen's bfloat16 attention uses it).
// torch.ops.attnext._kernel_choices() lists every verdict so far, for attnext.explain.
#pragma once

#include <functional>
#include <string>
#include <vector>

namespace attnext {

struct KernelChoice {
  bool own = false;  // attnext's kernel (true) or the library's
  std::string why;   // "<own> 1.2 ms vs <lib> 0.9 ms (measured on this CPU)" or the override
};

// The verdict for workload class `what`, measured once (thread-safe; later calls
// return the cached verdict): `own` and `lib` each run once to warm up, then in
// alternating rounds (a noisy neighbour slows both alike), best round of each.
// `forced`: 0 force the library, 1 force attnext's, -1 measure.
const KernelChoice& choose_kernel(const std::string& what, const std::string& own_name, const std::string& lib_name,
                                  const std::function<void()>& own, const std::function<void()>& lib, int forced);

// The verdict for `what` if one was made, else nullptr (no measuring).
const KernelChoice* find_kernel(const std::string& what);

// A verdict decided without measuring (nothing to choose, or an override).
const KernelChoice& fixed_kernel(const std::string& what, bool own, const std::string& why);

// "what: why" for every verdict so far, in the order they were made.
std::vector<std::string> kernel_choices();

// The value of an override variable: 0 (library), 1 (attnext's), -1 (measure: unset,
// empty or "auto"); read on every call, cache it at the caller.
int kernel_override(const char* env);

}  // namespace attnext
