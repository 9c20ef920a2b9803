// Launchers of the quantized linear CUDA kernels (kernels/cuda/qlinear_kernels.cu), torch-free.
// Formulas and layouts: kernels/common/qlinear_math.h (the CPU loops of kernels/cpu/qlinear_cpu.h
// follow the same definitions, so the codes and int32 accumulators match the CPU ops exactly and
// the fused epilogue to the bit; the weight-only sums up to summation order).
//
// All pointers are device pointers of contiguous tensors; x rows have stride ldx (elements).
// Launchers enqueue on `stream`, return the launch status and never synchronize.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace pypaper {
namespace gpu {

// qa [M, Kp] int8 codes clamp(rint(x / sa), -A, A) (pad 0), sa [M] = max(max|x| / A, FLT_MIN).
cudaError_t launch_qlinear_quantize_rows(const float* x, int64_t ldx, int64_t M, int64_t K,
                                         int64_t Kp, int32_t act_qmax, int8_t* qa, float* sa,
                                         cudaStream_t stream);

// acc = qa @ qw^T over the packed panels (int32); y (if non-null) = (float(acc) * sa) * sw + b,
// else acc_out [M, N] int32.
cudaError_t launch_qlinear_int8_gemm(const int8_t* qa, int64_t M, int64_t Kp, const int8_t* w_packed,
                                     int64_t N, const float* sa, const float* sw,
                                     const float* bias, float* y, int32_t* acc_out,
                                     cudaStream_t stream);

// y [M, N] = weight-only linear; int4: w [N, K/2] nibbles + zero [N, groups]; int8: w [N, K]
// int8, zero == nullptr. scale [N, groups], G = K / groups.
cudaError_t launch_qlinear_weight_only(const float* x, int64_t M, int64_t K, const void* w,
                                       bool int4, const float* scale, const float* zero,
                                       int64_t groups, const float* bias, int64_t N, float* y,
                                       cudaStream_t stream);

}  // namespace gpu
}  // namespace pypaper
