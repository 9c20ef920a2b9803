// 16-bit float storage types for the torch-free CPU kernels, with exact conversions.
//
// The kernels load bf16/fp16, do the math in fp32 and store back with round-to-nearest-even,
// the same conversions torch uses (c10::BFloat16, c10::Half), so results match the plain-PyTorch
// reference bit for bit. Layout-compatible with c10::BFloat16 / c10::Half (one uint16_t).
#pragma once
#include <cstdint>
#include <cstring>

namespace pypaper {
namespace cpu {

struct bf16 {
  uint16_t bits;
};

struct fp16 {
  uint16_t bits;
};

inline float to_float(float v) { return v; }
inline double to_float(double v) { return v; }

inline float to_float(bf16 v) {
  uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline float to_float(fp16 v) {
  _Float16 h;
  std::memcpy(&h, &v.bits, sizeof h);
  return static_cast<float>(h);
}

template <typename Out>
inline Out from_float(float v);

template <>
inline float from_float<float>(float v) {
  return v;
}

template <>
inline bf16 from_float<bf16>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{0x7fc0};  // NaN stays a quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);                           // round to nearest, ties to even
  return bf16{static_cast<uint16_t>(u >> 16)};
}

template <>
inline fp16 from_float<fp16>(float v) {
  _Float16 h = static_cast<_Float16>(v);  // IEEE round to nearest even
  fp16 out;
  std::memcpy(&out.bits, &h, sizeof h);
  return out;
}

template <typename Out>
inline Out from_double(double v);

template <>
inline double from_double<double>(double v) {
  return v;
}

// Math type of a storage type: fp32 for every float type but double.
template <typename In>
struct acc_type {
  using type = float;
};
template <>
struct acc_type<double> {
  using type = double;
};

template <typename Out, typename T>
inline Out store_as(T v) {
  if constexpr (sizeof(T) == 8) {
    return from_double<Out>(v);
  } else {
    return from_float<Out>(v);
  }
}

}  // namespace cpu
}  // namespace pypaper
