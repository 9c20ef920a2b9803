// CUDA kernels of the fused multi-step LIF neuron; contract in snn_kernels.cuh, math in
// kernels/common/snn_math.h (shared with the CPU loops, so the CPU tests check this math).
//
// Forward, one thread per neuron n, for t = 0..T-1 (V[-1] = v_init, or Vr at rest):
//   H[t] = charge(V[t-1], X[t]);  S[t] = Theta(H[t] - Vth);  V[t] = reset(H[t], S[t])
// Each step reads X[t, n] and writes S, H (and V) at [t, n]: consecutive threads touch
// consecutive addresses, one coalesced row per warp and step; the membrane never leaves a
// register. 16-bit H is stored so that Theta(H - Vth) recomputes the forward's spike (below).
//
// Backward, the reverse scan per neuron, t = T-1..0, with the carried gradient gV = dL/dV[t]
// (grad_v_last at the start, plus grad_v_seq[t] when V[t] is an output):
//   S = Theta(H[t] - Vth) recomputed from the stored H, sg = sigma'(H[t] - Vth)
//   gH = gS sg + gV dV/dH;  gX[t] = gH dH/dX;  gV <- gH dH/dV[t-1]  (0 under SLTT)
//   gVth += -gS sg + gV dV/dVth;  gk += gH dH/dk, with V[t-1] = reset(H[t-1]) recomputed
// H[t-1] is the next step's H, so it is loaded once and carried: the scan reads each stored H
// once whether or not the decay gradient is needed.
//
// Parameter gradients are summed over time in registers. A per-neuron parameter gets one value per
// neuron (the glue sums over the batch: deterministic, no atomics); a scalar one a per-block fp64
// sum (warp shuffles, then one warp over the block's warp sums) into a partial buffer the glue adds.
//
// Exactness: built with --fmad=false (CMakeLists.txt, setup.py) like the CPU loops with
// -ffp-contract=off; fp32 `/` is IEEE-rounded (-prec-div=true, nvcc's default); storage
// conversions round to nearest even (bf16 by the same integer rounding as the CPU, NaN -> 0x7FC0).
#include "snn_kernels.cuh"
#include "device_common.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "../common/snn_math.h"

