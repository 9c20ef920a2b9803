// ctest: the shared local-loss math (kernels/common/local_math.h) and the torch-free CPU row loops
// (kernels/cpu/local_cpu.h): the loss derivatives against central differences of the losses, the
// vectorizable sigmoid / tanh against libm, and the FF / tpSGD / single-forward FF row epilogues
// against a plain scalar computation written here.
#include <algorithm>
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

// The single-forward FF epilogue of a row block (sf_block_epilogue: logits h E^T, the CE,
// dh = dlogits E, dE = dlogits^T H, dz and db through the ReLU), fp32 and fp64, against a double
// loop: m = 300 covers two 128-wide register tiles and a tail, rows = 7 a group of 4 and 3 more.
template <typename T>
static void check_sf_epilogue(int64_t rows, int64_t m, int64_t k, double tol) {
  std::vector<T> h(rows * m), emb(k * m), inv(rows), lg(rows * k), dl(rows * k), rl(rows), dh(m);
  std::vector<T> de(k * m, T(0.5)), db(m, T(-0.25)), dz(rows * m);
  std::vector<int64_t> y(rows);
  for (int64_t i = 0; i < rows * m; ++i) h[i] = std::max(0.0, std::sin(0.37 * i) * 1.5);
  for (int64_t i = 0; i < k * m; ++i) emb[i] = std::max(0.0, std::cos(0.23 * i + 1.0));
  for (int64_t r = 0; r < rows; ++r) {
    inv[r] = T(0.5 + 0.1 * r);
    y[r] = r % k;
  }
  const T inv_temp = T(0.2), scale = T(1.0 / rows);
  cpu::local::sf_block_epilogue<T, T>(h.data(), 0, rows, m, emb.data(), k, y.data(), inv_temp,
                                      scale, inv.data(), lg.data(), dl.data(), rl.data(),
                                      dh.data(), de.data(), dz.data(), db.data());
  std::vector<double> want_de(k * m, 0.5), want_db(m, -0.25);
  for (int64_t r = 0; r < rows; ++r) {
    std::vector<double> logit(k), p(k);
    double mx = -1e300, se = 0;
    for (int64_t c = 0; c < k; ++c) {
      double s = 0;
      for (int64_t j = 0; j < m; ++j) s += double(h[r * m + j]) * emb[c * m + j];
      logit[c] = s;
      EXPECT(near(lg[r * k + c], s, tol * (1 + std::fabs(s))));
      mx = std::max(mx, inv_temp * s);
    }
    for (int64_t c = 0; c < k; ++c) se += (p[c] = std::exp(inv_temp * logit[c] - mx));
    EXPECT(near(rl[r], scale * (mx + std::log(se) - inv_temp * logit[y[r]]), tol));
    for (int64_t c = 0; c < k; ++c) {
      const double g = scale * inv_temp * (p[c] / se - (c == y[r] ? 1.0 : 0.0));
      EXPECT(near(dl[r * k + c], g, tol));
      for (int64_t j = 0; j < m; ++j) want_de[c * m + j] += g * h[r * m + j];
    }
    for (int64_t j = 0; j < m; ++j) {
      double g = 0;
      for (int64_t c = 0; c < k; ++c)
        g += scale * inv_temp * (p[c] / se - (c == y[r] ? 1.0 : 0.0)) * emb[c * m + j];
      const double gj = h[r * m + j] > 0 ? g : 0.0;
      EXPECT(near(dz[r * m + j], gj * inv[r], tol));
      want_db[j] += gj;
    }
  }
  for (int64_t i = 0; i < k * m; ++i) EXPECT(near(de[i], want_de[i], tol));
  for (int64_t j = 0; j < m; ++j) EXPECT(near(db[j], want_db[j], tol));
}

int main() {
  check_sf_epilogue<float>(7, 300, 10, 2e-5);
  check_sf_epilogue<double>(7, 300, 10, 1e-12);
  check_sf_epilogue<float>(4, 128, 3, 2e-5);
  check_sf_epilogue<float>(2, 20, 5, 2e-5);
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
