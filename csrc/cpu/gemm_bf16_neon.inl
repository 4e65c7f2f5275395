// bfloat16 products on AArch64's BF16 extension (FEAT_BF16: BFDOT, 4 lanes x 2
// products, float accumulation; BFCVTN for the roundings), for the bfloat16
// attention tiles. The same functions, operand layouts and contracts as the
// AVX512-BF16 version (cpu/gemm_bf16.inl), so the attention code calls either.
// Included once, inside an ATTNEXT_ISA_BEGIN_ARM_BF16 region; called only when
// simd::bf16_dot_available() (the kernel reports HWCAP2_BF16).
//
// Operands are "pairs": one 32-bit word holds two bfloat16 values of
// consecutive k (the low half is the even k); BFDOT multiplies a word of A with
// a word of B and adds both products to a float lane, as vdpbf16ps does.
//   A: word (i, p) at a[i * sa_i + p * sa_p]
//   B: word (p, j) at b[p * ldb + j], ldb >= N rounded up to 16, the words past N
//      zero (so whole vectors of B may be read up to that width).
// Products of bfloat16 values are exact in float. Without FEAT_EBF16 (or with
// FPCR.EBF clear, the default), BFDOT adds the two products, then that sum to the
// accumulator, each rounded to odd with subnormals flushed (not IEEE's round to
// nearest even): under one float ulp per rounding where vdpbf16ps's two roundings
// to nearest stay within half an ulp. tests/cpp/test_gemm_bf16.cpp checks both
// kernels against double within that bound.
//
// Register block: MR rows x NV vectors of 4 columns (MR = 4, NV = 4: 16
// accumulators, 4 B vectors and one broadcast A word live of NEON's 32 registers).

// The 32-bit words at p (2-byte aligned, as bfloat16 rows are).
inline uint32x4_t load_words(const uint16_t* p) { return vreinterpretq_u32_u16(vld1q_u16(p)); }

template <int MR, int NV>
inline void bf16_block(int64_t P, const uint32_t* a, int64_t sa_i, int64_t sa_p, const uint32_t* b, int64_t ldb,
                       float* c, int64_t ldc, int64_t ncols, float alpha, bool accumulate) {
  float32x4_t acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = vdupq_n_f32(0.0f);
  for (int64_t p = 0; p < P; ++p) {
    bfloat16x8_t bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = vreinterpretq_bf16_u32(vld1q_u32(b + p * ldb + 4 * v));
    for (int r = 0; r < MR; ++r) {
      const bfloat16x8_t av = vreinterpretq_bf16_u32(vld1q_dup_u32(a + r * sa_i + p * sa_p));
      for (int v = 0; v < NV; ++v) acc[r][v] = vbfdotq_f32(acc[r][v], av, bv[v]);
    }
  }
  const float32x4_t va = vdupq_n_f32(alpha);
  for (int r = 0; r < MR; ++r) {
    for (int v = 0; v < NV; ++v) {
      const int64_t left = ncols - 4 * v;
      if (left <= 0) break;
      float* cp = c + r * ldc + 4 * v;
      float32x4_t x = vmulq_f32(acc[r][v], va);
      if (left >= 4) {
        if (accumulate) x = vaddq_f32(x, vld1q_f32(cp));
        vst1q_f32(cp, x);
      } else {  // the last columns: through a buffer, so nothing past them is touched
        float buf[4] = {};
        if (accumulate) std::memcpy(buf, cp, sizeof(float) * left);
        if (accumulate) x = vaddq_f32(x, vld1q_f32(buf));
        vst1q_f32(buf, x);
        std::memcpy(cp, buf, sizeof(float) * left);
      }
    }
  }
}

template <int MR>
inline void bf16_rows(int64_t N, int64_t P, const uint32_t* a, int64_t sa_i, int64_t sa_p, const uint32_t* b,
                      int64_t ldb, float* c, int64_t ldc, float alpha, bool accumulate) {
  int64_t j = 0;
  for (; j + 16 <= N; j += 16) bf16_block<MR, 4>(P, a, sa_i, sa_p, b + j, ldb, c + j, ldc, 16, alpha, accumulate);
  const int64_t rest = N - j;
  if (rest > 12) {
    bf16_block<MR, 4>(P, a, sa_i, sa_p, b + j, ldb, c + j, ldc, rest, alpha, accumulate);
  } else if (rest > 8) {
    bf16_block<MR, 3>(P, a, sa_i, sa_p, b + j, ldb, c + j, ldc, rest, alpha, accumulate);
  } else if (rest > 4) {
    bf16_block<MR, 2>(P, a, sa_i, sa_p, b + j, ldb, c + j, ldc, rest, alpha, accumulate);
  } else if (rest > 0) {
    bf16_block<MR, 1>(P, a, sa_i, sa_p, b + j, ldb, c + j, ldc, rest, alpha, accumulate);
  }
}

