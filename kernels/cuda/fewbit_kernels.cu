// CUDA kernels of the few-bit backward activations (Novikov et al., "Few-Bit Backward", ICML
// 2023); contract in fewbit_kernels.cuh. The code of an element (pypaper::fewbit::code_of) and the
// packed layout are kernels/common/fewbit_pack.h, shared with the CPU loops, so the CPU tests
// check this math. Both kernels are memory-bound streams (x in, b/8 bytes per element out; dy and
// b/8 bytes in, dx out).
//
// Pack: the layout's 32-element block is a warp. Lane j computes the code c_j of element 32B + j,
// and plane k of the block (bit k of the 32 codes, one uint32 word) is __ballot_sync(c_j >> k & 1):
// one instruction per plane, no shared memory, no atomics. A warp takes kTile consecutive blocks
// per step (kTile independent loads in flight per lane); their kTile * b words are contiguous in
// the stream, and lane l stores word l: one coalesced store. The last partial block (r < 32
// elements) has bit k of element j at bit k*r + j: the planes, masked to r bits, are concatenated
// at offsets k*r into a 128-bit register pair (b*r <= 124 bits), and lane i writes byte i of the
// ceil(b*r/8) tail bytes - the bytes of pack_tail in kernels/cpu/fewbit_cpu.h.
//
// Backward: one thread per VEC consecutive elements (16 bytes of dy / dx when aligned, else one
// element), all in one block, so its code bits sit in the same b plane words; the 32/VEC threads
// of a block read the same words (broadcast loads). code = sum_k (word_k >> j & 1) << k, which is
// read_code for a full block; the partial block goes through read_code itself. levels (<= 16) are
// staged in shared memory; dx = levels[code] * dy is one multiply in the math type and one
// round-to-nearest-even to the storage type, as the CPU loop (nothing to contract into an FMA),
// or 0 where the level is 0 (fewbit::scale_grad: a select, as torch's ReLU backward).
#include "fewbit_kernels.cuh"
#include "device_common.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/fewbit_pack.h"

