// ctest: the power-quantizer math (kernels/common/power_quant_math.h) and the torch-free CPU
// loops (kernels/cpu/power_quant_cpu.h) against the defining formula
//   c = min(round(qmax * (|x|/m)^a), qmax),  y = sign(x) * m * (c/qmax)^(1/a)
// evaluated directly with pow in double.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "kernels/common/power_quant_math.h"
#include "kernels/cpu/power_quant_cpu.h"

static int failures = 0;
#define EXPECT(cond)                                                         \
  do {                                                                       \
    if (!(cond)) {                                                           \
      std::fprintf(stderr, "%s:%d: FAILED %s\n", __FILE__, __LINE__, #cond); \
      ++failures;                                                            \
    }                                                                        \
  } while (0)

using namespace pypaper;

static void test_tables() {
  EXPECT(power::table_pow2(1) == 2);
  EXPECT(power::table_pow2(7) == 8);
  EXPECT(power::table_pow2(127) == 128);
  // ceil_to<float>: the smallest float >= v.
  const double v = 0.1;
  const float f = power::ceil_to<float>(v);
  EXPECT(static_cast<double>(f) >= v);
  EXPECT(static_cast<double>(std::nextafter(f, 0.0f)) < v);
  // level(k) at a = 1 is k / qmax; d level / da = 0 at k = qmax (log 1 = 0) and at k = 0.
  EXPECT(std::fabs(power::unit_level(3, 7, 1.0) - 3.0 / 7.0) < 1e-15);
  EXPECT(power::unit_level_da(0, 7, 2.0) == 0.0);
  EXPECT(power::unit_level_da(7, 7, 2.0) == 0.0);
  // search and linear count agree on a table with ties.
  float thr[8] = {0.f, 0.1f, 0.2f, 0.2f, 0.5f, 0.7f, INFINITY, INFINITY};
  for (float ax : {0.0f, 0.1f, 0.15f, 0.2f, 0.3f, 0.69f, 0.7f, 5.0f}) {
    EXPECT((power::code_search<float>(ax, thr, 8) == power::code_linear<float, 8>(ax, thr)));
  }
  EXPECT(power::code_search<float>(NAN, thr, 8) == 0);
  float lvl[8] = {0.f, 1.f, 2.f, 3.f, 4.f, 5.f, 5.f, 5.f};
  for (float ax : {0.0f, 0.1f, 0.2f, 0.3f, 0.7f, 5.0f}) {
    EXPECT((power::level_linear<float, 8>(ax, thr, lvl) == lvl[power::code_search<float>(ax, thr, 8)]));
  }
}

template <typename T>
static void test_loops(int bits, double a, int64_t C, int64_t inner) {
  const int qmax = (1 << (bits - 1)) - 1;
  std::mt19937 gen(bits * 131 + C);
  std::student_t_distribution<double> dist(3.0);
  const int64_t n = C * inner;
  std::vector<T> x(n), y(n), y2(n), m(C, T(0)), dx(n), g(n, T(1));
  std::vector<int8_t> q(n);
  for (int64_t i = 0; i < n; ++i) x[i] = static_cast<T>(dist(gen));
  for (int64_t c = 0; c < C; ++c)
    for (int64_t i = 0; i < inner; ++i) m[c] = std::max(m[c], std::abs(x[c * inner + i]));
  cpu::pw::UnitTables U(&a, 1, qmax);
  cpu::pw::Layout L{C, inner, false};
  cpu::pw::quantize_range<T>(x.data(), q.data(), m.data(), U, L, 0, n);
  cpu::pw::fake_quantize_range<T>(x.data(), y.data(), m.data(), U, L, 0, n);
  cpu::pw::dequantize_range<T>(q.data(), y2.data(), m.data(), U, L, 0, n);
  int bad_code = 0, bad_value = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double md = static_cast<double>(m[i / inner]);
    const double ax = std::abs(static_cast<double>(x[i]));
    double c = std::nearbyint(qmax * std::pow(ax / md, a));
    c = std::min<double>(c, qmax);
    const int want = x[i] < 0 ? -static_cast<int>(c) : static_cast<int>(c);
    bad_code += q[i] != want;
    const double yv = (x[i] < 0 ? -1 : 1) * md * std::pow(c / qmax, 1.0 / a);
    bad_value += std::abs(static_cast<double>(y[i]) - yv) > 1e-6 * md;
    bad_value += y[i] != y2[i];
  }
  if (bad_code || bad_value)
    std::fprintf(stderr, "bits %d a %g: %d codes, %d values differ\n", bits, a, bad_code, bad_value);
  EXPECT(bad_code == 0);
  EXPECT(bad_value == 0);
  // backward: dx = g inside, and the summed dy/da equals a central difference of sum(y) in a
  // with the codes held fixed: sum over elements of sign(x) m d/da (c/qmax)^(1/a).
  std::vector<double> da(C, 0.0), dm(C, 0.0);
  cpu::pw::backward_range<T>(g.data(), x.data(), dx.data(), m.data(), U, L, 0, n, da.data(),
                             dm.data());
  double want_da = 0.0, got_da = 0.0;
  const double h = 1e-6;
  for (int64_t i = 0; i < n; ++i) {
    const double md = static_cast<double>(m[i / inner]);
    const int c = std::abs(static_cast<int>(q[i]));
    if (c == 0) continue;
    const double s = x[i] < 0 ? -1 : 1;
    want_da += s * md * (std::pow(double(c) / qmax, 1.0 / (a + h)) -
                         std::pow(double(c) / qmax, 1.0 / (a - h))) / (2 * h);
  }
  for (int64_t c = 0; c < C; ++c) got_da += da[c];
  EXPECT(std::abs(got_da - want_da) <= 1e-5 * (1.0 + std::abs(want_da)));
  for (int64_t i = 0; i < n; ++i) EXPECT(dx[i] == g[i]);
}

int main() {
  test_tables();
  for (int bits = 2; bits <= 8; ++bits) {
    test_loops<float>(bits, 0.55, 3, 129);
    test_loops<double>(bits, 0.7, 4, 33);
    test_loops<float>(bits, 1.7, 1, 1000);
  }
  if (failures) {
    std::fprintf(stderr, "%d failure(s)\n", failures);
    return 1;
  }
  std::printf("test_power_quant: all passed\n");
  return 0;
}
