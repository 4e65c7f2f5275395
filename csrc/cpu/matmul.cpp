// Batched matmul with torch.matmul's broadcasting, forward and backward, on the CPU.
//
// Algorithm: 1-D operands are promoted to matrices by a view ((k) -> (1, k) on the
// left, (k, 1) on the right) and the extra dim is dropped from the result. The
// batch dims of both operands are broadcast against each other *by strides*: an
// operand's stride is taken as 0 along every batch dim it is broadcast over, so
// each output matrix out[o] = a[o_a] @ b[o_b] reads its operands in place through
// per-batch pointer offsets. Nothing operand-sized is ever allocated; the forward
// allocates the output alone.
//
// Every GEMM goes to the BLAS that ATen itself calls (sgemm_/dgemm_ and MKL's
// cblas_gemm_bf16bf16f32 / cblas_gemm_f16f16f32, exported by libtorch_cpu and bound
// weakly here, so a torch without them still loads and runs ATen's mm on views of
// the same memory instead).
// A matrix view whose rows or columns are unit-stride goes to the GEMM as it is
// (transposed views become a 'T' GEMM); only an operand with neither last dim
// unit-stride (or with a zero row stride inside a matrix) is copied, and only that
// operand. Tiny GEMMs (the lecture's 2x2 @ 2x3) use a plain loop: a BLAS call costs
// more than their arithmetic.
//
// Backward: grad_a[e] = sum_r grad[e, r] @ b[e, r]^T where r runs over the batch
// dims a was broadcast along; the sum is a chain of GEMMs with beta = 1 into the
// gradient slice (float accumulation for bfloat16/float16, rounded once). grad_b
// likewise. When b has no batch dims (x @ W) the batch is folded into the GEMM's
// rows (forward, grad_a) or its reduction dim (grad_b): one large GEMM instead of
// many small ones, as torch.matmul does.
//
// Parallelism: at::parallel_for over the *destination's* batch entries (output
// matrices, or gradient slices: a thread owns whole slices, so the accumulation has
// no races), each GEMM single-threaded inside; with fewer entries than threads
// (a 2-D @ 2-D product, x @ W folded) the BLAS threads the GEMM (see batched_gemm).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <climits>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common.h"
#include "cpu/blas.h"
#include "cpu/gemm_f32.h"
#include "cpu/parallel.h"
#include "ops.h"

