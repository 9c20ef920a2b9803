// CPU loops of the quantized linear layers (issue #7, linear kernels); torch-free so that ctest
// (tests/cpp/test_qlinear_cpu.cpp) checks them without torch. The math and the layouts are
// kernels/common/qlinear_math.h; the torch glue (argument checks, at::parallel_for) is
// csrc/quant/qlinear_cpu.cpp.
//
// Three instruction paths, chosen per call (csrc reads PYPAPER_QLINEAR_ISA, default the best one
// compiled in):
//   kScalar  portable C++, every kernel;
//   kAvx2    AVX2 + FMA: int8 GEMM with vpmaddubsw (u8 x s8 -> s16 pairs) + vpmaddwd(ones) -> s32;
//            int8 weight-only: bytes -> int32 -> fp32 -> FMA with per-group scales; int4
//            weight-only: vpmaddubsw on the nibbles and split activations (qlinear_int4_split.h);
//   kVnni    AVX-512 VNNI: the int8 GEMM with vpdpbusd (u8 x s8, four products summed into s32 with
//            no intermediate saturation) on 512-bit registers; the weight-only kernels on 512-bit
//            registers (int4: vpdpbusd, qlinear_int4_split.h).
//
// vpmaddubsw saturates each pair sum u0*w0 + u1*w1 to int16. With weights in [-127, 127]:
//   * 7-bit activations (act_qmax = 63) are stored as u = q + 64 in [1, 127]:
//     |pair| <= 2 * 127 * 127 = 32258 < 32767, exact;
//   * 8-bit activations (act_qmax = 127) are stored as signed bytes q and multiplied as
//     maddubs(|q|, sign(w, q)) (the sign moved onto the weight, vpsignb): |pair| <= 2*127*127,
//     exact, at one extra instruction per product (this is why 7-bit is the fast AVX2 mode, as
//     in fbgemm's reduce_range).
// On VNNI the activations are always u = q + 128 (vpdpbusd cannot saturate below 2^31 here:
// K * 255 * 127 < 2^31 for K < 66000; csrc checks K).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define PYPAPER_QL_AVX2 1
#else
#define PYPAPER_QL_AVX2 0
#endif
#if PYPAPER_QL_AVX2 && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define PYPAPER_QL_VNNI 1
#else
#define PYPAPER_QL_VNNI 0
#endif

#include "../common/qlinear_math.h"

