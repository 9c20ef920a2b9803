// CUDA kernels of the fused Hopfield retrieval (launchers: hopfield_kernels.cuh). See the header
// for the layout and thread mapping; the math is kernels/common/hopfield_math.h.
#include <cuda_runtime.h>

#include <cmath>

#include "../common/hopfield_math.h"
#include "hopfield_kernels.cuh"

namespace pypaper {
namespace gpu {
namespace {

constexpr int kThreads = 128;

__device__ __forceinline__ float dexp(float x) { return hopfield::fast_exp(x); }
__device__ __forceinline__ double dexp(double x) { return exp(x); }

template <typename T>
__device__ __forceinline__ T neg_inf() {
  return -static_cast<T>(INFINITY);
}

// beta xi_row . k_j + masks (row i of head-batch bh).
template <typename T>
__device__ T score(const T* xi_row, const T* k, int64_t bh, int64_t i, int64_t j, int64_t H,
                   int64_t S, int64_t d, T beta, const HopfieldMasks<T>& m) {
  const T* kr = k + (bh * S + j) * d;
  T acc = 0;
  for (int64_t c = 0; c < d; ++c) acc += xi_row[c] * kr[c];
  T s = beta * acc;
  const int64_t b = bh / H, h = bh % H;
  if (m.attn != nullptr) s += m.attn[b * m.a_b + h * m.a_h + i * m.a_l + j * m.a_s];
  if (m.pad != nullptr) s += m.pad[b * m.p_b + j * m.p_s];
  return s;
}

template <typename T>
__device__ T block_max(T v, T* red) {
  for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  T r = red[0];
  for (int w = 1; w < kThreads / 32; ++w) r = fmax(r, red[w]);
  return r;
}

template <typename T>
__device__ T block_sum(T v, T* red) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  T r = 0;
  for (int w = 0; w < kThreads / 32; ++w) r += red[w];
  return r;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) pass_kernel(HopfieldPassParams<T> p) {
  const int64_t bh = blockIdx.x, i = blockIdx.y;
  const int64_t h = bh % p.H;
  if (p.flag[h] == 0) return;
  __shared__ T red[kThreads / 32];
  __shared__ T e[kThreads];
  const T* xi_row = p.xs + p.src[h] * p.slab + (bh * p.L + i) * p.d;
  const T beta = p.beta[h];
  // sweep 1: the row maximum and denominator (online per thread, then merged)
  T m = neg_inf<T>(), l = 0;
  for (int64_t j = threadIdx.x; j < p.S; j += kThreads) {
    const T s = score(xi_row, p.k, bh, i, j, p.H, p.S, p.d, beta, p.masks);
    const T mx = s > m ? s : m;
    if (mx != neg_inf<T>()) {
      l = l * hopfield::online_rescale(m, mx) + dexp(s - mx);
      m = mx;
    }
  }
  const T row_max = block_max(m, red);
  const T part = (m == neg_inf<T>()) ? T(0) : l * dexp(m - row_max);
  const T denom = block_sum(part, red);
  const T lse = hopfield::finish_lse(row_max, denom);
  // sweep 2: P W, one output column per thread
  T acc[4] = {0, 0, 0, 0};  // columns threadIdx.x + c * kThreads
  for (int64_t j0 = 0; j0 < p.S; j0 += kThreads) {
    const int64_t j = j0 + threadIdx.x;
    __syncthreads();
    e[threadIdx.x] = j < p.S ? dexp(score(xi_row, p.k, bh, i, j, p.H, p.S, p.d, beta, p.masks) - lse)
                             : T(0);
    __syncthreads();
    const int64_t n = p.S - j0 < kThreads ? p.S - j0 : kThreads;
    for (int c = 0; c < 4; ++c) {
      const int64_t col = threadIdx.x + c * kThreads;
      if (col < p.dw) {
        T a = 0;
        for (int64_t t = 0; t < n; ++t) a += e[t] * p.w[(bh * p.S + j0 + t) * p.dw + col];
        acc[c] += a;
      }
    }
  }
  for (int c = 0; c < 4; ++c) {
    const int64_t col = threadIdx.x + c * kThreads;
    if (col < p.dw) p.dst[(bh * p.L + i) * p.dw + col] = acc[c];
  }
  if (threadIdx.x == 0) p.lse[p.lse_slot[h] * p.BH * p.L + bh * p.L + i] = lse;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) diff_kernel(HopfieldDiffParams<T> p) {
  const int64_t bh = blockIdx.x, i = blockIdx.y;
  const int64_t h = bh % p.H;
  __shared__ T red[kThreads / 32];
  T acc = 0;
  if (p.flag[h] != 0) {
    const T* xa = p.xa + (bh * p.L + i) * p.d;
    const T* xb = p.xb + (bh * p.L + i) * p.d;
    const T la = p.la[bh * p.L + i], lb = p.lb[bh * p.L + i], beta = p.beta[h];
    for (int64_t j = threadIdx.x; j < p.S; j += kThreads) {
      const T pa = dexp(score(xa, p.k, bh, i, j, p.H, p.S, p.d, beta, p.masks) - la);
      const T pb = dexp(score(xb, p.k, bh, i, j, p.H, p.S, p.d, beta, p.masks) - lb);
      acc += (pa - pb) * (pa - pb);
    }
  }
  const T total = block_sum(acc, red);
  if (threadIdx.x == 0) p.partial[bh * p.L + i] = total;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) backward_kernel(HopfieldBackwardParams<T> p) {
  const int64_t bh = blockIdx.x, i = blockIdx.y;
  const int64_t h = bh % p.H;
  if (p.flag[h] == 0) return;
  __shared__ T ds_s[kThreads];
  const T* xi_row = p.xi + (bh * p.L + i) * p.d;
  const T* g_row = p.g + (bh * p.L + i) * p.dw;
  const T lse = p.lse[bh * p.L + i], delta = p.delta[bh * p.L + i], beta = p.beta[h];
  T gx[4] = {0, 0, 0, 0};  // columns threadIdx.x + c * kThreads of g_xi
  for (int64_t j0 = 0; j0 < p.S; j0 += kThreads) {
    const int64_t j = j0 + threadIdx.x;
    T ds = 0;
    if (j < p.S) {
      const T pv = dexp(score(xi_row, p.k, bh, i, j, p.H, p.S, p.d, beta, p.masks) - lse);
      const T* wr = p.w + (bh * p.S + j) * p.dw;
      T dp = 0;
      for (int64_t c = 0; c < p.dw; ++c) dp += g_row[c] * wr[c];
      ds = pv * (dp - delta);
      T* dkr = p.dk + (bh * p.S + j) * p.d;
      for (int64_t c = 0; c < p.d; ++c) atomicAdd(dkr + c, beta * ds * xi_row[c]);
      T* dwr = p.dw_grad + (bh * p.S + j) * p.dw;
      for (int64_t c = 0; c < p.dw; ++c) atomicAdd(dwr + c, pv * g_row[c]);
    }
    __syncthreads();
    ds_s[threadIdx.x] = ds;
    __syncthreads();
    const int64_t n = p.S - j0 < kThreads ? p.S - j0 : kThreads;
    for (int c = 0; c < 4; ++c) {
      const int64_t col = threadIdx.x + c * kThreads;
      if (col < p.d) {
        T a = 0;
        for (int64_t t = 0; t < n; ++t) a += ds_s[t] * p.k[(bh * p.S + j0 + t) * p.d + col];
        gx[c] += beta * a;
      }
    }
  }
  for (int c = 0; c < 4; ++c) {
    const int64_t col = threadIdx.x + c * kThreads;
    if (col < p.d) p.g_xi[(bh * p.L + i) * p.d + col] = gx[c];
  }
}

}  // namespace

// Pattern sizes up to 4 * kThreads = 512 columns (checked by the host glue).
template <typename T>
cudaError_t hopfield_pass(const HopfieldPassParams<T>& p, cudaStream_t stream) {
  if (p.BH == 0 || p.L == 0) return cudaSuccess;
  pass_kernel<T><<<dim3(static_cast<unsigned>(p.BH), static_cast<unsigned>(p.L)), kThreads, 0,
                   stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t hopfield_diff(const HopfieldDiffParams<T>& p, cudaStream_t stream) {
  if (p.BH == 0 || p.L == 0) return cudaSuccess;
  diff_kernel<T><<<dim3(static_cast<unsigned>(p.BH), static_cast<unsigned>(p.L)), kThreads, 0,
                   stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t hopfield_backward_step(const HopfieldBackwardParams<T>& p, cudaStream_t stream) {
  if (p.BH == 0 || p.L == 0) return cudaSuccess;
  backward_kernel<T><<<dim3(static_cast<unsigned>(p.BH), static_cast<unsigned>(p.L)), kThreads,
                       0, stream>>>(p);
  return cudaGetLastError();
}

template cudaError_t hopfield_pass<float>(const HopfieldPassParams<float>&, cudaStream_t);
template cudaError_t hopfield_pass<double>(const HopfieldPassParams<double>&, cudaStream_t);
template cudaError_t hopfield_diff<float>(const HopfieldDiffParams<float>&, cudaStream_t);
template cudaError_t hopfield_diff<double>(const HopfieldDiffParams<double>&, cudaStream_t);
template cudaError_t hopfield_backward_step<float>(const HopfieldBackwardParams<float>&,
                                                   cudaStream_t);
template cudaError_t hopfield_backward_step<double>(const HopfieldBackwardParams<double>&,
                                                    cudaStream_t);

}  // namespace gpu
}  // namespace pypaper
