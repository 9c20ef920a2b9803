// Power-exponent quantization (PowerQuant, Yvinec et al., ICLR 2023; NUPES, Yvinec et al. 2023):
// the per-element math shared by the CPU loops (kernels/cpu/power_quant_cpu.h) and the CUDA
// kernels (kernels/cuda/power_quant_kernels.cu).
//
// With exponent a > 0, a per-channel range m = max|x| > 0 and b bits (qmax = 2^(b-1) - 1):
//
//   u = (|x| / m)^a in [0, 1]                     (the power transform, scale-free)
//   c = min(round(qmax * u), qmax)                (uniform rounding in the powered domain)
//   code = sign(x) * c                            (int8 in [-qmax, qmax])
//   y = sign(code) * m * (|code| / qmax)^(1/a)    (the inverse power: dequantize)
//
// which is PowerQuant's  y = sign(x) * (s * round(|x|^a / s))^(1/a)  with s = m^a / qmax written
// without ever forming m^a (no overflow or underflow for any a).
//
// No pow per element. Rounding in the powered domain is a comparison in the original domain:
// c >= k  <=>  qmax * (|x|/m)^a >= k - 1/2  <=>  |x| >= t_k = m * ((k - 1/2) / qmax)^(1/a),
// so c = #{k in 1..qmax : |x| >= t_k} (ties at k - 1/2 round up), a count over qmax sorted
// thresholds; y is a lookup in qmax + 1 levels l_k = m * (k / qmax)^(1/a). Both tables are
// computed in double per channel. For a float x the threshold is stored rounded UP to float:
// for a float x, x >= t (double) <=> x >= ceil_float(t), so the float comparison decides exactly
// as the double one. The plain-PyTorch reference (pypaper/quant/power.py) builds the same tables
// and uses searchsorted, so codes and values agree to the bit.
//
// Gradients (pypaper/quant/power.py, the learned NUPES variant), with u = |x| / m, r the rounded
// code before the clamp and y = sign(x) m (r/qmax)^(1/a):
//   dy/dx = 1 where |x| <= m, else 0                         (straight-through for the rounding)
//   "ste" (default, LSQ-style: dr/da and dr/dm through the rounding as if r = qmax u^a):
//     dy/da = sign(x) l_c [ -log(c/qmax) / a^2 + qmax u^a log(u) / (a c) ]
//     dy/dm = sign(x) (c/qmax)^(1/a) [ 1 - qmax u^a / c ]
//     (both vanish when the rounding error does; clipped |x| > m: dy/da = 0, dy/dm = sign(x))
//   "fixed" (codes held fixed: the exact derivative between rounding jumps):
//     dy/da = -sign(x) l_c log(c/qmax) / a^2,   dy/dm = sign(x) (c/qmax)^(1/a)
// Both are 0 at c = 0. The d|x|^a/da = |x|^a log|x| term is only evaluated at c >= 1, where
// qmax u^a >= 1/2 keeps u >= (1/(2 qmax))^(1/a) away from 0: x = 0 and every x rounded to 0
// contribute exactly 0, and log(u) stays finite (the numerical care NUPES asks for).
#pragma once
#include <cmath>
#include <cstdint>
#include <limits>

#include "hd.h"

