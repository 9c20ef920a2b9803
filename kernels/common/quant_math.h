// Uniform affine quantization: the per-element math of every quant kernel (CPU, CUDA).
//
// With scale s > 0, zero point z and the integer range [qmin, qmax] (bits b: symmetric
// [-2^(b-1), 2^(b-1)-1], asymmetric [0, 2^b-1]):
//
//   code  c = round_half_even(x * (1/s)) + z            (deterministic)
//         c = floor(x * (1/s) + u) + z,  u ~ U[0, 1)      (stochastic: E[c] = x/s + z, unbiased)
//   quantize       q = clamp(c, qmin, qmax)
//   fake-quantize  y = (q - z) * s
//
// The float zero point is used as torch does for learnable zero points: z = clamp(round(zp)).
// x * (1/s) rather than x / s: that is what torch.fake_quantize_* computes, and the plain-PyTorch
// reference (pypaper/quant/reference.py) does the same, so fp32 results match to the bit. Each
// product is rounded on its own (host builds use -ffp-contract=off, device code __fmul_rn), so no
// fused multiply-add changes a rounding tie.
//
// Gradients (straight-through estimator; LSQ, Esser et al. 2020, "Learned Step Size
// Quantization"; LSQ+ zero point, Bhalgat et al. 2020), with g the LSQ gradient scale:
//   in range (qmin <= c <= qmax):  dx = dy,  ds = dy * ((q - z) * s - x) / s,  dz = 0
//   below / above the range:       dx = 0,   ds = dy * (qmin|qmax - z),        dz = -dy * s
//   grad_scale = g * sum ds,  grad_zero_point = g * sum dz  (over the elements sharing s, z)
// These are the formulas of torch._fake_quantize_learnable_per_tensor_affine. A NaN code counts
// as above the range (dx = 0).
#pragma once
#include <cmath>
#include <cstdint>

#include "hd.h"

namespace pypaper {
namespace quant {

template <typename T>
PYPAPER_HD T round_half_even(T v) {
#if defined(__CUDA_ARCH__)
  return rint(v);
#else
  return std::nearbyint(v);  // default rounding mode: half to even, like torch.round
#endif
}

template <typename T>
PYPAPER_HD T mul_rn(T a, T b) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(T) == 4) {
    return __fmul_rn(a, b);
  } else {
    return __dmul_rn(a, b);
  }
#else
  return a * b;
#endif
}

template <typename T>
PYPAPER_HD T add_rn(T a, T b) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(T) == 4) {
    return __fadd_rn(a, b);
  } else {
    return __dadd_rn(a, b);
  }
#else
  return a + b;
#endif
}

// NaN passes through (both comparisons are false).
template <typename T>
PYPAPER_HD T clamp(T v, T lo, T hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

// The zero point actually used: torch's rule for float (learnable) zero points.
template <typename T>
PYPAPER_HD T effective_zero_point(T zp, T qmin, T qmax) {
  return clamp(round_half_even(zp), qmin, qmax);
}

// Unclamped code, round half to even.
template <typename T>
PYPAPER_HD T code_nearest(T x, T inv_scale, T z) {
  return round_half_even(mul_rn(x, inv_scale)) + z;
}

// Unclamped code, stochastic rounding with the uniform u in [0, 1).
template <typename T>
PYPAPER_HD T code_stochastic(T x, T inv_scale, T z, T u) {
  return std::floor(add_rn(mul_rn(x, inv_scale), u)) + z;
}

// y = (clamp(c) - z) * s. Both operands of the product are exact small integers times s,
// so this is one rounding.
template <typename T>
PYPAPER_HD T fake_quant_value(T code, T z, T scale, T qmin, T qmax) {
  return mul_rn(clamp(code, qmin, qmax) - z, scale);
}

template <typename T>
struct FakeQuantGrad {
  T dx;
  T dscale;
  T dzero_point;
};

// Per-element gradients of y = fake_quant(x; s, z), before the reduction over elements.
// Written with selects, not branches, so CPU loops vectorize and GPU warps do not diverge.
template <typename T>
PYPAPER_HD FakeQuantGrad<T> fake_quant_grad(T dy, T x, T code, T z, T scale, T inv_scale,
                                             T qmin, T qmax) {
  const bool inside = (code >= qmin) & (code <= qmax);  // & not &&: no branch
  const T bound = code < qmin ? qmin : qmax;
  const T ds_inside = mul_rn(mul_rn(dy, mul_rn(code - z, scale) - x), inv_scale);
  const T ds_outside = mul_rn(dy, bound - z);
  return FakeQuantGrad<T>{inside ? dy : T(0), inside ? ds_inside : ds_outside,
                          inside ? T(0) : -mul_rn(dy, scale)};
}

// Two codes of at most 4 bits in one byte: element 2j in the low nibble, 2j+1 in the high one.
// Signed codes are stored in two's complement and sign-extended on the way back.
PYPAPER_HD uint8_t pack_nibbles(int32_t lo, int32_t hi) {
  return static_cast<uint8_t>((lo & 0xF) | ((hi & 0xF) << 4));
}

PYPAPER_HD int32_t unpack_nibble(uint8_t byte, int which, bool is_signed) {
  int32_t v = (byte >> (4 * which)) & 0xF;
  return is_signed ? ((v ^ 8) - 8) : v;
}

}  // namespace quant
}  // namespace pypaper
