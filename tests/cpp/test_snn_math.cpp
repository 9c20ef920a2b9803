// ctest: the shared LIF math (kernels/common/snn_math.h) and the torch-free CPU loops
// (kernels/cpu/snn_cpu.h): surrogate derivatives against finite differences of their primitives,
// the charge derivatives against finite differences of the charge, and the chunked loops against
// a plain scalar time loop written here.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "kernels/common/snn_math.h"
#include "kernels/cpu/snn_cpu.h"

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

// sigma' = d sigma / dx, checked by central differences away from the kinks of sigma'.
static void test_surrogate_derivatives_match_primitives() {
  const double alphas[] = {0.5, 1.0, 2.0, 4.0};
  for (int id = 0; id < snn::kNumSurrogates; ++id) {
    for (double a : alphas) {
      for (double x = -3.0; x <= 3.0; x += 0.0371) {
        if (id == 2 && std::fabs(std::fabs(x) - 1.0 / a) < 1e-3) continue;  // triangle's corners
        if (id == 7 && std::fabs(std::fabs(x) - 0.5 / a) < 1e-3) continue;  // rectangle's edges
        const double e = 1e-6;
        const double fd = (snn::surrogate_primitive(id, x + e, a) -
                           snn::surrogate_primitive(id, x - e, a)) / (2 * e);
        const double g = snn::surrogate_grad(id, x, a);
        if (!near(fd, g, 1e-6 * (1 + std::fabs(g)))) {
          std::fprintf(stderr, "surrogate %d alpha %g x %g: fd %g grad %g\n", id, a, x, fd, g);
          ++failures;
        }
      }
    }
  }
}

// The fp32 derivatives (the CPU loops' vectorizable exp) against the fp64 ones, far from the
// threshold too, where they must decay to 0 and not blow up.
static void test_surrogate_derivatives_fp32() {
  const float alphas[] = {0.5f, 2.0f, 4.0f, 25.0f};
  for (int id = 0; id < snn::kNumSurrogates; ++id) {
    for (float a : alphas) {
      for (float x = -40.0f; x <= 40.0f; x += 0.0173f) {
        const double want = snn::surrogate_grad(id, static_cast<double>(x), static_cast<double>(a));
        const float got = snn::surrogate_grad(id, x, a);
        // Erf's exponent -(a x)^2 is rounded to fp32 first: its relative error grows with it.
        const auto s = static_cast<snn::Surrogate>(id);
        const double cond =
            s == snn::Surrogate::Erf ? 1.0 + static_cast<double>(a * x) * (a * x) : 1.0;
        // PiecewiseQuadratic and Rect end at |x| = 1/a and 1/(2a), edges rounded to fp32, and
        // a - a^2 |x| cancels near its edge: an absolute allowance there
        const bool kinked =
            s == snn::Surrogate::PiecewiseQuadratic || s == snn::Surrogate::Rect;
        if (!(std::isfinite(got) && got >= 0.0f) ||
            !near(got, want, 2e-6 * cond * want + 1e-30 + (kinked ? 1e-3 * a : 0.0))) {
          std::fprintf(stderr, "surrogate %d alpha %g x %g: fp32 %g fp64 %g\n", id, a, x, got,
                       want);
          ++failures;
        }
      }
    }
  }
}

static void test_surrogate_values_at_zero() {
  const float a = 2.0f;
  using snn::Surrogate;
  EXPECT(snn::surrogate_grad<Surrogate::Sigmoid>(0.0f, a) == a / 4);
  EXPECT(snn::surrogate_grad<Surrogate::ATan>(0.0f, a) == a / 2);
  EXPECT(snn::surrogate_grad<Surrogate::PiecewiseQuadratic>(0.0f, a) == a);
  EXPECT(snn::surrogate_grad<Surrogate::PiecewiseExp>(0.0f, a) == a / 2);
  EXPECT(snn::surrogate_grad<Surrogate::SoftSign>(0.0f, a) == a / 2);
  EXPECT(snn::surrogate_grad<Surrogate::SuperSpike>(0.0f, a) == a);
  EXPECT(near(snn::surrogate_grad<Surrogate::Erf>(0.0f, a), a / std::sqrt(M_PI), 1e-6));
  EXPECT(snn::surrogate_grad<Surrogate::Rect>(0.0f, a) == a);
  EXPECT(snn::surrogate_grad<Surrogate::Rect>(0.25f, a) == 0.0f);  // |x| < 1/(2a) is strict
  EXPECT(snn::surrogate_grad<Surrogate::PiecewiseQuadratic>(0.6f, a) == 0.0f);
  for (int id = 0; id < snn::kNumSurrogates; ++id) {
    // the runtime switch picks the same function
    EXPECT(snn::surrogate_grad(id, 0.3f, a) == snn::surrogate_grad(id, 0.3f, a));
    EXPECT(snn::surrogate_grad(id, -0.7, 1.5) >= 0.0);
  }
  EXPECT(snn::valid_surrogate(7) && !snn::valid_surrogate(8) && !snn::valid_surrogate(-1));
}

