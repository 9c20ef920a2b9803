// CPU loops of the uniform-quantization ops, torch-free.
//
// Each function handles one flat element range [e0, e1) of a contiguous tensor, so the caller
// chooses the threading (csrc/quant/quant_cpu.cpp splits with at::parallel_for; the ctest suite
// calls them directly). The per-element math is kernels/common/quant_math.h, shared with CUDA.
//
// Loops run over "runs": maximal stretches of consecutive elements whose channel is either
// constant (inner > 1) or increases by one per element (inner == 1, per-channel along the last
// dim). Both shapes give the compiler a plain unit-stride inner loop it can vectorize.
#pragma once
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../common/hash_rng.h"
#include "../common/quant_layout.h"
#include "../common/quant_math.h"
#include "float16.h"

namespace pypaper {
namespace cpu {

using quant::QuantLayout;

// body(e, n, c, step) for each run [e, e + n) whose element e + j uses channel c + j * step,
// step being std::integral_constant<int, 0> or <int, 1>.
template <typename F>
inline void for_each_run(const QuantLayout& L, int64_t e0, int64_t e1, F&& body) {
  int64_t e = e0;
  if (L.inner == 1) {
    while (e < e1) {
      int64_t c = e % L.channels;
      int64_t n = std::min(L.channels - c, e1 - e);
      body(e, n, c, std::integral_constant<int, 1>{});
      e += n;
    }
  } else {
    while (e < e1) {
      int64_t c = (e / L.inner) % L.channels;
      int64_t n = std::min(L.inner - e % L.inner, e1 - e);
      body(e, n, c, std::integral_constant<int, 0>{});
      e += n;
    }
  }
}

// Per-element uniform for stochastic rounding (unused when not STOCHASTIC).
template <bool STOCHASTIC, typename T>
inline T rounding_noise(rng::Key key, int64_t e) {
  if constexpr (STOCHASTIC) {
    return static_cast<T>(rng::uniform01(key, static_cast<uint64_t>(e)));
  } else {
    return T(0);
  }
}

template <bool STOCHASTIC, typename T>
inline T make_code(T x, T inv_scale, T z, T u) {
  if constexpr (STOCHASTIC) {
    return quant::code_stochastic(x, inv_scale, z, u);
  } else {
    return quant::code_nearest(x, inv_scale, z);
  }
}

// y = fake_quant(x) on [e0, e1). scale and zero_point hold one value per channel.
template <typename In, bool STOCHASTIC>
void fake_quantize_range(const In* x, In* y, const typename acc_type<In>::type* scale,
                         const typename acc_type<In>::type* zero_point, QuantLayout L,
                         int32_t qmin_i, int32_t qmax_i, int64_t seed, int64_t e0, int64_t e1) {
  using T = typename acc_type<In>::type;
  const T qmin = static_cast<T>(qmin_i), qmax = static_cast<T>(qmax_i);
  const rng::Key key = rng::make_key(seed);
  for_each_run(L, e0, e1, [&](int64_t e, int64_t n, int64_t c, auto step) {
    constexpr int S = decltype(step)::value;
    const In* __restrict xp = x + e;
    In* __restrict yp = y + e;
    const T* sp = scale + c;
    const T* zp = zero_point + c;
    for (int64_t j = 0; j < n; ++j) {
      const T s = sp[S * j];
      const T z = quant::effective_zero_point(zp[S * j], qmin, qmax);
      const T code = make_code<STOCHASTIC>(static_cast<T>(to_float(xp[j])), T(1) / s, z,
                                           rounding_noise<STOCHASTIC, T>(key, e + j));
      yp[j] = store_as<In>(quant::fake_quant_value(code, z, s, qmin, qmax));
    }
  });
}

// dx on [e0, e1) and, when NEED_SZ, the per-channel sums of the scale and zero-point gradients
// added into ds_sum[c], dz_sum[c] (the caller's buffers, one pair per task).
template <typename In, bool STOCHASTIC, bool NEED_SZ>
void fake_quantize_backward_range(const In* dy, const In* x, In* dx,
                                  const typename acc_type<In>::type* scale,
                                  const typename acc_type<In>::type* zero_point, QuantLayout L,
                                  int32_t qmin_i, int32_t qmax_i, int64_t seed, int64_t e0,
                                  int64_t e1, typename acc_type<In>::type* ds_sum,
                                  typename acc_type<In>::type* dz_sum) {
  using T = typename acc_type<In>::type;
  const T qmin = static_cast<T>(qmin_i), qmax = static_cast<T>(qmax_i);
  const rng::Key key = rng::make_key(seed);
  constexpr int W = 8;  // independent accumulators: lets the compiler vectorize the sums
  for_each_run(L, e0, e1, [&](int64_t e, int64_t n, int64_t c, auto step) {
    constexpr int S = decltype(step)::value;
    T ds_acc[W] = {}, dz_acc[W] = {};
    auto one = [&](int64_t j, int lane) {
      const T s = scale[c + S * j];
      const T z = quant::effective_zero_point(zero_point[c + S * j], qmin, qmax);
      const T xv = static_cast<T>(to_float(x[e + j]));
      const T code = make_code<STOCHASTIC>(xv, T(1) / s, z,
                                           rounding_noise<STOCHASTIC, T>(key, e + j));
      const auto g = quant::fake_quant_grad(static_cast<T>(to_float(dy[e + j])), xv, code, z, s,
                                            T(1) / s, qmin, qmax);
      dx[e + j] = store_as<In>(g.dx);
      if constexpr (NEED_SZ) {
        if constexpr (S == 1) {
          ds_sum[c + j] += g.dscale;
          dz_sum[c + j] += g.dzero_point;
        } else {
          ds_acc[lane] += g.dscale;
          dz_acc[lane] += g.dzero_point;
        }
      }
    };
    int64_t j = 0;
    for (; j + W <= n; j += W) {
      for (int k = 0; k < W; ++k) one(j + k, k);
    }
    for (; j < n; ++j) one(j, 0);
    if constexpr (NEED_SZ && S == 0) {
      T ds = 0, dz = 0;
      for (int k = 0; k < W; ++k) {
        ds += ds_acc[k];
        dz += dz_acc[k];
      }
      ds_sum[c] += ds;
      dz_sum[c] += dz;
    }
  });
}

// Codes q = clamp(code(x)) on [e0, e1), one per element (Out = int8_t or uint8_t).
template <typename In, typename Out>
void quantize_range(const In* x, Out* q, const typename acc_type<In>::type* scale,
                    const typename acc_type<In>::type* zero_point, QuantLayout L, int32_t qmin_i,
                    int32_t qmax_i, int64_t e0, int64_t e1) {
  using T = typename acc_type<In>::type;
  const T qmin = static_cast<T>(qmin_i), qmax = static_cast<T>(qmax_i);
  for_each_run(L, e0, e1, [&](int64_t e, int64_t n, int64_t c, auto step) {
    constexpr int S = decltype(step)::value;
    for (int64_t j = 0; j < n; ++j) {
      const T s = scale[c + S * j];
      const T z = quant::effective_zero_point(zero_point[c + S * j], qmin, qmax);
      const T code = quant::code_nearest(static_cast<T>(to_float(x[e + j])), T(1) / s, z);
      // A NaN input has no code; it is stored as the zero point.
      const T qv = code == code ? quant::clamp(code, qmin, qmax) : z;
      q[e + j] = static_cast<Out>(static_cast<int32_t>(qv));
    }
  });
}

// y = (q - z) * s on [e0, e1), one code per element.
template <typename Code, typename Out>
void dequantize_range(const Code* q, Out* y, const typename acc_type<Out>::type* scale,
                      const typename acc_type<Out>::type* zero_point, QuantLayout L,
                      int32_t qmin_i, int32_t qmax_i, int64_t e0, int64_t e1) {
  using T = typename acc_type<Out>::type;
  const T qmin = static_cast<T>(qmin_i), qmax = static_cast<T>(qmax_i);
  for_each_run(L, e0, e1, [&](int64_t e, int64_t n, int64_t c, auto step) {
    constexpr int S = decltype(step)::value;
    for (int64_t j = 0; j < n; ++j) {
      const T z = quant::effective_zero_point(zero_point[c + S * j], qmin, qmax);
      y[e + j] = store_as<Out>(quant::mul_rn(static_cast<T>(q[e + j]) - z, scale[c + S * j]));
    }
  });
}

// Packed codes (bits <= 4): rows [r0, r1) of a [rows, last_dim] tensor, two codes per byte
// (packed row length (last_dim + 1) / 2; an odd row ends in a half-used byte whose high nibble is 0).
template <typename In>
void quantize_packed_rows(const In* x, uint8_t* q, const typename acc_type<In>::type* scale,
                          const typename acc_type<In>::type* zero_point, QuantLayout L,
                          int32_t qmin_i, int32_t qmax_i, int64_t last_dim, int64_t r0,
                          int64_t r1) {
  using T = typename acc_type<In>::type;
  const T qmin = static_cast<T>(qmin_i), qmax = static_cast<T>(qmax_i);
  const int64_t packed = (last_dim + 1) / 2;
  auto code_at = [&](int64_t e) -> int32_t {
    const int64_t c = L.channel_of(e);
    const T z = quant::effective_zero_point(zero_point[c], qmin, qmax);
    const T code = quant::code_nearest(static_cast<T>(to_float(x[e])), T(1) / scale[c], z);
    return static_cast<int32_t>(code == code ? quant::clamp(code, qmin, qmax) : z);
  };
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t base = r * last_dim;
    for (int64_t j = 0; j < packed; ++j) {
      const int64_t l = 2 * j;
      const int32_t lo = code_at(base + l);
      const int32_t hi = l + 1 < last_dim ? code_at(base + l + 1) : 0;
      q[r * packed + j] = quant::pack_nibbles(lo, hi);
    }
  }
}

template <typename Out>
void dequantize_packed_rows(const uint8_t* q, Out* y, const typename acc_type<Out>::type* scale,
                            const typename acc_type<Out>::type* zero_point, QuantLayout L,
                            int32_t qmin_i, int32_t qmax_i, int64_t last_dim, int64_t r0,
                            int64_t r1) {
  using T = typename acc_type<Out>::type;
  const T qmin = static_cast<T>(qmin_i), qmax = static_cast<T>(qmax_i);
  const bool is_signed = qmin_i < 0;
  const int64_t packed = (last_dim + 1) / 2;
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t l = 0; l < last_dim; ++l) {
      const int64_t e = r * last_dim + l;
      const int64_t c = L.channel_of(e);
      const T z = quant::effective_zero_point(zero_point[c], qmin, qmax);
      const int32_t code = quant::unpack_nibble(q[r * packed + l / 2], static_cast<int>(l & 1), is_signed);
      y[e] = store_as<Out>(quant::mul_rn(static_cast<T>(code) - z, scale[c]));
    }
  }
}

}  // namespace cpu
}  // namespace pypaper
