// The int8 weight-only linear at M <= 128 rows on AVX-512 VNNI (issue #7): the same idea as the
// int4 kernels of qlinear_int4_split.h. The fp32 activations are rounded to 16-bit fixed point per
// chunk of 64 inputs and split into two signed bytes, v = 256 h + l (kSplitMax, as there), and the
// dot products run on vpdpbusd straight on the int8 codes instead of widening every code to fp32.
//
// Math. vpdpbusd multiplies unsigned by signed bytes; the codes w in [-127, 127] become unsigned
// as u = w + 128 (one xor with 0x80), so that with chunk c of row x (scale sx_c, v_k = rint(x_k /
// sx_c)) and weight scale s_g of the chunk's group g:
//   y_n = sum_c s_g sx_c sum_k u_k v_k - 128 sum_g s_g X_g + b_n,   X_g = sum_{c in g} sx_c sum_k v_k
// (the term 128 sum v is the zero point 128 of the u codes). The result is the exact product of
// the dequantized weights with x~ = sx v, |x~ - x| <= 0.51 sx_c (2^-16 of the chunk's largest
// magnitude). Per 32-bit lane and chunk: |sum u h| <= 4 * 255 * 127, times 256 plus |sum u l|
// < 2^25: exact in int32; the conversion to fp32 rounds it by at most 2^-24 relative.
//
// Layout (SplitAct8): per row and chunk c, 128 bytes: h of inputs 64 c .. 64 c + 63, then their l;
// chunks past K are zero. Weight groups must be whole chunks (G % 64 == 0) or the whole row
// (per-channel scales, any K); callers check `int8_split_ok`.
#pragma once
#include <cstdint>
#include <vector>

#include "qlinear_int4_split.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace pypaper {
namespace qlinear {
namespace cpu {

constexpr int64_t kSplit8Chunk = 64;

// Whether the int8 weight-only linear of this shape has a split kernel on `isa`.
inline bool int8_split_ok(Isa isa, int64_t K, int64_t G) {
  return isa == Isa::kVnni && PYPAPER_QL_VNNI && K > 0 && (G == K || G % kSplit8Chunk == 0);
}

struct SplitAct8 {
  int64_t rows = 0, K = 0, G = 0, groups = 0, chunks = 0;
  std::vector<int8_t> digits;        // [rows][chunks][128]
  std::vector<float> sx;             // [rows][chunks]
  std::vector<float> xsum;           // [rows][groups]: X_g
  std::vector<int32_t> chunk_group;  // [chunks]: 64 c / G
};

inline void split8_prepare(int64_t rows, int64_t K, int64_t G, SplitAct8& a) {
  a.rows = rows;
  a.K = K;
  a.G = G;
  a.groups = K / G;
  a.chunks = (K + kSplit8Chunk - 1) / kSplit8Chunk;
  a.digits.assign(static_cast<size_t>(rows * a.chunks * 128), 0);
  a.sx.assign(static_cast<size_t>(rows * a.chunks), 0.f);
  a.xsum.assign(static_cast<size_t>(rows * a.groups), 0.f);
  a.chunk_group.resize(static_cast<size_t>(a.chunks));
  for (int64_t c = 0; c < a.chunks; ++c)
    a.chunk_group[c] = static_cast<int32_t>(G == K ? 0 : kSplit8Chunk * c / G);
}

#if PYPAPER_QL_VNNI
// Rows [r0, r1) of x (row stride ldx) after split8_prepare; disjoint ranges may run in parallel.
inline void split8_rows(const float* x, int64_t ldx, int64_t r0, int64_t r1, SplitAct8& a) {
  const __m512 sign = _mm512_set1_ps(-0.f);
  const __m512i hi_lim = _mm512_set1_epi32(kSplitMax), lo_lim = _mm512_set1_epi32(-kSplitMax);
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = x + r * ldx;
    for (int64_t c = 0; c < a.chunks; ++c) {
      const int64_t k0 = c * kSplit8Chunk, kn = std::min(kSplit8Chunk, a.K - k0);
      __m512 v[4];
      __m512 amax = _mm512_setzero_ps(), fin = _mm512_setzero_ps();
      for (int q = 0; q < 4; ++q) {
        const int64_t left = std::max<int64_t>(0, std::min<int64_t>(16, kn - 16 * q));
        const __mmask16 m = static_cast<__mmask16>((uint32_t{1} << left) - 1);
        v[q] = _mm512_maskz_loadu_ps(m, xr + k0 + 16 * q);
        amax = _mm512_max_ps(amax, _mm512_andnot_ps(sign, v[q]));
        fin = _mm512_add_ps(fin, _mm512_mul_ps(v[q], _mm512_setzero_ps()));  // NaN iff inf / NaN
      }
      const float am = _mm512_reduce_max_ps(amax), fs = _mm512_reduce_add_ps(fin);
      const bool finite = fs == 0.f;
      const float s = finite ? am / static_cast<float>(kSplitMax) : NAN;
      a.sx[r * a.chunks + c] = s;
      if (!finite) {  // digits stay 0; the NaN scale makes the row's outputs NaN
        a.xsum[r * a.groups + a.chunk_group[c]] = NAN;
        continue;
      }
      const __m512 inv = _mm512_set1_ps(am > 0.f ? static_cast<float>(kSplitMax) / am : 0.f);
      int8_t* d = a.digits.data() + (r * a.chunks + c) * 128;
      __m512i vs = _mm512_setzero_si512();
      for (int q = 0; q < 4; ++q) {
        __m512i iv = _mm512_cvtps_epi32(_mm512_mul_ps(v[q], inv));  // round to nearest even
        iv = _mm512_max_epi32(lo_lim, _mm512_min_epi32(hi_lim, iv));
        const __m512i l = _mm512_srai_epi32(_mm512_slli_epi32(iv, 24), 24);
        const __m512i h = _mm512_srai_epi32(_mm512_sub_epi32(iv, l), 8);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(d + 16 * q), _mm512_cvtepi32_epi8(h));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(d + 64 + 16 * q), _mm512_cvtepi32_epi8(l));
        vs = _mm512_add_epi32(vs, iv);
      }
      a.xsum[r * a.groups + a.chunk_group[c]] += s * static_cast<float>(_mm512_reduce_add_epi32(vs));
    }
  }
}