// The vectorizable fp32 exp against the libm one.
static void test_exp_f32() {
  double worst = 0;
  for (float x = -87.0f; x <= 88.0f; x += 0.013f) {
    const double want = std::exp(static_cast<double>(x));
    worst = std::fmax(worst, std::fabs(snn::exp_f32(x) - want) / want);
  }
  EXPECT(worst < 4e-7);  // about 3 ulp
  EXPECT(snn::exp_f32(0.0f) == 1.0f);
  EXPECT(snn::exp_f32(-100.0f) == 0.0f);
  EXPECT(std::isinf(snn::exp_f32(100.0f)));
  // the surrogates' exp of a non-positive argument (fused where the CPU has FMA)
  // every float of the last stretch before the clamp, then a dense grid up to 0: within 2 ulp
  // (a review measured 1.01 ulp at worst over every float of [-88, 0], fused or not)
  worst = 0;
  for (float x = -87.33654f; x <= -87.2f; x = std::nextafter(x, 0.0f)) {
    const double want = std::exp(static_cast<double>(x));
    worst = std::fmax(worst, std::fabs(snn::exp_nonpos_f32(x) - want) / want);
  }
  for (float x = -87.2f; x <= 0.0f; x += 0.0071f) {
    const double want = std::exp(static_cast<double>(x));
    worst = std::fmax(worst, std::fabs(snn::exp_nonpos_f32(x) - want) / want);
  }
  EXPECT(worst < 2.4e-7);
  EXPECT(snn::exp_nonpos_f32(std::nextafter(-87.33654f, -100.0f)) == 0.0f);
  EXPECT(snn::exp_nonpos_f32(0.0f) == 1.0f);
  EXPECT(snn::exp_nonpos_f32(-0.0f) == 1.0f);
  EXPECT(snn::exp_nonpos_f32(-100.0f) == 0.0f);
  EXPECT(snn::exp_nonpos_f32(-INFINITY) == 0.0f);
  EXPECT(std::isnan(snn::exp_nonpos_f32(NAN)));
}

static void test_fire_and_reset() {
  EXPECT(snn::fire(1.0f, 1.0f) == 1.0f);  // Theta(0) = 1
  EXPECT(snn::fire(std::nextafter(1.0f, 0.0f), 1.0f) == 0.0f);
  EXPECT(snn::fire(NAN, 1.0f) == 0.0f);
  EXPECT((snn::reset<true>(1.7f, 1.0f, 1.0f, -0.25f) == -0.25f));
  EXPECT((snn::reset<true>(0.7f, 0.0f, 1.0f, -0.25f) == 0.7f));
  EXPECT((snn::reset<false>(1.7f, 1.0f, 1.0f, 0.0f) == 1.7f - 1.0f));
  EXPECT((snn::reset<false>(0.7f, 0.0f, 1.0f, 0.0f) == 0.7f));
  // the charge in SpikingJelly's order: tau = 2 halves exactly
  EXPECT((snn::charge<true, true>(0.5f, 1.5f, 2.0f, 0.0f) == 0.5f + (1.5f - 0.5f) / 2));
  EXPECT((snn::charge<false, false>(0.5f, 1.5f, 0.5f, 0.0f) == 0.5f - 0.5f * 0.5f + 1.5f));
}

