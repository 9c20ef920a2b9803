// The int4 weight-only linear of the small-batch cases (decoding, M = 1, up to M = 128 rows where
// it still beats dequantize + sgemm; issue #7) on the integer units: the weights stay 4-bit codes, the fp32 activations are rounded per group to 16-bit
// fixed point and split into two signed bytes, and the dot products run on vpdpbusd (AVX-512 VNNI,
// 64 byte products per instruction) or vpmaddubsw (AVX2) straight on the nibbles. The fp32 path it
// replaces widened every nibble to an fp32 lane before its FMA (about 4 instructions per 16
// weights, compute-bound at ~6 weights per cycle); here 128 weights of one row cost ten vector
// instructions on AVX-512 (the whole-group kernels, G = 128 / 256), so one row runs near the speed
// the memory delivers the 0.56 bytes per weight. Kernels: wo_int4_split_{avx2,vnni}_whole (G a
// multiple of 128: one convert and one FMA per group), wo_int4_split_{avx2,vnni} (any G: per-lane
// scales for groups of 32 / 64).
//
// Measured (same process, old vs whole-group kernels, K = N = 4096, L3-resident weights, 2 threads
// of the AVX-512 VNNI Xeon): M = 1 unchanged at G = 128 (0.227 vs 0.232 ms: the row is bound by the
// weight stream, ~19 GB/s per core from L3), 0.91x at G = 256; M = 4: 0.54x (VNNI) / 0.82x (AVX2);
// M = 32: 0.54x / 0.92x at G = 128, 0.48x / 0.86x at G = 256.
//
// Math. Row x, group g of G inputs: sx_g = max_{k in g} |x_k| / 32639, v_k = rint(x_k / sx_g) in
// [-32639, 32639], v_k = 256 h_k + l_k with l_k the low byte of v_k read as a signed byte and
// h_k = (v_k - l_k) / 256: l in [-128, 127], h in [-127, 127] because 32639 = 127 * 256 + 127. With codes q in
// [0, 15], scale s and zero z per (channel n, group g):
//   y_n = sum_g s_ng sx_g (256 sum_k q h + sum_k q l) - sum_g s_ng z_ng X_g + b_n,   X_g = sx_g sum_k v_k
//       = sum_k w_hat_nk x~_k  (up to fp32 rounding),   x~_k = sx_g v_k,   |x~_k - x_k| <= 0.51 sx_g
// (half a step, plus 2^-8 of a step for the fp32 rounding of sx_g and of 1 / sx_g).
// So the result is the exact product of the dequantized weights with x rounded to 2^-16 of its
// group's largest magnitude: ~2000x finer than the int4 weights' own rounding (s / 2 with s =
// range / 15), finer than bf16 or TF32 inputs. Integer ranges per 32-bit lane and 128-input chunk:
// two vpdpbusd of 4 products: |sum q h| <= 8 * 15 * 127 = 15240, so 256 |sum q h| + |sum q l| < 2^22:
// exact in int32 and in the conversion to fp32 (< 2^24). vpmaddubsw pairs: 2 * 15 * 128 < 2^15.
// Non-finite activations give NaN outputs (the group's scale is NaN).
//
// Split-activation layout (SplitAct), per row and 128-input chunk c, 256 bytes, paired with the
// weight bytes of kernels/common/qlinear_math.h (block b = k / 32 keeps k % 32 < 16 in the low
// nibble of byte 16 b + k % 16, k % 32 >= 16 in the high nibble):
//   [  0,  64) h of the low-nibble partners:  byte 16 b + j  <->  k = 128 c + 32 b + j
//   [ 64, 128) h of the high-nibble partners: byte 16 b + j  <->  k = 128 c + 32 b + 16 + j
//   [128, 256) l, the same two halves.
// A 64-byte weight load (4 blocks) meets 64-byte digit loads; AVX2's 32-byte halves meet halves.
// The int32 lane i of an accumulator (bytes 4i..4i+3) holds products of block i / 4 only, so
// lane_sx[r][4 * block + t] = sx of that block's group (t = 0..3) scales a lane with one multiply,
// whatever G is (32: 4 groups per chunk; 64: 2; 128, 256: 1). Chunks past K are zero.
#pragma once
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "qlinear_cpu.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace pypaper {
namespace qlinear {
namespace cpu {

constexpr int32_t kSplitMax = 32639;  // 127 * 256 + 127: h stays within [-127, 127]
constexpr int64_t kSplitChunk = 128;  // inputs per chunk (one 64-byte weight load)
// Software prefetch of the weight stream, two distances: 4 KiB ahead into L1 (two rows at
// K = 4096) and 32 KiB ahead into L2, for the DRAM latency. The hardware prefetchers alone left one
// core at ~19 GB/s from L3 (15 weights / cycle); measured at M = 1, K = N = 4096, 2 threads:
// L1 distance 1, 2, 4, 8 rows: 25.5, 26.6, 25.3, 22 GB/s (L3-resident, one core); adding the L2
// prefetch: 37 -> 42.6 GB/s with the weights in L3, 24.9 -> 26.9 GB/s streamed from DRAM.
constexpr int64_t kPrefetchBytes = 4096;
constexpr int64_t kPrefetchL2Bytes = 32768;

struct SplitAct {
  int64_t rows = 0, K = 0, G = 0, groups = 0, chunks = 0;
  std::vector<int8_t> digits;  // [rows][chunks][256], the layout above
  std::vector<float> lane_sx;  // [rows][chunks * 16]
  std::vector<float> xsum;     // [rows][groups]: X_g = sx_g * sum_k v_k
  std::vector<float> group_sx; // [rows][groups]: sx_g (what lane_sx repeats per lane)
  std::vector<int32_t> block_group;  // [K / 32]: 32 b / G, the group of block b (no division per step)
};

// The 16-bit fixed point of a group x[0, n): sx = max |x| / kSplitMax, NaN when an input is not
// finite (its values then stay 0); *inv = kSplitMax / max |x| (0 for an all-zero group).
inline float fixed16_scale(const float* x, int64_t n, float* inv) {
  float amax = 0.f;
  bool finite = true;
  for (int64_t k = 0; k < n; ++k) {
    finite = finite && std::isfinite(x[k]);
    amax = std::fmax(amax, std::fabs(x[k]));
  }
  *inv = (finite && amax > 0.f) ? static_cast<float>(kSplitMax) / amax : 0.f;
  return finite ? amax / static_cast<float>(kSplitMax) : NAN;
}

// v = rint(x * inv) clamped to [-kSplitMax, kSplitMax].
inline int32_t fixed16_value(float x, float inv) {
  const int32_t v = static_cast<int32_t>(std::nearbyint(x * inv));
  return std::min(kSplitMax, std::max(-kSplitMax, v));
}

#if PYPAPER_QL_AVX2
// fixed16_scale for n % 8 == 0, eight lanes at a time.
inline float fixed16_scale_avx2(const float* x, int64_t n, float* inv) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 amax = _mm256_setzero_ps(), fin = _mm256_setzero_ps();
  for (int64_t k = 0; k < n; k += 8) {
    const __m256 v = _mm256_loadu_ps(x + k);
    amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v));
    fin = _mm256_add_ps(fin, _mm256_mul_ps(v, _mm256_setzero_ps()));  // NaN iff an input is inf / NaN
  }
  float m[8], f[8];
  _mm256_storeu_ps(m, amax);
  _mm256_storeu_ps(f, fin);
  float am = 0.f, fs = 0.f;
  for (int i = 0; i < 8; ++i) {
    am = std::max(am, m[i]);
    fs += f[i];
  }
  if (fs != 0.f || !(fs == fs)) {
    *inv = 0.f;
    return NAN;
  }
  *inv = am > 0.f ? static_cast<float>(kSplitMax) / am : 0.f;
  return am / static_cast<float>(kSplitMax);
}

