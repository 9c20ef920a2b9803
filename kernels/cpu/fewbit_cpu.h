// Torch-free CPU loops of the few-bit backward activations: pack the b-bit codes of x, and the
// backward dx = levels[code] * dy (0 where the level is 0). Layout and code:
// kernels/common/fewbit_pack.h.
//
// Both are memory-bound streams, so the AVX2 path does a block of 32 elements as four 8-lane
// vectors: the piece is a sum of compare masks, each bit plane one movemask per vector; in the
// backward each plane byte becomes a lane mask by one broadcast-and-compare and the level is one
// in-register table lookup (vpermps: 8 levels, two and a blend for 16). The scalar path writes the
// same bytes and serves double, tails and machines without AVX2.
#pragma once

#include <stdint.h>
#include <string.h>

#include "../common/fewbit_pack.h"
#include "float16.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace pypaper {
namespace fewbit {
namespace cpu {

using pypaper::cpu::acc_type;
using pypaper::cpu::bf16;
using pypaper::cpu::fp16;
using pypaper::cpu::to_float;

template <typename In, typename T>
inline T math_value(In v) {
  return static_cast<T>(to_float(v));
}

inline void store_u32_le(uint8_t* p, uint32_t w) {
  p[0] = static_cast<uint8_t>(w);
  p[1] = static_cast<uint8_t>(w >> 8);
  p[2] = static_cast<uint8_t>(w >> 16);
  p[3] = static_cast<uint8_t>(w >> 24);
}

inline uint32_t load_u32_le(const uint8_t* p) {
  return static_cast<uint32_t>(p[0]) | (static_cast<uint32_t>(p[1]) << 8) |
         (static_cast<uint32_t>(p[2]) << 16) | (static_cast<uint32_t>(p[3]) << 24);
}

// ---- scalar path ------------------------------------------------------------------------------

// One full block of 32 elements starting at x: b plane words at out.
template <typename In, typename T>
inline void pack_block_scalar(const In* x, uint8_t* out, const T* borders, int nb, bool fold,
                              int bits) {
  uint32_t planes[kMaxBits] = {0, 0, 0, 0};
  for (int j = 0; j < kBlock; ++j) {
    const uint32_t c = static_cast<uint32_t>(code_of(math_value<In, T>(x[j]), borders, nb, fold));
    for (int k = 0; k < bits; ++k) planes[k] |= ((c >> k) & 1u) << j;
  }
  for (int k = 0; k < bits; ++k) store_u32_le(out + 4 * k, planes[k]);
}

// The last, partial block of r < 32 elements (x points at its first element) into
// ceil(b*r/8) bytes at out.
template <typename In, typename T>
inline void pack_tail(const In* x, uint8_t* out, int64_t r, const T* borders, int nb, bool fold,
                      int bits) {
  const int64_t nbytes = packed_bytes(r, bits);
  for (int64_t i = 0; i < nbytes; ++i) out[i] = 0;
  for (int64_t j = 0; j < r; ++j) {
    const int c = code_of(math_value<In, T>(x[j]), borders, nb, fold);
    for (int k = 0; k < bits; ++k) {
      const int64_t pos = k * r + j;
      out[pos >> 3] |= static_cast<uint8_t>(((c >> k) & 1) << (pos & 7));
    }
  }
}

template <typename In, typename T>
inline void backward_block_scalar(const In* gy, const uint8_t* planes, In* gx, int64_t r,
                                  const T* levels, int bits) {
  for (int64_t j = 0; j < r; ++j) {
    int c = 0;
    for (int k = 0; k < bits; ++k) {
      const int64_t pos = k * r + j;
      c |= ((planes[pos >> 3] >> (pos & 7)) & 1) << k;
    }
    gx[j] = pypaper::cpu::store_as<In>(scale_grad<T>(math_value<In, T>(gy[j]), levels[c]));
  }
}

// ---- AVX2 path (fp32 math: float, bf16, fp16 storage) -------------------------------------------
#if defined(__AVX2__)

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const bf16* p) {
  // bf16 is the high half of a float: widen and shift.
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m256 load8(const fp16* p) {
#if defined(__F16C__)
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  float t[8];
  for (int i = 0; i < 8; ++i) t[i] = to_float(p[i]);
  return _mm256_loadu_ps(t);
#endif
}
inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
template <typename In>
inline void store8(In* p, __m256 v) {
  // 16-bit stores round to nearest even exactly as c10 does (kernels/cpu/float16.h).
  alignas(32) float t[8];
  _mm256_store_ps(t, v);
  for (int i = 0; i < 8; ++i) p[i] = pypaper::cpu::from_float<In>(t[i]);
}

// Piece (or its parity) of 8 lanes, as int32 lanes.
inline __m256i piece8(__m256 x, const __m256* bord, int nb, bool fold) {
  __m256i p = _mm256_setzero_si256();
  for (int j = 0; j < nb; ++j) {
    // mask lanes are -1: subtracting counts them. !(x <= border): NaN counts (unordered: true)
    p = _mm256_sub_epi32(p, _mm256_castps_si256(_mm256_cmp_ps(x, bord[j], _CMP_NLE_UQ)));
  }
  if (fold) p = _mm256_and_si256(p, _mm256_set1_epi32(1));
  return p;
}

template <typename In>
inline void pack_blocks_avx2(const In* x, uint8_t* out, int64_t nblocks, const float* borders,
                             int nb, bool fold, int bits) {
  __m256 bord[kMaxBorders];
  for (int j = 0; j < nb; ++j) bord[j] = _mm256_set1_ps(borders[j]);
  for (int64_t B = 0; B < nblocks; ++B) {
    const In* xb = x + B * kBlock;
    const __m256i p0 = piece8(load8(xb), bord, nb, fold);
    const __m256i p1 = piece8(load8(xb + 8), bord, nb, fold);
    const __m256i p2 = piece8(load8(xb + 16), bord, nb, fold);
    const __m256i p3 = piece8(load8(xb + 24), bord, nb, fold);
    uint8_t* ob = out + B * 4 * bits;
    for (int k = 0; k < bits; ++k) {
      // bit k of each lane to the sign bit, then one bit per lane
      const int s = 31 - k;
      const uint32_t m0 = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_slli_epi32(p0, s))));
      const uint32_t m1 = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_slli_epi32(p1, s))));
      const uint32_t m2 = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_slli_epi32(p2, s))));
      const uint32_t m3 = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_slli_epi32(p3, s))));
      const uint32_t w = m0 | (m1 << 8) | (m2 << 16) | (m3 << 24);
      memcpy(ob + 4 * k, &w, 4);  // x86 is little-endian: the stream order
    }
  }
}

