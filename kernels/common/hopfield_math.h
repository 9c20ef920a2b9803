// Shared scalar math of the fused modern-Hopfield retrieval (Ramsauer et al., "Hopfield Networks
// is All You Need", ICLR 2021), used by the CPU loops (kernels/cpu/hopfield_cpu.h) and the CUDA
// kernels (kernels/cuda/hopfield_kernels.cu) alike.
//
// The retrieval update of one head, with stored patterns K [S, d], state xi [L, d], scaling beta:
//     P_n = softmax(beta * xi_n K^T + M)        (row-wise over the S stored patterns)
//     xi_{n+1} = P_n K,   out = P_N V           (N: the last step of the head)
// Every softmax runs "online" (flash-style) over tiles of S: a running row maximum m and a
// running denominator l, rescaled by exp(m_old - m_new) whenever the maximum grows; the finished
// row keeps only lse = m + log l, from which the backward rebuilds P = exp(s - lse) tile by tile.
#pragma once
#include <cmath>
#include <cstdint>

#include "hd.h"

namespace pypaper {
namespace hopfield {

// exp(x) for float, branch-free so a CPU loop over it vectorizes: x = k ln2 + r, |r| <= ln2/2,
// exp(r) by a degree-6 polynomial (Cephes' expf coefficients; relative error about 2 ulp),
// 2^k put into the exponent bits. x below -87.3 (incl. -inf) gives 0; NaN stays NaN; arguments
// here are s - max <= 0, so the upper clamp only keeps the bit trick defined.
PYPAPER_HD float fast_exp(float x) {
  const float lo = -87.33654f;
  const bool under = x < lo;
  float xc = x < lo ? lo : x;
  xc = xc > 88.37626f ? 88.37626f : xc;
  const float kf = std::floor(xc * 1.44269504088896341f + 0.5f);
  float r = xc - kf * 0.693359375f;
  r = r - kf * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t ki = static_cast<int32_t>(kf) + 127;
  union {
    int32_t i;
    float f;
  } u;
  u.i = ki << 23;
  const float y = p * u.f;
  return x != x ? x : (under ? 0.0f : y);
}

PYPAPER_HD double fast_exp(double x) { return std::exp(x); }

// The online-softmax rescale of a row whose running maximum moves from m_old to m_new
// (m_new >= m_old). A row that saw only -inf so far (m_new = -inf) keeps factor 1 (nothing is
// accumulated yet).
template <typename T>
PYPAPER_HD T online_rescale(T m_old, T m_new) {
  return m_old == m_new ? T(1) : fast_exp(m_old - m_new);
}

// The finished row: log-sum-exp = m + log l. A row whose stored patterns are all masked has
// l = 0: its output is 0/0 = NaN, like torch.softmax of an all -inf row (and hflayers).
template <typename T>
PYPAPER_HD T finish_lse(T m, T l) {
  return m + std::log(l);
}

// The convergence criterion of hflayers: a head keeps updating while
// max over the batch of ||P_n - P_{n-1}||_F (over the L x S association matrix) > eps.
// A cheap sufficient test first: ||(P_n - P_{n-1}) K||_F <= ||P_n - P_{n-1}||_F ||K||_2 and
// ||K||_2 <= ||K||_F, with (P_n - P_{n-1}) K = xi_{n+1} - xi_n. If the state moved by more than
// eps * ||K||_F (with a rounding margin) the head is certainly still active; otherwise the exact
// norm is computed by one more pass over S.
template <typename T>
PYPAPER_HD bool surely_active(double state_change_norm, double k_frobenius_norm, double eps) {
  return state_change_norm > (eps * k_frobenius_norm) * 1.001 + 1e-30;
}

}  // namespace hopfield
}  // namespace pypaper
