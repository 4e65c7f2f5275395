// A host stand-in for <cuda_runtime.h>, for tests that compile attnext's CUDA kernel
// headers (csrc/cuda/*.cuh) with the host compiler and run them on emulated threads
// (tests/cpp/test_cuda_core_attention.cpp). Only this directory's tests see it: the
// test target puts it first on its include path.
//
// What a kernel sees:
//   threadIdx / blockIdx / blockDim / gridDim  per emulated thread (thread_local);
//   __syncthreads()          a barrier of the whole block;
//   __syncwarp()             a barrier of the calling thread's warp (32 threads);
//   __shfl_xor_sync(m, v, o) lane L gets v of lane L ^ o, through the warp's exchange
//                            slots (two phases, so one barrier per shuffle suffices);
//   extern __shared__        the test defines the array (per kernel namespace) and runs
//                            blocks one at a time, filling it with 0xFF (NaN) first;
//   min / max / math         host functions.
// Threads of a warp do not run in lockstep here (as on Volta and later): a kernel that
// reads another lane's shared-memory write without a __syncwarp / __syncthreads between
// races, and shows it as wrong or flaky results.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <type_traits>
#include <vector>

#include "../emu_block.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#ifdef CUDA_SHIM_STATIC_SHARED
// per-block arrays declared in a kernel (`__shared__ float sm[32];`): one static array
// per instantiation, which all threads of the (one running) block share. Not for
// translation units with `extern __shared__` arrays.
#define __shared__ static
#else
#define __shared__
#endif
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
using uint3 = dim3;

inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace cuda_shim {

constexpr int kMaxWarps = 32;

// One block's collectives. Each emulated thread points `me` at its block.
struct Warp {
  attnext_emu::Barrier bar{32};
  unsigned char slot[2][32][8];
};

struct Block {
  explicit Block(int threads) : bar(threads), nwarps((threads + 31) / 32) {}
  attnext_emu::Barrier bar;
  int nwarps;
  Warp warp[kMaxWarps];
};

struct Thread {
  Block* blk = nullptr;
  int phase = 0;
};

inline thread_local Thread me;

inline Warp& my_warp() { return me.blk->warp[threadIdx.x / 32]; }

}  // namespace cuda_shim

namespace cuda_shim {

// Runs call() as `blocks` blocks of `threads` emulated threads, one block at a time;
// before each block the `smem_bytes` at smem (the kernels' extern shared array) are
// filled with 0xFF bytes (NaN in every float type).
template <class F>
void launch(int64_t blocks, int threads, F&& call, unsigned char* smem = nullptr, size_t smem_bytes = 0) {
  if (threads > 32 * kMaxWarps || threads % 32 != 0) attnext_emu::die("launch: threads must be a multiple of 32, <= 1024");
  for (int64_t bx = 0; bx < blocks; ++bx) {
    if (smem_bytes > 0) std::memset(smem, 0xFF, smem_bytes);
    Block blk(threads);
    std::vector<std::thread> th;
    th.reserve(threads);
    for (int t = 0; t < threads; ++t) {
      th.emplace_back([&, t] {
        threadIdx = dim3{unsigned(t), 0, 0};
        blockIdx = dim3{unsigned(bx), 0, 0};
        blockDim = dim3{unsigned(threads), 1, 1};
        gridDim = dim3{unsigned(blocks), 1, 1};
        me = Thread{&blk, 0};
        call();
      });
    }
    for (auto& x : th) x.join();
  }
}

}  // namespace cuda_shim

inline void __syncthreads() { cuda_shim::me.blk->bar.wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { cuda_shim::my_warp().bar.wait(); }

template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of up to 8 bytes");
  if (mask != 0xffffffffu || width != 32) attnext_emu::die("__shfl_xor_sync: only full-warp shuffles are emulated");
  cuda_shim::Warp& w = cuda_shim::my_warp();
  const int ph = cuda_shim::me.phase;
  cuda_shim::me.phase ^= 1;
  const int lane = threadIdx.x % 32;
  std::memcpy(w.slot[ph][lane], &v, sizeof(T));
  w.bar.wait();
  T r;
  std::memcpy(&r, w.slot[ph][lane ^ lane_mask], sizeof(T));
  return r;
}

inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}
inline double __longlong_as_double(long long i) {
  double d;
  std::memcpy(&d, &i, 8);
  return d;
}

// CUDA's device min / max overloads, for the argument pairs the kernels use.
template <typename T>
inline T min(T a, T b) {
  return b < a ? b : a;
}
template <typename T>
inline T max(T a, T b) {
  return a < b ? b : a;
}
using std::exp;

using std::log;
