// Causal masked softmax on the CPU, forward and backward.
//
// Forward, per row t of each (T, S) matrix: only the visible prefix x[0:L]
// (L = t + 1, or t + 1 + S - T bottom-right) is read from memory, once; then
//   m = max(x * scale), e = exp(x * scale - m), y = e / sum(e), y[L:S] = 0
// in three tight loops over the (L1/L2-resident) row. Backward likewise:
//   dx = scale * y * (dy - sum(dy * y)) on [0, L), 0 on [L, S).
// Accumulation is in float (double for double); bfloat16/float16 rows are
// widened into a per-thread float buffer and rounded once on the way out.
// A row that sees no key (bottom-right, T > S) is all zeros. A row whose sum
// is NaN (NaN or +-inf in its visible part) is NaN throughout, as in torch.
//
// Parallelism: at::parallel_for over rows. Row lengths grow with t, so rows
// are visited in a zigzag order (0, T-1, 1, T-2, ...) within each matrix: any
// contiguous chunk of the iteration space then holds about the same work.
// SIMD: the float row loops exist per instruction set (AVX-512, AVX2, NEON, scalar)
// and are chosen at run time; the dtype conversions are multiversioned
// (see vec_math.h). Nothing is compiled with a global -mavx.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <vector>

#include "common.h"
#include "cpu/parallel.h"
#include "cpu/vec_math.h"
#include "ops.h"

namespace attnext {
namespace {

// ---- float row kernels, one copy per instruction set (cpu/causal_softmax_rows.inl)
#if ATTNEXT_X86_SIMD
ATTNEXT_ISA_BEGIN_AVX512
namespace isa_avx512 {
#include "cpu/simd_avx512.inl"
#include "cpu/causal_softmax_rows.inl"
}  // namespace isa_avx512
ATTNEXT_ISA_END
ATTNEXT_ISA_BEGIN_AVX2
namespace isa_avx2 {
#include "cpu/simd_avx2.inl"
#include "cpu/causal_softmax_rows.inl"
}  // namespace isa_avx2
ATTNEXT_ISA_END
#endif
#if ATTNEXT_ARM_NEON
namespace isa_neon {
#include "cpu/simd_neon.inl"
#include "cpu/causal_softmax_rows.inl"
}  // namespace isa_neon
#endif
namespace isa_scalar {
#include "cpu/simd_scalar.inl"
#include "cpu/causal_softmax_rows.inl"
}  // namespace isa_scalar

using FwdRowF32 = void (*)(const float*, float*, int64_t, int64_t, float, float*);
using BwdRowF32 = void (*)(const float*, const float*, float*, int64_t, int64_t, float, bool);

struct RowKernels {
  FwdRowF32 fwd;
  BwdRowF32 bwd;
};

const RowKernels& row_kernels() {
  static const RowKernels k = [] {
    switch (simd::detected_isa()) {
#if ATTNEXT_X86_SIMD
      case simd::Isa::kAvx512:
        return RowKernels{&isa_avx512::fwd_row_f32, &isa_avx512::bwd_row_f32};
      case simd::Isa::kAvx2:
        return RowKernels{&isa_avx2::fwd_row_f32, &isa_avx2::bwd_row_f32};
#endif
#if ATTNEXT_ARM_NEON
      case simd::Isa::kNeon:
        return RowKernels{&isa_neon::fwd_row_f32, &isa_neon::bwd_row_f32};
#endif
      default:
        return RowKernels{&isa_scalar::fwd_row_f32, &isa_scalar::bwd_row_f32};
    }
  }();
  return k;
}

// The double rows: plain loops, std::exp (double is for checking, not speed).
inline void fwd_row_f64(const double* x, double* y, int64_t L, int64_t S, double scale) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < L; ++j) {
    const double z = x[j] * scale;
    m = z > m ? z : m;  // NaN is skipped here and propagates through the sum below
  }
  double sum = 0;
  for (int64_t j = 0; j < L; ++j) {
    y[j] = std::exp(x[j] * scale - m);
    sum += y[j];
  }
  if (sum != sum) {
    std::fill(y, y + S, std::numeric_limits<double>::quiet_NaN());
    return;
  }
  const double inv = 1.0 / sum;
  for (int64_t j = 0; j < L; ++j) {
    y[j] *= inv;
  }
  std::fill(y + L, y + S, 0.0);
}

