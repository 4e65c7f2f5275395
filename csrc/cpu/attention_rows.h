// Pieces the CPU attention passes share (causal_attention.cpp: the training
// forward and backward; causal_attention_decode.cpp: decoding with a KV cache):
// work distribution, strided row access, tiles widened to the compute type, and
// the online softmax's row bookkeeping. Included into each pass's anonymous
// namespace (internal linkage in every file that includes it).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include "common.h"
#include "cpu/blas.h"
#include "cpu/parallel.h"
#include "cpu/vec_math.h"

namespace attnext {
namespace {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Runs body(state, item) for every item in [0, n) on torch's intra-op threads,
// each thread taking the next item from a shared counter; make_state() builds
// one thread's scratch buffers once.
template <typename MakeState, typename Body>
void parallel_items(int64_t n, MakeState make_state, Body body) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  attnext::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    const SingleThreadedBlas single_threaded_blas;
    auto state = make_state();
    for (int64_t item = next.fetch_add(1, std::memory_order_relaxed); item < n;
         item = next.fetch_add(1, std::memory_order_relaxed)) {
      body(state, item);
    }
  });
}

// A prefetch of the line at p towards L2. An asm statement, not __builtin_prefetch:
// GCC 12 deletes a loop whose body is only __builtin_prefetch once it knows the
// loop ends (prefetch_rows with a constant row count compiled to nothing).
inline void prefetch_l2(const char* p) {
#if defined(__GNUC__) && defined(__x86_64__)
  asm volatile("prefetcht1 %0" : : "m"(*p));
#elif defined(__GNUC__) && defined(__aarch64__)
  asm volatile("prfm pldl2keep, %0" : : "Q"(*p));
#else
  __builtin_prefetch(p, 0, 2);
#endif
}

// Prefetches rows [0, rows) of cols elements at p (row stride ld) towards L2: the
// hardware prefetcher follows one long stream, not short rows a page apart (the
// packed (..., T, 3, nh, hs) layout).
template <typename T>
inline void prefetch_rows(const T* p, int64_t ld, int64_t rows, int64_t cols) {
  const int64_t bytes = cols * static_cast<int64_t>(sizeof(T));
  for (int64_t r = 0; r < rows; ++r) {
    const char* row = reinterpret_cast<const char*>(p + r * ld);
    for (int64_t c = 0; c < bytes; c += 64) prefetch_l2(row + c);
  }
}

// A (.., rows, d) tensor as the kernels read it: per-batch offsets + row stride.
template <typename T>
struct Rows2D {
  const T* base;
  RowIndexer idx;
  int64_t ld;
  explicit Rows2D(const at::Tensor& t)
      : base(t.const_data_ptr<T>()), idx(t), ld(std::max<int64_t>(t.stride(-2), std::max<int64_t>(t.size(-1), 1))) {}
  const T* at(int64_t b, int64_t row) const { return base + idx.offset(b, row); }
};

// An output (.., rows, d) as the kernels write it: a contiguous tensor or a view
// with unit-stride rows (the packed op's (..., T, nh, hs) outputs seen as
// (..., nh, T, hs)).
template <typename T>
struct OutRows {
  T* base;
  RowIndexer idx;
  int64_t ld;
  explicit OutRows(at::Tensor& t)
      : base(t.mutable_data_ptr<T>()), idx(t), ld(std::max<int64_t>(t.stride(-2), std::max<int64_t>(t.size(-1), 1))) {}
  T* at(int64_t b, int64_t row) const { return base + idx.offset(b, row); }
};

// ---- tiles of the inputs as the compute type T (float for bfloat16)

ATTNEXT_MULTIVERSION void widen_bf16_row(const uint16_t* src, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dst[j] = vec::bf16_to_float(src[j]);
}

ATTNEXT_MULTIVERSION void narrow_bf16_row(const float* src, uint16_t* dst, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dst[j] = vec::float_to_bf16(src[j]);
}

// A row-major block as the gemm reads it.
template <typename T>
struct Block {
  const T* p;
  int64_t ld;
};

// (rows, cols) of an input at src (row stride ld) as T: the input itself when it
// already is T, else widened into buf (row stride cols).
template <typename T, typename in_t>
Block<T> load_block(const in_t* src, int64_t ld, int64_t rows, int64_t cols, T* buf) {
  if constexpr (std::is_same<T, in_t>::value) {
    return {src, ld};
  } else {
    static_assert(std::is_same<in_t, at::BFloat16>::value && std::is_same<T, float>::value, "bfloat16 -> float only");
    for (int64_t r = 0; r < rows; ++r) {
      widen_bf16_row(reinterpret_cast<const uint16_t*>(src + r * ld), buf + r * cols, cols);
    }
    return {buf, std::max<int64_t>(cols, 1)};
  }
}