// GCC 12's AVX-512 intrinsics initialise their "undefined" operands with `__Y = __Y`, which
// -Wall reports as maybe-uninitialized at every inlined call site: a false positive.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace pypaper {
namespace qlinear {
namespace cpu {

enum class Isa : int { kScalar = 0, kAvx2 = 1, kVnni = 2 };

inline bool isa_compiled(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return true;
    case Isa::kAvx2: return PYPAPER_QL_AVX2 != 0;
    case Isa::kVnni: return PYPAPER_QL_VNNI != 0;
  }
  return false;
}

inline Isa best_isa() {
  return PYPAPER_QL_VNNI ? Isa::kVnni : (PYPAPER_QL_AVX2 ? Isa::kAvx2 : Isa::kScalar);
}

inline const char* isa_name(Isa isa) {
  return isa == Isa::kVnni ? "vnni" : (isa == Isa::kAvx2 ? "avx2" : "scalar");
}

// The byte offset added to the activation codes on each path (see the header comment).
inline int32_t act_offset(Isa isa, int32_t act_qmax) {
  if (isa == Isa::kVnni) return 128;
  if (isa == Isa::kAvx2) return act_qmax <= 63 ? 64 : 0;
  return 0;  // scalar: signed bytes
}

// ---- activation quantization: rows [m0, m1) of x (row stride ldx) into qa [M, Kp] --------------
// Pad bytes (k in [K, Kp)) hold the code 0 (the byte `off`); the padded weights are 0 anyway.
inline void quantize_act_rows(const float* x, int64_t ldx, int64_t m0, int64_t m1, int64_t K,
                              int64_t Kp, int32_t act_qmax, int32_t off, uint8_t* qa, float* sa,
                              Isa isa) {
  for (int64_t m = m0; m < m1; ++m) {
    const float* xr = x + m * ldx;
    uint8_t* qr = qa + m * Kp;
    float amax = 0.f;
    int64_t k = 0;
#if PYPAPER_QL_AVX2
    const bool vec = isa != Isa::kScalar;
    if (vec) {
      const __m256 sign = _mm256_set1_ps(-0.0f);
      __m256 vmax = _mm256_setzero_ps();
      for (; k + 8 <= K; k += 8) vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, _mm256_loadu_ps(xr + k)));
      alignas(32) float t[8];
      _mm256_store_ps(t, vmax);
      for (float v : t) amax = std::max(amax, v);
    }
#endif
    for (; k < K; ++k) amax = std::max(amax, std::fabs(xr[k]));
    const float s = act_scale(amax, act_qmax);
    sa[m] = s;
    k = 0;
#if PYPAPER_QL_AVX2
    if (vec) {
      const __m256 vs = _mm256_set1_ps(s);
      const __m256 hi = _mm256_set1_ps(static_cast<float>(act_qmax));
      const __m256 lo = _mm256_set1_ps(-static_cast<float>(act_qmax));
      const __m256i voff = _mm256_set1_epi32(off);
      const __m256i pick = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                            -1, -1, 0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1,
                                            -1, -1, -1, -1);
      for (; k + 8 <= K; k += 8) {
        __m256 r = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(xr + k), vs),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        r = _mm256_min_ps(_mm256_max_ps(r, lo), hi);
        const __m256i q = _mm256_add_epi32(_mm256_cvtps_epi32(r), voff);
        const __m256i b = _mm256_shuffle_epi8(q, pick);
        const __m128i out = _mm_unpacklo_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
        _mm_storel_epi64(reinterpret_cast<__m128i*>(qr + k), out);
      }
    }
#endif
    for (; k < K; ++k) qr[k] = static_cast<uint8_t>(act_code(xr[k], s, act_qmax) + off);
    for (; k < Kp; ++k) qr[k] = static_cast<uint8_t>(off);
  }
}

// ---- int8 GEMM micro-kernels ----------------------------------------------------------------
// tile[r][j] (+)= sum over `steps` k-steps of u[r, 4 s + t] * w[channel j, 4 s + t]; qa: activation
// bytes of `rows` rows (row stride lda) starting at the block's first k; panel: the panel at the
// same k-step. `init`: start from zero, else add to the tile (K is processed in blocks so that a
// block of the weight panels stays in L1 while every row block of x streams past it).

inline void gemm_tile_scalar(const uint8_t* qa, int64_t lda, int rows, const int8_t* panel,
                             int64_t steps, int32_t off, bool init, int32_t* tile) {
  for (int r = 0; r < rows; ++r) {
    const uint8_t* a = qa + r * lda;
    int32_t acc[kPanel] = {0};
    for (int64_t s = 0; s < steps; ++s) {
      const int8_t* w = panel + s * kPanel * kKStep;
      for (int j = 0; j < kPanel; ++j) {
        for (int t = 0; t < kKStep; ++t) {
          // off == 0: the bytes are signed codes; else unsigned codes shifted by off.
          const int32_t av = off == 0 ? static_cast<int32_t>(static_cast<int8_t>(a[s * kKStep + t]))
                                      : static_cast<int32_t>(a[s * kKStep + t]);
          acc[j] += av * static_cast<int32_t>(w[j * kKStep + t]);
        }
      }
    }
    for (int j = 0; j < kPanel; ++j) tile[r * kPanel + j] = (init ? 0 : tile[r * kPanel + j]) + acc[j];
  }
}