// dH/dX, dH/dV and dH/d(decay) of decay_coef against finite differences of charge().
template <bool DI, bool DIV>
static void check_decay_coef(double decay) {
  const double v = 0.37, x = -0.81, vr = -0.2, e = 1e-6;
  const double h = snn::charge<DI, DIV>(v, x, decay, vr);
  const auto c = snn::decay_coef(decay, DI, DIV, false);
  const double dx = (snn::charge<DI, DIV>(v, x + e, decay, vr) -
                     snn::charge<DI, DIV>(v, x - e, decay, vr)) / (2 * e);
  const double dv = (snn::charge<DI, DIV>(v + e, x, decay, vr) -
                     snn::charge<DI, DIV>(v - e, x, decay, vr)) / (2 * e);
  const double dd = (snn::charge<DI, DIV>(v, x, decay + e, vr) -
                     snn::charge<DI, DIV>(v, x, decay - e, vr)) / (2 * e);
  EXPECT(near(c.cx, dx, 1e-8));
  EXPECT(near(c.cv, dv, 1e-8));
  EXPECT(near((h - v) * c.ch + (v - vr) * c.cr, dd, 1e-8));
  EXPECT(snn::decay_coef(decay, DI, DIV, true).cv == 0.0);  // SLTT: no temporal path
}

static void test_decay_coefficients() {
  check_decay_coef<true, true>(2.5);
  check_decay_coef<true, false>(0.4);
  check_decay_coef<false, true>(1.7);
  check_decay_coef<false, false>(0.6);
}

// ---- the chunked loops against a scalar time loop ------------------------------------------------

struct Case {
  bool decay_input, div, hard, detach, sltt;
  int surrogate;
  bool per_neuron;
};

// Scalar BPTT of one neuron, written from the formulas in snn_math.h's header comment.
static void scalar_neuron(const Case& cs, int64_t steps, const double* x, double v0, double decay,
                          double vth, double vr, double alpha, const double* gs, double gvl,
                          double* s_out, double* vlast, double* gx, double* gv0, double* gdecay,
                          double* gvth) {
  std::vector<double> h(steps), vp(steps);
  double v = v0;
  for (int64_t t = 0; t < steps; ++t) {
    const double k = cs.div ? 1.0 / decay : decay;
    vp[t] = v;
    h[t] = cs.decay_input ? v + (x[t] - (v - vr)) * k : v - (v - vr) * k + x[t];
    const double s = h[t] >= vth ? 1.0 : 0.0;
    s_out[t] = s;
    v = cs.hard ? (s ? vr : h[t]) : h[t] - s * vth;
  }
  *vlast = v;
  double carry = gvl, gk = 0, gt = 0;
  const double dr = cs.detach ? 0.0 : 1.0;
  for (int64_t t = steps - 1; t >= 0; --t) {
    const double s = h[t] >= vth ? 1.0 : 0.0;
    const double sg = snn::surrogate_grad(cs.surrogate, h[t] - vth, alpha);
    const double dvdh = cs.hard ? (1 - s) + dr * (vr - h[t]) * sg : 1 - dr * vth * sg;
    const double dvdt = cs.hard ? -dr * (vr - h[t]) * sg : -s + dr * vth * sg;
    const double gh = gs[t] * sg + carry * dvdh;
    gt += -gs[t] * sg + carry * dvdt;
    const double k = cs.div ? 1.0 / decay : decay;
    gx[t] = cs.decay_input ? gh * k : gh;
    // d/d(decay) of the charge, by the chain rule through k = 1/tau when div
    const double dk = cs.decay_input ? x[t] - (vp[t] - vr) : -(vp[t] - vr);
    gk += gh * dk * (cs.div ? -1.0 / (decay * decay) : 1.0);
    carry = cs.sltt ? 0.0 : gh * (1 - k);
  }
  *gv0 = carry;
  *gdecay = gk;
  *gvth = gt;
}

