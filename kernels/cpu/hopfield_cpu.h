// CPU loops of the fused modern-Hopfield retrieval, torch-free (math: kernels/common/hopfield_math.h).
//
// Layout (all contiguous, math type T = float or double): q [BH, L, d], k [BH, S, d],
// v [BH, S, dv]; a state xi_n [BH, L, d]; lse_n [BH, L]. BH = batch x heads, head h = bh % H.
//
// Every product of a tile runs through a BLAS GEMM (MKL's sgemm_/dgemm_, which libtorch_cpu
// exports; a plain loop where no BLAS is linked, e.g. in the torch-free C++ tests), and the
// softmax work sits between two GEMMs on a tile that stays in L2:
//   forward, per (bh, tile of Lt rows), per tile of St stored patterns:
//       s = beta xi K_t^T (+ masks)              GEMM  Lt x St x d
//       m, l, acc rescaled; e = exp(s - m)       fused, vectorized
//       acc += e W_t                             GEMM  Lt x dw x St     (W = K or V)
//   backward of one step, per bh (dK/dV accumulate over all rows, so one task owns a head):
//       P = exp(s - lse), dP = g W_t^T, dS = P (dP - delta), g_xi += beta dS K_t,
//       dK_t += beta dS^T xi, dW_t += P^T g                              5 GEMMs per tile
// Nothing of size L x S outlives a tile.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "../common/hopfield_math.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

extern "C" {
// Fortran BLAS (column-major), weak: resolved from libtorch_cpu's MKL when linked, else null.
void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc) __attribute__((weak));
// MKL's per-thread thread count (weak: absent without MKL).
int MKL_Set_Num_Threads_Local(int n) __attribute__((weak));
}

namespace pypaper {
namespace hopfield {
namespace cpu {

constexpr int64_t kLTile = 256;    // rows (states) per tile (a whole L = 256 in one task)
constexpr int64_t kSTile = 256;    // stored patterns per tile at full row tiles
constexpr int64_t kSTileMax = 2048;

// Stored patterns per tile for a tile of `rows` rows: kSTile for full row tiles, wider for few
// rows (pooling: 1..8 queries over up to 2^16 patterns), so that each GEMM call does enough work
// (score tile rows x st of at most 16K elements; a K tile of st x d stays in L2).
inline int64_t s_tile(int64_t rows, int64_t S) {
  int64_t st = kSTile;
  while (st < kSTileMax && rows * st * 2 <= int64_t{16384}) st *= 2;
  return std::min<int64_t>(st, std::max<int64_t>(S, 1));
}

// ---- row kernels of the softmax work between the GEMMs (AVX2 for float, plain loops else) ----

#if defined(__AVX2__)
// fast_exp of kernels/common/hopfield_math.h on 8 lanes: the same operations in the same order
// (separate multiplies and adds, no FMA), so every lane equals the scalar function bit for bit.
inline __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.33654f), hi = _mm256_set1_ps(88.37626f);
  const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  const __m256 isnan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
  __m256 xc = _mm256_blendv_ps(x, lo, under);
  xc = _mm256_min_ps(xc, hi);
  const __m256 kf = _mm256_floor_ps(
      _mm256_add_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)), _mm256_set1_ps(0.5f)));
  __m256 r = _mm256_sub_ps(xc, _mm256_mul_ps(kf, _mm256_set1_ps(0.693359375f)));
  r = _mm256_sub_ps(r, _mm256_mul_ps(kf, _mm256_set1_ps(-2.12194440e-4f)));
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(p, r), r), r), _mm256_set1_ps(1.0f));
  const __m256i ki = _mm256_add_epi32(_mm256_cvtps_epi32(kf), _mm256_set1_epi32(127));
  const __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(ki, 23)));
  const __m256 z = _mm256_blendv_ps(y, _mm256_setzero_ps(), under);
  return _mm256_blendv_ps(z, x, isnan);
}