inline void bwd_row_f64(const double* dy, const double* y, double* dx, int64_t L, int64_t S, double scale) {
  double dot = 0;
  for (int64_t j = 0; j < L; ++j) {
    dot += dy[j] * y[j];
  }
  for (int64_t j = 0; j < L; ++j) {
    dx[j] = scale * y[j] * (dy[j] - dot);
  }
  std::fill(dx + L, dx + S, 0.0);
}

ATTNEXT_MULTIVERSION void widen_bf16(const uint16_t* src, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    dst[j] = vec::bf16_to_float(src[j]);
  }
}

ATTNEXT_MULTIVERSION void narrow_bf16(const float* src, uint16_t* dst, int64_t n, int64_t total, uint16_t fill) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    dst[j] = vec::float_to_bf16(src[j]);
  }
  std::fill(dst + n, dst + total, fill);
}

// Row adapters: how a row of each dtype reaches the float/double row kernels.
template <typename scalar_t>
struct Rows;

// stream: the output is far larger than the cache (see write_row); only the
// float rows act on it.
template <>
struct Rows<double> {
  static constexpr int64_t kBuffers = 0;
  static void fwd(const double* x, double* y, int64_t L, int64_t S, double scale, double*, bool) {
    fwd_row_f64(x, y, L, S, scale);
  }
  static void bwd(const double* dy, const double* y, double* dx, int64_t L, int64_t S, double scale, double*,
                  bool) {
    bwd_row_f64(dy, y, dx, L, S, scale);
  }
};

template <>
struct Rows<float> {
  static constexpr int64_t kBuffers = 1;
  static void fwd(const float* x, float* y, int64_t L, int64_t S, float scale, float* buf, bool stream) {
    row_kernels().fwd(x, y, L, S, scale, stream ? buf : nullptr);
  }
  static void bwd(const float* dy, const float* y, float* dx, int64_t L, int64_t S, float scale, float*,
                  bool stream) {
    row_kernels().bwd(dy, y, dx, L, S, scale, stream);
  }
};

// Reduced precision: widen the visible prefix into float buffers, run the float
// row kernel in place, round once on the way out.
template <typename half_t, typename Widen, typename Narrow>
struct ReducedRows {
  static constexpr int64_t kBuffers = 2;
  static void fwd(const half_t* x, half_t* y, int64_t L, int64_t S, float scale, float* buf, bool) {
    Widen::run(x, buf, L);
    row_kernels().fwd(buf, buf, L, L, scale, nullptr);
    // A NaN row (see fwd_row_f32) is NaN in its masked part too.
    Narrow::run(buf, y, L, S, L > 0 && buf[0] != buf[0]);
  }
  static void bwd(const half_t* dy, const half_t* y, half_t* dx, int64_t L, int64_t S, float scale, float* buf,
                  bool) {
    float* dyf = buf;
    float* yf = buf + S;
    Widen::run(dy, dyf, L);
    Widen::run(y, yf, L);
    row_kernels().bwd(dyf, yf, dyf, L, L, scale, false);
    Narrow::run(dyf, dx, L, S, false);
  }
};

struct WidenBF16 {
  static void run(const at::BFloat16* s, float* d, int64_t n) {
    widen_bf16(reinterpret_cast<const uint16_t*>(s), d, n);
  }
};
struct NarrowBF16 {
  // Rounds s[0:n] into d[0:n] and fills d[n:total] with 0 (or NaN if nan_rest).
  static void run(const float* s, at::BFloat16* d, int64_t n, int64_t total, bool nan_rest) {
    narrow_bf16(s, reinterpret_cast<uint16_t*>(d), n, total, nan_rest ? uint16_t(0x7fc0) : uint16_t(0));
  }
};
struct WidenHalf {
  static void run(const at::Half* s, float* d, int64_t n) {
    for (int64_t j = 0; j < n; ++j) d[j] = static_cast<float>(s[j]);
  }
};
struct NarrowHalf {
  static void run(const float* s, at::Half* d, int64_t n, int64_t total, bool nan_rest) {
    for (int64_t j = 0; j < n; ++j) d[j] = static_cast<at::Half>(s[j]);
    std::fill(d + n, d + total, at::Half(nan_rest ? std::numeric_limits<float>::quiet_NaN() : 0.0f));
  }
};

template <>
struct Rows<at::BFloat16> : ReducedRows<at::BFloat16, WidenBF16, NarrowBF16> {};
template <>
struct Rows<at::Half> : ReducedRows<at::Half, WidenHalf, NarrowHalf> {};

