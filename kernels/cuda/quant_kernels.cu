// CUDA kernels of uniform affine quantization; contract in quant_kernels.cuh, math in
// kernels/common/quant_math.h (shared with the CPU loops, so the CPU tests check this math).
//
// Work is split into "units" of VEC consecutive elements: VEC fills 16 bytes of the float type
// when `inner` is a multiple of VEC and the pointers are aligned, else VEC = 1. A unit then never
// straddles two channels, so one (scale, zero point) serves all of it. Grid-stride loops step the
// channel (u / inner) % channels along with u, without divisions (Walk). When the grid stride is
// a multiple of the channel period inner * channels (or there is one channel, or at most one
// unit per thread) a thread keeps one channel for its whole loop ("fixed" plan): s, 1/s and z are
// loaded once, and the backward sums stay in registers until the end of the kernel.
//
// Exactness: products and sums go through quant::mul_rn / add_rn (never contracted into FMAs),
// 1/s is the IEEE-rounded quotient (__fdiv_rn / __ddiv_rn, as 1.0f / s on the host), storage
// conversions round to nearest even, so every element is bit-identical to the CPU kernel.
#include "quant_kernels.cuh"
#include "device_common.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "../common/hash_rng.h"
#include "../common/quant_math.h"

// flash-attention style compile-time dispatch of a runtime bool.
#define PYPAPER_BOOL_SWITCH(COND, NAME, ...)  \
  [&] {                                       \
    if (COND) {                               \
      constexpr static bool NAME = true;      \
      return __VA_ARGS__();                   \
    } else {                                  \
      constexpr static bool NAME = false;     \
      return __VA_ARGS__();                   \
    }                                         \
  }()

namespace pypaper {
namespace gpu {
namespace {

using quant::QuantLayout;

constexpr int kBlock = 256;
constexpr int kBlocksPerSM = 8;          // 2048 resident threads per SM on sm_80 and sm_90
constexpr int64_t kSmemChannels = 1024;  // backward sums staged in shared memory up to this
constexpr unsigned kFullMask = 0xffffffffu;

// ---- storage and math types --------------------------------------------------------------------

__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }

// ---- channel bookkeeping -----------------------------------------------------------------------

// Channel of unit u, (u / inner) % channels, stepped by `stride` units without divisions.
struct Walk {
  int64_t inner, channels, stride;
  int64_t d_in, d_row, d_ch;  // stride % inner, stride / inner, (stride / inner) % channels
};

struct Pos {
  int64_t in, row, ch;

  __device__ __forceinline__ void start(const Walk& w, int64_t u) {
    row = u / w.inner;
    in = u - row * w.inner;
    ch = row % w.channels;
  }
  __device__ __forceinline__ void next(const Walk& w) {
    in += w.d_in;
    const int64_t carry = in >= w.inner ? 1 : 0;
    in -= carry * w.inner;
    row += w.d_row + carry;
    ch += w.d_ch + carry;  // < 2 * channels
    if (ch >= w.channels) ch -= w.channels;
  }
};

// s, 1/s and the effective zero point of one channel, reloaded only when the channel changes.
template <typename T>
struct ChannelParams {
  T s = T(1), inv = T(1), z = T(0);
  int64_t c = -1;