// fixed16_value of eight lanes (cvtps rounds to nearest even, as nearbyint does).
inline __m256i fixed16_values_avx2(const float* x, __m256 inv) {
  const __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x), inv));
  return _mm256_max_epi32(_mm256_set1_epi32(-kSplitMax), _mm256_min_epi32(_mm256_set1_epi32(kSplitMax), v));
}

// 16 int32 in [-128, 127] (a: the first 8, b: the next 8) -> 16 bytes at dst, in order.
inline void store_bytes16(__m256i a, __m256i b, int8_t* dst) {
  const __m256i w = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8);  // a0..7 | b0..7 (s16)
  const __m256i p = _mm256_packs_epi16(w, w);  // lane 0: a0..7 a0..7, lane 1: b0..7 b0..7
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst),
                   _mm_unpacklo_epi64(_mm256_castsi256_si128(p), _mm256_extracti128_si256(p, 1)));
}

// One group of one row: x[0, G) -> digits at their positions (dr: the row's digits, k0: the
// group's first input), returns sx; *vsum = sum of v.
inline float split_group_avx2(const float* x, int64_t k0, int64_t G, int8_t* dr, int64_t* vsum) {
  float inv_s;
  const float sx = fixed16_scale_avx2(x, G, &inv_s);
  if (!(sx == sx)) {  // a non-finite input: leave the digits 0, sx NaN
    *vsum = 0;
    return sx;
  }
  const __m256 inv = _mm256_set1_ps(inv_s);
  __m256i acc = _mm256_setzero_si256();
  for (int64_t k = 0; k < G; k += 16) {  // 16 inputs: one half of a 32-input block
    __m256i v[2], h[2], l[2];
    for (int t = 0; t < 2; ++t) {
      v[t] = fixed16_values_avx2(x + k + 8 * t, inv);
      l[t] = _mm256_srai_epi32(_mm256_slli_epi32(v[t], 24), 24);
      h[t] = _mm256_srai_epi32(_mm256_sub_epi32(v[t], l[t]), 8);
      acc = _mm256_add_epi32(acc, v[t]);
    }
    const int64_t kk = k0 + k;
    int8_t* d = dr + (kk / 128) * 256 + ((kk % 32) >= 16 ? 64 : 0) + ((kk % 128) / 32) * 16;
    store_bytes16(h[0], h[1], d);
    store_bytes16(l[0], l[1], d + 128);
  }
  int32_t a8[8];
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(a8), acc);
  int64_t sum = 0;
  for (int i = 0; i < 8; ++i) sum += a8[i];
  *vsum = sum;
  return sx;
}
#endif

