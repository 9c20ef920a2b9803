// Shared scalar math of WTA-CRS (Liu et al., "Winner-Take-All Column Row Sampling for Memory
// Efficient Adaptation of Language Model", NeurIPS 2023), used by the CPU loops
// (kernels/cpu/wtacrs_cpu.h) and the CUDA kernels (kernels/cuda/wtacrs_kernels.cu) alike.
//
// The estimator of grad_W = dY^T X = sum_t dy_t x_t^T over the N rows t of a linear layer:
//
//   grad_W ~= sum_{c in C} dy_c x_c^T  +  (1 - P_C) / (k - |C|) * sum_{j=1..k-|C|} dy_{i_j} x_{i_j}^T / p_{i_j}
//
// p_t the sampling probabilities, C the winner-take-all set (the |C| largest p, kept with weight
// 1), P_C = sum_{c in C} p_c, and the k - |C| draws i_j taken with replacement from the rows
// outside C with probability p_i / (1 - P_C). Every term's expectation is its share of the exact
// sum, so the estimator is unbiased for any p > 0; its variance is smallest when p_t is
// proportional to ||x_t|| * ||dy_t|| (the paper's choice). |C| minimises (1 - P_C) / (k - |C|),
// the factor in front of the stochastic part (the paper's adaptive rule); plain CRS is |C| = 0.
//
// Everything is done on unnormalised weights w_t (only ratios matter): P_C = W_C / W,
// (1 - P_C) = R / W with R the weight outside C, and the scale of draw j is R / ((k-|C|) w_{i_j}).
//
// Weights: w_t = s_t + eta * S / N, s_t = ||x_t|| * g_t (g_t: a gradient-norm estimate, or 1),
// S = sum_t s_t. The defensive mixture eta (Hesterberg, 1995) keeps every p_t >= eta/((1+eta)N)
// > 0: g_t is only last step's ||dy_t||, and a row whose estimate is 0 but whose true dy_t is not
// must still be drawable or the estimator is biased. When S is 0 or not finite the weights are
// uniform (still unbiased).
#pragma once
#include <cmath>
#include <cstdint>

#include "hash_rng.h"
#include "hd.h"

namespace pypaper {
namespace wtacrs {

// The defensive-mixture share of the uniform distribution.
constexpr double kDefensive = 1e-3;

// The weight of a row from its score s (>= 0; NaN and negatives count as 0) and the mean score
// S / N; `uniform` when S is 0 or not finite.
PYPAPER_HD double row_weight(double s, double mean_score, bool uniform) {
  if (uniform) return 1.0;
  const double v = (s > 0.0 && s <= 1.79e308) ? s : 0.0;  // drops NaN, negatives and +inf
  return v + kDefensive * mean_score;
}

// Whether the total score S calls for uniform weights.
PYPAPER_HD bool uniform_weights(double total_score) {
  return !(total_score > 0.0 && total_score <= 1.79e308);
}

// The stochastic part's factor (R_c) / (k - c) for a WTA set of size c: R_c = W - (sum of the c
// largest weights). The WTA size c* is the first c in [0, k) minimising it.
PYPAPER_HD double wta_score(double total_weight, double top_prefix_sum, int64_t k, int64_t c) {
  return (total_weight - top_prefix_sum) / static_cast<double>(k - c);
}

// 48 random bits of draw d as a double in [0, 1): two 24-bit words of the counter RNG
// (kernels/common/hash_rng.h) at counters 2d + 1 and 2d + 2, u = (a + b * 2^-24), exact in
// double. 24 bits alone would leave rows with probability below 2^-24 out of reach on large N.
// Counter 0 is skipped (a habit from an old make_key, under which counter 0 gave one number for
// every seed below 2^32; fixed in hash_rng.h, kept so that draws stay as they were).
PYPAPER_HD double uniform53(rng::Key key, uint64_t d) {
  const double a = rng::uniform01(key, 2 * d + 1);
  const double b = rng::uniform01(key, 2 * d + 2);
  return a + b * (1.0 / 16777216.0);
}

// The smallest t in [0, n) with cdf[t] > target (cdf non-decreasing, target < cdf[n-1]): the
// inverse-CDF draw. Rows with zero weight (flat cdf, e.g. the WTA set) are never returned.
PYPAPER_HD int64_t upper_bound(const double* cdf, int64_t n, double target) {
  int64_t lo = 0, hi = n - 1;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (cdf[mid] > target) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  return lo;
}

// The scale of a draw that picked a row of weight w: R / ((k - c) * w).
PYPAPER_HD double draw_scale(double residual, int64_t draws, double w) {
  return residual / (static_cast<double>(draws) * w);
}

}  // namespace wtacrs
}  // namespace pypaper
