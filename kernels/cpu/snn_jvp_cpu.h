// CPU loop of the LIF neuron's forward-mode derivative (jvp), torch-free: the tangents of the
// spikes and membranes given tangents of x, v_init, the decay and the threshold, in one pass over
// time next to the primal recurrence (which it reruns: the same operations as the forward loop of
// kernels/cpu/snn_cpu.h, so the same S to the bit).
//
// Math (per neuron and step; kernels/common/snn_math.h for the primal; pypaper/snn/jvp_rule.py
// derives it): with k the decay as a rate, dk its tangent (-dtau / tau^2 where the op divides by
// tau), sg = sigma'(H - Vth) the surrogate derivative, dr = 0 under detach_reset else 1,
//
//   dH = cx dX + cv dV[t-1] + c_k dk     cx = k (decay_input) or 1; cv = 1 - k (0 under SLTT);
//                                         c_k = X - (V[t-1] - Vr) (decay_input) or -(V[t-1] - Vr)
//   dS = sg (dH - dVth)
//   dV = (1 - S) dH + dr (Vr - H) dS                 (hard reset)
//   dV = dH - S dVth - dr Vth dS                     (soft reset)
//
// Layout and chunking as the forward: [T, N] rows, chunks of kLifChunk neurons whose state
// (membrane, its tangent, the per-neuron coefficients) stays in L1 over the time loop; threads
// take ranges of chunks. It moves 12 bytes per neuron-step in fp32 (x and dX in, dS out; 16 with
// the tangents of every V[t]), where the composite of torch ops it replaces moved ~20 passes.
#pragma once
#include <algorithm>
#include <cstdint>

#include "../common/snn_math.h"
#include "snn_cpu.h"