namespace attnext {
namespace {

constexpr int kMaxBatchDims = 16;
constexpr int kCblasRowMajor = 101, kCblasNoTrans = 111, kCblasTrans = 112;
// Below this many multiply-adds a GEMM runs in the loop kernel.
constexpr int64_t kTinyGemm = 2048;

// A logical (rows, cols) matrix in memory as a GEMM sees it: row-major with leading
// dim ld (trans = false), or column-major with leading dim ld (trans = true, the
// transpose of a row-major matrix).
struct MatLayout {
  bool trans = false;
  int64_t ld = 1;
};

// The layout of a (rows, cols) matrix with strides (sr, sc), if a GEMM can take it.
bool gemm_layout(int64_t rows, int64_t cols, int64_t sr, int64_t sc, MatLayout* out) {
  if ((cols <= 1 || sc == 1) && (rows <= 1 || sr >= std::max<int64_t>(1, cols))) {
    *out = {false, rows <= 1 ? std::max<int64_t>(1, cols) : sr};
    return true;
  }
  if ((rows <= 1 || sr == 1) && (cols <= 1 || sc >= std::max<int64_t>(1, rows))) {
    *out = {true, cols <= 1 ? std::max<int64_t>(1, rows) : sc};
    return true;
  }
  return false;
}

// One matrix operand of a batched GEMM: the matrix of output batch index
// (i_0, ..., i_{nb-1}) starts at base + sum_d i_d * bstride[d]; bstride[d] is 0
// along the dims the operand is broadcast over.
template <typename scalar_t>
struct MatArg {
  const scalar_t* base = nullptr;
  int64_t bstride[kMaxBatchDims] = {};
  MatLayout layout;
};

// The tensor itself when a GEMM can read its matrices, else a contiguous copy of it
// (neither last dim unit-stride, or a broadcast row inside a matrix).
at::Tensor gemm_readable(const at::Tensor& x) {
  MatLayout l;
  if (x.numel() == 0 || gemm_layout(x.size(-2), x.size(-1), x.stride(-2), x.stride(-1), &l)) {
    return x;
  }
  return x.contiguous();
}

// x: (..., rows, cols) with at most nb batch dims, right-aligned against the output's
// nb batch dims. transpose: describe x^T (the matrix dims swapped) instead.
template <typename scalar_t>
MatArg<scalar_t> mat_arg(const at::Tensor& x, int64_t nb, bool transpose) {
  MatArg<scalar_t> m;
  m.base = x.const_data_ptr<scalar_t>();
  const int64_t xb = x.dim() - 2;
  for (int64_t d = 0; d < xb; ++d) {
    m.bstride[nb - xb + d] = x.size(d) == 1 ? 0 : x.stride(d);
  }
  int64_t rows = x.size(-2), cols = x.size(-1), sr = x.stride(-2), sc = x.stride(-1);
  if (transpose) {
    std::swap(rows, cols);
    std::swap(sr, sc);
  }
  const bool ok = gemm_layout(rows, cols, sr, sc, &m.layout);
  TORCH_INTERNAL_ASSERT(ok || x.numel() == 0, "attnext: matmul operand not GEMM-readable");
  return m;
}

// ---- one GEMM: C (m, n, row-major, ld n) = op(A) (m, k) @ op(B) (k, n) [+ C]

// The loop kernel (tiny GEMMs, where a BLAS call costs more than the arithmetic). acc_t accumulation.
template <typename scalar_t, typename acc_t>
void loop_gemm(int64_t m, int64_t n, int64_t k, const scalar_t* A, MatLayout la, const scalar_t* B, MatLayout lb,
               bool accumulate, acc_t* C) {
  const int64_t ak = la.trans ? la.ld : 1, am = la.trans ? 1 : la.ld;  // A(i, p) = A[i*am + p*ak]
  const int64_t bk = lb.trans ? 1 : lb.ld, bn = lb.trans ? lb.ld : 1;  // B(p, j) = B[p*bk + j*bn]
  for (int64_t i = 0; i < m; ++i) {
    acc_t* c = C + i * n;
    if (!accumulate) {
      std::fill(c, c + n, acc_t(0));
    }
    for (int64_t p = 0; p < k; ++p) {
      const acc_t aip = static_cast<acc_t>(A[i * am + p * ak]);
      const scalar_t* brow = B + p * bk;
      for (int64_t j = 0; j < n; ++j) {
        c[j] += aip * static_cast<acc_t>(brow[j * bn]);
      }
    }
  }
}

bool fits_int(int64_t m, int64_t n, int64_t k, MatLayout la, MatLayout lb) {
  return std::max({m, n, k, la.ld, lb.ld}) <= INT_MAX;
}

template <typename scalar_t>
bool have_blas() {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return sgemm_ != nullptr;
  } else if constexpr (std::is_same_v<scalar_t, double>) {
    return dgemm_ != nullptr;
  } else if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    return cblas_gemm_bf16bf16f32 != nullptr;
  } else {
    return cblas_gemm_f16f16f32 != nullptr;
  }
}

// How one GEMM is computed: the loop kernel (tiny, or k == 0); for float32 on
// AVX-512 CPUs attnext's own GEMM where it measured faster than the BLAS on this
// CPU (cpu/gemm_f32.h: about 2x the MKL torch ships on an AMD EPYC, slower than it
// on Intel); the exported BLAS; or,
// where this torch exports none (or ATTNEXT_MATMUL_BLAS=0, for testing), ATen's
// mm on views of the same memory (reduced precision: float copies of the two
// matrices, one GEMM's worth).
enum class Backend { kLoop, kOwn, kBlas, kAten };

