// CPU loops of the fused multi-step LIF neuron, torch-free (math: kernels/common/snn_math.h).
//
// Layout: x, spikes, h_seq, v_seq, grad_x are [T, N] contiguous (N = all neurons of one step,
// batch included); v_init, v_last, grad_v_init are [N]. A per-neuron parameter (decay, threshold)
// has `period` values (1: one for all, or the feature count F: neuron n uses value n % F, i.e. it
// broadcasts over the batch).
//
// The neurons are cut into chunks of kLifChunk. A chunk runs its whole time loop with its state
// (membrane, parameters, gradient accumulators) in stack arrays that stay in L1; per time step the
// inner loop over the chunk's neurons is a plain unit-stride loop the compiler vectorizes. Chunks
// are independent, so the caller hands ranges of chunks to threads (csrc/snn/snn_cpu.cpp). The
// chunk size is fixed - not derived from the thread count - so the reduced parameter gradients
// (per-chunk partial sums, added in chunk order) are the same bits on any number of threads.
//
// The loops move 8 bytes per neuron-step forward (X in; S out; 12 when H is kept for a backward
// that reads it) and 12 backward (gS and X in, H rerun per chunk in L1 from X - or H in - ; gX
// out; the rerun of the next chunk runs alongside the reverse scan of this one), so they are
// bound by memory bandwidth: outputs too big for the caches go through a
// staging row in L1 and out with non-temporal stores (stream_bytes), which saves the
// read-for-ownership of every written cache line.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../common/snn_math.h"
#include "cpu_vendor.h"
#include "float16.h"

#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace pypaper {
namespace cpu {

// 128 neurons: a row of a chunk is 512 bytes of fp32 (8 cache lines). Measured at T = 32, 2^18
// neurons, inputs cold in DRAM (2-core Xeon, huge pages): fwd + bwd 5.9 ms with 512, 5.2 with 256,
// 5.0 with 128, 5.3 with 64. Shorter rows put more rows in flight at once per stream, which is
// what the DRAM pages of rows 1 MB apart need; below 128 the per-chunk setup starts to show.
constexpr int64_t kLifChunk = 128;

// The forward prefetches rows this many time steps ahead into L1 (2: 5.1 -> 4.9 ms fwd + bwd
// against 1 in the same setting; 4 no better) ...
constexpr int64_t kLifPrefetchSteps = 2;

// ... and this many steps ahead into L2, continuing into the next chunk's first rows near the end
// of a chunk: more DRAM requests in flight than the L1 fill buffers allow. Right after a
// SpikingJelly fwd + bwd, as in the benchmark (T = 32, 2^18 neurons, 24 interleaved rounds): the
// forward 1.77-1.81 -> 1.61-1.65 ms with 8, 10 or 14 steps (6: 1.66); standalone no worse.
constexpr int64_t kLifForwardL2Steps = 10;

// The backward, whose arithmetic per element is about twice the forward's, prefetches in two
// levels: into L2 this many steps ahead, into L1 one step ahead (cold inputs, T = 32, 2^18
// neurons: backward 2.88 -> 2.69 ms with 4 steps; one level at 2 steps left the DRAM requests too
// few while it computed; the pure streaming floor of its pattern is 2.46-2.64 ms, bench/membw.py).
// 6 rather than 4: right after a SpikingJelly fwd + bwd, as in the benchmark, backward
// 3.13-3.16 -> 3.04-3.09 ms (24-30 interleaved rounds each; 8 and 12 no better, 3 worse), and no
// worse standalone.
constexpr int64_t kLifBackwardL2Steps = 6;

// An output of at least this many bytes is written with non-temporal stores, which skip the
// read-for-ownership a normal store pays (as much bandwidth as the write itself) and do not evict
// the rows the loop reads next. No later pass of these ops reads its own output back (the CPU
// backward reruns the forward from x), so only the next layer could profit from it staying in
// cache, and on this CPU (2-core Xeon, 2 MB L2 per core) it does not: T = 32, fwd + bwd through
// autograd, normal -> streamed stores: 2^12 neurons (512 KB per [T, N] tensor) 333 -> 279 us,
// 2^13 444 -> 350, 2^15 1148 -> 818, 2^16 1632 -> 1294; a Linear -> LIF -> Linear -> LIF model
// trained with either is within 2% (T = 32..500, 128..1024 features), streamed no slower.
constexpr int64_t kStreamBytes = int64_t{512} << 10;

// dst[0, n) = src[0, n) with non-temporal stores of whole 64-byte lines where dst is aligned (32
// bytes without AVX-512); the head and tail bytes are copied normally. The caller ends its task
// with stream_fence(). Whole lines against two 32-byte halves per line, T = 32: one thread on
// 4 KiB pages, x in cache, forward 0.69 -> 0.25 ns per neuron-step and backward 0.97 -> 0.53 at
// 2^12 neurons (0.75 -> 0.61 and 1.22 -> 0.99 at 2^18); two threads on huge pages, in-process,
// 1-4% (2^12..2^18 neurons, cold or hot inputs).
inline void stream_bytes(void* dst, const void* src, int64_t n) {
#if defined(__AVX__)
  auto* d = static_cast<char*>(dst);
  const auto* s = static_cast<const char*>(src);
#if defined(__AVX512F__)
  constexpr int64_t kStore = 64;
#else
  constexpr int64_t kStore = 32;
#endif
  const int64_t head =
      std::min<int64_t>(n, (kStore - reinterpret_cast<uintptr_t>(d) % kStore) % kStore);
  if (head > 0) std::memcpy(d, s, head);
  int64_t i = head;
  for (; i + kStore <= n; i += kStore) {
#if defined(__AVX512F__)
    _mm512_stream_si512(reinterpret_cast<__m512i*>(d + i),
                        _mm512_loadu_si512(reinterpret_cast<const void*>(s + i)));
#else
    _mm256_stream_si256(reinterpret_cast<__m256i*>(d + i),
                        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i)));
#endif
  }
  if (i < n) std::memcpy(d + i, s + i, n - i);
