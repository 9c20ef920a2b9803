// CPU loops of the learnable-delay linear layer (pypaper.snn.DelayedLinear), torch-free.
//
// Math: kernels/common/delay_math.h. y[t, n, o] = b[o] + sum_i sum_{d in W(o,i)} c[o,i,d] x[t-d, n, i]
// with c = w * g (the Gaussian tap weights of the synapse's window W, at most 2R of the K taps).
//
// Why a gather and not a convolution: the dense formulation (DCLS, and the plain-PyTorch
// reference) builds a [C_out, C_in, K] kernel that is zero outside each synapse's window and
// convolves, costing K multiply-adds per synapse and output step. Here each synapse visits only
// its own taps: cost T*N*C_out*C_in*taps, taps = 2*ceil(3 sigma) (1 once the delays are rounded)
// instead of K.
//
// Layout: the caller transposes [T, N, C] to channel-major rows [C, L], L = T*N, element e = t*N + n.
// A delay of d steps is then a shift of d*N elements along the row, so for one synapse and one tap
// the work is a single long unit-stride axpy (forward, grad_x) or dot product (grad of c) that the
// compiler vectorizes. Taps of one synapse are fused in groups of up to 4 (one load/store of the
// accumulator per 4 taps). The rows are split in chunks [e0, e1) so the accumulator chunk stays in
// L1 while all C_in (or C_out) source rows stream past it, and so two cores share the work even
// when C_out is small.
//
// Each function handles one (block of rows, chunk) work item: csrc/snn/delay_cpu.cpp runs them under
// at::parallel_for.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "../common/delay_math.h"

namespace pypaper {
namespace cpu {
namespace delay_impl {

// y[e] += sum_{k<G} c[k] * x[e - k*N] for e in [0, n); x points at the first tap's source.
template <int G, typename T>
inline void fused_axpy(T* __restrict y, const T* __restrict x, const T* c, int64_t N, int64_t n) {
  const T c0 = c[0];
  const T c1 = G > 1 ? c[1] : T(0);
  const T c2 = G > 2 ? c[2] : T(0);
  const T c3 = G > 3 ? c[3] : T(0);
  const T* x1 = x - N;
  const T* x2 = x - 2 * N;
  const T* x3 = x - 3 * N;
  for (int64_t e = 0; e < n; ++e) {
    T s = c0 * x[e];
    if constexpr (G > 1) s += c1 * x1[e];
    if constexpr (G > 2) s += c2 * x2[e];
    if constexpr (G > 3) s += c3 * x3[e];
    y[e] += s;
  }
}

// y[e] += sum_{k<G} c[k] * x[e + k*N] for e in [0, n) (the adjoint shift: grad_x).
template <int G, typename T>
inline void fused_axpy_adj(T* __restrict y, const T* __restrict x, const T* c, int64_t N,
                           int64_t n) {
  const T c0 = c[0];
  const T c1 = G > 1 ? c[1] : T(0);
  const T c2 = G > 2 ? c[2] : T(0);
  const T c3 = G > 3 ? c[3] : T(0);
  const T* x1 = x + N;
  const T* x2 = x + 2 * N;
  const T* x3 = x + 3 * N;
  for (int64_t e = 0; e < n; ++e) {
    T s = c0 * x[e];
    if constexpr (G > 1) s += c1 * x1[e];
    if constexpr (G > 2) s += c2 * x2[e];
    if constexpr (G > 3) s += c3 * x3[e];
    y[e] += s;
  }
}

// out[k] += sum_{e<n} gy[e] * x[e - k*N], k < G: the correlations of G taps at once, gy[e]
// loaded once for all G taps. Each tap keeps two 64-byte vectors of partial sums (GCC/Clang
// vector extensions: two zmm on AVX-512, four ymm on AVX2; two independent add chains per tap
// hide the add latency), summed lane by lane at the end: a vectorized reduction without
// reassociation flags. Written with explicit vectors because the auto-vectorizer was fragile
// here: with plain lane arrays gcc 12 left G = 2 (the 2-tap window of sigma < 1/3) or, written
// another way, G = 4 in scalar code, 2-6x slower per tap.
template <int G, typename T>
inline void fused_dots(const T* __restrict gy, const T* __restrict x, int64_t N, int64_t n, T* out) {
  typedef T Vec __attribute__((vector_size(64)));
  constexpr int V = 64 / sizeof(T);  // lanes per vector
  const auto load = [](const T* p) {
    Vec v;
    std::memcpy(&v, p, sizeof(Vec));
    return v;
  };
  Vec acc[G][2];
  for (int k = 0; k < G; ++k) acc[k][0] = acc[k][1] = Vec{};
  int64_t e = 0;
  for (; e + 2 * V <= n; e += 2 * V) {
    const Vec g0 = load(gy + e), g1 = load(gy + e + V);
    for (int k = 0; k < G; ++k) {
      const T* xk = x - k * N + e;
      acc[k][0] += g0 * load(xk);
      acc[k][1] += g1 * load(xk + V);
    }
  }
  for (int k = 0; k < G; ++k) {
    const Vec a = acc[k][0] + acc[k][1];
    T s = T(0);
    for (int l = 0; l < V; ++l) s += a[l];
    const T* xk = x - k * N;
    for (int64_t r = e; r < n; ++r) s += gy[r] * xk[r];
    out[k] += s;
  }
}

template <typename F>
inline void by_group(int64_t g, F&& f) {
  switch (g) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    default: f(std::integral_constant<int, 4>{}); break;
  }
}

}  // namespace delay_impl

// dst [C, R] = src [R, C] transposed, tiles [t0, t1) of B x B (numbered row-major over the
// ceil(R/B) x ceil(C/B) grid): each tile is read along its rows and written along its columns
// while it sits in L1. The op's [T, N, C] -> [C, T*N] layout change (csrc/snn/delay_cpu.cpp).
template <int64_t B, typename T>
inline void transpose_tiles(const T* __restrict src, T* __restrict dst, int64_t R, int64_t C,
                            int64_t t0, int64_t t1) {
  const int64_t tc = (C + B - 1) / B;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t r0 = (t / tc) * B, c0 = (t % tc) * B;
    const int64_t r1 = std::min(R, r0 + B), c1 = std::min(C, c0 + B);
    for (int64_t c = c0; c < c1; ++c)
      for (int64_t r = r0; r < r1; ++r) dst[c * R + r] = src[r * C + c];
  }
}

