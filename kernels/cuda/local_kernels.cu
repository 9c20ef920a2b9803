// CUDA kernels of pypaper.local's fused local-loss layers; contract in local_kernels.cuh, the
// math in kernels/common/local_math.h (shared with the CPU loops, so the CPU tests check it).
//
// Row epilogues: a 256-thread block per output row; threads stride the row's features
// (coalesced), block reductions by warp shuffles and one shared-memory step. FF needs the row's
// goodness before any dZ, so it reads the row twice (the second read hits L2). The bias gradient
// is added with atomics in the math type. The single-forward FF adds a block reduction per class
// and the row's CE in shared memory. Pooling: a thread per (row, channel); CE: a thread per row
// (k is a class count).
#include "local_kernels.cuh"
#include "device_common.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/local_math.h"

namespace pypaper {
namespace gpu {
namespace {

constexpr int kRowThreads = 256;

template <typename T>
__device__ T block_sum(T v, T* shared) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  T s = T(0);
  if (threadIdx.x < 32) {
    s = lane < (kRowThreads / 32) ? shared[lane] : T(0);
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (lane == 0) shared[0] = s;
  }
  __syncthreads();
  s = shared[0];
  __syncthreads();
  return s;
}

// 1 / (||x_row|| + eps) of a row of d inputs, by the whole block (FF's input normalisation).
template <typename In, typename T>
__device__ T row_inv_norm(const In* __restrict__ xr, int64_t d, T eps, T* shared) {
  T acc = T(0);
  for (int64_t j = threadIdx.x; j < d; j += kRowThreads) {
    const T v = to_math(xr[j]);
    acc += v * v;
  }
  return T(1) / (sqrt(block_sum(acc, shared)) + eps);
}

template <typename In>
__global__ void __launch_bounds__(kRowThreads)
    ff_rows_kernel(In* __restrict__ z, const In* __restrict__ x, const In* __restrict__ bias,
                   In* __restrict__ dz, typename MathOf<In>::type* __restrict__ row_loss,
                   typename MathOf<In>::type* __restrict__ db, int64_t m, int64_t d,
                   int64_t num_pos, int64_t n, double theta, double eps, bool normalize) {
  using T = typename MathOf<In>::type;
  __shared__ T shared[kRowThreads / 32];
  const int64_t r = blockIdx.x;
  const T inv = normalize ? row_inv_norm(x + r * d, d, T(eps), shared) : T(1);
  T acc = T(0);
  for (int64_t j = threadIdx.x; j < m; j += kRowThreads) {
    T v = inv * to_math(z[r * m + j]);
    if (bias) v += to_math(bias[j]);
    const T h = v > T(0) ? v : T(0);
    acc += h * h;
  }
  const T g = block_sum(acc, shared);
  const bool pos = r < num_pos;
  const T s = pos ? T(1) : T(-1);
  const T w = pos ? T(1) / T(num_pos) : T(1) / T(n - num_pos);
  if (threadIdx.x == 0) row_loss[r] = w * local::ff_row_loss(g, T(theta), s);
  const T c = T(2) * w * local::ff_row_dgood(g, T(theta), s);
  for (int64_t j = threadIdx.x; j < m; j += kRowThreads) {
    T v = inv * to_math(z[r * m + j]);
    if (bias) v += to_math(bias[j]);
    const T h = v > T(0) ? v : T(0);
    const T dd = c * h;
    store(z[r * m + j], h);
    store(dz[r * m + j], dd * inv);
    if (bias) atomicAdd(db + j, dd);
  }
}

template <typename In, int ACT, bool SIGN>
__global__ void __launch_bounds__(kRowThreads)
    tp_rows_kernel(In* __restrict__ z, const In* __restrict__ bias,
                   const typename MathOf<In>::type* __restrict__ proj,
                   const int64_t* __restrict__ y, In* __restrict__ dz,
                   typename MathOf<In>::type* __restrict__ row_loss,
                   typename MathOf<In>::type* __restrict__ db, int64_t m, int64_t n) {
  using T = typename MathOf<In>::type;
  __shared__ T shared[kRowThreads / 32];
  const int64_t r = blockIdx.x;
  const T scale = T(1) / T(n);
  const T* t = proj + y[r] * m;
  T acc = T(0);
  for (int64_t j = threadIdx.x; j < m; j += kRowThreads) {
    T v = to_math(z[r * m + j]);
    if (bias) v += to_math(bias[j]);
    const T h = local::tp_act(v, ACT);
    const T e = h - local::tp_target(t[j], SIGN);
    acc += e * e;
    const T dd = scale * e * local::tp_act_grad(v, h, ACT);
    store(z[r * m + j], h);
    store(dz[r * m + j], dd);
    if (bias) atomicAdd(db + j, dd);
  }
  const T l = block_sum(acc, shared);
  if (threadIdx.x == 0) row_loss[r] = T(0.5) * scale * l;
}

// Single-forward FF rows (ForwardGNN's SF): h in place of z, the k class similarities by block
// reductions into shared memory, the row's CE on thread 0, then dz and db through the ReLU.
template <typename In>
__global__ void __launch_bounds__(kRowThreads)
    sf_rows_kernel(In* __restrict__ z, const In* __restrict__ x, const In* __restrict__ bias,
                   const typename MathOf<In>::type* __restrict__ emb,
                   const int64_t* __restrict__ y, In* __restrict__ dz,
                   typename MathOf<In>::type* __restrict__ dlogits,
                   typename MathOf<In>::type* __restrict__ row_loss,
                   typename MathOf<In>::type* __restrict__ db, int64_t m, int64_t d, int64_t k,
                   int64_t n, double eps, double inv_temp, bool normalize) {
  using T = typename MathOf<In>::type;
  __shared__ T shared[kRowThreads / 32];
  extern __shared__ __align__(16) unsigned char dyn[];
  T* lg = reinterpret_cast<T*>(dyn);  // [k]: the row's scaled logits, then its dlogits
  const int64_t r = blockIdx.x;
  const T inv = normalize ? row_inv_norm(x + r * d, d, T(eps), shared) : T(1);
  // Each thread rereads only the features it wrote itself: no barrier between the passes.
  for (int64_t j = threadIdx.x; j < m; j += kRowThreads) {
    T v = inv * to_math(z[r * m + j]);
    if (bias) v += to_math(bias[j]);
    store(z[r * m + j], v > T(0) ? v : T(0));
  }
  for (int64_t c = 0; c < k; ++c) {
    T acc = T(0);
    for (int64_t j = threadIdx.x; j < m; j += kRowThreads) acc += to_math(z[r * m + j]) * emb[c * m + j];
    const T sum = block_sum(acc, shared);
    if (threadIdx.x == 0) lg[c] = T(inv_temp) * sum;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    T mx = lg[0];
    for (int64_t c = 1; c < k; ++c) mx = lg[c] > mx ? lg[c] : mx;
    T se = T(0);
    for (int64_t c = 0; c < k; ++c) se += exp(lg[c] - mx);
    const T scale = T(1) / T(n), yl = lg[y[r]];
    row_loss[r] = scale * (mx + log(se) - yl);
    for (int64_t c = 0; c < k; ++c) {
      lg[c] = scale * T(inv_temp) * (exp(lg[c] - mx) / se - (c == y[r] ? T(1) : T(0)));
      dlogits[r * k + c] = lg[c];
    }
  }
  __syncthreads();
  for (int64_t j = threadIdx.x; j < m; j += kRowThreads) {
    T g = T(0);
    for (int64_t c = 0; c < k; ++c) g += lg[c] * emb[c * m + j];
    g = to_math(z[r * m + j]) > T(0) ? g : T(0);
    store(dz[r * m + j], g * inv);
    if (bias) atomicAdd(db + j, g);
  }
}

template <typename In>
__global__ void pool_kernel(const In* __restrict__ feat, typename MathOf<In>::type* __restrict__ out,
                            int64_t rows, int64_t s) {
  using T = typename MathOf<In>::type;
  const int64_t i = global_thread();
  if (i >= rows) return;
  T acc = T(0);
  for (int64_t p = 0; p < s; ++p) acc += to_math(feat[i * s + p]);
  out[i] = s > 0 ? acc / T(s) : T(0);
}

template <typename T>
__global__ void ce_rows_kernel(const T* __restrict__ logits, const int64_t* __restrict__ y,
                               T* __restrict__ dl, T* __restrict__ row_loss, int64_t n,
                               int64_t k) {
  const int64_t r = global_thread();
  if (r >= n) return;
  const T* l = logits + r * k;
  T mx = l[0];
  for (int64_t j = 1; j < k; ++j) mx = l[j] > mx ? l[j] : mx;
  T se = T(0);
  for (int64_t j = 0; j < k; ++j) se += exp(l[j] - mx);
  const T scale = T(1) / T(n);
  row_loss[r] = scale * (mx + log(se) - l[y[r]]);
  for (int64_t j = 0; j < k; ++j)
    dl[r * k + j] = scale * (exp(l[j] - mx) / se - (j == y[r] ? T(1) : T(0)));
}

unsigned grid_for(int64_t work, int per_block) {
  return static_cast<unsigned>((work + per_block - 1) / per_block);
}

}  // namespace

cudaError_t launch_local_ff_rows(FloatType type, void* z, const void* x, const void* bias,
                                 void* dz, void* row_loss, void* db, int64_t n, int64_t m,
                                 int64_t d, int64_t num_pos, double theta, double eps,
                                 bool normalize, cudaStream_t stream) {
  if (n == 0 || m == 0) return cudaSuccess;
  if (n > 0x7fffffff) return cudaErrorInvalidValue;
  return dispatch_float(type, [&](auto tag) {
    using In = decltype(tag);
    using T = typename MathOf<In>::type;
    ff_rows_kernel<In><<<static_cast<unsigned>(n), kRowThreads, 0, stream>>>(
        static_cast<In*>(z), static_cast<const In*>(x), static_cast<const In*>(bias),
        static_cast<In*>(dz), static_cast<T*>(row_loss), static_cast<T*>(db), m, d, num_pos, n,
        theta, eps, normalize);
    return cudaGetLastError();
  });
}

cudaError_t launch_local_tp_rows(FloatType type, void* z, const void* bias, const void* proj,
                                 const int64_t* y, void* dz, void* row_loss, void* db, int64_t n,
                                 int64_t m, int activation, bool sign, cudaStream_t stream) {
  if (n == 0 || m == 0) return cudaSuccess;
  if (n > 0x7fffffff || activation < 0 || activation > 2) return cudaErrorInvalidValue;
  return dispatch_float(type, [&](auto tag) {
    using In = decltype(tag);
    using T = typename MathOf<In>::type;
    auto go = [&](auto kernel) {
      kernel<<<static_cast<unsigned>(n), kRowThreads, 0, stream>>>(
          static_cast<In*>(z), static_cast<const In*>(bias), static_cast<const T*>(proj), y,
          static_cast<In*>(dz), static_cast<T*>(row_loss), static_cast<T*>(db), m, n);
      return cudaGetLastError();
    };
    switch (activation * 2 + (sign ? 1 : 0)) {
      case 0: return go(tp_rows_kernel<In, 0, false>);
      case 1: return go(tp_rows_kernel<In, 0, true>);
      case 2: return go(tp_rows_kernel<In, 1, false>);
      case 3: return go(tp_rows_kernel<In, 1, true>);
      case 4: return go(tp_rows_kernel<In, 2, false>);
      default: return go(tp_rows_kernel<In, 2, true>);
    }
  });
}

cudaError_t launch_local_sf_rows(FloatType type, void* z, const void* x, const void* bias,
                                 const void* emb, const int64_t* y, void* dz, void* dlogits,
                                 void* row_loss, void* db, int64_t n, int64_t m, int64_t d,
                                 int64_t k, double eps, double inv_temp, bool normalize,
                                 cudaStream_t stream) {
  if (n == 0 || m == 0) return cudaSuccess;
  if (n > 0x7fffffff || k < 1 || k > kSfMaxClasses) return cudaErrorInvalidValue;
  return dispatch_float(type, [&](auto tag) {
    using In = decltype(tag);
    using T = typename MathOf<In>::type;
    sf_rows_kernel<In><<<static_cast<unsigned>(n), kRowThreads, static_cast<size_t>(k) * sizeof(T),
                         stream>>>(
        static_cast<In*>(z), static_cast<const In*>(x), static_cast<const In*>(bias),
        static_cast<const T*>(emb), y, static_cast<In*>(dz), static_cast<T*>(dlogits),
        static_cast<T*>(row_loss), static_cast<T*>(db), m, d, k, n, eps, inv_temp, normalize);
    return cudaGetLastError();
  });
}

cudaError_t launch_local_pool(FloatType type, const void* feat, void* pooled, int64_t n,
                              int64_t c, int64_t s, cudaStream_t stream) {
  const int64_t rows = n * c;
  if (rows == 0) return cudaSuccess;
  return dispatch_float(type, [&](auto tag) {
    using In = decltype(tag);
    using T = typename MathOf<In>::type;
    pool_kernel<In><<<grid_for(rows, 256), 256, 0, stream>>>(
        static_cast<const In*>(feat), static_cast<T*>(pooled), rows, s);
    return cudaGetLastError();
  });
}

cudaError_t launch_local_ce_rows(bool f64, const void* logits, const int64_t* y, void* dlogits,
                                 void* row_loss, int64_t n, int64_t k, cudaStream_t stream) {
  if (n == 0 || k == 0) return cudaSuccess;
  if (f64) {
    ce_rows_kernel<double><<<grid_for(n, 128), 128, 0, stream>>>(
        static_cast<const double*>(logits), y, static_cast<double*>(dlogits),
        static_cast<double*>(row_loss), n, k);
  } else {
    ce_rows_kernel<float><<<grid_for(n, 128), 128, 0, stream>>>(
        static_cast<const float*>(logits), y, static_cast<float*>(dlogits),
        static_cast<float*>(row_loss), n, k);
  }
  return cudaGetLastError();
}

}  // namespace gpu
}  // namespace pypaper