static void check_loops(const Case& cs) {
  // N crosses chunk borders; F = 5 features per sample for per-neuron parameters
  const int64_t steps = 6, F = 5, B = 221, N = B * F;
  const double vr = cs.hard ? -0.1 : 0.0, alpha = 1.7;
  std::vector<double> x(steps * N), gs(steps * N), v0(N), gvl(N), dec(F), th(F);
  for (int64_t i = 0; i < steps * N; ++i) {
    x[i] = 0.9 * std::sin(0.731 * i) + 0.45;
    gs[i] = std::cos(0.277 * i);
  }
  for (int64_t n = 0; n < N; ++n) {
    v0[n] = 0.3 * std::sin(0.1 * n);
    gvl[n] = 0.2 * std::cos(0.3 * n);
  }
  for (int64_t f = 0; f < F; ++f) {
    const double tau = 1.5 + 0.4 * f;
    dec[f] = cs.div ? tau : 1.0 / tau;
    th[f] = 0.8 + 0.1 * f;
  }
  const int64_t period = cs.per_neuron ? F : 1;
  std::vector<double> s(steps * N), h(steps * N), vseq(steps * N), vlast(N);
  cpu::LifForwardArgs<double, double> fa{};
  fa.x = x.data();
  fa.v_init = v0.data();
  fa.decay = dec.data();
  fa.decay_period = period;
  fa.vth = th.data();
  fa.vth_period = period;
  fa.spikes = s.data();
  fa.h_seq = h.data();
  fa.v_seq = vseq.data();
  fa.v_last = vlast.data();
  fa.steps = steps;
  fa.neurons = N;
  fa.v_reset = vr;
  fa.decay_input = cs.decay_input;
  fa.div = cs.div;
  fa.hard = cs.hard;
  const int64_t chunks = cpu::lif_num_chunks(N);
  cpu::lif_forward(fa, 0, 1);  // two uneven "tasks"
  cpu::lif_forward(fa, 1, chunks);

  std::vector<double> gx(steps * N), gv0(N), gk_n(N), gt_n(N), gk_c(chunks), gt_c(chunks);
  cpu::LifBackwardArgs<double, double> ba{};
  ba.grad_spikes = gs.data();
  ba.grad_v_last = gvl.data();
  ba.h_seq = h.data();
  ba.v_init = v0.data();
  ba.decay = dec.data();
  ba.decay_period = period;
  ba.vth = th.data();
  ba.vth_period = period;
  ba.grad_x = gx.data();
  ba.grad_v_init = gv0.data();
  if (cs.per_neuron) {
    ba.grad_decay_n = gk_n.data();
    ba.grad_vth_n = gt_n.data();
  } else {
    ba.grad_decay_chunk = gk_c.data();
    ba.grad_vth_chunk = gt_c.data();
  }
  ba.steps = steps;
  ba.neurons = N;
  ba.v_reset = vr;
  ba.alpha = alpha;
  ba.surrogate = cs.surrogate;
  ba.decay_input = cs.decay_input;
  ba.div = cs.div;
  ba.hard = cs.hard;
  ba.detach_reset = cs.detach;
  ba.sltt = cs.sltt;
  cpu::lif_backward(ba, 0, chunks);

  double gk_sum = 0, gt_sum = 0, gk_want = 0, gt_want = 0;
  std::vector<double> xs(steps), gss(steps), sw(steps), gxw(steps);
  bool ok = true;
  for (int64_t n = 0; n < N; ++n) {
    const int64_t p = n % period;
    for (int64_t t = 0; t < steps; ++t) {
      xs[t] = x[t * N + n];
      gss[t] = gs[t * N + n];
    }
    double vl, g0, gk, gt;
    scalar_neuron(cs, steps, xs.data(), v0[n], dec[p], th[p], vr, alpha, gss.data(), gvl[n],
                  sw.data(), &vl, gxw.data(), &g0, &gk, &gt);
    for (int64_t t = 0; t < steps; ++t) {
      ok = ok && s[t * N + n] == sw[t] && near(gx[t * N + n], gxw[t], 1e-12);
    }
    ok = ok && near(vlast[n], vl, 1e-12) && near(vseq[(steps - 1) * N + n], vl, 1e-12);
    ok = ok && near(gv0[n], g0, 1e-12);
    if (cs.per_neuron) {
      ok = ok && near(gk_n[n], gk, 1e-10) && near(gt_n[n], gt, 1e-10);
    }
    gk_want += gk;
    gt_want += gt;
  }
  if (!cs.per_neuron) {
    for (int64_t c = 0; c < chunks; ++c) {
      gk_sum += gk_c[c];
      gt_sum += gt_c[c];
    }
    ok = ok && near(gk_sum, gk_want, 1e-9) && near(gt_sum, gt_want, 1e-9);
  }
  if (!ok) {
    std::fprintf(stderr, "loop mismatch: di %d div %d hard %d detach %d sltt %d sur %d pn %d\n",
                 cs.decay_input, cs.div, cs.hard, cs.detach, cs.sltt, cs.surrogate,
                 cs.per_neuron);
    ++failures;
  }
}