// Per-synapse tables for synapses [s0, s1): first tap lo[s], tap count cnt[s], and the
// coefficients coef[s*M + j] = w[s] * g_s(lo[s] + j). R = delay::window_radius of the op's double
// sigma (never recomputed from the T-typed sigma), M = delay::max_taps(R, K).
template <typename T>
inline void delay_tables(const T* w, const T* pos, int64_t s0, int64_t s1, T sigma, int64_t R,
                         int64_t K, int64_t M, int64_t* lo, int64_t* cnt, T* coef) {
  for (int64_t s = s0; s < s1; ++s) {
    T* c = coef + s * M;
    cnt[s] = delay::tap_weights<T>(pos[s], sigma, R, K, &lo[s], c, nullptr);
    for (int64_t j = 0; j < cnt[s]; ++j) c[j] *= w[s];
  }
}

// Forward, output rows [o0, o1), elements [e0, e1): yc[o*L + e] = bias + sum over synapses and
// taps. The input loop is outside the output loop so the window of x row i that the block reads
// (the chunk plus a (K-1)*N halo) is loaded from memory once and reused by every output of the
// block from L1; the block's accumulators (o1-o0 chunks) stay in L2.
template <typename T>
inline void delay_forward_block(const T* xc, T* yc, const T* bias, const int64_t* lo,
                                const int64_t* cnt, const T* coef, int64_t C_in, int64_t M,
                                int64_t N, int64_t L, int64_t o0, int64_t o1, int64_t e0,
                                int64_t e1) {
  using namespace delay_impl;
  for (int64_t o = o0; o < o1; ++o) {
    const T b = bias ? bias[o] : T(0);
    T* y = yc + o * L;
    for (int64_t e = e0; e < e1; ++e) y[e] = b;
  }
  for (int64_t i = 0; i < C_in; ++i) {
    const T* x = xc + i * L;
    for (int64_t o = o0; o < o1; ++o) {
      T* y = yc + o * L;
      const int64_t s = o * C_in + i;
      const int64_t c = cnt[s], d0 = lo[s];
      const T* cf = coef + s * M;
      // Every tap is in range (e - d*N >= 0) from e = (d0 + c - 1) * N on.
      const int64_t full = std::min(e1, std::max(e0, (d0 + c - 1) * N));
      for (int64_t j = 0; j + 1 < c; ++j) {  // the causal edge: tap j reads x[e - d*N], e >= d*N
        const int64_t sh = (d0 + j) * N;
        for (int64_t e = std::max(e0, sh); e < full; ++e) y[e] += cf[j] * x[e - sh];
      }
      if (full >= e1) continue;
      for (int64_t j0 = 0; j0 < c; j0 += 4) {
        by_group(std::min<int64_t>(4, c - j0), [&](auto G) {
          fused_axpy<decltype(G)::value>(y + full, x + full - (d0 + j0) * N, cf + j0, N,
                                         e1 - full);
        });
      }
    }
  }
}