#else
  std::memcpy(dst, src, n);
#endif
}

inline void stream_fence() {
#if defined(__AVX__)
  _mm_sfence();
#endif
}

// Prefetches the n bytes at p (a later time step's row of a chunk) into L1. The rows of one chunk
// are N elements apart (1 MB at 2^18 neurons): every step starts a new page, where the hardware
// prefetchers must first miss before they stream, so each row would pay one memory latency; the
// loop asks kLifPrefetchSteps steps ahead instead.
inline void prefetch_row(const void* p, int64_t n) {
#if defined(__AVX__)
  const char* c = static_cast<const char*>(p);
  for (int64_t i = 0; i < n; i += 64) _mm_prefetch(c + i, _MM_HINT_T0);
#else
  (void)p;
  (void)n;
#endif
}

// The same, further ahead: into L2 only (a DRAM request that does not hold an L1 fill buffer for
// its whole trip), or with the non-temporal hint (`nta`), which on AMD Zen keeps the streamed
// rows from displacing what L2 and L3 hold (lif_prefetch_nta_default).
inline void prefetch_row_l2(const void* p, int64_t n, bool nta) {
#if defined(__AVX__)
  const char* c = static_cast<const char*>(p);
  if (nta) {
    for (int64_t i = 0; i < n; i += 64) _mm_prefetch(c + i, _MM_HINT_NTA);
  } else {
    for (int64_t i = 0; i < n; i += 64) _mm_prefetch(c + i, _MM_HINT_T1);
  }
#else
  (void)p;
  (void)n;
  (void)nta;
#endif
}

// Whether the loops' far prefetches (prefetch_row_l2) use the non-temporal hint: on AMD CPUs,
// else into L2. PYPAPER_LIF_PREFETCH=nta or =l2 overrides (read on every call, so that one
// process can compare the two). AMD EPYC Zen 5 guest, 2 threads, T = 32, 2^18 neurons, fp32,
// the two hints alternating in one process: fwd + bwd through autograd right after a
// SpikingJelly fwd + bwd (the benchmark's setting) 6.54 / 6.71 ms with L2 hints, 5.46 / 5.86
// with NTA (30-40 rounds, two runs); inside a model (three x * w + b -> LIFNode blocks, fwd +
// bwd, the ops' own time under the profiler) forward 1.73-1.99 -> 1.49-1.70 ms, backward
// 3.16-3.42 -> 2.83-3.35; the loops alone on cold buffers unchanged (bench.lif_loops). Where
// the same op runs back to back on the same input, the L2 hints win (4.33 against 4.87 ms): the
// rows they leave in L3 (AMD's L2 victims) serve the next call. Our reading: what NTA saves is
// the eviction of the dirty lines other layers leave in L2 and L3, written back to DRAM during
// the op when L2 hints make room for the prefetched rows. The 2-core Xeon of the README's first
// tables keeps the L2 hints it was tuned with (NTA not measured there).
inline bool lif_prefetch_nta_default() {
  if (const char* e = std::getenv("PYPAPER_LIF_PREFETCH")) {
    if (std::strcmp(e, "nta") == 0) return true;
    if (std::strcmp(e, "l2") == 0) return false;
  }
  return cpu_is_amd();
}

inline int64_t lif_num_chunks(int64_t neurons) { return (neurons + kLifChunk - 1) / kLifChunk; }

// ---- storage -------------------------------------------------------------------------------------