// How far ahead RowPrefetcher looks, in cache lines per tensor, by row length:
// short rows need the next several rows in flight, long rows are streamed by the
// hardware prefetcher once started and extra software prefetches only compete
// with it. Measured on the dev VM (float32 forward, 16 to 96 lines tried):
// 1 KiB rows (S = 256) best at 64 lines, 2 KiB at 48, 4 KiB at 32 (64 was 25%
// slower there), 8 KiB indifferent.
inline int64_t lines_ahead(int64_t row_bytes) { return row_bytes <= 1024 ? 64 : row_bytes <= 2048 ? 48 : 32; }

// Row u of the zigzag order -> row index t: 0, T-1, 1, T-2, ...
inline int64_t zigzag(int64_t u, int64_t T) { return (u & 1) ? T - 1 - (u >> 1) : (u >> 1); }

inline int64_t grain_rows(int64_t S) { return std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(S, 1)); }

// Walks the iteration space k = b * T + u (matrix b, zigzag position u) one row
// at a time, keeping each of K tensors' offset of matrix b, so that a row costs
// no integer division.
template <int K>
struct ZigzagCursor {
  const RowIndexer* idx[K];
  int64_t T, b, u;
  int64_t base[K];

  ZigzagCursor(std::initializer_list<const RowIndexer*> rs, int64_t T_, int64_t k) : T(T_), b(k / T_), u(k % T_) {
    std::copy(rs.begin(), rs.end(), idx);
    rebase();
  }
  int64_t t() const { return zigzag(u, T); }
  int64_t row() const { return b * T + t(); }  // in a contiguous (..., T, S) tensor
  int64_t offset(int i) const { return base[i] + t() * idx[i]->stride_t; }
  void next() {
    if (++u == T) {
      u = 0;
      ++b;
      rebase();
    }
  }

 private:
  void rebase() {
    for (int i = 0; i < K; ++i) base[i] = idx[i]->batch_offset(b);
  }
};

// Software prefetch of the visible prefixes of the rows to come, a fixed
// distance ahead in the stream of bytes the kernel reads: rows are short and,
// in zigzag order, not adjacent, so the hardware prefetcher alone leaves the
// first pass over each row waiting on memory. Issuing per row as many lines as
// that row reads keeps the distance (and the misses in flight) constant
// whatever the row length.
template <int K, typename scalar_t>
class RowPrefetcher {
 public:
  RowPrefetcher(std::initializer_list<const RowIndexer*> rs, std::initializer_list<const scalar_t*> ptrs, int64_t T,
                int64_t S, bool bottom_right, int64_t begin, int64_t end)
      : cur_(rs, T, begin), k_(begin), end_(end), T_(T), S_(S), bottom_right_(bottom_right) {
    std::copy(ptrs.begin(), ptrs.end(), ptr_);
  }

  // Prefetches the next `lines` cache lines of each tensor's stream.
  void advance(int64_t lines) {
    while (lines > 0 && k_ < end_) {
      const int64_t row_lines = lines_of(ptr_[0] + cur_.offset(0), visible_len(cur_.t(), T_, S_, bottom_right_));
      const int64_t n = std::min(lines, row_lines - line_);
      for (int i = 0; i < K; ++i) {
        const char* line0 = reinterpret_cast<const char*>(
            reinterpret_cast<uintptr_t>(ptr_[i] + cur_.offset(i)) & ~uintptr_t(63));
        for (int64_t l = line_; l < line_ + n; ++l) {
          __builtin_prefetch(line0 + l * 64, 0, 3);
        }
      }
      line_ += n;
      lines -= n;
      if (line_ >= row_lines) {
        line_ = 0;
        cur_.next();
        ++k_;
      }
    }
  }

  // The cache lines that `len` elements from p touch: what advance() counts
  // for a row of tensor 0, so the caller keeps the distance constant by
  // advancing, per row it computes, by that row's lines.
  static int64_t lines_of(const scalar_t* p, int64_t len) {
    if (len <= 0) {
      return 0;
    }
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    return static_cast<int64_t>((a + static_cast<uintptr_t>(len) * sizeof(scalar_t) - 1) / 64 - a / 64 + 1);
  }

 private:
  ZigzagCursor<K> cur_;
  const scalar_t* ptr_[K];
  int64_t k_, end_, T_, S_;
  bool bottom_right_;
  int64_t line_ = 0;
};

