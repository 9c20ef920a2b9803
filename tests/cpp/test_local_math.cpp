// ctest: the shared local-loss math (kernels/common/local_math.h) and the torch-free CPU row loops
// (kernels/cpu/local_cpu.h): the loss derivatives against central differences of the losses, the
// vectorizable sigmoid / tanh against libm, and the FF / tpSGD row epilogues against a plain
// scalar computation written here.
#include <cmath>
#include <cstdio>
#include <vector>

#include "kernels/common/local_math.h"
#include "kernels/cpu/local_cpu.h"

static int failures = 0;
#define EXPECT(cond)                                                         \
  do {                                                                       \
    if (!(cond)) {                                                           \
      std::fprintf(stderr, "%s:%d: FAILED %s\n", __FILE__, __LINE__, #cond); \
      ++failures;                                                            \
    }                                                                        \
  } while (0)

using namespace pypaper;

static bool near(double a, double b, double tol) { return std::fabs(a - b) <= tol; }

static void test_ff_loss_derivative() {
  for (double s : {1.0, -1.0}) {
    for (double g = -3; g <= 8; g += 0.173) {
      const double e = 1e-6, th = 2.0;
      const double fd = (local::ff_row_loss(g + e, th, s) - local::ff_row_loss(g - e, th, s)) / (2 * e);
      EXPECT(near(fd, local::ff_row_dgood(g, th, s), 1e-7));
    }
  }
  EXPECT(near(local::softplus(0.0), std::log(2.0), 1e-15));
  EXPECT(near(local::softplus(800.0), 800.0, 1e-12));  // no overflow
  EXPECT(local::softplus(-800.0) >= 0.0 && local::softplus(-800.0) < 1e-300);
}

static void test_activations() {
  for (float v = -30.f; v <= 30.f; v += 0.0137f) {
    EXPECT(near(local::sigmoid(v), 1.0 / (1.0 + std::exp(-double(v))), 3e-7));
    EXPECT(near(local::tanh_(v), std::tanh(double(v)), 3e-7));
    for (int act = 0; act < 3; ++act) {
      if (act == 2 && std::fabs(v) < 1e-3f) continue;
      const double e = 1e-6, vd = v;
      const double fd = (local::tp_act(vd + e, act) - local::tp_act(vd - e, act)) / (2 * e);
      const double h = local::tp_act(vd, act);
      EXPECT(near(fd, local::tp_act_grad(vd, h, act), 1e-6));
    }
  }
  EXPECT(local::tp_target(0.3, true) == 1.0 && local::tp_target(-0.3, true) == -1.0);
  EXPECT(local::tp_target(0.0, true) == 0.0 && local::tp_target(0.25, false) == 0.25);
}

// FF epilogue against a scalar computation: h = relu(inv z + b), g, loss, dz.
static void test_ff_rows() {
  const int n = 5, m = 7, num_pos = 2;
  std::vector<double> z(n * m), z0, b(m), dz(n * m), loss(n), db(m, 0.0), tmp(m), inv(n);
  for (int i = 0; i < n * m; ++i) z[i] = std::sin(0.7 * i) * 1.3;
  for (int j = 0; j < m; ++j) b[j] = 0.1 * (j - 3);
  for (int r = 0; r < n; ++r) inv[r] = 0.5 + 0.1 * r;
  z0 = z;
  cpu::local::ff_rows<double, double>(z.data(), m, inv.data(), b.data(), 0, n, num_pos, 1.5,
                                      1.0 / num_pos, 1.0 / (n - num_pos), dz.data(), loss.data(),
                                      db.data(), tmp.data());
  std::vector<double> db_ref(m, 0.0);
  for (int r = 0; r < n; ++r) {
    double g = 0;
    std::vector<double> h(m);
    for (int j = 0; j < m; ++j) {
      h[j] = std::max(0.0, inv[r] * z0[r * m + j] + b[j]);
      g += h[j] * h[j];
    }
    const double s = r < num_pos ? 1 : -1, w = r < num_pos ? 1.0 / num_pos : 1.0 / (n - num_pos);
    EXPECT(near(loss[r], w * std::log1p(std::exp(s * (1.5 - g))), 1e-12));
    const double c = -2 * w * s / (1 + std::exp(-s * (1.5 - g)));
    for (int j = 0; j < m; ++j) {
      EXPECT(near(z[r * m + j], h[j], 1e-15));
      EXPECT(near(dz[r * m + j], c * h[j] * inv[r], 1e-12));
      db_ref[j] += c * h[j];
    }
  }
  for (int j = 0; j < m; ++j) EXPECT(near(db[j], db_ref[j], 1e-12));
}

// tpSGD epilogue (sigmoid): loss = 1/(2N) ||h - P[:, y]||^2 per row, dz = (h - t) h (1 - h) / N.
static void test_tp_rows() {
  const int n = 4, m = 6, k = 3;
  std::vector<float> z(n * m), z0, dz(n * m), loss(n), db(m, 0.f), proj(k * m);
  std::vector<int64_t> y = {2, 0, 1, 2};
  for (int i = 0; i < n * m; ++i) z[i] = std::cos(0.9f * i) * 2.f;
  for (int i = 0; i < k * m; ++i) proj[i] = std::sin(1.3f * i);
  z0 = z;
  const float scale = 1.f / n;
  cpu::local::tp_rows<float, float, local::kSigmoid, false>(z.data(), m, nullptr, proj.data(),
                                                            y.data(), scale, 0, n, dz.data(),
                                                            loss.data(), db.data());
  for (int r = 0; r < n; ++r) {
    double l = 0;
    for (int j = 0; j < m; ++j) {
      const double h = 1 / (1 + std::exp(-double(z0[r * m + j])));
      const double e = h - proj[y[r] * m + j];
      l += e * e;
      EXPECT(near(z[r * m + j], h, 1e-6));
      EXPECT(near(dz[r * m + j], scale * e * h * (1 - h), 1e-6));
    }
    EXPECT(near(loss[r], 0.5 * scale * l, 1e-6));
  }
}

int main() {
  test_ff_loss_derivative();
  test_activations();
  test_ff_rows();
  test_tp_rows();
  if (failures) {
    std::fprintf(stderr, "%d failure(s)\n", failures);
    return 1;
  }
  std::printf("test_local_math: all passed\n");
  return 0;
}