// v rounded to In. bf16 without float16.h's early return for NaN (same bits: a quiet NaN, else
// round to nearest even), which would keep the vectorizer out of the loops.
template <typename In, typename T>
inline In store_val(T v) {
  if constexpr (std::is_same_v<In, bf16>) {
    uint32_t u;
    std::memcpy(&u, &v, sizeof u);
    const uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return bf16{static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : r)};
  } else {
    return store_as<In>(v);
  }
}


// The neighbour of a bf16/fp16 value (its bits b) one step towards +inf (up) or -inf: one more
// in magnitude when moving away from zero, one less towards it, and across zero +-0 -> the
// smallest subnormal of the other sign. Selects only, so the loops stay vectorizable.
inline uint32_t next_bits(uint32_t b, bool up) {
  const bool neg = (b & 0x8000u) != 0;
  const bool zero = (b & 0x7fffu) == 0;
  const uint32_t toward_zero = zero ? (up ? 0x0001u : 0x8001u) : b - 1u;
  return up != neg ? b + 1u : toward_zero;
}

// H as stored for the backward. The backward recomputes S = Theta(H - Vth) from the stored H, so
// in 16 bits H is rounded to nearest unless that would cross the threshold; then it takes the
// neighbour on the spike's side (one ulp further). Recomputed spikes always equal the forward's.
template <typename In, typename T>
inline In store_h(T h, T s, T vth) {
  if constexpr (std::is_same_v<In, T>) {
    return h;
  } else {
    const In r = store_val<In>(h);
    const bool same = snn::fire(to_float(r), vth) == s;
    const uint32_t b = r.bits;
    In out;
    out.bits = static_cast<uint16_t>(same ? b : next_bits(b, s > T(0)));
    return out;
  }
}

// ---- parameters --------------------------------------------------------------------------------

// dst[j] = value of neuron n0 + j for j < len.
template <typename T>
inline void fill_param(T* __restrict dst, const T* __restrict src, int64_t period, int64_t n0,
                       int64_t len) {
  if (period == 1) {
    std::fill(dst, dst + len, src[0]);
    return;
  }
  int64_t i = n0 % period;
  for (int64_t j = 0; j < len; ++j) {
    dst[j] = src[i];
    if (++i == period) i = 0;
  }
}

// ---- forward -----------------------------------------------------------------------------------

template <typename In, typename T>
struct LifForwardArgs {
  const In* x;       // [T, N]
  const In* v_init;  // [N] or nullptr: start at rest (v_reset, or 0 for a soft reset)
  const T* decay;    // tau (div) or k = 1/tau, `decay_period` values
  int64_t decay_period;
  const T* vth;
  int64_t vth_period;
  In* spikes;  // [T, N]
  In* h_seq;   // [T, N], or nullptr: not kept (no backward will run)
  In* v_seq;   // [T, N] or nullptr
  In* v_last;  // [N]
  int64_t steps, neurons;
  T v_reset;  // the hard-reset potential; 0 for a soft reset (the charge's Vr)
  bool decay_input, div, hard;
  bool stream;  // non-temporal stores of spikes, h_seq, v_seq (each >= kStreamBytes)
  bool prefetch_nta = false;  // prefetch_row_l2's hint (lif_prefetch_nta_default)
};

// One forward step over a row of neurons; KEEP_H: whether H is written for the backward.
template <bool DI, bool DIV, bool HARD, bool KEEP_H, typename In, typename T>
inline void lif_forward_row(const In* __restrict x, In* __restrict s_out, In* __restrict h_out,
                            T* __restrict v, const T* __restrict k, const T* __restrict th, T vr,
                            int64_t len) {
  for (int64_t j = 0; j < len; ++j) {
    const T h = snn::charge<DI, DIV>(v[j], static_cast<T>(to_float(x[j])), k[j], vr);
    const T s = snn::fire(h, th[j]);
    s_out[j] = store_val<In>(s);
    if constexpr (KEEP_H) h_out[j] = store_h<In>(h, s, th[j]);
    v[j] = snn::reset<HARD>(h, s, th[j], vr);
  }
}

template <typename In, typename T>
inline void store_row(In* __restrict dst, const T* __restrict v, int64_t len) {
  for (int64_t j = 0; j < len; ++j) dst[j] = store_val<In>(v[j]);
}

template <typename In, typename T>
inline void load_row(T* __restrict dst, const In* __restrict src, int64_t len) {
  for (int64_t j = 0; j < len; ++j) dst[j] = static_cast<T>(to_float(src[j]));
}