// Level of 8 lanes whose plane bytes are byte_k (k < bits): idx = sum_k [bit j of byte_k] << k,
// then levels[idx] from registers.
inline __m256 level8(const uint32_t* bytes, int bits, __m256 lo, __m256 hi) {
  const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  __m256i idx = _mm256_setzero_si256();
  for (int k = 0; k < bits; ++k) {
    const __m256i b = _mm256_and_si256(_mm256_set1_epi32(static_cast<int>(bytes[k])), lane_bit);
    const __m256i set = _mm256_cmpeq_epi32(b, lane_bit);
    idx = _mm256_or_si256(idx, _mm256_and_si256(set, _mm256_set1_epi32(1 << k)));
  }
  __m256 lv = _mm256_permutevar8x32_ps(lo, idx);  // low 3 bits of idx
  if (bits == 4) {
    const __m256 lvh = _mm256_permutevar8x32_ps(hi, idx);
    lv = _mm256_blendv_ps(lv, lvh, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));  // bit 3
  }
  return lv;
}

template <typename In>
inline void backward_blocks_avx2(const In* gy, const uint8_t* codes, In* gx, int64_t nblocks,
                                 const float* levels, int bits) {
  float tbl[16] = {0};
  for (int c = 0; c < (1 << bits); ++c) tbl[c] = levels[c];
  const __m256 lo = _mm256_loadu_ps(tbl);
  const __m256 hi = _mm256_loadu_ps(tbl + 8);
  for (int64_t B = 0; B < nblocks; ++B) {
    uint32_t planes[kMaxBits];
    const uint8_t* cb = codes + B * 4 * bits;
    for (int k = 0; k < bits; ++k) memcpy(&planes[k], cb + 4 * k, 4);
    for (int v = 0; v < 4; ++v) {
      uint32_t bytes[kMaxBits];
      for (int k = 0; k < bits; ++k) bytes[k] = (planes[k] >> (8 * v)) & 0xffu;
      const int64_t o = B * kBlock + 8 * v;
      const __m256 lv = level8(bytes, bits, lo, hi);
      // scale_grad: lanes whose level is 0 get +0 (not inf * 0 = NaN, nor -0)
      const __m256 nonzero = _mm256_cmp_ps(lv, _mm256_setzero_ps(), _CMP_NEQ_OQ);
      store8(gx + o, _mm256_and_ps(_mm256_mul_ps(load8(gy + o), lv), nonzero));
    }
  }
}