#if PYPAPER_QL_AVX2
inline int32_t load_u32(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// acc += madd(maddubs(a, w), 1) in inline asm: with 16 ymm registers (AVX2 builds) GCC 12
// copies the accumulators around the intrinsics (measured 15% slower at MR = 4).
inline __m256i dot_u8s8(__m256i acc, __m256i a, __m256i w, __m256i ones) {
  __m256i t;
  asm("vpmaddubsw %[w], %[a], %[t]\n\tvpmaddwd %[o], %[t], %[t]\n\tvpaddd %[t], %[acc], %[acc]"
      : [acc] "+x"(acc), [t] "=&x"(t)
      : [a] "x"(a), [w] "x"(w), [o] "x"(ones));
  return acc;
}

// The sign trick for signed activations q: acc += madd(maddubs(|q|, sign(w, q)), 1).
inline __m256i dot_s8s8(__m256i acc, __m256i aa, __m256i a, __m256i w, __m256i ones) {
  __m256i t;
  asm("vpsignb %[a], %[w], %[t]\n\tvpmaddubsw %[t], %[aa], %[t]\n\tvpmaddwd %[o], %[t], %[t]\n\t"
      "vpaddd %[t], %[acc], %[acc]"
      : [acc] "+x"(acc), [t] "=&x"(t)
      : [aa] "x"(aa), [a] "x"(a), [w] "x"(w), [o] "x"(ones));
  return acc;
}

// SIGNED: 8-bit activations as signed bytes (sign trick); else unsigned bytes (7-bit + 64).
template <int MR, bool SIGNED>
inline void gemm_tile_avx2(const uint8_t* qa, int64_t lda, const int8_t* panel, int64_t steps,
                           bool init, int32_t* tile) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc0[MR], acc1[MR];
  for (int r = 0; r < MR; ++r) {
    acc0[r] = init ? _mm256_setzero_si256() : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tile + r * kPanel));
    acc1[r] = init ? _mm256_setzero_si256() : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tile + r * kPanel + 8));
  }
  for (int64_t s = 0; s < steps; ++s) {
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + s * 64));
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + s * 64 + 32));
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m256i a = _mm256_set1_epi32(load_u32(qa + r * lda + s * kKStep));
      if constexpr (SIGNED) {
        const __m256i aa = _mm256_abs_epi8(a);
        acc0[r] = dot_s8s8(acc0[r], aa, a, w0, ones);
        acc1[r] = dot_s8s8(acc1[r], aa, a, w1, ones);
      } else {
        acc0[r] = dot_u8s8(acc0[r], a, w0, ones);
        acc1[r] = dot_u8s8(acc1[r], a, w1, ones);
      }
    }
  }
  for (int r = 0; r < MR; ++r) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(tile + r * kPanel), acc0[r]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(tile + r * kPanel + 8), acc1[r]);
  }
}
#endif

#if PYPAPER_QL_VNNI
// vpdpbusd through inline asm: GCC 12-13 copies every accumulator through a spare register around
// _mm512_dpbusd_epi32 in a loop (one extra move per instruction, measured 25% slower).
inline __m512i dpbusd(__m512i acc, __m512i a, __m512i w) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(w));
  return acc;
}

// NP panels (16 channels each, panel stride pstride bytes) per call, MR rows: NP * MR zmm
// accumulators, one 64-byte weight load per panel and k-step, one broadcast per row and k-step.
template <int MR, int NP>
inline void gemm_tile_vnni(const uint8_t* qa, int64_t lda, const int8_t* panel, int64_t pstride,
                           int64_t steps, bool init, int32_t* const* tiles) {
  __m512i acc[NP][MR];
  for (int p = 0; p < NP; ++p)
    for (int r = 0; r < MR; ++r)
      acc[p][r] = init ? _mm512_setzero_si512() : _mm512_loadu_si512(tiles[p] + r * kPanel);
  for (int64_t s = 0; s < steps; ++s) {
    __m512i w[NP];
    for (int p = 0; p < NP; ++p) w[p] = _mm512_loadu_si512(panel + p * pstride + s * 64);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512i a = _mm512_set1_epi32(load_u32(qa + r * lda + s * kKStep));
      for (int p = 0; p < NP; ++p) acc[p][r] = dpbusd(acc[p][r], a, w[p]);
    }
  }
  for (int p = 0; p < NP; ++p)
    for (int r = 0; r < MR; ++r) _mm512_storeu_si512(tiles[p] + r * kPanel, acc[p][r]);
}