template <bool DI, bool DIV, bool HARD, bool KEEP_H, typename In, typename T>
void lif_forward_chunks(const LifForwardArgs<In, T>& a, int64_t c0, int64_t c1) {
  alignas(64) T v[kLifChunk];
  alignas(64) T k[kLifChunk];
  alignas(64) T th[kLifChunk];
  alignas(64) In s_row[kLifChunk];  // staging rows for the streamed stores
  alignas(64) In h_row[kLifChunk];
  const int64_t N = a.neurons;
  const int64_t row_bytes = static_cast<int64_t>(sizeof(In));
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t n0 = c * kLifChunk;
    const int64_t len = std::min(kLifChunk, N - n0);
    // One value for all neurons (the common case): filled once per task, as the backward does.
    if (c == c0 || a.decay_period != 1) fill_param(k, a.decay, a.decay_period, n0, len);
    if (c == c0 || a.vth_period != 1) fill_param(th, a.vth, a.vth_period, n0, len);
    if (a.v_init) {
      load_row(v, a.v_init + n0, len);
    } else {
      std::fill(v, v + len, a.v_reset);
    }
    for (int64_t t = 0; t < a.steps; ++t) {
      const int64_t off = t * N + n0;
      if (t + kLifPrefetchSteps < a.steps) {
        prefetch_row(a.x + off + kLifPrefetchSteps * N, len * row_bytes);
      }
      const int64_t t2 = t + kLifForwardL2Steps;  // the row kLifForwardL2Steps rows later
      if (t2 < a.steps) {
        prefetch_row_l2(a.x + off + kLifForwardL2Steps * N, len * row_bytes, a.prefetch_nta);
      } else if (c + 1 < c1 && t2 - a.steps < a.steps) {  // in the next chunk
        const int64_t n1 = n0 + kLifChunk;
        prefetch_row_l2(a.x + (t2 - a.steps) * N + n1, std::min(kLifChunk, N - n1) * row_bytes,
                        a.prefetch_nta);
      }
      if (a.stream) {
        lif_forward_row<DI, DIV, HARD, KEEP_H>(a.x + off, s_row, h_row, v, k, th, a.v_reset, len);
        stream_bytes(a.spikes + off, s_row, len * row_bytes);
        if (KEEP_H) stream_bytes(a.h_seq + off, h_row, len * row_bytes);
        if (a.v_seq) {
          store_row(s_row, v, len);
          stream_bytes(a.v_seq + off, s_row, len * row_bytes);
        }
      } else {
        lif_forward_row<DI, DIV, HARD, KEEP_H>(a.x + off, a.spikes + off,
                                               KEEP_H ? a.h_seq + off : h_row, v, k, th,
                                               a.v_reset, len);
        if (a.v_seq) store_row(a.v_seq + off, v, len);
      }
    }
    store_row(a.v_last + n0, v, len);
  }
  if (a.stream) stream_fence();
}

// Calls f(DI, DIV, HARD) with the three charge / reset flags as compile-time constants
// (std::bool_constant), so each loop is instantiated per variant and has no branch inside.
template <typename F>
void with_charge_flags(bool decay_input, bool div, bool hard, F&& f) {
  using Y = std::true_type;
  using N = std::false_type;
  switch ((decay_input ? 4 : 0) | (div ? 2 : 0) | (hard ? 1 : 0)) {
    case 0: f(N{}, N{}, N{}); break;
    case 1: f(N{}, N{}, Y{}); break;
    case 2: f(N{}, Y{}, N{}); break;
    case 3: f(N{}, Y{}, Y{}); break;
    case 4: f(Y{}, N{}, N{}); break;
    case 5: f(Y{}, N{}, Y{}); break;
    case 6: f(Y{}, Y{}, N{}); break;
    default: f(Y{}, Y{}, Y{}); break;
  }
}

// Runs chunks [c0, c1) with the variant the flags select.
template <typename In, typename T>
void lif_forward(const LifForwardArgs<In, T>& a, int64_t c0, int64_t c1) {
  with_charge_flags(a.decay_input, a.div, a.hard, [&](auto di, auto div, auto hard) {
    constexpr bool DI = decltype(di)::value, DIV = decltype(div)::value;
    constexpr bool HARD = decltype(hard)::value;
    if (a.h_seq == nullptr) {
      lif_forward_chunks<DI, DIV, HARD, false>(a, c0, c1);
    } else {
      lif_forward_chunks<DI, DIV, HARD, true>(a, c0, c1);
    }
  });
}

// ---- backward ----------------------------------------------------------------------------------

// The backward's loops are vectorized with 512-bit registers where the CPU has AVX-512 (GCC
// otherwise prefers 256-bit ones even under -march=native). The backward is the op's arithmetic-
// bound half: in cache (1024 neurons, one thread) 0.50 -> 0.40 ns per neuron-step, cold at the
// bench's shape (T = 32, 2^18 neurons, 2 threads) 2.9-3.1 -> 2.5-2.6 ms (bench.lif_loops, 2-core
// Xeon, 480 MiB L3, 5 interleaved runs). The forward stays on 256-bit vectors: with 512 its loop
// in cache was 1.5x slower and cold no faster beyond the noise. Same operations and order, so the
// same bits either way.
#if defined(__GNUC__) && !defined(__clang__) && defined(__AVX512F__)
#define PYPAPER_SNN_BACKWARD_ZMM 1
#pragma GCC push_options
#pragma GCC target("prefer-vector-width=512")
#endif