static void test_loops_match_scalar_bptt() {
  for (int bits = 0; bits < 64; ++bits) {
    Case cs{bool(bits & 1), bool(bits & 2), bool(bits & 4), bool(bits & 8), bool(bits & 16),
            bits % snn::kNumSurrogates, bool(bits & 32)};
    check_loops(cs);
  }
}

// bf16 storage of H: the spike recomputed from the stored H always equals the forward's, even for
// H within a bf16 ulp of the threshold.
static void test_bf16_h_keeps_the_spike() {
  const float vth = 1.0f + 1.0f / 512;  // between two bf16 values
  for (int i = -2000; i <= 2000; ++i) {
    const float h = vth + i * 1e-6f;
    const float s = snn::fire(h, vth);
    const cpu::bf16 stored = cpu::store_h<cpu::bf16>(h, s, vth);
    EXPECT(snn::fire(cpu::to_float(stored), vth) == s);
    EXPECT(std::fabs(cpu::to_float(stored) - h) <= 1.0f / 64);  // within one bf16 ulp near 1
    const cpu::fp16 s16 = cpu::store_h<cpu::fp16>(h, s, vth);
    EXPECT(snn::fire(cpu::to_float(s16), vth) == s);
  }
  // across zero: the smallest subnormal of the other sign
  EXPECT(cpu::next_bits(0x0000u, false) == 0x8001u);
  EXPECT(cpu::next_bits(0x8000u, true) == 0x0001u);
  EXPECT(cpu::next_bits(0x3f80u, true) == 0x3f81u);
  EXPECT(cpu::next_bits(0xbf80u, true) == 0xbf7fu);
}

// Streamed (non-temporal) stores give the same outputs as plain stores, for rows that are not
// 32-byte aligned (N * 4 bytes is not a multiple of 32) and chunk tails.
static void test_streamed_stores_equal_plain_stores() {
  const int64_t steps = 5, N = 1001;
  std::vector<float> x(steps * N), g(steps * N);
  for (int64_t i = 0; i < steps * N; ++i) {
    x[i] = 1.3f * std::sin(0.11f * i) + 0.5f;
    g[i] = std::cos(0.7f * i);
  }
  const float tau = 1.6f, vth = 1.0f;
  std::vector<float> out[2][5];
  for (int st = 0; st < 2; ++st) {
    auto& o = out[st];
    for (auto& v : o) v.assign(steps * N, -7.0f);
    cpu::LifForwardArgs<float, float> fa{};
    fa.x = x.data();
    fa.decay = &tau;
    fa.decay_period = 1;
    fa.vth = &vth;
    fa.vth_period = 1;
    fa.spikes = o[0].data();
    fa.h_seq = o[1].data();
    fa.v_seq = o[2].data();
    fa.v_last = o[3].data();
    fa.steps = steps;
    fa.neurons = N;
    fa.decay_input = fa.div = fa.hard = true;
    fa.stream = st == 1;
    cpu::lif_forward(fa, 0, cpu::lif_num_chunks(N));
    std::vector<float> gv0(N);
    cpu::LifBackwardArgs<float, float> ba{};
    ba.grad_spikes = g.data();
    ba.h_seq = o[1].data();
    ba.decay = &tau;
    ba.decay_period = 1;
    ba.vth = &vth;
    ba.vth_period = 1;
    ba.grad_x = o[4].data();
    ba.grad_v_init = gv0.data();
    ba.steps = steps;
    ba.neurons = N;
    ba.alpha = 2.0f;
    ba.surrogate = 1;
    ba.decay_input = ba.div = ba.hard = true;
    ba.stream = st == 1;
    cpu::lif_backward(ba, 0, cpu::lif_num_chunks(N));
  }
  for (int i = 0; i < 5; ++i) EXPECT(out[0][i] == out[1][i]);
  EXPECT(out[1][4][steps * N - 1] != -7.0f);  // the tail was written
}

int main() {
  test_surrogate_derivatives_match_primitives();
  test_surrogate_values_at_zero();
  test_exp_f32();
  test_surrogate_derivatives_fp32();
  test_fire_and_reset();
  test_decay_coefficients();
  test_loops_match_scalar_bptt();
  test_bf16_h_keeps_the_spike();
  test_streamed_stores_equal_plain_stores();
  if (failures) {
    std::fprintf(stderr, "%d failure(s)\n", failures);
    return 1;
  }
  std::printf("test_snn_math: all passed\n");
  return 0;
}
