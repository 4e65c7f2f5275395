// Decoding with a KV cache on the CPU: causal_attention's forward for a few query
// rows (T <= kDecodeMaxRows, typically 1) against many keys (S up to 32k and beyond).
//
// The tile kernels are built for 64-row query tiles: for one row they transpose K
// into a scratch tile before a 1-row GEMM, reading and writing every key twice,
// and with few (batch, head) pairs there are fewer work items than threads. This
// pass is memory-bound by design and streams K and V once:
//  * scores by row-vector products: each key row is loaded once and dotted with
//    every query row while it sits in L1;
//  * the online softmax of the tile kernels (attn_fwd_tile_f32) per block of
//    kDecodeBlock keys, then O += P V with each value row read once;
//  * split-K (flash-decoding): when (batch x heads) cannot keep every thread busy,
//    the visible keys of a batch are cut into splits that run as separate work
//    items, each leaving a partial (m, l, O) per row; a second pass merges them
//    through their logsumexps: M = max m_s, L = sum l_s e^(m_s - M),
//    O = sum O_s e^(m_s - M) / L, lse = M + log L.
//  * grouped-query heads (k and v expanded over the query heads of a group as
//    stride-0 views, attnext/ops.py): one work item takes the group's query rows
//    together, so each key/value head streams once, not once per query head.
// Results match the tile kernels' semantics: a row that sees no key is zeros with
// lse -inf, a row whose visible scores are all -inf is NaN, NaN propagates.
// Memory: per-thread blocks plus BH * splits * T * (hs_v + 2) floats of partials.
// Types: float32, and bfloat16 read as it lies (widened in registers).
#include "cpu/causal_attention_decode.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu/attention_rows.h"
#include "cpu/parallel.h"
#include "cpu/vec_math.h"
#include "dropout_hash.h"  // the shared tile kernels include the dropout tile