namespace pypaper {
namespace gpu {
namespace {

constexpr int kMaxThreads = 256;  // lif_launch_config's largest block
constexpr unsigned kFullMask = 0xffffffffu;

// ---- storage and math types --------------------------------------------------------------------

template <typename In>
__device__ __forceinline__ In store_val(typename MathOf<In>::type v) {
  if constexpr (std::is_same_v<In, __half>) {
    return __float2half_rn(v);
  } else if constexpr (std::is_same_v<In, __nv_bfloat16>) {
    // Round to nearest even on the bits, quiet NaN 0x7FC0: kernels/cpu/snn_cpu.h's store_val.
    const uint32_t u = __float_as_uint(v);
    const uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const uint32_t b = (u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : r;
    return __ushort_as_bfloat16(static_cast<unsigned short>(b));
  } else {
    return v;
  }
}

__device__ __forceinline__ uint32_t bits_of(__half v) { return __half_as_ushort(v); }
__device__ __forceinline__ uint32_t bits_of(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }
__device__ __forceinline__ void from_bits(__half& o, uint32_t b) {
  o = __ushort_as_half(static_cast<unsigned short>(b));
}
__device__ __forceinline__ void from_bits(__nv_bfloat16& o, uint32_t b) {
  o = __ushort_as_bfloat16(static_cast<unsigned short>(b));
}

// The 16-bit neighbour of bits b one step towards +inf (up) or -inf: away from zero is one more
// in magnitude, towards it one less, and +-0 steps to the smallest subnormal of the other sign.
__device__ __forceinline__ uint32_t next_bits(uint32_t b, bool up) {
  const bool neg = (b & 0x8000u) != 0;
  const bool zero = (b & 0x7fffu) == 0;
  const uint32_t toward_zero = zero ? (up ? 0x0001u : 0x8001u) : b - 1u;
  return up != neg ? b + 1u : toward_zero;
}

// H as stored for the backward, which recomputes S = Theta(H - Vth) from it. fp32 / fp64: H
// itself. 16 bits: H rounded to nearest, unless rounding crosses the threshold (H just below Vth
// rounding up onto it, or just above rounding below); then the neighbour on the spike's side.
template <typename In, typename T>
__device__ __forceinline__ In store_h(T h, T s, T vth) {
  if constexpr (std::is_same_v<In, T>) {
    return h;
  } else {
    const In r = store_val<In>(h);
    if (snn::fire(to_math(r), vth) == s) return r;
    In out;
    from_bits(out, next_bits(bits_of(r), s > T(0)));
    return out;
  }
}

// Value of a parameter for neuron n: one for all (period 1) or value n % period.
template <typename T>
__device__ __forceinline__ T param_of(const T* __restrict__ p, int64_t period, int64_t n) {
  return p[period == 1 ? 0 : n % period];
}

// ---- forward -----------------------------------------------------------------------------------

template <typename In>
struct FwdArgs {
  using T = typename MathOf<In>::type;
  const In* __restrict__ x;
  const In* __restrict__ v_init;
  const T* __restrict__ decay;
  int64_t decay_period;
  const T* __restrict__ vth;
  int64_t vth_period;
  In* __restrict__ spikes;
  In* __restrict__ h_seq;
  In* __restrict__ v_seq;
  In* __restrict__ v_last;
  int64_t steps, neurons;
  T v_reset;
};

template <typename In, bool DI, bool DIV, bool HARD>
__global__ void __launch_bounds__(kMaxThreads) lif_forward_kernel(FwdArgs<In> a) {
  using T = typename MathOf<In>::type;
  const int64_t n = global_thread();
  if (n >= a.neurons) return;
  const T k = param_of(a.decay, a.decay_period, n);
  const T th = param_of(a.vth, a.vth_period, n);
  const T vr = a.v_reset;
  const In* __restrict__ x = a.x;
  In* __restrict__ sp = a.spikes;
  In* __restrict__ hs = a.h_seq;
  In* __restrict__ vs = a.v_seq;
  T v = a.v_init != nullptr ? static_cast<T>(to_math(a.v_init[n])) : vr;
  int64_t off = n;
  // The T loop is the recurrence; unrolling lets the loads of the next X rows issue early.
#pragma unroll 4
  for (int64_t t = 0; t < a.steps; ++t, off += a.neurons) {
    const T h = snn::charge<DI, DIV>(v, static_cast<T>(to_math(x[off])), k, vr);
    const T s = snn::fire(h, th);
    sp[off] = store_val<In>(s);
    if (hs != nullptr) hs[off] = store_h<In>(h, s, th);
    v = snn::reset<HARD>(h, s, th, vr);
    if (vs != nullptr) vs[off] = store_val<In>(v);
  }
  a.v_last[n] = store_val<In>(v);
}

// ---- backward ----------------------------------------------------------------------------------

template <typename In>
struct BwdArgs {
  using T = typename MathOf<In>::type;
  const In* __restrict__ grad_spikes;
  const In* __restrict__ grad_v_last;
  const In* __restrict__ grad_v_seq;
  const In* __restrict__ h_seq;
  const In* __restrict__ v_init;
  const T* __restrict__ decay;
  int64_t decay_period;
  const T* __restrict__ vth;
  int64_t vth_period;
  In* __restrict__ grad_x;
  In* __restrict__ grad_v_init;
  T* __restrict__ grad_decay_n;
  double* __restrict__ grad_decay_partial;
  T* __restrict__ grad_vth_n;
  double* __restrict__ grad_vth_partial;
  int64_t steps, neurons;
  T v_reset, alpha;
  bool decay_input, div, detach_reset, sltt, need_k;
};

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(kFullMask, v, o);
  return v;
}

// Sum of v over the block (every thread calls it; the result is valid in thread 0). Fixed
// order for a fixed block size: the partial sums are deterministic.
__device__ __forceinline__ double block_sum(double v, double* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int warps = static_cast<int>(blockDim.x >> 5);
  v = warp_sum(v);
  __syncthreads();  // smem may still be read by a previous call
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  double r = 0.0;
  if (warp == 0) {
    r = lane < warps ? smem[lane] : 0.0;
    r = warp_sum(r);
  }
  return r;
}

template <typename In, bool HARD, snn::Surrogate SURR>
__global__ void __launch_bounds__(kMaxThreads) lif_backward_kernel(BwdArgs<In> a) {
  using T = typename MathOf<In>::type;
  __shared__ double smem[kMaxThreads / 32];
  const int64_t n = global_thread();
  const int64_t N = a.neurons;
  T gk = T(0), gth = T(0);
  // No early return: every thread of the block joins the block sums below.
  if (n < N) {
    const T th = param_of(a.vth, a.vth_period, n);
    const snn::DecayCoef<T> co =
        snn::decay_coef(param_of(a.decay, a.decay_period, n), a.decay_input, a.div, a.sltt);
    const T vr = a.v_reset, alpha = a.alpha;
    const T dr = a.detach_reset ? T(0) : T(1);
    const bool need_k = a.need_k;
    const T vinit =
        need_k ? (a.v_init != nullptr ? static_cast<T>(to_math(a.v_init[n])) : vr) : T(0);
    T carry = a.grad_v_last != nullptr ? static_cast<T>(to_math(a.grad_v_last[n])) : T(0);
    const In* __restrict__ hs = a.h_seq;
    const In* __restrict__ gs = a.grad_spikes;
    const In* __restrict__ gvs = a.grad_v_seq;
    In* __restrict__ gx = a.grad_x;
    if (a.steps > 0) {
      int64_t off = (a.steps - 1) * N + n;
      T h = static_cast<T>(to_math(hs[off]));
#pragma unroll 2
      for (int64_t t = a.steps - 1; t >= 0; --t, off -= N) {
        const T hp = t > 0 ? static_cast<T>(to_math(hs[off - N])) : T(0);  // H[t-1]
        if (gvs != nullptr) carry += static_cast<T>(to_math(gvs[off]));
        const T xj = h - th;
        const T s = xj >= T(0) ? T(1) : T(0);
        const T sg = snn::surrogate_grad<SURR>(xj, alpha);
        const snn::StepGrad<T> g =
            snn::step_grad<HARD>(static_cast<T>(to_math(gs[off])), carry, h, s, sg, th, vr, dr);
        gth += g.gvth;
        gx[off] = store_val<In>(g.gh * co.cx);
        if (need_k) {
          // V[t-1]: v_init at t = 0, else H[t-1] fired and reset again.
          const T vp = t > 0 ? snn::reset<HARD>(hp, snn::fire(hp, th), th, vr) : vinit;
          gk += g.gh * ((h - vp) * co.ch + (vp - vr) * co.cr);
        }
        carry = g.gh * co.cv;
        h = hp;
      }
    }
    a.grad_v_init[n] = store_val<In>(carry);
    if (a.grad_decay_n != nullptr) a.grad_decay_n[n] = gk;
    if (a.grad_vth_n != nullptr) a.grad_vth_n[n] = gth;
  }
  // Scalar parameters: the kernel arguments are uniform, so the whole block takes these branches.
  if (a.grad_decay_partial != nullptr) {
    const double s = block_sum(static_cast<double>(gk), smem);
    if (threadIdx.x == 0) a.grad_decay_partial[blockIdx.x] = s;
  }
  if (a.grad_vth_partial != nullptr) {
    const double s = block_sum(static_cast<double>(gth), smem);
    if (threadIdx.x == 0) a.grad_vth_partial[blockIdx.x] = s;
  }
}

// ---- launch ------------------------------------------------------------------------------------

cudaError_t config_for(int64_t neurons, LifLaunch* cfg) {
  int sms = 0;
  const cudaError_t err = sm_count(&sms);
  if (err != cudaSuccess) return err;
  *cfg = lif_launch_config(neurons, sms);
  return cudaSuccess;
}

template <typename In, bool DI, bool DIV, bool HARD>
cudaError_t forward_variant(const FwdArgs<In>& a, LifLaunch cfg, cudaStream_t stream) {
  lif_forward_kernel<In, DI, DIV, HARD><<<cfg.blocks, cfg.threads, 0, stream>>>(a);
  return cudaGetLastError();
}

template <typename In>
cudaError_t forward_flags(const FwdArgs<In>& a, bool di, bool div, bool hard, LifLaunch cfg,
                          cudaStream_t stream) {
  const int key = (di ? 4 : 0) | (div ? 2 : 0) | (hard ? 1 : 0);
  switch (key) {
    case 0: return forward_variant<In, false, false, false>(a, cfg, stream);
    case 1: return forward_variant<In, false, false, true>(a, cfg, stream);
    case 2: return forward_variant<In, false, true, false>(a, cfg, stream);
    case 3: return forward_variant<In, false, true, true>(a, cfg, stream);
    case 4: return forward_variant<In, true, false, false>(a, cfg, stream);
    case 5: return forward_variant<In, true, false, true>(a, cfg, stream);
    case 6: return forward_variant<In, true, true, false>(a, cfg, stream);
    default: return forward_variant<In, true, true, true>(a, cfg, stream);
  }
}

template <typename In, bool HARD, snn::Surrogate SURR>
cudaError_t backward_variant(const BwdArgs<In>& a, LifLaunch cfg, cudaStream_t stream) {
  lif_backward_kernel<In, HARD, SURR><<<cfg.blocks, cfg.threads, 0, stream>>>(a);
  return cudaGetLastError();
}

template <typename In, bool HARD>
cudaError_t backward_surrogate(const BwdArgs<In>& a, int32_t id, LifLaunch cfg,
                               cudaStream_t stream) {
  using snn::Surrogate;
  switch (static_cast<Surrogate>(id)) {
    case Surrogate::Sigmoid: return backward_variant<In, HARD, Surrogate::Sigmoid>(a, cfg, stream);
    case Surrogate::ATan: return backward_variant<In, HARD, Surrogate::ATan>(a, cfg, stream);
    case Surrogate::PiecewiseQuadratic:
      return backward_variant<In, HARD, Surrogate::PiecewiseQuadratic>(a, cfg, stream);
    case Surrogate::PiecewiseExp:
      return backward_variant<In, HARD, Surrogate::PiecewiseExp>(a, cfg, stream);
    case Surrogate::SoftSign:
      return backward_variant<In, HARD, Surrogate::SoftSign>(a, cfg, stream);
    case Surrogate::SuperSpike:
      return backward_variant<In, HARD, Surrogate::SuperSpike>(a, cfg, stream);
    case Surrogate::Erf: return backward_variant<In, HARD, Surrogate::Erf>(a, cfg, stream);
    case Surrogate::Rect: return backward_variant<In, HARD, Surrogate::Rect>(a, cfg, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_lif_forward(FloatType type, const LifForwardParams& p, cudaStream_t stream) {
  if (p.steps < 0 || p.neurons < 0) return cudaErrorInvalidValue;
  if (p.neurons == 0) return cudaSuccess;  // (a per-neuron parameter of 0 features included)
  if (p.decay_period < 1 || p.vth_period < 1) return cudaErrorInvalidValue;
  LifLaunch cfg{};
  const cudaError_t err = config_for(p.neurons, &cfg);
  if (err != cudaSuccess) return err;
  return dispatch_float(type, [&](auto tag) {
    using In = decltype(tag);
    using T = typename MathOf<In>::type;
    FwdArgs<In> a{};
    a.x = static_cast<const In*>(p.x);
    a.v_init = static_cast<const In*>(p.v_init);
    a.decay = static_cast<const T*>(p.decay);
    a.decay_period = p.decay_period;
    a.vth = static_cast<const T*>(p.vth);
    a.vth_period = p.vth_period;
    a.spikes = static_cast<In*>(p.spikes);
    a.h_seq = static_cast<In*>(p.h_seq);
    a.v_seq = static_cast<In*>(p.v_seq);
    a.v_last = static_cast<In*>(p.v_last);
    a.steps = p.steps;
    a.neurons = p.neurons;
    a.v_reset = static_cast<T>(p.v_reset);
    return forward_flags(a, p.decay_input, p.div, p.hard, cfg, stream);
  });
}

cudaError_t lif_backward_partials(int64_t neurons, int64_t* count) {
  if (neurons < 0) return cudaErrorInvalidValue;
  if (neurons == 0) {
    *count = 0;
    return cudaSuccess;
  }
  LifLaunch cfg{};
  const cudaError_t err = config_for(neurons, &cfg);
  if (err != cudaSuccess) return err;
  *count = cfg.blocks;
  return cudaSuccess;
}

cudaError_t launch_lif_backward(FloatType type, const LifBackwardParams& p, cudaStream_t stream) {
  if (p.steps < 0 || p.neurons < 0 || !snn::valid_surrogate(p.surrogate)) {
    return cudaErrorInvalidValue;
  }
  if (p.neurons == 0) return cudaSuccess;
  if (p.decay_period < 1 || p.vth_period < 1) return cudaErrorInvalidValue;
  LifLaunch cfg{};
  const cudaError_t err = config_for(p.neurons, &cfg);
  if (err != cudaSuccess) return err;
  return dispatch_float(type, [&](auto tag) {
    using In = decltype(tag);
    using T = typename MathOf<In>::type;
    BwdArgs<In> a{};
    a.grad_spikes = static_cast<const In*>(p.grad_spikes);
    a.grad_v_last = static_cast<const In*>(p.grad_v_last);
    a.grad_v_seq = static_cast<const In*>(p.grad_v_seq);
    a.h_seq = static_cast<const In*>(p.h_seq);
    a.v_init = static_cast<const In*>(p.v_init);
    a.decay = static_cast<const T*>(p.decay);
    a.decay_period = p.decay_period;
    a.vth = static_cast<const T*>(p.vth);
    a.vth_period = p.vth_period;
    a.grad_x = static_cast<In*>(p.grad_x);
    a.grad_v_init = static_cast<In*>(p.grad_v_init);
    a.grad_decay_n = static_cast<T*>(p.grad_decay_n);
    a.grad_decay_partial = p.grad_decay_partial;
    a.grad_vth_n = static_cast<T*>(p.grad_vth_n);
    a.grad_vth_partial = p.grad_vth_partial;
    a.steps = p.steps;
    a.neurons = p.neurons;
    a.v_reset = static_cast<T>(p.v_reset);
    a.alpha = static_cast<T>(p.alpha);
    a.decay_input = p.decay_input;
    a.div = p.div;
    a.detach_reset = p.detach_reset;
    a.sltt = p.sltt;
    a.need_k = p.grad_decay_n != nullptr || p.grad_decay_partial != nullptr;
    return p.hard ? backward_surrogate<In, true>(a, p.surrogate, cfg, stream)
                  : backward_surrogate<In, false>(a, p.surrogate, cfg, stream);
  });
}

}  // namespace gpu
}  // namespace pypaper
