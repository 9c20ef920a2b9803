// Launchers of the fused Hopfield retrieval kernels (kernels/cuda/hopfield_kernels.cu),
// torch-free. Math: kernels/common/hopfield_math.h (the same fast_exp / online rescale / lse as
// the CPU loops).
//
// Layout (math type T = float or double; the host glue converts 16-bit inputs): xs [slots, BH,
// L, d] (slot 0 = q, slot n = xi_n), k [BH, S, d], w (= k or v) [BH, S, dw], lse [slots, BH, L].
// Per-head device arrays steer every launch without host reads: flag[h] (take part), src[h]
// (state slot read), lse_slot[h] (lse slot written). Masks are additive T arrays addressed by
// strides (0 where broadcast): attn [B?, H?, L?, S?], pad [B?, S].
//
// Thread mapping: one block per (head-batch, row); the block walks S in chunks of its thread
// count: each thread scores one stored pattern of the chunk (a d-long dot product), the chunk's
// exponentials go through shared memory and each thread then accumulates one output column.
// A first sweep finds the row maximum and denominator (block reductions), the second builds
// P W with the final lse, so no rescaling of the accumulator is needed.
//
// Launchers enqueue on `stream`, return the launch status and never synchronize.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace pypaper {
namespace gpu {

template <typename T>
struct HopfieldMasks {
  const T* attn = nullptr;
  int64_t a_b = 0, a_h = 0, a_l = 0, a_s = 0;
  const T* pad = nullptr;
  int64_t p_b = 0, p_s = 0;
};

template <typename T>
struct HopfieldPassParams {
  const T* xs;             // state slots
  const int64_t* src;      // [H] slot read per head
  int64_t slab;            // elements per slot (BH * L * d)
  const T* k;
  const T* w;
  const T* beta;           // [H]
  const int32_t* flag;     // [H]
  T* dst;                  // [BH, L, dw]
  T* lse;                  // [slots, BH, L]
  const int64_t* lse_slot; // [H]
  int64_t H, L, S, d, dw, BH;
  HopfieldMasks<T> masks;
};

template <typename T>
cudaError_t hopfield_pass(const HopfieldPassParams<T>& p, cudaStream_t stream);

template <typename T>
struct HopfieldDiffParams {
  const T* xa;
  const T* la;
  const T* xb;
  const T* lb;
  const T* k;
  const T* beta;
  const int32_t* flag;
  T* partial;  // [BH, L]: sum over S of (P_a - P_b)^2 per row (0 for heads not checked)
  int64_t H, L, S, d, BH;
  HopfieldMasks<T> masks;
};

template <typename T>
cudaError_t hopfield_diff(const HopfieldDiffParams<T>& p, cudaStream_t stream);

template <typename T>
struct HopfieldBackwardParams {
  const T* xi;     // [BH, L, d] the step's input state
  const T* lse;    // [BH, L]
  const T* k;
  const T* w;      // K (an update step) or V (the last step)
  const T* g;      // [BH, L, dw] dL/d(step output)
  const T* delta;  // [BH, L] rowsum(g * step output)
  const T* beta;
  const int32_t* flag;
  T* g_xi;         // [BH, L, d] written
  T* dk;           // [BH, S, d] accumulated (atomics)
  T* dw_grad;      // [BH, S, dw] accumulated (may alias dk when w = k)
  int64_t H, L, S, d, dw, BH;
  HopfieldMasks<T> masks;
};

template <typename T>
cudaError_t hopfield_backward_step(const HopfieldBackwardParams<T>& p, cudaStream_t stream);

}  // namespace gpu
}  // namespace pypaper