  template <bool INV = true>
  __device__ __forceinline__ void load(const T* scale, const T* zero_point, int64_t ch, T qmin,
                                       T qmax) {
    if (ch == c) return;
    c = ch;
    s = scale[ch];
    if constexpr (INV) inv = div_rn(T(1), s);  // x * (1/s), as torch and the CPU kernel
    z = quant::effective_zero_point(zero_point[ch], qmin, qmax);
  }
};

template <bool STOCHASTIC>
__device__ __forceinline__ rng::Key key_of(const int64_t* seed) {
  if constexpr (STOCHASTIC) {
    return rng::make_key(*seed);
  } else {
    return rng::Key{0u, 0u};
  }
}

// Unclamped code of element e (flat index: the counter of its uniform).
template <bool STOCHASTIC, typename T>
__device__ __forceinline__ T make_code(T x, const ChannelParams<T>& p, rng::Key key, int64_t e) {
  if constexpr (STOCHASTIC) {
    const T u = static_cast<T>(rng::uniform01(key, static_cast<uint64_t>(e)));
    return quant::code_stochastic(x, p.inv, p.z, u);
  } else {
    return quant::code_nearest(x, p.inv, p.z);
  }
}

// Stored code: clamp(code); a NaN input has no code and is stored as the zero point.
template <typename T>
__device__ __forceinline__ int32_t stored_code(T x, const ChannelParams<T>& p, T qmin, T qmax) {
  const T code = quant::code_nearest(x, p.inv, p.z);
  return static_cast<int32_t>(code == code ? quant::clamp(code, qmin, qmax) : p.z);
}

// ---- forward -----------------------------------------------------------------------------------

template <typename In, int VEC, bool STOCHASTIC>
__global__ void __launch_bounds__(kBlock)
    fake_quantize_kernel(const In* __restrict__ x, In* __restrict__ y,
                         const typename MathOf<In>::type* __restrict__ scale,
                         const typename MathOf<In>::type* __restrict__ zero_point, Walk w,
                         int64_t units, int32_t qmin_i, int32_t qmax_i,
                         const int64_t* __restrict__ seed) {
  using T = typename MathOf<In>::type;
  const T qmin = static_cast<T>(qmin_i), qmax = static_cast<T>(qmax_i);
  const int64_t t = global_thread();
  if (t >= w.stride) return;  // a fixed plan may launch a few threads past the stride
  const rng::Key key = key_of<STOCHASTIC>(seed);
  Pos pos;
  pos.start(w, t);
  ChannelParams<T> p;
  for (int64_t u = t; u < units; u += w.stride, pos.next(w)) {
    p.load(scale, zero_point, pos.ch, qmin, qmax);
    const Pack<In, VEC> in = load_pack<VEC>(x + u * VEC);
    Pack<In, VEC> out;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const T code = make_code<STOCHASTIC>(static_cast<T>(to_math(in.v[k])), p, key, u * VEC + k);
      store(out.v[k], quant::fake_quant_value(code, p.z, p.s, qmin, qmax));
    }
    store_pack<VEC>(y + u * VEC, out);
  }
}

// ---- backward ----------------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

// Where per-channel partial sums go: shared memory (few channels; added to the fp64 sums once per
// block) or the fp64 global sums directly. Zeros are skipped: in-range elements have dz = 0.
template <typename T, bool SMEM>
struct Sink {
  T* sh_ds;
  T* sh_dz;
  double* ds;
  double* dz;

  __device__ __forceinline__ void add(int64_t c, T vs, T vz) const {
    if constexpr (SMEM) {
      if (vs != T(0)) atomicAdd(sh_ds + c, vs);
      if (vz != T(0)) atomicAdd(sh_dz + c, vz);
    } else {
      if (vs != T(0)) atomicAdd(ds + c, static_cast<double>(vs));
      if (vz != T(0)) atomicAdd(dz + c, static_cast<double>(vz));
    }
  }
};

// Whole warp, one channel: one add per warp.
template <typename T, bool SMEM>
__device__ __forceinline__ void warp_add_one(const Sink<T, SMEM>& sink, T vs, T vz, int64_t c) {
  vs = warp_sum(vs);
  vz = warp_sum(vz);
  if ((threadIdx.x & 31) == 0) sink.add(c, vs, vz);
}

// Segmented warp sum: lanes of equal `row` form contiguous runs (row -1: nothing to add, only at
// the tail). After the shuffles the first lane of a run holds the run's total (by induction, lane
// i holds the sum over [i, i + 2^k) of its run) and adds it to channel row % channels.
template <typename T, bool SMEM>
__device__ __forceinline__ void warp_add_rows(const Sink<T, SMEM>& sink, T vs, T vz, int64_t row,
                                              int64_t channels) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const T os = __shfl_down_sync(kFullMask, vs, off);
    const T oz = __shfl_down_sync(kFullMask, vz, off);
    const int64_t orow = __shfl_down_sync(kFullMask, row, off);
    if (lane + off < 32 && orow == row) {
      vs += os;
      vz += oz;
    }
  }
  const int64_t prev = __shfl_up_sync(kFullMask, row, 1);
  if (row >= 0 && (lane == 0 || prev != row)) sink.add(row % channels, vs, vz);
}

