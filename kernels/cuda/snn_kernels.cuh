// Launchers of the fused multi-step LIF kernels (kernels/cuda/snn_kernels.cu), torch-free.
//
// Layout (the same as the CPU loops of kernels/cpu/snn_cpu.h): x, spikes, h_seq, v_seq, grad_x,
// grad_spikes, grad_v_seq are [T, N] contiguous (N = every neuron of one step, batch included);
// v_init, v_last, grad_v_last, grad_v_init are [N]. decay (tau when `div`, else k = 1/tau) and the
// threshold are in the math type (float for fp32 / bf16 / fp16 storage, double for fp64) with
// `period` values each: 1 (one for all neurons) or the feature count F, neuron n using value
// n % F (a per-neuron parameter broadcast over the batch).
//
// Thread mapping: one thread per neuron, the T-step scan inside the thread, so the membrane and
// the carried gradient stay in registers and every step reads / writes one coalesced row of the
// [T, N] tensors. The per-element math is kernels/common/snn_math.h, shared with the CPU loops
// (compiled with --fmad=false like them), so spikes, H, V and the gradients of x and v_init match
// the CPU op to the bit, except where a surrogate calls exp (Sigmoid, PiecewiseExp, Erf): the GPU
// uses CUDA's expf / exp, the CPU a polynomial (both within 2 ulp).
//
// Launchers enqueue on `stream`, return the launch status (cudaSuccess without a launch for
// N == 0) and never synchronize.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "quant_kernels.cuh"  // FloatType: the storage types of pypaper's CUDA kernels

namespace pypaper {
namespace gpu {

// ---- launch heuristic (pure) -------------------------------------------------------------------

struct LifLaunch {
  unsigned blocks;  // ceil(neurons / threads)
  int threads;      // per block: 256, 128 or 64
};

// One thread per neuron, so the grid is fixed by N; only the block size is free. The scan is
// latency-bound per thread (T dependent steps), so the SMs must all be busy: take 256 threads a
// block when that still gives at least two blocks per SM, else shrink the blocks (down to two
// warps) to spread a small layer over more SMs. N >= 1.
inline LifLaunch lif_launch_config(int64_t neurons, int sms) {
  const int64_t want = 2 * static_cast<int64_t>(sms > 0 ? sms : 1);
  int threads = 256;
  while (threads > 64 && (neurons + threads - 1) / threads < want) threads /= 2;
  return LifLaunch{static_cast<unsigned>((neurons + threads - 1) / threads), threads};
}

// ---- forward -----------------------------------------------------------------------------------

struct LifForwardParams {
  const void* x;       // [T, N] storage type
  const void* v_init;  // [N] or nullptr: start at rest (v_reset, 0 for a soft reset)
  const void* decay;   // math type, decay_period values
  int64_t decay_period;
  const void* vth;  // math type, vth_period values
  int64_t vth_period;
  void* spikes;  // [T, N]
  void* h_seq;   // [T, N]: H[t], rounded so that Theta(H - Vth) recomputes S (16-bit storage);
                 // nullptr: not kept (no keep_h flag: nothing will be differentiated)
  void* v_seq;   // [T, N] or nullptr
  void* v_last;  // [N]
  int64_t steps, neurons;
  double v_reset;  // hard-reset potential; 0 for a soft reset (the charge's Vr)
  bool decay_input, div, hard;
};

cudaError_t launch_lif_forward(FloatType type, const LifForwardParams& p, cudaStream_t stream);

// ---- backward ----------------------------------------------------------------------------------

struct LifBackwardParams {
  const void* grad_spikes;  // [T, N]
  const void* grad_v_last;  // [N] or nullptr (zero)
  const void* grad_v_seq;   // [T, N] or nullptr (zero)
  const void* h_seq;        // [T, N], from the forward
  const void* v_init;       // [N] or nullptr (rest); read only for the decay gradient
  const void* decay;
  int64_t decay_period;
  const void* vth;
  int64_t vth_period;
  void* grad_x;       // [T, N]
  void* grad_v_init;  // [N]
  // Parameter gradients, summed over time in each thread's registers. Per-neuron parameter
  // (period > 1): one value per neuron into *_n ([N], math type; the caller sums over the batch).
  // One value for all (period 1): one fp64 partial sum per block into *_partial
  // (lif_backward_partials values; the caller adds them). nullptr: not needed (decay: the decay
  // gradient and its recomputation of V[t-1] are skipped).
  void* grad_decay_n;
  double* grad_decay_partial;
  void* grad_vth_n;
  double* grad_vth_partial;
  int64_t steps, neurons;
  double v_reset;  // hard-reset potential, or 0 (soft)
  double alpha;
  int32_t surrogate;  // snn::Surrogate id, 0..7
  bool decay_input, div, hard, detach_reset, sltt;
};

// Length of the fp64 partial-sum buffers of a scalar parameter gradient for `neurons` neurons on
// the current device (the backward's block count; 0 for N == 0).
cudaError_t lif_backward_partials(int64_t neurons, int64_t* count);

cudaError_t launch_lif_backward(FloatType type, const LifBackwardParams& p, cudaStream_t stream);

}  // namespace gpu
}  // namespace pypaper