// Sizes the buffers of `rows` rows of K inputs in groups of G (a multiple of 32 dividing K).
inline void split_prepare(int64_t rows, int64_t K, int64_t G, SplitAct& a) {
  a.rows = rows;
  a.K = K;
  a.G = G;
  a.groups = K / G;
  a.chunks = (K + kSplitChunk - 1) / kSplitChunk;
  a.digits.assign(static_cast<size_t>(rows * a.chunks * 256), 0);
  a.lane_sx.assign(static_cast<size_t>(rows * a.chunks * 16), 0.f);
  a.xsum.assign(static_cast<size_t>(rows * a.groups), 0.f);
  a.group_sx.assign(static_cast<size_t>(rows * a.groups), 0.f);
  a.block_group.resize(static_cast<size_t>(K / 32));
  for (int64_t b = 0; b < K / 32; ++b) a.block_group[b] = static_cast<int32_t>(32 * b / G);
}

// Rows [r0, r1) of x (row stride ldx; row r of x is row r of the SplitAct) after split_prepare;
// disjoint row ranges may run in parallel.
inline void split_rows(const float* x, int64_t ldx, int64_t r0, int64_t r1, SplitAct& a) {
  const int64_t G = a.G;
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = x + r * ldx;
    int8_t* dr = a.digits.data() + r * a.chunks * 256;
    for (int64_t g = 0; g < a.groups; ++g) {
      int64_t vsum = 0;
#if PYPAPER_QL_AVX2
      const float sx = split_group_avx2(xr + g * G, g * G, G, dr, &vsum);
#else
      float inv;
      const float sx = fixed16_scale(xr + g * G, G, &inv);
      for (int64_t k = g * G; sx == sx && k < (g + 1) * G; ++k) {
        const int32_t v = fixed16_value(xr[k], inv);
        const int8_t l = static_cast<int8_t>(static_cast<uint8_t>(v & 0xFF));
        const int64_t pos = (k / 128) * 256 + ((k % 32) >= 16 ? 64 : 0) + ((k % 128) / 32) * 16 + k % 16;
        dr[pos] = static_cast<int8_t>((v - l) / 256);
        dr[pos + 128] = l;
        vsum += v;
      }
#endif
      a.xsum[r * a.groups + g] = sx * static_cast<float>(vsum);
      a.group_sx[r * a.groups + g] = sx;
      for (int64_t blk = g * G / 32; blk < (g + 1) * G / 32; ++blk)
        for (int t = 0; t < 4; ++t) a.lane_sx[r * a.chunks * 16 + 4 * blk + t] = sx;
    }
  }
}

// All rows [0, rows) of x, serially.
inline void split_activations(const float* x, int64_t ldx, int64_t rows, int64_t K, int64_t G,
                              SplitAct& a) {
  split_prepare(rows, K, G, a);
  split_rows(x, ldx, 0, rows, a);
}