template <int NP>
inline void gemm_tile_vnni_rows(const uint8_t* qa, int64_t lda, int rows, const int8_t* panel,
                                int64_t pstride, int64_t steps, bool init, int32_t* const* tiles) {
  switch (rows) {
    case 8: gemm_tile_vnni<8, NP>(qa, lda, panel, pstride, steps, init, tiles); return;
    case 7: gemm_tile_vnni<7, NP>(qa, lda, panel, pstride, steps, init, tiles); return;
    case 6: gemm_tile_vnni<6, NP>(qa, lda, panel, pstride, steps, init, tiles); return;
    case 5: gemm_tile_vnni<5, NP>(qa, lda, panel, pstride, steps, init, tiles); return;
    case 4: gemm_tile_vnni<4, NP>(qa, lda, panel, pstride, steps, init, tiles); return;
    case 3: gemm_tile_vnni<3, NP>(qa, lda, panel, pstride, steps, init, tiles); return;
    case 2: gemm_tile_vnni<2, NP>(qa, lda, panel, pstride, steps, init, tiles); return;
    default: gemm_tile_vnni<1, NP>(qa, lda, panel, pstride, steps, init, tiles); return;
  }
}
#endif

constexpr int kMaxMR = 8;
constexpr int kMaxPanels = 2;  // panels per task step (2 x 16 output channels)

// Rows per micro-tile of each path (register budget: AVX2 has 16 ymm registers, AVX-512 32 zmm).
inline int tile_rows(Isa isa) { return isa == Isa::kAvx2 ? 4 : (isa == Isa::kVnni ? 8 : kMaxMR); }

#if PYPAPER_QL_AVX2
template <bool SIGNED>
inline void gemm_tile_avx2_rows(const uint8_t* qa, int64_t lda, int rows, const int8_t* panel,
                                int64_t steps, bool init, int32_t* tile) {
  switch (rows) {
    case 4: gemm_tile_avx2<4, SIGNED>(qa, lda, panel, steps, init, tile); break;
    case 3: gemm_tile_avx2<3, SIGNED>(qa, lda, panel, steps, init, tile); break;
    case 2: gemm_tile_avx2<2, SIGNED>(qa, lda, panel, steps, init, tile); break;
    default: gemm_tile_avx2<1, SIGNED>(qa, lda, panel, steps, init, tile); break;
  }
}
#endif

// One micro-tile: `rows` rows x `np` (1 or 2) panels; tiles[p] gets [rows][16] raw sums (before
// the offset correction).
inline void gemm_tile(Isa isa, const uint8_t* qa, int64_t lda, int rows, const int8_t* panel,
                      int64_t pstride, int np, int64_t steps, int32_t off, bool init,
                      int32_t* const* tiles) {
#if PYPAPER_QL_VNNI
  if (isa == Isa::kVnni) {
    if (np == 2) {
      gemm_tile_vnni_rows<2>(qa, lda, rows, panel, pstride, steps, init, tiles);
    } else {
      gemm_tile_vnni_rows<1>(qa, lda, rows, panel, pstride, steps, init, tiles);
    }
    return;
  }
#endif
  for (int p = 0; p < np; ++p) {
    const int8_t* pp = panel + p * pstride;
#if PYPAPER_QL_AVX2
    if (isa == Isa::kAvx2) {
      if (off == 0) {
        gemm_tile_avx2_rows<true>(qa, lda, rows, pp, steps, init, tiles[p]);
      } else {
        gemm_tile_avx2_rows<false>(qa, lda, rows, pp, steps, init, tiles[p]);
      }
      continue;
    }
#endif
    gemm_tile_scalar(qa, lda, rows, pp, steps, off, init, tiles[p]);
  }
}

