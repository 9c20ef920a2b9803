// Leaky integrate-and-fire (LIF) neuron: the per-element math of every snn kernel (CPU, CUDA).
//
// One neuron, one time step t (SpikingJelly's activation_based LIFNode / ParametricLIFNode;
// PLIF: Fang et al., "Incorporating Learnable Membrane Time Constant to Enhance Learning of
// Spiking Neural Networks", ICCV 2021). V[t-1] is the membrane after the previous reset, X[t] the
// input, Vr the reset potential (0 in the charge equation for a soft reset), Vth the threshold:
//
//   charge   decay_input:   H = V + (X - (V - Vr)) * k          (k = 1/tau, PLIF: k = sigmoid(w))
//            otherwise:     H = V - (V - Vr) * k + X
//   fire     S = Theta(H - Vth),  Theta(x) = 1 if x >= 0 else 0   (SpikingJelly's heaviside)
//   reset    hard:          V' = S * Vr + (1 - S) * H
//            soft:          V' = H - S * Vth
//
// SpikingJelly's LIFNode divides by tau while its PLIF multiplies by k = sigmoid(w); the two round
// differently, so the decay is either tau (DIV: "/ tau") or k ("* k"), to match both to the bit.
//
// Backward (reverse scan over t; sg = sigma'(H - Vth), the surrogate derivative; dr = 0 when
// detach_reset cuts S out of the reset term, else 1; gS, gV the incoming gradients of S[t], V[t]):
//
//   dV'/dH   hard: (1 - S) + dr * (Vr - H) * sg          soft: 1 - dr * Vth * sg
//   dV'/dVth hard: -dr * (Vr - H) * sg                   soft: -S + dr * Vth * sg
//   gH       = gS * sg + gV * dV'/dH
//   gVth    += -gS * sg + gV * dV'/dVth
//   gX       = gH * dH/dX         dH/dX  = k (decay_input) or 1
//   gV[t-1] += gH * dH/dV         dH/dV  = 1 - k                 (0 under SLTT, below)
//   gk      += gH * dH/dk         dH/dk  = X - (V - Vr) = (H - V) / k      (decay_input)
//                                         = -(V - Vr)                      (otherwise)
//   (for the "/ tau" form: dH/dtau = -(H - V) / tau, resp. (V - Vr) / tau^2.)
//
// dH/dk needs no X: with decay_input X - (V - Vr) = (H - V) / k, and V = V[t-1] is recomputed
// from the stored H[t-1] (fire and reset again), so backward keeps one value per neuron-step, H.
//
// SLTT (Meng et al., "Towards Memory- and Time-Efficient Backpropagation for Training Spiking
// Neural Networks", ICCV 2023): the membrane enters the charge detached, V[t-1].detach(), so
// every temporal path - the leak (1 - k) and the reset's dependence on S, both of which only reach
// the loss through V[t-1] -> H[t] - is dropped: gH[t] = gS[t] * sg(H[t] - Vth) plus the gradient
// of V[t] itself when V is an output. Local terms (gX, gk, gVth of step t) stay.
//
// Surrogates sigma(x) with their derivative sigma'(x) (SpikingJelly's formulas and ids 0..6; Rect
// is SpikingJelly's Rect, id 7 here). The forward always fires with Theta; sigma' is the backward.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "hd.h"