// f(std::integral_constant<int, rows>{}) for rows in 1 .. kWoRows (a kernel templated on its row
// count, called with a runtime count).
template <typename F>
inline void with_rows(int rows, F&& f) {
  switch (rows) {
    case 4: f(std::integral_constant<int, 4>{}); return;
    case 3: f(std::integral_constant<int, 3>{}); return;
    case 2: f(std::integral_constant<int, 2>{}); return;
    default: f(std::integral_constant<int, 1>{}); return;
  }
}

// The digits, lane scales and group scales of rows m0 .. m0 + R - 1.
template <int R>
struct RowPtrs {
  const int8_t* dig[R];
  const float* lsx[R];
  const float* gsx[R];
  RowPtrs(const SplitAct& a, int64_t m0) {
    for (int r = 0; r < R; ++r) {
      dig[r] = a.digits.data() + (m0 + r) * a.chunks * 256;
      lsx[r] = a.lane_sx.data() + (m0 + r) * a.chunks * 16;
      gsx[r] = a.group_sx.data() + (m0 + r) * a.groups;
    }
  }
};

#if PYPAPER_QL_AVX2
// The whole-group kernels scale a group's integer sum once, by p_rg = s_ng sx_rg, precomputed
// for kScaleBlock groups at a time into a stack buffer, 8 per instruction.
constexpr int64_t kScaleBlock = 64;
template <int R>
inline void group_products(const float* s, const float* const* gsx, int64_t g0, int64_t gn,
                           float (*p)[kScaleBlock]) {
  for (int r = 0; r < R; ++r) {
    int64_t j = 0;
    for (; j + 8 <= gn; j += 8)
      _mm256_store_ps(p[r] + j, _mm256_mul_ps(_mm256_loadu_ps(s + g0 + j), _mm256_loadu_ps(gsx[r] + g0 + j)));
    for (; j < gn; ++j) p[r][j] = s[g0 + j] * gsx[r][g0 + j];
  }
}

// corr[r] = sum_g s_g z_g X_rg for R rows (the zero-point term), 8 groups per step.
template <int R>
inline void zero_terms_avx2(const float* s, const float* z, const float* xs, int64_t groups,
                            float* corr) {
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  int64_t g = 0;
  for (; g + 8 <= groups; g += 8) {
    const __m256 sz = _mm256_mul_ps(_mm256_loadu_ps(s + g), _mm256_loadu_ps(z + g));
    for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_ps(sz, _mm256_loadu_ps(xs + r * groups + g), acc[r]);
  }
  for (int r = 0; r < R; ++r) {
    corr[r] = hsum256(acc[r]);
    for (int64_t t = g; t < groups; ++t) corr[r] += s[t] * z[t] * xs[r * groups + t];
  }
}