// Output of the int8 GEMM: either the corrected int32 accumulators or the fused fp32 epilogue.
struct DynOut {
  int32_t* acc = nullptr;      // [M, N] int32, or null
  float* y = nullptr;          // [M, N] fp32 (row stride N), or null
  const float* sa = nullptr;   // [M] activation scales
  const float* sw = nullptr;   // [N] weight scales
  const float* bias = nullptr; // [N] or null
};

inline void store_tile(const int32_t* tile, int64_t rows, int64_t m0, int64_t n0, int64_t N,
                       const int32_t* colsum, int32_t off, const DynOut& o, Isa isa = Isa::kScalar) {
  const int64_t nn = std::min<int64_t>(kPanel, N - n0);
#if PYPAPER_QL_AVX2
  if (isa != Isa::kScalar && nn == kPanel && o.y && !o.acc) {
    // 8 lanes at a time, the same operations as dyn_epilogue in the same order (separate
    // multiplies and add: no FMA), so the result is identical to the scalar path.
    const __m256i voff = _mm256_set1_epi32(off);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t m = m0 + r;
      const __m256 vsa = _mm256_set1_ps(o.sa[m]);
      for (int64_t j = 0; j < kPanel; j += 8) {
        const int64_t n = n0 + j;
        const __m256i cs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(colsum + n));
        const __m256i acc = _mm256_sub_epi32(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tile + r * kPanel + j)),
            _mm256_mullo_epi32(voff, cs));
        __m256 y = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(acc), vsa), _mm256_loadu_ps(o.sw + n));
        y = _mm256_add_ps(y, o.bias ? _mm256_loadu_ps(o.bias + n) : _mm256_setzero_ps());
        _mm256_storeu_ps(o.y + m * N + n, y);
      }
    }
    return;
  }
#endif
  (void)isa;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t m = m0 + r;
    for (int64_t j = 0; j < nn; ++j) {
      const int64_t n = n0 + j;
      const int32_t acc = tile[r * kPanel + j] - off * colsum[n];
      if (o.acc) o.acc[m * N + n] = acc;
      if (o.y) o.y[m * N + n] = dyn_epilogue(acc, o.sa[m], o.sw[n], o.bias ? o.bias[n] : 0.f);
    }
  }
}

// k-steps per K block: 256 steps = 1024 k, so two panels' block is 32 KiB (fits a 48 KiB L1).
constexpr int64_t kBlockSteps = 256;

// Panels [p0, p1) for all M rows. colsum [N] (sum over k of the weight codes). cbuf: scratch of
// kMaxPanels * M * 16 int32.
inline void int8_gemm_panels(Isa isa, const uint8_t* qa, int64_t M, int64_t Kp,
                             const int8_t* wpacked, int64_t N, const int32_t* colsum, int32_t off,
                             int64_t p0, int64_t p1, const DynOut& o, int32_t* cbuf) {
  const int mr = tile_rows(isa);
  const int64_t K4 = Kp / kKStep;
  const int64_t pstride = K4 * kPanel * kKStep;
  for (int64_t p = p0; p < p1;) {
    const int np = static_cast<int>(std::min<int64_t>(kMaxPanels, p1 - p));
    const int8_t* panel = wpacked + p * pstride;
    int32_t* c[kMaxPanels] = {cbuf, cbuf + M * kPanel};
    for (int64_t s0 = 0; s0 < K4; s0 += kBlockSteps) {
      const int64_t steps = std::min(kBlockSteps, K4 - s0);
      for (int64_t m0 = 0; m0 < M; m0 += mr) {
        const int rows = static_cast<int>(std::min<int64_t>(mr, M - m0));
        int32_t* tiles[kMaxPanels] = {c[0] + m0 * kPanel, c[1] + m0 * kPanel};
        gemm_tile(isa, qa + m0 * Kp + s0 * kKStep, Kp, rows, panel + s0 * kPanel * kKStep,
                  pstride, np, steps, off, s0 == 0, tiles);
      }
    }
    if (K4 == 0) std::fill(cbuf, cbuf + kMaxPanels * M * kPanel, 0);
    for (int q = 0; q < np; ++q) store_tile(c[q], M, 0, (p + q) * kPanel, N, colsum, off, o, isa);
    p += np;
  }
}

