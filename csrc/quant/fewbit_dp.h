// The optimal piecewise-constant approximation of an activation's derivative (torch-free).
//
// Novikov et al., "Few-Bit Backward" (ICML 2023), Sec. 3: with b bits per element the backward
// may use any q(x) that is constant on P = 2^b intervals; the best one for inputs of density w
// minimises  E(q) = integral (f'(x) - q(x))^2 w(x) dx.  On a fine sorted grid x_0 < ... < x_{n-1}
// with weights w_i = w(x_i) * dx this is 1-D segmentation: cut the grid into P contiguous
// segments; the best level of a segment is the weighted mean of f' on it, and its cost the
// weighted variance sum  S2 - S1^2 / S0  (S_m = sum of w_i * f'(x_i)^m over the segment), read off
// prefix sums in O(1). The dynamic program over (pieces used, grid prefix) is exact:
//     D[p][j] = min_{i < j} D[p-1][i] + cost(i, j),   D[1][j] = cost(0, j),
// O(P * n^2) time, O(P * n) memory. (The reference implementation, fewbit, ships tables from a
// Lloyd-style alternation, which can stop in a local optimum; this is the global one.)
// Borders are the midpoints between the grid points on either side of a cut.
#pragma once

#include <stdint.h>

#include <algorithm>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace pypaper {
namespace fewbit {

struct PiecewiseFit {
  std::vector<double> borders;  // P - 1, ascending
  std::vector<double> levels;   // P
  double error = 0.0;           // sum_i w_i (f'(x_i) - q(x_i))^2
};

// Prefix sums of w, w*d, w*d^2 (and of d, for segments of zero weight).
struct SegmentSums {
  std::vector<double> s0, s1, s2, d1;
  SegmentSums(const double* d, const double* w, int64_t n)
      : s0(n + 1, 0.0), s1(n + 1, 0.0), s2(n + 1, 0.0), d1(n + 1, 0.0) {
    for (int64_t i = 0; i < n; ++i) {
      s0[i + 1] = s0[i] + w[i];
      s1[i + 1] = s1[i] + w[i] * d[i];
      s2[i + 1] = s2[i] + w[i] * d[i] * d[i];
      d1[i + 1] = d1[i] + d[i];
    }
  }
  // Weighted squared error of the best constant on grid points [i, j).
  double cost(int64_t i, int64_t j) const {
    const double w = s0[j] - s0[i];
    if (!(w > 0.0)) return 0.0;
    const double a = s1[j] - s1[i];
    const double c = (s2[j] - s2[i]) - a * a / w;
    return c > 0.0 ? c : 0.0;  // rounding may leave -1e-17 on a flat segment
  }
  // The best constant there: the weighted mean (the plain mean where the density vanishes).
  double level(int64_t i, int64_t j) const {
    const double w = s0[j] - s0[i];
    if (w > 0.0) return (s1[j] - s1[i]) / w;
    return (d1[j] - d1[i]) / static_cast<double>(j - i);
  }
};

inline PiecewiseFit optimal_piecewise_constant(const double* grid, const double* deriv,
                                               const double* weight, int64_t n, int pieces) {
  if (pieces < 1) throw std::invalid_argument("pieces must be at least 1, got " + std::to_string(pieces));
  if (n < pieces) {
    throw std::invalid_argument("the grid needs at least as many points as pieces: " +
                                std::to_string(n) + " points for " + std::to_string(pieces) + " pieces");
  }
  for (int64_t i = 0; i < n; ++i) {
    if (!(weight[i] >= 0.0) || weight[i] == std::numeric_limits<double>::infinity()) {
      throw std::invalid_argument("density weights must be finite and >= 0, got " +
                                  std::to_string(weight[i]) + " at grid point " + std::to_string(i));
    }
    if (!(deriv[i] == deriv[i]) || deriv[i] == std::numeric_limits<double>::infinity() ||
        deriv[i] == -std::numeric_limits<double>::infinity()) {
      throw std::invalid_argument("derivative values must be finite (grid point " + std::to_string(i) + ")");
    }
    if (i > 0 && !(grid[i] > grid[i - 1])) {
      throw std::invalid_argument("the grid must be strictly increasing (at point " + std::to_string(i) + ")");
    }
  }
  const SegmentSums S(deriv, weight, n);
  const double inf = std::numeric_limits<double>::infinity();
  // prev[j] = D[p-1][j]; cut[p][j] = the argmin i of D[p][j].
  std::vector<double> prev(n + 1, inf), cur(n + 1, inf);
  std::vector<std::vector<int64_t>> cut(pieces + 1, std::vector<int64_t>(n + 1, 0));
  for (int64_t j = 1; j <= n; ++j) prev[j] = S.cost(0, j);
  for (int p = 2; p <= pieces; ++p) {
    std::fill(cur.begin(), cur.end(), inf);
    // j - i >= 1 points per segment, and the first p - 1 segments need p - 1 points.
    for (int64_t j = p; j <= n; ++j) {
      double best = inf;
      int64_t arg = p - 1;
      for (int64_t i = p - 1; i < j; ++i) {
        const double v = prev[i] + S.cost(i, j);
        if (v < best) {
          best = v;
          arg = i;
        }
      }
      cur[j] = best;
      cut[p][j] = arg;
    }
    std::swap(prev, cur);
  }
  PiecewiseFit fit;
  fit.error = prev[n];
  // Walk the cuts back from (pieces, n).
  std::vector<int64_t> ends(pieces + 1, 0);
  ends[pieces] = n;
  for (int p = pieces; p >= 2; --p) ends[p - 1] = cut[p][ends[p]];
  ends[0] = 0;
  for (int p = 1; p <= pieces; ++p) fit.levels.push_back(S.level(ends[p - 1], ends[p]));
  for (int p = 1; p < pieces; ++p) {
    const int64_t i = ends[p];
    fit.borders.push_back(0.5 * (grid[i - 1] + grid[i]));
  }
  return fit;
}

}  // namespace fewbit
}  // namespace pypaper
