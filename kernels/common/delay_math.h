// Learnable synaptic delays: the per-synapse tap weights, shared by the CPU and CUDA kernels.
//
// Hammouamri, Khalfaoui-Hassani, Masquelier, "Learning Delays in Spiking Neural Networks using
// Dilated Convolutions with Learnable Spacings", ICLR 2024. Every synapse (o, i) carries a weight
// w and a real delay position p in [0, K-1] (K = max_delay taps, d = 0 .. K-1 time steps). During
// training the delay is spread over the integer taps by a Gaussian of width sigma (DCLS "gauss"):
//
//     g(d) = exp(-(d - p)^2 / (2 sigma^2)) / sum_{d' in W} exp(-(d' - p)^2 / (2 sigma^2)),  d in W
//     y[t, n, o] = b[o] + sum_i w[o, i] sum_{d in W(o,i)} g_{o,i}(d) x[t - d, n, i]
//
// and sigma is decayed over training (large -> ~0.5), after which the positions are rounded and
// the layer uses one integer delay per synapse (g one-hot).
//
// Truncation (pypaper's, not the paper's: DCLS sums over all K taps). The window is the 2R taps
//
//     W = [floor(p) - R + 1, floor(p) + R] intersected with [0, K - 1],   R = ceil(3 sigma)
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

// R = ceil(3 sigma) (0 for the integer case sigma <= 0).
PYPAPER_HD int64_t window_radius(double sigma) {
  return sigma > 0 ? static_cast<int64_t>(ceil(3.0 * sigma)) : 0;
}

// Most taps any synapse can touch: 2R clipped to K, or 1 in the integer case.
PYPAPER_HD int64_t max_taps(double sigma, int64_t K) {
  const int64_t R = window_radius(sigma);
  if (R == 0) return 1;
  return 2 * R < K ? 2 * R : K;
}

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

// Tap weights of one synapse at (unclamped) position p_raw. Writes the first tap's delay to *lo
// and returns the tap count c (1 <= c <= max_taps(sigma, K)); g[j] is the weight of delay lo + j
// and dg[j] = dg[j]/dp (dg may be null when the derivative is not needed).
template <typename T>
PYPAPER_HD int64_t tap_weights(T p_raw, T sigma, int64_t R, int64_t K, int64_t* lo, T* g, T* dg) {
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
  const T inv2 = T(1) / (sigma * sigma);
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
