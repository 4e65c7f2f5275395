// Large CPU outputs: a small cache of freed buffers, reused by later calls.
//
// A fresh multi-megabyte allocation on Linux is a new mapping: every page of it
// faults on first touch and is zeroed by the kernel, which for a 100 MB softmax
// output costs more than the softmax (measured: 8.0 ms fresh vs 4.4 ms reused,
// 384x256x256 float32 on the dev VM). A training loop asks for the same sizes
// every step, so attnext keeps the buffers of its large outputs (>= 8 MiB) when
// they are freed, up to a byte limit, and hands them out again, as PyTorch's CUDA
// caching allocator does on the GPU. New buffers are 2 MiB aligned and advised
// as transparent-huge-page eligible, so even the first touch faults 2 MiB at a
// time.
//
// Only the free buffers count against the limit (ATTNEXT_CPU_CACHE_MB, default
// 1024; 0 turns the cache off, the huge-page advice stays); live outputs are the caller's. A buffer is
// reused only for a request of the same size rounded up to 2 MiB; when a freed
// buffer would exceed the limit, the least recently cached ones are released.
// torch.ops.attnext._cpu_cache_info / _cpu_cache_empty report and release it
// (attnext.cpu_cache_info(), attnext.empty_cpu_cache()).
#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <list>
#include <mutex>
#include <tuple>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "common.h"

namespace attnext {
namespace {

constexpr size_t kHuge = size_t(2) << 20;
constexpr size_t kMinBytes = size_t(8) << 20;

bool env_flag(const char* name, bool dflt) {
  const char* env = std::getenv(name);
  if (env == nullptr || *env == '\0') {
    return dflt;
  }
  return std::strcmp(env, "0") != 0;
}

int64_t env_limit_bytes() {
  const char* env = std::getenv("ATTNEXT_CPU_CACHE_MB");
  if (env != nullptr && *env != '\0') {
    char* end = nullptr;
    const long long mb = std::strtoll(env, &end, 10);
    if (end != nullptr && *end == '\0' && mb >= 0) {
      return static_cast<int64_t>(mb) << 20;
    }
    TORCH_WARN_ONCE("attnext: ignoring ATTNEXT_CPU_CACHE_MB=", env, " (expected a whole number of MiB >= 0)");
  }
  return int64_t(1024) << 20;
}

struct Block {
  void* ptr;
  size_t size;
};

class OutputCache final : public c10::Allocator {
 public:
  OutputCache() : limit_(env_limit_bytes()) {}

  c10::DataPtr allocate(size_t n) override {
    const size_t size = round_up(std::max<size_t>(n, 1));
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto it = free_.begin(); it != free_.end(); ++it) {
        if (it->size == size) {
          Block* b = new Block(*it);
          cached_ -= size;
          free_.erase(it);
          ++hits_;
          return {b->ptr, b, &OutputCache::release, c10::Device(c10::kCPU)};
        }
      }
      ++misses_;
    }
    void* p = nullptr;
    if (posix_memalign(&p, kHuge, size) != 0 || p == nullptr) {
      // Free what is cached and try once more before giving up.
      empty();
      TORCH_CHECK(posix_memalign(&p, kHuge, size) == 0 && p != nullptr, "attnext: out of CPU memory allocating ",
                  size, " bytes for an output");
    }
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (env_flag("ATTNEXT_HUGEPAGES", true)) {
      (void)madvise(p, size, MADV_HUGEPAGE);  // advice only: failure is harmless
    }
#endif
    return {p, new Block{p, size}, &OutputCache::release, c10::Device(c10::kCPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    std::memcpy(dest, src, count);
  }

  // Frees every cached buffer.
  void empty() {
    std::list<Block> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      drop.swap(free_);
      cached_ = 0;
    }
    for (const Block& b : drop) {
      std::free(b.ptr);
    }
  }

  std::tuple<int64_t, int64_t, int64_t, int64_t> info() {
    std::lock_guard<std::mutex> lock(mu_);
    return {static_cast<int64_t>(cached_), limit_, hits_, misses_};
  }

 private:
  static size_t round_up(size_t n) { return (n + kHuge - 1) / kHuge * kHuge; }

  static void release(void* ctx);

  void put(Block b) {
    std::list<Block> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (static_cast<int64_t>(b.size) > limit_) {
        drop.push_back(b);
      } else {
        while (static_cast<int64_t>(cached_ + b.size) > limit_) {
          cached_ -= free_.front().size;
          drop.splice(drop.end(), free_, free_.begin());
        }
        free_.push_back(b);
        cached_ += b.size;
      }
    }
    for (const Block& d : drop) {
      std::free(d.ptr);
    }
  }

  std::mutex mu_;
  std::list<Block> free_;  // oldest first
  size_t cached_ = 0;
  const int64_t limit_;
  int64_t hits_ = 0;
  int64_t misses_ = 0;
};

// Never destroyed: outputs may be freed during interpreter shutdown, after
// static destructors have run.
OutputCache& cache() {
  static OutputCache* c = new OutputCache();
  return *c;
}

void OutputCache::release(void* ctx) {
  Block* b = static_cast<Block*>(ctx);
  const Block copy = *b;
  delete b;
  cache().put(copy);
}

std::tuple<int64_t, int64_t, int64_t, int64_t> cpu_cache_info() { return cache().info(); }

void cpu_cache_empty() { cache().empty(); }

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const auto dtype = c10::typeMetaToScalarType(options.dtype());
  if (options.device().is_cpu()) {
    int64_t numel = 1;
    for (const int64_t s : sizes) {
      numel *= s;
    }
    if (static_cast<size_t>(numel) * c10::elementSize(dtype) >= kMinBytes) {
      return at::Tensor(at::detail::empty_generic(sizes, &cache(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                                  dtype, at::MemoryFormat::Contiguous));
    }
  }
  return at::empty(sizes, options.memory_format(at::MemoryFormat::Contiguous));
}

}  // namespace attnext

TORCH_LIBRARY_FRAGMENT(attnext, m) {
  // (cached bytes, limit bytes, hits, misses) of the CPU output cache.
  m.def("_cpu_cache_info() -> (int, int, int, int)", &attnext::cpu_cache_info);
  // Frees the buffers the CPU output cache holds.
  m.def("_cpu_cache_empty() -> ()", &attnext::cpu_cache_empty);
}