// grad_x, input rows [i0, i1), elements [e0, e1): gx[i, e] = sum_o sum_j c[o,i,j] gy[o, e + d_j*N]
// (terms with e + d_j*N >= L fall off the end of the sequence). Blocked like the forward.
template <typename T>
inline void delay_grad_x_block(const T* gyc, T* gxc, const int64_t* lo, const int64_t* cnt,
                               const T* coef, int64_t C_in, int64_t C_out, int64_t M, int64_t N,
                               int64_t L, int64_t i0, int64_t i1, int64_t e0, int64_t e1) {
  using namespace delay_impl;
  for (int64_t i = i0; i < i1; ++i) {
    T* gx = gxc + i * L;
    for (int64_t e = e0; e < e1; ++e) gx[e] = T(0);
  }
  for (int64_t o = 0; o < C_out; ++o) {
    const T* gy = gyc + o * L;
    for (int64_t i = i0; i < i1; ++i) {
      T* gx = gxc + i * L;
      const int64_t s = o * C_in + i;
      const int64_t c = cnt[s], d0 = lo[s];
      const T* cf = coef + s * M;
      // Every tap is in range (e + d*N < L) below e = L - (d0 + c - 1) * N.
      const int64_t full = std::max(e0, std::min(e1, L - (d0 + c - 1) * N));
      if (full > e0) {
        for (int64_t j0 = 0; j0 < c; j0 += 4) {
          by_group(std::min<int64_t>(4, c - j0), [&](auto G) {
            fused_axpy_adj<decltype(G)::value>(gx + e0, gy + e0 + (d0 + j0) * N, cf + j0, N,
                                               full - e0);
          });
        }
      }
      for (int64_t j = 0; j < c; ++j) {  // the end of the sequence
        const int64_t sh = (d0 + j) * N;
        const int64_t end = std::min(e1, L - sh);
        for (int64_t e = full; e < end; ++e) gx[e] += cf[j] * gy[e + sh];
      }
    }
  }
}

// Parameter gradients of the synapses (o, i), o in [o0, o1), i in [i0, i1), and the bias of
// rows [o0, o1) when i0 == 0:
//   gc_j = sum_{e >= d_j*N} gy[o, e] x[i, e - d_j*N]         (dL/dc for tap j)
//   grad_w = sum_j g_j gc_j,  grad_p = w sum_j dg_j/dp gc_j   (zero where p is outside [0, K-1])
// Row x[i] is reused from L1/L2 by every output of the block. Any of gw, gp, gb may be null (not
// needed). R and M as for delay_tables; scratch: 3*M values.
template <typename T>
inline void delay_grad_params_block(const T* gyc, const T* xc, const T* w, const T* pos, T sigma,
                                    int64_t R, int64_t K, int64_t M, int64_t C_in, int64_t N,
                                    int64_t L, int64_t o0, int64_t o1, int64_t i0, int64_t i1,
                                    T* gw, T* gp, T* gb, T* scratch) {
  using namespace delay_impl;
  T* g = scratch;
  T* dg = scratch + M;
  T* gc = scratch + 2 * M;
  if (gb && i0 == 0) {
    for (int64_t o = o0; o < o1; ++o) {
      const T* gy = gyc + o * L;
      T acc[8] = {T(0), T(0), T(0), T(0), T(0), T(0), T(0), T(0)};
      int64_t e = 0;
      for (; e + 8 <= L; e += 8)
        for (int l = 0; l < 8; ++l) acc[l] += gy[e + l];
      T s = T(0);
      for (int l = 0; l < 8; ++l) s += acc[l];
      for (; e < L; ++e) s += gy[e];
      gb[o] = s;
    }
  }
  if (!gw && !gp) return;
  for (int64_t i = i0; i < i1; ++i) {
    const T* x = xc + i * L;
    for (int64_t o = o0; o < o1; ++o) {
      const T* gy = gyc + o * L;
      const int64_t s = o * C_in + i;
      int64_t d0 = 0;
      const int64_t c = delay::tap_weights<T>(pos[s], sigma, R, K, &d0, g, gp ? dg : nullptr);
      for (int64_t j = 0; j < c; ++j) gc[j] = T(0);
      // Group j0..j0+G-1 is fully in range from e = (d0 + j0 + G - 1) * N; below that, per tap.
      for (int64_t j0 = 0; j0 < c; j0 += 4) {
        const int64_t G = std::min<int64_t>(4, c - j0);
        const int64_t full = std::min(L, (d0 + j0 + G - 1) * N);
        for (int64_t k = 0; k + 1 < G; ++k) {
          const int64_t sh = (d0 + j0 + k) * N;
          T sum = T(0);
          for (int64_t e = std::min(sh, full); e < full; ++e) sum += gy[e] * x[e - sh];
          gc[j0 + k] += sum;
        }
        if (full < L) {
          by_group(G, [&](auto GG) {
            fused_dots<decltype(GG)::value>(gy + full, x + full - (d0 + j0) * N, N, L - full,
                                            gc + j0);
          });
        }
      }
      if (gw) {
        T a = T(0);
        for (int64_t j = 0; j < c; ++j) a += g[j] * gc[j];
        gw[s] = a;
      }
      if (gp) {
        T a = T(0);
        for (int64_t j = 0; j < c; ++j) a += dg[j] * gc[j];
        gp[s] = delay::position_inside(pos[s], K) ? w[s] * a : T(0);
      }
    }
  }
}

}  // namespace cpu
}  // namespace pypaper