// dx = STE gradient; with NEED_SZ the LSQ terms of (scale, zero point) summed per channel into
// ds_sum / dz_sum (fp64, zeroed by the caller). Partial sums are in the math type T, as the CPU
// kernel's per-task sums.
template <typename In, int VEC, bool STOCHASTIC, bool NEED_SZ, bool SMEM>
__global__ void __launch_bounds__(kBlock)
    fake_quantize_backward_kernel(const In* __restrict__ dy, const In* __restrict__ x,
                                  In* __restrict__ dx,
                                  const typename MathOf<In>::type* __restrict__ scale,
                                  const typename MathOf<In>::type* __restrict__ zero_point, Walk w,
                                  int64_t units, bool fixed, int32_t qmin_i, int32_t qmax_i,
                                  const int64_t* __restrict__ seed, double* __restrict__ ds_sum,
                                  double* __restrict__ dz_sum) {
  using T = typename MathOf<In>::type;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* const sh = reinterpret_cast<T*>(smem_raw);
  const Sink<T, SMEM> sink{sh, sh + (SMEM ? w.channels : 0), ds_sum, dz_sum};
  if constexpr (SMEM) {
    for (int64_t c = threadIdx.x; c < w.channels; c += blockDim.x) {
      sink.sh_ds[c] = T(0);
      sink.sh_dz[c] = T(0);
    }
    __syncthreads();
  }

  const T qmin = static_cast<T>(qmin_i), qmax = static_cast<T>(qmax_i);
  const int64_t t = global_thread();
  const int lane = threadIdx.x & 31;
  const rng::Key key = key_of<STOCHASTIC>(seed);
  Pos pos;
  pos.start(w, t);
  ChannelParams<T> p;

  // dx of unit u; its dscale / dzero_point terms added to (vs, vz).
  auto unit = [&](int64_t u, T& vs, T& vz) {
    p.load(scale, zero_point, pos.ch, qmin, qmax);
    const Pack<In, VEC> gv = load_pack<VEC>(dy + u * VEC);
    const Pack<In, VEC> xv = load_pack<VEC>(x + u * VEC);
    Pack<In, VEC> out;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const T xk = static_cast<T>(to_math(xv.v[k]));
      const T code = make_code<STOCHASTIC>(xk, p, key, u * VEC + k);
      const auto g = quant::fake_quant_grad(static_cast<T>(to_math(gv.v[k])), xk, code, p.z, p.s,
                                            p.inv, qmin, qmax);
      store(out.v[k], g.dx);
      if constexpr (NEED_SZ) {
        vs += g.dscale;
        vz += g.dzero_point;
      }
    }
    store_pack<VEC>(dx + u * VEC, out);
  };

  T acc_s = T(0), acc_z = T(0);
  if (!NEED_SZ || fixed) {
    // One channel per thread for the whole loop: sums stay in registers until the end.
    if (t < w.stride) {
      for (int64_t u = t; u < units; u += w.stride, pos.next(w)) unit(u, acc_s, acc_z);
    }
    if constexpr (NEED_SZ) {
      const bool has = t < w.stride && t < units;
      warp_add_rows(sink, acc_s, acc_z, has ? t / w.inner : int64_t(-1), w.channels);
    }
  } else if constexpr (NEED_SZ) {
    // The stride is the whole grid (a multiple of 32): the warp walks in step. A warp whose lanes
    // share a channel keeps summing in registers while that channel lasts (one add per change);
    // a warp spanning channels adds one total per row run.
    int64_t cur = -1;  // channel of acc, the same in every lane; -1: none
    for (int64_t base = t - lane; base < units; base += w.stride) {
      const int64_t u = base + lane;
      const bool active = u < units;
      T vs = T(0), vz = T(0);
      if (active) unit(u, vs, vz);
      const int64_t c0 = __shfl_sync(kFullMask, pos.ch, 0);  // lane 0 is active
      if (__all_sync(kFullMask, !active || pos.ch == c0)) {
        if (c0 != cur) {
          if (cur >= 0) warp_add_one(sink, acc_s, acc_z, cur);
          acc_s = T(0);
          acc_z = T(0);
          cur = c0;
        }
        acc_s += vs;
        acc_z += vz;
      } else {
        if (cur >= 0) {
          warp_add_one(sink, acc_s, acc_z, cur);
          acc_s = T(0);
          acc_z = T(0);
          cur = -1;
        }
        warp_add_rows(sink, vs, vz, active ? pos.row : int64_t(-1), w.channels);
      }
      pos.next(w);
    }
    if (cur >= 0) warp_add_one(sink, acc_s, acc_z, cur);
  }

  if constexpr (SMEM) {
    __syncthreads();
    for (int64_t c = threadIdx.x; c < w.channels; c += blockDim.x) {
      if (sink.sh_ds[c] != T(0)) atomicAdd(ds_sum + c, static_cast<double>(sink.sh_ds[c]));
      if (sink.sh_dz[c] != T(0)) atomicAdd(dz_sum + c, static_cast<double>(sink.sh_dz[c]));
    }
  }
}

