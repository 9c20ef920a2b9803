// CPU loops of the power-exponent quantizer (kernels/common/power_quant_math.h), torch-free.
//
// A tensor is seen as [channels, inner] (contiguous); channel c has the range m[c] and uses the
// exponent of index c (per-channel exponents) or 0 (one exponent). Unit tables, one row per
// exponent, hold the m = 1 thresholds t[0..P-1], levels l[0..qmax] and dl/da[0..qmax] in double;
// each loop scales them by m[c] once per channel run, then runs a compare-count per element (a
// linear count that vectorizes for bits <= 5, a branch-free binary search above).
// Each function handles one flat element range [e0, e1): the caller picks the threading
// (csrc/quant/power_cpu.cpp: at::parallel_for), the ctest suite calls them directly.
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>

#include "../common/power_quant_math.h"

namespace pypaper {
namespace cpu {
namespace pw {

using namespace ::pypaper::power;

// Unit tables for one exponent a: thr has P entries, lvl and lda qmax + 1.
struct UnitTables {
  int qmax = 0, P = 0;
  std::vector<double> thr, lvl, lda;  // [E * P], [E * (qmax+1)], [E * (qmax+1)]

  UnitTables(const double* exponents, int64_t n_exp, int qmax_) : qmax(qmax_), P(table_pow2(qmax_)) {
    thr.assign(static_cast<size_t>(n_exp * P), 0.0);
    lvl.assign(static_cast<size_t>(n_exp * (qmax + 1)), 0.0);
    lda.assign(static_cast<size_t>(n_exp * (qmax + 1)), 0.0);
    for (int64_t e = 0; e < n_exp; ++e) {
      const double inv_a = 1.0 / exponents[e];
      for (int k = 1; k <= qmax; ++k) thr[e * P + k] = unit_threshold(k, qmax, inv_a);
      for (int k = 0; k <= qmax; ++k) {
        lvl[e * (qmax + 1) + k] = unit_level(k, qmax, inv_a);
        lda[e * (qmax + 1) + k] = unit_level_da(k, qmax, inv_a);
      }
    }
  }
  const double* thr_of(int64_t e) const { return thr.data() + e * P; }
  const double* lvl_of(int64_t e) const { return lvl.data() + e * (qmax + 1); }
  const double* lda_of(int64_t e) const { return lda.data() + e * (qmax + 1); }
};

struct Layout {
  int64_t channels;  // number of ranges m
  int64_t inner;     // elements per channel
  bool per_channel_exponent;
};

// body(e, n, c): the run [e, e + n) lies in channel c.
template <typename F>
inline void for_each_channel_run(const Layout& L, int64_t e0, int64_t e1, F&& body) {
  int64_t e = e0;
  while (e < e1) {
    const int64_t c = e / L.inner;
    const int64_t n = std::min(L.inner - e % L.inner, e1 - e);
    body(e, n, c);
    e += n;
  }
}

// The scaled tables of one channel (on the stack: 2 * 128 values).
template <typename T>
struct ChannelTables {
  alignas(64) T thr[kMaxTable];
  alignas(64) T lvl[kMaxTable];
  T m;
  int P, qmax;

