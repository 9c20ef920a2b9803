// CPU row loops of pypaper.local's fused local-loss layers, torch-free (math:
// kernels/common/local_math.h). The two GEMMs of a layer (z = x W^T and dW = dZ^T x) are done by
// the caller with torch's GEMM; everything elementwise between them is one of these loops, each a
// single pass over a block of output rows that the GEMM has just written (cache-resident):
// scale by 1/||x|| and add the bias, the activation, the row's local loss, and dZ, with the bias
// gradient summed per block (partial sums added in block order: the same bits on any number of
// threads).
//
// Layout: row-major with unit stride along the features; `ld` is the row stride in elements.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../common/local_math.h"
#include "float16.h"

// The kLanes-wide vector-extension values (Lanes) are passed by value between inlined helpers; on
// builds without AVX-512 GCC notes that such a return "changes the ABI" (-Wpsabi): nothing here
// crosses a library boundary.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace pypaper {
namespace cpu {
namespace local {

using namespace ::pypaper::local;

// Rows per block of the epilogues: the unit of work handed to a thread and of the bias-gradient
// partial sums. Fixed (not derived from the thread count) so results do not depend on it.
constexpr int64_t kRowBlock = 16;

inline int64_t num_blocks(int64_t n) { return (n + kRowBlock - 1) / kRowBlock; }

// sum_j f(j) over [0, m) with kLanes independent partial sums (lane u takes j = u mod kLanes,
// added up at the end): a single running sum is a chain of dependent adds the compiler may not
// reorder (no -ffast-math), which would cost ~4 cycles per element; the lanes vectorize.
// The order is fixed, so the result does not depend on the thread count.
constexpr int kLanes = 16;

// kLanes lanes of T as one GCC / Clang vector-extension value: one zmm register for fp32 on
// AVX-512, split into narrower registers by the compiler elsewhere; lane u of a Lanes value is
// lane u of lane_sum. (The attribute must sit on a non-dependent typedef: on `T` inside a
// template GCC ignores it, with only a warning.)
template <typename T>
struct Lanes;
template <>
struct Lanes<float> {
  typedef float type __attribute__((vector_size(sizeof(float) * kLanes)));
};
template <>
struct Lanes<double> {
  typedef double type __attribute__((vector_size(sizeof(double) * kLanes)));
};

template <typename T, typename F>
inline T lane_sum(int64_t m, F&& f) {
  T acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= m; j += kLanes) {
    for (int u = 0; u < kLanes; ++u) acc[u] += f(j + u);
  }
  for (int u = 0; j < m; ++j, ++u) acc[u] += f(j);
  T s = 0;
  for (int u = 0; u < kLanes; ++u) s += acc[u];
  return s;
}

// inv[r] = 1 / (||x_r||_2 + eps): the Forward-Forward input normalisation x_hat = x / ||x||,
// applied to the GEMM's output rows instead of to x (z = diag(inv) x W^T, dW = (diag(inv) dZ)^T x).
template <typename In, typename T>
void row_inv_norms(const In* x, int64_t ld, int64_t d, int64_t r0, int64_t r1, T eps, T* inv) {
  for (int64_t r = r0; r < r1; ++r) {
    const In* xr = x + r * ld;
    const T s = lane_sum<T>(d, [&](int64_t j) {
      const T v = static_cast<T>(to_float(xr[j]));
      return v * v;
    });
    inv[r] = T(1) / (std::sqrt(s) + eps);
  }
}

// Forward-Forward epilogue of rows [r0, r1): z (the GEMM output x W^T, [N, m]) is overwritten by
// h = ReLU(inv_r z + b); dz gets inv_r * dloss/dz (the factor that turns dZ^T x into dZ^T x_hat);
// row_loss[r] = weight_r * softplus(s_r (theta - g_r)); db[j] += dloss/dz_rj. Rows r < num_pos are
// positive (s = +1, weight w_pos), the others negative (s = -1, weight w_neg). `tmp`: m scratch
// values of T.
template <typename In, typename T>
void ff_rows(In* z, int64_t m, const T* inv, const In* bias, int64_t r0, int64_t r1,
             int64_t num_pos, T theta, T w_pos, T w_neg, In* dz, T* row_loss, T* db, T* tmp) {
  for (int64_t r = r0; r < r1; ++r) {
    In* zr = z + r * m;
    In* dr = dz + r * m;
    const T sc = inv ? inv[r] : T(1);
    const T g = lane_sum<T>(m, [&](int64_t j) {
      T v = sc * static_cast<T>(to_float(zr[j]));
      if (bias) v += static_cast<T>(to_float(bias[j]));
      const T h = v > T(0) ? v : T(0);
      tmp[j] = h;
      return h * h;
    });
    const bool pos = r < num_pos;
    const T s = pos ? T(1) : T(-1);
    const T w = pos ? w_pos : w_neg;
    row_loss[r] = w * ff_row_loss(g, theta, s);
    const T c = T(2) * w * ff_row_dgood(g, theta, s);
    for (int64_t j = 0; j < m; ++j) {
      const T d = c * tmp[j];
      zr[j] = store_as<In>(tmp[j]);
      dr[j] = store_as<In>(d * sc);
      db[j] += d;
    }
  }
}

// Target-projection epilogue of rows [r0, r1): z is overwritten by h = act(z + b); with the
// target t = proj[y_r] (a row of P^T: the column of P picked by the label, no matmul) or its
// sign, row_loss[r] = scale/2 * ||h - t||^2 and dz = scale * (h - t) act'(z); db[j] += dz.
// The activation and the sign variant are template arguments, so the row loop has no branch on
// them and vectorizes.
template <typename In, typename T, int ACT, bool SIGN>
void tp_rows(In* z, int64_t m, const In* bias, const T* proj, const int64_t* y, T scale,
             int64_t r0, int64_t r1, In* dz, T* row_loss, T* db) {
  for (int64_t r = r0; r < r1; ++r) {
    In* zr = z + r * m;
    In* dr = dz + r * m;
    const T* t = proj + y[r] * m;
    const T l = lane_sum<T>(m, [&](int64_t j) {
      T v = static_cast<T>(to_float(zr[j]));
      if (bias) v += static_cast<T>(to_float(bias[j]));
      const T h = tp_act(v, ACT);
      const T e = h - tp_target(t[j], SIGN);
      const T d = scale * e * tp_act_grad(v, h, ACT);
      zr[j] = store_as<In>(h);
      dr[j] = store_as<In>(d);
      db[j] += d;
      return e * e;
    });
    row_loss[r] = T(0.5) * scale * l;
  }
}

// Softmax cross-entropy of rows [r0, r1) of logits [N, k] (math type, scaled by `inv_temp`
// first): row_loss[r] = scale * (logsumexp - logit_y); dlogits = scale * inv_temp *
// (softmax - onehot(y)) (the gradient w.r.t. the unscaled logits).
template <typename T>
void ce_rows(const T* logits, int64_t k, const int64_t* y, T inv_temp, T scale, int64_t r0,
             int64_t r1, T* dlogits, T* row_loss) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* lr = logits + r * k;
    T* dr = dlogits + r * k;
    T mx = -INFINITY;
    for (int64_t j = 0; j < k; ++j) mx = std::max(mx, inv_temp * lr[j]);
    T se = 0;
    for (int64_t j = 0; j < k; ++j) {
      const T e = std::exp(inv_temp * lr[j] - mx);
      dr[j] = e;
      se += e;
    }
    const T lse = mx + std::log(se);
    row_loss[r] = scale * (lse - inv_temp * lr[y[r]]);
    const T is = T(1) / se;
    for (int64_t j = 0; j < k; ++j) dr[j] = scale * inv_temp * (dr[j] * is - (j == y[r] ? T(1) : T(0)));
  }
}