// ---- weight-only linears ---------------------------------------------------------------------
// Rows [m0, m0 + rows) (rows <= 4) of y for output channels [n0, n1). x rows have stride ldx,
// y rows stride ldy. groups = K / G; scale / zero: [N, groups]. The SIMD int4 kernels of this
// case are in qlinear_int4_split.h (integer dot products on split activations).

constexpr int kWoRows = 4;

#if PYPAPER_QL_AVX2
inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Independent FMA chains per row: R rows x NA(R) accumulators keep 4 chains in flight (FMA
// latency 4), so one row (the M = 1 decode case) is not latency-bound.
template <int R>
constexpr int chains() { return R == 1 ? 4 : (R == 2 ? 2 : 1); }

template <int R>
inline void wo_int8_avx2(const float* x, int64_t ldx, int64_t K, int64_t G, const int8_t* wq,
                         const float* scale, int64_t groups, const float* bias, int64_t n0,
                         int64_t n1, float* y, int64_t ldy) {
  constexpr int NA = chains<R>() >= 2 ? 2 : 1;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* wr = wq + n * K;
    const float* sr = scale + n * groups;
    __m256 tot[R];
    float tail[R];
    for (int r = 0; r < R; ++r) {
      tot[r] = _mm256_setzero_ps();
      tail[r] = 0.f;
    }
    for (int64_t g = 0; g < groups; ++g) {
      __m256 acc[R][NA];
      float sacc[R];
      for (int r = 0; r < R; ++r) {
        for (int c = 0; c < NA; ++c) acc[r][c] = _mm256_setzero_ps();
        sacc[r] = 0.f;
      }
      const int64_t ke = (g + 1) * G;
      int64_t k = g * G;
      for (; k + 16 <= ke; k += 16) {
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + k));
        const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
        const __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)));
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {
          acc[r][0] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * ldx + k), w0, acc[r][0]);
          acc[r][NA - 1] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * ldx + k + 8), w1, acc[r][NA - 1]);
        }
      }
      for (; k < ke; ++k) {
        for (int r = 0; r < R; ++r) sacc[r] += x[r * ldx + k] * static_cast<float>(wr[k]);
      }
      const __m256 vs = _mm256_set1_ps(sr[g]);
      for (int r = 0; r < R; ++r) {
        __m256 a = acc[r][0];
        if constexpr (NA == 2) a = _mm256_add_ps(a, acc[r][1]);
        tot[r] = _mm256_fmadd_ps(a, vs, tot[r]);
        tail[r] += sacc[r] * sr[g];
      }
    }
    for (int r = 0; r < R; ++r) y[r * ldy + n] = hsum256(tot[r]) + tail[r] + (bias ? bias[n] : 0.f);
  }
}
#endif

#if PYPAPER_QL_VNNI
// The AVX-512 weight-only kernels (the kVnni level; they need AVX-512F/BW only): 16 codes widen
// to 16 fp32 lanes in one instruction, half the unpacking work of the AVX2 path per weight.
template <int R>
inline void wo_int8_avx512(const float* x, int64_t ldx, int64_t K, int64_t G, const int8_t* wq,
                           const float* scale, int64_t groups, const float* bias, int64_t n0,
                           int64_t n1, float* y, int64_t ldy) {
  constexpr int NA = R == 1 ? 4 : (R == 2 ? 2 : 1);
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* wr = wq + n * K;
    const float* sr = scale + n * groups;
    __m512 tot[R];
    float tail[R];
    for (int r = 0; r < R; ++r) {
      tot[r] = _mm512_setzero_ps();
      tail[r] = 0.f;
    }
    for (int64_t g = 0; g < groups; ++g) {
      __m512 acc[R][NA];
      float sacc[R];
      for (int r = 0; r < R; ++r) {
        for (int c = 0; c < NA; ++c) acc[r][c] = _mm512_setzero_ps();
        sacc[r] = 0.f;
      }
      const int64_t ke = (g + 1) * G;
      int64_t k = g * G;
      for (; k + 16 * NA <= ke; k += 16 * NA) {
#pragma GCC unroll 4
        for (int c = 0; c < NA; ++c) {
          const __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
              _mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + k + 16 * c))));
