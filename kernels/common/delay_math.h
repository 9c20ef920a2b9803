// Learnable synaptic delays: the per-synapse tap weights, shared by the CPU and CUDA kernels.
//
// Hammouamri, Khalfaoui-Hassani, Masquelier, "Learning Delays in Spiking Neural Networks using
// Dilated Convolutions with Learnable Spacings", ICLR 2024. Every synapse (o, i) carries a weight
// w and a real delay position p in [0, K-1] (K = max_delay taps, d = 0 .. K-1 time steps). During
// training the delay is spread over the integer taps by a Gaussian of width sigma (DCLS "gauss",
// whose width is |SIG| + 0.27 of its parameter SIG: SNN-delays' SIG = 0.23 is sigma = 0.5):
//
//     g(d) = exp(-(d - p)^2 / (2 sigma^2)) / sum_{d' in W} exp(-(d' - p)^2 / (2 sigma^2)),  d in W
//     y[t, n, o] = b[o] + sum_i w[o, i] sum_{d in W(o,i)} g_{o,i}(d) x[t - d, n, i]
//
// and sigma is decayed over training (large -> ~0.5), after which the positions are rounded and
// the layer uses one integer delay per synapse (g one-hot).
//
// Truncation (pypaper's, not the paper's: DCLS sums over all K taps). The window is the 2R taps
//
//     W = [floor(p) - R + 1, floor(p) + R] intersected with [0, K - 1],  R = min(ceil(3 sigma), K)
//
// renormalised over W. Every excluded tap lies at distance >= R >= 3 sigma from p, so the
// dropped mass is at most ~2 * exp(-4.5) ~ 2% of the peak tap, and the cost per synapse is 2R
// taps instead of K. W contains exactly the taps with |d - p| < R. When floor(p) crosses an integer
// m the window slides by one: tap m - R leaves and tap m + R enters, both at distance R from p, so
// the normaliser is continuous but the output jumps by g_edge * (x[t-m-R] - x[t-m+R]), g_edge <=
// exp(-R^2 / (2 sigma^2)) <= exp(-4.5) ~ 1.1% of the weight (a measure-zero set of positions; the
// gradient elsewhere is exact for the truncated function).
//
// sigma == 0 is the rounded case: one tap, d = round(p) (half to even, like torch.round), g = 1,
// dg/dp = 0.
//
// Numerics: the exponents are taken relative to the nearest tap of the window, so the largest
// term is exp(0) = 1 and the normaliser is >= 1 for any sigma (DCLS adds eps = 1e-7 to it
// instead; that leaves the limit sigma -> 0 inexact and can divide 0 by ~0). The shift cancels in
// g and in its derivative
//
//     dg(d)/dp = g(d) (u_d - sum_{d'} g(d') u_d'),   u_d = (d - p) / sigma^2.
#pragma once
#include <math.h>
#include <stdint.h>

#include "hd.h"

