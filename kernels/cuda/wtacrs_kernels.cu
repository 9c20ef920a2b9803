// CUDA kernels of WTA-CRS (Liu et al., NeurIPS 2023); contract in wtacrs_kernels.cuh, the math in
// kernels/common/wtacrs_math.h (shared with the CPU loops, so the CPU tests check it).
//
// Row norms: a warp per row, lanes stride the features, a shuffle reduction.
// Draws: a thread per output slot; the winner-take-all set size and the residual CDF come from
// the glue (sort / cumsum / argmin on the device), so nothing returns to the host; each draw is
// one binary search of the CDF (wtacrs::upper_bound).
// Gather-scale: a block per 4 kept rows, threads along the features (coalesced rows).
// grad_W: a gather-GEMM. A 64 x 64 output tile per 256-thread block, each thread 4 x 4 outputs;
// per step, 16 kept rows: the tile's 16 x 64 slice of gy (rows read by index: the row pointer of
// each kept row is loaded once per step) and 16 x 64 of xk go to shared memory, then 16 rank-1
// updates in registers. Accumulation in fp32 (fp64 for fp64); no TF32, as torch's default.
#include "wtacrs_kernels.cuh"
#include "device_common.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/wtacrs_math.h"

namespace pypaper {
namespace gpu {
namespace {

template <typename F>
bool dispatch(FloatType t, F&& f) {
  switch (t) {
    case FloatType::kFloat32: f(float{}); return true;
    case FloatType::kFloat64: f(double{}); return true;
    case FloatType::kFloat16: f(__half{}); return true;
    case FloatType::kBFloat16: f(__nv_bfloat16{}); return true;
  }
  return false;
}

unsigned blocks_for(int64_t work, int per_block) {
  const int64_t b = (work + per_block - 1) / per_block;
  return static_cast<unsigned>(b < 65535 * 1024 ? b : 65535 * 1024);
}

// ---- row norms ---------------------------------------------------------------------------------

constexpr int kNormWarps = 8;

template <typename In>
__global__ void __launch_bounds__(kNormWarps * 32)
    row_norms_kernel(const In* __restrict__ x, int64_t n, int64_t d, int64_t ld,
                     typename MathOf<In>::type* __restrict__ out) {
  using T = typename MathOf<In>::type;
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kNormWarps;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kNormWarps + (threadIdx.x >> 5); r < n;
       r += warps) {
    const In* row = x + r * ld;
    T acc = T(0);
    for (int64_t i = lane; i < d; i += 32) {
      const T v = to_math(row[i]);
      acc += v * v;
    }
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (lane == 0) out[r] = sqrt(acc);
  }
}

// ---- draws -------------------------------------------------------------------------------------

template <typename S>
__global__ void draws_kernel(const int64_t* __restrict__ order, const int64_t* __restrict__ cptr,
                             const double* __restrict__ cdf, const double* __restrict__ w,
                             int64_t n, int64_t k, const int64_t* __restrict__ seed,
                             int64_t* __restrict__ idx, S* __restrict__ scales) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= k) return;
  const int64_t c = *cptr;
  if (j < c) {
    idx[j] = order[j];
    scales[j] = S(1);
    return;
  }
  const rng::Key key = rng::make_key(*seed);
  const double residual = cdf[n - 1];
  const double target = wtacrs::uniform53(key, static_cast<uint64_t>(j - c)) * residual;
  const int64_t t = wtacrs::upper_bound(cdf, n, target);
  idx[j] = t;
  scales[j] = static_cast<S>(wtacrs::draw_scale(residual, k - c, w[t]));
}

// ---- gather and scale --------------------------------------------------------------------------

constexpr int kGatherRows = 4;

template <typename In, typename Out>
__global__ void __launch_bounds__(256)
    gather_kernel(const In* __restrict__ x, int64_t ld, int64_t d,
                  const int64_t* __restrict__ idx,
                  const typename MathOf<In>::type* __restrict__ scales, Out* __restrict__ out,
                  int64_t k) {
  using T = typename MathOf<In>::type;
  for (int64_t j0 = static_cast<int64_t>(blockIdx.x) * kGatherRows; j0 < k;
       j0 += static_cast<int64_t>(gridDim.x) * kGatherRows) {
    for (int r = 0; r < kGatherRows && j0 + r < k; ++r) {
      const int64_t j = j0 + r;
      const In* src = x + idx[j] * ld;
      Out* dst = out + j * d;
      const T s = scales ? scales[j] : T(1);
      for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
        T v = to_math(src[i]);
        if (scales) v = v * s;
        store(dst[i], v);
      }
    }
  }
}

// ---- gather-GEMM for grad_W --------------------------------------------------------------------

constexpr int kTileO = 64, kTileI = 64, kStep = 16, kGemmThreads = 256;

