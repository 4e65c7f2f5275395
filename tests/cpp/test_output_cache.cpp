// The CPU output cache (csrc/cpu/output_cache.cpp) through the allocator of a cached
// output's storage: a handed-out buffer is a plain DataPtr (context == data), so
// torch's copy-on-write can wrap it: _lazy_clone shares it, a write copies.
#include <ATen/ATen.h>
#include <c10/core/CPUAllocator.h>

#include <string>

#include "check.h"
#include "ops.h"

using attnext_test::check;

int main() {
  at::manual_seed(0);
  const at::Tensor x = at::randn({40, 256, 256});
  at::Tensor y = attnext::causal_softmax_cpu(x, 1.0, false);
  const at::Tensor expected = y.clone();
  c10::Allocator* cache = y.storage().allocator();
  check(cache != nullptr && cache != c10::GetCPUAllocator(), "a 10 MiB output comes from the cache");
  const c10::DataPtr& dp = y.storage().data_ptr();
  check(dp.get_context() == dp.get(), "the DataPtr's context is its data pointer");
  check(cache->is_simple_data_ptr(dp), "torch sees a simple DataPtr");

  try {
    at::Tensor z = y._lazy_clone();
    check(z.const_data_ptr() == y.const_data_ptr(), "_lazy_clone shares the buffer");
    z.mul_(2);
    check(z.const_data_ptr() != y.const_data_ptr(), "a write copies");
    check(at::equal(z, expected * 2) && at::equal(y, expected), "copy-on-write values");
  } catch (const c10::Error& e) {
    check(false, std::string("_lazy_clone: ") + e.what_without_backtrace());
  }

  return attnext_test::finish("test_output_cache");
}
