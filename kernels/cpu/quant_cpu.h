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

// s, 1/s and the effective zero point of channel c. In a constant-channel run (S == 0) the loops
// take them once before the loop: the compiler cannot hoist the loads itself, since the output
// might alias the scales.
template <typename T>
struct ChannelParams {
  T s, inv, z;
};

template <typename T>
inline ChannelParams<T> channel_params(const T* scale, const T* zero_point, int64_t c, T qmin,
                                       T qmax) {
  const T s = scale[c];
  return ChannelParams<T>{s, T(1) / s, quant::effective_zero_point(zero_point[c], qmin, qmax)};
}

// Parameters of element j of a run starting at channel c: hoisted p0 when S == 0.
template <int S, typename T>
inline ChannelParams<T> params_at(const ChannelParams<T>& p0, const T* scale, const T* zero_point,
                                  int64_t c, int64_t j, T qmin, T qmax) {
  if constexpr (S == 0) {
    return p0;
  } else {
    return channel_params(scale, zero_point, c + j, qmin, qmax);
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
    const auto p0 = channel_params(scale, zero_point, c, qmin, qmax);
    for (int64_t j = 0; j < n; ++j) {
      const auto p = params_at<S>(p0, scale, zero_point, c, j, qmin, qmax);
      const T code = make_code<STOCHASTIC>(static_cast<T>(to_float(xp[j])), p.inv, p.z,
                                           rounding_noise<STOCHASTIC, T>(key, e + j));
      yp[j] = store_as<In>(quant::fake_quant_value(code, p.z, p.s, qmin, qmax));
    }
  });
}

// dx and the per-element scale / zero-point gradient terms of n elements starting at flat index
// e, whose channel parameters start at scale[0] (S == 0: all of them use it; S == 1: element j
// uses scale[j]). A plain function with restrict pointers, so the compiler vectorizes it.
template <typename In, bool STOCHASTIC, int S>
inline void backward_block(const In* __restrict dy, const In* __restrict x, In* __restrict dx,
                           const typename acc_type<In>::type* __restrict scale,
                           const typename acc_type<In>::type* __restrict zero_point,
                           typename acc_type<In>::type qmin, typename acc_type<In>::type qmax,
                           rng::Key key, int64_t e, int64_t n,
                           typename acc_type<In>::type* __restrict ds_buf,
                           typename acc_type<In>::type* __restrict dz_buf) {
  using T = typename acc_type<In>::type;
  const auto p0 = channel_params(scale, zero_point, 0, qmin, qmax);
  for (int64_t j = 0; j < n; ++j) {
    const auto p = params_at<S>(p0, scale, zero_point, 0, j, qmin, qmax);
    const T xv = static_cast<T>(to_float(x[j]));
    const T code = make_code<STOCHASTIC>(xv, p.inv, p.z, rounding_noise<STOCHASTIC, T>(key, e + j));
    const auto g = quant::fake_quant_grad(static_cast<T>(to_float(dy[j])), xv, code, p.z, p.s,
                                          p.inv, qmin, qmax);
    dx[j] = store_as<In>(g.dx);
    ds_buf[j] = g.dscale;
    dz_buf[j] = g.dzero_point;
  }
}

// dx on [e0, e1) and, when NEED_SZ, the per-channel sums of the scale and zero-point gradients
// added into ds_sum[c - c_base], dz_sum[c - c_base] (the caller's buffers, one pair per task,
// covering the channels the task's range touches from c_base on).
// Runs are cut into blocks of kBlock elements: the per-element terms go to a stack buffer in a
// loop without a reduction (which the compiler vectorizes), then the buffer is summed with
// kLanes independent accumulators (which it also vectorizes, unlike one serial float sum).
template <typename In, bool STOCHASTIC, bool NEED_SZ>
void fake_quantize_backward_range(const In* dy, const In* x, In* dx,
                                  const typename acc_type<In>::type* scale,
                                  const typename acc_type<In>::type* zero_point, QuantLayout L,
                                  int32_t qmin_i, int32_t qmax_i, int64_t seed, int64_t e0,
                                  int64_t e1, typename acc_type<In>::type* ds_sum,
                                  typename acc_type<In>::type* dz_sum, int64_t c_base = 0) {
  using T = typename acc_type<In>::type;
  constexpr int64_t kBlock = 512;
  constexpr int kLanes = 16;
  const T qmin = static_cast<T>(qmin_i), qmax = static_cast<T>(qmax_i);
  const rng::Key key = rng::make_key(seed);
  for_each_run(L, e0, e1, [&](int64_t e_run, int64_t n_run, int64_t c_run, auto step) {
    constexpr int S = decltype(step)::value;
    T ds_acc[kLanes] = {}, dz_acc[kLanes] = {};
    for (int64_t b = 0; b < n_run; b += kBlock) {
      const int64_t e = e_run + b, c = c_run + S * b, n = std::min(kBlock, n_run - b);
      T ds_buf[kBlock], dz_buf[kBlock];
      backward_block<In, STOCHASTIC, S>(dy + e, x + e, dx + e, scale + c, zero_point + c, qmin,
                                        qmax, key, e, n, ds_buf, dz_buf);
      if constexpr (NEED_SZ) {
        if constexpr (S == 1) {
          for (int64_t j = 0; j < n; ++j) {
            ds_sum[c - c_base + j] += ds_buf[j];
            dz_sum[c - c_base + j] += dz_buf[j];
          }
        } else {
          int64_t j = 0;
          for (; j + kLanes <= n; j += kLanes) {
            for (int k = 0; k < kLanes; ++k) {
              ds_acc[k] += ds_buf[j + k];
              dz_acc[k] += dz_buf[j + k];
            }
          }
          for (; j < n; ++j) {
            ds_acc[0] += ds_buf[j];
            dz_acc[0] += dz_buf[j];
          }
        }
      }
    }
    if constexpr (NEED_SZ && S == 0) {
      T ds = 0, dz = 0;
      for (int k = 0; k < kLanes; ++k) {
        ds += ds_acc[k];
        dz += dz_acc[k];
      }
      ds_sum[c_run - c_base] += ds;
      dz_sum[c_run - c_base] += dz;
    }
  });
}

