// Shared argument checks and helpers for attnext's host code (CPU and CUDA).
// Every caller-facing check names the argument and says what was expected.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <array>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>

#include "batch_offset.h"

namespace attnext {

inline void check_floating(const at::Tensor& t, const char* name) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf,
              "attnext: ", name, " must be a floating-point tensor (float32, float64, bfloat16 or float16), got ",
              st);
}

inline void check_strided(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.layout() == at::kStrided, "attnext: ", name, " must be a dense (strided) tensor, got layout ",
              t.layout());
}

inline void check_min_dim(const at::Tensor& t, int64_t n, const char* name, const char* shape) {
  TORCH_CHECK(t.dim() >= n, "attnext: ", name, " must have at least ", n, " dims ", shape, ", got shape ",
              t.sizes());
}

inline void check_same(const at::Tensor& a, const char* an, const at::Tensor& b, const char* bn) {
  TORCH_CHECK(a.device() == b.device(), "attnext: ", an, " and ", bn, " must be on the same device, got ",
              a.device(), " and ", b.device());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "attnext: ", an, " and ", bn,
              " must have the same dtype, got ", a.scalar_type(), " and ", b.scalar_type());
}

inline void check_scale(double scale) {
  TORCH_CHECK_VALUE(std::isfinite(scale), "attnext: scale must be a finite number, got ", scale);
}

// The geometry of a causal_attention call: BH flattened batch dims, T queries,
// S keys, head sizes hs (q, k) and hsv (v); row t sees keys [first(t), visible(t)):
// those of its window around its diagonal key t + shift (wl keys left of it, wr
// right of it, -1 unbounded). The default window (-1, 0) is causal: [0, t + 1 + shift).
struct AttnGeometry {
  int64_t BH, T, S, hs, hsv;
  int64_t shift;  // row t's diagonal key: t + shift
  int64_t wl = -1, wr = 0;
  static int64_t clamp(int64_t v, int64_t S) { return v < 0 ? 0 : (v > S ? S : v); }
  // one past the last key row t sees
  int64_t visible(int64_t t) const { return wr < 0 ? S : clamp(t + shift + wr + 1, S); }
  // the first key row t sees
  int64_t first(int64_t t) const { return wl < 0 ? 0 : clamp(t + shift - wl, S); }
  // whether row t sees no key at all (its output is 0 and its lse -inf)
  bool sees_none(int64_t t) const { return first(t) >= visible(t); }
  bool causal() const { return wl < 0 && wr == 0; }
};

// The checks causal_attention's kernels share, whatever the device: q, k, v on
// one device with one dtype (checked first: with q, k, v on different devices
// the dispatcher may pick either kernel, and "same device" is the error to
// report), the same batch dims, q and k the same head size, k and v the same
// number of keys, a finite scale, dropout_p in [0, 1). Device and dtype support
// are the caller's.
inline AttnGeometry check_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                                         double dropout_p, bool bottom_right, int64_t window_left = -1,
                                         int64_t window_right = 0) {
  check_same(q, "q", k, "k");
  check_same(q, "q", v, "v");
  check_min_dim(q, 2, "q", "(..., T, hs)");
  check_min_dim(k, 2, "k", "(..., S, hs)");
  check_min_dim(v, 2, "v", "(..., S, hs_v)");
  TORCH_CHECK(q.dim() == k.dim() && q.dim() == v.dim() &&
                  q.sizes().slice(0, q.dim() - 2) == k.sizes().slice(0, k.dim() - 2) &&
                  q.sizes().slice(0, q.dim() - 2) == v.sizes().slice(0, v.dim() - 2),
              "attnext: q, k and v must have the same batch dims, got q ", q.sizes(), ", k ", k.sizes(), ", v ",
              v.sizes());
  TORCH_CHECK(q.size(-1) == k.size(-1), "attnext: q and k must have the same head size (last dim), got q ",
              q.sizes(), " and k ", k.sizes());
  TORCH_CHECK(k.size(-2) == v.size(-2), "attnext: k and v must have the same number of keys (dim -2), got k ",
              k.sizes(), " and v ", v.sizes());
  TORCH_CHECK(q.size(-1) <= INT32_MAX && v.size(-1) <= INT32_MAX,
              "attnext: head sizes above 2^31 - 1 are not supported");
  check_scale(scale);
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, "attnext: dropout_p must be in [0, 1), got ", dropout_p);
  TORCH_CHECK_VALUE(window_left >= -1 && window_right >= -1,
                    "attnext: window_size must be a pair of ints >= -1 (-1: no limit on that side), got (",
                    window_left, ", ", window_right, ")");
  AttnGeometry g;
  g.wl = window_left;
  g.wr = window_right;
  g.T = q.size(-2);
  g.S = k.size(-2);
  g.hs = q.size(-1);
  g.hsv = v.size(-1);
  g.BH = 1;
  for (int64_t d = 0; d < q.dim() - 2; ++d) g.BH *= q.size(d);
  g.shift = bottom_right ? g.S - g.T : 0;
  return g;
}

// The (seed, offset) of a dropout call: the op's two ints, or, when its optional
// `rng` argument is given, the two values of that int64 tensor [seed, offset].
// attnext/ops.py draws rng on the GPU for CUDA inputs (torch's CUDA generator), so a
// CUDA graph that captured the call draws a new mask on every replay; the CUDA
// kernels then read the values on the device (`device`), host code reads them here.
struct DropoutSeed {
  int64_t seed = 0, offset = 0;
  const int64_t* device = nullptr;  // the rng tensor's data on the GPU, for the CUDA kernels
};

