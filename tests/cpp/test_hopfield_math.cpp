// ctest: the shared Hopfield math (kernels/common/hopfield_math.h) and the torch-free CPU tile
// loops (kernels/cpu/hopfield_cpu.h, here on the plain-loop GEMM: no BLAS is linked), against
// direct double-precision formulas.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "kernels/common/hopfield_math.h"
#include "kernels/cpu/hopfield_cpu.h"

static int failures = 0;
#define EXPECT(cond)                                                         \
  do {                                                                       \
    if (!(cond)) {                                                           \
      std::fprintf(stderr, "%s:%d: FAILED %s\n", __FILE__, __LINE__, #cond); \
      ++failures;                                                            \
    }                                                                        \
  } while (0)

using namespace pypaper::hopfield;

static void test_fast_exp() {
  double worst = 0;
  for (float x = -87.0f; x <= 0.0f; x += 0.0137f) {
    const double want = std::exp(static_cast<double>(x));
    worst = std::max(worst, std::fabs(fast_exp(x) - want) / want);
  }
  EXPECT(worst < 3e-7);
  EXPECT(fast_exp(-1e30f) == 0.0f);
  EXPECT(fast_exp(-INFINITY) == 0.0f);
  EXPECT(fast_exp(0.0f) == 1.0f);
  EXPECT(std::isnan(fast_exp(NAN)));
  // the vector row kernels give the scalar function's bits
  std::vector<float> row(37), ref(37);
  for (int j = 0; j < 37; ++j) row[j] = ref[j] = -0.37f * j;
  const float sum = cpu::exp_shift_sum(row.data(), 37, 0.5f);
  double want_sum = 0;
  for (int j = 0; j < 37; ++j) {
    EXPECT(row[j] == fast_exp(ref[j] - 0.5f));
    want_sum += row[j];
  }
  EXPECT(std::fabs(sum - want_sum) < 1e-6 * want_sum);
  EXPECT(cpu::row_max(ref.data(), 37, -INFINITY) == 0.0f);
}

static void test_online_rescale() {
  EXPECT(online_rescale(-INFINITY, -INFINITY) == 1.0f);
  EXPECT(online_rescale(2.0, 2.0) == 1.0);
  EXPECT(std::fabs(online_rescale(1.0, 3.0) - std::exp(-2.0)) < 1e-15);
  EXPECT(surely_active<float>(1.0, 10.0, 0.05));
  EXPECT(!surely_active<float>(0.4, 10.0, 0.05));
}

// retrieve_tile (online softmax over several S tiles) against the direct softmax in double.
static void test_retrieve_tile() {
  std::mt19937 gen(1);
  std::normal_distribution<double> nd;
  const int64_t L = 5, S = 700, d = 6, dv = 3;  // S spans three 256-wide tiles
  std::vector<double> q(L * d), k(S * d), v(S * dv), out(L * dv), lse(L), ws;
  for (auto* vec : {&q, &k, &v}) {
    for (auto& x : *vec) x = nd(gen);
  }
  cpu::Masks<double> masks;
  const double beta = 0.7;
  cpu::retrieve_tile<double>(q.data(), k.data(), v.data(), S, d, dv, beta, masks, 0, 0, L,
                             out.data(), lse.data(), ws);
  for (int64_t i = 0; i < L; ++i) {
    std::vector<double> s(S);
    double mx = -INFINITY;
    for (int64_t j = 0; j < S; ++j) {
      double acc = 0;
      for (int64_t c = 0; c < d; ++c) acc += q[i * d + c] * k[j * d + c];
      s[j] = beta * acc;
      mx = std::max(mx, s[j]);
    }
    double l = 0;
    for (double x : s) l += std::exp(x - mx);
    EXPECT(std::fabs(lse[i] - (mx + std::log(l))) < 1e-12);
    for (int64_t c = 0; c < dv; ++c) {
      double acc = 0;
      for (int64_t j = 0; j < S; ++j) acc += std::exp(s[j] - mx) / l * v[j * dv + c];
      EXPECT(std::fabs(out[i * dv + c] - acc) < 1e-12);
    }
  }
  // the exact convergence norm of identical states is zero
  const double z = cpu::diff_sq_tile<double>(q.data(), lse.data(), q.data(), lse.data(), k.data(),
                                             S, d, beta, masks, 0, 0, L, ws);
  EXPECT(z < 1e-24);
}

int main() {
  test_fast_exp();
  test_online_rescale();
  test_retrieve_tile();
  if (failures) {
    std::fprintf(stderr, "%d failure(s)\n", failures);
    return 1;
  }
  std::puts("hopfield math: ok");
  return 0;
}