// AVX2: a 64-input piece (32 weight bytes, 2 blocks) per step; vpmaddubsw (u8 codes x s8 digits ->
// s16 pairs), the two nibble halves added in s16 (|.| <= 4 * 15 * 128 = 7680), then vpmaddwd by 256 (h) and by 1
// (l) into eight int32 lanes, converted once and scaled per lane.
template <int R>
inline void wo_int4_split_avx2(const SplitAct& a, int64_t m0, const uint8_t* wq, const float* scale,
                               const float* zero, const float* bias, int64_t n0, int64_t n1,
                               float* y, int64_t ldy) {
  const int64_t K = a.K, G = a.G, groups = a.groups;
  const int64_t pieces = (K + 63) / 64, full = K / 64;
  const __m256i nib = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1), c256 = _mm256_set1_epi16(256);
  const __m256i tail_mask = _mm256_setr_epi32(-1, -1, -1, -1, 0, 0, 0, 0);  // K % 64 == 32: one block
  const RowPtrs<R> rp(a, m0);
  const int8_t* const* dig = rp.dig;
  const float* const* lsx = rp.lsx;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wr = wq + n * (K / 2);
    const float* sr = scale + n * groups;
    __m256 accf[R];
    for (int r = 0; r < R; ++r) accf[r] = _mm256_setzero_ps();
    // G >= 128: both 64-input pieces of a chunk share the group and its scales, so their s16
    // pair sums are added before one vpmaddwd pair (|ph| <= 2 * 7680 < 2^15) and one
    // convert / scale: 20 instructions per row and 128 weights instead of 24.
    const int64_t pairs = G >= 128 ? K / 128 : 0;
    for (int64_t c = 0; c < pairs; ++c) {
      _mm_prefetch(reinterpret_cast<const char*>(wr + kPrefetchBytes + 64 * c), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(wr + kPrefetchL2Bytes + 64 * c), _MM_HINT_T1);
      const __m256i wa = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + 64 * c));
      const __m256i wb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + 64 * c + 32));
      const __m256i lo0 = _mm256_and_si256(wa, nib), hi0 = _mm256_and_si256(_mm256_srli_epi16(wa, 4), nib);
      const __m256i lo1 = _mm256_and_si256(wb, nib), hi1 = _mm256_and_si256(_mm256_srli_epi16(wb, 4), nib);
      const __m256 vsw = _mm256_set1_ps(sr[a.block_group[4 * c]]);
      const auto mb = [](__m256i u, const int8_t* q) {
        return _mm256_maddubs_epi16(u, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)));
      };
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const int8_t* d = dig[r] + 256 * c;
        const __m256i ph = _mm256_add_epi16(_mm256_add_epi16(mb(lo0, d), mb(hi0, d + 64)),
                                            _mm256_add_epi16(mb(lo1, d + 32), mb(hi1, d + 96)));
        const __m256i pl = _mm256_add_epi16(_mm256_add_epi16(mb(lo0, d + 128), mb(hi0, d + 192)),
                                            _mm256_add_epi16(mb(lo1, d + 160), mb(hi1, d + 224)));
        const __m256i acc = _mm256_add_epi32(_mm256_madd_epi16(ph, c256), _mm256_madd_epi16(pl, ones));
        accf[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), _mm256_mul_ps(vsw, _mm256_loadu_ps(lsx[r] + 16 * c)), accf[r]);
      }
    }
    for (int64_t p = 2 * pairs; p < pieces; ++p) {
      if (p % 2 == 0) {
        _mm_prefetch(reinterpret_cast<const char*>(wr + kPrefetchBytes + 32 * p), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(wr + kPrefetchL2Bytes + 32 * p), _MM_HINT_T1);
      }
      const __m256i wb = p < full ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + 32 * p))
                                  : _mm256_maskload_epi32(reinterpret_cast<const int*>(wr + 32 * p), tail_mask);
      __m256 vsw;
      if (G >= 64) {
        vsw = _mm256_set1_ps(sr[a.block_group[2 * p]]);
      } else {  // G = 32: block 2p in lanes 0..3, block 2p + 1 (if any) in lanes 4..7
        const float s1 = 2 * p + 1 < groups ? sr[2 * p + 1] : 0.f;
        vsw = _mm256_set_m128(_mm_set1_ps(s1), _mm_set1_ps(sr[2 * p]));
      }
      const __m256i lo = _mm256_and_si256(wb, nib);
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(wb, 4), nib);
      const int64_t off = (p / 2) * 256 + 32 * (p % 2);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const int8_t* d = dig[r] + off;
        const __m256i ph = _mm256_add_epi16(
            _mm256_maddubs_epi16(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(d))),
            _mm256_maddubs_epi16(hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(d + 64))));
        const __m256i pl = _mm256_add_epi16(
            _mm256_maddubs_epi16(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(d + 128))),
            _mm256_maddubs_epi16(hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(d + 192))));
        const __m256i acc = _mm256_add_epi32(_mm256_madd_epi16(ph, c256), _mm256_madd_epi16(pl, ones));
        accf[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), _mm256_mul_ps(vsw, _mm256_loadu_ps(lsx[r] + 8 * p)), accf[r]);
      }
    }
    float corr[R];
    zero_terms_avx2<R>(sr, zero + n * groups, a.xsum.data() + m0 * groups, groups, corr);
    for (int r = 0; r < R; ++r) y[r * ldy + n] = hsum256(accf[r]) - corr[r] + (bias ? bias[n] : 0.f);
  }
}