#endif  // __AVX2__

// ---- entry points -----------------------------------------------------------------------------

// Codes of elements [begin, end) into `codes` (the whole packed buffer). begin is a multiple of
// 32; end is a multiple of 32 or the element count. T is the math type (float, or double for double input).
template <typename In, typename T>
void pack_range(const In* x, uint8_t* codes, int64_t begin, int64_t end,
                const T* borders, int nb, bool fold, int bits) {
  const int64_t full_end = begin + (end - begin) / kBlock * kBlock;
  int64_t B = begin / kBlock;
  const int64_t nblocks = (full_end - begin) / kBlock;
#if defined(__AVX2__)
  if constexpr (sizeof(T) == sizeof(float)) {
    pack_blocks_avx2<In>(x + begin, codes + B * 4 * bits, nblocks, borders, nb, fold, bits);
    B += nblocks;
  }
#endif
  for (; B < full_end / kBlock; ++B) {
    pack_block_scalar<In, T>(x + B * kBlock, codes + B * 4 * bits, borders, nb, fold, bits);
  }
  if (full_end < end) {  // the partial last block
    pack_tail<In, T>(x + full_end, codes + full_end / kBlock * 4 * bits, end - full_end, borders,
                     nb, fold, bits);
  }
}

// dx[i] = levels[code_i] * dy[i] (0 where the level is 0) for i in [begin, end) (same alignment rule as pack_range: a
// partial block is the last one), rounded once to the storage type.
template <typename In, typename T>
void backward_range(const In* gy, const uint8_t* codes, In* gx, int64_t begin, int64_t end,
                    const T* levels, int bits) {
  const int64_t full_end = begin + (end - begin) / kBlock * kBlock;
  int64_t B = begin / kBlock;
#if defined(__AVX2__)
  if constexpr (sizeof(T) == sizeof(float)) {
    const int64_t nblocks = (full_end - begin) / kBlock;
    backward_blocks_avx2<In>(gy + begin, codes + B * 4 * bits, gx + begin, nblocks, levels, bits);
    B += nblocks;
  }
#endif
  for (; B < full_end / kBlock; ++B) {
    backward_block_scalar<In, T>(gy + B * kBlock, codes + B * 4 * bits, gx + B * kBlock, kBlock,
                                 levels, bits);
  }
  if (full_end < end) {
    backward_block_scalar<In, T>(gy + full_end, codes + full_end / kBlock * 4 * bits,
                                 gx + full_end, end - full_end, levels, bits);
  }
}

}  // namespace cpu
}  // namespace fewbit
}  // namespace pypaper