namespace pypaper {
namespace cpu {

template <typename In, typename T>
struct LifJvpArgs {
  const In* x;          // [T, N]
  const In* x_tangent;  // [T, N] or nullptr (zero)
  const In* v_init;     // [N] or nullptr: at rest
  const In* v_init_tangent;  // [N] or nullptr (zero)
  const T* decay;            // what the forward charges with: tau (div) or k
  bool div;
  const T* decay_tangent;  // the tangent of the op's decay argument (tau if decay_is_tau, else k)
  bool decay_is_tau;       // whether decay_tangent is a tangent of tau
  const T* tau_or_k;       // the op's decay argument itself (for dk = -dtau / tau^2)
  int64_t decay_period;
  const T* vth;
  const T* vth_tangent;  // or nullptr
  int64_t vth_period;
  In* spikes_tangent;  // [T, N]
  In* v_seq_tangent;   // [T, N] or nullptr
  In* v_last_tangent;  // [N]
  int64_t steps, neurons;
  T v_reset;  // the hard-reset potential; 0 for a soft reset
  T alpha;
  int32_t surrogate;
  bool decay_input, hard, detach_reset, sltt;
  bool stream;  // non-temporal stores of the [T, N] outputs
  bool prefetch_nta = false;  // prefetch_row_l2's hint (lif_prefetch_nta_default)
};

// One step over a row of a chunk. v, dv: the membrane and its tangent, carried.
template <bool DI, bool DIV, bool HARD, snn::Surrogate SURR, typename In, typename T>
inline void lif_jvp_row(const In* __restrict x, const In* __restrict dx, T* __restrict v,
                        T* __restrict dv, const T* __restrict k, const T* __restrict cx,
                        const T* __restrict cv, const T* __restrict dk,
                        const T* __restrict th, const T* __restrict dth, In* __restrict ds_out,
                        T vr, T alpha, T dr, int64_t len) {
  for (int64_t j = 0; j < len; ++j) {
    const T xj = static_cast<T>(to_float(x[j]));
    const T vp = v[j];
    const T h = snn::charge<DI, DIV>(vp, xj, k[j], vr);
    const T s = snn::fire(h, th[j]);
    const T ck = DI ? xj - (vp - vr) : -(vp - vr);
    const T dxj = dx ? static_cast<T>(to_float(dx[j])) : T(0);
    // a zero tangent's term is absent (ck is inf for an infinite membrane: inf * 0 = NaN)
    const T dh = cx[j] * dxj + cv[j] * dv[j] + (dk[j] != T(0) ? ck * dk[j] : T(0));
    const T z = h - th[j];
    const T sg = snn::surrogate_grad<SURR>(z, alpha);
    const T ds = sg * (dh - dth[j]);
    ds_out[j] = store_val<In>(ds);
    v[j] = snn::reset<HARD>(h, s, th[j], vr);
    if constexpr (HARD) {
      dv[j] = (T(1) - s) * dh + (dr != T(0) ? dr * (vr - h) * ds : T(0));
    } else {
      dv[j] = dh - s * dth[j] - dr * th[j] * ds;
    }
  }
}

template <bool DI, bool DIV, bool HARD, snn::Surrogate SURR, typename In, typename T>
void lif_jvp_chunks(const LifJvpArgs<In, T>& a, int64_t c0, int64_t c1) {
  alignas(64) T v[kLifChunk];
  alignas(64) T dv[kLifChunk];
  alignas(64) T k[kLifChunk];   // the decay as the forward charges with it
  alignas(64) T cx[kLifChunk];
  alignas(64) T cv[kLifChunk];
  alignas(64) T dk[kLifChunk];  // the tangent of the rate k
  alignas(64) T arg[kLifChunk];  // the op's decay argument (tau or k)
  alignas(64) T th[kLifChunk];
  alignas(64) T dth[kLifChunk];
  alignas(64) In ds_row[kLifChunk];  // staging rows for the streamed stores
  alignas(64) In dv_row[kLifChunk];
  const int64_t N = a.neurons;
  const int64_t isize = static_cast<int64_t>(sizeof(In));
  const T dr = a.detach_reset ? T(0) : T(1);
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t n0 = c * kLifChunk;
    const int64_t len = std::min(kLifChunk, N - n0);
    if (c == c0 || a.decay_period != 1) {
      fill_param(k, a.decay, a.decay_period, n0, len);
      fill_param(arg, a.tau_or_k, a.decay_period, n0, len);
      for (int64_t j = 0; j < len; ++j) {
        const T rate = a.decay_is_tau ? T(1) / arg[j] : arg[j];
        cx[j] = a.decay_input ? rate : T(1);
        cv[j] = a.sltt ? T(0) : T(1) - rate;
      }
      if (a.decay_tangent) {
        fill_param(dk, a.decay_tangent, a.decay_period, n0, len);
        if (a.decay_is_tau) {  // dk = d(1/tau) = -dtau / tau^2
          for (int64_t j = 0; j < len; ++j) dk[j] = -dk[j] / (arg[j] * arg[j]);
        }
      } else {
        std::fill(dk, dk + len, T(0));
      }
    }
    if (c == c0 || a.vth_period != 1) {
      fill_param(th, a.vth, a.vth_period, n0, len);
      if (a.vth_tangent) {
        fill_param(dth, a.vth_tangent, a.vth_period, n0, len);
      } else {
        std::fill(dth, dth + len, T(0));
      }
    }
    if (a.v_init) {
      load_row(v, a.v_init + n0, len);
    } else {
      std::fill(v, v + len, a.v_reset);
    }
    if (a.v_init_tangent) {
      load_row(dv, a.v_init_tangent + n0, len);
    } else {
      std::fill(dv, dv + len, T(0));
    }
    for (int64_t t = 0; t < a.steps; ++t) {
      const int64_t off = t * N + n0;
      if (t + kLifPrefetchSteps < a.steps) {
        prefetch_row(a.x + off + kLifPrefetchSteps * N, len * isize);
        if (a.x_tangent) prefetch_row(a.x_tangent + off + kLifPrefetchSteps * N, len * isize);
      }
      // and further ahead, as the forward loop does (into the next chunk near the end of one)
      const int64_t t2 = t + kLifForwardL2Steps;
      int64_t far = -1, far_len = 0;
      if (t2 < a.steps) {
        far = off + kLifForwardL2Steps * N;
        far_len = len;
      } else if (c + 1 < c1 && t2 - a.steps < a.steps) {
        const int64_t n1 = n0 + kLifChunk;
        far = (t2 - a.steps) * N + n1;
        far_len = std::min(kLifChunk, N - n1);
      }
      if (far >= 0) {
        prefetch_row_l2(a.x + far, far_len * isize, a.prefetch_nta);
        if (a.x_tangent) prefetch_row_l2(a.x_tangent + far, far_len * isize, a.prefetch_nta);
      }
      const In* dx = a.x_tangent ? a.x_tangent + off : nullptr;
      In* ds = a.stream ? ds_row : a.spikes_tangent + off;
      lif_jvp_row<DI, DIV, HARD, SURR>(a.x + off, dx, v, dv, k, cx, cv, dk, th, dth, ds,
                                       a.v_reset, a.alpha, dr, len);
      if (a.stream) stream_bytes(a.spikes_tangent + off, ds_row, len * isize);
      if (a.v_seq_tangent) {
        if (a.stream) {
          store_row(dv_row, dv, len);
          stream_bytes(a.v_seq_tangent + off, dv_row, len * isize);
        } else {
          store_row(a.v_seq_tangent + off, dv, len);
        }
      }
    }
    store_row(a.v_last_tangent + n0, dv, len);
  }
  if (a.stream) stream_fence();
}

template <bool DI, bool DIV, bool HARD, typename In, typename T>
void lif_jvp_s(const LifJvpArgs<In, T>& a, int64_t c0, int64_t c1) {
  using snn::Surrogate;
  switch (static_cast<Surrogate>(a.surrogate)) {
    case Surrogate::Sigmoid: lif_jvp_chunks<DI, DIV, HARD, Surrogate::Sigmoid>(a, c0, c1); break;
    case Surrogate::ATan: lif_jvp_chunks<DI, DIV, HARD, Surrogate::ATan>(a, c0, c1); break;
    case Surrogate::PiecewiseQuadratic:
      lif_jvp_chunks<DI, DIV, HARD, Surrogate::PiecewiseQuadratic>(a, c0, c1);
      break;
    case Surrogate::PiecewiseExp:
      lif_jvp_chunks<DI, DIV, HARD, Surrogate::PiecewiseExp>(a, c0, c1);
      break;
    case Surrogate::SoftSign: lif_jvp_chunks<DI, DIV, HARD, Surrogate::SoftSign>(a, c0, c1); break;
    case Surrogate::SuperSpike:
      lif_jvp_chunks<DI, DIV, HARD, Surrogate::SuperSpike>(a, c0, c1);
      break;
    case Surrogate::Erf: lif_jvp_chunks<DI, DIV, HARD, Surrogate::Erf>(a, c0, c1); break;
    default: lif_jvp_chunks<DI, DIV, HARD, Surrogate::Rect>(a, c0, c1); break;
  }
}

// Runs chunks [c0, c1) with the variant the flags select.
template <typename In, typename T>
void lif_jvp(const LifJvpArgs<In, T>& a, int64_t c0, int64_t c1) {
  with_charge_flags(a.decay_input, a.div, a.hard, [&](auto di, auto dv, auto hd) {
    lif_jvp_s<decltype(di)::value, decltype(dv)::value, decltype(hd)::value>(a, c0, c1);
  });
}

}  // namespace cpu
}  // namespace pypaper