// AVX2, groups of CPG whole chunks (G = 128 CPG), the AVX2 twin of wo_int4_split_vnni_whole below:
// the s16 pair sums of a whole group (8 CPG vpmaddubsw per digit byte, |.| <= 8 CPG * 2 * 15 * 128
// = 30720 at CPG = 2, below 2^15) are added before one vpmaddwd pair, one convert and one FMA by
// the precomputed p_rg = s_ng sx_rg. No per-chunk group lookup or lane-scale multiply.
template <int R, int CPG>
inline void wo_int4_split_avx2_whole(const SplitAct& a, int64_t m0, const uint8_t* wq,
                                     const float* scale, const float* zero, const float* bias,
                                     int64_t n0, int64_t n1, float* y, int64_t ldy) {
  static_assert(CPG == 1 || CPG == 2, "one or two chunks per group");
  const int64_t K = a.K, groups = a.groups;
  const __m256i nib = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1), c256 = _mm256_set1_epi16(256);
  const RowPtrs<R> rp(a, m0);
  const int8_t* const* dig = rp.dig;
  const float* const* gsx = rp.gsx;
  alignas(32) float p[R][kScaleBlock];
  const auto mb = [](__m256i u, const int8_t* q) {
    return _mm256_maddubs_epi16(u, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)));
  };
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wr = wq + n * (K / 2);
    const float* sr = scale + n * groups;
    __m256 accf[R];
    for (int r = 0; r < R; ++r) accf[r] = _mm256_setzero_ps();
    for (int64_t g0 = 0; g0 < groups; g0 += kScaleBlock) {
      const int64_t gn = std::min(kScaleBlock, groups - g0);
      group_products<R>(sr, gsx, g0, gn, p);
      for (int64_t j = 0; j < gn; ++j) {
        const uint8_t* wg = wr + (g0 + j) * (CPG * 64);
        __m256i lo[2 * CPG], hi[2 * CPG];  // 32-byte halves: inputs 0..63 and 64..127 of a chunk
        for (int c = 0; c < CPG; ++c) {
          _mm_prefetch(reinterpret_cast<const char*>(wg + kPrefetchBytes + 64 * c), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(wg + kPrefetchL2Bytes + 64 * c), _MM_HINT_T1);
          for (int h = 0; h < 2; ++h) {
            const __m256i wb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + 64 * c + 32 * h));
            lo[2 * c + h] = _mm256_and_si256(wb, nib);
            hi[2 * c + h] = _mm256_and_si256(_mm256_srli_epi16(wb, 4), nib);
          }
        }
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {
          const int8_t* d = dig[r] + (g0 + j) * (CPG * 256);
          __m256i ph = _mm256_setzero_si256(), pl = _mm256_setzero_si256();
          for (int c = 0; c < CPG; ++c) {
            const int8_t* dc = d + 256 * c;
            ph = _mm256_add_epi16(ph, _mm256_add_epi16(_mm256_add_epi16(mb(lo[2 * c], dc), mb(hi[2 * c], dc + 64)),
                                                       _mm256_add_epi16(mb(lo[2 * c + 1], dc + 32), mb(hi[2 * c + 1], dc + 96))));
            pl = _mm256_add_epi16(pl, _mm256_add_epi16(_mm256_add_epi16(mb(lo[2 * c], dc + 128), mb(hi[2 * c], dc + 192)),
                                                       _mm256_add_epi16(mb(lo[2 * c + 1], dc + 160), mb(hi[2 * c + 1], dc + 224))));
          }
          const __m256i acc = _mm256_add_epi32(_mm256_madd_epi16(ph, c256), _mm256_madd_epi16(pl, ones));
          accf[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), _mm256_broadcast_ss(&p[r][j]), accf[r]);
        }
      }
    }
    float corr[R];
    zero_terms_avx2<R>(sr, zero + n * groups, a.xsum.data() + m0 * groups, groups, corr);
    for (int r = 0; r < R; ++r) y[r * ldy + n] = hsum256(accf[r]) - corr[r] + (bias ? bias[n] : 0.f);
  }
}
#endif

#if PYPAPER_QL_VNNI
// vpdpbusd with the signed operand allowed in memory (one fused load + multiply-add).
inline __m512i dpbusd_m(__m512i acc, __m512i u, const int8_t* s) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u), "m"(*reinterpret_cast<const __m512i*>(s)));
  return acc;
}

