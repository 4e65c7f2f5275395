// The CPU output cache (csrc/cpu/output_cache.cpp) through the allocator of a cached
// output's storage:
//  * a handed-out buffer is a plain DataPtr (context == data), so torch's
//    copy-on-write can wrap it: _lazy_clone shares it, a write copies;
//  * fork safety: a thread allocates and frees in a tight loop (the cache's lock is
//    held much of the time) while the main thread forks; every child must be able to
//    allocate from the cache and run a kernel, and exit within a deadline. Without
//    the pthread_atfork handlers a child forked while the lock was held never gets it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/CPUAllocator.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstring>
#include <string>
#include <thread>

#include <sys/wait.h>
#include <unistd.h>

#include "check.h"
#include "ops.h"

using attnext_test::check;

namespace {

constexpr size_t kBytes = size_t(10) << 20;  // 40 x 256 x 256 float32: served by the cache

// Waits up to `seconds` for `pid`; kills it and returns -1 if it is still running.
int wait_with_deadline(pid_t pid, double seconds) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  while (true) {
    int status = 0;
    const pid_t r = waitpid(pid, &status, WNOHANG);
    if (r == pid) {
      return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    }
    if (r < 0 || std::chrono::steady_clock::now() > deadline) {
      kill(pid, SIGKILL);
      waitpid(pid, &status, 0);
      return -1;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

}  // namespace

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

  std::atomic<bool> stop{false};
  std::thread hammer([&] {
    while (!stop.load(std::memory_order_relaxed)) {
      c10::DataPtr d = cache->allocate(kBytes);  // and freed at once: two trips through the lock
    }
  });
  constexpr int kForks = 100;
  int bad = 0;
  for (int i = 0; i < kForks && bad == 0; ++i) {
    const pid_t pid = fork();
    if (pid == 0) {
      alarm(60);  // a hung child dies on its own
      at::set_num_threads(1);  // OpenMP does not survive fork (as in DataLoader workers)
      c10::DataPtr d = cache->allocate(kBytes);
      std::memset(d.get(), 0, kBytes);
      const at::Tensor r = attnext::causal_softmax_cpu(x, 1.0, false);
      _exit(at::equal(r, expected) ? 0 : 3);
    }
    check(pid > 0, "fork");
    const int rc = wait_with_deadline(pid, 20.0);
    if (rc != 0) {
      ++bad;
      check(false, "fork " + std::to_string(i) + ": child " + (rc < 0 ? "hung" : "exited " + std::to_string(rc)));
    }
  }
  stop = true;
  hammer.join();
  return attnext_test::finish("test_output_cache");
}
