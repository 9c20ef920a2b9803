// Quantized linear layers (issue #7, linear kernels): the shared scalar math and storage layouts of
// the int8 dynamic linear and the int8 / int4 weight-only linears. The C++ CPU loops
// (kernels/cpu/qlinear_cpu.h), the CUDA kernels (kernels/cuda/qlinear_kernels.cu) and the
// plain-PyTorch reference (pypaper/quant/qlinear_reference.py) all follow these definitions.
//
// int8 dynamic linear, y = x W^T + b with x [M, K] float, W [N, K]:
//   weights, once:   sw[n] = max_k |W[n,k]| / 127,  qw[n,k] = clamp(round(W[n,k] / sw[n]), -127, 127)
//   activations, per call and per row (token):
//                    sa[m] = max(max_k |x[m,k]| / A, FLT_MIN),  qa[m,k] = clamp(round(x[m,k] / sa[m]), -A, A)
//                    with A = act_qmax = 127 (8-bit) or 63 (7-bit, "reduce_range")
//   int32 GEMM:      acc[m,n] = sum_k qa[m,k] qw[n,k]                          (exact)
//   epilogue:        y[m,n] = (float(acc[m,n]) * sa[m]) * sw[n] + b[n]         (fp32, this order)
// round() is round-half-to-even (torch.round); x / s is an IEEE division in every backend, so the
// codes, and hence the int32 accumulators, are identical everywhere.
//
// The x86 kernels multiply unsigned activation bytes by signed weight bytes (vpmaddubsw on AVX2,
// vpdpbusd on VNNI), so activations are stored as u = qa + off and the GEMM computes
//   sum_k u[m,k] qw[n,k] = acc[m,n] + off * colsum[n],   colsum[n] = sum_k qw[n,k]
// which the epilogue subtracts (colsum is computed once, at quantize time).
//
// Weight-only linears (float activations; memory-bound small-M case), groups of G consecutive k
// (G divides K; per-channel = one group of K):
//   int8: w[n,k] = qw[n,k] * s[n,g],             qw in [-127, 127]
//   int4: w[n,k] = (qw[n,k] - z[n,g]) * s[n,g],  qw in [0, 15], z an integer in [0, 15]
//   y[m,n] = sum_g s[n,g] * (sum_{k in g} x[m,k] qw[n,k] - z[n,g] * sum_{k in g} x[m,k]) + b[n]
// (accumulated in fp32; the order of the sums differs between backends, so these compare with a
// tolerance, not to the bit).
#pragma once
#include <cfloat>
#include <cmath>
#include <cstdint>

#include "hd.h"

namespace pypaper {
namespace qlinear {

// ---- int8 packed weight layout -----------------------------------------------------------------
// W [N, K] int8 is stored in panels of kPanel = 16 output channels; inside a panel, for each group
// of kKStep = 4 consecutive k, the 16 channels' 4 bytes follow each other (64 bytes): one 512-bit
// or two 256-bit registers hold 16 channels x 4 k, each 32-bit lane one channel's 4 products.
// N is padded to a multiple of 16 and K to a multiple of 4 with zero weights.
//   byte of (n, k) = ((n / 16) * (Kp / 4) + k / 4) * 64 + (n % 16) * 4 + k % 4
constexpr int64_t kPanel = 16;
constexpr int64_t kKStep = 4;

PYPAPER_HD int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

PYPAPER_HD int64_t int8_packed_index(int64_t n, int64_t k, int64_t Kp) {
  return ((n / kPanel) * (Kp / kKStep) + k / kKStep) * (kPanel * kKStep) + (n % kPanel) * kKStep +
         (k % kKStep);
}

// ---- int4 packed weight layout -----------------------------------------------------------------
// Row n of W holds K / 2 bytes. k is split in blocks of 32; in block b, byte j (0..15) holds
// k = 32 b + j in its low nibble and k = 32 b + 16 + j in its high nibble, so one 16-byte load
// gives 16 consecutive codes from the low nibbles and the next 16 from the high ones. K must be a
// multiple of 32 (group sizes are multiples of 32 that divide K).
constexpr int64_t kInt4Block = 32;

PYPAPER_HD int64_t int4_byte_index(int64_t k) { return (k / 32) * 16 + (k % 16); }
PYPAPER_HD int int4_nibble(int64_t k) { return (k % 32) >= 16 ? 1 : 0; }
PYPAPER_HD int32_t int4_code(const uint8_t* row, int64_t k) {
  return (row[int4_byte_index(k)] >> (4 * int4_nibble(k))) & 0xF;
}

// ---- activation quantization -------------------------------------------------------------------
PYPAPER_HD float act_scale(float amax, int32_t act_qmax) {
  const float s = amax / static_cast<float>(act_qmax);
  return s > FLT_MIN ? s : FLT_MIN;  // also maps NaN amax to FLT_MIN; a zero row gets codes 0
}

PYPAPER_HD int32_t act_code(float x, float scale, int32_t act_qmax) {
#if defined(__CUDA_ARCH__)
  float r = rintf(__fdiv_rn(x, scale));
#else
  float r = std::nearbyint(x / scale);
#endif
  const float q = static_cast<float>(act_qmax);
  r = r < -q ? -q : (r > q ? q : r);
  return static_cast<int32_t>(r);
}

// The fused epilogue of the int8 dynamic linear (fp32, products rounded one at a time).
PYPAPER_HD float dyn_epilogue(int32_t acc, float sa, float sw, float bias) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(__fmul_rn(__fmul_rn(static_cast<float>(acc), sa), sw), bias);
#else
  return static_cast<float>(acc) * sa * sw + bias;
#endif
}

}  // namespace qlinear
}  // namespace pypaper