// AVX-512 VNNI: a 128-input chunk (64 weight bytes, 4 blocks) per step, one chain per row:
// acc = (q.h_lo + q.h_hi) << 8, then += q.l_lo + q.l_hi (four vpdpbusd), converted once and scaled
// per lane by s_ng * sx_g.
template <int R>
inline void wo_int4_split_vnni(const SplitAct& a, int64_t m0, const uint8_t* wq, const float* scale,
                               const float* zero, const float* bias, int64_t n0, int64_t n1,
                               float* y, int64_t ldy) {
  const int64_t K = a.K, G = a.G, groups = a.groups, chunks = a.chunks;
  const int64_t full = K / kSplitChunk;
  const int64_t per_chunk = G >= kSplitChunk ? 1 : kSplitChunk / G;  // groups per chunk
  const __m512i nib = _mm512_set1_epi8(0x0F);
  // lane i -> group offset within the chunk: block i / 4 starts at input 32 (i / 4).
  alignas(64) int32_t idx[16];
  for (int i = 0; i < 16; ++i) idx[i] = G >= kSplitChunk ? 0 : static_cast<int32_t>(32 * (i / 4) / G);
  const __m512i gidx = _mm512_load_si512(idx);
  const __mmask64 tail_bytes = (K / 2) % 64 ? ((__mmask64{1} << ((K / 2) % 64)) - 1) : ~__mmask64{0};
  const RowPtrs<R> rp(a, m0);
  const int8_t* const* dig = rp.dig;
  const float* const* lsx = rp.lsx;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wr = wq + n * (K / 2);
    const float* sr = scale + n * groups;
    __m512 accf[R];
    for (int r = 0; r < R; ++r) accf[r] = _mm512_setzero_ps();
    for (int64_t c = 0; c < chunks; ++c) {
      _mm_prefetch(reinterpret_cast<const char*>(wr + kPrefetchBytes + 64 * c), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(wr + kPrefetchL2Bytes + 64 * c), _MM_HINT_T1);
      const __m512i wb = c < full ? _mm512_loadu_si512(wr + 64 * c) : _mm512_maskz_loadu_epi8(tail_bytes, wr + 64 * c);
      __m512 vsw;
      if (per_chunk == 1) {
        vsw = _mm512_set1_ps(sr[a.block_group[4 * c]]);
      } else {
        const int64_t cnt = std::min<int64_t>(per_chunk, groups - c * per_chunk);
        vsw = _mm512_permutexvar_ps(gidx, _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << cnt) - 1), sr + c * per_chunk));
      }
      const __m512i lo = _mm512_and_si512(wb, nib);
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(wb, 4), nib);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const int8_t* d = dig[r] + c * 256;
        __m512i acc = dpbusd_m(_mm512_setzero_si512(), lo, d);
        acc = dpbusd_m(acc, hi, d + 64);
        acc = _mm512_slli_epi32(acc, 8);
        acc = dpbusd_m(acc, lo, d + 128);
        acc = dpbusd_m(acc, hi, d + 192);
        accf[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_mul_ps(vsw, _mm512_loadu_ps(lsx[r] + 16 * c)), accf[r]);
      }
    }
    float corr[R];
    zero_terms_avx2<R>(sr, zero + n * groups, a.xsum.data() + m0 * groups, groups, corr);
    for (int r = 0; r < R; ++r) y[r * ldy + n] = _mm512_reduce_add_ps(accf[r]) - corr[r] + (bias ? bias[n] : 0.f);
  }
}