  ChannelTables(const UnitTables& U, const Layout& L, int64_t c, T m_) : m(m_), P(U.P), qmax(U.qmax) {
    const int64_t e = L.per_channel_exponent ? c : 0;
    scale_thresholds<T>(thr, U.thr_of(e), static_cast<double>(m_), U.qmax, U.P);
    scale_levels<T>(lvl, U.lvl_of(e), static_cast<double>(m_), U.qmax, U.P);
  }
};

// Count and level functors for a run, dispatched on P so the linear forms have a compile-time
// trip count: bits <= 6 use the compare-count / select chain (vectorized across elements, no
// gathers), 7 and 8 bits the binary search and a table lookup.
template <typename T, int P>
struct Linear {
  static int count(T ax, const T* thr) { return code_linear<T, P>(ax, thr); }
  static T level(T ax, const T* thr, const T* lvl) { return level_linear<T, P>(ax, thr, lvl); }
};

template <typename T, int P>
struct Search {
  static int count(T ax, const T* thr) { return code_search<T>(ax, thr, P); }
  static T level(T ax, const T* thr, const T* lvl) { return lvl[code_search<T>(ax, thr, P)]; }
};

template <typename T, typename F>
inline void with_counter(int P, F&& f) {
  switch (P) {
    case 2: f(Linear<T, 2>{}); break;
    case 4: f(Linear<T, 4>{}); break;
    case 8: f(Linear<T, 8>{}); break;
    case 16: f(Linear<T, 16>{}); break;
    case 32: f(Linear<T, 32>{}); break;
    case 64: f(Search<T, 64>{}); break;
    default: f(Search<T, 128>{}); break;
  }
}

// int8 codes sign(x) * c on [e0, e1).
template <typename T>
void quantize_range(const T* x, int8_t* q, const T* m, const UnitTables& U, const Layout& L,
                    int64_t e0, int64_t e1) {
  with_counter<T>(U.P, [&](auto fn) {
    for_each_channel_run(L, e0, e1, [&](int64_t e, int64_t n, int64_t c) {
      const ChannelTables<T> tb(U, L, c, m[c]);
      const T* __restrict xp = x + e;
      int8_t* __restrict qp = q + e;
      for (int64_t j = 0; j < n; ++j) {
        const T v = xp[j];
        qp[j] = static_cast<int8_t>(signed_code(v, fn.count(std::abs(v), tb.thr)));
      }
    });
  });
}

// y = level of code on [e0, e1).
template <typename T>
void dequantize_range(const int8_t* q, T* y, const T* m, const UnitTables& U, const Layout& L,
                      int64_t e0, int64_t e1) {
  for_each_channel_run(L, e0, e1, [&](int64_t e, int64_t n, int64_t c) {
    const ChannelTables<T> tb(U, L, c, m[c]);
    const int8_t* __restrict qp = q + e;
    T* __restrict yp = y + e;
    for (int64_t j = 0; j < n; ++j) yp[j] = level_of_code<T>(qp[j], tb.lvl, U.qmax);
  });
}

// y = dequantize(quantize(x)) on [e0, e1).
template <typename T>
void fake_quantize_range(const T* x, T* y, const T* m, const UnitTables& U, const Layout& L,
                         int64_t e0, int64_t e1) {
  with_counter<T>(U.P, [&](auto fn) {
    for_each_channel_run(L, e0, e1, [&](int64_t e, int64_t n, int64_t c) {
      const ChannelTables<T> tb(U, L, c, m[c]);
      const T* __restrict xp = x + e;
      T* __restrict yp = y + e;
      for (int64_t j = 0; j < n; ++j) {
        const T v = xp[j];
        yp[j] = fake_value(v, fn.level(std::abs(v), tb.thr, tb.lvl));
      }
    });
  });
}

// dx on [e0, e1) (straight-through inside |x| <= m), and when da / dm are non-null the sums
// over the range of g * dy/da and g * dy/dm, added into da[c] and dm[c] of each channel c met.
template <typename T>
void backward_range(const T* g, const T* x, T* dx, const T* m, const UnitTables& U,
                    const Layout& L, int64_t e0, int64_t e1, double* da, double* dm,
                    bool ste = false, const double* exponents = nullptr) {
  with_counter<T>(U.P, [&](auto fn) {
    for_each_channel_run(L, e0, e1, [&](int64_t e, int64_t n, int64_t c) {
      const T mc = m[c];
      const T* __restrict gp = g + e;
      const T* __restrict xp = x + e;
      T* __restrict dxp = dx + e;
      for (int64_t j = 0; j < n; ++j) dxp[j] = std::abs(xp[j]) <= mc ? gp[j] : T(0);
      if (da == nullptr) return;
      const ChannelTables<T> tb(U, L, c, mc);
      const int64_t ei = L.per_channel_exponent ? c : 0;
      const double* lda = U.lda_of(ei);
      const double* lvl = U.lvl_of(ei);
      const double md = mc > T(0) ? static_cast<double>(mc) : 0.0;
      if (ste) {  // per-element terms (one log and one exp each): the learned variant's backward
        const double a = exponents[ei];
        double sa = 0.0, sm = 0.0;
        for (int64_t j = 0; j < n; ++j) {
          const T v = xp[j];
          const T av = std::abs(v);
          const int k = fn.count(av, tb.thr);
          const SteTerms t = ste_terms<T>(av, k, mc, a, U.qmax, lvl[k], lda[k]);
          const double gj = v < T(0) ? -static_cast<double>(gp[j]) : static_cast<double>(gp[j]);
          sa += gj * t.da;
          sm += gj * t.dm;
        }
        da[c] += sa;
        dm[c] += sm;
        return;
      }
      // Sum g * sign(x) per code first (qmax + 1 bins), then weight the bins: one multiply per
      // element instead of two, and the double products only qmax + 1 times.
      double bins[kMaxTable] = {0.0};
      for (int64_t j = 0; j < n; ++j) {
        const T v = xp[j];
        const int k = fn.count(std::abs(v), tb.thr);
        const double gj = static_cast<double>(gp[j]);
        bins[k] += v < T(0) ? -gj : gj;
      }
      double sa = 0.0, sm = 0.0;
      for (int k = 1; k <= U.qmax; ++k) {
        sa += bins[k] * md * lda[k];
        sm += bins[k] * lvl[k];
      }
      da[c] += sa;
      dm[c] += sm;
    });
  });
}

}  // namespace pw
}  // namespace cpu
}  // namespace pypaper
