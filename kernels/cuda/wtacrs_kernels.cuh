// Launchers of the WTA-CRS CUDA kernels (kernels/cuda/wtacrs_kernels.cu), torch-free.
//
// Liu et al., "Winner-Take-All Column Row Sampling", NeurIPS 2023. The estimator and the math of
// every element (row weights, the draws' counter RNG and inverse CDF, their scales) are
// kernels/common/wtacrs_math.h, shared with the CPU loops of kernels/cpu/wtacrs_cpu.h.
//
// Matrices are row-major with unit stride along the features and row stride `ld` (elements).
// "Math type": float for fp32 / fp16 / bf16 storage, double for fp64. Launchers enqueue on
// `stream`, return the launch status (cudaSuccess without a launch for empty work,
// cudaErrorInvalidValue for arguments the op's checks exclude) and never synchronize.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "quant_kernels.cuh"  // FloatType: the storage types of pypaper's CUDA kernels

namespace pypaper {
namespace gpu {

// out[r] = ||x[r, :]||_2 in the math type, r < n: one warp per row.
cudaError_t launch_wtacrs_row_norms(FloatType type, const void* x, int64_t n, int64_t d,
                                    int64_t ld, void* out, cudaStream_t stream);

// The k output slots of the selection: slot j < *c copies order[j] (the winner-take-all set,
// largest weight first) with scale 1; slot j >= *c is draw d = j - *c: the smallest t with
// cdf[t] > uniform53(key(*seed), d) * cdf[n-1], scale cdf[n-1] / ((k - *c) w[t]). order (>= *c
// entries), c and seed live on the device; cdf is the inclusive prefix sum of w with the set's
// weights zeroed. scales: float (scales_double false) or double.
cudaError_t launch_wtacrs_draws(const int64_t* order, const int64_t* c, const double* cdf,
                                const double* w, int64_t n, int64_t k, const int64_t* seed,
                                int64_t* idx, void* scales, bool scales_double,
                                cudaStream_t stream);

// out[j, :] = scales[j] * x[idx[j], :] (scales == nullptr: a plain gather), math in in_type's
// math type, one rounding to out_type (its math type, or a 16-bit type for fp32 math). out is
// contiguous [k, d].
cudaError_t launch_wtacrs_gather(FloatType in_type, FloatType out_type, const void* x,
                                 int64_t ld, int64_t d, const int64_t* idx, const void* scales,
                                 void* out, int64_t k, cudaStream_t stream);

// out[o, i] = sum_j gy[idx[j], o] * xk[j, i]: grad_W of the kept rows, a gather-GEMM reading
// gy's rows by index (row stride ld_gy); xk contiguous [k, d_in] in gy's type; out contiguous
// [d_out, d_in] in gy's type; accumulation in the math type.
cudaError_t launch_wtacrs_grad_weight(FloatType type, const void* gy, int64_t ld_gy,
                                      const int64_t* idx, const void* xk, void* out, int64_t k,
                                      int64_t d_out, int64_t d_in, cudaStream_t stream);

}  // namespace gpu
}  // namespace pypaper