// C (M, N) = alpha * A B, or C += alpha * A B when accumulate; C row-major (ldc).
// P = K / 2 pairs.
void gemm_bf16(int64_t M, int64_t N, int64_t P, const uint32_t* a, int64_t sa_i, int64_t sa_p, const uint32_t* b,
               int64_t ldb, float* c, int64_t ldc, float alpha, bool accumulate) {
  if (M <= 0 || N <= 0) return;
  int64_t i = 0;
  for (; i + 4 <= M; i += 4) {
    bf16_rows<4>(N, P, a + i * sa_i, sa_i, sa_p, b, ldb, c + i * ldc, ldc, alpha, accumulate);
  }
  const uint32_t* ai = a + i * sa_i;
  float* ci = c + i * ldc;
  switch (M - i) {
    case 3:
      bf16_rows<3>(N, P, ai, sa_i, sa_p, b, ldb, ci, ldc, alpha, accumulate);
      break;
    case 2:
      bf16_rows<2>(N, P, ai, sa_i, sa_p, b, ldb, ci, ldc, alpha, accumulate);
      break;
    case 1:
      bf16_rows<1>(N, P, ai, sa_i, sa_p, b, ldb, ci, ldc, alpha, accumulate);
      break;
    default:
      break;
  }
}

// 8 floats rounded to bfloat16 (BFCVTN: to nearest even, NaN kept a quiet NaN).
inline uint16x8_t to_bf16x8(const float* x) {
  return vreinterpretq_u16_bf16(vcvtq_high_bf16_f32(vcvtq_low_bf16_f32(vld1q_f32(x)), vld1q_f32(x + 4)));
}

// 8 floats of x (n of them, the rest 0), rounded to bfloat16.
inline uint16x8_t to_bf16x8_tail(const float* x, int64_t n) {
  float buf[8] = {};
  std::memcpy(buf, x, sizeof(float) * n);
  return to_bf16x8(buf);
}

// out (R, C + C % 2) bfloat16 rows = x (R, C) float rounded (to nearest even),
// the odd column padded with 0: an A operand with sa_i = ldo / 2, sa_p = 1.
void float_rows_to_bf16(const float* x, int64_t ldx, int64_t R, int64_t C, uint16_t* out, int64_t ldo) {
  for (int64_t r = 0; r < R; ++r) {
    const float* xr = x + r * ldx;
    uint16_t* orow = out + r * ldo;
    int64_t c = 0;
    for (; c + 8 <= C; c += 8) vst1q_u16(orow + c, to_bf16x8(xr + c));
    if (c < C) {
      uint16_t buf[8];
      vst1q_u16(buf, to_bf16x8_tail(xr + c, C - c));
      std::memcpy(orow + c, buf, sizeof(uint16_t) * (C - c));
    }
    if (C % 2) orow[C] = 0;
  }
}

// out[p * ldo + c] = (bf16(x[2p][c]), bf16(x[2p + 1][c])) for p < ceil(R / 2),
// c < C (a missing odd row is 0): x^T as an A operand, sa_i = 1, sa_p = ldo.
void float_pairs_t(const float* x, int64_t ldx, int64_t R, int64_t C, uint32_t* out, int64_t ldo) {
  for (int64_t p = 0; 2 * p < R; ++p) {
    const float* x0 = x + 2 * p * ldx;
    const float* x1 = 2 * p + 1 < R ? x0 + ldx : nullptr;
    uint32_t* orow = out + p * ldo;
    for (int64_t c = 0; c < C; c += 8) {
      const int64_t n = std::min<int64_t>(8, C - c);
      const uint16x8_t even = n == 8 ? to_bf16x8(x0 + c) : to_bf16x8_tail(x0 + c, n);
      const uint16x8_t odd = x1 == nullptr ? vdupq_n_u16(0) : n == 8 ? to_bf16x8(x1 + c) : to_bf16x8_tail(x1 + c, n);
      // (even[i], odd[i]) pairs: the even value in the low half of each word
      const uint32x4_t lo = vreinterpretq_u32_u16(vzip1q_u16(even, odd));
      const uint32x4_t hi = vreinterpretq_u32_u16(vzip2q_u16(even, odd));
      if (n == 8) {
        vst1q_u32(orow + c, lo);
        vst1q_u32(orow + c + 4, hi);
      } else {
        uint32_t buf[8];
        vst1q_u32(buf, lo);
        vst1q_u32(buf + 4, hi);
        std::memcpy(orow + c, buf, sizeof(uint32_t) * n);
      }
    }
  }
}