inline void check_rng(const at::Tensor& rng) {
  TORCH_CHECK(rng.scalar_type() == at::kLong && rng.dim() == 1 && rng.numel() == 2,
              "attnext: rng must be an int64 tensor of shape (2,) holding [seed, offset], got ", rng.scalar_type(),
              " of shape ", rng.sizes());
}

// For host code (the CPU kernels, or a CPU rng given to a CUDA kernel): the values.
// (A GPU rng makes the dispatcher pick the CUDA kernel, so rng is a CPU tensor here.)
inline DropoutSeed host_dropout_seed(int64_t seed, int64_t offset, const std::optional<at::Tensor>& rng) {
  if (!rng.has_value()) return {seed, offset, nullptr};
  check_rng(*rng);
  const at::Tensor r = rng->contiguous();  // a CPU tensor here (a GPU rng sends the call to the CUDA kernel)
  return {r.const_data_ptr<int64_t>()[0], r.const_data_ptr<int64_t>()[1], nullptr};
}

// For the CUDA kernels: a GPU rng (on the inputs' device) is read by the kernels
// themselves (DropoutSeed::device); a CPU rng or the ints are read here.
inline DropoutSeed device_dropout_seed(int64_t seed, int64_t offset, const std::optional<at::Tensor>& rng,
                                       const at::Tensor& like) {
  if (!rng.has_value() || rng->is_cpu()) return host_dropout_seed(seed, offset, rng);
  check_rng(*rng);
  TORCH_CHECK(rng->device() == like.device() && rng->is_contiguous(), "attnext: rng must be a contiguous tensor on ",
              like.device(), " (or on the CPU), got one on ", rng->device());
  DropoutSeed ds;
  ds.device = rng->const_data_ptr<int64_t>();
  return ds;
}

// qkv (..., T, 3, nh, hs): q, k and v packed along dim -3, as nanoGPT's
// c_attn(x).view(B, T, 3, nh, hs) (and flash-attn's qkvpacked layout).
inline void check_qkvpacked(const at::Tensor& qkv, const char* name) {
  check_strided(qkv, name);
  check_min_dim(qkv, 4, name, "(..., T, 3, nh, hs)");
  TORCH_CHECK(qkv.size(-3) == 3, "attnext: ", name,
              " must have size 3 in dim -3 (q, k and v of shape (..., T, 3, nh, hs)), got shape ", qkv.sizes());
}

// The (..., nh, T, hs) views of q, k and v inside a packed (..., T, 3, nh, hs) tensor.
inline std::array<at::Tensor, 3> unpack_qkv(const at::Tensor& qkv) {
  return {qkv.select(-3, 0).transpose(-3, -2), qkv.select(-3, 1).transpose(-3, -2),
          qkv.select(-3, 2).transpose(-3, -2)};
}

// Number of key columns that query row t of a (T, S) causal pattern may see.
// Top-left alignment: j <= t. Bottom-right: j <= t + (S - T). Clamped to [0, S].
inline int64_t visible_len(int64_t t, int64_t T, int64_t S, bool bottom_right) {
  const int64_t v = t + 1 + (bottom_right ? S - T : 0);
  return v < 0 ? 0 : (v > S ? S : v);
}

// Addresses the rows (all dims but the last) of a tensor whose last dim has
// stride 1 and whose other dims have arbitrary strides (e.g. nanoGPT's
// q.transpose(1, 2)), so the kernels read views without a copy. The rows are
// numbered as in a contiguous tensor: row = b * T + t. int64 throughout.
struct RowIndexer {
  static constexpr int kMaxDims = 16;
  int64_t nbatch_dims = 0;
  int64_t sizes[kMaxDims] = {};
  int64_t strides[kMaxDims] = {};
  int64_t stride_t = 0;

  explicit RowIndexer(const at::Tensor& t) {
    const int64_t nd = t.dim();
    TORCH_CHECK(nd - 2 <= kMaxDims, "attnext: at most ", kMaxDims, " batch dims are supported, got ", nd - 2);
    nbatch_dims = nd - 2;
    for (int64_t d = 0; d < nbatch_dims; ++d) {
      sizes[d] = t.size(d);
      strides[d] = t.stride(d);
    }
    stride_t = t.stride(nd - 2);
  }

  // Element offset of batch b (a linear index over the batch dims).
  int64_t batch_offset(int64_t b) const { return ::attnext::batch_offset(sizes, strides, nbatch_dims, b); }

  int64_t offset(int64_t b, int64_t t) const { return batch_offset(b) + t * stride_t; }
};

// The tensor itself when its last dim is unit-stride (or has <= 1 element),
// else a contiguous copy: the row kernels need unit-stride rows.
inline at::Tensor unit_stride_rows(const at::Tensor& t) {
  if (t.dim() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1) {
    return t;
  }
  return t.contiguous();
}

// A fresh contiguous output tensor, uninitialised: every kernel writes all of
// it. CPU outputs of 4 MiB and more come from attnext's output cache
// (cpu/output_cache.cpp): reused buffers, 2 MiB aligned, huge-page advised
// (ATTNEXT_HUGEPAGES=0 turns the advice off).
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace attnext