// ---- quantize / dequantize ---------------------------------------------------------------------

template <typename In, typename Code, int VEC>
__global__ void __launch_bounds__(kBlock)
    quantize_kernel(const In* __restrict__ x, Code* __restrict__ q,
                    const typename MathOf<In>::type* __restrict__ scale,
                    const typename MathOf<In>::type* __restrict__ zero_point, Walk w,
                    int64_t units, int32_t qmin_i, int32_t qmax_i) {
  using T = typename MathOf<In>::type;
  const T qmin = static_cast<T>(qmin_i), qmax = static_cast<T>(qmax_i);
  const int64_t t = global_thread();
  if (t >= w.stride) return;
  Pos pos;
  pos.start(w, t);
  ChannelParams<T> p;
  for (int64_t u = t; u < units; u += w.stride, pos.next(w)) {
    p.load(scale, zero_point, pos.ch, qmin, qmax);
    const Pack<In, VEC> in = load_pack<VEC>(x + u * VEC);
    Pack<Code, VEC> out;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      out.v[k] = static_cast<Code>(stored_code(static_cast<T>(to_math(in.v[k])), p, qmin, qmax));
    }
    store_pack<VEC>(q + u * VEC, out);
  }
}

template <typename Code, typename Out, int VEC>
__global__ void __launch_bounds__(kBlock)
    dequantize_kernel(const Code* __restrict__ q, Out* __restrict__ y,
                      const typename MathOf<Out>::type* __restrict__ scale,
                      const typename MathOf<Out>::type* __restrict__ zero_point, Walk w,
                      int64_t units, int32_t qmin_i, int32_t qmax_i) {
  using T = typename MathOf<Out>::type;
  const T qmin = static_cast<T>(qmin_i), qmax = static_cast<T>(qmax_i);
  const int64_t t = global_thread();
  if (t >= w.stride) return;
  Pos pos;
  pos.start(w, t);
  ChannelParams<T> p;
  for (int64_t u = t; u < units; u += w.stride, pos.next(w)) {
    p.template load<false>(scale, zero_point, pos.ch, qmin, qmax);
    const Pack<Code, VEC> in = load_pack<VEC>(q + u * VEC);
    Pack<Out, VEC> out;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      store(out.v[k], quant::mul_rn(static_cast<T>(in.v[k]) - p.z, p.s));
    }
    store_pack<VEC>(y + u * VEC, out);
  }
}

