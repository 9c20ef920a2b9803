// CUDA kernels of the quantized linear ops (issue #7, linear kernels). Launchers:
// kernels/cuda/qlinear_kernels.cuh; shared math and layouts: kernels/common/qlinear_math.h.
//
//   quantize_rows: one block per row; max|x| by a block reduction, then the codes.
//   int8 GEMM:     16 x 16 output tiles, one thread per output, __dp4a over 4 k at a time: the
//                  packed panels hold a channel's 4 consecutive k in one 32-bit word, at word
//                  ((n / 16) * (Kp / 4) + k / 4) * 16 + n % 16, so both operands load as int32;
//                  tiles of 32 words of k staged in shared memory.
//   weight-only:   one warp per output (m, n): lanes stride over k, dequantize and FMA in fp32,
//                  then a warp reduction (the memory-bound decode case: every weight byte is
//                  read once per row of x).
#include <cuda_runtime.h>

#include <cfloat>

#include "../common/qlinear_math.h"
#include "qlinear_kernels.cuh"

namespace pypaper {
namespace gpu {
namespace {

constexpr int kRowThreads = 256;

__global__ void quantize_rows_kernel(const float* __restrict__ x, int64_t ldx, int64_t K,
                                     int64_t Kp, int32_t act_qmax, int8_t* __restrict__ qa,
                                     float* __restrict__ sa) {
  __shared__ float red[kRowThreads / 32];
  const int64_t m = blockIdx.x;
  const float* xr = x + m * ldx;
  float amax = 0.f;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) amax = fmaxf(amax, fabsf(xr[k]));
  for (int off = 16; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = amax;
  __syncthreads();
  if (threadIdx.x < 32) {
    float v = threadIdx.x < blockDim.x / 32 ? red[threadIdx.x] : 0.f;
    for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
    if (threadIdx.x == 0) red[0] = v;
  }
  __syncthreads();
  const float s = qlinear::act_scale(red[0], act_qmax);
  if (threadIdx.x == 0) sa[m] = s;
  for (int64_t k = threadIdx.x; k < Kp; k += blockDim.x) {
    qa[m * Kp + k] = k < K ? static_cast<int8_t>(qlinear::act_code(xr[k], s, act_qmax)) : int8_t{0};
  }
}

constexpr int kTile = 16;
constexpr int kKWords = 32;

__global__ void int8_gemm_kernel(const int32_t* __restrict__ qa, int64_t M, int64_t K4,
                                 const int32_t* __restrict__ w, int64_t N,
                                 const float* __restrict__ sa, const float* __restrict__ sw,
                                 const float* __restrict__ bias, float* __restrict__ y,
                                 int32_t* __restrict__ acc_out) {
  __shared__ int32_t As[kTile][kKWords + 1];
  __shared__ int32_t Bs[kTile][kKWords + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;  // tx: output channel, ty: row
  const int64_t n = blockIdx.x * kTile + tx;
  const int64_t m = blockIdx.y * kTile + ty;
  const int64_t n0 = blockIdx.x * kTile;  // a tile is one panel (16 channels)
  int32_t acc = 0;
  for (int64_t s0 = 0; s0 < K4; s0 += kKWords) {
    for (int j = tx; j < kKWords; j += kTile) {
      const int64_t s = s0 + j;
      const int64_t mm = blockIdx.y * kTile + ty;
      As[ty][j] = (mm < M && s < K4) ? qa[mm * K4 + s] : 0;
      // panel word of channel n0 + ty at k-step s
      Bs[ty][j] = s < K4 ? w[((n0 / kTile) * K4 + s) * kTile + ty] : 0;
    }
    __syncthreads();
#pragma unroll 8
    for (int j = 0; j < kKWords; ++j) acc = __dp4a(As[ty][j], Bs[tx][j], acc);
    __syncthreads();
  }
  if (m < M && n < N) {
    if (acc_out) acc_out[m * N + n] = acc;
    if (y) y[m * N + n] = qlinear::dyn_epilogue(acc, sa[m], sw[n], bias ? bias[n] : 0.f);
  }
}

__global__ void weight_only_kernel(const float* __restrict__ x, int64_t M, int64_t K,
                                   const uint8_t* __restrict__ w4, const int8_t* __restrict__ w8,
                                   const float* __restrict__ scale, const float* __restrict__ zero,
                                   int64_t groups, const float* __restrict__ bias, int64_t N,
                                   float* __restrict__ y) {
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  if (warp >= M * N) return;
  const int64_t m = warp / N, n = warp % N;
  const int64_t G = K / groups;
  const float* xr = x + m * K;
  float acc = 0.f;
  for (int64_t k = lane; k < K; k += 32) {
    const int64_t g = k / G;
    const float s = scale[n * groups + g];
    float wv;
    if (w4) {
      const float code = static_cast<float>(qlinear::int4_code(w4 + n * (K / 2), k));
      wv = __fmul_rn(code - zero[n * groups + g], s);
    } else {
      wv = __fmul_rn(static_cast<float>(w8[n * K + k]), s);
    }
    acc = fmaf(xr[k], wv, acc);
  }
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) y[m * N + n] = acc + (bias ? bias[n] : 0.f);
}

}  // namespace

cudaError_t launch_qlinear_quantize_rows(const float* x, int64_t ldx, int64_t M, int64_t K,
                                         int64_t Kp, int32_t act_qmax, int8_t* qa, float* sa,
                                         cudaStream_t stream) {
  if (M == 0) return cudaSuccess;
  quantize_rows_kernel<<<static_cast<unsigned>(M), kRowThreads, 0, stream>>>(x, ldx, K, Kp, act_qmax,
                                                                            qa, sa);
  return cudaGetLastError();
}

cudaError_t launch_qlinear_int8_gemm(const int8_t* qa, int64_t M, int64_t Kp, const int8_t* w_packed,
                                     int64_t N, const float* sa, const float* sw,
                                     const float* bias, float* y, int32_t* acc_out,
                                     cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  const dim3 block(kTile, kTile);
  const dim3 grid(static_cast<unsigned>((N + kTile - 1) / kTile),
                  static_cast<unsigned>((M + kTile - 1) / kTile));
  int8_gemm_kernel<<<grid, block, 0, stream>>>(reinterpret_cast<const int32_t*>(qa), M, Kp / 4,
                                               reinterpret_cast<const int32_t*>(w_packed), N, sa,
                                               sw, bias, y, acc_out);
  return cudaGetLastError();
}

cudaError_t launch_qlinear_weight_only(const float* x, int64_t M, int64_t K, const void* w,
                                       bool int4, const float* scale, const float* zero,
                                       int64_t groups, const float* bias, int64_t N, float* y,
                                       cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  const int64_t warps = M * N;
  const int threads = 256;
  const int64_t blocks = (warps * 32 + threads - 1) / threads;
  weight_only_kernel<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
      x, M, K, int4 ? static_cast<const uint8_t*>(w) : nullptr,
      int4 ? nullptr : static_cast<const int8_t*>(w), scale, zero, groups, bias, N, y);
  return cudaGetLastError();
}

}  // namespace gpu
}  // namespace pypaper
