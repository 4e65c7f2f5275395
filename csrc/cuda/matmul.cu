// Batched matmul with torch.matmul's broadcasting on CUDA, forward and backward,
// through cuBLAS, without copying operands.
//
// Broadcast batches are expressed by strides: each operand's stride is 0 along the
// output batch dims it is broadcast over, one batch dim (the largest the
// destination is not broadcast along) becomes cuBLAS's strided batch, and the
// other batch dims are a host loop of launches on the current stream. A matrix
// view with a unit-stride row or column goes to cuBLAS as it is (a transposed view
// is an 'T' operand); only an operand with neither is copied.
//
// Backward: grad_a[e] = sum_r grad[e, r] @ b[e, r]^T over the dims r that a was
// broadcast along: the launches for successive r accumulate into grad_a with
// beta = 1 (stream order makes this race-free; within a launch every destination
// matrix is distinct). bfloat16/float16 gradients that accumulate over several
// launches are summed in a float32 buffer and rounded once. When b is a plain
// matrix (x @ W) and a is contiguous, the batch folds into one large GEMM, as
// torch.matmul does. float32 runs on TF32 exactly when torch.matmul would
// (tf32_allowed() in cuda_common.h: fp32_precision, allow_tf32,
// set_float32_matmul_precision, not under at::NoTF32Guard).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cublas_v2.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common.h"
#include "cuda/cuda_common.h"

