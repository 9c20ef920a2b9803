// ctest: the shared quant math (kernels/common) and the torch-free CPU loops (kernels/cpu).
// Expected hash values come from the plain-PyTorch reference (pypaper/quant/reference.py), so
// this also checks that C++ and Python draw the same stochastic-rounding uniforms.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "kernels/common/hash_rng.h"
#include "kernels/common/quant_math.h"
#include "kernels/cpu/quant_cpu.h"

static int failures = 0;
#define EXPECT(cond)                                                   \
  do {                                                                 \
    if (!(cond)) {                                                     \
      std::fprintf(stderr, "%s:%d: FAILED %s\n", __FILE__, __LINE__, #cond); \
      ++failures;                                                      \
    }                                                                  \
  } while (0)

using namespace pypaper;

static void test_rounding() {
  EXPECT(quant::round_half_even(0.5f) == 0.0f);
  EXPECT(quant::round_half_even(1.5f) == 2.0f);
  EXPECT(quant::round_half_even(2.5f) == 2.0f);
  EXPECT(quant::round_half_even(-0.5f) == -0.0f);
  EXPECT(quant::round_half_even(-1.5) == -2.0);
  EXPECT(quant::effective_zero_point(3.5f, 0.0f, 255.0f) == 4.0f);
  EXPECT(quant::effective_zero_point(300.0f, 0.0f, 255.0f) == 255.0f);
  EXPECT(std::isnan(quant::clamp(NAN, -1.0f, 1.0f)));
}

static void test_fake_quant_value_and_grad() {
  const float s = 0.1f, inv = 1.0f / s, z = 2.0f, qmin = -8.0f, qmax = 7.0f;
  float c = quant::code_nearest(0.34f, inv, z);  // round(3.4) + 2 = 5
  EXPECT(c == 5.0f);
  EXPECT(quant::fake_quant_value(c, z, s, qmin, qmax) == 3.0f * s);
  float big = quant::code_nearest(10.0f, inv, z);  // 102: clipped to 7
  EXPECT(quant::fake_quant_value(big, z, s, qmin, qmax) == 5.0f * s);
  auto g_in = quant::fake_quant_grad(2.0f, 0.34f, c, z, s, inv, qmin, qmax);
  EXPECT(g_in.dx == 2.0f && g_in.dzero_point == 0.0f);
  EXPECT(std::fabs(g_in.dscale - 2.0f * (0.3f - 0.34f) / 0.1f) < 1e-5f);
  auto g_hi = quant::fake_quant_grad(2.0f, 10.0f, big, z, s, inv, qmin, qmax);
  EXPECT(g_hi.dx == 0.0f && g_hi.dscale == 2.0f * (qmax - z) && g_hi.dzero_point == -2.0f * s);
  float low = quant::code_nearest(-10.0f, inv, z);
  auto g_lo = quant::fake_quant_grad(1.0f, -10.0f, low, z, s, inv, qmin, qmax);
  EXPECT(g_lo.dx == 0.0f && g_lo.dscale == qmin - z);
  // stochastic: floor(v + u)
  EXPECT(quant::code_stochastic(0.34f, inv, 0.0f, 0.59f) == 3.0f);
  EXPECT(quant::code_stochastic(0.34f, inv, 0.0f, 0.61f) == 4.0f);
}

static void test_nibbles() {
  for (int lo = -8; lo < 8; ++lo)
    for (int hi = -8; hi < 8; ++hi) {
      uint8_t b = quant::pack_nibbles(lo, hi);
      EXPECT(quant::unpack_nibble(b, 0, true) == lo);
      EXPECT(quant::unpack_nibble(b, 1, true) == hi);
    }
  EXPECT(quant::unpack_nibble(quant::pack_nibbles(15, 9), 0, false) == 15);
  EXPECT(quant::unpack_nibble(quant::pack_nibbles(15, 9), 1, false) == 9);
}

static void test_hash_matches_python_reference() {
  // reference.uniform_noise(99, 5) * 2^24 and (-7, 3), and _pcg_hash([0, 1, 123456789])
  const uint32_t want99[5] = {10728194u, 7569721u, 16437877u, 1338439u, 1264790u};
  const uint32_t want_m7[3] = {16458141u, 12973051u, 12467906u};
  rng::Key k = rng::make_key(99);
  for (int i = 0; i < 5; ++i) EXPECT(rng::uniform01(k, i) * 16777216.0f == float(want99[i]));
  rng::Key km = rng::make_key(-7);
  for (int i = 0; i < 3; ++i) EXPECT(rng::uniform01(km, i) * 16777216.0f == float(want_m7[i]));
  EXPECT(rng::pcg_hash(0u) == 129708002u);
  EXPECT(rng::pcg_hash(1u) == 2831084092u);
  EXPECT(rng::pcg_hash(123456789u) == 4272394698u);
  // mean of many uniforms
  double sum = 0;
  for (int i = 0; i < 100000; ++i) sum += rng::uniform01(k, i);
  EXPECT(std::fabs(sum / 100000 - 0.5) < 0.005);
}

static void test_bf16_round_trip() {
  EXPECT(cpu::to_float(cpu::from_float<cpu::bf16>(1.0f)) == 1.0f);
  // 1 + 2^-8 is a tie between bf16 neighbours 1 and 1 + 2^-7: rounds to even (1)
  EXPECT(cpu::to_float(cpu::from_float<cpu::bf16>(1.0f + 1.0f / 256)) == 1.0f);
  EXPECT(cpu::to_float(cpu::from_float<cpu::fp16>(0.1f)) == 0.0999755859375f);
}

// The CPU loop over a [outer, channels, inner] layout agrees with the formula applied element
// by element, for every layout shape the runs distinguish.
static void test_cpu_loops_cover_all_layouts() {
  const quant::QuantLayout layouts[] = {{1, 1, 1000}, {3, 7, 1}, {2, 5, 9}, {1, 40, 25}};
  for (const auto& L : layouts) {
    const int64_t n = L.numel();
    std::vector<float> x(n), y(n), dy(n, 1.0f), dx(n), s(L.channels), z(L.channels);
    for (int64_t i = 0; i < n; ++i) x[i] = std::sin(0.37f * i) * 3.0f;
    for (int64_t c = 0; c < L.channels; ++c) {
      s[c] = 0.01f + 0.003f * c;
      z[c] = float(c % 3);
    }
    // split the range in two uneven tasks, as at::parallel_for would
    const int64_t mid = n / 3;
    cpu::fake_quantize_range<float, false>(x.data(), y.data(), s.data(), z.data(), L, -8, 7, 0, 0, mid);
    cpu::fake_quantize_range<float, false>(x.data(), y.data(), s.data(), z.data(), L, -8, 7, 0, mid, n);
    std::vector<float> ds(L.channels, 0.0f), dz(L.channels, 0.0f);
    cpu::fake_quantize_backward_range<float, false, true>(dy.data(), x.data(), dx.data(), s.data(),
                                                          z.data(), L, -8, 7, 0, 0, n, ds.data(), dz.data());
    std::vector<double> ds_want(L.channels, 0.0);
    for (int64_t e = 0; e < n; ++e) {
      const int64_t c = L.channel_of(e);
      const float code = quant::code_nearest(x[e], 1.0f / s[c], z[c]);
      EXPECT(y[e] == quant::fake_quant_value(code, z[c], s[c], -8.0f, 7.0f));
      const auto g = quant::fake_quant_grad(1.0f, x[e], code, z[c], s[c], 1.0f / s[c], -8.0f, 7.0f);
      EXPECT(dx[e] == g.dx);
      ds_want[c] += g.dscale;
    }
    for (int64_t c = 0; c < L.channels; ++c) EXPECT(std::fabs(ds[c] - ds_want[c]) < 1e-3 * (1 + std::fabs(ds_want[c])));
  }
}

// Packed 4-bit codes of an odd last dim survive the round trip, chunk borders included.
static void test_packed_rows_round_trip() {
  const int64_t rows = 3, last = 2 * cpu::kPackChunk + 5;  // crosses chunk borders, odd
  const quant::QuantLayout L{1, 1, rows * last};
  std::vector<float> x(rows * last), y(rows * last);
  for (size_t i = 0; i < x.size(); ++i) x[i] = float(int(i % 16) - 8) * 0.25f;  // on the grid
  const float s = 0.25f, z = 0.0f;
  std::vector<uint8_t> q(rows * ((last + 1) / 2));
  cpu::quantize_packed_rows<float>(x.data(), q.data(), &s, &z, L, -8, 7, last, 0, rows);
  cpu::dequantize_packed_rows<float>(q.data(), y.data(), &s, &z, L, -8, 7, last, 0, rows);
  bool same = true;
  for (size_t i = 0; i < x.size(); ++i) same = same && x[i] == y[i];
  EXPECT(same);
  EXPECT((q[(last + 1) / 2 - 1] >> 4) == 0);  // the unused high nibble of an odd row
}

// Stochastic rounding in the CPU loop: unbiased on average, reproducible from the seed.
static void test_stochastic_loop() {
  const int64_t n = 1 << 16;
  const quant::QuantLayout L{1, 1, n};
  std::vector<float> x(n, 0.37f), a(n), b(n);
  const float s = 0.1f, z = 0.0f;
  cpu::fake_quantize_range<float, true>(x.data(), a.data(), &s, &z, L, -128, 127, 1234, 0, n);
  cpu::fake_quantize_range<float, true>(x.data(), b.data(), &s, &z, L, -128, 127, 1234, 0, n);
  double mean = 0;
  bool same = true;
  for (int64_t i = 0; i < n; ++i) {
    mean += a[i];
    same = same && a[i] == b[i];
    EXPECT(a[i] == 3.0f * s || a[i] == 4.0f * s);
  }
  EXPECT(same);
  EXPECT(std::fabs(mean / n - 0.37) < 0.002);
}

int main() {
  test_packed_rows_round_trip();
  test_stochastic_loop();
  test_rounding();
  test_fake_quant_value_and_grad();
  test_nibbles();
  test_hash_matches_python_reference();
  test_bf16_round_trip();
  test_cpu_loops_cover_all_layouts();
  if (failures) {
    std::fprintf(stderr, "%d check(s) failed\n", failures);
    return EXIT_FAILURE;
  }
  std::printf("quant math: all checks passed\n");
  return EXIT_SUCCESS;
}