// (rows, cols) of an input at src (row stride ld) as T, always copied into buf (row
// stride cols): the float backward reads strided rows it reuses (a view inside a
// packed projection, rows 3 * nh * hs apart) through compact copies. Rows
// kCopyAhead ahead are prefetched: one short row per page defeats the hardware
// prefetcher, and the copy would wait on every row.
template <typename T, typename in_t>
Block<T> load_compact(const in_t* src, int64_t ld, int64_t rows, int64_t cols, T* buf) {
  if constexpr (std::is_same<T, in_t>::value) {
    constexpr int64_t kCopyAhead = 8;
    const int64_t bytes = cols * static_cast<int64_t>(sizeof(T));
    auto fetch = [&](int64_t r) {
      const char* row = reinterpret_cast<const char*>(src + r * ld);
      for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(row + b);
    };
    for (int64_t r = 0; r < std::min(kCopyAhead, rows); ++r) fetch(r);
    for (int64_t r = 0; r < rows; ++r) {
      if (r + kCopyAhead < rows) fetch(r + kCopyAhead);
      std::memcpy(buf + r * cols, src + r * ld, sizeof(T) * cols);
    }
    return {buf, std::max<int64_t>(cols, 1)};
  } else {
    return load_block(src, ld, rows, cols, buf);
  }
}

// (rows, cols) of T at src (row stride lds) into out_t at dst (row stride ldd), rounded once.
template <typename T, typename out_t>
void store_block(const T* src, int64_t lds, int64_t rows, int64_t cols, out_t* dst, int64_t ldd) {
  if constexpr (std::is_same<T, out_t>::value) {
    for (int64_t r = 0; r < rows; ++r) std::memcpy(dst + r * ldd, src + r * lds, sizeof(T) * cols);
  } else {
    for (int64_t r = 0; r < rows; ++r) {
      narrow_bf16_row(src + r * lds, reinterpret_cast<uint16_t*>(dst + r * ldd), cols);
    }
  }
}

// The end of a forward query tile (O: nr rows of hsv, row stride ldo): O /= l per
// row and lse = m + log(l). A row that sees no key at all (none(r): bottom-right with
// T > S, outside its window, or S == 0) is O = 0, lse = -inf. A row that saw keys
// whose scores were all -inf (l = 0) is NaN, as torch.softmax of it is; NaN from the
// inputs propagates as in torch.softmax.
template <typename T, typename SeesNone>
void finish_rows(T* o, int64_t nr, int64_t hsv, int64_t ldo, const T* m, const T* l, T* lse_rows, SeesNone none) {
  for (int64_t r = 0; r < nr; ++r) {
    T* orow = o + r * ldo;
    if (none(r)) {
      for (int64_t c = 0; c < hsv; ++c) orow[c] = T(0);
      lse_rows[r] = -std::numeric_limits<T>::infinity();
    } else if (l[r] != T(0)) {
      const T inv = T(1) / l[r];
      for (int64_t c = 0; c < hsv; ++c) orow[c] *= inv;
      lse_rows[r] = m[r] + std::log(l[r]);
    } else {
      for (int64_t c = 0; c < hsv; ++c) orow[c] = std::numeric_limits<T>::quiet_NaN();
      lse_rows[r] = std::numeric_limits<T>::quiet_NaN();
    }
  }
}

// Scores of keys left of each row's window become -inf (so their weight is 0): in a
// tile whose column 0 is key k0, row r (query t0 + r) sees columns from
// first(t0 + r) - k0 on. Nothing to do for windows unbounded on the left.
template <typename T>
void mask_window_start(T* s, int64_t nr, int64_t ld, const AttnGeometry& g, int64_t t0, int64_t k0,
                       const int64_t* vis) {
  if (g.wl < 0) return;
  for (int64_t r = 0; r < nr; ++r) {
    const int64_t lo = std::min(std::max<int64_t>(g.first(t0 + r) - k0, 0), vis[r]);
    std::fill(s + r * ld, s + r * ld + lo, -std::numeric_limits<T>::infinity());
  }
}

// The first key tile (of width tile) a query tile [t0, t0 + nr) needs: its first row
// has the leftmost window.
inline int64_t first_key_tile(const AttnGeometry& g, int64_t t0, int64_t tile) { return g.first(t0) / tile * tile; }

// O row r (row stride ldo) *= alpha[r] (the online softmax's rescale when the row max grew).
template <typename T>
void rescale_rows(T* o, int64_t nr, int64_t hsv, int64_t ldo, const T* alpha) {
  for (int64_t r = 0; r < nr; ++r) {
    const T a = alpha[r];
    if (a != T(1)) {
      T* orow = o + r * ldo;
      for (int64_t c = 0; c < hsv; ++c) orow[c] *= a;
    }
  }
}

}  // namespace
}  // namespace attnext