bool blas_allowed() {
  static const bool allowed = [] {
    const char* v = std::getenv("ATTNEXT_MATMUL_BLAS");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return allowed;
}

template <typename scalar_t>
void aten_gemm(int64_t m, int64_t n, int64_t k, const scalar_t* A, MatLayout la, const scalar_t* B, MatLayout lb,
               bool accumulate, at::opmath_type<scalar_t>* C) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value);
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  auto view = [&](const scalar_t* p, int64_t rows, int64_t cols, MatLayout l) {
    const std::array<int64_t, 2> sizes{rows, cols};
    const std::array<int64_t, 2> strides = l.trans ? std::array<int64_t, 2>{1, l.ld} : std::array<int64_t, 2>{l.ld, 1};
    return at::from_blob(const_cast<scalar_t*>(p), sizes, strides, opts).to(acc);
  };
  const std::array<int64_t, 2> csizes{m, n}, cstrides{n, 1};
  at::Tensor c = at::from_blob(C, csizes, cstrides, opts.dtype(acc));
  if (accumulate) {
    c.addmm_(view(A, m, k, la), view(B, k, n, lb));
  } else {
    at::mm_out(c, view(A, m, k, la), view(B, k, n, lb));
  }
}

// C = op(A) @ op(B) (+ C when accumulate), C in the accumulation type (float for
// bfloat16/float16).
template <typename scalar_t>
void gemm(int64_t m, int64_t n, int64_t k, const scalar_t* A, MatLayout la, const scalar_t* B, MatLayout lb,
          bool accumulate, Backend backend, at::opmath_type<scalar_t>* C) {
  using acc_t = at::opmath_type<scalar_t>;
  if (m == 0 || n == 0) {
    return;
  }
  if (backend == Backend::kLoop) {
    loop_gemm<scalar_t, acc_t>(m, n, k, A, la, B, lb, accumulate, C);
    return;
  }
  if (backend == Backend::kAten) {
    aten_gemm<scalar_t>(m, n, k, A, la, B, lb, accumulate, C);
    return;
  }
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (backend == Backend::kOwn) {
      const int64_t am = la.trans ? 1 : la.ld, ak = la.trans ? la.ld : 1;  // A(i, p) = A[i*am + p*ak]
      const int64_t bk = lb.trans ? 1 : lb.ld, bn = lb.trans ? lb.ld : 1;  // B(p, j) = B[p*bk + j*bn]
      f32_gemm_blocked(m, n, k, A, am, ak, B, bk, bn, C, n, accumulate);
      return;
    }
  }
  const int im = static_cast<int>(m), in = static_cast<int>(n), ik = static_cast<int>(k);
  const int lda = static_cast<int>(la.ld), ldb = static_cast<int>(lb.ld), ldc = std::max(1, in);
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
    // Column-major BLAS: C^T (n, m) = op(B)^T @ op(A)^T.
    const char ta = la.trans ? 'T' : 'N', tb = lb.trans ? 'T' : 'N';
    const scalar_t alpha = 1, beta = accumulate ? 1 : 0;
    if constexpr (std::is_same_v<scalar_t, float>) {
      sgemm_(&tb, &ta, &in, &im, &ik, &alpha, B, &ldb, A, &lda, &beta, C, &ldc);
    } else {
      dgemm_(&tb, &ta, &in, &im, &ik, &alpha, B, &ldb, A, &lda, &beta, C, &ldc);
    }
  } else {
    const int ta = la.trans ? kCblasTrans : kCblasNoTrans, tb = lb.trans ? kCblasTrans : kCblasNoTrans;
    const auto* a16 = reinterpret_cast<const uint16_t*>(A);
    const auto* b16 = reinterpret_cast<const uint16_t*>(B);
    const float beta = accumulate ? 1.0f : 0.0f;
    if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
      cblas_gemm_bf16bf16f32(kCblasRowMajor, ta, tb, im, in, ik, 1.0f, a16, lda, b16, ldb, beta, C, ldc);
    } else {
      cblas_gemm_f16f16f32(kCblasRowMajor, ta, tb, im, in, ik, 1.0f, a16, lda, b16, ldb, beta, C, ldc);
    }
  }
}