#pragma GCC unroll 4
          for (int r = 0; r < R; ++r)
            acc[r][c] = _mm512_fmadd_ps(_mm512_loadu_ps(x + r * ldx + k + 16 * c), w0, acc[r][c]);
        }
      }
      for (; k + 16 <= ke; k += 16) {
        const __m512 w0 = _mm512_cvtepi32_ps(
            _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + k))));
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r)
          acc[r][0] = _mm512_fmadd_ps(_mm512_loadu_ps(x + r * ldx + k), w0, acc[r][0]);
      }
      for (; k < ke; ++k) {
        for (int r = 0; r < R; ++r) sacc[r] += x[r * ldx + k] * static_cast<float>(wr[k]);
      }
      const __m512 vs = _mm512_set1_ps(sr[g]);
      for (int r = 0; r < R; ++r) {
        __m512 a = acc[r][0];
        for (int c = 1; c < NA; ++c) a = _mm512_add_ps(a, acc[r][c]);
        tot[r] = _mm512_fmadd_ps(a, vs, tot[r]);
        tail[r] += sacc[r] * sr[g];
      }
    }
    for (int r = 0; r < R; ++r)
      y[r * ldy + n] = _mm512_reduce_add_ps(tot[r]) + tail[r] + (bias ? bias[n] : 0.f);
  }
}
#endif

inline void wo_int4_scalar(const float* x, int64_t ldx, int rows, int64_t K, int64_t G,
                           const uint8_t* wq, const float* scale, const float* zero,
                           int64_t groups, const float* bias, int64_t n0, int64_t n1, float* y,
                           int64_t ldy) {
  for (int r = 0; r < rows; ++r) {
    const float* xr = x + r * ldx;
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* wr = wq + n * (K / 2);
      float tot = 0.f;
      for (int64_t g = 0; g < groups; ++g) {
        float acc = 0.f, xs = 0.f;
        for (int64_t k = g * G; k < (g + 1) * G; ++k) {
          acc += xr[k] * static_cast<float>(int4_code(wr, k));
          xs += xr[k];
        }
        tot += scale[n * groups + g] * (acc - zero[n * groups + g] * xs);
      }
      y[r * ldy + n] = tot + (bias ? bias[n] : 0.f);
    }
  }
}

inline void wo_int8_scalar(const float* x, int64_t ldx, int rows, int64_t K, int64_t G,
                           const int8_t* wq, const float* scale, int64_t groups, const float* bias,
                           int64_t n0, int64_t n1, float* y, int64_t ldy) {
  for (int r = 0; r < rows; ++r) {
    const float* xr = x + r * ldx;
    for (int64_t n = n0; n < n1; ++n) {
      const int8_t* wr = wq + n * K;
      float tot = 0.f;
      for (int64_t g = 0; g < groups; ++g) {
        float acc = 0.f;
        for (int64_t k = g * G; k < (g + 1) * G; ++k) acc += xr[k] * static_cast<float>(wr[k]);
        tot += scale[n * groups + g] * acc;
      }
      y[r * ldy + n] = tot + (bias ? bias[n] : 0.f);
    }
  }
}