namespace pypaper {
namespace snn {

enum class Surrogate : int32_t {
  Sigmoid = 0,             // sigma = sigmoid(a x);                 sigma' = a s (1 - s)
  ATan = 1,                // sigma = atan(pi/2 a x)/pi + 1/2;      sigma' = (a/2) / (1 + (pi/2 a x)^2)
  PiecewiseQuadratic = 2,  // sigma' = a - a^2 |x|  for |x| <= 1/a, else 0
  PiecewiseExp = 3,        // sigma' = (a/2) exp(-a |x|)
  SoftSign = 4,            // sigma = (a x / (1 + |a x|) + 1)/2;    sigma' = 1 / (2 a (1/a + |x|)^2)
  SuperSpike = 5,          // sigma' = a / (1 + |x|)^2   (Zenke & Ganguli 2018)
  Erf = 6,                 // sigma = erfc(-a x)/2;                 sigma' = a/sqrt(pi) exp(-(a x)^2)
  Rect = 7,                // sigma = clip(a x + 1/2, 0, 1);        sigma' = a [|x| < 1/(2a)]
};

constexpr int32_t kNumSurrogates = 8;

PYPAPER_HD bool valid_surrogate(int64_t id) { return id >= 0 && id < kNumSurrogates; }

#if !defined(__CUDA_ARCH__)
// a * b + c, fused into one rounding when FUSE and the CPU has FMA (the build's -ffp-contract=off
// keeps the compiler from fusing on its own; without FMA a call to fmaf would stop the vectorizer).
template <bool FUSE>
inline float madd_f32(float a, float b, float c) {
#if defined(__FMA__)
  if constexpr (FUSE) return __builtin_fmaf(a, b, c);
#endif
  return a * b + c;
}

// Cephes' expf, branch-free so the CPU loops vectorize (a call to expf stops the vectorizer):
// e^x = 2^n e^r, n = round(x log2 e), r = x - n ln2 in two parts (ln2's high part has few bits,
// so n times it is exact), e^r by a degree-7 polynomial on |r| <= ln2/2, 2^n from exponent bits.
template <bool FUSE>
inline float exp_reduce_f32(float x, float n) {
  return madd_f32<FUSE>(n, 2.12194440e-4f, madd_f32<FUSE>(n, -0.693359375f, x));
}

template <bool FUSE>
inline float exp_poly_f32(float r) {
  float p = 1.9875691500e-4f;
  p = madd_f32<FUSE>(p, r, 1.3981999507e-3f);
  p = madd_f32<FUSE>(p, r, 8.3334519073e-3f);
  p = madd_f32<FUSE>(p, r, 4.1665795894e-2f);
  p = madd_f32<FUSE>(p, r, 1.6666665459e-1f);
  p = madd_f32<FUSE>(p, r, 5.0000001201e-1f);
  return madd_f32<FUSE>(p, r * r, r) + 1.0f;
}

inline float float_from_bits(int32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// e^x for fp32 on the host, within 2 ulp of expf on [-87.33, 88]: 0 below -87.33 (where e^x
// leaves the normal floats), e^88 on (88, 88.72] (n must stay <= 127), +inf above. Unfused (the
// bits the local family was tested with). The surrogates only need it accurate where their
// derivative is not negligible.
inline float exp_f32(float x) {
  const float xc = x < -87.33654f ? -87.33654f : (x > 88.0f ? 88.0f : x);
  const float n = std::floor(xc * 1.44269504088896341f + 0.5f);
  const float y = exp_poly_f32<false>(exp_reduce_f32<false>(xc, n)) *
                  float_from_bits((static_cast<int32_t>(n) + 127) << 23);
  return x < -87.33654f ? 0.0f : (x > 88.72283f ? INFINITY : y);
}

// e^x for x <= 0 (or NaN), the case of every surrogate derivative (their exponents are -a|x| and
// -(a x)^2): only the low end is clamped, the multiply-adds are fused where the CPU can, and n
// comes from adding 1.5 * 2^23 + 127, which rounds x log2 e to an integer held in the sum's low
// mantissa bits as n + 127 (in [1, 127] here): shifted left by 23 they are 2^n's bits, and n as a
// float is read from the same bits (not as t - (1.5 * 2^23 + 127), which -ffast-math would fold
// back into x log2 e, unrounded). Within 2 ulp of expf on [-87.33, 0]; 0 below.
// 17 instead of 45 vector instructions: 0.41 -> 0.19 ns per element on one Xeon core (AVX-512).
// The backward loops (bench.lif_loops, T = 32): in cache on one thread, Sigmoid (SpikingJelly's
// default surrogate) 0.98 -> 0.76 ns per neuron-step, PiecewiseExp 0.95 -> 0.65, Erf 0.88 ->
// 0.61; cold at 2^18 neurons on 2 threads 4.7 -> 3.9, 4.5 -> 3.5, 4.3 -> 3.3 ms.
inline float exp_nonpos_f32(float x) {
  constexpr float kShift = 12583039.0f;  // 1.5 * 2^23 + 127
  const float xc = x < -87.33654f ? -87.33654f : x;
  const float t = madd_f32<true>(xc, 1.44269504088896341f, kShift);
  int32_t tb;
  std::memcpy(&tb, &t, sizeof tb);
  const float n = static_cast<float>(tb - 0x4B40007F);  // bits of kShift
  const float y = exp_poly_f32<true>(exp_reduce_f32<true>(xc, n)) *
                  float_from_bits(static_cast<int32_t>(static_cast<uint32_t>(tb) << 23));
  return x < -87.33654f ? 0.0f : y;
}
#endif

// e^v: exp on the GPU, the vectorizable fp32 exp on the host; NONPOS: v <= 0 (the surrogate
// derivatives' exponents), exp_nonpos_f32.
template <bool NONPOS = false, typename T>
PYPAPER_HD T sexp(T v) {
#if defined(__CUDA_ARCH__)
  return exp(v);
#else
  if constexpr (sizeof(T) == 4) {
    return NONPOS ? exp_nonpos_f32(v) : exp_f32(v);
  } else {
    return std::exp(v);
  }
#endif
}

template <typename T>
PYPAPER_HD T satan(T v) {
#if defined(__CUDA_ARCH__)
  return atan(v);
#else
  return std::atan(v);
#endif
}

template <typename T>
PYPAPER_HD T serfc(T v) {
#if defined(__CUDA_ARCH__)
  return erfc(v);
#else
  return std::erfc(v);
#endif
}

template <typename T>
PYPAPER_HD T sabs(T v) {
  // fabs clears the sign bit: one vector AND, where the select wrote three instructions (-0.0
  // and +0.0 give every surrogate the same value).
#if defined(__CUDA_ARCH__)
  return fabs(v);
#else
  return std::fabs(v);
#endif
}

// pi and 1/sqrt(pi) rounded to T, the constants SpikingJelly uses in Python (double, then T).
template <typename T>
PYPAPER_HD T pi_v() {
  return T(3.141592653589793);
}
template <typename T>
PYPAPER_HD T inv_sqrt_pi_v() {
  return T(0.5641895835477563);
}

// sigma'(x) for a surrogate known at compile time: the CPU and CUDA loops are instantiated per
// surrogate so the inner loop has no switch and vectorizes.
template <Surrogate S, typename T>
PYPAPER_HD T surrogate_grad(T x, T a) {
  if constexpr (S == Surrogate::Sigmoid) {
    // a s (1 - s) with s = sigmoid(a x), written with e = exp(-a|x|) <= 1 (sigma' is even):
    // a e / (1 + e)^2. The exponent is never positive, and far from the threshold the value
    // decays to 0 smoothly instead of through 1 - s losing its digits (SpikingJelly's form, within
    // 1.5 a 2^-24 of this one: near the threshold the same to a few ulp, in the tails this is
    // the accurate one).
    const T e = sexp<true>(-a * sabs(x));
    const T d = T(1) + e;
    return a * e / (d * d);
  } else if constexpr (S == Surrogate::ATan) {
    const T z = (pi_v<T>() * (a / T(2))) * x;
    return (a / T(2)) / (T(1) + z * z);
  } else if constexpr (S == Surrogate::PiecewiseQuadratic) {
    const T ax = sabs(x);
    return ax > T(1) / a ? T(0) : a - a * a * ax;
  } else if constexpr (S == Surrogate::PiecewiseExp) {
    return a / T(2) * sexp<true>(-a * sabs(x));
  } else if constexpr (S == Surrogate::SoftSign) {
    const T z = T(1) / a + sabs(x);
    return T(1) / (T(2) * a * (z * z));
  } else if constexpr (S == Surrogate::SuperSpike) {
    const T z = sabs(x) + T(1);
    return a / (z * z);
  } else if constexpr (S == Surrogate::Erf) {
    const T z = x * a;
    return sexp<true>(-(z * z)) * (a * inv_sqrt_pi_v<T>());
  } else {  // Rect
    return sabs(x) < T(0.5) / a ? a : T(0);
  }
}

// The same, with the surrogate chosen at run time (scalar callers, tests).
template <typename T>
PYPAPER_HD T surrogate_grad(int32_t id, T x, T a) {
  switch (static_cast<Surrogate>(id)) {
    case Surrogate::Sigmoid: return surrogate_grad<Surrogate::Sigmoid>(x, a);
    case Surrogate::ATan: return surrogate_grad<Surrogate::ATan>(x, a);
    case Surrogate::PiecewiseQuadratic: return surrogate_grad<Surrogate::PiecewiseQuadratic>(x, a);
    case Surrogate::PiecewiseExp: return surrogate_grad<Surrogate::PiecewiseExp>(x, a);
    case Surrogate::SoftSign: return surrogate_grad<Surrogate::SoftSign>(x, a);
    case Surrogate::SuperSpike: return surrogate_grad<Surrogate::SuperSpike>(x, a);
    case Surrogate::Erf: return surrogate_grad<Surrogate::Erf>(x, a);
    default: return surrogate_grad<Surrogate::Rect>(x, a);
  }
}

// The primitive sigma(x) whose derivative the backward uses (spiking=False forward; tests check
// sigma' against finite differences of it). SuperSpike has no bounded primitive in the literature:
// here its antiderivative a x / (1 + |x|), for the derivative test only.
template <typename T>
PYPAPER_HD T surrogate_primitive(int32_t id, T x, T a) {
  switch (static_cast<Surrogate>(id)) {
    case Surrogate::Sigmoid: return T(1) / (T(1) + sexp(-a * x));
    case Surrogate::ATan: return satan(pi_v<T>() / T(2) * a * x) / pi_v<T>() + T(0.5);
    case Surrogate::PiecewiseQuadratic: {
      const T ax = sabs(x);
      if (ax > T(1) / a) return x > T(0) ? T(1) : T(0);
      const T sg = x > T(0) ? T(1) : (x < T(0) ? T(-1) : T(0));
      return -(a * a) / T(2) * x * x * sg + a * x + T(0.5);
    }
    case Surrogate::PiecewiseExp:
      return x >= T(0) ? T(1) - sexp(-a * x) / T(2) : sexp(a * x) / T(2);
    case Surrogate::SoftSign: return (a * x / (T(1) + sabs(a * x)) + T(1)) / T(2);
    case Surrogate::SuperSpike: return a * x / (T(1) + sabs(x));
    case Surrogate::Erf: return serfc(-a * x) / T(2);
    default: {
      const T v = a * x + T(0.5);
      return v < T(0) ? T(0) : (v > T(1) ? T(1) : v);
    }
  }
}

// ---- forward -----------------------------------------------------------------------------------

// H from V[t-1] and X[t]. DIV: decay holds tau (SpikingJelly's LIFNode, "/ tau"), else k = 1/tau
// (PLIF, "* k"). Operation order is SpikingJelly's, so fp32 results match it to the bit.
// k = 0 without decay_input is the IF neuron (IFNode runs as this LIF): H = V + X, SpikingJelly's
// IFNode charge, taken as such so that an infinite membrane (a soft reset accumulating past the
// dtype's range, fp16 above 65504) stays infinite instead of becoming V - inf * 0 = NaN. For finite
// V the two forms give the same H (V - (+-0) + X = V + X, up to the sign of a zero sum).
template <bool DECAY_INPUT, bool DIV, typename T>
PYPAPER_HD T charge(T v, T x, T decay, T vr) {
  if constexpr (DECAY_INPUT) {
    const T d = x - (v - vr);
    return v + (DIV ? d / decay : d * decay);
  } else if constexpr (DIV) {
    return v - (v - vr) / decay + x;
  } else {
    return decay == T(0) ? v + x : v - (v - vr) * decay + x;
  }
}

// S = Theta(H - Vth) as 0 or 1 (x >= 0, not H >= Vth: the same test SpikingJelly makes).
template <typename T>
PYPAPER_HD T fire(T h, T vth) {
  return (h - vth) >= T(0) ? T(1) : T(0);
}

// V[t] from H[t] and S[t]. hard: S * Vr + (1 - S) * H; soft: H - S * Vth (SpikingJelly's order).
template <bool HARD, typename T>
PYPAPER_HD T reset(T h, T s, T vth, T vr) {
  if constexpr (HARD) {
    return s * vr + (T(1) - s) * h;
  } else {
    return h - s * vth;
  }
}

// ---- backward ----------------------------------------------------------------------------------

// Per-neuron constants of the backward, fixed over time: what the decay contributes.
//   cx: dH/dX;  cv: dH/dV[t-1] (0 under SLTT);  ch, cr: dH/d(decay) = (H - V) * ch + (V - Vr) * cr.
template <typename T>
struct DecayCoef {
  T cx, cv, ch, cr;
};

template <typename T>
PYPAPER_HD DecayCoef<T> decay_coef(T decay, bool decay_input, bool div, bool sltt) {
  const T k = div ? T(1) / decay : decay;
  DecayCoef<T> c;
  c.cx = decay_input ? k : T(1);
  c.cv = sltt ? T(0) : T(1) - k;
  if (decay_input) {
    c.ch = div ? -T(1) / decay : T(1) / decay;  // -(H - V)/tau  or  (H - V)/k
    c.cr = T(0);
  } else {
    c.ch = T(0);
    c.cr = div ? T(1) / (decay * decay) : T(-1);  // (V - Vr)/tau^2  or  -(V - Vr)
  }
  return c;
}

// Gradients of one step, given gS (spike), gV (membrane V[t] after reset: from the future through
// H[t+1], plus any gradient of V[t] as an output) and the surrogate derivative sg at H - Vth.
template <typename T>
struct StepGrad {
  T gh;    // dL/dH[t]
  T gvth;  // this step's term of dL/dVth
};

template <bool HARD, typename T>
PYPAPER_HD StepGrad<T> step_grad(T gs, T gv, T h, T s, T sg, T vth, T vr, T dr) {
  StepGrad<T> g;
  if constexpr (HARD) {
    // (Vr - H) dS/dx, absent when the reset is detached; the terms of a zero gV are absent too:
    // with an infinite membrane (an IF neuron past fp16's range) (Vr - H) sg is inf * 0 = NaN,
    // which a term that is not there must not bring in (autograd's graph has no such term)
    const T rs = dr != T(0) ? dr * (vr - h) * sg : T(0);
    const bool has_gv = gv != T(0);
    g.gh = gs * sg + (has_gv ? gv * ((T(1) - s) + rs) : T(0));
    g.gvth = -(gs * sg) - (has_gv ? gv * rs : T(0));
  } else {
    const T ts = dr * vth * sg;
    g.gh = gs * sg + gv * (T(1) - ts);
    g.gvth = -(gs * sg) + gv * (ts - s);
  }
  return g;
}

}  // namespace snn
}  // namespace pypaper
