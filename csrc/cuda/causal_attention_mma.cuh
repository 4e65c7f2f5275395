// Tensor-core causal attention (float16 / bfloat16, float32 as TF32; sm_80+): the GPU primitives and the
// kernels. The algorithms are in causal_attention_mma.h (shared with the host emulation
// test); here each warp primitive is one PTX instruction. No ATen includes.
//
// Only sm_80+ code contains mma.sync / ldmatrix / cp.async: for an older target the
// kernels are compiled to a trap, and the host side never launches them there (it
// checks the device's compute capability and the kernel's PTX version, so a build whose
// TORCH_CUDA_ARCH_LIST lacks 8.0+ falls back to the CUDA-core kernels).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/causal_attention_mma.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define ATTNEXT_MMA_SM80 1
#endif

namespace attnext {
namespace mma {

struct PtxOps {
  static __device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
  }
  static __device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
#ifdef ATTNEXT_MMA_SM80
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
#endif
  }
  static __device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], const void* p) {
#ifdef ATTNEXT_MMA_SM80
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
#endif
  }
  template <class E>
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#ifdef ATTNEXT_MMA_SM80
    if constexpr (E::kTf32) {
      asm volatile(
          "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
          "{%0, %1, %2, %3};\n"
          : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    } else if constexpr (E::kBf16) {
      asm volatile(
          "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
          "{%0, %1, %2, %3};\n"
          : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    } else {
      asm volatile(
          "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
          "{%0, %1, %2, %3};\n"
          : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
#endif
  }
  static __device__ __forceinline__ float shfl_xor(float v, int mask) { return __shfl_xor_sync(0xffffffffu, v, mask); }
  static __device__ __forceinline__ void sync() { __syncthreads(); }
  // 16 bytes to shared memory: `bytes` (0..16) from global src, zeros for the rest.
  static __device__ __forceinline__ void cp_async16(void* dst, const void* src, int bytes) {
#ifdef ATTNEXT_MMA_SM80
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(bytes)
                 : "memory");
#endif
  }
  static __device__ __forceinline__ void cp_commit() {
#ifdef ATTNEXT_MMA_SM80
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
  }
  template <int N>
  static __device__ __forceinline__ void cp_wait() {
#ifdef ATTNEXT_MMA_SM80
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
  }
  // 2^x (MUFU.EX2): exp2(-inf) = 0, NaN stays NaN; results below 2^-126 flush to 0,
  // which a softmax weight relative to the row max can lose.
  static __device__ __forceinline__ float exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
  }
  // x rounded to TF32 (nearest, ties away from zero), as the bits of a float
  static __device__ __forceinline__ uint32_t tf32(float x) {
    uint32_t u;
    asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(u) : "f"(x));
    return u;
  }
  template <class E>
  static __device__ __forceinline__ uint32_t pack2(float lo, float hi) {
    uint32_t u;
    if constexpr (E::kBf16) {
      const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
      memcpy(&u, &h, 4);
    } else {
      const __half2 h = __floats2half2_rn(lo, hi);
      memcpy(&u, &h, 4);
    }
    return u;
  }
  template <class E>
  static __device__ __forceinline__ typename E::T cvt(float x) {
    if constexpr (E::kTf32) {
      return x;  // float storage: the accumulator as it is
    } else if constexpr (E::kBf16) {
      return __bfloat16_as_ushort(__float2bfloat16_rn(x));
    } else {
      return __half_as_ushort(__float2half_rn(x));
    }
  }
  static __device__ __forceinline__ void store_u32(void* p, uint32_t v) { *static_cast<uint32_t*>(p) = v; }
};

// Grids: forward and dQ BH * ceil(T / 64) blocks, dK/dV BH * ceil(S / 64); kThreads each.
template <class E, int kHd>
__global__ void __launch_bounds__(kThreads) causal_attention_fwd_mma_kernel(const Params p) {
#if defined(__CUDA_ARCH__)
#ifdef ATTNEXT_MMA_SM80
  extern __shared__ __align__(16) unsigned char mma_smem[];
  fwd_block<PtxOps, E, kHd>(p, blockIdx.x, threadIdx.x, reinterpret_cast<typename E::T*>(mma_smem));
#else
  __trap();
#endif
#endif
}

template <class E, int kHd>
__global__ void __launch_bounds__(kThreads) causal_attention_dq_mma_kernel(const Params p, int stages) {
#if defined(__CUDA_ARCH__)
#ifdef ATTNEXT_MMA_SM80
  extern __shared__ __align__(16) unsigned char mma_smem[];
  dq_block<PtxOps, E, kHd>(p, blockIdx.x, threadIdx.x, reinterpret_cast<typename E::T*>(mma_smem), stages);
#else
  __trap();
#endif
#endif
}

template <class E, int kHd>
__global__ void __launch_bounds__(kThreads) causal_attention_dkdv_mma_kernel(const Params p, int stages) {
#if defined(__CUDA_ARCH__)
#ifdef ATTNEXT_MMA_SM80
  extern __shared__ __align__(16) unsigned char mma_smem[];
  dkdv_block<PtxOps, E, kHd>(p, blockIdx.x, threadIdx.x, reinterpret_cast<typename E::T*>(mma_smem), stages);
#else
  __trap();
#endif
#endif
}

}  // namespace mma
}  // namespace attnext