// ---- the batched driver
//
// C[e] = sum_r op(A[e, r]) @ op(B[e, r]) over the nb batch dims of sizes S: dims
// with reduce[d] are summed over (r), the others index C's batch entries (e), in
// order. C is fresh and contiguous, (E, m, n) with E = prod of the kept sizes.
//
// Threads: at::parallel_for over the entries (each thread owns whole entries, so the
// beta = 1 chains never race), every GEMM inside on one thread: torch turns MKL's
// dynamic threading off, so an MKL call inside a parallel region would start a team
// of its own (oversubscription). SingleThreadedBlas pins it for the
// calling thread. Without that entry (a non-MKL torch), or with fewer entries than
// threads, the entries run in turn and the BLAS threads each GEMM (a reduction
// over r is then split across threads, see below). Tiny GEMMs use the loop kernel
// under at::parallel_for.
template <typename scalar_t>
void batched_gemm(int64_t nb, const int64_t* S, const bool* reduce, const MatArg<scalar_t>& A,
                  const MatArg<scalar_t>& B, scalar_t* C, int64_t m, int64_t n, int64_t k) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kLowp = !std::is_same_v<acc_t, scalar_t>;
  int64_t kept[kMaxBatchDims], red[kMaxBatchDims];
  int64_t nk = 0, nr = 0, E = 1, R = 1;
  for (int64_t d = 0; d < nb; ++d) {
    if (reduce[d]) {
      red[nr++] = d;
      R *= S[d];
    } else {
      kept[nk++] = d;
      E *= S[d];
    }
  }
  if (E == 0 || m == 0 || n == 0) {
    return;
  }
  const int64_t mn = m * n;
  // Element offsets of A's and B's matrix for entry e, reduction index r.
  auto offsets = [&](int64_t e, int64_t r, int64_t* oa, int64_t* ob) {
    int64_t a = 0, b = 0;
    for (int64_t i = nk - 1; i >= 0; --i) {
      const int64_t d = kept[i], idx = e % S[d];
      e /= S[d];
      a += idx * A.bstride[d];
      b += idx * B.bstride[d];
    }
    for (int64_t i = nr - 1; i >= 0; --i) {
      const int64_t d = red[i], idx = r % S[d];
      r /= S[d];
      a += idx * A.bstride[d];
      b += idx * B.bstride[d];
    }
    *oa = a;
    *ob = b;
  };
  const bool own_f32 = std::is_same_v<scalar_t, float> && f32_gemm_for(GemmUse::kMatmul) != nullptr;
  const Backend backend = (k == 0 || m * n * k <= kTinyGemm)                                        ? Backend::kLoop
                          : own_f32                                                                 ? Backend::kOwn
                          : (blas_allowed() && have_blas<scalar_t>() && fits_int(m, n, k, A.layout, B.layout)) ? Backend::kBlas
                                                                                                            : Backend::kAten;
  const bool loop = backend == Backend::kLoop;
  const bool own = backend == Backend::kOwn;  // threads itself outside a parallel region, serial inside

  auto body = [&](int64_t e0, int64_t e1) {
    std::vector<acc_t> scratch(kLowp ? mn : 0);
    for (int64_t e = e0; e < e1; ++e) {
      scalar_t* c = C + e * mn;
      acc_t* acc = nullptr;
      if constexpr (kLowp) {
        acc = scratch.data();
      } else {
        acc = c;
      }
      if (R == 0) {
        std::fill(acc, acc + mn, acc_t(0));
      }
      for (int64_t r = 0; r < R; ++r) {
        int64_t oa, ob;
        offsets(e, r, &oa, &ob);
        gemm<scalar_t>(m, n, k, A.base + oa, A.layout, B.base + ob, B.layout, r > 0, backend, acc);
      }
      if constexpr (kLowp) {
        for (int64_t i = 0; i < mn; ++i) {
          c[i] = static_cast<scalar_t>(scratch[i]);
        }
      }
    }
  };
  const bool can_pin = SingleThreadedBlas::available();
  const int64_t threads = at::get_num_threads();
  const bool pin = can_pin && backend == Backend::kBlas;
  const bool parallel_ok = loop || own || can_pin;
  const int64_t macs = std::max<int64_t>(1, m * n * std::max<int64_t>(k, 1));

  if (parallel_ok && threads > 1 && E < threads && R > 1) {
    // Few destinations, a long reduction (e.g. the gradient of a 2-D operand
    // broadcast over a batch): the reduction is cut into S chunks of consecutive r,
    // chunk 0 accumulates into C itself (a float32/float64 C), the others into
    // partial sums that are added at the end. A serial chain of BLAS-threaded GEMMs
    // would fork and join once per GEMM (measured 12x slower than torch on a
    // loaded 2-core machine). Extra memory: (S - 1) gradient slices (S for
    // bfloat16/float16, in float).
    const int64_t S = std::min(threads, R);
    constexpr int64_t kFirst = kLowp ? 0 : 1;
    std::vector<acc_t> partial((S - kFirst) * E * mn);
    auto chunk_begin = [&](int64_t s) { return R * s / S; };
    attnext::parallel_for(0, E * S, 1, [&](int64_t i0, int64_t i1) {
      SingleThreadedBlas guard(pin);
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t e = i / S, s = i % S;
        acc_t* acc = partial.data() + ((s - kFirst) * E + e) * mn;
        if constexpr (!kLowp) {
          if (s == 0) acc = C + e * mn;
        }
        for (int64_t r = chunk_begin(s); r < chunk_begin(s + 1); ++r) {
          int64_t oa, ob;
          offsets(e, r, &oa, &ob);
          gemm<scalar_t>(m, n, k, A.base + oa, A.layout, B.base + ob, B.layout, r > chunk_begin(s), backend, acc);
        }
      }
    });
    const int64_t total = E * mn;
    attnext::parallel_for(0, total, 1 << 14, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        acc_t sum = kLowp ? acc_t(0) : static_cast<acc_t>(C[j]);
        for (int64_t s = 0; s < S - kFirst; ++s) {
          sum += partial[s * total + j];
        }
        C[j] = static_cast<scalar_t>(sum);
      }
    });
    return;
  }
  if (loop || ((can_pin || own) && E > 1 && E >= threads)) {
    attnext::parallel_for(0, E, std::max<int64_t>(1, (int64_t(1) << 15) / (macs * std::max<int64_t>(R, 1))),
                     [&](int64_t e0, int64_t e1) {
                       SingleThreadedBlas guard(pin);
                       body(e0, e1);
                     });
  } else {
    body(0, E);  // entries in turn, the BLAS (or attnext's GEMM) threads each GEMM
  }
}

