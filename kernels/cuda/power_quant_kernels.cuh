// Launchers of the power-quantizer CUDA kernels (kernels/cuda/power_quant_kernels.cu), torch-free.
//
// A tensor is [channels, inner] (contiguous); channel c has the range m[c] (x's float type) and
// the exponent exponents[per_channel_exponent ? c : 0] (double, on the device). Each block builds
// its channel's threshold and level tables in shared memory with the per-channel math of
// kernels/common/power_quant_math.h (the code the CPU loops run), then each thread counts /
// looks up its elements. T is float or double (is_double). Launchers enqueue on `stream`, return
// the launch status and never synchronize.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace pypaper {
namespace gpu {

struct PowerShape {
  int64_t channels;
  int64_t inner;
  bool per_channel_exponent;
};

// Blocks per channel of the launchers for `inner` elements (the backward's partial-sum count is
// channels * power_blocks_per_channel(inner)).
int64_t power_blocks_per_channel(int64_t inner);

// int8 codes sign(x) * c.
cudaError_t launch_power_quantize(bool is_double, const void* x, int8_t* q, const void* m,
                                  const double* exponents, PowerShape s, int qmax,
                                  cudaStream_t stream);

// y = level of the code, in y's type (is_double).
cudaError_t launch_power_dequantize(bool is_double, const int8_t* q, void* y, const void* m,
                                    const double* exponents, PowerShape s, int qmax,
                                    cudaStream_t stream);

// y = fake-quantized x (NaN stays NaN).
cudaError_t launch_power_fake_quantize(bool is_double, const void* x, void* y, const void* m,
                                       const double* exponents, PowerShape s, int qmax,
                                       cudaStream_t stream);

// dx (straight-through) and, when part_a / part_m are non-null, one partial sum per block of
// grad * dy/da and grad * dy/dm ("ste" or code-fixed terms), channels * blocks-per-channel
// doubles each, block b of channel c at c * blocks_per_channel + b.
cudaError_t launch_power_fake_quantize_backward(bool is_double, const void* g, const void* x,
                                                void* dx, const void* m, const double* exponents,
                                                PowerShape s, int qmax, bool ste, double* part_a,
                                                double* part_m, cudaStream_t stream);

}  // namespace gpu
}  // namespace pypaper
