// attnext's dropout mask: a counter-based hash, the same bits on the CPU, on CUDA
// and in attnext/reference.py (_dropout_keep), so a (seed, offset) pair gives one
// mask whatever the device, tiling or thread count, and the backward regenerates
// the forward's mask exactly.
//
// Weight (b, t, j) of a call with (seed, offset) is kept iff
//   fmix32(row_key(stream_key(seed, offset), b, t) + j * kColMul) >= floor(p * 2^32).
// b is the flat batch index over all batch dims, t the query row, j the key.
#pragma once

#include <cstdint>

#ifndef ATTNEXT_HD  // also defined by batch_offset.h
#if defined(__CUDACC__)
#define ATTNEXT_HD __host__ __device__ __forceinline__
#else
#define ATTNEXT_HD inline __attribute__((always_inline))
#endif
#endif

namespace attnext {

// MurmurHash3's 32-bit finaliser.
ATTNEXT_HD uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85ebca6bu;
  h ^= h >> 13;
  h *= 0xc2b2ae35u;
  h ^= h >> 16;
  return h;
}

constexpr uint32_t kBatchMul = 0x9e3779b9u;
constexpr uint32_t kRowMul = 0x85ebca77u;
constexpr uint32_t kColMul = 0xc2b2ae3du;

// One key per (seed, offset) stream.
ATTNEXT_HD uint32_t dropout_stream_key(int64_t seed, int64_t offset) {
  const uint64_t s = static_cast<uint64_t>(seed), o = static_cast<uint64_t>(offset);
  uint32_t h = fmix32(static_cast<uint32_t>(o) ^ 0x6a09e667u);
  h = fmix32(h ^ static_cast<uint32_t>(o >> 32));
  h = fmix32(h ^ static_cast<uint32_t>(s));
  h = fmix32(h ^ static_cast<uint32_t>(s >> 32));
  return h;
}

// One key per (stream, batch, query row).
ATTNEXT_HD uint32_t dropout_row_key(uint32_t stream, int64_t b, int64_t t) {
  const uint32_t hb = fmix32(stream + static_cast<uint32_t>(b) * kBatchMul);
  return fmix32(hb + static_cast<uint32_t>(t) * kRowMul);
}

// Keep weight (row, col) iff its hash is >= threshold = floor(p * 2^32).
ATTNEXT_HD bool dropout_keep(uint32_t row_key, uint32_t col, uint32_t threshold) {
  return fmix32(row_key + col * kColMul) >= threshold;
}

// Element n (the row-major index of the tensor) of attnext.dropout is kept iff
// dropout_keep(dropout_row_key(stream, n >> 32, 0), uint32(n), threshold): the
// attention mask's definition with the tensor seen as rows of 2^32 elements.
ATTNEXT_HD uint32_t dropout_block_key(uint32_t stream, int64_t n) { return dropout_row_key(stream, n >> 32, 0); }

// threshold for dropout probability p in [0, 1).
inline uint32_t dropout_threshold(double p) {
  const double t = p * 4294967296.0;
  return static_cast<uint32_t>(t < 4294967295.0 ? t : 4294967295.0);
}

}  // namespace attnext
