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

// fp16 <-> fp32 in integer and fp32 operations only, so that a loop of them vectorizes. GCC 12
// compiles a _Float16 cast to one scalar F16C instruction (or a libgcc call without F16C) and
// leaves every loop holding one unvectorized: the LIF forward in fp16 ran 6x slower than in fp32
// or bf16 (AMD Zen 3, 1 thread, T = 32, 8192 neurons: 1.25 ms against 0.21). The results are
// the IEEE conversions' (F16C's, c10::Half's) bit for bit, NaN included (a quiet NaN: 0x7e00
// from float, the quiet bit set to float), checked against the hardware over every fp16 value
// and ~10^6 floats (tests/cpp/test_float16.cpp). Independent of flush-to-zero / denormals-are-
// zero: no subnormal float is an operand of the float arithmetic below.
inline float to_float(fp16 v) {
  const uint32_t em = v.bits & 0x7fffu;  // exponent and mantissa
  const uint32_t sign = static_cast<uint32_t>(v.bits & 0x8000u) << 16;
  // normal: the exponent rebiased from 15 to 127 ((127 - 15) << 23), the mantissa moved up 13
  uint32_t r = (em << 13) + 0x38000000u;
  // inf / NaN: the all-ones exponent, the payload kept, a NaN quiet
  const uint32_t special = (em << 13) | 0x7f800000u | (em > 0x7c00u ? 0x00400000u : 0u);
  r = em >= 0x7c00u ? special : r;
  // subnormal (and zero): em * 2^-24, an exact int -> float conversion and power-of-two scaling
  const float sub = static_cast<float>(static_cast<int32_t>(em)) * 0x1p-24f;
  uint32_t sub_bits;
  std::memcpy(&sub_bits, &sub, sizeof sub_bits);
  r = em < 0x0400u ? sub_bits : r;
  r |= sign;
  float f;
  std::memcpy(&f, &r, sizeof f);
  return f;
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

// Round to nearest, ties to even (see to_float(fp16) for why not a _Float16 cast).
template <>
inline fp16 from_float<fp16>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  const uint32_t sign = u & 0x80000000u;
  const uint32_t a = u ^ sign;  // |v|
  // |v| >= 2^16 (or inf / NaN): inf, or the quiet NaN
  const uint32_t big = a > 0x7f800000u ? 0x7e00u : 0x7c00u;
  // |v| < 2^-14, an fp16 subnormal or zero: adding 0.5 puts the fp16 ulp 2^-24 at the float's
  // last mantissa bit, so the float addition rounds (to nearest even) exactly as fp16 does; |v|
  // below 2^-25 rounds to 0 (a subnormal float too: flushed or not, the sum is 0.5).
  float af;
  std::memcpy(&af, &a, sizeof af);
  const float shifted = af + 0.5f;
  uint32_t sb;
  std::memcpy(&sb, &shifted, sizeof sb);
  const uint32_t small = sb - 0x3f000000u;
  // normal: rebias the exponent (127 -> 15), add the rounding bias 0xfff plus the mantissa's
  // lowest kept bit (ties to even), drop 13 bits; a carry out of the mantissa raises the
  // exponent, up to inf at 65520 and above
  const uint32_t odd = (a >> 13) & 1u;
  const uint32_t normal = (a - 0x38000000u + 0xfffu + odd) >> 13;
  uint32_t r = a < 0x38800000u ? small : normal;
  r = a >= 0x47800000u ? big : r;
  return fp16{static_cast<uint16_t>(r | (sign >> 16))};
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