template <typename In, typename T>
struct LifBackwardArgs {
  const In* grad_spikes;  // [T, N]
  const In* grad_v_last;  // [N] or nullptr (zero)
  const In* grad_v_seq;   // [T, N] or nullptr (zero)
  const In* h_seq;        // [T, N], from the forward (unused when x_seq is set)
  const In* v_init;       // [N] or nullptr (rest); read for the decay gradient and by x_seq
  // Recompute mode: the forward kept no H; x_seq is its input [T, N], and each chunk reruns the
  // forward over its T rows (from v_init) into an L1/L2 buffer before its reverse scan, with the
  // same operations, so H is the forward's to the bit. charge_decay / charge_div: the decay the
  // rerun charges with (k = 1/tau where every tau is a power of two, as the forward does).
  const In* x_seq;
  const T* charge_decay;
  bool charge_div;
  const T* decay;
  int64_t decay_period;
  const T* vth;
  int64_t vth_period;
  In* grad_x;       // [T, N]
  In* grad_v_init;  // [N]
  // Parameter gradients, summed over time inside a chunk. Per-neuron parameters (period > 1): one
  // value per neuron, grad_*_n[n] (the caller sums over the batch). Scalars: one partial per
  // chunk, grad_*_chunk[c] (the caller adds them in chunk order). nullptr: not needed.
  T* grad_decay_n;
  double* grad_decay_chunk;
  T* grad_vth_n;
  double* grad_vth_chunk;
  int64_t steps, neurons;
  T v_reset;  // hard-reset potential, or 0 (soft)
  T alpha;
  int32_t surrogate;
  bool decay_input, div, hard, detach_reset, sltt;
  bool stream;  // non-temporal stores of grad_x (>= kStreamBytes)
  bool prefetch_nta = false;  // prefetch_row_l2's hint (lif_prefetch_nta_default)
};

// One reverse step t over a chunk. FIRST: t == 0, V[t-1] is v_init (only read when NEEDP).
// NEEDP: a parameter gradient (decay or threshold) is wanted; without, neither sum is formed
// (the common case: LIF with fixed tau and threshold; 14% fewer cycles per row in L1).
template <bool HARD, snn::Surrogate SURR, bool NEEDP, bool FIRST, typename In, typename H,
          typename T>
inline void lif_backward_row(const In* __restrict gs, const H* __restrict h,
                             const H* __restrict hprev, const T* __restrict vinit,
                             T* __restrict carry, const T* __restrict th,
                             const T* __restrict cx, const T* __restrict cv,
                             const T* __restrict ch, const T* __restrict cr, T* __restrict gk,
                             T* __restrict gth, In* __restrict gx, T vr, T alpha, T dr,
                             int64_t len) {
  for (int64_t j = 0; j < len; ++j) {
    const T hj = static_cast<T>(to_float(h[j]));
    const T xj = hj - th[j];
    const T s = xj >= T(0) ? T(1) : T(0);
    const T sg = snn::surrogate_grad<SURR>(xj, alpha);
    const auto g = snn::step_grad<HARD>(static_cast<T>(to_float(gs[j])), carry[j], hj, s, sg,
                                        th[j], vr, dr);
    if constexpr (NEEDP) gth[j] += g.gvth;
    gx[j] = store_val<In>(g.gh * cx[j]);
    if constexpr (NEEDP) {
      T vp;
      if constexpr (FIRST) {
        vp = vinit[j];
      } else {
        const T hp = static_cast<T>(to_float(hprev[j]));
        vp = snn::reset<HARD>(hp, snn::fire(hp, th[j]), th[j], vr);
      }
      gk[j] += g.gh * ((hj - vp) * ch[j] + (vp - vr) * cr[j]);
    }
    carry[j] = g.gh * cv[j];
  }
}

template <typename In, typename T>
inline void add_row(T* __restrict dst, const In* __restrict src, int64_t len) {
  for (int64_t j = 0; j < len; ++j) dst[j] += static_cast<T>(to_float(src[j]));
}

template <typename T>
inline double sum_in_order(const T* v, int64_t len) {
  double acc = 0.0;
  for (int64_t j = 0; j < len; ++j) acc += static_cast<double>(v[j]);
  return acc;
}

