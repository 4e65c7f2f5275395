// The BLAS entry points attnext's CPU kernels call, resolved at load time from the
// libraries torch already loaded (libtorch_cpu exports MKL in the x86-64 wheels).
// Weak: null where this torch does not export them; callers then use ATen or a
// plain loop instead.
#pragma once

#include <cstdint>

extern "C" {
// Fortran BLAS (column-major).
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
// MKL's mixed-precision CBLAS: bfloat16 / float16 inputs, float accumulation and output.
void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m, int n, int k, float alpha,
                            const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta, float* c, int ldc)
    __attribute__((weak));
void cblas_gemm_f16f16f32(int layout, int transa, int transb, int m, int n, int k, float alpha, const uint16_t* a,
                          int lda, const uint16_t* b, int ldb, float beta, float* c, int ldc) __attribute__((weak));
// MKL's C API: sets the calling thread's MKL thread count, returns the previous one.
int MKL_Set_Num_Threads_Local(int nt) __attribute__((weak));
}

namespace attnext {

// Keeps BLAS calls on the calling thread for the guard's lifetime. Used inside
// at::parallel_for: torch turns MKL's dynamic threading off, so an MKL call there
// would start a thread team of its own and oversubscribe the cores (measured up
// to 100x slower). A no-op where MKL is absent or `on` is false.
struct SingleThreadedBlas {
  int previous = 0;
  bool on;
  explicit SingleThreadedBlas(bool on_ = true) : on(on_ && MKL_Set_Num_Threads_Local != nullptr) {
    if (on) previous = MKL_Set_Num_Threads_Local(1);
  }
  ~SingleThreadedBlas() {
    if (on) MKL_Set_Num_Threads_Local(previous);
  }
  SingleThreadedBlas(const SingleThreadedBlas&) = delete;
  SingleThreadedBlas& operator=(const SingleThreadedBlas&) = delete;

  static bool available() { return MKL_Set_Num_Threads_Local != nullptr; }
};

}  // namespace attnext