#if defined(__AVX512F__)
// The same exp on 16 lanes (AVX-512 machines; identical operations, identical bits).
inline __m512 exp16(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.33654f), hi = _mm512_set1_ps(88.37626f);
  const __mmask16 under = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
  const __mmask16 isnan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  __m512 xc = _mm512_mask_blend_ps(under, x, lo);
  xc = _mm512_min_ps(xc, hi);
  const __m512 kf = _mm512_roundscale_ps(
      _mm512_add_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)), _mm512_set1_ps(0.5f)),
      _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_sub_ps(xc, _mm512_mul_ps(kf, _mm512_set1_ps(0.693359375f)));
  r = _mm512_sub_ps(r, _mm512_mul_ps(kf, _mm512_set1_ps(-2.12194440e-4f)));
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(p, r), r), r), _mm512_set1_ps(1.0f));
  const __m512i ki = _mm512_add_epi32(_mm512_cvtps_epi32(kf), _mm512_set1_epi32(127));
  const __m512 y = _mm512_mul_ps(p, _mm512_castsi512_ps(_mm512_slli_epi32(ki, 23)));
  const __m512 z = _mm512_mask_blend_ps(under, y, _mm512_setzero_ps());
  return _mm512_mask_blend_ps(isnan, z, x);
}
#endif

inline float hsum8(__m256 v) {
  __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_add_ps(a, _mm_movehl_ps(a, a));
  a = _mm_add_ss(a, _mm_shuffle_ps(a, a, 1));
  return _mm_cvtss_f32(a);
}
#endif

template <typename T>
inline T row_max(const T* x, int64_t n, T init) {
  T m = init;
  for (int64_t j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

// x[j] = exp(x[j] - m); returns the sum.
template <typename T>
inline T exp_shift_sum(T* x, int64_t n, T m) {
  T sum = 0;
  for (int64_t j = 0; j < n; ++j) {
    const T e = fast_exp(x[j] - m);
    x[j] = e;
    sum += e;
  }
  return sum;
}

// p[j] = exp(p[j] - lse); dp[j] = p[j] (dp[j] - delta): dS of the softmax backward.
template <typename T>
inline void softmax_grad_row(T* p, T* dp, int64_t n, T lse, T delta) {
  for (int64_t j = 0; j < n; ++j) {
    const T pv = fast_exp(p[j] - lse);
    p[j] = pv;
    dp[j] = pv * (dp[j] - delta);
  }
}

// sum_j (exp(a[j] - la) - exp(b[j] - lb))^2 (a, b overwritten); each row's sum in the math type,
// the rows added in double by the caller.
template <typename T>
inline double exp_diff_sq_row(T* a, T* b, int64_t n, T la, T lb) {
  T acc = 0;
  for (int64_t j = 0; j < n; ++j) {
    const T x = fast_exp(a[j] - la) - fast_exp(b[j] - lb);
    acc += x * x;
  }
  return static_cast<double>(acc);
}

#if defined(__AVX2__)
template <>
inline double exp_diff_sq_row<float>(float* a, float* b, int64_t n, float la, float lb) {
  int64_t j = 0;
  const __m256 lav = _mm256_set1_ps(la), lbv = _mm256_set1_ps(lb);
  __m256 acc = _mm256_setzero_ps();
#if defined(__AVX512F__)
  {
    const __m512 la16 = _mm512_set1_ps(la), lb16 = _mm512_set1_ps(lb);
    __m512 acc16 = _mm512_setzero_ps();
    for (; j + 16 <= n; j += 16) {
      const __m512 x = _mm512_sub_ps(exp16(_mm512_sub_ps(_mm512_loadu_ps(a + j), la16)),
                                     exp16(_mm512_sub_ps(_mm512_loadu_ps(b + j), lb16)));
      acc16 = _mm512_add_ps(acc16, _mm512_mul_ps(x, x));
    }
    acc = _mm256_add_ps(_mm512_castps512_ps256(acc16),
                        _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc16), 1)));
  }