namespace attnext {
namespace {

#define ATTNEXT_CUBLAS_CHECK(expr)                                                             \
  do {                                                                                         \
    const cublasStatus_t _st = (expr);                                                         \
    TORCH_CHECK(_st == CUBLAS_STATUS_SUCCESS, "attnext: cuBLAS call failed: ", #expr, " -> ", \
                static_cast<int>(_st));                                                        \
  } while (0)

constexpr int kMaxBatch = 16;

// A (rows, cols) matrix operand of a batched GEMM: row-major with leading dim ld,
// or column-major (col_major) with leading dim ld. bstride: per output batch dim,
// 0 where broadcast.
struct Operand {
  at::Tensor t;  // the tensor read (the input itself, or a copy it had to be)
  const char* base = nullptr;
  bool col_major = false;
  int64_t ld = 1;
  int64_t bstride[kMaxBatch] = {};
};

bool layout_of(int64_t rows, int64_t cols, int64_t sr, int64_t sc, bool* col_major, int64_t* ld) {
  if ((cols <= 1 || sc == 1) && (rows <= 1 || sr >= std::max<int64_t>(1, cols))) {
    *col_major = false;
    *ld = rows <= 1 ? std::max<int64_t>(1, cols) : sr;
    return true;
  }
  if ((rows <= 1 || sr == 1) && (cols <= 1 || sc >= std::max<int64_t>(1, rows))) {
    *col_major = true;
    *ld = cols <= 1 ? std::max<int64_t>(1, rows) : sc;
    return true;
  }
  return false;
}

// x: (..., rows, cols), batch dims right-aligned against nb output batch dims.
// transpose: describe x^T instead.
Operand make_operand(const at::Tensor& x_in, int64_t nb, bool transpose) {
  Operand o;
  bool cm = false;
  int64_t ld = 1;
  o.t = layout_of(x_in.size(-2), x_in.size(-1), x_in.stride(-2), x_in.stride(-1), &cm, &ld) ? x_in
                                                                                             : x_in.contiguous();
  const at::Tensor& x = o.t;
  TORCH_INTERNAL_ASSERT(layout_of(x.size(-2), x.size(-1), x.stride(-2), x.stride(-1), &cm, &ld));
  o.base = static_cast<const char*>(x.const_data_ptr());
  o.col_major = transpose ? !cm : cm;
  o.ld = ld;
  const int64_t xb = x.dim() - 2;
  for (int64_t d = 0; d < xb; ++d) {
    o.bstride[nb - xb + d] = x.size(d) == 1 ? 0 : x.stride(d) * x.element_size();
  }
  return o;
}

cudaDataType_t cuda_type(at::ScalarType st) {
  switch (st) {
    case at::kFloat:
      return CUDA_R_32F;
    case at::kDouble:
      return CUDA_R_64F;
    case at::kHalf:
      return CUDA_R_16F;
    case at::kBFloat16:
      return CUDA_R_16BF;
    default:
      TORCH_CHECK(false, "attnext: matmul has no CUDA kernel for dtype ", st);
  }
}

// C[i] (M, N, row-major, ldc) = A[i] (M, K) @ B[i] (K, N) (+ C[i] when accumulate) for
// every output batch index i over `sizes`; A, B, C advance by their byte bstrides.
void batched_gemm(int64_t M, int64_t N, int64_t K, const Operand& A, const Operand& B, char* C, at::ScalarType c_type,
                  int64_t ldc, const int64_t* c_bstride, const std::vector<int64_t>& sizes, bool accumulate,
                  at::ScalarType in_type) {
  const int64_t nb = static_cast<int64_t>(sizes.size());
  int64_t total = 1;
  for (int64_t s : sizes) total *= s;
  if (M == 0 || N == 0 || total == 0) return;
  // The strided-batch dim: the largest dim along which C is not broadcast (so that
  // one launch never writes the same matrix twice).
  int64_t inner = -1;
  for (int64_t d = 0; d < nb; ++d) {
    if (sizes[d] > 1 && c_bstride[d] != 0 && (inner < 0 || sizes[d] > sizes[inner])) inner = d;
  }
  const int64_t count = inner < 0 ? 1 : sizes[inner];
  TORCH_CHECK(std::max({M, N, K, A.ld, B.ld, ldc, count}) <= INT32_MAX, "attnext: matmul dims too large for cuBLAS");

  // ATen's handle comes bound to the current stream, with ATen's workspace for that
  // stream and the TF32 math mode: no cublasSetStream here, it would reset the
  // workspace to cuBLAS's own pool (allocations outside the caching allocator).
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  const cudaDataType_t ab_t = cuda_type(in_type), c_t = cuda_type(c_type);
  cublasComputeType_t compute = CUBLAS_COMPUTE_32F;
  if (in_type == at::kDouble) {
    compute = CUBLAS_COMPUTE_64F;
  } else if (in_type == at::kFloat && tf32_allowed()) {
    compute = CUBLAS_COMPUTE_32F_FAST_TF32;
  }
  const double alpha_d = 1.0, beta_d = accumulate ? 1.0 : 0.0;
  const float alpha_f = 1.0f, beta_f = accumulate ? 1.0f : 0.0f;
  const void* alpha = in_type == at::kDouble ? static_cast<const void*>(&alpha_d) : &alpha_f;
  const void* beta = in_type == at::kDouble ? static_cast<const void*>(&beta_d) : &beta_f;
  const int64_t ab_size = c10::elementSize(in_type), c_size = c10::elementSize(c_type);
  // Row-major C = A @ B is column-major C^T = B^T @ A^T: a row-major operand is its
  // own transpose in column-major terms (op N), a column-major one needs op T.
  const cublasOperation_t opA = A.col_major ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t opB = B.col_major ? CUBLAS_OP_T : CUBLAS_OP_N;
  const int64_t sA = inner < 0 ? 0 : A.bstride[inner] / ab_size;
  const int64_t sB = inner < 0 ? 0 : B.bstride[inner] / ab_size;
  const int64_t sC = inner < 0 ? 0 : c_bstride[inner] / c_size;
  const int64_t launches = total / count;
  for (int64_t l = 0; l < launches; ++l) {
    // Decompose l over the batch dims other than `inner`.
    int64_t rem = l, offA = 0, offB = 0, offC = 0;
    for (int64_t d = nb - 1; d >= 0; --d) {
      if (d == inner) continue;
      const int64_t i = rem % sizes[d];
      rem /= sizes[d];
      offA += i * A.bstride[d];
      offB += i * B.bstride[d];
      offC += i * c_bstride[d];
    }
    ATTNEXT_CUBLAS_CHECK(cublasGemmStridedBatchedEx(
        handle, opB, opA, static_cast<int>(N), static_cast<int>(M), static_cast<int>(K), alpha, B.base + offB, ab_t,
        static_cast<int>(B.ld), sB, A.base + offA, ab_t, static_cast<int>(A.ld), sA, beta, C + offC, c_t,
        static_cast<int>(ldc), sC, static_cast<int>(count), compute, CUBLAS_GEMM_DEFAULT));
  }
}

void check_pair(const at::Tensor& a, const at::Tensor& b) {
  check_strided(a, "a");
  check_strided(b, "b");
  TORCH_CHECK(a.is_cuda(), "attnext: a must be a CUDA tensor for the CUDA kernel, got ", a.device());
  check_floating(a, "a");
  check_floating(b, "b");
  check_same(a, "a", b, "b");
  TORCH_CHECK(a.dim() >= 1 && b.dim() >= 1, "attnext: matmul needs a and b with at least 1 dim, got shapes ",
              a.sizes(), " and ", b.sizes());
}

// Promoted views: a (..., n, k), b (..., k, p), and the output shape (with the
// promoted dims of 1-D operands removed) and its batch sizes.
struct Plan {
  at::Tensor a, b;
  std::vector<int64_t> batch;
  std::vector<int64_t> out_shape;
  int64_t n, k, p;
};

Plan plan(const at::Tensor& a_in, const at::Tensor& b_in) {
  Plan pl;
  pl.a = a_in.dim() == 1 ? a_in.unsqueeze(0) : a_in;
  pl.b = b_in.dim() == 1 ? b_in.unsqueeze(1) : b_in;
  pl.n = pl.a.size(-2);
  pl.k = pl.a.size(-1);
  pl.p = pl.b.size(-1);
  TORCH_CHECK(pl.b.size(-2) == pl.k, "attnext: matmul shapes do not match: a ", a_in.sizes(), " has ", pl.k,
              " columns but b ", b_in.sizes(), " has ", pl.b.size(-2), " rows");
  const auto ab = pl.a.sizes().slice(0, pl.a.dim() - 2), bb = pl.b.sizes().slice(0, pl.b.dim() - 2);
  const int64_t nb = std::max<int64_t>(ab.size(), bb.size());
  TORCH_CHECK(nb <= kMaxBatch, "attnext: at most ", kMaxBatch, " batch dims are supported, got ", nb);
  pl.batch.assign(nb, 1);
  for (int64_t d = 0; d < nb; ++d) {
    const int64_t i = d - (nb - static_cast<int64_t>(ab.size()));
    const int64_t j = d - (nb - static_cast<int64_t>(bb.size()));
    const int64_t sa = i >= 0 ? ab[i] : 1, sb = j >= 0 ? bb[j] : 1;
    TORCH_CHECK(sa == sb || sa == 1 || sb == 1, "attnext: matmul batch dims cannot be broadcast: a ", a_in.sizes(),
                " and b ", b_in.sizes(), " differ at batch dim ", d, " (", sa, " vs ", sb, ")");
    pl.batch[d] = sa == 1 ? sb : sa;
  }
  pl.out_shape = pl.batch;
  if (a_in.dim() > 1) pl.out_shape.push_back(pl.n);
  if (b_in.dim() > 1) pl.out_shape.push_back(pl.p);
  return pl;
}

std::vector<int64_t> contiguous_bstrides(const std::vector<int64_t>& batch, int64_t matrix_numel, int64_t elem) {
  std::vector<int64_t> s(batch.size());
  int64_t acc = matrix_numel * elem;
  for (int64_t d = static_cast<int64_t>(batch.size()) - 1; d >= 0; --d) {
    s[d] = batch[d] == 1 ? 0 : acc;
    acc *= batch[d];
  }
  return s;
}

// x @ W with W a plain matrix and x contiguous: one GEMM over all rows.
bool foldable(const Plan& pl) { return pl.b.dim() == 2 && pl.a.dim() > 2 && pl.a.is_contiguous(); }

}  // namespace

at::Tensor matmul_cuda(const at::Tensor& a_in, const at::Tensor& b_in) {
  check_pair(a_in, b_in);
  const c10::cuda::CUDAGuard guard(a_in.device());
  Plan pl = plan(a_in, b_in);
  at::Tensor out = at::empty(pl.out_shape, a_in.options());
  if (out.numel() == 0) return out;
  if (pl.k == 0) return out.zero_();
  if (foldable(pl)) {
    const at::Tensor a2 = pl.a.view({-1, pl.k});
    const Operand A = make_operand(a2, 0, false), B = make_operand(pl.b, 0, false);
    batched_gemm(a2.size(0), pl.p, pl.k, A, B, static_cast<char*>(out.data_ptr()), out.scalar_type(), pl.p, nullptr,
                 {}, false, a_in.scalar_type());
    return out;
  }
  const int64_t nb = static_cast<int64_t>(pl.batch.size());
  const Operand A = make_operand(pl.a, nb, false), B = make_operand(pl.b, nb, false);
  const auto cs = contiguous_bstrides(pl.batch, pl.n * pl.p, out.element_size());
  batched_gemm(pl.n, pl.p, pl.k, A, B, static_cast<char*>(out.data_ptr()), out.scalar_type(), pl.p, cs.data(),
               pl.batch, false, a_in.scalar_type());
  return out;
}

namespace {

// grad_x (shape of the promoted operand x) = sum over x's broadcast dims of
// lhs[i] @ rhs[i]; lhs/rhs already describe the (transposed) factors.
at::Tensor accumulate_grad(const at::Tensor& x, const Operand& lhs, const Operand& rhs, int64_t M, int64_t N,
                           int64_t K, const std::vector<int64_t>& batch, at::ScalarType in_type) {
  const int64_t nb = static_cast<int64_t>(batch.size());
  const int64_t xb = x.dim() - 2;
  bool reduces = false;
  for (int64_t d = 0; d < nb; ++d) {
    const int64_t xs = d >= nb - xb ? x.size(d - (nb - xb)) : 1;
    reduces |= (xs == 1 && batch[d] > 1);
  }
  const bool low = in_type == at::kHalf || in_type == at::kBFloat16;
  const at::ScalarType acc_type = (reduces && low) ? at::kFloat : in_type;
  at::Tensor g = reduces ? at::zeros(x.sizes(), x.options().dtype(acc_type))
                         : at::empty(x.sizes(), x.options().dtype(acc_type));
  std::vector<int64_t> gs(nb, 0);
  for (int64_t d = 0; d < xb; ++d) {
    gs[nb - xb + d] = x.size(d) == 1 ? 0 : g.stride(d) * g.element_size();
  }
  batched_gemm(M, N, K, lhs, rhs, static_cast<char*>(g.data_ptr()), acc_type, N, gs.data(), batch, reduces, in_type);
  return acc_type == in_type ? g : g.to(in_type);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> matmul_backward_cuda(const at::Tensor& grad_in, const at::Tensor& a_in,
                                                        const at::Tensor& b_in, std::array<bool, 2> mask) {
  check_pair(a_in, b_in);
  check_strided(grad_in, "grad");
  check_same(grad_in, "grad", a_in, "a");
  const c10::cuda::CUDAGuard guard(a_in.device());
  Plan pl = plan(a_in, b_in);
  TORCH_CHECK(grad_in.sizes() == at::IntArrayRef(pl.out_shape), "attnext: grad must have the output's shape ",
              at::IntArrayRef(pl.out_shape), ", got ", grad_in.sizes());
  // grad as (batch..., n, p)
  std::vector<int64_t> gshape = pl.batch;
  gshape.push_back(pl.n);
  gshape.push_back(pl.p);
  const at::Tensor grad = grad_in.reshape(gshape);
  // An unrequested gradient is an empty (0,) tensor, as the schema, the CPU kernel
  // and the fake kernel have it (never an undefined tensor).
  at::Tensor ga = at::empty({0}, a_in.options()), gb = at::empty({0}, b_in.options());
  const auto in_type = a_in.scalar_type();
  if (pl.n == 0 || pl.p == 0 || grad.numel() == 0 || pl.k == 0) {
    if (mask[0]) ga = at::zeros(a_in.sizes(), a_in.options());
    if (mask[1]) gb = at::zeros(b_in.sizes(), b_in.options());
    return {ga, gb};
  }
  if (foldable(pl) && grad.is_contiguous()) {
    const at::Tensor a2 = pl.a.view({-1, pl.k}), g2 = grad.view({-1, pl.p});
    if (mask[0]) {  // (rows, k) = g2 (rows, p) @ b^T (p, k)
      ga = at::empty(a2.sizes(), a2.options());
      batched_gemm(g2.size(0), pl.k, pl.p, make_operand(g2, 0, false), make_operand(pl.b, 0, true),
                   static_cast<char*>(ga.data_ptr()), in_type, pl.k, nullptr, {}, false, in_type);
      ga = ga.view(a_in.sizes());
    }
    if (mask[1]) {  // (k, p) = a2^T (k, rows) @ g2 (rows, p)
      gb = at::empty(pl.b.sizes(), pl.b.options());
      batched_gemm(pl.k, pl.p, a2.size(0), make_operand(a2, 0, true), make_operand(g2, 0, false),
                   static_cast<char*>(gb.data_ptr()), in_type, pl.p, nullptr, {}, false, in_type);
      gb = gb.view(b_in.sizes());
    }
    return {ga, gb};
  }
  const int64_t nb = static_cast<int64_t>(pl.batch.size());
  const Operand G = make_operand(grad, nb, false);
  if (mask[0]) {  // (n, k) = grad (n, p) @ b^T (p, k)
    ga = accumulate_grad(pl.a, G, make_operand(pl.b, nb, true), pl.n, pl.k, pl.p, pl.batch, in_type)
             .view(a_in.sizes());
  }
  if (mask[1]) {  // (k, p) = a^T (k, n) @ grad (n, p)
    gb = accumulate_grad(pl.b, make_operand(pl.a, nb, true), G, pl.k, pl.p, pl.n, pl.batch, in_type)
             .view(b_in.sizes());
  }
  return {ga, gb};
}

TORCH_LIBRARY_IMPL(attnext, CUDA, m) {
  m.impl("matmul", &matmul_cuda);
  m.impl("_matmul_backward", &matmul_backward_cuda);
}

}  // namespace attnext
