// Counter-based uniform random numbers, identical on the CPU, in CUDA and in Triton.
//
// Stochastic rounding needs one uniform u in [0, 1) per element, reproducible from a seed and
// recomputable in the backward pass (so nothing is stored). A counter-based generator gives that:
// u = H(seed, element index). H is two rounds of the PCG hash (Jarzynski & Olano, "Hash Functions
// for GPU Rendering", JCGT 2020), 32-bit integer arithmetic only, so the Triton kernel
// (pypaper/quant/triton_kernels.py) reproduces it bit for bit.
#pragma once
#include <cstdint>

#include "hd.h"

namespace pypaper {
namespace rng {

// PCG-RXS-M-XS 32-bit output permutation applied to one LCG step.
PYPAPER_HD uint32_t pcg_hash(uint32_t v) {
  uint32_t state = v * 747796405u + 2891336453u;
  uint32_t word = ((state >> ((state >> 28u) + 4u)) ^ state) * 277803737u;
  return (word >> 22u) ^ word;
}

// The two 32-bit keys derived once from a 64-bit seed.
struct Key {
  uint32_t a, b;
};

PYPAPER_HD Key make_key(int64_t seed) {
  uint64_t s = static_cast<uint64_t>(seed);
  uint32_t a = pcg_hash(static_cast<uint32_t>(s));
  // pcg_hash(a), not a: with b = pcg_hash(hi ^ a), every seed below 2^32 had b = pcg_hash(a)
  // and element 0 hashed pcg_hash(a) ^ b = 0, the same uniform for all those seeds.
  uint32_t b = pcg_hash(static_cast<uint32_t>(s >> 32) ^ pcg_hash(a));
  return Key{a, b};
}

// 24 random bits of element `index`, as a float in [0, 1): h >> 8 times 2^-24 (exact in fp32).
PYPAPER_HD float uniform01(Key key, uint64_t index) {
  uint32_t lo = static_cast<uint32_t>(index);
  uint32_t hi = static_cast<uint32_t>(index >> 32);
  uint32_t h = pcg_hash(pcg_hash(lo ^ key.a) ^ (hi + key.b));
  return static_cast<float>(h >> 8) * (1.0f / 16777216.0f);
}

}  // namespace rng
}  // namespace pypaper