namespace pypaper {
namespace gpu {
namespace {

using fewbit::kMaxBits;

constexpr int kThreads = 256;
constexpr int kBlocksPerSM = 8;  // 8 x 256 = 2048 resident threads per SM on sm_80 and sm_90
constexpr int kTile = 4;         // layout blocks per warp step in the pack kernel
constexpr unsigned kFullMask = 0xffffffffu;

// ---- storage and math types --------------------------------------------------------------------

// +inf pads the border list to a compile-time length, so that the compare loop unrolls over
// registers; code_padded counts only the nb real borders (a NaN x is above every border,
// padding included), which is fewbit::code_of on the nb borders.
__device__ __forceinline__ void set_inf(float& v) { v = __int_as_float(0x7f800000); }
__device__ __forceinline__ void set_inf(double& v) {
  v = __longlong_as_double(0x7ff0000000000000LL);
}

template <int MAXB, bool FOLD, typename T>
__device__ __forceinline__ int code_padded(T x, const T (&bord)[MAXB], int nb) {
  int p = 0;
#pragma unroll
  for (int j = 0; j < MAXB; ++j) p += (j < nb && !(x <= bord[j])) ? 1 : 0;
  return FOLD ? (p & 1) : p;
}

// A plane word at p, little-endian (the stream order; the GPU is little-endian too).
__device__ __forceinline__ uint32_t load_word(const uint8_t* p, bool aligned4) {
  if (aligned4) return *reinterpret_cast<const uint32_t*>(p);
  return static_cast<uint32_t>(p[0]) | (static_cast<uint32_t>(p[1]) << 8) |
         (static_cast<uint32_t>(p[2]) << 16) | (static_cast<uint32_t>(p[3]) << 24);
}

__device__ __forceinline__ void store_word(uint8_t* p, uint32_t w, bool aligned4) {
  if (aligned4) {
    *reinterpret_cast<uint32_t*>(p) = w;
    return;
  }
  p[0] = static_cast<uint8_t>(w);
  p[1] = static_cast<uint8_t>(w >> 8);
  p[2] = static_cast<uint8_t>(w >> 16);
  p[3] = static_cast<uint8_t>(w >> 24);
}

__device__ __forceinline__ int64_t grid_threads() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x;
}

// bits [s, s + 32) of the 128-bit value (hi:lo) |= w, for w < 2^31 and s <= 93.
__device__ __forceinline__ void or_at(uint64_t& lo, uint64_t& hi, uint32_t w, int s) {
  const uint64_t v = w;
  if (s < 64) {
    lo |= v << s;
    if (s > 32) hi |= v >> (64 - s);  // the bits that left lo
  } else {
    hi |= v << (s - 64);
  }
}

// ---- pack --------------------------------------------------------------------------------------

// MAXB = the most borders the op allows: 3 with fold, else 2^BITS - 1.
template <typename In, int BITS, bool FOLD>
__global__ void __launch_bounds__(kThreads)
    fewbit_pack_kernel(const In* __restrict__ x, uint8_t* __restrict__ codes, int64_t n,
                       const typename MathOf<In>::type* __restrict__ borders, int nb,
                       bool aligned4) {
  using T = typename MathOf<In>::type;
  constexpr int kMaxB = FOLD ? fewbit::kMaxFoldBorders : (1 << BITS) - 1;
  T bord[kMaxB];
#pragma unroll
  for (int j = 0; j < kMaxB; ++j) {
    if (j < nb) {
      bord[j] = borders[j];
    } else {
      set_inf(bord[j]);
    }
  }
  const int lane = static_cast<int>(threadIdx.x & 31);
  const int64_t warp = global_thread() >> 5;
  const int64_t nwarps = grid_threads() >> 5;
  const int64_t nfull = n / fewbit::kBlock;
  const int64_t ntiles = (nfull + kTile - 1) / kTile;

  // Full blocks. Every branch below depends on the warp's tile only: the ballots see all 32 lanes.
  for (int64_t t = warp; t < ntiles; t += nwarps) {
    const int64_t B0 = t * kTile;
    const int here = static_cast<int>(nfull - B0 < kTile ? nfull - B0 : kTile);
    T xv[kTile];
#pragma unroll
    for (int u = 0; u < kTile; ++u) {
      xv[u] = T(0);
      if (u < here) xv[u] = to_math(x[(B0 + u) * fewbit::kBlock + lane]);
    }
    uint32_t mine = 0;  // word `lane` of the tile: block lane / BITS, plane lane % BITS
#pragma unroll
    for (int u = 0; u < kTile; ++u) {
      if (u < here) {
        const uint32_t c = static_cast<uint32_t>(code_padded<kMaxB, FOLD>(xv[u], bord, nb));
#pragma unroll
        for (int k = 0; k < BITS; ++k) {
          const uint32_t w = __ballot_sync(kFullMask, (c >> k) & 1u);
          if (lane == u * BITS + k) mine = w;
        }
      }
    }
    // Block B's plane k is word B * BITS + k of the stream.
    if (lane < here * BITS) store_word(codes + 4 * (B0 * BITS + lane), mine, aligned4);
  }

  // The partial last block, r = n % 32 elements, by the grid's last warp.
  const int r = static_cast<int>(n - nfull * fewbit::kBlock);
  if (r != 0 && warp == nwarps - 1) {
    const int64_t first = nfull * fewbit::kBlock;
    uint32_t c = 0;
    if (lane < r) {
      c = static_cast<uint32_t>(code_padded<kMaxB, FOLD>(to_math(x[first + lane]), bord, nb));
    }
    const uint32_t valid = (1u << r) - 1u;
    uint64_t lo = 0, hi = 0;  // the tail's bit stream: bit k*r + j = bit k of c_j
#pragma unroll
    for (int k = 0; k < BITS; ++k) {
      or_at(lo, hi, __ballot_sync(kFullMask, (c >> k) & 1u) & valid, k * r);
    }
    const int nbytes = (BITS * r + 7) / 8;
    if (lane < nbytes) {
      const uint64_t word = lane < 8 ? lo : hi;
      codes[first / 8 * BITS + lane] = static_cast<uint8_t>(word >> (8 * (lane & 7)));
    }
  }
}

// ---- backward ----------------------------------------------------------------------------------

template <typename In, int VEC>
__global__ void __launch_bounds__(kThreads)
    fewbit_backward_kernel(const In* __restrict__ gy, const uint8_t* __restrict__ codes,
                           In* __restrict__ gx,
                           const typename MathOf<In>::type* __restrict__ levels, int64_t n,
                           int bits, bool aligned4) {
  using T = typename MathOf<In>::type;
  __shared__ T lv[1 << kMaxBits];
  if (static_cast<int>(threadIdx.x) < (1 << bits)) lv[threadIdx.x] = levels[threadIdx.x];
  __syncthreads();

  const int64_t nfull = n / fewbit::kBlock;
  const int64_t units = nfull * (fewbit::kBlock / VEC);  // VEC divides 32: units never straddle
  const int64_t stride = grid_threads();
  for (int64_t u = global_thread(); u < units; u += stride) {
    const int64_t e0 = u * VEC;
    const int64_t B = e0 / fewbit::kBlock;
    const int j0 = static_cast<int>(e0 - B * fewbit::kBlock);
    const uint8_t* wp = codes + 4 * B * bits;
    uint32_t w[kMaxBits];
#pragma unroll
    for (int k = 0; k < kMaxBits; ++k) {
      w[k] = k < bits ? load_word(wp + 4 * k, aligned4) >> j0 : 0u;
    }
    const Pack<In, VEC> g = *reinterpret_cast<const Pack<In, VEC>*>(gy + e0);
    Pack<In, VEC> out;
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      int c = 0;
#pragma unroll
      for (int k = 0; k < kMaxBits; ++k) c |= static_cast<int>((w[k] >> v) & 1u) << k;
      store(out.v[v], fewbit::scale_grad<T>(to_math(g.v[v]), lv[c]));
    }
    *reinterpret_cast<Pack<In, VEC>*>(gx + e0) = out;
  }

