// Large CPU outputs: a small cache of freed buffers, reused by later calls.
//
// A fresh multi-megabyte allocation on Linux is a new mapping: every page of it
// faults on first touch and is zeroed by the kernel, which for a 100 MB softmax
// output costs more than the softmax (measured: 8.0 ms fresh vs 4.4 ms reused,
// 384x256x256 float32 on the dev VM). A training loop asks for the same sizes
// every step, so attnext keeps the buffers of its large outputs (>= 4 MiB) when
// they are freed, up to a byte limit, and hands them out again, as PyTorch's CUDA
// caching allocator does on the GPU. New buffers are 2 MiB aligned and advised
// as transparent-huge-page eligible, so even the first touch faults 2 MiB at a
// time.
//
// Only the free buffers count against the limit (ATTNEXT_CPU_CACHE_MB, default
// 1024; 0 turns the cache off, the huge-page advice stays); live outputs are the
// caller's. A buffer is reused only for a request of the same size rounded up to
// 2 MiB; when a freed buffer would exceed the limit, the least recently cached
// ones are released. ATTNEXT_CPU_CACHE_MB and ATTNEXT_HUGEPAGES (0: no huge-page
// advice) are read once, on first use. torch.ops.attnext._cpu_cache_info /
// _cpu_cache_empty report and release it (attnext.cpu_cache_info(),
// attnext.empty_cpu_cache()).
//
// A handed-out buffer is an ordinary CPU DataPtr: its context is the data
// pointer itself, as with c10's CPU allocator, so copy-on-write (_lazy_clone),
// share_memory_, pickling and the rest of torch's storage machinery treat it as
// any CPU tensor's (COW only wraps a DataPtr whose context is its data). The
// sizes of live buffers are kept in a table under the cache's lock instead.
//
// fork() (DataLoader workers) happens with that lock held by the forking thread
// (pthread_atfork), so a child never inherits it held by a thread it lacks.
//
// Handing a buffer out and getting it back are reported to torch's memory
// profiler (profile_memory=True), as the CPU allocator reports its allocations
// and frees; the free buffers held here count as the cache's, as in the CUDA
// caching allocator.
#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <list>
#include <mutex>
#include <tuple>
#include <unordered_map>

#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#define ATTNEXT_HAVE_ATFORK 1
#endif

#include "common.h"

namespace attnext {
namespace {

constexpr size_t kHuge = size_t(2) << 20;
constexpr size_t kMinBytes = size_t(4) << 20;

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
  OutputCache() : limit_(env_limit_bytes()), hugepages_(env_flag("ATTNEXT_HUGEPAGES", true)) {
#if defined(ATTNEXT_HAVE_ATFORK)
    // Once: the cache is never destroyed.
    pthread_atfork(&OutputCache::before_fork, &OutputCache::after_fork, &OutputCache::after_fork);
#endif
  }

  c10::DataPtr allocate(size_t n) override {
    const size_t size = round_up(std::max<size_t>(n, 1));
    void* p = nullptr;
    Totals t{};
    {
      std::lock_guard<std::mutex> lock(mu_);
      const auto it = std::find_if(free_.begin(), free_.end(), [size](const Block& b) { return b.size == size; });
      if (it != free_.end()) {
        p = it->ptr;
        hand_out(p, size);
        cached_ -= size;
        free_.erase(it);
        ++hits_;
        t = totals_locked();
      } else {
        ++misses_;
      }
    }
    if (p == nullptr) {
      p = fresh(size);
      std::lock_guard<std::mutex> lock(mu_);
      hand_out(p, size);
      t = totals_locked();
    }
    c10::reportMemoryUsageToProfiler(p, static_cast<int64_t>(size), t.live, t.reserved, c10::Device(c10::kCPU));
    return {p, p, &OutputCache::release, c10::Device(c10::kCPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &OutputCache::release; }

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
  // Bytes handed out and live, and those plus the cached ones, for the profiler.
  struct Totals {
    size_t live;
    size_t reserved;
  };

  static size_t round_up(size_t n) { return (n + kHuge - 1) / kHuge * kHuge; }

  static void release(void* ptr);

#if defined(ATTNEXT_HAVE_ATFORK)
  // The forking thread holds the lock across fork(), so no other thread is inside
  // the cache then; both processes' copies of that thread release it after.
  static void before_fork();
  static void after_fork();
#endif

  void* fresh(size_t size) {
    void* p = nullptr;
    if (posix_memalign(&p, kHuge, size) != 0 || p == nullptr) {
      // Free what is cached and try once more before giving up.
      empty();
      if (posix_memalign(&p, kHuge, size) != 0 || p == nullptr) {
        Totals t{};
        {
          std::lock_guard<std::mutex> lock(mu_);
          t = totals_locked();
        }
        c10::reportOutOfMemoryToProfiler(static_cast<int64_t>(size), t.live, t.reserved, c10::Device(c10::kCPU));
        TORCH_CHECK(false, "attnext: out of CPU memory allocating ", size, " bytes for an output");
      }
    }
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (hugepages_) {
      (void)madvise(p, size, MADV_HUGEPAGE);  // advice only: failure is harmless
    }
#endif
    return p;
  }

  // Under mu_.
  void hand_out(void* p, size_t size) {
    live_.emplace(p, size);
    live_bytes_ += size;
  }

  // Under mu_.
  Totals totals_locked() const { return {live_bytes_, live_bytes_ + cached_}; }

  void put(void* p) {
    std::list<Block> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      const auto it = live_.find(p);
      TORCH_INTERNAL_ASSERT(it != live_.end(), "attnext: output cache asked to free a buffer it did not hand out");
      const size_t size = it->second;
      live_.erase(it);
      live_bytes_ -= size;
      if (static_cast<int64_t>(size) > limit_) {
        drop.push_back({p, size});
      } else {
        while (static_cast<int64_t>(cached_ + size) > limit_) {
          cached_ -= free_.front().size;
          drop.splice(drop.end(), free_, free_.begin());
        }
        free_.push_back({p, size});
        cached_ += size;
      }
      // Under the lock: the profiler sees this free before p is handed out again.
      const Totals t = totals_locked();
      c10::reportMemoryUsageToProfiler(p, -static_cast<int64_t>(size), t.live, t.reserved, c10::Device(c10::kCPU));
    }
    for (const Block& d : drop) {
      std::free(d.ptr);
    }
  }

  std::mutex mu_;
  std::list<Block> free_;                   // oldest first
  std::unordered_map<void*, size_t> live_;  // handed-out buffer -> its size
  size_t cached_ = 0;
  size_t live_bytes_ = 0;
  const int64_t limit_;
  const bool hugepages_;
  int64_t hits_ = 0;
  int64_t misses_ = 0;
};

// Never destroyed: outputs may be freed during interpreter shutdown, after
// static destructors have run.
OutputCache& cache() {
  static OutputCache* c = new OutputCache();
  return *c;
}

void OutputCache::release(void* ptr) { cache().put(ptr); }

#if defined(ATTNEXT_HAVE_ATFORK)
void OutputCache::before_fork() { cache().mu_.lock(); }

void OutputCache::after_fork() { cache().mu_.unlock(); }
#endif

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