// Single-forward Forward-Forward (ForwardGNN's "SF"), first pass of a row block: h rows (out,
// which may be z itself) = ReLU(inv_r z + b), and the same h in the math type goes to hm
// [rows, m] (the operand of the block's logits h E^T; for fp32 hm may be out's rows).
template <typename In, typename T>
void sf_rows_h(const In* z, In* out, int64_t m, const T* inv, const In* bias, int64_t r0,
               int64_t r1, T* hm) {
  for (int64_t r = r0; r < r1; ++r) {
    const In* zr = z + r * m;
    In* orow = out + r * m;
    T* hr = hm + (r - r0) * m;
    const T sc = inv ? inv[r] : T(1);
    for (int64_t j = 0; j < m; ++j) {
      T v = sc * static_cast<T>(to_float(zr[j]));
      if (bias) v += static_cast<T>(to_float(bias[j]));
      const T h = v > T(0) ? v : T(0);
      hr[j] = h;
      orow[j] = store_as<In>(h);
    }
  }
}

// The class-similarity part and the backward of a row block of the single-forward FF, in one
// pass over the block's cache-resident h rows and without GEMM calls (k, the class count, is
// small: skinny GEMMs run far below peak): for each row, logits_c = h . E_c (vectorized dot
// products, fixed lane order), the CE (ce_rows) giving dlogits; then row by row
// dh = sum_c dlogits_c E_c (c outer, j inner: unit stride, into the scratch dh [>= 128]),
// dE += dlogits^T h (de: k x m, the group's own partial), and straight away through the ReLU:
// dz = inv_r * dh * 1[h > 0], db[j] += dh_j 1[h_j > 0] (db: the group's partial).
// hm: the block's h rows (rows r0 .. r1 - 1) in the math type; lg: [rows, k] scratch.
template <typename In, typename T>
void sf_block_epilogue(const T* hm, int64_t r0, int64_t r1, int64_t m, const T* emb, int64_t k,
                       const int64_t* y, T inv_temp, T scale, const T* inv, T* lg, T* dlogits,
                       T* row_loss, T* dh, T* de, In* dz, T* db) {
  const int64_t rows = r1 - r0;
  // logits_ic = h_i . E_c, kLanes lanes exactly as lane_sum (lane u takes j = u mod kLanes in
  // increasing j, the tail from lane 0 on, then the lanes added in order), kSfSub rows at a time
  // per class so that each vector of E_c is loaded once for those rows. The kSfSub x kLanes
  // partial sums are a local of the class loop, kept in registers across j.
  constexpr int64_t kSfSub = 4;
  const int64_t main = m / kLanes * kLanes;
  using V = typename Lanes<T>::type;
  const auto load = [](const T* p) {
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
  };
  int64_t i0 = 0;
  for (; i0 + kSfSub <= rows; i0 += kSfSub) {
    const T* h0 = hm + i0 * m;
    for (int64_t c = 0; c < k; ++c) {
      const T* e = emb + c * m;
      V a0 = {}, a1 = {}, a2 = {}, a3 = {};
      for (int64_t j = 0; j < main; j += kLanes) {
        const V ev = load(e + j);
        a0 += load(h0 + j) * ev;
        a1 += load(h0 + m + j) * ev;
        a2 += load(h0 + 2 * m + j) * ev;
        a3 += load(h0 + 3 * m + j) * ev;
      }
      const V* acc[kSfSub] = {&a0, &a1, &a2, &a3};
      for (int64_t i = 0; i < kSfSub; ++i) {
        T a[kLanes];
        std::memcpy(a, acc[i], sizeof(V));
        for (int64_t j = main, u = 0; j < m; ++j, ++u) a[u] += h0[i * m + j] * e[j];
        T sum = 0;
        for (int u = 0; u < kLanes; ++u) sum += a[u];
        lg[(i0 + i) * k + c] = sum;
      }
    }
  }
  for (; i0 < rows; ++i0) {
    const T* hr = hm + i0 * m;
    for (int64_t c = 0; c < k; ++c) {
      const T* e = emb + c * m;
      lg[i0 * k + c] = lane_sum<T>(m, [&](int64_t j) { return hr[j] * e[j]; });
    }
  }
  ce_rows<T>(lg, k, y, inv_temp, scale, 0, rows, dlogits, row_loss);
  // Column tiles of kSfCols features: the tile's slice of E and of the dE partial (k x kSfCols)
  // stay in L1 while all the block's rows go through it (a whole row would stream all of E and
  // dE, k x m each, from L2 once per row). Per element the sums run in the same order as row by
  // row (dh_j over c in order, dE_cj and db_j over the rows in order).
  constexpr int64_t kSfCols = 128;
  // Full tiles, in registers (GCC vector extensions, V as above): dh of a row is kVecs vectors
  // summed over the classes without touching memory; the dE partial is loaded and stored once per
  // kSfSub rows (their terms added in row order). The scalar form of the tail tile (and of the
  // earlier version) updated dh and dE in memory per class and row, and its loads waited on its
  // own stores: the epilogue took 15% of the layer's time against 66% for the two GEMMs.
  constexpr int kVecs = static_cast<int>(kSfCols / kLanes);
  const auto store = [](T* p, const V& v) { std::memcpy(p, &v, sizeof(V)); };
  for (int64_t j0 = 0; j0 + kSfCols <= m; j0 += kSfCols) {
    for (int64_t i0 = 0; i0 < rows; i0 += kSfSub) {
      const int64_t in = std::min(kSfSub, rows - i0);
      for (int64_t c = 0; c < k; ++c) {
        T* dc = de + c * m + j0;
        for (int v = 0; v < kVecs; ++v) {
          V acc = load(dc + v * kLanes);
          for (int64_t i = 0; i < in; ++i)
            acc += dlogits[(i0 + i) * k + c] * load(hm + (i0 + i) * m + j0 + v * kLanes);
          store(dc + v * kLanes, acc);
        }
      }
      for (int64_t i = i0; i < i0 + in; ++i) {
        const T* dl = dlogits + i * k;
        const T* hr = hm + i * m + j0;
        V g[kVecs];
#pragma GCC unroll 8
        for (int v = 0; v < kVecs; ++v) g[v] = dl[0] * load(emb + j0 + v * kLanes);
        for (int64_t c = 1; c < k; ++c) {
          const T a = dl[c];
          const T* e = emb + c * m + j0;
#pragma GCC unroll 8
          for (int v = 0; v < kVecs; ++v) g[v] += a * load(e + v * kLanes);
        }
        In* dr = dz + (r0 + i) * m + j0;
        T* dbj = db + j0;
        const T sc = inv ? inv[r0 + i] : T(1);
#pragma GCC unroll 8
        for (int v = 0; v < kVecs; ++v) {
          const V hv = load(hr + v * kLanes);
          const V gv = hv > V{} ? g[v] : V{};
          store(dbj + v * kLanes, load(dbj + v * kLanes) + gv);
          const V out = gv * sc;
          if constexpr (std::is_same_v<In, T>) {
            store(dr + v * kLanes, out);
          } else {
            T tmp[kLanes];
            std::memcpy(tmp, &out, sizeof(V));
            for (int u = 0; u < kLanes; ++u) dr[v * kLanes + u] = store_as<In>(tmp[u]);
          }
        }
      }
    }
  }
  // The tail tile (m not a multiple of kSfCols), in scalar form, the same sums in the same order.
  for (int64_t j0 = m / kSfCols * kSfCols; j0 < m; j0 += kSfCols) {
    const int64_t jn = m - j0;
    for (int64_t i = 0; i < rows; ++i) {
      const T* dl = dlogits + i * k;
      const T* hr = hm + i * m + j0;
      T* g = dh;
      {
        const T a = dl[0];
        const T* e = emb + j0;
        T* dc = de + j0;
        for (int64_t j = 0; j < jn; ++j) {
          g[j] = a * e[j];
          dc[j] += a * hr[j];
        }
      }
      for (int64_t c = 1; c < k; ++c) {
        const T a = dl[c];
        const T* e = emb + c * m + j0;
        T* dc = de + c * m + j0;
        for (int64_t j = 0; j < jn; ++j) {
          g[j] += a * e[j];
          dc[j] += a * hr[j];
        }
      }
      In* dr = dz + (r0 + i) * m + j0;
      T* dbj = db + j0;
      const T sc = inv ? inv[r0 + i] : T(1);
      for (int64_t j = 0; j < jn; ++j) {
        const T gj = hr[j] > T(0) ? g[j] : T(0);
        dr[j] = store_as<In>(gj * sc);
        dbj[j] += gj;
      }
    }
  }
}

// Global average pooling of rows [r0, r1) of feat [N, C, S] (S spatial positions, contiguous):
// pooled[r, c] = mean_s feat[r, c, s] in the math type.
template <typename In, typename T>
void pool_rows(const In* feat, int64_t c, int64_t s, int64_t r0, int64_t r1, T* pooled) {
  const T inv = s > 0 ? T(1) / T(s) : T(0);
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t ch = 0; ch < c; ++ch) {
      const In* p = feat + (r * c + ch) * s;
      T acc = 0;
      for (int64_t i = 0; i < s; ++i) acc += static_cast<T>(to_float(p[i]));
      pooled[r * c + ch] = acc * inv;
    }
  }
}

}  // namespace local
}  // namespace cpu
}  // namespace pypaper

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
