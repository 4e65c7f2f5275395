// tf32_allowed() (csrc/cuda/cuda_common.h), the one TF32 switch every attnext CUDA op
// reads (matmul's cuBLAS compute type, attention's TF32 tensor-core path), on the host
// through tests/cpp/cuda_shim against torch's own settings: each of torch's switches,
// at::NoTF32Guard, and no error when TF32 was set through the new API alone, where
// Context::allowTF32CuBLAS() raises (what matmul.cu read before).
#include <cuda_runtime.h>  // tests/cpp/cuda_shim

#include <ATen/ATen.h>
#include <torch/version.h>

#include "check.h"
#include "cuda/cuda_common.h"

using attnext::tf32_allowed;
using attnext_test::check;

int main() {
  at::Context& ctx = at::globalContext();
  check(!tf32_allowed(), "torch's default: no TF32 for CUDA matmuls");
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 10)
  // torch.backends.cuda.matmul.fp32_precision = "tf32" alone: allowTF32CuBLAS() raises
  ctx.setFloat32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL, at::Float32Precision::TF32);
  attnext_test::check_throws([&] { (void)ctx.allowTF32CuBLAS(); }, "legacy and new APIs",
                             "allowTF32CuBLAS() with only the new API used (why it is not read)");
  check(tf32_allowed(), "fp32_precision tf32 alone");
  ctx.setFloat32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL, at::Float32Precision::IEEE);
  check(!tf32_allowed(), "fp32_precision ieee alone");
#endif

  ctx.setAllowTF32CuBLAS(true);  // torch.backends.cuda.matmul.allow_tf32 = True
  check(tf32_allowed(), "allow_tf32");
  {
    at::NoTF32Guard guard;
    check(!tf32_allowed(), "allow_tf32 under NoTF32Guard");
  }
  check(tf32_allowed(), "allow_tf32 after the guard");
  ctx.setAllowTF32CuBLAS(false);
  check(!tf32_allowed(), "allow_tf32 off");

  ctx.setFloat32MatmulPrecision("high");  // torch.set_float32_matmul_precision("high")
  check(tf32_allowed(), "set_float32_matmul_precision high");
  ctx.setFloat32MatmulPrecision("highest");
  check(!tf32_allowed(), "set_float32_matmul_precision highest");

#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 10)
  // torch.backends.cuda.matmul.fp32_precision = "tf32", after the legacy switch was used
  ctx.setFloat32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL, at::Float32Precision::TF32);
  check(tf32_allowed(), "fp32_precision tf32");
  {
    at::NoTF32Guard guard;
    check(!tf32_allowed(), "fp32_precision tf32 under NoTF32Guard");
  }
  ctx.setFloat32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL, at::Float32Precision::IEEE);
  check(!tf32_allowed(), "fp32_precision ieee");
  // The generic setting alone: torch.backends.fp32_precision = "tf32"
  ctx.setFloat32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL, at::Float32Precision::NONE);
  ctx.setFloat32Precision(at::Float32Backend::GENERIC, at::Float32Op::ALL, at::Float32Precision::TF32);
  check(tf32_allowed(), "generic fp32_precision tf32");
  ctx.setFloat32Precision(at::Float32Backend::GENERIC, at::Float32Op::ALL, at::Float32Precision::IEEE);
  check(!tf32_allowed(), "generic fp32_precision ieee");
#endif
  return attnext_test::finish("test_cuda_tf32");
}
