// attnext::parallel_for: at::parallel_for wherever that is parallel, a std::thread
// version where it is not.
//
// at::parallel_for is inline in ATen's headers. With torch's OpenMP backend (its Linux,
// Windows and macOS wheels) it is parallel only in files compiled with OpenMP
// (_OPENMP defined); compiled without (Apple clang, clang without libomp: setup.py
// says so) every call would run on one thread. There this header splits [begin, end)
// the way ATen's OpenMP backend does (at most at::get_num_threads() chunks, none
// smaller than grain_size), runs chunk 0 on the calling thread and the others on
// std::threads started for the call, and rethrows the first exception. Nested calls
// (inside a chunk, or inside torch's own parallel region) run inline, as ATen's do.
// Starting threads per call costs ~10-50 us, so it is for the coarse loops our
// kernels have. The native backend (AT_PARALLEL_NATIVE) is parallel either way.
#pragma once

#include <ATen/Parallel.h>

#include "cpu/parallel.h"
#include <c10/util/ParallelGuard.h>

#include <algorithm>
#include <cstdint>
#include <exception>
#include <mutex>
#include <system_error>
#include <thread>
#include <vector>

#if AT_PARALLEL_OPENMP && !defined(_OPENMP)
#define ATTNEXT_STD_THREADS 1
#else
#define ATTNEXT_STD_THREADS 0
#endif

namespace attnext {

// How at::parallel_for-style loops in our kernels run in this build: "openmp" (ATen's
// OpenMP backend, this file compiled with OpenMP), "native" (ATen's own thread pool)
// or "threads" (the std::thread version below).
inline const char* parallel_backend() {
#if ATTNEXT_STD_THREADS
  return "threads";
#elif AT_PARALLEL_OPENMP
  return "openmp";
#else
  return "native";
#endif
}

template <class F>
inline void parallel_for(const int64_t begin, const int64_t end, const int64_t grain_size, const F& f) {
#if ATTNEXT_STD_THREADS
  if (begin >= end) {
    return;
  }
  const int64_t numiter = end - begin;
  const int64_t threads = at::get_num_threads();
  if (numiter <= grain_size || numiter <= 1 || threads <= 1 || at::in_parallel_region() ||
      c10::ParallelGuard::is_enabled()) {
    c10::ParallelGuard guard(true);
    f(begin, end);
    return;
  }
  int64_t tasks = threads;
  if (grain_size > 0) {
    tasks = std::min(tasks, (numiter + grain_size - 1) / grain_size);
  }
  const int64_t chunk = (numiter + tasks - 1) / tasks;
  tasks = (numiter + chunk - 1) / chunk;
  std::exception_ptr error;
  std::mutex error_mutex;
  auto run = [&](int64_t tid) {
    try {
      at::internal::ThreadIdGuard tid_guard(static_cast<int>(tid));
      c10::ParallelGuard guard(true);
      const int64_t b = begin + tid * chunk;
      f(b, std::min(end, b + chunk));
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
    }
  };
  std::vector<std::thread> workers;
  workers.reserve(tasks - 1);
  int64_t started = 1;
  try {
    for (; started < tasks; ++started) {
      workers.emplace_back(run, started);
    }
  } catch (const std::system_error&) {
    // No more threads to be had: the chunks without one run here.
  }
  for (int64_t tid = started; tid < tasks; ++tid) {
    run(tid);
  }
  run(0);
  for (auto& w : workers) {
    w.join();
  }
  if (error) {
    std::rethrow_exception(error);
  }
#else
  at::parallel_for(begin, end, grain_size, f);
#endif
}

}  // namespace attnext