#endif
  for (; j + 8 <= n; j += 8) {
    const __m256 x = _mm256_sub_ps(exp8(_mm256_sub_ps(_mm256_loadu_ps(a + j), lav)),
                                   exp8(_mm256_sub_ps(_mm256_loadu_ps(b + j), lbv)));
    acc = _mm256_add_ps(acc, _mm256_mul_ps(x, x));
  }
  double sum = static_cast<double>(hsum8(acc));
  for (; j < n; ++j) {
    const double x = static_cast<double>(fast_exp(a[j] - la)) - fast_exp(b[j] - lb);
    sum += x * x;
  }
  return sum;
}

template <>
inline float row_max<float>(const float* x, int64_t n, float init) {
  int64_t j = 0;
  float m = init;
#if defined(__AVX512F__)
  if (n >= 16) {
    __m512 a = _mm512_set1_ps(init);
    for (; j + 16 <= n; j += 16) a = _mm512_max_ps(a, _mm512_loadu_ps(x + j));
    const float r = _mm512_reduce_max_ps(a);
    m = r > m ? r : m;
  }
#endif
  if (n - j >= 8) {
    __m256 a = _mm256_set1_ps(m), b = a;
    for (; j + 16 <= n; j += 16) {
      a = _mm256_max_ps(a, _mm256_loadu_ps(x + j));
      b = _mm256_max_ps(b, _mm256_loadu_ps(x + j + 8));
    }
    for (; j + 8 <= n; j += 8) a = _mm256_max_ps(a, _mm256_loadu_ps(x + j));
    alignas(32) float t[8];
    _mm256_store_ps(t, _mm256_max_ps(a, b));
    for (float e : t) m = e > m ? e : m;
  }
  for (; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

template <>
inline float exp_shift_sum<float>(float* x, int64_t n, float m) {
  int64_t j = 0;
  const __m256 mv = _mm256_set1_ps(m);
  __m256 acc = _mm256_setzero_ps();
#if defined(__AVX512F__)
  {
    const __m512 m16 = _mm512_set1_ps(m);
    __m512 acc16 = _mm512_setzero_ps();
    for (; j + 16 <= n; j += 16) {
      const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(x + j), m16));
      _mm512_storeu_ps(x + j, e);
      acc16 = _mm512_add_ps(acc16, e);
    }
    acc = _mm256_add_ps(_mm512_castps512_ps256(acc16),
                        _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc16), 1)));
  }
#endif
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + j), mv));
    _mm256_storeu_ps(x + j, e);
    acc = _mm256_add_ps(acc, e);
  }
  float sum = hsum8(acc);
  for (; j < n; ++j) {
    const float e = fast_exp(x[j] - m);
    x[j] = e;
    sum += e;
  }
  return sum;
}

template <>
inline void softmax_grad_row<float>(float* p, float* dp, int64_t n, float lse, float delta) {
  int64_t j = 0;
  const __m256 lv = _mm256_set1_ps(lse), dv = _mm256_set1_ps(delta);
#if defined(__AVX512F__)
  {
    const __m512 l16 = _mm512_set1_ps(lse), d16 = _mm512_set1_ps(delta);
    for (; j + 16 <= n; j += 16) {
      const __m512 pv = exp16(_mm512_sub_ps(_mm512_loadu_ps(p + j), l16));
      _mm512_storeu_ps(p + j, pv);
      _mm512_storeu_ps(dp + j, _mm512_mul_ps(pv, _mm512_sub_ps(_mm512_loadu_ps(dp + j), d16)));
    }
  }
#endif
  for (; j + 8 <= n; j += 8) {
    const __m256 pv = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + j), lv));
    _mm256_storeu_ps(p + j, pv);
    _mm256_storeu_ps(dp + j, _mm256_mul_ps(pv, _mm256_sub_ps(_mm256_loadu_ps(dp + j), dv)));
  }
  for (; j < n; ++j) {
    const float pv = fast_exp(p[j] - lse);
    p[j] = pv;
    dp[j] = pv * (dp[j] - delta);
  }
}
#endif