// ---- shapes

struct Plan {
  at::Tensor a, b;        // promoted to >= 2 dims (views), GEMM-readable
  bool a_vec, b_vec;      // a (resp. b) was 1-D
  int64_t nb;             // output batch dims
  int64_t S[kMaxBatchDims];
  int64_t m, k, n;
  std::vector<int64_t> out_shape;  // torch.matmul's, 1-D dims removed
};

void check_operand(const at::Tensor& t, const char* name) {
  check_strided(t, name);
  TORCH_CHECK(t.device().is_cpu(), "attnext: matmul: ", name, " must be a CPU tensor for the CPU kernel, got ",
              t.device());
  TORCH_CHECK(t.dim() >= 1, "attnext: matmul: ", name,
              " must have at least 1 dim (a vector or a (batch of) matrices), got a 0-dim tensor");
  check_floating(t, name);
}

Plan make_plan(const at::Tensor& a_in, const at::Tensor& b_in) {
  check_operand(a_in, "a");
  check_operand(b_in, "b");
  check_same(a_in, "a", b_in, "b");
  Plan p;
  p.a_vec = a_in.dim() == 1;
  p.b_vec = b_in.dim() == 1;
  p.a = p.a_vec ? a_in.unsqueeze(0) : a_in;   // (k) -> (1, k)
  p.b = p.b_vec ? b_in.unsqueeze(-1) : b_in;  // (k) -> (k, 1)
  p.m = p.a.size(-2);
  p.k = p.a.size(-1);
  p.n = p.b.size(-1);
  TORCH_CHECK(p.b.size(-2) == p.k, "attnext: matmul: shapes ", a_in.sizes(), " and ", b_in.sizes(),
              " cannot be multiplied: a's last dim (", p.k, ") must equal b's ",
              p.b_vec ? "only" : "second-to-last", " dim (", p.b.size(-2), ")");
  const int64_t ab = p.a.dim() - 2, bb = p.b.dim() - 2;
  p.nb = std::max(ab, bb);
  TORCH_CHECK(p.nb <= kMaxBatchDims, "attnext: matmul: at most ", kMaxBatchDims, " batch dims are supported, got ",
              p.nb);
  for (int64_t d = 0; d < p.nb; ++d) {
    const int64_t da = d - (p.nb - ab), db = d - (p.nb - bb);
    const int64_t sa = da >= 0 ? p.a.size(da) : 1, sb = db >= 0 ? p.b.size(db) : 1;
    TORCH_CHECK(sa == sb || sa == 1 || sb == 1, "attnext: matmul: batch dims of a ", a_in.sizes(), " and b ",
                b_in.sizes(), " do not broadcast: size ", sa, " vs ", sb, " at batch dim ", d,
                " (counted from the left of the broadcast batch shape)");
    p.S[d] = sa == 1 ? sb : sa;
    p.out_shape.push_back(p.S[d]);
  }
  if (!p.a_vec) p.out_shape.push_back(p.m);
  if (!p.b_vec) p.out_shape.push_back(p.n);
  p.a = gemm_readable(p.a);
  p.b = gemm_readable(p.b);
  return p;
}

