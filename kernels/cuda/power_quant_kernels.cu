// CUDA kernels of the power quantizer (PowerQuant / NUPES). Math: kernels/common/power_quant_math.h,
// shared with the CPU loops (kernels/cpu/power_quant_cpu.h). Grid: channels * blocks-per-channel
// blocks of kBlock threads; a block's threads first build the channel's tables in shared memory
// (thresholds rounded up to T, levels, and for the backward the unit level / d level / da in
// double), then stride over the block's slice of the row: a branch-free binary search in shared
// memory per element, no pow per element.
#include "power_quant_kernels.cuh"

#include <cuda_runtime.h>

#include <cstdint>

#include "../common/power_quant_math.h"

namespace pypaper {
namespace gpu {
namespace {

constexpr int kBlock = 256;
constexpr int64_t kPerBlock = 4096;  // elements of a row per block (at most)

template <typename T>
struct Tables {
  T thr[power::kMaxTable];
  T lvl[power::kMaxTable];
  double ulvl[power::kMaxTable];
  double ulda[power::kMaxTable];
};

// Threads k < P fill entry k of the channel's tables (ull: also the unit tables of the backward).
template <typename T, bool UNIT>
__device__ void build_tables(Tables<T>& tb, double m, double a, int qmax, int P) {
  const double inv_a = 1.0 / a;
  const bool ok = m > 0.0;
  for (int k = threadIdx.x; k < P; k += blockDim.x) {
    T t = static_cast<T>(INFINITY);
    if (k == 0) t = T(0);
    if (ok && k >= 1 && k <= qmax) t = power::ceil_to<T>(m * power::unit_threshold(k, qmax, inv_a));
    tb.thr[k] = t;
    const int kl = k <= qmax ? k : qmax;
    const double ul = power::unit_level(kl, qmax, inv_a);
    tb.lvl[k] = static_cast<T>((ok ? m : 0.0) * ul);
    if constexpr (UNIT) {
      tb.ulvl[k] = ul;
      tb.ulda[k] = power::unit_level_da(kl, qmax, inv_a);
    }
  }
}

struct Slice {
  int64_t c, begin, end;
};

__device__ __forceinline__ Slice slice_of(PowerShape s, int64_t per_channel_blocks) {
  const int64_t b = blockIdx.x;
  const int64_t c = b / per_channel_blocks;
  const int64_t j = b % per_channel_blocks;
  const int64_t begin = j * kPerBlock;
  const int64_t end = begin + kPerBlock < s.inner ? begin + kPerBlock : s.inner;
  return Slice{c, c * s.inner + begin, c * s.inner + end};
}

template <typename T>
__global__ void __launch_bounds__(kBlock)
    quantize_kernel(const T* __restrict__ x, int8_t* __restrict__ q, const T* __restrict__ m,
                    const double* __restrict__ ex, PowerShape s, int qmax, int P, int64_t bpc) {
  __shared__ Tables<T> tb;
  const Slice sl = slice_of(s, bpc);
  build_tables<T, false>(tb, static_cast<double>(m[sl.c]), ex[s.per_channel_exponent ? sl.c : 0],
                         qmax, P);
  __syncthreads();
  for (int64_t e = sl.begin + threadIdx.x; e < sl.end; e += blockDim.x) {
    const T v = x[e];
    q[e] = static_cast<int8_t>(power::signed_code(v, power::code_search<T>(fabs(v), tb.thr, P)));
  }
}

template <typename T>
__global__ void __launch_bounds__(kBlock)
    dequantize_kernel(const int8_t* __restrict__ q, T* __restrict__ y, const T* __restrict__ m,
                      const double* __restrict__ ex, PowerShape s, int qmax, int P, int64_t bpc) {
  __shared__ Tables<T> tb;
  const Slice sl = slice_of(s, bpc);
  build_tables<T, false>(tb, static_cast<double>(m[sl.c]), ex[s.per_channel_exponent ? sl.c : 0],
                         qmax, P);
  __syncthreads();
  for (int64_t e = sl.begin + threadIdx.x; e < sl.end; e += blockDim.x) {
    y[e] = power::level_of_code<T>(q[e], tb.lvl, qmax);
  }
}

template <typename T>
__global__ void __launch_bounds__(kBlock)
    fake_quantize_kernel(const T* __restrict__ x, T* __restrict__ y, const T* __restrict__ m,
                         const double* __restrict__ ex, PowerShape s, int qmax, int P,
                         int64_t bpc) {
  __shared__ Tables<T> tb;
  const Slice sl = slice_of(s, bpc);
  build_tables<T, false>(tb, static_cast<double>(m[sl.c]), ex[s.per_channel_exponent ? sl.c : 0],
                         qmax, P);
  __syncthreads();
  for (int64_t e = sl.begin + threadIdx.x; e < sl.end; e += blockDim.x) {
    const T v = x[e];
    y[e] = power::fake_value(v, tb.lvl[power::code_search<T>(fabs(v), tb.thr, P)]);
  }
}

__device__ __forceinline__ double block_sum(double v, double* scratch) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  double t = 0.0;
  if (threadIdx.x == 0) {
    for (int w = 0; w < (kBlock >> 5); ++w) t += scratch[w];
  }
  __syncthreads();
  return t;
}

template <typename T, bool NEED, bool STE>
__global__ void __launch_bounds__(kBlock)
    backward_kernel(const T* __restrict__ g, const T* __restrict__ x, T* __restrict__ dx,
                    const T* __restrict__ m, const double* __restrict__ ex, PowerShape s,
                    int qmax, int P, int64_t bpc, double* __restrict__ part_a,
                    double* __restrict__ part_m) {
  __shared__ Tables<T> tb;
  __shared__ double scratch[kBlock / 32];
  const Slice sl = slice_of(s, bpc);
  const T mc = m[sl.c];
  const double a = ex[s.per_channel_exponent ? sl.c : 0];
  if constexpr (NEED) {
    build_tables<T, true>(tb, static_cast<double>(mc), a, qmax, P);
    __syncthreads();
  }
  const double md = mc > T(0) ? static_cast<double>(mc) : 0.0;
  double sa = 0.0, sm = 0.0;
  for (int64_t e = sl.begin + threadIdx.x; e < sl.end; e += blockDim.x) {
    const T v = x[e];
    const T av = fabs(v);
    const T gv = g[e];
    dx[e] = av <= mc ? gv : T(0);
    if constexpr (NEED) {
      const int k = power::code_search<T>(av, tb.thr, P);
      const double gs = v < T(0) ? -static_cast<double>(gv) : static_cast<double>(gv);
      if constexpr (STE) {
        const power::SteTerms t =
            power::ste_terms<T>(av, k, mc, a, qmax, tb.ulvl[k], tb.ulda[k]);
        sa += gs * t.da;
        sm += gs * t.dm;
      } else {
        sa += gs * md * tb.ulda[k];
        sm += gs * tb.ulvl[k];
      }
    }
  }
  if constexpr (NEED) {
    const double ta = block_sum(sa, scratch);
    const double tm = block_sum(sm, scratch);
    if (threadIdx.x == 0) {
      part_a[blockIdx.x] = ta;
      part_m[blockIdx.x] = tm;
    }
  }
}

bool nothing_to_do(PowerShape s) { return s.channels <= 0 || s.inner <= 0; }

dim3 grid_of(PowerShape s) {
  return dim3(static_cast<unsigned>(s.channels * power_blocks_per_channel(s.inner)));
}

}  // namespace

int64_t power_blocks_per_channel(int64_t inner) {
  return inner <= 0 ? 0 : (inner + kPerBlock - 1) / kPerBlock;
}

cudaError_t launch_power_quantize(bool is_double, const void* x, int8_t* q, const void* m,
                                  const double* exponents, PowerShape s, int qmax,
                                  cudaStream_t stream) {
  if (nothing_to_do(s)) return cudaSuccess;
  const int P = power::table_pow2(qmax);
  const int64_t bpc = power_blocks_per_channel(s.inner);
  if (is_double) {
    quantize_kernel<double><<<grid_of(s), kBlock, 0, stream>>>(
        static_cast<const double*>(x), q, static_cast<const double*>(m), exponents, s, qmax, P, bpc);
  } else {
    quantize_kernel<float><<<grid_of(s), kBlock, 0, stream>>>(
        static_cast<const float*>(x), q, static_cast<const float*>(m), exponents, s, qmax, P, bpc);
  }
  return cudaGetLastError();
}

cudaError_t launch_power_dequantize(bool is_double, const int8_t* q, void* y, const void* m,
                                    const double* exponents, PowerShape s, int qmax,
                                    cudaStream_t stream) {
  if (nothing_to_do(s)) return cudaSuccess;
  const int P = power::table_pow2(qmax);
  const int64_t bpc = power_blocks_per_channel(s.inner);
  if (is_double) {
    dequantize_kernel<double><<<grid_of(s), kBlock, 0, stream>>>(
        q, static_cast<double*>(y), static_cast<const double*>(m), exponents, s, qmax, P, bpc);
  } else {
    dequantize_kernel<float><<<grid_of(s), kBlock, 0, stream>>>(
        q, static_cast<float*>(y), static_cast<const float*>(m), exponents, s, qmax, P, bpc);
  }
  return cudaGetLastError();
}

cudaError_t launch_power_fake_quantize(bool is_double, const void* x, void* y, const void* m,
                                       const double* exponents, PowerShape s, int qmax,
                                       cudaStream_t stream) {
  if (nothing_to_do(s)) return cudaSuccess;
  const int P = power::table_pow2(qmax);
  const int64_t bpc = power_blocks_per_channel(s.inner);
  if (is_double) {
    fake_quantize_kernel<double><<<grid_of(s), kBlock, 0, stream>>>(
        static_cast<const double*>(x), static_cast<double*>(y), static_cast<const double*>(m),
        exponents, s, qmax, P, bpc);
  } else {
    fake_quantize_kernel<float><<<grid_of(s), kBlock, 0, stream>>>(
        static_cast<const float*>(x), static_cast<float*>(y), static_cast<const float*>(m),
        exponents, s, qmax, P, bpc);
  }
  return cudaGetLastError();
}

template <typename T>
static void launch_bwd(const void* g, const void* x, void* dx, const void* m, const double* ex,
                       PowerShape s, int qmax, bool ste, double* pa, double* pm,
                       cudaStream_t stream) {
  const int P = power::table_pow2(qmax);
  const int64_t bpc = power_blocks_per_channel(s.inner);
  const T* gp = static_cast<const T*>(g);
  const T* xp = static_cast<const T*>(x);
  T* dxp = static_cast<T*>(dx);
  const T* mp = static_cast<const T*>(m);
  if (pa == nullptr) {
    backward_kernel<T, false, false><<<grid_of(s), kBlock, 0, stream>>>(gp, xp, dxp, mp, ex, s,
                                                                       qmax, P, bpc, pa, pm);
  } else if (ste) {
    backward_kernel<T, true, true><<<grid_of(s), kBlock, 0, stream>>>(gp, xp, dxp, mp, ex, s,
                                                                     qmax, P, bpc, pa, pm);
  } else {
    backward_kernel<T, true, false><<<grid_of(s), kBlock, 0, stream>>>(gp, xp, dxp, mp, ex, s,
                                                                      qmax, P, bpc, pa, pm);
  }
}

cudaError_t launch_power_fake_quantize_backward(bool is_double, const void* g, const void* x,
                                                void* dx, const void* m, const double* exponents,
                                                PowerShape s, int qmax, bool ste, double* part_a,
                                                double* part_m, cudaStream_t stream) {
  if (nothing_to_do(s)) return cudaSuccess;
  if (is_double) {
    launch_bwd<double>(g, x, dx, m, exponents, s, qmax, ste, part_a, part_m, stream);
  } else {
    launch_bwd<float>(g, x, dx, m, exponents, s, qmax, ste, part_a, part_m, stream);
  }
  return cudaGetLastError();
}

}  // namespace gpu
}  // namespace pypaper