// Inside a parallel task every tile GEMM runs on the calling thread: the tasks already use every
// core, and MKL threads nested under them would oversubscribe the machine. RAII, restores MKL's
// previous per-thread setting.
struct SequentialBlas {
  int previous = 0;
  bool active = false;
  SequentialBlas() {
    if (MKL_Set_Num_Threads_Local != nullptr) {
      previous = MKL_Set_Num_Threads_Local(1);
      active = true;
    }
  }
  ~SequentialBlas() {
    if (active) MKL_Set_Num_Threads_Local(previous);
  }
  SequentialBlas(const SequentialBlas&) = delete;
  SequentialBlas& operator=(const SequentialBlas&) = delete;
};

// Plain row-major C = alpha op(A) op(B) + beta C (the fallback without BLAS).
template <typename T>
inline void gemm_loop(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
                      int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      T acc = 0;
      for (int64_t p = 0; p < k; ++p) {
        const T x = ta ? a[p * lda + i] : a[i * lda + p];
        const T y = tb ? b[j * ldb + p] : b[p * ldb + j];
        acc += x * y;
      }
      c[i * ldc + j] = alpha * acc + (beta == T(0) ? T(0) : beta * c[i * ldc + j]);
    }
  }
}

// Row-major C[m x n] = alpha op(A) op(B) + beta C through column-major BLAS: C^T = op(B)^T op(A)^T,
// i.e. the same call with A and B (and m and n) swapped.
inline void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                 int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (sgemm_ == nullptr || k == 0) {
    gemm_loop<float>(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  const char tA = ta ? 'T' : 'N', tB = tb ? 'T' : 'N';
  const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
  const int LA = static_cast<int>(ldb), LB = static_cast<int>(lda), LC = static_cast<int>(ldc);
  sgemm_(&tB, &tA, &M, &N, &K, &alpha, b, &LA, a, &LB, &beta, c, &LC);
}

inline void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha, const double* a,
                 int64_t lda, const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (dgemm_ == nullptr || k == 0) {
    gemm_loop<double>(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  const char tA = ta ? 'T' : 'N', tB = tb ? 'T' : 'N';
  const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
  const int LA = static_cast<int>(ldb), LB = static_cast<int>(lda), LC = static_cast<int>(ldc);
  dgemm_(&tB, &tA, &M, &N, &K, &alpha, b, &LA, a, &LB, &beta, c, &LC);
}

// Additive masks, in the math type: attn [B?, H?, L?, S] through strides (0 where broadcast) and
// a key padding mask [B, S] (stride 0 over B when shared). Either may be null.
template <typename T>
struct Masks {
  const T* attn = nullptr;
  int64_t a_b = 0, a_h = 0, a_l = 0, a_s = 0;
  const T* pad = nullptr;
  int64_t p_b = 0, p_s = 0;
  int64_t heads = 1;

  // s[i, j] += mask for rows r0 + i, columns s0 + j of head bh.
  void add(T* s, int64_t ld, int64_t bh, int64_t r0, int64_t rows, int64_t s0, int64_t cols) const {
    const int64_t b = bh / heads, h = bh % heads;
    if (attn != nullptr) {
      for (int64_t i = 0; i < rows; ++i) {
        const T* mrow = attn + b * a_b + h * a_h + (r0 + i) * a_l + s0 * a_s;
        T* srow = s + i * ld;
        if (a_s == 1) {
          for (int64_t j = 0; j < cols; ++j) srow[j] += mrow[j];
        } else {
          for (int64_t j = 0; j < cols; ++j) srow[j] += mrow[j * a_s];
        }
      }
    }
    if (pad != nullptr) {
      const T* prow = pad + b * p_b + s0 * p_s;
      for (int64_t i = 0; i < rows; ++i) {
        T* srow = s + i * ld;
        for (int64_t j = 0; j < cols; ++j) srow[j] += prow[j * p_s];
      }
    }
  }
};

// One head-tile of a forward pass: rows [r0, r0 + rows) of state xi (this bh), all S stored
// patterns. dst[rows x dw] = softmax(beta xi K^T + M) W, lse[rows] its row log-sum-exp.
template <typename T>
void retrieve_tile(const T* xi, const T* k, const T* w, int64_t S, int64_t d, int64_t dw, T beta,
                   const Masks<T>& masks, int64_t bh, int64_t r0, int64_t rows, T* dst, T* lse,
                   std::vector<T>& ws) {
  const int64_t st_max = s_tile(rows, S);
  ws.resize(static_cast<size_t>(rows * st_max + 2 * rows));
  T* s = ws.data();
  T* m = s + rows * st_max;
  T* l = m + rows;
  const T ninf = -std::numeric_limits<T>::infinity();
  for (int64_t i = 0; i < rows; ++i) {
    m[i] = ninf;
    l[i] = 0;
  }
  if (S == 0) std::fill(dst, dst + rows * dw, T(0));
  for (int64_t s0 = 0; s0 < S; s0 += st_max) {
    const int64_t st = std::min(st_max, S - s0);
    gemm(false, true, rows, st, d, beta, xi, d, k + s0 * d, d, T(0), s, st);
    masks.add(s, st, bh, r0, rows, s0, st);
    for (int64_t i = 0; i < rows; ++i) {
      T* srow = s + i * st;
      const T mx = row_max(srow, st, m[i]);
      const T corr = online_rescale(m[i], mx);
      T sum = 0;
      if (mx == ninf) {
        for (int64_t j = 0; j < st; ++j) srow[j] = 0;
      } else {
        sum = exp_shift_sum(srow, st, mx);
      }
      l[i] = l[i] * corr + sum;
      m[i] = mx;
      if (s0 != 0 && corr != T(1)) {  // the first tile writes dst (GEMM with beta 0 below)
        T* drow = dst + i * dw;
        for (int64_t j = 0; j < dw; ++j) drow[j] *= corr;
      }
    }
    gemm(false, false, rows, dw, st, T(1), s, st, w + s0 * dw, dw, s0 == 0 ? T(0) : T(1), dst,
         dw);
  }
  for (int64_t i = 0; i < rows; ++i) {
    const T inv = S == 0 ? T(0) : T(1) / l[i];  // no stored pattern: an empty sum, like P @ W
    T* drow = dst + i * dw;
    for (int64_t j = 0; j < dw; ++j) drow[j] *= inv;
    lse[i] = finish_lse(m[i], l[i]);
  }
}

// sum over rows [r0, r0+rows) and all S of (P_a - P_b)^2, P_x = exp(beta xi_x K^T + M - lse_x):
// the exact convergence norm (squared) of hflayers for one head-tile, accumulated in double.
template <typename T>
double diff_sq_tile(const T* xa, const T* lse_a, const T* xb, const T* lse_b, const T* k, int64_t S,
                    int64_t d, T beta, const Masks<T>& masks, int64_t bh, int64_t r0, int64_t rows,
                    std::vector<T>& ws) {
  const int64_t st_max = s_tile(rows, S);
  ws.resize(static_cast<size_t>(2 * rows * st_max));
  T* sa = ws.data();
  T* sb = sa + rows * st_max;
  double acc = 0.0;
  for (int64_t s0 = 0; s0 < S; s0 += st_max) {
    const int64_t st = std::min(st_max, S - s0);
    gemm(false, true, rows, st, d, beta, xa, d, k + s0 * d, d, T(0), sa, st);
    gemm(false, true, rows, st, d, beta, xb, d, k + s0 * d, d, T(0), sb, st);
    masks.add(sa, st, bh, r0, rows, s0, st);
    masks.add(sb, st, bh, r0, rows, s0, st);
    for (int64_t i = 0; i < rows; ++i) {
      acc += exp_diff_sq_row(sa + i * st, sb + i * st, st, lse_a[i], lse_b[i]);
    }
  }
  return acc;
}

// Backward of one step of one head (bh): xi = the step's input state [L, d], lse its row lse,
// w = K (an update step) or V (the last step, dw = dv), g = dL/d(step output) [L, dw],
// delta[i] = sum_j g[i, j] y[i, j] with y the step's output. Writes g_xi [L, d] (= dL/dxi, scaled
// by nothing else) and adds into dk [S, d] and dw_grad [S, dw] (which may alias dk when w = K).
template <typename T>
void backward_step(const T* xi, const T* lse, const T* k, const T* w, const T* g, const T* delta,
                   int64_t L, int64_t S, int64_t d, int64_t dw, T beta, const Masks<T>& masks,
                   int64_t bh, T* g_xi, T* dk, T* dw_grad, std::vector<T>& ws) {
  const int64_t lt_max = std::min<int64_t>(kLTile, std::max<int64_t>(L, 1));
  const int64_t st_max = s_tile(lt_max, S);
  ws.resize(static_cast<size_t>(2 * lt_max * st_max));
  T* p = ws.data();
  T* dp = p + lt_max * st_max;
  std::fill(g_xi, g_xi + L * d, T(0));
  for (int64_t r0 = 0; r0 < L; r0 += lt_max) {
    const int64_t rows = std::min(lt_max, L - r0);
    const T* xr = xi + r0 * d;
    const T* gr = g + r0 * dw;
    for (int64_t s0 = 0; s0 < S; s0 += st_max) {
      const int64_t st = std::min(st_max, S - s0);
      gemm(false, true, rows, st, d, beta, xr, d, k + s0 * d, d, T(0), p, st);
      masks.add(p, st, bh, r0, rows, s0, st);
      gemm(false, true, rows, st, dw, T(1), gr, dw, w + s0 * dw, dw, T(0), dp, st);
      for (int64_t i = 0; i < rows; ++i) {
        softmax_grad_row(p + i * st, dp + i * st, st, lse[r0 + i], delta[r0 + i]);
      }
      // g_xi += beta dS K_t ; dK_t += beta dS^T xi ; dW_t += P^T g
      gemm(false, false, rows, d, st, beta, dp, st, k + s0 * d, d, T(1), g_xi + r0 * d, d);
      gemm(true, false, st, d, rows, beta, dp, st, xr, d, T(1), dk + s0 * d, d);
      gemm(true, false, st, dw, rows, T(1), p, st, gr, dw, T(1), dw_grad + s0 * dw, dw);
    }
  }
}

// sum_i (a[i] - b[i])^2 in double (b may be null: sum of squares), 8 partial sums (independent
// lanes, which the compiler turns into one vector of doubles).
template <typename T>
double sum_sq_diff(const T* a, const T* b, int64_t n) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  if (b != nullptr) {
    for (; i + 8 <= n; i += 8) {
      for (int u = 0; u < 8; ++u) {
        const double x = static_cast<double>(a[i + u]) - static_cast<double>(b[i + u]);
        acc[u] += x * x;
      }
    }
  } else {
    for (; i + 8 <= n; i += 8) {
      for (int u = 0; u < 8; ++u) {
        const double x = static_cast<double>(a[i + u]);
        acc[u] += x * x;
      }
    }
  }
  for (; i < n; ++i) {
    const double x = static_cast<double>(a[i]) - (b ? static_cast<double>(b[i]) : 0.0);
    acc[0] += x * x;
  }
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// delta[i] = sum_j a[i, j] b[i, j] over rows of length n.
// 8 partial sums per row (independent lanes: one vector), added pairwise at the end.
template <typename T>
void row_dots(const T* a, const T* b, int64_t rows, int64_t n, T* out) {
  for (int64_t i = 0; i < rows; ++i) {
    T acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    const T* ar = a + i * n;
    const T* br = b + i * n;
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
      for (int u = 0; u < 8; ++u) acc[u] += ar[j + u] * br[j + u];
    }
    for (; j < n; ++j) acc[0] += ar[j] * br[j];
    out[i] = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  }
}

}  // namespace cpu
}  // namespace hopfield
}  // namespace pypaper
