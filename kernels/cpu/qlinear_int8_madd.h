// The int8 weight-only linear at M <= 8 rows on AVX2 without VNNI (issue #7): the AVX2 twin of
// kernels/cpu/qlinear_int8_split.h. The fp32 activations are rounded to 16-bit fixed point per
// chunk of 64 inputs, as there, but kept as int16 (no byte split): vpmaddwd multiplies them with
// the codes widened to int16 (vpmovsxbw straight from memory) and adds pairs into int32 lanes.
// (AVX2's byte multiply, vpmaddubsw, cannot serve int8 codes: its s16 pair sums of u8 x s8 saturate
// at 2 * 255 * 128.) The fp32 path it replaces widened every code to an fp32 lane: 7 uops per 16
// codes, three of them on the shuffle port; here 64 codes cost 4 widenings, and per row 4 vpmaddwd,
// 3 adds, one convert and one FMA.
//
// Math. Row x, chunk c of 64 inputs: sx_c = max_{k in c} |x_k| / 32639, v_k = rint(x_k / sx_c) in
// [-32639, 32639]; with codes w in [-127, 127] and the scale s_g of the chunk's group,
//   y_n = sum_c s_g sx_c sum_k w_k v_k + b_n   (signed codes: no zero-point term),
// the exact product of the dequantized weights with x~ = sx v, |x~ - x| <= 0.51 sx_c (2^-16 of the
// chunk's largest magnitude), the bound of the VNNI kernel. Ranges per int32 lane and chunk: 8
// products, |.| <= 8 * 127 * 32639 < 2^25, exact in int32; the conversion to fp32 rounds by at
// most 2^-24 relative. Non-finite inputs give the chunk a NaN scale: the row's outputs are NaN.
//
// Layout (SplitAct16): per row, chunks * 64 int16 values (chunks past K zero) and chunks scales.
// Weight groups must be whole chunks (G % 64 == 0) or the whole row (per-channel scales, any K);
// callers check `int8_madd_ok`.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "qlinear_int4_split.h"

namespace pypaper {
namespace qlinear {
namespace cpu {

constexpr int64_t kMaddChunk = 64;

// Whether the int8 weight-only linear of this shape has the vpmaddwd kernel on `isa`.
inline bool int8_madd_ok(Isa isa, int64_t K, int64_t G) {
  return isa == Isa::kAvx2 && PYPAPER_QL_AVX2 && K > 0 && (G == K || G % kMaddChunk == 0);
}

struct SplitAct16 {
  int64_t rows = 0, K = 0, G = 0, chunks = 0;
  std::vector<int16_t> v;            // [rows][chunks * 64]
  std::vector<float> sx;             // [rows][chunks]
  std::vector<int32_t> chunk_group;  // [chunks]: 64 c / G
};

inline void split16_prepare(int64_t rows, int64_t K, int64_t G, SplitAct16& a) {
  a.rows = rows;
  a.K = K;
  a.G = G;
  a.chunks = (K + kMaddChunk - 1) / kMaddChunk;
  a.v.assign(static_cast<size_t>(rows * a.chunks * kMaddChunk), 0);
  a.sx.assign(static_cast<size_t>(rows * a.chunks), 0.f);
  a.chunk_group.resize(static_cast<size_t>(a.chunks));
  for (int64_t c = 0; c < a.chunks; ++c)
    a.chunk_group[c] = static_cast<int32_t>(G == K ? 0 : kMaddChunk * c / G);
}

// Rows [r0, r1) of x (row stride ldx) after split16_prepare: whole chunks eight lanes at a time,
// the last partial chunk scalar (the same rounding: kernels/cpu/qlinear_int4_split.h's fixed16_*).
inline void split16_rows(const float* x, int64_t ldx, int64_t r0, int64_t r1, SplitAct16& a) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = x + r * ldx;
    for (int64_t c = 0; c < a.chunks; ++c) {
      const int64_t k0 = c * kMaddChunk, kn = std::min(kMaddChunk, a.K - k0);
      int16_t* vr = a.v.data() + (r * a.chunks + c) * kMaddChunk;
      float inv;
#if PYPAPER_QL_AVX2
      if (kn == kMaddChunk) {
        const float sx = fixed16_scale_avx2(xr + k0, kn, &inv);
        a.sx[r * a.chunks + c] = sx;
        if (!(sx == sx)) continue;  // values stay 0; the NaN scale makes the row's outputs NaN
        const __m256 vinv = _mm256_set1_ps(inv);
        for (int64_t k = 0; k < kn; k += 16) {  // 16 int32 -> 16 int16, in order
          const __m256i lo = fixed16_values_avx2(xr + k0 + k, vinv), hi = fixed16_values_avx2(xr + k0 + k + 8, vinv);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(vr + k),
                              _mm256_permute4x64_epi64(_mm256_packs_epi32(lo, hi), 0xD8));
        }
        continue;
      }
#endif
      const float sx = fixed16_scale(xr + k0, kn, &inv);
      a.sx[r * a.chunks + c] = sx;
      if (!(sx == sx)) continue;
      for (int64_t k = 0; k < kn; ++k) vr[k] = static_cast<int16_t>(fixed16_value(xr[k0 + k], inv));
    }
  }
}

