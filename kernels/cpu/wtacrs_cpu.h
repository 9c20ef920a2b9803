// Torch-free CPU loops of WTA-CRS (kernels/common/wtacrs_math.h has the estimator and its math):
// row norms of the activations, the winner-take-all selection plus the with-replacement draws,
// and the gather-and-scale of the kept rows into a compact buffer. The dense products (forward
// GEMM, grad_input, the GEMM of the kept rows) are torch's own at::mm: on the CPU nothing beats
// its blocked GEMM, and the point of the sampling is to hand it fewer rows.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "../common/wtacrs_math.h"
#include "float16.h"

namespace pypaper {
namespace wtacrs {
namespace cpu {

using pypaper::cpu::acc_type;
using pypaper::cpu::to_float;

// sum_i x_i^2 of one row, with L independent partial sums so the compiler vectorises the loop
// (the partial sums are added in a fixed order: the result does not depend on threads).
template <typename In>
inline typename acc_type<In>::type sum_squares(const In* x, int64_t d) {
  using T = typename acc_type<In>::type;
  constexpr int L = sizeof(T) == 8 ? 8 : 16;
  T acc[L];
  for (int l = 0; l < L; ++l) acc[l] = T(0);
  int64_t i = 0;
  for (; i + L <= d; i += L) {
    for (int l = 0; l < L; ++l) {
      const T v = static_cast<T>(to_float(x[i + l]));
      acc[l] += v * v;
    }
  }
  for (; i < d; ++i) {
    const T v = static_cast<T>(to_float(x[i]));
    acc[i % L] += v * v;
  }
  T s = T(0);
  for (int l = 0; l < L; ++l) s += acc[l];
  return s;
}

// out[r] = ||x[r, :]||_2 for rows [r0, r1) of a row-major [N, d] matrix with row stride ld.
template <typename In>
inline void row_norms(const In* x, int64_t ld, int64_t d, int64_t r0, int64_t r1,
                      typename acc_type<In>::type* out) {
  for (int64_t r = r0; r < r1; ++r) out[r] = std::sqrt(sum_squares(x + r * ld, d));
}

// ---- selection --------------------------------------------------------------------------------

// w[t] = row_weight(scores[t]); returns W = sum_t w[t] (sequential double sums: the reference
// does the same, so both choose the same set).
template <typename S>
inline double weights(const S* scores, int64_t n, double* w) {
  double total = 0.0;
  for (int64_t t = 0; t < n; ++t) {
    const double s = static_cast<double>(scores[t]);
    total += (s > 0.0 && s <= 1.79e308) ? s : 0.0;
  }
  const bool uniform = uniform_weights(total);
  const double mean = uniform ? 0.0 : total / static_cast<double>(n);
  double sum = 0.0;
  for (int64_t t = 0; t < n; ++t) {
    w[t] = row_weight(static_cast<double>(scores[t]), mean, uniform);
    sum += w[t];
  }
  return sum;
}

// The winner-take-all set: the c* rows of largest weight (ties: lower index first), c* the first
// c in [0, k) minimising (W - top_c) / (k - c). Writes them, largest first, to winners[0..c*) and
// returns c*; with wta = false (plain CRS) returns 0. order: scratch of n entries. Needs k < n.
inline int64_t winners(const double* w, int64_t n, int64_t k, bool wta, double total,
                       int64_t* order, int64_t* out) {
  if (!wta) return 0;
  for (int64_t t = 0; t < n; ++t) order[t] = t;
  auto before = [w](int64_t a, int64_t b) { return w[a] > w[b] || (w[a] == w[b] && a < b); };
  std::nth_element(order, order + (k - 1), order + n, before);
  std::sort(order, order + k, before);
  int64_t best = 0;
  double best_score = wta_score(total, 0.0, k, 0);
  double prefix = 0.0;
  for (int64_t c = 1; c < k; ++c) {
    prefix += w[order[c - 1]];
    const double score = wta_score(total, prefix, k, c);
    if (score < best_score) {
      best_score = score;
      best = c;
    }
  }
  for (int64_t c = 0; c < best; ++c) out[c] = order[c];
  return best;
}

// cdf[t] = inclusive prefix sum of w over the rows outside the winners (winners weigh 0 here);
// returns R = cdf[n-1], the weight left to the draws.
inline double residual_cdf(const double* w, int64_t n, const int64_t* winners_idx, int64_t c,
                           double* cdf) {
  for (int64_t t = 0; t < n; ++t) cdf[t] = w[t];
  for (int64_t j = 0; j < c; ++j) cdf[winners_idx[j]] = 0.0;
  double run = 0.0;
  for (int64_t t = 0; t < n; ++t) {
    run += cdf[t];
    cdf[t] = run;
  }
  return run;
}

// Draws j in [j0, j1) (j >= c; draw number d = j - c): idx[j] = the inverse-CDF row of
// u_d * R, scales[j] = R / ((k - c) w[idx]).
template <typename S>
inline void draw_range(const double* cdf, const double* w, int64_t n, int64_t c, int64_t k,
                       double residual, rng::Key key, int64_t j0, int64_t j1, int64_t* idx,
                       S* scales) {
  for (int64_t j = j0; j < j1; ++j) {
    const double target = uniform53(key, static_cast<uint64_t>(j - c)) * residual;
    const int64_t t = upper_bound(cdf, n, target);
    idx[j] = t;
    scales[j] = static_cast<S>(draw_scale(residual, k - c, w[t]));
  }
}

// ---- gather and scale -------------------------------------------------------------------------

// out[j, :] = scale[j] * x[idx[j], :] for j in [j0, j1), math in the math type of In, one rounding
// to Out (scales == nullptr: a plain gather). Out is In's math type or a 16-bit type.
template <typename In, typename Out>
inline void gather_rows(const In* x, int64_t ld, int64_t d, const int64_t* idx,
                        const typename acc_type<In>::type* scales, Out* out, int64_t j0,
                        int64_t j1) {
  using T = typename acc_type<In>::type;
  for (int64_t j = j0; j < j1; ++j) {
    const In* src = x + idx[j] * ld;
    Out* dst = out + j * d;
    if (scales == nullptr) {
      for (int64_t i = 0; i < d; ++i) {
        dst[i] = pypaper::cpu::store_as<Out>(static_cast<T>(to_float(src[i])));
      }
    } else {
      const T s = scales[j];
      for (int64_t i = 0; i < d; ++i) {
        dst[i] = pypaper::cpu::store_as<Out>(static_cast<T>(to_float(src[i])) * s);
      }
    }
  }
}

}  // namespace cpu
}  // namespace wtacrs
}  // namespace pypaper
