// Device-side helpers shared by every pypaper .cu file (include it from .cu files only): the
// storage -> math type map, the 16-bit conversions that round like the CPU kernels, aligned
// vector access, the global thread index, the SM count for grid sizing, and the switch from a
// FloatType (kernels/cuda/quant_kernels.cuh) to a typed call.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

#include "quant_kernels.cuh"  // FloatType

namespace pypaper {
namespace gpu {

// ---- storage and math types: 16-bit storage computes in fp32, fp64 in fp64 ---------------------

template <typename In>
struct MathOf {
  using type = float;
};
template <>
struct MathOf<double> {
  using type = double;
};

__device__ __forceinline__ float to_math(float v) { return v; }
__device__ __forceinline__ double to_math(double v) { return v; }
__device__ __forceinline__ float to_math(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_math(__nv_bfloat16 v) { return __bfloat162float(v); }

// Round to nearest even, as c10::Half / c10::BFloat16 and the CPU kernels (NaN bits may differ).
__device__ __forceinline__ void store(float& o, float v) { o = v; }
__device__ __forceinline__ void store(double& o, double v) { o = v; }
__device__ __forceinline__ void store(__half& o, float v) { o = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16& o, float v) { o = __float2bfloat16_rn(v); }

// ---- access -------------------------------------------------------------------------------------

// N values moved as one aligned access (16 bytes for a full float unit).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <int N, typename T>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

template <int N, typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& v) {
  *reinterpret_cast<Pack<T, N>*>(p) = v;
}

__device__ __forceinline__ int64_t global_thread() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

// ---- launch -------------------------------------------------------------------------------------

// Multiprocessors of the current device, queried once per device (grid sizing).
inline cudaError_t sm_count(int* out) {
  static std::atomic<int> cache[64];  // per device; zero until first queried
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  const bool cached = dev >= 0 && dev < 64;
  if (cached) {
    const int v = cache[dev].load(std::memory_order_relaxed);
    if (v > 0) {
      *out = v;
      return cudaSuccess;
    }
  }
  int count = 0;
  err = cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, dev);
  if (err != cudaSuccess) return err;
  if (count <= 0) count = 1;
  if (cached) cache[dev].store(count, std::memory_order_relaxed);
  *out = count;
  return cudaSuccess;
}

// Calls f with a value of the storage type; an unknown type is cudaErrorInvalidValue.
template <typename F>
cudaError_t dispatch_float(FloatType type, F&& f) {
  switch (type) {
    case FloatType::kFloat32: return f(float{});
    case FloatType::kFloat64: return f(double{});
    case FloatType::kFloat16: return f(__half{});
    case FloatType::kBFloat16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace gpu
}  // namespace pypaper