namespace pypaper {
namespace delay {

// R = ceil(3 sigma) (0 for the integer case sigma <= 0), clamped to K: floor(p) lies in [0, K-1],
// so every R >= K gives the whole [0, K-1], and the clamp keeps ceil(3 sigma) inside int64 for
// huge sigma. The host computes R once, in double from the op's double sigma (the reference's
// math.ceil(3 * sigma)), and passes it to every kernel: a float32 sigma can move 3 sigma past an
// integer (3 * float(1/3) = 1.00000003, so ceil gives 2 instead of 1).
PYPAPER_HD int64_t window_radius(double sigma, int64_t K) {
  if (!(sigma > 0)) return 0;
  const double r = 3.0 * sigma;
  return r >= static_cast<double>(K) ? K : static_cast<int64_t>(ceil(r));
}

// Most taps any synapse can touch for the radius R: 2R clipped to K, or 1 in the integer case.
PYPAPER_HD int64_t max_taps(int64_t R, int64_t K) {
  if (R == 0) return 1;
  return 2 * R < K ? 2 * R : K;
}

// Below sigma_floor every tap but the nearest already has g == 0 exactly, so tap_weights
// evaluates any smaller sigma at the floor: the limit sigma -> 0+ (g one-hot on the nearest tap,
// dg/dp = 0; an exact tie of two taps splits 1/2 : 1/2) with 1/sigma^2 finite. Unclamped,
// 1/sigma^2 overflows (float32 below ~5e-20, float64 below ~1e-154) and the nearest tap's
// 0 * inf is NaN. Why these values: the nearest tap's u^2 = near^2 <= 1/4 <= any other tap's u^2
// (rounded squares), so a nonzero u^2 - near^2 is at least the float spacing below 1/4, 2^-26
// (float32) or 2^-55 (float64), and at the floor the exponent -(u^2 - near^2) / (2 sigma^2) is
// <= -7450 (float32) or -1.4e7 (float64), far below exp's underflow (-104, -745).
PYPAPER_HD float sigma_floor(float) { return 1e-6f; }
PYPAPER_HD double sigma_floor(double) { return 1e-12; }

// The position the kernels use: p clamped to [0, K - 1] (the gradient passes where
// 0 <= p <= K - 1, torch.clamp's rule; position_inside says where).
template <typename T>
PYPAPER_HD T clamp_position(T p, int64_t K) {
  const T hi = static_cast<T>(K - 1);
  return p < T(0) ? T(0) : (p > hi ? hi : p);
}

template <typename T>
PYPAPER_HD bool position_inside(T p, int64_t K) {
  return p >= T(0) && p <= static_cast<T>(K - 1);
}

// Round half to even (torch.round), written out so host and device agree without rint().
template <typename T>
PYPAPER_HD T round_half_even(T v) {
  const T f = floor(v);
  const T r = v - f;
  if (r > T(0.5)) return f + T(1);
  if (r < T(0.5)) return f;
  return fmod(f, T(2)) == T(0) ? f : f + T(1);
}

// Tap weights of one synapse at (unclamped) position p_raw, for R = window_radius(sigma, K).
// Writes the first tap's delay to *lo and returns the tap count c (1 <= c <= max_taps(R, K));
// g[j] is the weight of delay lo + j and dg[j] = dg[j]/dp (dg may be null when the derivative is
// not needed).
template <typename T>
PYPAPER_HD int64_t tap_weights(T p_raw, T sigma, int64_t R, int64_t K, int64_t* lo, T* g, T* dg) {
  if (!(p_raw == p_raw)) {
    // A NaN position (a diverged step): one tap at delay 0 weighing NaN, so the synapse's
    // outputs and gradients are NaN, as the reference's are. The tap index must not come from
    // NaN: floor(NaN) cast to int64 is undefined (INT64_MIN on x86), and the window it gave
    // wrote outside the per-synapse tables (heap corruption, a crash).
    *lo = 0;
    g[0] = p_raw;
    if (dg) dg[0] = p_raw;
    return 1;
  }
  const T p = clamp_position(p_raw, K);
  if (R == 0) {
    *lo = static_cast<int64_t>(round_half_even(p));
    g[0] = T(1);
    if (dg) dg[0] = T(0);
    return 1;
  }
  const int64_t f = static_cast<int64_t>(floor(p));
  const int64_t a = f - R + 1 > 0 ? f - R + 1 : 0;
  const int64_t b = f + R < K - 1 ? f + R : K - 1;
  const int64_t c = b - a + 1;
  *lo = a;
  // The nearest tap is floor(p) or floor(p) + 1 (both inside W when they exist).
  const T r0 = p - static_cast<T>(f);
  const T near = (r0 <= T(0.5) || f + 1 > b) ? r0 : T(1) - r0;
  const T sg = sigma > sigma_floor(sigma) ? sigma : sigma_floor(sigma);
  const T inv2 = T(1) / (sg * sg);  // 0 once sigma^2 overflows: flat g, dg = 0
  const T base = near * near;
  T s = T(0);
  for (int64_t j = 0; j < c; ++j) {
    const T u = static_cast<T>(a + j) - p;
    const T e = exp(T(-0.5) * (u * u - base) * inv2);
    g[j] = e;
    s += e;
  }
  const T inv_s = T(1) / s;
  T ubar = T(0);
  for (int64_t j = 0; j < c; ++j) {
    g[j] *= inv_s;
    ubar += g[j] * (static_cast<T>(a + j) - p);
  }
  if (dg) {
    for (int64_t j = 0; j < c; ++j) {
      dg[j] = g[j] * ((static_cast<T>(a + j) - p) - ubar) * inv2;
    }
  }
  return c;
}

}  // namespace delay
}  // namespace pypaper
