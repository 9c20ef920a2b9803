// Few-bit backward activations: the per-element code and the packed layout, shared by the CPU
// loops (kernels/cpu/fewbit_cpu.h), the CUDA kernels (kernels/cuda/fewbit_kernels.cu), the
// Triton kernels and the plain-PyTorch reference (pypaper/quant/fewbit/reference.py).
//
// Novikov et al., "Few-Bit Backward: Quantized Gradients of Activation Functions for Memory
// Footprint Reduction" (ICML 2023): the backward of y = f(x) needs only f'(x); replace f' by a
// piecewise-constant q with 2^b levels and keep, per element, the b-bit index of its piece.
//
// Code of an element. Borders t_0 < t_1 < ... < t_{P-2} cut the real line into P pieces; the
// piece of x is the number of borders strictly below it, #{j : !(x <= t_j)}. The code is the
// piece, or with `fold` its parity: the exact two-level derivatives that are nonzero on an open
// interval (ReLU6, Hardtanh, Hardsigmoid) have three pieces and two levels, borders (lo,
// below(hi)) where below(hi) is the largest value of the math type under hi, so that x in
// (lo, hi) <=> code 1, matching torch's backward (zero where x <= lo or x >= hi) bit for bit.
// A NaN input counts as above every border (!(NaN <= t) is true): the top piece. That is where
// torch's ReLU backward puts it (its mask x <= 0 is false for NaN); a third border +inf with
// `fold` (Hardtanh: NaN -> code 1, passing the gradient as torch does) or a second one
// (LeakyReLU: borders (0, +inf), NaN -> code 0, the slope) moves NaN to the code torch's
// backward gives it, since no number but NaN is above +inf. Fold takes 2 or 3 borders.
//
// Backward: dx = (level == 0) ? 0 : dy * level, a select as in torch's backward of ReLU,
// Hardtanh and Hardsigmoid: +0, not NaN for an infinite or NaN dy, nor -0 for a negative one.
//
// Layout of the codes of n elements with b bits each: exactly ceil(b*n/8) bytes, in blocks of
// 32 elements. Block B holds elements [32B, 32B + r), r = min(32, n - 32B), and starts at bit
// 32*b*B of the byte stream (bit i of the stream is bit i%8, LSB first, of byte i/8). Inside a
// block, bit k of the code of element 32B + j is at bit k*r + j: "bit planes". A full block is b
// little-endian uint32 words, plane k = word k, so a CPU builds a plane from four 8-lane compares
// (movemask) and a GPU warp from one ballot, and both unpack a plane with one shift per lane.
#pragma once

#include <stdint.h>

#include "hd.h"

namespace pypaper {
namespace fewbit {

// At most 4 bits: 16 pieces, 15 borders; with fold 2 or 3 borders.
constexpr int kMaxBits = 4;
constexpr int kMaxBorders = (1 << kMaxBits) - 1;
constexpr int kMaxFoldBorders = 3;
constexpr int64_t kBlock = 32;

// The piece of x: the number of borders below it (borders sorted ascending); NaN is above all.
template <typename T>
PYPAPER_HD int piece_of(T x, const T* borders, int num_borders) {
  int p = 0;
  for (int j = 0; j < num_borders; ++j) p += !(x <= borders[j]) ? 1 : 0;
  return p;
}

template <typename T>
PYPAPER_HD int code_of(T x, const T* borders, int num_borders, bool fold) {
  const int p = piece_of(x, borders, num_borders);
  return fold ? (p & 1) : p;
}

// The backward's product: 0 where the level is 0 (whatever dy is), else dy * level.
template <typename T>
PYPAPER_HD T scale_grad(T dy, T level) {
  return level == T(0) ? T(0) : dy * level;
}

// Bytes of the codes of n elements at b bits.
PYPAPER_HD int64_t packed_bytes(int64_t n, int bits) { return (n * bits + 7) / 8; }

// Stream bit of bit k of the code of element i (of n, b bits each).
PYPAPER_HD int64_t code_bit_position(int64_t i, int k, int64_t n, int bits) {
  const int64_t block = i / kBlock;
  const int64_t first = block * kBlock;
  const int64_t r = (n - first < kBlock) ? (n - first) : kBlock;
  return first * bits + k * r + (i - first);
}

// The b-bit code of element i, read bit by bit (the scalar path: tails, tests, reference).
PYPAPER_HD int read_code(const uint8_t* codes, int64_t i, int64_t n, int bits) {
  int c = 0;
  for (int k = 0; k < bits; ++k) {
    const int64_t pos = code_bit_position(i, k, n, bits);
    c |= ((codes[pos >> 3] >> (pos & 7)) & 1) << k;
  }
  return c;
}

}  // namespace fewbit
}  // namespace pypaper