// One output byte per iteration: codes of elements 2j and 2j + 1 of a row.
template <typename In>
__global__ void __launch_bounds__(kBlock)
    quantize_packed_kernel(const In* __restrict__ x, uint8_t* __restrict__ q,
                           const typename MathOf<In>::type* __restrict__ scale,
                           const typename MathOf<In>::type* __restrict__ zero_point,
                           QuantLayout L, int32_t qmin_i, int32_t qmax_i, int64_t last_dim,
                           int64_t nbytes) {
  using T = typename MathOf<In>::type;
  const T qmin = static_cast<T>(qmin_i), qmax = static_cast<T>(qmax_i);
  const int64_t packed = (last_dim + 1) / 2;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  ChannelParams<T> p;
  for (int64_t b = global_thread(); b < nbytes; b += stride) {
    const int64_t r = b / packed;
    const int64_t l = 2 * (b - r * packed);
    const int64_t e = r * last_dim + l;
    p.load(scale, zero_point, L.channel_of(e), qmin, qmax);
    const int32_t lo = stored_code(static_cast<T>(to_math(x[e])), p, qmin, qmax);
    int32_t hi = 0;
    if (l + 1 < last_dim) {
      p.load(scale, zero_point, L.channel_of(e + 1), qmin, qmax);
      hi = stored_code(static_cast<T>(to_math(x[e + 1])), p, qmin, qmax);
    }
    q[b] = quant::pack_nibbles(lo, hi);
  }
}

// One output element per iteration.
template <typename Out>
__global__ void __launch_bounds__(kBlock)
    dequantize_packed_kernel(const uint8_t* __restrict__ q, Out* __restrict__ y,
                             const typename MathOf<Out>::type* __restrict__ scale,
                             const typename MathOf<Out>::type* __restrict__ zero_point,
                             QuantLayout L, int32_t qmin_i, int32_t qmax_i, int64_t last_dim,
                             int64_t numel) {
  using T = typename MathOf<Out>::type;
  const T qmin = static_cast<T>(qmin_i), qmax = static_cast<T>(qmax_i);
  const bool is_signed = qmin_i < 0;
  const int64_t packed = (last_dim + 1) / 2;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  ChannelParams<T> p;
  for (int64_t e = global_thread(); e < numel; e += stride) {
    const int64_t r = e / last_dim;
    const int64_t l = e - r * last_dim;
    p.template load<false>(scale, zero_point, L.channel_of(e), qmin, qmax);
    const int32_t code =
        quant::unpack_nibble(q[r * packed + l / 2], static_cast<int>(l & 1), is_signed);
    store(y[e], quant::mul_rn(static_cast<T>(code) - p.z, p.s));
  }
}

// ---- launch planning ---------------------------------------------------------------------------

struct Plan {
  Walk walk;
  unsigned blocks;
  bool fixed;  // every thread keeps one channel (see the top of the file)
};

// Grid over the units of a non-empty tensor, about one wave of resident threads.
Plan make_plan(const QuantLayout& L, int vec, int sms) {
  const int64_t units = L.numel() / vec;
  const int64_t inner = L.inner / vec;
  const int64_t channels = L.channels;
  const int64_t target = static_cast<int64_t>(sms) * kBlocksPerSM * kBlock;  // multiple of 32
  const int64_t period = inner * channels;
  int64_t stride = target;
  bool fixed = true;
  if (units <= target) {
    stride = units;  // at most one unit per thread
  } else if (channels == 1) {
    stride = target;
  } else if (period <= target) {
    stride = target / period * period;  // a multiple of the period, more than half the target
  } else {
    fixed = false;  // stride = target: the whole grid
  }
  Plan p;
  p.walk = Walk{inner, channels, stride, stride % inner, stride / inner, (stride / inner) % channels};
  p.blocks = static_cast<unsigned>((stride + kBlock - 1) / kBlock);
  p.fixed = fixed;
  return p;
}

unsigned flat_blocks(int64_t n, int sms) {
  const int64_t want = (n + kBlock - 1) / kBlock;
  const int64_t cap = static_cast<int64_t>(sms) * kBlocksPerSM;
  return static_cast<unsigned>(want < cap ? want : cap);
}

bool aligned(const void* p, int bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

template <typename In>
constexpr int kVec = static_cast<int>(16 / sizeof(In));

}  // namespace

// ---- launchers ---------------------------------------------------------------------------------