template <typename scalar_t>
void fwd_impl(const at::Tensor& x, at::Tensor& y, double scale, bool bottom_right) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = x.size(-2), S = x.size(-1);
  const int64_t rows = x.numel() / S;
  const RowIndexer xr(x);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* yp = y.mutable_data_ptr<scalar_t>();
  const bool stream = static_cast<int64_t>(y.nbytes()) >= simd::stream_threshold_bytes();
  attnext::parallel_for(0, rows, grain_rows(S), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(Rows<scalar_t>::kBuffers * S);
    ZigzagCursor<1> cur({&xr}, T, begin);
    RowPrefetcher<1, scalar_t> pf({&xr}, {xp}, T, S, bottom_right, begin, end);
    pf.advance(lines_ahead(S * static_cast<int64_t>(sizeof(scalar_t))));
    for (int64_t k = begin; k < end; ++k, cur.next()) {
      const int64_t L = visible_len(cur.t(), T, S, bottom_right);
      pf.advance(RowPrefetcher<1, scalar_t>::lines_of(xp + cur.offset(0), L));
      Rows<scalar_t>::fwd(xp + cur.offset(0), yp + cur.row() * S, L, S, static_cast<acc_t>(scale), buf.data(),
                          stream);
    }
    simd::stream_fence();
  });
}

template <typename scalar_t>
void bwd_impl(const at::Tensor& dy, const at::Tensor& y, at::Tensor& dx, double scale, bool bottom_right) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = y.size(-2), S = y.size(-1);
  const int64_t rows = y.numel() / S;
  const RowIndexer dyr(dy), yr(y);
  const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
  const scalar_t* yp = y.const_data_ptr<scalar_t>();
  scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
  const bool stream = static_cast<int64_t>(dx.nbytes()) >= simd::stream_threshold_bytes();
  attnext::parallel_for(0, rows, grain_rows(S), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(Rows<scalar_t>::kBuffers * S);
    ZigzagCursor<2> cur({&dyr, &yr}, T, begin);
    RowPrefetcher<2, scalar_t> pf({&dyr, &yr}, {dyp, yp}, T, S, bottom_right, begin, end);
    pf.advance(lines_ahead(S * static_cast<int64_t>(sizeof(scalar_t))));
    for (int64_t k = begin; k < end; ++k, cur.next()) {
      const int64_t L = visible_len(cur.t(), T, S, bottom_right);
      pf.advance(RowPrefetcher<2, scalar_t>::lines_of(dyp + cur.offset(0), L));
      Rows<scalar_t>::bwd(dyp + cur.offset(0), yp + cur.offset(1), dxp + cur.row() * S,
                          L, S, static_cast<acc_t>(scale), buf.data(), stream);
    }
    simd::stream_fence();
  });
}

void check_input(const at::Tensor& t, const char* name) {
  check_strided(t, name);
  TORCH_CHECK(t.device().is_cpu(), "attnext: ", name, " must be a CPU tensor for the CPU kernel, got ", t.device());
  check_floating(t, name);
  check_min_dim(t, 2, name, "(..., T, S)");
}

}  // namespace

at::Tensor causal_softmax_cpu(const at::Tensor& x_in, double scale, bool bottom_right) {
  check_input(x_in, "x");
  check_scale(scale);
  const at::Tensor x = unit_stride_rows(x_in);
  at::Tensor y = empty_output(x.sizes(), x.options());
  if (y.numel() == 0) {
    return y;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "causal_softmax_cpu",
                                  [&] { fwd_impl<scalar_t>(x, y, scale, bottom_right); });
  return y;
}

at::Tensor causal_softmax_backward_cpu(const at::Tensor& grad_y_in, const at::Tensor& y_in, double scale,
                                       bool bottom_right) {
  check_input(grad_y_in, "grad_y");
  check_input(y_in, "y");
  check_same(grad_y_in, "grad_y", y_in, "y");
  TORCH_CHECK(grad_y_in.sizes() == y_in.sizes(), "attnext: grad_y must have the shape of y ", y_in.sizes(),
              ", got ", grad_y_in.sizes());
  check_scale(scale);
  const at::Tensor dy = unit_stride_rows(grad_y_in);
  const at::Tensor y = unit_stride_rows(y_in);
  at::Tensor dx = empty_output(y.sizes(), y.options());
  if (dx.numel() == 0) {
    return dx;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "causal_softmax_backward_cpu",
                                  [&] { bwd_impl<scalar_t>(dy, y, dx, scale, bottom_right); });
  return dx;
}

TORCH_LIBRARY_IMPL(attnext, CPU, m) {
  m.impl("causal_softmax", &causal_softmax_cpu);
  m.impl("_causal_softmax_backward", &causal_softmax_backward_cpu);
}

}  // namespace attnext
