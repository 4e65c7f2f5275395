// attnext's own float32 GEMM on AVX-512: the register-blocked kernel of
// cpu/gemm_f32.inl, and a cache-blocked, threaded driver around it for operands of
// any size (see cpu/gemm_f32.h for why).
//
// Blocking of the driver, per thread (threads own row blocks of kMc rows):
//   for each column block of kNc columns, each depth block of kKc:
//     B (kKc, kNc): read in place when its rows are unit-stride, else transposed
//       into a per-thread buffer (about 390 KB: it stays in L2);
//     for each of the thread's row blocks: the kernel over (kMc, kNc, kKc), A read in
//       place as broadcast scalars (so a transposed A costs nothing), C accumulating
//       across the depth blocks.
// With K <= kKc (the projections of a transformer) C is written once.
#include "cpu/gemm_f32.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

#include "cpu/blas.h"
#include "cpu/kernel_choice.h"
#include "cpu/parallel.h"
#include "cpu/vec_math.h"

namespace attnext {
namespace {

#if ATTNEXT_X86_SIMD
ATTNEXT_ISA_BEGIN_AVX512
namespace isa_avx512 {
#include "cpu/gemm_f32.inl"
}  // namespace isa_avx512
ATTNEXT_ISA_END
#endif

constexpr int64_t kMc = 96;   // rows per block (16 register blocks of 6)
constexpr int64_t kNc = 256;  // columns per block
constexpr int64_t kKc = 384;  // depth per block: a (kKc, kNc) block of B is 384 KiB

// Row-major C (m, n) = A (m, k) B (k, n) through the column-major BLAS (C^T = B^T A^T).
void blas_sgemm(int m, int n, int k, const float* a, const float* b, float* c) {
  const char t = 'N';
  const float one = 1.0f, zero = 0.0f;
  sgemm_(&t, &t, &n, &m, &k, &one, b, &n, a, &k, &zero, c, &n);
}

// Row-major C (m, n) (+)= A B through the column-major BLAS, A (m, k) at stride lda
// or, with at, A^T stored (k, m); B (k, n), or with bt B^T stored (n, k).
void blas_tile(bool at, bool bt, int m, int n, int k, float alpha, const float* a, int lda, const float* b, int ldb,
               float beta, float* c, int ldc) {
  const char ta = bt ? 'T' : 'N', tb = at ? 'T' : 'N';
  sgemm_(&ta, &tb, &n, &m, &k, &alpha, b, &ldb, a, &lda, &beta, c, &ldc);
}

// Times both GEMMs on a problem of the workload's class (kernel_choice.h).
const KernelChoice& measure(GemmUse use) {
  const int u = static_cast<int>(use);
  const bool prefill = u >= static_cast<int>(GemmUse::kAttentionPrefill64) &&
                       u <= static_cast<int>(GemmUse::kAttentionPrefillLarge);
  const bool fwd = prefill || u <= static_cast<int>(GemmUse::kAttentionForwardLarge);
  const bool bwd = !fwd && u <= static_cast<int>(GemmUse::kAttentionBackwardLarge);
  const bool tiles = fwd || bwd;
  const int first = prefill ? static_cast<int>(GemmUse::kAttentionPrefill64)
                    : bwd   ? static_cast<int>(GemmUse::kAttentionBackward64)
                            : 0;
  const int cls = tiles ? u - first : 0;  // 0: hs <= 64, 1: <= 128, 2: larger
  const int hs = cls == 0 ? 64 : cls == 1 ? 128 : 256;
  const std::string cls_name = cls == 0 ? "head size <= 64" : cls == 1 ? "head size <= 128" : "head size > 128";
  const std::string what = prefill ? "float32 GEMM, attention tiles (forward of few queries against 4x as many keys, " +
                                         cls_name + ")"
                           : fwd ? "float32 GEMM, attention tiles (forward, " + cls_name + ")"
                           : bwd ? "float32 GEMM, attention tiles (backward, " + cls_name + ")"
                                 : "float32 GEMM, matmul";
  const F32Gemm kernel = f32_gemm_kernel();
  if (kernel == nullptr) return fixed_kernel(what, false, "BLAS (the own kernel needs AVX-512, or ATTNEXT_F32_GEMM=0)");
  if (sgemm_ == nullptr) return fixed_kernel(what, true, "own AVX-512 kernel (this torch exports no BLAS)");
  const int forced = kernel_override("ATTNEXT_F32_GEMM");  // 0 was handled by f32_gemm_kernel()
  if (fwd) {
    // a real forward (attention_forward_probe: 8 heads of 256 queries, on every
    // thread, K^T or K's rows as the tiles read them). A synthetic hot 64-row tile
    // against 256 keys, before, chose the BLAS by a few percent on the Intel Xeon,
    // where the own kernel's forward of (64, 6, 256, 64) was 12% faster (T = 1024 and
    // 2048 the same either way).
    return choose_kernel(what, "own AVX-512 kernel", "BLAS", attention_forward_probe(hs, true, prefill),
                         attention_forward_probe(hs, false, prefill), forced == 1 ? 1 : -1);
  }
  // backward: one thread's five products of a 256-row block against a 64-key tile (S = Q K^T,
  // dV += P^T dO, dP = dO V^T, dQ += dS K, dK += dS^T Q); matmul: a projection-like
  // 192 x 768 x 192, threaded as matmul threads it. m x n: the scores' shape; k: the
  // head size.
  const int m = bwd ? 256 : 192, n = bwd ? 64 : 768, k = tiles ? hs : 192;
  const int reps = bwd ? 4 : 1;
  auto a = std::make_shared<std::vector<float>>(size_t(m) * k);     // Q, dO (m, k)
  auto b = std::make_shared<std::vector<float>>(size_t(k) * n);     // K, V (n, k) or B (k, n)
  auto c = std::make_shared<std::vector<float>>(size_t(m) * n);     // S, P, dP (m, n)
  auto bt = std::make_shared<std::vector<float>>(size_t(k) * n);    // K^T, V^T (k, n)
  auto acc = std::make_shared<std::vector<float>>(size_t(m) * k);   // O, dQ (m, k)
  auto acc2 = std::make_shared<std::vector<float>>(size_t(n) * k);  // dK, dV (n, k)
  for (size_t i = 0; i < a->size(); ++i) (*a)[i] = float((i * 7) % 13) * 0.1f - 0.6f;
  for (size_t i = 0; i < b->size(); ++i) (*b)[i] = (*bt)[i] = float((i * 5) % 11) * 0.1f - 0.5f;
  for (size_t i = 0; i < c->size(); ++i) (*c)[i] = float((i * 3) % 7) * 0.01f;
  auto own = [=] {
    for (int r = 0; r < reps; ++r) {
      if (bwd) {
        kernel(m, n, k, a->data(), k, 1, bt->data(), n, c->data(), n, 0.125f, false);  // S
        kernel(n, k, m, c->data(), 1, n, a->data(), k, acc2->data(), k, 1.0f, true);   // dV
        kernel(m, n, k, a->data(), k, 1, bt->data(), n, c->data(), n, 1.0f, false);    // dP
        kernel(m, k, n, c->data(), n, 1, b->data(), k, acc->data(), k, 1.0f, true);    // dQ
        kernel(n, k, m, c->data(), 1, n, a->data(), k, acc2->data(), k, 1.0f, true);   // dK
      } else {
        f32_gemm_blocked(m, n, k, a->data(), k, 1, b->data(), n, 1, c->data(), n, false);
      }
    }
  };
  auto blas = [=] {
    const SingleThreadedBlas one_thread(tiles);  // the tiles run inside the kernel's own threads
    for (int r = 0; r < reps; ++r) {
      if (!tiles) {
        blas_sgemm(m, n, k, a->data(), b->data(), c->data());
      } else {
        blas_tile(false, true, m, n, k, 0.125f, a->data(), k, b->data(), k, 0.0f, c->data(), n);   // S
        blas_tile(true, false, n, k, m, 1.0f, c->data(), n, a->data(), k, 1.0f, acc2->data(), k);  // dV
        blas_tile(false, true, m, n, k, 1.0f, a->data(), k, b->data(), k, 0.0f, c->data(), n);     // dP
        blas_tile(false, false, m, k, n, 1.0f, c->data(), n, b->data(), k, 1.0f, acc->data(), k);  // dQ
        blas_tile(true, false, n, k, m, 1.0f, c->data(), n, a->data(), k, 1.0f, acc2->data(), k);  // dK
      }
    }
  };
  return choose_kernel(what, "own AVX-512 kernel", "BLAS", own, blas, forced == 1 ? 1 : -1);
}

}  // namespace

const GemmChoice& f32_gemm_choice(GemmUse use) {
  static GemmChoice choices[static_cast<int>(GemmUse::kCount)];
  static std::once_flag once[static_cast<int>(GemmUse::kCount)];
  const int i = static_cast<int>(use);
  std::call_once(once[i], [&] {
    const KernelChoice& kc = measure(use);
    choices[i] = GemmChoice{kc.own, kc.why};
  });
  return choices[i];
}

GemmUse attention_gemm_use(bool backward, int64_t hs, bool prefill) {
  const int cls = hs <= 64 ? 0 : hs <= 128 ? 1 : 2;
  const GemmUse first = backward  ? GemmUse::kAttentionBackward64
                        : prefill ? GemmUse::kAttentionPrefill64
                                  : GemmUse::kAttentionForward64;
  return static_cast<GemmUse>(static_cast<int>(first) + cls);
}

F32Gemm f32_gemm_for(GemmUse use) { return f32_gemm_choice(use).own ? f32_gemm_kernel() : nullptr; }

namespace {

// Every verdict so far, after forcing the GEMM ones (so the list is never empty).
std::vector<std::string> all_kernel_choices() {
  f32_gemm_choice(GemmUse::kAttentionForward64);
  f32_gemm_choice(GemmUse::kAttentionBackward64);
  f32_gemm_choice(GemmUse::kMatmul);
  return kernel_choices();
}

}  // namespace

F32Gemm f32_gemm_kernel() {
  static const F32Gemm fn = []() -> F32Gemm {
#if ATTNEXT_X86_SIMD
    const char* env = std::getenv("ATTNEXT_F32_GEMM");
    if (env != nullptr && std::strcmp(env, "0") == 0) return nullptr;
    if (simd::detected_isa() == simd::Isa::kAvx512) return &isa_avx512::gemm_f32;
#endif
    return nullptr;
  }();
  return fn;
}

F32Transpose f32_transpose_kernel() {
  static const F32Transpose fn = []() -> F32Transpose {
#if ATTNEXT_X86_SIMD
    if (simd::detected_isa() == simd::Isa::kAvx512) return &isa_avx512::transpose_f32;
#endif
    return nullptr;
  }();
  return fn;
}

void f32_gemm_blocked(int64_t m, int64_t n, int64_t k, const float* a, int64_t sa_i, int64_t sa_p, const float* b,
                      int64_t sb_p, int64_t sb_j, float* c, int64_t ldc, bool accumulate) {
  const F32Gemm kernel = f32_gemm_kernel();
  TORCH_INTERNAL_ASSERT(kernel != nullptr, "attnext: f32_gemm_blocked needs the AVX-512 kernel");
  if (m <= 0 || n <= 0) return;
  if (k == 0) {
    if (!accumulate) {
      for (int64_t i = 0; i < m; ++i) std::fill(c + i * ldc, c + i * ldc + n, 0.0f);
    }
    return;
  }
  const bool b_rows = sb_j == 1 || n == 1;  // B's rows unit-stride: read in place
  const int64_t nblocks = (m + kMc - 1) / kMc;
  // enough work per task that a thread is worth starting: about 2^22 multiply-adds
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 22) / std::max<int64_t>(1, kMc * n * k));
  attnext::parallel_for(0, nblocks, grain, [&](int64_t blk0, int64_t blk1) {
    std::vector<float> packed(b_rows ? 0 : kKc * kNc);
    for (int64_t j0 = 0; j0 < n; j0 += kNc) {
      const int64_t nc = std::min(kNc, n - j0);
      for (int64_t p0 = 0; p0 < k; p0 += kKc) {
        const int64_t kc = std::min(kKc, k - p0);
        const float* bp = b + p0 * sb_p + j0 * sb_j;
        int64_t ldb = sb_p;
        if (!b_rows) {  // B (kc, nc) with unit-stride columns: transpose it in 16 x 16 blocks
          for (int64_t jj = 0; jj < nc; jj += 16) {
            for (int64_t pp = 0; pp < kc; pp += 16) {
              for (int64_t j = jj; j < std::min(nc, jj + 16); ++j) {
                const float* src = bp + j * sb_j;
                for (int64_t p = pp; p < std::min(kc, pp + 16); ++p) packed[p * nc + j] = src[p * sb_p];
              }
            }
          }
          bp = packed.data();
          ldb = nc;
        }
        const bool acc = accumulate || p0 > 0;
        for (int64_t blk = blk0; blk < blk1; ++blk) {
          const int64_t i0 = blk * kMc, mr = std::min(kMc, m - i0);
          kernel(mr, nc, kc, a + i0 * sa_i + p0 * sa_p, sa_i, sa_p, bp, ldb, c + i0 * ldc + j0, ldc, 1.0f, acc);
        }
      }
    }
  });
}

}  // namespace attnext

TORCH_LIBRARY_FRAGMENT(attnext, m) {
  // Which kernel each workload class runs on this CPU (attnext's or a library's), and why.
  m.def("_kernel_choices() -> str[]", &attnext::all_kernel_choices);
}