// AVX-512 VNNI, groups of CPG whole chunks (G = 128 CPG): the kernel of M = 1 decoding at the usual
// G = 128 / 256. A group's int32 sums are finished before one convert and one FMA by
// p_rg = s_ng sx_rg (a broadcast operand, precomputed per channel for 64 groups at a time), so a
// 128-input chunk of one row costs ten vector instructions: three to unpack the nibbles (the
// weight bytes read as memory operands), four vpdpbusd, the shift, and per group one convert and
// one FMA. (The general kernel above rebuilds the lane scale per chunk; with its group lookup and
// address arithmetic it ran ~35 instructions per chunk, compute-bound at ~14 weights per cycle.)
// Ranges: CPG <= 2 chunks per lane: 256 * 2 * 15240 + 2 * 4 * 2 * 15 * 128 < 2^23, exact in int32
// and in the conversion to fp32.
template <int R, int CPG>
inline void wo_int4_split_vnni_whole(const SplitAct& a, int64_t m0, const uint8_t* wq,
                                     const float* scale, const float* zero, const float* bias,
                                     int64_t n0, int64_t n1, float* y, int64_t ldy) {
  static_assert(CPG == 1 || CPG == 2, "one or two chunks per group");
  const int64_t K = a.K, groups = a.groups;
  const __m512i nib = _mm512_set1_epi8(0x0F);
  const RowPtrs<R> rp(a, m0);
  const int8_t* const* dig = rp.dig;
  const float* const* gsx = rp.gsx;
  alignas(64) float p[R][kScaleBlock];
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wr = wq + n * (K / 2);
    const float* sr = scale + n * groups;
    __m512 accf[R];
    for (int r = 0; r < R; ++r) accf[r] = _mm512_setzero_ps();
    for (int64_t g0 = 0; g0 < groups; g0 += kScaleBlock) {
      const int64_t gn = std::min(kScaleBlock, groups - g0);
      group_products<R>(sr, gsx, g0, gn, p);
      for (int64_t j = 0; j < gn; ++j) {
        const uint8_t* wg = wr + (g0 + j) * (CPG * 64);
        __m512i lo[CPG], hi[CPG];
        for (int c = 0; c < CPG; ++c) {
          _mm_prefetch(reinterpret_cast<const char*>(wg + kPrefetchBytes + 64 * c), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(wg + kPrefetchL2Bytes + 64 * c), _MM_HINT_T1);
          const __m512i wb = _mm512_loadu_si512(wg + 64 * c);
          lo[c] = _mm512_and_si512(wb, nib);
          hi[c] = _mm512_and_si512(_mm512_srli_epi16(wb, 4), nib);
        }
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {
          const int8_t* d = dig[r] + (g0 + j) * (CPG * 256);
          __m512i acc = _mm512_setzero_si512();
          for (int c = 0; c < CPG; ++c) {
            acc = dpbusd_m(acc, lo[c], d + 256 * c);
            acc = dpbusd_m(acc, hi[c], d + 256 * c + 64);
          }
          acc = _mm512_slli_epi32(acc, 8);
          for (int c = 0; c < CPG; ++c) {
            acc = dpbusd_m(acc, lo[c], d + 256 * c + 128);
            acc = dpbusd_m(acc, hi[c], d + 256 * c + 192);
          }
          accf[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_set1_ps(p[r][j]), accf[r]);
        }
      }
    }
    float corr[R];
    zero_terms_avx2<R>(sr, zero + n * groups, a.xsum.data() + m0 * groups, groups, corr);
    for (int r = 0; r < R; ++r) y[r * ldy + n] = _mm512_reduce_add_ps(accf[r]) - corr[r] + (bias ? bias[n] : 0.f);
  }
}
#endif

// Whether `isa` has a split-activation kernel (the scalar path keeps fp32 activations:
// wo_int4_scalar).
inline bool has_int4_split(Isa isa) {
  return (isa == Isa::kVnni && PYPAPER_QL_VNNI) || (isa == Isa::kAvx2 && PYPAPER_QL_AVX2);
}

// Rows [m0, m0 + rows) (rows <= kWoRows) of y (row stride ldy) for channels [n0, n1) on the
// kernel of `isa` (has_int4_split(isa) must hold). (8 rows per pass on AVX-512 was measured
// 1.5-2.5x slower than 4 at M = 16..128: the accumulators and row pointers spill.)
inline void wo_int4_split_rows(Isa isa, const SplitAct& a, int64_t m0, int rows, const uint8_t* wq,
                               const float* scale, const float* zero, const float* bias,
                               int64_t n0, int64_t n1, float* y, int64_t ldy) {
#if PYPAPER_QL_VNNI
  if (isa == Isa::kVnni) {
    if (a.G == 128)
      with_rows(rows, [&](auto r) { wo_int4_split_vnni_whole<r(), 1>(a, m0, wq, scale, zero, bias, n0, n1, y, ldy); });
    else if (a.G == 256)
      with_rows(rows, [&](auto r) { wo_int4_split_vnni_whole<r(), 2>(a, m0, wq, scale, zero, bias, n0, n1, y, ldy); });
    else
      with_rows(rows, [&](auto r) { wo_int4_split_vnni<r()>(a, m0, wq, scale, zero, bias, n0, n1, y, ldy); });
    return;
  }
#endif
#if PYPAPER_QL_AVX2
  if (isa == Isa::kAvx2) {
    if (a.G == 128)
      with_rows(rows, [&](auto r) { wo_int4_split_avx2_whole<r(), 1>(a, m0, wq, scale, zero, bias, n0, n1, y, ldy); });
    else if (a.G == 256)
      with_rows(rows, [&](auto r) { wo_int4_split_avx2_whole<r(), 2>(a, m0, wq, scale, zero, bias, n0, n1, y, ldy); });
    else
      with_rows(rows, [&](auto r) { wo_int4_split_avx2<r()>(a, m0, wq, scale, zero, bias, n0, n1, y, ldy); });
  }
#endif
}

}  // namespace cpu
}  // namespace qlinear
}  // namespace pypaper

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