namespace attnext {

namespace {

#if ATTNEXT_X86_SIMD
ATTNEXT_ISA_BEGIN_AVX512
namespace isa_avx512 {
#include "cpu/simd_avx512.inl"
#include "cpu/causal_attention_tiles.inl"
#include "cpu/causal_attention_decode.inl"
}  // namespace isa_avx512
ATTNEXT_ISA_END
ATTNEXT_ISA_BEGIN_AVX2
namespace isa_avx2 {
#include "cpu/simd_avx2.inl"
#include "cpu/causal_attention_tiles.inl"
#include "cpu/causal_attention_decode.inl"
}  // namespace isa_avx2
ATTNEXT_ISA_END
#endif
#if ATTNEXT_ARM_NEON
namespace isa_neon {
#include "cpu/simd_neon.inl"
#include "cpu/causal_attention_tiles.inl"
#include "cpu/causal_attention_decode.inl"
}  // namespace isa_neon
#endif
namespace isa_scalar {
#include "cpu/simd_scalar.inl"
#include "cpu/causal_attention_tiles.inl"
#include "cpu/causal_attention_decode.inl"
}  // namespace isa_scalar

struct DecodeKernels {
  decltype(&isa_scalar::decode_scores_f32) scores_f32;
  decltype(&isa_scalar::decode_scores_bf16) scores_bf16;
  decltype(&isa_scalar::attn_fwd_tile_f32) softmax;
  decltype(&isa_scalar::decode_pv_f32) pv_f32;
  decltype(&isa_scalar::decode_pv_bf16) pv_bf16;
};

#define ATTNEXT_DECODE_KERNELS(ns)                                                                        \
  DecodeKernels {                                                                                         \
    &ns::decode_scores_f32, &ns::decode_scores_bf16, &ns::attn_fwd_tile_f32, &ns::decode_pv_f32, &ns::decode_pv_bf16 \
  }

const DecodeKernels& decode_kernels() {
  static const DecodeKernels k = [] {
    switch (simd::detected_isa()) {
#if ATTNEXT_X86_SIMD
      case simd::Isa::kAvx512:
        return ATTNEXT_DECODE_KERNELS(isa_avx512);
      case simd::Isa::kAvx2:
        return ATTNEXT_DECODE_KERNELS(isa_avx2);
#endif
#if ATTNEXT_ARM_NEON
      case simd::Isa::kNeon:
        return ATTNEXT_DECODE_KERNELS(isa_neon);
#endif
      default:
        return ATTNEXT_DECODE_KERNELS(isa_scalar);
    }
  }();
  return k;
}
#undef ATTNEXT_DECODE_KERNELS

// Key and value rows as the inner loops read them: float, or bfloat16 bits.
inline const float* elems(const float* p) { return p; }
inline const uint16_t* elems(const at::BFloat16* p) { return reinterpret_cast<const uint16_t*>(p); }
inline void scores(const DecodeKernels& k, const float* q, int64_t ldq, int64_t nr, const float* kr, int64_t ldk,
                   int64_t nc, int64_t hs, float scale, float* s, int64_t lds, const int64_t* vis) {
  k.scores_f32(q, ldq, nr, kr, ldk, nc, hs, scale, s, lds, vis);
}
inline void scores(const DecodeKernels& k, const float* q, int64_t ldq, int64_t nr, const uint16_t* kr, int64_t ldk,
                   int64_t nc, int64_t hs, float scale, float* s, int64_t lds, const int64_t* vis) {
  k.scores_bf16(q, ldq, nr, kr, ldk, nc, hs, scale, s, lds, vis);
}
inline void pv(const DecodeKernels& k, const float* p, int64_t ldp, int64_t nr, const float* v, int64_t ldv,
               int64_t nc, int64_t hsv, float* o, int64_t ldo, const int64_t* vis) {
  k.pv_f32(p, ldp, nr, v, ldv, nc, hsv, o, ldo, vis);
}
inline void pv(const DecodeKernels& k, const float* p, int64_t ldp, int64_t nr, const uint16_t* v, int64_t ldv,
               int64_t nc, int64_t hsv, float* o, int64_t ldo, const int64_t* vis) {
  k.pv_bf16(p, ldp, nr, v, ldv, nc, hsv, o, ldo, vis);
}

constexpr int64_t kDecodeBlock = 128;  // keys per softmax block (K and V blocks of 64 KiB at hs 128)
constexpr int64_t kMinSplitKeys = 512;  // a split shorter than this costs more to merge than it saves
constexpr int64_t kMaxGroupRows = 64;   // most query rows one item serves (grouped-query heads x T)

bool decode_enabled() {
  static const bool on = [] {
    const char* env = std::getenv("ATTNEXT_DECODE");
    return env == nullptr || *env == '\0' || std::strcmp(env, "0") != 0;
  }();
  return on;
}

// How many key splits each of `batches` work rows gets: enough work items for ~4
// per thread, each split at least kMinSplitKeys keys.
int64_t key_splits(int64_t batches, int64_t kv_end) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t want = ceil_div(4 * threads, std::max<int64_t>(batches, 1));
  const int64_t most = std::max<int64_t>(1, kv_end / kMinSplitKeys);
  return std::max<int64_t>(1, std::min(want, most));
}

// Query heads that share their key/value head (grouped-query attention, k and v
// expanded over the group as stride-0 views): the size of the innermost batch dim
// when k and v have stride 0 there and q does not, else 1. One work item then
// serves the whole group, so K and V stream once per key/value head.
int64_t shared_kv_group(const RowIndexer& q, const RowIndexer& k,
                        const RowIndexer& v, int64_t T) {
  const int64_t d = q.nbatch_dims - 1;
  if (d < 0 || q.sizes[d] <= 1 || k.strides[d] != 0 || v.strides[d] != 0 || q.strides[d] == 0) return 1;
  return q.sizes[d] * T <= kMaxGroupRows ? q.sizes[d] : 1;
}

template <typename in_t>
void decode_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out, at::Tensor& lse,
                 const AttnGeometry& g, double scale_d) {
  const DecodeKernels& kern = decode_kernels();
  const Rows2D<in_t> Q(q), K(k), V(v);
  const OutRows<in_t> Out(out);
  float* lp = lse.mutable_data_ptr<float>();
  const float scale = static_cast<float>(scale_d);
  const int64_t T = g.T, hs = g.hs, hsv = g.hsv;
  // A work item's rows: R = T * group query rows against one key/value batch, row
  // r = t * group + i being row t of query batch kb * group + i (t-major, so the
  // number of visible keys never decreases with r, as the inner loops assume).
  const int64_t group = shared_kv_group(Q.idx, K.idx, V.idx, T);
  const int64_t R = T * group, BK = g.BH / group;
  // keys [kv_begin, kv_end): the first row's window starts leftmost, the last row's ends rightmost
  const int64_t kv_begin = std::min(g.first(0), g.visible(T - 1)), kv_end = g.visible(T - 1);
  const int64_t nsplit = key_splits(BK, kv_end - kv_begin);
  const int64_t chunk =
      ceil_div(ceil_div(std::max<int64_t>(kv_end - kv_begin, 1), nsplit), kDecodeBlock) * kDecodeBlock;
  const int64_t ldo = std::max<int64_t>(hsv, 1), ldq = std::max<int64_t>(hs, 1);
  // partials of split s of key batch kb, row r: o at ((kb * nsplit + s) * R + r) * ldo, m and l at (kb * nsplit + s) * R + r
  std::vector<float> part_o, part_m, part_l;
  if (nsplit > 1) {
    part_o.resize(BK * nsplit * R * ldo);
    part_m.resize(BK * nsplit * R);
    part_l.resize(BK * nsplit * R);
  }
  constexpr bool widen = !std::is_same<in_t, float>::value;
  // O rows (R, hsv) of key batch kb into the output and lse: O /= l, lse = m + log l
  // (finish_rows' rules for blind, all -inf and NaN rows).
  auto finish = [&](float* o, float* m, float* l, int64_t kb) {
    finish_rows(o, R, hsv, ldo, m, l, m, [&](int64_t r) { return g.sees_none(r / group); });  // lse lands in m
    for (int64_t r = 0; r < R; ++r) {
      const int64_t t = r / group, b = kb * group + r % group;
      lp[b * T + t] = m[r];
      store_block(o + r * ldo, ldo, 1, hsv, Out.at(b, t), Out.ld);
    }
  };
  struct Scratch {
    std::vector<float> q, s, m, l, alpha, o;
    std::vector<int64_t> vis;
  };
  auto make_scratch = [&] {
    Scratch sc;
    sc.q.resize(R * ldq);
    sc.s.resize(R * kDecodeBlock);
    sc.m.resize(R);
    sc.l.resize(R);
    sc.alpha.resize(R);
    sc.o.resize(R * ldo);
    sc.vis.resize(R);
    return sc;
  };
  parallel_items(BK * nsplit, make_scratch, [&](Scratch& sc, int64_t item) {
    const int64_t kb = item / nsplit, split = item % nsplit;
    const int64_t j0 = std::min(kv_end, kv_begin + split * chunk), j1 = std::min(kv_end, j0 + chunk);
    for (int64_t r = 0; r < R; ++r) {  // the item's query rows, as float, one after another
      const in_t* src = Q.at(kb * group + r % group, r / group);
      load_block(src, Q.ld, 1, hs, sc.q.data() + r * ldq);
      if constexpr (!widen) std::memcpy(sc.q.data() + r * ldq, src, sizeof(float) * hs);
    }
    float* o = sc.o.data();
    std::fill(sc.o.begin(), sc.o.end(), 0.0f);
    std::fill(sc.m.begin(), sc.m.end(), -std::numeric_limits<float>::infinity());
    std::fill(sc.l.begin(), sc.l.end(), 0.0f);
    for (int64_t k0 = j0; k0 < j1; k0 += kDecodeBlock) {
      const int64_t nc = std::min(kDecodeBlock, j1 - k0);
      for (int64_t r = 0; r < R; ++r) sc.vis[r] = std::min(std::max<int64_t>(g.visible(r / group) - k0, 0), nc);
      scores(kern, sc.q.data(), ldq, R, elems(K.at(kb * group, k0)), K.ld, nc, hs, scale, sc.s.data(), kDecodeBlock,
             sc.vis.data());
      if (g.wl >= 0) {  // keys left of a row's window: weight 0
        for (int64_t r = 0; r < R; ++r) {
          const int64_t lo = std::min(std::max<int64_t>(g.first(r / group) - k0, 0), sc.vis[r]);
          std::fill(sc.s.data() + r * kDecodeBlock, sc.s.data() + r * kDecodeBlock + lo,
                    -std::numeric_limits<float>::infinity());
        }
      }
      kern.softmax(sc.s.data(), R, nc, kDecodeBlock, sc.vis.data(), sc.m.data(), sc.l.data(), sc.alpha.data());
      rescale_rows(o, R, hsv, ldo, sc.alpha.data());
      pv(kern, sc.s.data(), kDecodeBlock, R, elems(V.at(kb * group, k0)), V.ld, nc, hsv, o, ldo, sc.vis.data());
    }
    if (nsplit == 1) {
      finish(o, sc.m.data(), sc.l.data(), kb);
    } else {
      const int64_t base = (kb * nsplit + split) * R;
      std::memcpy(part_o.data() + base * ldo, o, sizeof(float) * R * ldo);
      std::memcpy(part_m.data() + base, sc.m.data(), sizeof(float) * R);
      std::memcpy(part_l.data() + base, sc.l.data(), sizeof(float) * R);
    }
  });
  if (nsplit == 1) return;
  // merge the splits of every (key batch, row) through their logsumexps
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  attnext::parallel_for(0, BK, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> o(R * ldo), m(R), l(R);
    for (int64_t kb = begin; kb < end; ++kb) {
      for (int64_t r = 0; r < R; ++r) {
        float M = kNegInf;
        for (int64_t s = 0; s < nsplit; ++s) M = std::max(M, part_m[(kb * nsplit + s) * R + r]);
        float L = 0.0f;
        float* orow = o.data() + r * ldo;
        std::fill(orow, orow + hsv, 0.0f);
        for (int64_t s = 0; s < nsplit; ++s) {
          const int64_t i = (kb * nsplit + s) * R + r;
          if (M == kNegInf) {  // no finite score anywhere: l stays 0 (or NaN), finish_rows decides
            L += part_l[i];
            continue;
          }
          if (part_m[i] == kNegInf) continue;  // this split saw only -inf (or no key)
          const float w = std::exp(part_m[i] - M);
          L += part_l[i] * w;
          const float* po = part_o.data() + i * ldo;
          for (int64_t c = 0; c < hsv; ++c) orow[c] += w * po[c];
        }
        m[r] = M;
        l[r] = L;
      }
      finish(o.data(), m.data(), l.data(), kb);
    }
  });
}

}  // namespace

bool decode_applies(const at::Tensor& q, const AttnGeometry& g, double dropout_p) {
  const auto st = q.scalar_type();
  return decode_enabled() && dropout_p == 0.0 && g.T >= 1 && g.T <= kDecodeMaxRows &&
         (st == at::kFloat || st == at::kBFloat16);
}

void decode_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out, at::Tensor& lse,
                    const AttnGeometry& g, double scale) {
  if (q.scalar_type() == at::kBFloat16) {
    decode_impl<at::BFloat16>(q, k, v, out, lse, g, scale);
  } else {
    decode_impl<float>(q, k, v, out, lse, g, scale);
  }
}

}  // namespace attnext
