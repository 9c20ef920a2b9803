// ctest: the packed layout of the few-bit codes (kernels/common/fewbit_pack.h) against its written
// spec, and the CPU loops (kernels/cpu/fewbit_cpu.h) against the layout functions.
//
// The CUDA kernels write the same layout (a full block's plane k = one __ballot_sync word, the
// partial block at bit k*r + j) and read partial blocks with read_code, so these checks pin the
// bytes both devices must produce; tests/quant/fewbit/test_fewbit_cuda.py compares the devices.
#include <cstdint>
#include <cstdio>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "kernels/common/fewbit_pack.h"
#include "kernels/cpu/fewbit_cpu.h"

static int failures = 0;
#define EXPECT(cond)                                                         \
  do {                                                                       \
    if (!(cond)) {                                                           \
      std::fprintf(stderr, "%s:%d: FAILED %s\n", __FILE__, __LINE__, #cond); \
      ++failures;                                                            \
    }                                                                        \
  } while (0)

using namespace pypaper;
using namespace pypaper::fewbit;

static const int64_t kSizes[] = {1, 7, 31, 32, 33, 64, 95, 96, 1000, 1025};

// The spec in words: block B = elements [32B, 32B + r), r = min(32, n - 32B), starting at stream
// bit 32*b*B; bit k of element 32B + j at bit k*r + j of the block.
static int64_t spec_position(int64_t i, int k, int64_t n, int bits) {
  const int64_t B = i / 32, j = i % 32;
  const int64_t r = n - 32 * B < 32 ? n - 32 * B : 32;
  return 32 * bits * B + k * r + j;
}

static void test_positions_follow_spec_and_tile_the_stream() {
  for (int bits = 1; bits <= kMaxBits; ++bits) {
    for (int64_t n : kSizes) {
      EXPECT(packed_bytes(n, bits) == (n * bits + 7) / 8);
      std::vector<int> used(static_cast<size_t>(n * bits), 0);
      bool ok = true;
      for (int64_t i = 0; i < n; ++i) {
        for (int k = 0; k < bits; ++k) {
          const int64_t p = code_bit_position(i, k, n, bits);
          ok = ok && p == spec_position(i, k, n, bits) && p >= 0 && p < n * bits;
          if (p >= 0 && p < n * bits) ++used[static_cast<size_t>(p)];
        }
      }
      EXPECT(ok);
      // every stream bit below b*n holds exactly one code bit: no gaps, no overlaps
      bool tiled = true;
      for (int u : used) tiled = tiled && u == 1;
      EXPECT(tiled);
    }
  }
}

// Inputs whose code is known: borders t_j = j + 0.5, so x = c (an integer, exact in every
// storage type) has piece c; with fold (two borders) the code is c & 1.
template <typename In, typename T>
static void check_pack_and_backward(int bits, bool fold, std::mt19937& rng) {
  const int nb = fold ? 2 : (1 << bits) - 1;
  const int pieces = fold ? 3 : (1 << bits);
  std::vector<T> borders(static_cast<size_t>(nb));
  for (int j = 0; j < nb; ++j) borders[static_cast<size_t>(j)] = static_cast<T>(j + 0.5);
  std::vector<T> levels(static_cast<size_t>(1 << bits));
  for (size_t c = 0; c < levels.size(); ++c) levels[c] = static_cast<T>(0.25 * c - 1.0);
  std::uniform_int_distribution<int> piece(0, pieces - 1);
  for (int64_t n : kSizes) {
    std::vector<In> x(static_cast<size_t>(n));
    std::vector<int> want(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) {
      const int p = piece(rng);
      x[static_cast<size_t>(i)] = pypaper::cpu::store_as<In>(static_cast<T>(p));
      want[static_cast<size_t>(i)] = fold ? (p & 1) : p;
    }
    // expected bytes, bit by bit from the layout function
    std::vector<uint8_t> expect(static_cast<size_t>(packed_bytes(n, bits)), 0);
    for (int64_t i = 0; i < n; ++i)
      for (int k = 0; k < bits; ++k)
        if ((want[static_cast<size_t>(i)] >> k) & 1) {
          const int64_t p = code_bit_position(i, k, n, bits);
          expect[static_cast<size_t>(p >> 3)] |= static_cast<uint8_t>(1u << (p & 7));
        }

    // whole range, and in two tasks split at a block boundary (as at::parallel_for does)
    std::vector<uint8_t> got(expect.size(), 0xA5);
    fewbit::cpu::pack_range<In, T>(x.data(), got.data(), 0, n, borders.data(), nb, fold, bits);
    EXPECT(got == expect);
    std::vector<uint8_t> split(expect.size(), 0x5A);
    const int64_t mid = n / 64 * 32;
    fewbit::cpu::pack_range<In, T>(x.data(), split.data(), 0, mid, borders.data(), nb, fold, bits);
    fewbit::cpu::pack_range<In, T>(x.data(), split.data(), mid, n, borders.data(), nb, fold, bits);
    EXPECT(split == expect);

    bool codes_ok = true;
    for (int64_t i = 0; i < n; ++i)
      codes_ok = codes_ok && read_code(got.data(), i, n, bits) == want[static_cast<size_t>(i)];
    EXPECT(codes_ok);

    // the scalar block packer (the AVX2 path serves fp32 math on x86) writes the same words
    bool scalar_ok = true;
    for (int64_t B = 0; B < n / kBlock; ++B) {
      uint8_t words[4 * kMaxBits];
      fewbit::cpu::pack_block_scalar<In, T>(x.data() + B * kBlock, words, borders.data(), nb,
                                            fold, bits);
      for (int b = 0; b < 4 * bits; ++b)
        scalar_ok = scalar_ok && words[b] == expect[static_cast<size_t>(4 * bits * B + b)];
    }
    EXPECT(scalar_ok);

    // backward: gx = store(level == 0 ? 0 : gy * level), one rounding
    const size_t un = static_cast<size_t>(n);
    std::vector<In> gy(un), gx(un), gx2(un);
    std::normal_distribution<float> normal(0.0f, 2.0f);
    for (auto& g : gy) g = pypaper::cpu::store_as<In>(static_cast<T>(normal(rng)));
    const T* lv = levels.data();
    fewbit::cpu::backward_range<In, T>(gy.data(), got.data(), gx.data(), 0, n, lv, bits);
    fewbit::cpu::backward_range<In, T>(gy.data(), got.data(), gx2.data(), 0, mid, lv, bits);
    fewbit::cpu::backward_range<In, T>(gy.data(), got.data(), gx2.data(), mid, n, lv, bits);
    bool bw_ok = true;
    for (int64_t i = 0; i < n; ++i) {
      const size_t s = static_cast<size_t>(i);
      const T prod = scale_grad<T>(fewbit::cpu::math_value<In, T>(gy[s]),
                                   levels[static_cast<size_t>(want[s])]);
      const In w = pypaper::cpu::store_as<In>(prod);
      bw_ok = bw_ok && std::memcmp(&gx[s], &w, sizeof(In)) == 0 &&
              std::memcmp(&gx2[s], &w, sizeof(In)) == 0;
    }
    EXPECT(bw_ok);
  }
}

static void test_cpu_loops_write_the_layout() {
  std::mt19937 rng(1234);
  for (int bits = 1; bits <= kMaxBits; ++bits) {
    for (bool fold : {false, true}) {
      check_pack_and_backward<float, float>(bits, fold, rng);
      check_pack_and_backward<double, double>(bits, fold, rng);
      check_pack_and_backward<pypaper::cpu::bf16, float>(bits, fold, rng);
      check_pack_and_backward<pypaper::cpu::fp16, float>(bits, fold, rng);
    }
  }
}

// Strict compares: x equal to a border is below it; NaN is above every border (the top piece);
// a +inf border is passed by NaN only.
static void test_code_of_edges() {
  const float b[3] = {-1.0f, 0.0f, 2.0f};
  const float inf = std::numeric_limits<float>::infinity();
  const float with_inf[4] = {-1.0f, 0.0f, 2.0f, inf};
  const float xs[] = {-2.0f, -1.0f, -0.5f, 0.0f, -0.0f, 1e-45f, 2.0f, 2.5f, inf, -inf, NAN};
  const int want[] = {0, 0, 1, 1, 1, 2, 2, 3, 3, 0, 3};
  for (size_t i = 0; i < sizeof(xs) / sizeof(xs[0]); ++i) {
    EXPECT(code_of(xs[i], b, 3, false) == want[i]);
    EXPECT(code_of(xs[i], with_inf, 4, false) == want[i] + (std::isnan(xs[i]) ? 1 : 0));
    EXPECT(code_of(xs[i], b, 3, true) == (want[i] & 1));
  }
}

// The backward's select: a zero level gives +0 for any dy (NaN, inf, negative), else dy * level.
static void test_scale_grad() {
  const float inf = std::numeric_limits<float>::infinity();
  const float dys[] = {NAN, inf, -inf, -1.5f, -0.0f, 0.0f};
  for (float dy : dys) {
    const float z = scale_grad(dy, 0.0f);
    EXPECT(z == 0.0f && !std::signbit(z));
    const float mz = scale_grad(dy, -0.0f);
    EXPECT(mz == 0.0f && !std::signbit(mz));
  }
  EXPECT(scale_grad(-1.5f, 2.0f) == -3.0f && std::isnan(scale_grad(NAN, 0.5f)));
}

int main() {
  test_positions_follow_spec_and_tile_the_stream();
  test_cpu_loops_write_the_layout();
  test_code_of_edges();
  test_scale_grad();
  if (failures) {
    std::fprintf(stderr, "%d check(s) failed\n", failures);
    return EXIT_FAILURE;
  }
  std::printf("fewbit pack: all checks passed\n");
  return EXIT_SUCCESS;
}