// x (..., rows, cols) with unit-stride rows as a (E * rows, cols) view, when its
// batch and row dims collapse into one evenly strided dim.
bool fold_rows(const at::Tensor& x, at::Tensor* out) {
  const int64_t rows = x.size(-2), cols = x.size(-1);
  if (!(cols <= 1 || x.stride(-1) == 1)) {
    return false;
  }
  int64_t sr = x.stride(-2);
  if (rows == 1) {  // the row stride is free: take the innermost real batch stride
    for (int64_t d = x.dim() - 3; d >= 0; --d) {
      if (x.size(d) != 1) {
        sr = x.stride(d);
        break;
      }
    }
  }
  int64_t expected = sr * rows, total = rows;
  for (int64_t d = x.dim() - 3; d >= 0; --d) {
    if (x.size(d) == 1) continue;
    if (x.stride(d) != expected) return false;
    expected *= x.size(d);
    total *= x.size(d);
  }
  if (total > 1 && sr < std::max<int64_t>(1, cols)) {
    return false;
  }
  *out = x.as_strided({total, cols}, {total > 1 ? sr : std::max<int64_t>(1, cols), 1});
  return true;
}

// The last two dims of x as a matrix (x's batch dims all have size 1).
at::Tensor matrix_of(const at::Tensor& x) {
  return x.as_strided({x.size(-2), x.size(-1)}, {x.stride(-2), x.stride(-1)});
}

bool batch_free(const at::Tensor& x) {
  for (int64_t d = 0; d < x.dim() - 2; ++d) {
    if (x.size(d) != 1) return false;
  }
  return true;
}

template <typename scalar_t>
void run_gemm(const at::Tensor& A, bool ta, const at::Tensor& B, bool tb, at::Tensor& C, int64_t nb, const int64_t* S,
              const bool* reduce) {
  const auto a = mat_arg<scalar_t>(A, nb, ta);
  const auto b = mat_arg<scalar_t>(B, nb, tb);
  const int64_t m = ta ? A.size(-1) : A.size(-2), k = ta ? A.size(-2) : A.size(-1);
  const int64_t n = tb ? B.size(-2) : B.size(-1);
  batched_gemm<scalar_t>(nb, S, reduce, a, b, C.mutable_data_ptr<scalar_t>(), m, n, k);
}

}  // namespace