// out[p * ldo + c] = (src[2p][c], src[2p + 1][c]) for p < ceil(R / 2), c < C
// (a missing odd row is 0), and 0 for c in [C, ldo): src (R, C) bfloat16 rows
// as a B operand (k = the row index).
void bf16_vnni(const uint16_t* src, int64_t lds, int64_t R, int64_t C, uint32_t* out, int64_t ldo) {
  for (int64_t p = 0; 2 * p < R; ++p) {
    const uint16_t* s0 = src + 2 * p * lds;
    const uint16_t* s1 = 2 * p + 1 < R ? s0 + lds : nullptr;
    uint32_t* orow = out + p * ldo;
    int64_t c = 0;
    for (; c + 8 <= C; c += 8) {
      const uint16x8_t even = vld1q_u16(s0 + c);
      const uint16x8_t odd = s1 == nullptr ? vdupq_n_u16(0) : vld1q_u16(s1 + c);
      vst1q_u32(orow + c, vreinterpretq_u32_u16(vzip1q_u16(even, odd)));
      vst1q_u32(orow + c + 4, vreinterpretq_u32_u16(vzip2q_u16(even, odd)));
    }
    for (; c < C; ++c) orow[c] = uint32_t(s0[c]) | (s1 == nullptr ? 0u : uint32_t(s1[c]) << 16);
    for (; c < ldo; ++c) orow[c] = 0;
  }
}

// out[p * ldo + r] = (src[r][2p], src[r][2p + 1]) for p < C / 2 (C even), r < R,
// and 0 for r in [R, R rounded up to 16): the transpose of src (R, C) bfloat16
// rows as a B operand (k = the column index). A 32-bit transpose, in 4 x 4 blocks.
void bf16_t32(const uint16_t* src, int64_t lds, int64_t R, int64_t C, uint32_t* out, int64_t ldo) {
  const int64_t P = C / 2, R16 = (R + 15) / 16 * 16;
  int64_t r0 = 0;
  for (; r0 + 4 <= R; r0 += 4) {
    const uint16_t* s = src + r0 * lds;
    int64_t p = 0;
    for (; p + 4 <= P; p += 4) {
      const uint32x4_t w0 = load_words(s + 2 * p), w1 = load_words(s + lds + 2 * p);
      const uint32x4_t w2 = load_words(s + 2 * lds + 2 * p), w3 = load_words(s + 3 * lds + 2 * p);
      // (w0[i], w1[i]) and (w2[i], w3[i]) side by side, then whole 64-bit halves
      const uint64x2_t t0 = vreinterpretq_u64_u32(vtrn1q_u32(w0, w1)), t1 = vreinterpretq_u64_u32(vtrn2q_u32(w0, w1));
      const uint64x2_t t2 = vreinterpretq_u64_u32(vtrn1q_u32(w2, w3)), t3 = vreinterpretq_u64_u32(vtrn2q_u32(w2, w3));
      vst1q_u32(out + p * ldo + r0, vreinterpretq_u32_u64(vtrn1q_u64(t0, t2)));
      vst1q_u32(out + (p + 1) * ldo + r0, vreinterpretq_u32_u64(vtrn1q_u64(t1, t3)));
      vst1q_u32(out + (p + 2) * ldo + r0, vreinterpretq_u32_u64(vtrn2q_u64(t0, t2)));
      vst1q_u32(out + (p + 3) * ldo + r0, vreinterpretq_u32_u64(vtrn2q_u64(t1, t3)));
    }
    for (; p < P; ++p) {
      for (int64_t r = r0; r < r0 + 4; ++r) {
        const uint16_t* w = src + r * lds + 2 * p;
        out[p * ldo + r] = uint32_t(w[0]) | uint32_t(w[1]) << 16;
      }
    }
  }
  for (int64_t p = 0; p < P; ++p) {
    for (int64_t r = r0; r < R; ++r) {
      const uint16_t* w = src + r * lds + 2 * p;
      out[p * ldo + r] = uint32_t(w[0]) | uint32_t(w[1]) << 16;
    }
    for (int64_t r = R; r < R16; ++r) out[p * ldo + r] = 0;
  }
}