// Rows [m0, m0 + R) of y (row stride ldy), channels [n0, n1): codes wq [N, K] int8, scale [N, groups].
template <int R>
inline void wo_int8_split_vnni(const SplitAct8& a, int64_t m0, const int8_t* wq, const float* scale,
                               const float* bias, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  const int64_t K = a.K, groups = a.groups, chunks = a.chunks, full = K / kSplit8Chunk;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const __mmask64 tail_bytes = K % 64 ? ((__mmask64{1} << (K % 64)) - 1) : ~__mmask64{0};
  const int8_t* dig[R];
  const float* sxr[R];
  for (int r = 0; r < R; ++r) {
    dig[r] = a.digits.data() + (m0 + r) * chunks * 128;
    sxr[r] = a.sx.data() + (m0 + r) * chunks;
  }
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* wr = wq + n * K;
    const float* sr = scale + n * groups;
    __m512 accf[R];
    for (int r = 0; r < R; ++r) accf[r] = _mm512_setzero_ps();
    for (int64_t c = 0; c < chunks; ++c) {
      _mm_prefetch(reinterpret_cast<const char*>(wr + kPrefetchBytes + 64 * c), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(wr + kPrefetchL2Bytes + 64 * c), _MM_HINT_T1);
      const __m512i wb = c < full ? _mm512_loadu_si512(wr + 64 * c) : _mm512_maskz_loadu_epi8(tail_bytes, wr + 64 * c);
      const __m512i u = _mm512_xor_si512(wb, flip);  // w + 128 as unsigned bytes (tail: 128 x 0)
      const float sw = sr[a.chunk_group[c]];
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const int8_t* d = dig[r] + c * 128;
        __m512i acc = dpbusd_m(_mm512_setzero_si512(), u, d);
        acc = _mm512_slli_epi32(acc, 8);
        acc = dpbusd_m(acc, u, d + 64);
        accf[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_set1_ps(sw * sxr[r][c]), accf[r]);
      }
    }
    __m512 cv[R];  // sum_g s_g X_g, 16 groups per step
    for (int r = 0; r < R; ++r) cv[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g += 16) {
      const __mmask16 m = static_cast<__mmask16>(groups - g >= 16 ? 0xFFFF : (1u << (groups - g)) - 1);
      const __m512 vs = _mm512_maskz_loadu_ps(m, sr + g);
      for (int r = 0; r < R; ++r)
        cv[r] = _mm512_fmadd_ps(vs, _mm512_maskz_loadu_ps(m, a.xsum.data() + (m0 + r) * groups + g), cv[r]);
    }
    for (int r = 0; r < R; ++r)
      y[r * ldy + n] = _mm512_reduce_add_ps(accf[r]) - 128.f * _mm512_reduce_add_ps(cv[r]) + (bias ? bias[n] : 0.f);
  }
}

inline void wo_int8_split_rows(const SplitAct8& a, int64_t m0, int rows, const int8_t* wq,
                               const float* scale, const float* bias, int64_t n0, int64_t n1,
                               float* y, int64_t ldy) {
  with_rows(rows, [&](auto r) { wo_int8_split_vnni<r()>(a, m0, wq, scale, bias, n0, n1, y, ldy); });
}
#endif

}  // namespace cpu
}  // namespace qlinear
}  // namespace pypaper

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