cudaError_t launch_fake_quantize(FloatType type, const void* x, void* y, const void* scale,
                                 const void* zero_point, QuantLayout layout, int32_t qmin,
                                 int32_t qmax, const int64_t* seed, cudaStream_t stream) {
  if (layout.numel() == 0) return cudaSuccess;
  int sms = 0;
  cudaError_t err = sm_count(&sms);
  if (err != cudaSuccess) return err;
  return dispatch_float(type, [&](auto tag) {
    using In = decltype(tag);
    using T = typename MathOf<In>::type;
    const bool vec = layout.inner % kVec<In> == 0 && aligned(x, 16) && aligned(y, 16);
    return PYPAPER_BOOL_SWITCH(vec, USE_VEC, [&] {
      constexpr int VEC = USE_VEC ? kVec<In> : 1;
      return PYPAPER_BOOL_SWITCH(seed != nullptr, STOCHASTIC, [&] {
        const Plan pl = make_plan(layout, VEC, sms);
        fake_quantize_kernel<In, VEC, STOCHASTIC><<<pl.blocks, kBlock, 0, stream>>>(
            static_cast<const In*>(x), static_cast<In*>(y), static_cast<const T*>(scale),
            static_cast<const T*>(zero_point), pl.walk, layout.numel() / VEC, qmin, qmax, seed);
        return cudaGetLastError();
      });
    });
  });
}

cudaError_t launch_fake_quantize_backward(FloatType type, const void* dy, const void* x, void* dx,
                                          const void* scale, const void* zero_point,
                                          QuantLayout layout, int32_t qmin, int32_t qmax,
                                          const int64_t* seed, double* ds_sum, double* dz_sum,
                                          cudaStream_t stream) {
  if (layout.numel() == 0) return cudaSuccess;
  if ((ds_sum == nullptr) != (dz_sum == nullptr)) return cudaErrorInvalidValue;
  int sms = 0;
  cudaError_t err = sm_count(&sms);
  if (err != cudaSuccess) return err;
  const bool need_sz = ds_sum != nullptr;
  const bool smem = need_sz && layout.channels <= kSmemChannels;
  return dispatch_float(type, [&](auto tag) {
    using In = decltype(tag);
    using T = typename MathOf<In>::type;
    const bool vec = layout.inner % kVec<In> == 0 && aligned(dy, 16) && aligned(x, 16) &&
                     aligned(dx, 16);
    return PYPAPER_BOOL_SWITCH(vec, USE_VEC, [&] {
      constexpr int VEC = USE_VEC ? kVec<In> : 1;
      return PYPAPER_BOOL_SWITCH(seed != nullptr, STOCHASTIC, [&] {
        const Plan pl = make_plan(layout, VEC, sms);
        // (NEED_SZ, SMEM): no sums; sums to global fp64; sums staged in shared memory.
        auto go = [&](auto need_tag, auto smem_tag) {
          constexpr bool NEED_SZ = decltype(need_tag)::value;
          constexpr bool SMEM = decltype(smem_tag)::value;
          const size_t shmem = SMEM ? 2 * static_cast<size_t>(layout.channels) * sizeof(T) : 0;
          fake_quantize_backward_kernel<In, VEC, STOCHASTIC, NEED_SZ, SMEM>
              <<<pl.blocks, kBlock, shmem, stream>>>(
                  static_cast<const In*>(dy), static_cast<const In*>(x), static_cast<In*>(dx),
                  static_cast<const T*>(scale), static_cast<const T*>(zero_point), pl.walk,
                  layout.numel() / VEC, pl.fixed, qmin, qmax, seed, ds_sum, dz_sum);
          return cudaGetLastError();
        };
        if (!need_sz) return go(std::false_type{}, std::false_type{});
        if (smem) return go(std::true_type{}, std::true_type{});
        return go(std::true_type{}, std::false_type{});
      });
    });
  });
}

cudaError_t launch_quantize(FloatType type, const void* x, void* q, const void* scale,
                            const void* zero_point, QuantLayout layout, int32_t qmin,
                            int32_t qmax, cudaStream_t stream) {
  if (layout.numel() == 0) return cudaSuccess;
  int sms = 0;
  cudaError_t err = sm_count(&sms);
  if (err != cudaSuccess) return err;
  return dispatch_float(type, [&](auto tag) {
    using In = decltype(tag);
    using T = typename MathOf<In>::type;
    const bool vec =
        layout.inner % kVec<In> == 0 && aligned(x, 16) && aligned(q, kVec<In>);
    return PYPAPER_BOOL_SWITCH(vec, USE_VEC, [&] {
      constexpr int VEC = USE_VEC ? kVec<In> : 1;
      return PYPAPER_BOOL_SWITCH(qmin < 0, SIGNED, [&] {
        using Code = std::conditional_t<SIGNED, int8_t, uint8_t>;
        const Plan pl = make_plan(layout, VEC, sms);
        quantize_kernel<In, Code, VEC><<<pl.blocks, kBlock, 0, stream>>>(
            static_cast<const In*>(x), static_cast<Code*>(q), static_cast<const T*>(scale),
            static_cast<const T*>(zero_point), pl.walk, layout.numel() / VEC, qmin, qmax);
        return cudaGetLastError();
      });
    });
  });
}

