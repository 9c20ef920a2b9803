// Per-element and per-row math of pypaper.local's fused local-loss layers, shared by the CPU loops
// (kernels/cpu/local_cpu.h) and the CUDA kernels (kernels/cuda/local_kernels.cu).
//
// Forward-Forward (Hinton 2022): h = ReLU(z), goodness g = sum_j h_j^2, per-row loss
//   positive rows: softplus(theta - g),  negative rows: softplus(g - theta),
// so with s = +1 (positive) / -1 (negative): loss = softplus(s (theta - g)) and
//   dloss/dg = -s sigmoid(s (theta - g)),  dloss/dz_j = dloss/dg * 2 h_j  (h_j = 0 where z_j <= 0).
//
// Target projection (tpSGD, Lomnitz et al. 2022): h = act(z), target t = P[:, y] (or sign(P[:, y])),
//   loss = 1/2 sum_j (h_j - t_j)^2,  delta_j = (h_j - t_j) act'(z_j), act' from the output h.
#pragma once
#include <cmath>

#include "hd.h"
#include "snn_math.h"  // sexp: a branch-free (vectorizable) fp32 exp on the host, exp on the GPU

namespace pypaper {
namespace local {

// Activation ids of the target-projection layer (the "activation" argument of tp_linear).
enum TpActivation : int { kSigmoid = 0, kTanh = 1, kRelu = 2 };

// softplus(v) = log(1 + e^v), without overflow for large |v|.
template <typename T>
PYPAPER_HD T softplus(T v) {
  const T a = v < T(0) ? -v : v;
  return (v > T(0) ? v : T(0)) + std::log1p(std::exp(-a));
}

// Branch-free, so the CPU row loops vectorize: e = exp(-|v|) never overflows.
template <typename T>
PYPAPER_HD T sigmoid(T v) {
  const T e = ::pypaper::snn::sexp(v < T(0) ? v : -v);
  const T r = T(1) / (T(1) + e);
  return v >= T(0) ? r : e * r;
}

// tanh(v) = sign(v) (1 - e) / (1 + e) with e = exp(-2|v|) (absolute error ~1 ulp of 1).
template <typename T>
PYPAPER_HD T tanh_(T v) {
  const T a = v < T(0) ? -v : v;
  const T e = ::pypaper::snn::sexp(T(-2) * a);
  const T t = (T(1) - e) / (T(1) + e);
  return v < T(0) ? -t : t;
}

// Forward-Forward: the loss of a row with goodness g and sign s (+1 positive, -1 negative).
template <typename T>
PYPAPER_HD T ff_row_loss(T g, T theta, T s) {
  return softplus(s * (theta - g));
}

// Forward-Forward: dloss/dg of the same row (multiply by 2 h_j for dloss/dz_j).
template <typename T>
PYPAPER_HD T ff_row_dgood(T g, T theta, T s) {
  return -s * sigmoid(s * (theta - g));
}

// The activation of the target-projection layer.
template <typename T>
PYPAPER_HD T tp_act(T z, int act) {
  if (act == kSigmoid) return sigmoid(z);
  if (act == kTanh) return tanh_(z);
  return z > T(0) ? z : T(0);
}

// Its derivative, from the output h = act(z) (and z for ReLU).
template <typename T>
PYPAPER_HD T tp_act_grad(T z, T h, int act) {
  if (act == kSigmoid) return h * (T(1) - h);
  if (act == kTanh) return T(1) - h * h;
  return z > T(0) ? T(1) : T(0);
}

// The tpSGD target of one unit: P[j, y] (sign variant: sign(P[j, y]), 0 stays 0).
template <typename T>
PYPAPER_HD T tp_target(T p, bool sign) {
  if (!sign) return p;
  return p > T(0) ? T(1) : (p < T(0) ? T(-1) : T(0));
}

}  // namespace local
}  // namespace pypaper
