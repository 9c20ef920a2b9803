// Launchers of the uniform-quantization CUDA kernels (kernels/cuda/quant_kernels.cu), torch-free.
//
// Every tensor is contiguous and seen as [outer, channels, inner] (kernels/common/quant_layout.h);
// scale and zero_point hold one value per channel in the math type: float for fp32/bf16/fp16
// storage, double for fp64. The per-element math is kernels/common/quant_math.h, the same code
// the CPU loops of kernels/cpu/quant_cpu.h run, so results match the CPU ops to the bit (the
// reduced scale / zero-point gradients up to summation order).
//
// Launchers enqueue on `stream`, return the launch status (cudaSuccess for an empty tensor) and
// never synchronize.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "../common/quant_layout.h"

namespace pypaper {
namespace gpu {

// Storage type of a float tensor. fp16 / bf16 pointers are __half / __nv_bfloat16 (layout of
// at::Half / at::BFloat16); the math type is float for them and for fp32, double for fp64.
enum class FloatType : int32_t { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// y = fake_quant(x). seed == nullptr: round half to even; otherwise stochastic rounding with
// u = rng::uniform01(rng::make_key(*seed), flat element index), *seed read on the device.
cudaError_t launch_fake_quantize(FloatType type, const void* x, void* y, const void* scale,
                                 const void* zero_point, quant::QuantLayout layout, int32_t qmin,
                                 int32_t qmax, const int64_t* seed, cudaStream_t stream);

// dx = STE gradient of fake_quant. With ds_sum / dz_sum non-null (both or neither), the
// per-channel sums of the LSQ scale and zero-point gradients are added into them: `channels`
// doubles each, zero-initialised by the caller (partial sums in the math type, atomics in fp64).
cudaError_t launch_fake_quantize_backward(FloatType type, const void* dy, const void* x, void* dx,
                                          const void* scale, const void* zero_point,
                                          quant::QuantLayout layout, int32_t qmin, int32_t qmax,
                                          const int64_t* seed, double* ds_sum, double* dz_sum,
                                          cudaStream_t stream);

// Codes clamp(round(x/s) + z), one per element: int8 when qmin < 0, else uint8. NaN -> z.
cudaError_t launch_quantize(FloatType type, const void* x, void* q, const void* scale,
                            const void* zero_point, quant::QuantLayout layout, int32_t qmin,
                            int32_t qmax, cudaStream_t stream);

// Codes of at most 4 bits, two per byte along the last dim (rows of last_dim elements, packed
// rows of (last_dim + 1) / 2 bytes; element 2j in the low nibble; an odd row's last high nibble 0).
cudaError_t launch_quantize_packed(FloatType type, const void* x, uint8_t* q, const void* scale,
                                   const void* zero_point, quant::QuantLayout layout, int32_t qmin,
                                   int32_t qmax, int64_t last_dim, cudaStream_t stream);

// y = (q - z) * s, one code per element: q is int8 when qmin < 0, else uint8.
cudaError_t launch_dequantize(FloatType out_type, const void* q, void* y, const void* scale,
                              const void* zero_point, quant::QuantLayout layout, int32_t qmin,
                              int32_t qmax, cudaStream_t stream);

// y = (q - z) * s from packed nibbles (sign-extended when qmin < 0); layout is y's.
cudaError_t launch_dequantize_packed(FloatType out_type, const uint8_t* q, void* y,
                                     const void* scale, const void* zero_point,
                                     quant::QuantLayout layout, int32_t qmin, int32_t qmax,
                                     int64_t last_dim, cudaStream_t stream);

}  // namespace gpu
}  // namespace pypaper