// Codes q = clamp(code(x)) on [e0, e1), one per element (Out = int8_t or uint8_t).
// q points at the code of element e0 (so a caller can fill a small buffer).
template <typename In, typename Out>
void quantize_range(const In* x, Out* q, const typename acc_type<In>::type* scale,
                    const typename acc_type<In>::type* zero_point, QuantLayout L, int32_t qmin_i,
                    int32_t qmax_i, int64_t e0, int64_t e1) {
  using T = typename acc_type<In>::type;
  const T qmin = static_cast<T>(qmin_i), qmax = static_cast<T>(qmax_i);
  for_each_run(L, e0, e1, [&](int64_t e, int64_t n, int64_t c, auto step) {
    constexpr int S = decltype(step)::value;
    const In* __restrict xp = x + e;
    Out* __restrict qp = q + (e - e0);
    const auto p0 = channel_params(scale, zero_point, c, qmin, qmax);
    for (int64_t j = 0; j < n; ++j) {
      const auto p = params_at<S>(p0, scale, zero_point, c, j, qmin, qmax);
      const T code = quant::code_nearest(static_cast<T>(to_float(xp[j])), p.inv, p.z);
      // A NaN input has no code; it is stored as the zero point.
      const T qv = code == code ? quant::clamp(code, qmin, qmax) : p.z;
      qp[j] = static_cast<Out>(static_cast<int32_t>(qv));
    }
  });
}

// y = (q - z) * s on [e0, e1); q points at the code of element e0, y is indexed by element.
template <typename Code, typename Out>
void dequantize_range(const Code* q, Out* y, const typename acc_type<Out>::type* scale,
                      const typename acc_type<Out>::type* zero_point, QuantLayout L,
                      int32_t qmin_i, int32_t qmax_i, int64_t e0, int64_t e1) {
  using T = typename acc_type<Out>::type;
  const T qmin = static_cast<T>(qmin_i), qmax = static_cast<T>(qmax_i);
  for_each_run(L, e0, e1, [&](int64_t e, int64_t n, int64_t c, auto step) {
    constexpr int S = decltype(step)::value;
    const Code* __restrict qp = q + (e - e0);
    Out* __restrict yp = y + e;
    const auto p0 = channel_params(scale, zero_point, c, qmin, qmax);
    for (int64_t j = 0; j < n; ++j) {
      const auto p = params_at<S>(p0, scale, zero_point, c, j, qmin, qmax);
      yp[j] = store_as<Out>(quant::mul_rn(static_cast<T>(qp[j]) - p.z, p.s));
    }
  });
}

// Packed codes (bits <= 4): rows [r0, r1) of a [rows, last_dim] tensor, two codes per byte
// (packed row length (last_dim + 1) / 2; an odd row ends in a half-used byte whose high nibble
// is 0). Codes are made chunk by chunk in a stack buffer by the vectorized quantize_range, then
// paired; chunks start at even columns, so pairs never straddle two chunks.
constexpr int64_t kPackChunk = 1024;

template <typename In>
void quantize_packed_rows(const In* x, uint8_t* q, const typename acc_type<In>::type* scale,
                          const typename acc_type<In>::type* zero_point, QuantLayout L,
                          int32_t qmin_i, int32_t qmax_i, int64_t last_dim, int64_t r0,
                          int64_t r1) {
  const int64_t packed = (last_dim + 1) / 2;
  int8_t codes[kPackChunk + 1];
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t l0 = 0; l0 < last_dim; l0 += kPackChunk) {
      const int64_t m = std::min(kPackChunk, last_dim - l0);
      const int64_t e0 = r * last_dim + l0;
      quantize_range<In, int8_t>(x, codes, scale, zero_point, L, qmin_i, qmax_i, e0, e0 + m);
      codes[m] = 0;  // the missing high nibble of an odd row
      uint8_t* __restrict out = q + r * packed + l0 / 2;
      for (int64_t j = 0; j < (m + 1) / 2; ++j) out[j] = quant::pack_nibbles(codes[2 * j], codes[2 * j + 1]);
    }
  }
}

template <typename Out>
void dequantize_packed_rows(const uint8_t* q, Out* y, const typename acc_type<Out>::type* scale,
                            const typename acc_type<Out>::type* zero_point, QuantLayout L,
                            int32_t qmin_i, int32_t qmax_i, int64_t last_dim, int64_t r0,
                            int64_t r1) {
  const bool is_signed = qmin_i < 0;
  const int64_t packed = (last_dim + 1) / 2;
  int8_t codes[kPackChunk + 1];
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t l0 = 0; l0 < last_dim; l0 += kPackChunk) {
      const int64_t m = std::min(kPackChunk, last_dim - l0);
      const uint8_t* __restrict in = q + r * packed + l0 / 2;
      for (int64_t j = 0; j < (m + 1) / 2; ++j) {
        codes[2 * j] = static_cast<int8_t>(quant::unpack_nibble(in[j], 0, is_signed));
        codes[2 * j + 1] = static_cast<int8_t>(quant::unpack_nibble(in[j], 1, is_signed));
      }
      const int64_t e0 = r * last_dim + l0;
      dequantize_range<int8_t, Out>(codes, y, scale, zero_point, L, qmin_i, qmax_i, e0, e0 + m);
    }
  }
}

}  // namespace cpu
}  // namespace pypaper