// Recompute mode: H[t] of one row of a chunk from x's row t (lif_forward_row's operations), the
// chunk's membrane v carried from row t - 1. H stays in the math type T: for 16-bit inputs the
// backward then evaluates the surrogate and the decay gradient at the forward's own H, not at H
// rounded to 16 bits (what a GPU keeps; store_h), and skips the rounding and its spike-side fix-up
// per element. AMD Zen 3, T = 32, ATan, 4 alternating runs: the backward in cache (8192 neurons,
// 1 thread) over fp32's 1.57-1.91x -> 1.03-1.21x in bf16, 3.2-4.1x -> 1.8-2.1x in fp16; fwd + bwd
// at 2^18 neurons, 2 threads, 12.8-15.5 -> 8.3-10.8 ms in bf16 (fp32 9.1-12.8).
template <bool DI, bool DIV, bool HARD, typename In, typename T>
void lif_rerun_row(const In* __restrict xr, T* __restrict hr, T* __restrict v,
                   const T* __restrict k, const T* __restrict th, T vr, int64_t len) {
  for (int64_t j = 0; j < len; ++j) {
    const T h = snn::charge<DI, DIV>(v[j], static_cast<T>(to_float(xr[j])), k[j], vr);
    const T s = snn::fire(h, th[j]);
    hr[j] = h;
    v[j] = snn::reset<HARD>(h, s, th[j], vr);
  }
}

template <typename In, typename T>
using LifRerunRow = void (*)(const In*, T*, T*, const T*, const T*, T, int64_t);

// The rerun row of the variant the flags select, chosen once per task (a call per row of 128
// neurons instead of a template parameter of the backward loop per charge variant).
template <typename In, typename T>
LifRerunRow<In, T> lif_rerun_row_for(bool decay_input, bool div, bool hard) {
  LifRerunRow<In, T> f = nullptr;
  with_charge_flags(decay_input, div, hard, [&](auto di, auto dv, auto hd) {
    f = &lif_rerun_row<decltype(di)::value, decltype(dv)::value, decltype(hd)::value, In, T>;
  });
  return f;
}

// Recompute mode, the state of the chunk whose forward is being rerun: its membrane, decay (as
// the forward charges) and threshold.
template <typename T>
struct LifRerunState {
  alignas(64) T v[kLifChunk];
  alignas(64) T k[kLifChunk];
  alignas(64) T th[kLifChunk];
};

template <typename In, typename T>
void lif_rerun_start(const LifBackwardArgs<In, T>& a, LifRerunState<T>& r, int64_t n0,
                     int64_t len) {
  fill_param(r.k, a.charge_decay, a.decay_period, n0, len);
  fill_param(r.th, a.vth, a.vth_period, n0, len);
  if (a.v_init) {
    load_row(r.v, a.v_init + n0, len);
  } else {
    std::fill(r.v, r.v + len, a.v_reset);
  }
}