template <typename In>
__global__ void __launch_bounds__(kGemmThreads)
    grad_weight_kernel(const In* __restrict__ gy, int64_t ld_gy, const int64_t* __restrict__ idx,
                       const In* __restrict__ xk, In* __restrict__ out, int64_t k, int64_t d_out,
                       int64_t d_in) {
  using T = typename MathOf<In>::type;
  __shared__ T a_s[kStep][kTileO];  // a_s[j][o] = gy[idx[j0 + j], o0 + o]
  __shared__ T b_s[kStep][kTileI];  // b_s[j][i] = xk[j0 + j, i0 + i]
  __shared__ int64_t rows[kStep];
  const int64_t o0 = static_cast<int64_t>(blockIdx.y) * kTileO;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kTileI;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;  // 16 x 16 threads, 4 x 4 outputs each
  T acc[4][4];
  for (int a = 0; a < 4; ++a)
    for (int b = 0; b < 4; ++b) acc[a][b] = T(0);
  for (int64_t j0 = 0; j0 < k; j0 += kStep) {
    if (threadIdx.x < kStep) {
      const int64_t j = j0 + threadIdx.x;
      rows[threadIdx.x] = j < k ? idx[j] : -1;
    }
    __syncthreads();
    // 16 x 64 elements of each operand: 4 per thread, consecutive threads on consecutive features
    for (int e = threadIdx.x; e < kStep * kTileO; e += kGemmThreads) {
      const int j = e / kTileO, col = e % kTileO;
      const int64_t r = rows[j];
      const int64_t o = o0 + col, i = i0 + col;
      a_s[j][col] = (r >= 0 && o < d_out) ? to_math(gy[r * ld_gy + o]) : T(0);
      b_s[j][col] = (j0 + j < k && i < d_in) ? to_math(xk[(j0 + j) * d_in + i]) : T(0);
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < kStep; ++j) {
      T av[4], bv[4];
#pragma unroll
      for (int a = 0; a < 4; ++a) av[a] = a_s[j][ty + 16 * a];
#pragma unroll
      for (int b = 0; b < 4; ++b) bv[b] = b_s[j][tx + 16 * b];
#pragma unroll
      for (int a = 0; a < 4; ++a)
#pragma unroll
        for (int b = 0; b < 4; ++b) acc[a][b] += av[a] * bv[b];
    }
    __syncthreads();
  }
  for (int a = 0; a < 4; ++a) {
    const int64_t o = o0 + ty + 16 * a;
    if (o >= d_out) continue;
    for (int b = 0; b < 4; ++b) {
      const int64_t i = i0 + tx + 16 * b;
      if (i < d_in) store(out[o * d_in + i], acc[a][b]);
    }
  }
}

}  // namespace

cudaError_t launch_wtacrs_row_norms(FloatType type, const void* x, int64_t n, int64_t d,
                                    int64_t ld, void* out, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (n < 0 || d < 0 || ld < d) return cudaErrorInvalidValue;
  const unsigned grid = blocks_for(n, kNormWarps);
  const bool ok = dispatch(type, [&](auto tag) {
    using In = decltype(tag);
    row_norms_kernel<In><<<grid, kNormWarps * 32, 0, stream>>>(
        static_cast<const In*>(x), n, d, ld, static_cast<typename MathOf<In>::type*>(out));
  });
  return ok ? cudaGetLastError() : cudaErrorInvalidValue;
}

cudaError_t launch_wtacrs_draws(const int64_t* order, const int64_t* c, const double* cdf,
                                const double* w, int64_t n, int64_t k, const int64_t* seed,
                                int64_t* idx, void* scales, bool scales_double,
                                cudaStream_t stream) {
  if (k == 0) return cudaSuccess;
  if (n <= 0 || k < 0) return cudaErrorInvalidValue;
  const unsigned grid = blocks_for(k, 256);
  if (scales_double) {
    draws_kernel<double><<<grid, 256, 0, stream>>>(order, c, cdf, w, n, k, seed, idx,
                                                   static_cast<double*>(scales));
  } else {
    draws_kernel<float><<<grid, 256, 0, stream>>>(order, c, cdf, w, n, k, seed, idx,
                                                  static_cast<float*>(scales));
  }
  return cudaGetLastError();
}

cudaError_t launch_wtacrs_gather(FloatType in_type, FloatType out_type, const void* x,
                                 int64_t ld, int64_t d, const int64_t* idx, const void* scales,
                                 void* out, int64_t k, cudaStream_t stream) {
  if (k == 0 || d == 0) return cudaSuccess;
  const unsigned grid = blocks_for(k, kGatherRows);
  bool valid = false;
  dispatch(in_type, [&](auto in_tag) {
    using In = decltype(in_tag);
    using T = typename MathOf<In>::type;
    dispatch(out_type, [&](auto out_tag) {
      using Out = decltype(out_tag);
      constexpr bool f64_math = sizeof(T) == 8;
      constexpr bool out_f64 = sizeof(Out) == 8;
      if constexpr (f64_math == out_f64) {
        valid = true;
        gather_kernel<In, Out><<<grid, 256, 0, stream>>>(
            static_cast<const In*>(x), ld, d, idx, static_cast<const T*>(scales),
            static_cast<Out*>(out), k);
      }
    });
  });
  return valid ? cudaGetLastError() : cudaErrorInvalidValue;
}

cudaError_t launch_wtacrs_grad_weight(FloatType type, const void* gy, int64_t ld_gy,
                                      const int64_t* idx, const void* xk, void* out, int64_t k,
                                      int64_t d_out, int64_t d_in, cudaStream_t stream) {
  if (d_out == 0 || d_in == 0) return cudaSuccess;
  const int64_t gx = (d_in + kTileI - 1) / kTileI, gyb = (d_out + kTileO - 1) / kTileO;
  if (gx > 0x7fffffff || gyb > 65535) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gyb));
  const bool ok = dispatch(type, [&](auto tag) {
    using In = decltype(tag);
    grad_weight_kernel<In><<<grid, kGemmThreads, 0, stream>>>(
        static_cast<const In*>(gy), ld_gy, idx, static_cast<const In*>(xk),
        static_cast<In*>(out), k, d_out, d_in);
  });
  return ok ? cudaGetLastError() : cudaErrorInvalidValue;
}

}  // namespace gpu
}  // namespace pypaper