#if PYPAPER_QL_AVX2
// Rows [m0, m0 + R) of y (row stride ldy), channels [n0, n1): codes wq [N, K] int8, scale
// [N, groups].
template <int R>
inline void wo_int8_madd_avx2(const SplitAct16& a, int64_t m0, const int8_t* wq,
                              const float* scale, int64_t groups, const float* bias, int64_t n0,
                              int64_t n1, float* y, int64_t ldy) {
  const int64_t K = a.K, chunks = a.chunks, full = K / kMaddChunk;
  const int16_t* vrow[R];
  const float* sxr[R];
  for (int r = 0; r < R; ++r) {
    vrow[r] = a.v.data() + (m0 + r) * chunks * kMaddChunk;
    sxr[r] = a.sx.data() + (m0 + r) * chunks;
  }
  alignas(32) int8_t tail[kMaddChunk];  // the last partial chunk's codes, zero-padded
  const auto wide = [](const int8_t* p) {
    return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  };
  const auto vload = [](const int16_t* p) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  };
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* wr = wq + n * K;
    const float* sr = scale + n * groups;
    __m256 accf[R];
    for (int r = 0; r < R; ++r) accf[r] = _mm256_setzero_ps();
    for (int64_t c = 0; c < chunks; ++c) {
      const int8_t* wc = wr + kMaddChunk * c;
      if (c < full) {
        _mm_prefetch(reinterpret_cast<const char*>(wc + kPrefetchBytes), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(wc + kPrefetchL2Bytes), _MM_HINT_T1);
      } else {
        std::memset(tail, 0, sizeof(tail));
        std::memcpy(tail, wc, static_cast<size_t>(K - kMaddChunk * c));
        wc = tail;
      }
      const __m256i w0 = wide(wc), w1 = wide(wc + 16), w2 = wide(wc + 32), w3 = wide(wc + 48);
      const float sw = sr[a.chunk_group[c]];
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const int16_t* v = vrow[r] + kMaddChunk * c;
        const __m256i acc = _mm256_add_epi32(
            _mm256_add_epi32(_mm256_madd_epi16(w0, vload(v)), _mm256_madd_epi16(w1, vload(v + 16))),
            _mm256_add_epi32(_mm256_madd_epi16(w2, vload(v + 32)), _mm256_madd_epi16(w3, vload(v + 48))));
        accf[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), _mm256_set1_ps(sw * sxr[r][c]), accf[r]);
      }
    }
    for (int r = 0; r < R; ++r) y[r * ldy + n] = hsum256(accf[r]) + (bias ? bias[n] : 0.f);
  }
}

inline void wo_int8_madd_rows(const SplitAct16& a, int64_t m0, int rows, const int8_t* wq,
                              const float* scale, int64_t groups, const float* bias, int64_t n0,
                              int64_t n1, float* y, int64_t ldy) {
  with_rows(rows, [&](auto r) {
    wo_int8_madd_avx2<r()>(a, m0, wq, scale, groups, bias, n0, n1, y, ldy);
  });
}
#endif

}  // namespace cpu
}  // namespace qlinear
}  // namespace pypaper