// The reverse scan over chunks [c0, c1). Recompute mode (x_seq set) is software-pipelined: the
// forward of chunk c0 is rerun alone first; then each step of chunk c's reverse scan also reruns
// one step of chunk c + 1's forward (into the other of two H buffers). Both kinds of work then
// run all the time, and with them the three streams (x of the next chunk, grad_S in and grad_X
// out of this one), instead of a phase that only reads x followed by one that reads grad_S and
// writes grad_X. T = 32, 2^18 neurons, 2 threads, the same bits: right after a SpikingJelly
// fwd + bwd, as in the benchmark, backward 3.20-3.22 -> 2.99-3.02 ms (40 interleaved rounds, two
// runs); after a 256 MiB sweep 3.15 -> 2.85 ms; in cache (2^12-2^14 neurons) unchanged.
template <bool HARD, snn::Surrogate SURR, bool NEEDP, typename In, typename T>
void lif_backward_chunks(const LifBackwardArgs<In, T>& a, int64_t c0, int64_t c1) {
  alignas(64) T carry[kLifChunk];
  alignas(64) T th[kLifChunk];
  alignas(64) T cx[kLifChunk];
  alignas(64) T cv[kLifChunk];
  alignas(64) T ch[kLifChunk];
  alignas(64) T cr[kLifChunk];
  alignas(64) T gk[kLifChunk];
  alignas(64) T gth[kLifChunk];
  alignas(64) T vinit[kLifChunk];
  alignas(64) T dec[kLifChunk];
  alignas(64) In gx_row[kLifChunk];  // staging row for the streamed stores
  LifRerunState<T> run;               // recompute mode: the chunk being rerun
  constexpr int64_t L2 = kLifBackwardL2Steps;
  const int64_t N = a.neurons, steps = a.steps;
  const int64_t isize = static_cast<int64_t>(sizeof(In));
  const T dr = a.detach_reset ? T(0) : T(1);
  const bool rerun = a.x_seq != nullptr;
  const LifRerunRow<In, T> rerun_row =
      rerun ? lif_rerun_row_for<In, T>(a.decay_input, a.charge_div, a.hard) : nullptr;
  // Recompute mode: H rows of the chunk being scanned and of the next, T x hw each (16 KB each
  // at T = 32 in fp32: L1). hw: the chunk width, or N rounded up to 16 where N is smaller, so
  // that few neurons over many steps do not take T x 128 values per buffer (1 KiB per step in
  // fp32 and per thread: 0.5 GB at T = 500000, N = 4).
  const int64_t hw = std::min(kLifChunk, (N + 15) / 16 * 16);
  std::vector<T> hbuf(rerun ? static_cast<size_t>(2 * steps * hw) : 0);
  T* h_cur = hbuf.data();
  T* h_next = rerun ? h_cur + steps * hw : nullptr;
  if (rerun && c0 < c1) {  // the first chunk's forward, alone
    const int64_t n0 = c0 * kLifChunk, len = std::min(kLifChunk, N - n0);
    const int64_t row_bytes = len * isize;
    lif_rerun_start(a, run, n0, len);
    for (int64_t t = 0; t < steps; ++t) {
      const In* xr = a.x_seq + t * N + n0;
      if (t + L2 < steps) prefetch_row_l2(xr + L2 * N, row_bytes, a.prefetch_nta);
      if (t + 1 < steps) prefetch_row(xr + N, row_bytes);
      if (t < L2) {
        prefetch_row_l2(a.grad_spikes + (steps - 1 - t) * N + n0, row_bytes, a.prefetch_nta);
      }
      rerun_row(xr, h_cur + t * hw, run.v, run.k, run.th, a.v_reset, len);
    }
  }
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t n0 = c * kLifChunk;
    const int64_t len = std::min(kLifChunk, N - n0);
    const int64_t row_bytes = len * isize;
    // The parameters and their coefficients, for the whole chunk width: again for every chunk
    // only when they differ per neuron (one value for all is the common case, and filling them
    // per chunk cost ~3% of the backward, the coefficients dividing).
    if (c == c0 || a.vth_period != 1 || a.decay_period != 1) {
      fill_param(th, a.vth, a.vth_period, n0, kLifChunk);
      fill_param(dec, a.decay, a.decay_period, n0, kLifChunk);
      for (int64_t j = 0; j < kLifChunk; ++j) {
        const auto co = snn::decay_coef(dec[j], a.decay_input, a.div, a.sltt);
        cx[j] = co.cx;
        cv[j] = co.cv;
        ch[j] = co.ch;
        cr[j] = co.cr;
      }
    }
    if (NEEDP) {
      if (a.v_init) {
        load_row(vinit, a.v_init + n0, len);
      } else {
        std::fill(vinit, vinit + len, a.v_reset);
      }
    }
    if (a.grad_v_last) {
      load_row(carry, a.grad_v_last + n0, len);
    } else {
      std::fill(carry, carry + len, T(0));
    }
    std::fill(gk, gk + len, T(0));
    std::fill(gth, gth + len, T(0));
    // The next chunk (n1, len1), whose forward recompute mode reruns alongside this scan.
    const int64_t n1 = n0 + kLifChunk;
    const int64_t len1 = c + 1 < c1 ? std::min(kLifChunk, N - n1) : 0;
    const int64_t next_bytes = len1 * isize;
    const bool pipelined = rerun && len1 > 0;
    if (pipelined) lif_rerun_start(a, run, n1, len1);
    for (int64_t t = steps - 1; t >= 0; --t) {
      const int64_t off = t * N + n0;
      if (t >= L2) {  // rows later steps of the reverse scan read
        prefetch_row_l2(a.grad_spikes + off - L2 * N, row_bytes, a.prefetch_nta);
        if (!rerun) prefetch_row_l2(a.h_seq + off - L2 * N, row_bytes, a.prefetch_nta);
      }
      if (t >= 1) {
        prefetch_row(a.grad_spikes + off - N, row_bytes);
        if (!rerun) prefetch_row(a.h_seq + off - N, row_bytes);
      }
      if (pipelined) {
        const int64_t r = steps - 1 - t;  // the next chunk's forward step
        const In* xr = a.x_seq + r * N + n1;
        if (r + L2 < steps) prefetch_row_l2(xr + L2 * N, next_bytes, a.prefetch_nta);
        if (r + 1 < steps) prefetch_row(xr + N, next_bytes);
        if (t < L2) {
          // What the next iteration reads first: the next chunk's last grad_S rows (its scan)
          // and the chunk after it's first x rows (its rerun).
          if (steps - L2 + t >= 0) {
            prefetch_row_l2(a.grad_spikes + (steps - L2 + t) * N + n1, next_bytes, a.prefetch_nta);
          }
          const int64_t n2 = n1 + kLifChunk;
          if (c + 2 < c1 && L2 - 1 - t < steps) {
            prefetch_row_l2(a.x_seq + (L2 - 1 - t) * N + n2,
                            std::min(kLifChunk, N - n2) * isize, a.prefetch_nta);
          }
        }
        rerun_row(xr, h_next + r * hw, run.v, run.k, run.th, a.v_reset, len1);
      } else if (!rerun && t < L2 && len1 > 0) {
        // The rows the next chunk's scan reads first (its last grad_S / H rows), so it does not
        // start on a memory latency per row.
        const int64_t r = steps - L2 + t;
        if (r >= 0) {
          prefetch_row_l2(a.grad_spikes + r * N + n1, next_bytes, a.prefetch_nta);
          prefetch_row_l2(a.h_seq + r * N + n1, next_bytes, a.prefetch_nta);
        }
      }
      if (a.grad_v_seq) add_row(carry, a.grad_v_seq + off, len);
      In* gx = a.stream ? gx_row : a.grad_x + off;
      // h: this step's H row (the rerun's, in T, or the kept one, in In); hstride: from one
      // step's row to the next
      auto scan_row = [&](const auto* h, int64_t hstride) {
        if (t > 0) {
          lif_backward_row<HARD, SURR, NEEDP, false>(a.grad_spikes + off, h, h - hstride, vinit,
                                                     carry, th, cx, cv, ch, cr, gk, gth, gx,
                                                     a.v_reset, a.alpha, dr, len);
        } else {
          lif_backward_row<HARD, SURR, NEEDP, true>(a.grad_spikes + off, h, h, vinit, carry, th,
                                                    cx, cv, ch, cr, gk, gth, gx, a.v_reset,
                                                    a.alpha, dr, len);
        }
      };
      if (rerun) {
        scan_row(h_cur + t * hw, hw);
      } else {
        scan_row(a.h_seq + off, N);
      }
      if (a.stream) stream_bytes(a.grad_x + off, gx_row, row_bytes);
    }
    if (rerun) std::swap(h_cur, h_next);
    store_row(a.grad_v_init + n0, carry, len);
    if (NEEDP) {
      if (a.grad_decay_n) std::memcpy(a.grad_decay_n + n0, gk, sizeof(T) * len);
      if (a.grad_decay_chunk) a.grad_decay_chunk[c] = sum_in_order(gk, len);
    }
    if (a.grad_vth_n) std::memcpy(a.grad_vth_n + n0, gth, sizeof(T) * len);
    if (a.grad_vth_chunk) a.grad_vth_chunk[c] = sum_in_order(gth, len);
  }
  if (a.stream) stream_fence();
}