namespace pypaper {
namespace power {

// Largest qmax: 8 bits (int8 codes). Tables have at most kMaxTable entries.
constexpr int kMaxQmax = 127;
constexpr int kMaxTable = 128;

// Smallest power of two above qmax: the threshold table t[1..P-1] (t[k > qmax] = +inf) of the
// branch-free binary search.
PYPAPER_HD int table_pow2(int qmax) {
  int p = 1;
  while (p <= qmax) p <<= 1;
  return p;
}

// Unit (m = 1) threshold and level of k; inv_a = 1 / a in double.
PYPAPER_HD double unit_threshold(int k, int qmax, double inv_a) {
  return pow((static_cast<double>(k) - 0.5) / static_cast<double>(qmax), inv_a);
}

PYPAPER_HD double unit_level(int k, int qmax, double inv_a) {
  return pow(static_cast<double>(k) / static_cast<double>(qmax), inv_a);
}

// d(unit level)/da = -(k/qmax)^(1/a) * log(k/qmax) / a^2; 0 at k = 0 (the level is 0 for all a).
PYPAPER_HD double unit_level_da(int k, int qmax, double inv_a) {
  if (k == 0) return 0.0;
  const double r = static_cast<double>(k) / static_cast<double>(qmax);
  return -pow(r, inv_a) * log(r) * inv_a * inv_a;
}

// The smallest T >= v (T = float: rounding up, so that float x >= result <=> x >= v).
template <typename T>
PYPAPER_HD T ceil_to(double v) {
  if constexpr (sizeof(T) == sizeof(double)) {
    return static_cast<T>(v);
  } else {
    float f = static_cast<float>(v);
    if (static_cast<double>(f) < v) f = nextafterf(f, INFINITY);
    return f;
  }
}

// The channel's threshold table from the unit thresholds: thr[k] = ceil_T(m * unit[k]) for
// k = 1..qmax, +inf for qmax < k < P (thr[0] is unused). m <= 0 or NaN: every threshold +inf,
// so every code is 0.
template <typename T>
PYPAPER_HD void scale_thresholds(T* thr, const double* unit_thr, double m, int qmax, int P) {
  const bool ok = m > 0.0;
  thr[0] = T(0);
  for (int k = 1; k < P; ++k) {
    thr[k] = (ok && k <= qmax) ? ceil_to<T>(m * unit_thr[k]) : static_cast<T>(INFINITY);
  }
}

// lvl[k] = m * unit[k], k = 0..qmax (0 when m <= 0); lvl[qmax < k < P] = lvl[qmax], so a
// select chain over all P entries (level_linear) reads defined values.
template <typename T>
PYPAPER_HD void scale_levels(T* lvl, const double* unit_lvl, double m, int qmax, int P) {
  const double mm = m > 0.0 ? m : 0.0;
  for (int k = 0; k <= qmax; ++k) lvl[k] = static_cast<T>(mm * unit_lvl[k]);
  for (int k = qmax + 1; k < P; ++k) lvl[k] = lvl[qmax];
}

// c = #{k >= 1 : ax >= thr[k]} for a non-decreasing thr[1..P-1], P a power of two. Branch-free
// binary search (log2 P steps); NaN compares false, so NaN -> 0.
template <typename T>
PYPAPER_HD int code_search(T ax, const T* thr, int P) {
  int c = 0;
  for (int step = P >> 1; step > 0; step >>= 1) {
    c += (ax >= thr[c + step]) ? step : 0;
  }
  return c;
}

// The same count by a linear scan: for few levels (bits <= 4) a CPU vectorizes this across
// elements (one compare-and-add per threshold), where the search would need gathers.
template <typename T, int P>
PYPAPER_HD int code_linear(T ax, const T* thr) {
  int c = 0;
  for (int k = 1; k < P; ++k) c += (ax >= thr[k]) ? 1 : 0;
  return c;
}

// lvl[c] of the same count, as a chain of selects (no table gather): what a CPU vectorizes for
// few levels. Exact: every step keeps or replaces a stored level.
template <typename T, int P>
PYPAPER_HD T level_linear(T ax, const T* thr, const T* lvl) {
  T l = lvl[0];
  for (int k = 1; k < P; ++k) l = (ax >= thr[k]) ? lvl[k] : l;
  return l;
}

// Signed code of x from its magnitude count.
template <typename T>
PYPAPER_HD int signed_code(T x, int c) {
  return x < T(0) ? -c : c;
}

// y of a signed code: -lvl[-code] for negative codes. |code| is clamped to qmax, so a corrupted
// code never reads past the table.
template <typename T>
PYPAPER_HD T level_of_code(int code, const T* lvl, int qmax) {
  int c = code < 0 ? -code : code;
  c = c > qmax ? qmax : c;
  return code < 0 ? -lvl[c] : lvl[c];
}

// Fake-quantized value from the level l = lvl[c]: NaN stays NaN, x < 0 takes -l.
template <typename T>
PYPAPER_HD T fake_value(T x, T l) {
  return x != x ? x : (x < T(0) ? -l : l);
}

// The "ste" per-element terms (dy/da, dy/dm) / sign(x) for |x| <= m, c >= 1: unit_lvl_c =
// (c/qmax)^(1/a), unit_lda_c = its derivative in a (unit_level_da). log u and u^a are evaluated
// in M (the data's float type: float32 data takes logf/expf, a relative error of 1e-7 on a
// gradient term), the rest in double.
struct SteTerms {
  double da, dm;
};

// log / exp in the argument's own type on host and device (float stays float).
template <typename M>
PYPAPER_HD M log_of(M v) {
#if defined(__CUDA_ARCH__)
  return log(v);
#else
  return std::log(v);
#endif
}

template <typename M>
PYPAPER_HD M exp_of(M v) {
#if defined(__CUDA_ARCH__)
  return exp(v);
#else
  return std::exp(v);
#endif
}

template <typename M>
PYPAPER_HD SteTerms ste_terms(M ax, int c, M m, double a, int qmax, double unit_lvl_c,
                              double unit_lda_c) {
  if (c == 0 || !(m > M(0))) return SteTerms{0.0, 0.0};
  if (ax > m) return SteTerms{0.0, 1.0};  // clipped: y = sign(x) m
  const M lu_m = log_of(ax / m);          // finite: c >= 1 implies ax > 0
  const double lu = static_cast<double>(lu_m);
  const double qua = static_cast<double>(qmax) *
                     static_cast<double>(exp_of(static_cast<M>(a) * lu_m));  // qmax u^a
  const double ratio = qua / static_cast<double>(c);
  const double md = static_cast<double>(m);
  return SteTerms{md * unit_lda_c + md * unit_lvl_c * ratio * lu / a, unit_lvl_c * (1.0 - ratio)};
}

}  // namespace power
}  // namespace pypaper