  // The partial last block, one element per thread, bit by bit.
  const int64_t first = nfull * fewbit::kBlock;
  const int64_t i = first + global_thread();
  if (i < n) {
    const int c = fewbit::read_code(codes, i, n, bits);
    store(gx[i], fewbit::scale_grad<T>(to_math(gy[i]), lv[c]));
  }
}

// ---- launch ------------------------------------------------------------------------------------

// Blocks of kThreads for `threads` threads of work, at most kBlocksPerSM per SM: one full wave
// (2048 threads per SM) keeps enough loads in flight for these memory-bound streams; more blocks
// only add scheduling, and the grid-stride loops take the rest. At least one block.
unsigned grid_blocks(int64_t threads, int sms) {
  const int64_t want = (threads + kThreads - 1) / kThreads;
  const int64_t cap = static_cast<int64_t>(sms) * kBlocksPerSM;
  const int64_t b = want < cap ? want : cap;
  return static_cast<unsigned>(b > 0 ? b : 1);
}

bool aligned(const void* p, int bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

template <typename In, int BITS>
cudaError_t pack_bits(const In* x, uint8_t* codes, int64_t n,
                      const typename MathOf<In>::type* borders, int nb, bool fold, unsigned blocks,
                      cudaStream_t stream) {
  const bool a4 = aligned(codes, 4);
  if (fold) {
    fewbit_pack_kernel<In, BITS, true>
        <<<blocks, kThreads, 0, stream>>>(x, codes, n, borders, nb, a4);
  } else {
    fewbit_pack_kernel<In, BITS, false>
        <<<blocks, kThreads, 0, stream>>>(x, codes, n, borders, nb, a4);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_fewbit_pack(FloatType type, const void* x, uint8_t* codes, int64_t n,
                               const void* borders, int nb, int bits, bool fold,
                               cudaStream_t stream) {
  if (bits < 1 || bits > kMaxBits || nb < 1 || n < 0) return cudaErrorInvalidValue;
  if (fold ? (nb != 2 && nb != fewbit::kMaxFoldBorders) : nb + 1 > (1 << bits)) {
    return cudaErrorInvalidValue;
  }
  if (n == 0) return cudaSuccess;
  int sms = 0;
  cudaError_t err = sm_count(&sms);
  if (err != cudaSuccess) return err;
  // One warp per tile of kTile full blocks, plus one for the partial block.
  const int64_t nfull = n / fewbit::kBlock;
  const int64_t warps = (nfull + kTile - 1) / kTile + (n % fewbit::kBlock != 0 ? 1 : 0);
  const unsigned blocks = grid_blocks(warps * 32, sms);
  return dispatch_float(type, [&](auto tag) {
    using In = decltype(tag);
    using T = typename MathOf<In>::type;
    const In* xp = static_cast<const In*>(x);
    const T* bp = static_cast<const T*>(borders);
    switch (bits) {
      case 1: return pack_bits<In, 1>(xp, codes, n, bp, nb, fold, blocks, stream);
      case 2: return pack_bits<In, 2>(xp, codes, n, bp, nb, fold, blocks, stream);
      case 3: return pack_bits<In, 3>(xp, codes, n, bp, nb, fold, blocks, stream);
      default: return pack_bits<In, 4>(xp, codes, n, bp, nb, fold, blocks, stream);
    }
  });
}

cudaError_t launch_fewbit_backward(FloatType type, const void* gy, const uint8_t* codes, void* gx,
                                   int64_t n, const void* levels, int bits, cudaStream_t stream) {
  if (bits < 1 || bits > kMaxBits || n < 0) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  int sms = 0;
  cudaError_t err = sm_count(&sms);
  if (err != cudaSuccess) return err;
  const bool a4 = aligned(codes, 4);
  const int64_t nfull = n / fewbit::kBlock;
  const int64_t tail = n - nfull * fewbit::kBlock;
  return dispatch_float(type, [&](auto tag) {
    using In = decltype(tag);
    using T = typename MathOf<In>::type;
    constexpr int kVec = static_cast<int>(16 / sizeof(In));  // 16-byte accesses
    const In* g = static_cast<const In*>(gy);
    In* o = static_cast<In*>(gx);
    const T* lp = static_cast<const T*>(levels);
    if (aligned(gy, 16) && aligned(gx, 16)) {
      const int64_t units = nfull * (fewbit::kBlock / kVec);
      const unsigned blocks = grid_blocks(units > tail ? units : tail, sms);
      fewbit_backward_kernel<In, kVec>
          <<<blocks, kThreads, 0, stream>>>(g, codes, o, lp, n, bits, a4);
    } else {
      const int64_t units = nfull * fewbit::kBlock;
      const unsigned blocks = grid_blocks(units > tail ? units : tail, sms);
      fewbit_backward_kernel<In, 1>
          <<<blocks, kThreads, 0, stream>>>(g, codes, o, lp, n, bits, a4);
    }
    return cudaGetLastError();
  });
}

}  // namespace gpu
}  // namespace pypaper