inline void wo_int8_rows(Isa isa, const float* x, int64_t ldx, int rows, int64_t K, int64_t G,
                         const int8_t* wq, const float* scale, int64_t groups, const float* bias,
                         int64_t n0, int64_t n1, float* y, int64_t ldy) {
#if PYPAPER_QL_VNNI
  if (isa == Isa::kVnni) {
    switch (rows) {
      case 4: wo_int8_avx512<4>(x, ldx, K, G, wq, scale, groups, bias, n0, n1, y, ldy); return;
      case 3: wo_int8_avx512<3>(x, ldx, K, G, wq, scale, groups, bias, n0, n1, y, ldy); return;
      case 2: wo_int8_avx512<2>(x, ldx, K, G, wq, scale, groups, bias, n0, n1, y, ldy); return;
      default: wo_int8_avx512<1>(x, ldx, K, G, wq, scale, groups, bias, n0, n1, y, ldy); return;
    }
  }
#endif
#if PYPAPER_QL_AVX2
  if (isa != Isa::kScalar) {
    switch (rows) {
      case 4: wo_int8_avx2<4>(x, ldx, K, G, wq, scale, groups, bias, n0, n1, y, ldy); return;
      case 3: wo_int8_avx2<3>(x, ldx, K, G, wq, scale, groups, bias, n0, n1, y, ldy); return;
      case 2: wo_int8_avx2<2>(x, ldx, K, G, wq, scale, groups, bias, n0, n1, y, ldy); return;
      default: wo_int8_avx2<1>(x, ldx, K, G, wq, scale, groups, bias, n0, n1, y, ldy); return;
    }
  }
#endif
  wo_int8_scalar(x, ldx, rows, K, G, wq, scale, groups, bias, n0, n1, y, ldy);
}

// Dequantized weight rows [n0, n1) into w [n1 - n0, K] fp32 (the large-M path: then one sgemm).
// w = q * s + (-z * s): one FMA per weight.
inline void dequant_int4_rows(Isa isa, int64_t K, int64_t G, const uint8_t* wq, const float* scale,
                              const float* zero, int64_t n0, int64_t n1, float* w) {
  const int64_t groups = K / G;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wr = wq + n * (K / 2);
    float* o = w + (n - n0) * K;
    for (int64_t g = 0; g < groups; ++g) {
      const float s = scale[n * groups + g];
      const float zs = -zero[n * groups + g] * s;
      int64_t k = g * G;
#if PYPAPER_QL_AVX2
      if (isa != Isa::kScalar) {
        const __m128i mask = _mm_set1_epi8(0x0F);
        const __m256 vs = _mm256_set1_ps(s), vz = _mm256_set1_ps(zs);
        for (; k < (g + 1) * G; k += kInt4Block) {
          const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + k / 2));
          const __m128i lo = _mm_and_si128(b, mask);
          const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
          _mm256_storeu_ps(o + k, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), vs, vz));
          _mm256_storeu_ps(o + k + 8, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), vs, vz));
          _mm256_storeu_ps(o + k + 16, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), vs, vz));
          _mm256_storeu_ps(o + k + 24, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), vs, vz));
        }
      }
#endif
      for (; k < (g + 1) * G; ++k) o[k] = static_cast<float>(int4_code(wr, k)) * s + zs;
    }
  }
}

inline void dequant_int8_rows(Isa isa, int64_t K, int64_t G, const int8_t* wq, const float* scale,
                              int64_t n0, int64_t n1, float* w) {
  const int64_t groups = K / G;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* wr = wq + n * K;
    float* o = w + (n - n0) * K;
    for (int64_t g = 0; g < groups; ++g) {
      const float s = scale[n * groups + g];
      int64_t k = g * G;
#if PYPAPER_QL_AVX2
      if (isa != Isa::kScalar) {
        const __m256 vs = _mm256_set1_ps(s);
        for (; k + 8 <= (g + 1) * G; k += 8) {
          const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(wr + k));
          _mm256_storeu_ps(o + k, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), vs));
        }
      }
#endif
      for (; k < (g + 1) * G; ++k) o[k] = static_cast<float>(wr[k]) * s;
    }
  }
}

}  // namespace cpu
}  // namespace qlinear
}  // namespace pypaper

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
