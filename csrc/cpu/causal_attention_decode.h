// Decoding with a KV cache on the CPU: the forward of causal_attention for a few
// query rows against many keys (see causal_attention_decode.cpp).
#pragma once

#include <ATen/ATen.h>

#include "common.h"

namespace attnext {

// The most query rows the decode pass takes; more rows go to the tile kernels.
constexpr int64_t kDecodeMaxRows = 16;

// Whether the decode pass runs this forward: no dropout, at most kDecodeMaxRows
// query rows, float32 or bfloat16 (ATTNEXT_DECODE=0 turns it off).
bool decode_applies(const at::Tensor& q, const AttnGeometry& g, double dropout_p);

// The forward into out (..., T, hs_v) (unit-stride rows) and lse (BH * T, float):
// the same results as the tile kernels, within float rounding.
void decode_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out, at::Tensor& lse,
                    const AttnGeometry& g, double scale);

}  // namespace attnext
