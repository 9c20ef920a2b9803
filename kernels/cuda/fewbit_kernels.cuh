// Launchers of the few-bit backward activation kernels (kernels/cuda/fewbit_kernels.cu),
// torch-free.
//
// Novikov et al., "Few-Bit Backward" (ICML 2023): the forward keeps, per element of x, the b-bit
// index of its piece of the piecewise-constant derivative; the backward is dx = levels[code] * dy.
// The code and its packed layout (blocks of 32 elements, bit planes; ceil(b*n/8) bytes) are
// kernels/common/fewbit_pack.h, the same code the CPU loops of kernels/cpu/fewbit_cpu.h run, so
// the codes and dx match the CPU ops byte for byte.
//
// Tensors are contiguous and flat (n elements). `borders` (nb values, ascending) and `levels`
// (2^bits values) are in the math type: float for fp32 / bf16 / fp16 storage, double for fp64.
// Launchers enqueue on `stream`, return the launch status (cudaSuccess and no launch for n == 0,
// cudaErrorInvalidValue for arguments the op's checks exclude) and never synchronize.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "quant_kernels.cuh"  // FloatType: the storage types of pypaper's CUDA kernels

namespace pypaper {
namespace gpu {

// codes (packed_bytes(n, bits) bytes) = the b-bit codes of x under `borders`: piece =
// #{j : !(x <= borders[j])} (NaN: nb), or its parity when `fold` (then nb is 2 or 3).
// 1 <= bits <= 4, 1 <= nb, nb + 1 <= 2^bits unless fold. The forward's y = f(x) is torch's own
// kernel, not launched here.
cudaError_t launch_fewbit_pack(FloatType type, const void* x, uint8_t* codes, int64_t n,
                               const void* borders, int nb, int bits, bool fold,
                               cudaStream_t stream);

// gx = levels[code_i] * gy, or 0 where levels[code_i] == 0 (math type, one rounding to the
// storage type), codes as packed above.
// codes may have any alignment (a byte offset into a larger buffer).
cudaError_t launch_fewbit_backward(FloatType type, const void* gy, const uint8_t* codes, void* gx,
                                   int64_t n, const void* levels, int bits, cudaStream_t stream);

}  // namespace gpu
}  // namespace pypaper