template <bool HARD, snn::Surrogate SURR, typename In, typename T>
void lif_backward_k(const LifBackwardArgs<In, T>& a, int64_t c0, int64_t c1) {
  if (a.grad_decay_n || a.grad_decay_chunk || a.grad_vth_n || a.grad_vth_chunk) {
    lif_backward_chunks<HARD, SURR, true>(a, c0, c1);
  } else {
    lif_backward_chunks<HARD, SURR, false>(a, c0, c1);
  }
}

template <bool HARD, typename In, typename T>
void lif_backward_s(const LifBackwardArgs<In, T>& a, int64_t c0, int64_t c1) {
  using snn::Surrogate;
  switch (static_cast<Surrogate>(a.surrogate)) {
    case Surrogate::Sigmoid: lif_backward_k<HARD, Surrogate::Sigmoid>(a, c0, c1); break;
    case Surrogate::ATan: lif_backward_k<HARD, Surrogate::ATan>(a, c0, c1); break;
    case Surrogate::PiecewiseQuadratic:
      lif_backward_k<HARD, Surrogate::PiecewiseQuadratic>(a, c0, c1);
      break;
    case Surrogate::PiecewiseExp: lif_backward_k<HARD, Surrogate::PiecewiseExp>(a, c0, c1); break;
    case Surrogate::SoftSign: lif_backward_k<HARD, Surrogate::SoftSign>(a, c0, c1); break;
    case Surrogate::SuperSpike: lif_backward_k<HARD, Surrogate::SuperSpike>(a, c0, c1); break;
    case Surrogate::Erf: lif_backward_k<HARD, Surrogate::Erf>(a, c0, c1); break;
    default: lif_backward_k<HARD, Surrogate::Rect>(a, c0, c1); break;
  }
}

// Runs chunks [c0, c1) of the reverse scan with the variant the flags select.
template <typename In, typename T>
void lif_backward(const LifBackwardArgs<In, T>& a, int64_t c0, int64_t c1) {
  if (a.hard) {
    lif_backward_s<true>(a, c0, c1);
  } else {
    lif_backward_s<false>(a, c0, c1);
  }
}

#if defined(PYPAPER_SNN_BACKWARD_ZMM)
#pragma GCC pop_options
#undef PYPAPER_SNN_BACKWARD_ZMM
#endif

}  // namespace cpu
}  // namespace pypaper