cudaError_t launch_quantize_packed(FloatType type, const void* x, uint8_t* q, const void* scale,
                                   const void* zero_point, QuantLayout layout, int32_t qmin,
                                   int32_t qmax, int64_t last_dim, cudaStream_t stream) {
  const int64_t numel = layout.numel();
  if (numel == 0 || last_dim <= 0) return cudaSuccess;
  const int64_t nbytes = numel / last_dim * ((last_dim + 1) / 2);
  int sms = 0;
  cudaError_t err = sm_count(&sms);
  if (err != cudaSuccess) return err;
  return dispatch_float(type, [&](auto tag) {
    using In = decltype(tag);
    using T = typename MathOf<In>::type;
    quantize_packed_kernel<In><<<flat_blocks(nbytes, sms), kBlock, 0, stream>>>(
        static_cast<const In*>(x), q, static_cast<const T*>(scale),
        static_cast<const T*>(zero_point), layout, qmin, qmax, last_dim, nbytes);
    return cudaGetLastError();
  });
}

cudaError_t launch_dequantize(FloatType out_type, const void* q, void* y, const void* scale,
                              const void* zero_point, QuantLayout layout, int32_t qmin,
                              int32_t qmax, cudaStream_t stream) {
  if (layout.numel() == 0) return cudaSuccess;
  int sms = 0;
  cudaError_t err = sm_count(&sms);
  if (err != cudaSuccess) return err;
  return dispatch_float(out_type, [&](auto tag) {
    using Out = decltype(tag);
    using T = typename MathOf<Out>::type;
    const bool vec =
        layout.inner % kVec<Out> == 0 && aligned(q, kVec<Out>) && aligned(y, 16);
    return PYPAPER_BOOL_SWITCH(vec, USE_VEC, [&] {
      constexpr int VEC = USE_VEC ? kVec<Out> : 1;
      return PYPAPER_BOOL_SWITCH(qmin < 0, SIGNED, [&] {
        using Code = std::conditional_t<SIGNED, int8_t, uint8_t>;
        const Plan pl = make_plan(layout, VEC, sms);
        dequantize_kernel<Code, Out, VEC><<<pl.blocks, kBlock, 0, stream>>>(
            static_cast<const Code*>(q), static_cast<Out*>(y), static_cast<const T*>(scale),
            static_cast<const T*>(zero_point), pl.walk, layout.numel() / VEC, qmin, qmax);
        return cudaGetLastError();
      });
    });
  });
}

cudaError_t launch_dequantize_packed(FloatType out_type, const uint8_t* q, void* y,
                                     const void* scale, const void* zero_point,
                                     QuantLayout layout, int32_t qmin, int32_t qmax,
                                     int64_t last_dim, cudaStream_t stream) {
  const int64_t numel = layout.numel();
  if (numel == 0 || last_dim <= 0) return cudaSuccess;
  int sms = 0;
  cudaError_t err = sm_count(&sms);
  if (err != cudaSuccess) return err;
  return dispatch_float(out_type, [&](auto tag) {
    using Out = decltype(tag);
    using T = typename MathOf<Out>::type;
    dequantize_packed_kernel<Out><<<flat_blocks(numel, sms), kBlock, 0, stream>>>(
        q, static_cast<Out*>(y), static_cast<const T*>(scale), static_cast<const T*>(zero_point),
        layout, qmin, qmax, last_dim, numel);
    return cudaGetLastError();
  });
}

}  // namespace gpu
}  // namespace pypaper