at::Tensor matmul_cpu(const at::Tensor& a_in, const at::Tensor& b_in) {
  Plan p = make_plan(a_in, b_in);
  at::Tensor out = empty_output(p.out_shape, p.a.options());
  if (out.numel() == 0) {
    return out;
  }
  const bool no_reduce[kMaxBatchDims] = {};
  at::Tensor a2;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.a.scalar_type(), "matmul_cpu", [&] {
    if (batch_free(p.b) && fold_rows(p.a, &a2)) {
      // (..., m, k) @ (k, n): one (E * m, k) @ (k, n) GEMM.
      at::Tensor out2 = out.view({a2.size(0), p.n});
      run_gemm<scalar_t>(a2, false, matrix_of(p.b), false, out2, 0, p.S, no_reduce);
    } else {
      run_gemm<scalar_t>(p.a, false, p.b, false, out, p.nb, p.S, no_reduce);
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> matmul_backward_cpu(const at::Tensor& grad_in, const at::Tensor& a_in,
                                                       const at::Tensor& b_in, std::array<bool, 2> output_mask) {
  Plan p = make_plan(a_in, b_in);
  check_strided(grad_in, "grad");
  check_same(grad_in, "grad", a_in, "a");
  TORCH_CHECK(grad_in.sizes() == at::IntArrayRef(p.out_shape), "attnext: matmul backward: grad must have the shape ",
              at::IntArrayRef(p.out_shape), " of matmul(a, b), got ", grad_in.sizes());
  // grad as (..., m, n), like the promoted operands.
  at::Tensor g = grad_in;
  if (p.a_vec) g = g.unsqueeze(p.b_vec ? -1 : -2);
  if (p.b_vec) g = g.unsqueeze(-1);
  g = gemm_readable(g);

  // An unrequested gradient is returned as an empty (0,) tensor.
  if (g.numel() == 0) {  // nothing flows back: the gradients are zeros
    return {output_mask[0] ? at::zeros(a_in.sizes(), a_in.options()) : at::empty({0}, a_in.options()),
            output_mask[1] ? at::zeros(b_in.sizes(), b_in.options()) : at::empty({0}, b_in.options())};
  }
  // Every entry of a requested gradient is written by its first GEMM (beta = 0).
  at::Tensor grad_a = empty_output(output_mask[0] ? a_in.sizes() : at::IntArrayRef{0}, a_in.options());
  at::Tensor grad_b = empty_output(output_mask[1] ? b_in.sizes() : at::IntArrayRef{0}, b_in.options());
  // A destination's dims that its operand was broadcast along are summed over.
  auto reduce_of = [&](const at::Tensor& x, bool* reduce) {
    const int64_t xb = x.dim() - 2;
    for (int64_t d = 0; d < p.nb; ++d) {
      const int64_t dx = d - (p.nb - xb);
      reduce[d] = p.S[d] != 1 && (dx < 0 || x.size(dx) == 1);
    }
  };
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.a.scalar_type(), "matmul_backward_cpu", [&] {
    const bool no_reduce[kMaxBatchDims] = {};
    at::Tensor a2, g2;
    const bool fold = batch_free(p.b) && fold_rows(p.a, &a2) && fold_rows(g, &g2);
    if (output_mask[0]) {
      at::Tensor ga = grad_a.view(p.a.sizes());  // (..., m, k), contiguous
      if (fold) {
        // grad_a (E * m, k) = grad (E * m, n) @ b^T: one GEMM.
        at::Tensor ga2 = ga.view({g2.size(0), p.k});
        run_gemm<scalar_t>(g2, false, matrix_of(p.b), true, ga2, 0, p.S, no_reduce);
      } else {
        bool reduce[kMaxBatchDims];
        reduce_of(p.a, reduce);
        run_gemm<scalar_t>(g, false, p.b, true, ga, p.nb, p.S, reduce);
      }
    }
    if (output_mask[1]) {
      at::Tensor gb = grad_b.view(p.b.sizes());  // (..., k, n), contiguous
      if (fold) {
        // grad_b (k, n) = a^T (k, E * m) @ grad (E * m, n): the batch is the GEMM's reduction.
        at::Tensor gb2 = matrix_of(gb);
        run_gemm<scalar_t>(a2, true, g2, false, gb2, 0, p.S, no_reduce);
      } else {
        bool reduce[kMaxBatchDims];
        reduce_of(p.b, reduce);
        run_gemm<scalar_t>(p.a, true, g, false, gb, p.nb, p.S, reduce);
      }
    }
  });
  return {grad_a, grad_b};
}

TORCH_LIBRARY_IMPL(attnext, CPU, m) {
  m.impl("matmul", &matmul_cpu);
  m.impl("_matmul_backward", &matmul_backward_cpu);
}

}  // namespace attnext
