// ctest: the qlinear CPU loops (kernels/cpu/qlinear_cpu.h) without torch. Every compiled
// instruction path against a plain integer / double loop written here from the formulas of
// kernels/common/qlinear_math.h: int32 accumulators exact, including the saturation extremes of
// vpmaddubsw (activations and weights at +-their largest codes); weight-only sums within a
// relative bound.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "kernels/cpu/qlinear_cpu.h"
#include "kernels/cpu/qlinear_int4_split.h"
#include "kernels/cpu/qlinear_int8_split.h"

static int failures = 0;
#define EXPECT(cond)                                                           \
  do {                                                                         \
    if (!(cond)) {                                                             \
      std::fprintf(stderr, "%s:%d: FAILED %s\n", __FILE__, __LINE__, #cond);   \
      ++failures;                                                              \
    }                                                                          \
  } while (0)

using namespace pypaper::qlinear;

static std::vector<cpu::Isa> isas() {
  std::vector<cpu::Isa> out;
  for (cpu::Isa i : {cpu::Isa::kScalar, cpu::Isa::kAvx2, cpu::Isa::kVnni})
    if (cpu::isa_compiled(i)) out.push_back(i);
  return out;
}

static void test_math() {
  EXPECT(act_code(2.5f, 1.0f, 127) == 2);    // half to even
  EXPECT(act_code(3.5f, 1.0f, 127) == 4);
  EXPECT(act_code(-300.f, 1.0f, 63) == -63);  // clamp
  EXPECT(act_scale(0.f, 127) == FLT_MIN);
  EXPECT(int8_packed_index(17, 5, 8) == ((1 * 2 + 1) * 64 + 1 * 4 + 1));
  uint8_t row[32] = {0};
  row[int4_byte_index(20)] = 0xA0;  // k = 20 -> byte 4, high nibble
  EXPECT(int4_byte_index(20) == 4 && int4_nibble(20) == 1 && int4_code(row, 20) == 10);
  EXPECT(dyn_epilogue(10, 0.5f, 2.0f, 1.0f) == 11.0f);
}

// Packs codes [N, K] into the panel layout.
static std::vector<int8_t> pack(const std::vector<int8_t>& q, int64_t N, int64_t K, int64_t Kp) {
  const int64_t Np = round_up(N, kPanel);
  std::vector<int8_t> p(static_cast<size_t>(Np * Kp), 0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) p[int8_packed_index(n, k, Kp)] = q[n * K + k];
  return p;
}

static void check_gemm(int64_t M, int64_t K, int64_t N, int32_t A, bool extreme, std::mt19937& rng) {
  const int64_t Kp = round_up(K, kKStep);
  std::vector<float> x(M * K);
  std::vector<int8_t> q(N * K);
  std::uniform_real_distribution<float> u(-3.f, 3.f);
  for (auto& v : x) v = extreme ? ((rng() & 1) ? 1.f : -1.f) : u(rng);
  for (auto& v : q) v = extreme ? ((rng() & 1) ? 127 : -127) : static_cast<int8_t>(static_cast<int>(rng() % 255) - 127);
  if (extreme)
    for (int64_t k = 0; k < K; ++k) q[k] = x[k] > 0 ? 127 : -127;  // row 0 x channel 0: max sum
  std::vector<int32_t> colsum(N, 0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) colsum[n] += q[n * K + k];
  const auto packed = pack(q, N, K, Kp);
  // the reference: codes from the formulas, integer dot products
  std::vector<float> sa_ref(M);
  std::vector<int32_t> codes(M * K);
  for (int64_t m = 0; m < M; ++m) {
    float amax = 0.f;
    for (int64_t k = 0; k < K; ++k) amax = std::fmax(amax, std::fabs(x[m * K + k]));
    sa_ref[m] = act_scale(amax, A);
    for (int64_t k = 0; k < K; ++k) codes[m * K + k] = act_code(x[m * K + k], sa_ref[m], A);
  }
  for (cpu::Isa isa : isas()) {
    const int32_t off = cpu::act_offset(isa, A);
    std::vector<uint8_t> qa(M * Kp);
    std::vector<float> sa(M);
    cpu::quantize_act_rows(x.data(), K, 0, M, K, Kp, A, off, qa.data(), sa.data(), isa);
    std::vector<int32_t> acc(M * N, -1), cbuf(cpu::kMaxPanels * M * kPanel);
    cpu::DynOut o;
    o.acc = acc.data();
    cpu::int8_gemm_panels(isa, qa.data(), M, Kp, packed.data(), N, colsum.data(), off, 0,
                          round_up(N, kPanel) / kPanel, o, cbuf.data());
    for (int64_t m = 0; m < M; ++m) {
      EXPECT(sa[m] == sa_ref[m]);
      for (int64_t n = 0; n < N; ++n) {
        int64_t want = 0;
        for (int64_t k = 0; k < K; ++k) want += int64_t{codes[m * K + k]} * q[n * K + k];
        if (acc[m * N + n] != want) {
          std::fprintf(stderr, "isa %s M%lld K%lld N%lld A%d (%lld,%lld): %d != %lld\n",
                       cpu::isa_name(isa), (long long)M, (long long)K, (long long)N, A,
                       (long long)m, (long long)n, acc[m * N + n], (long long)want);
          ++failures;
          return;
        }
      }
    }
    if (extreme) EXPECT(acc[0] == K * A * 127);
  }
}

// int4 weight-only: the scalar path (fp32 activations) within an fp32 summation bound of the
// double dot product; the SIMD paths (split activations, qlinear_int4_split.h) additionally within
// the rounding of the activations, sum_k |w_k| 0.51 sx_g, and their split exactly as specified.
static void check_int4(int64_t M, int64_t K, int64_t N, int64_t G, std::mt19937& rng,
                       bool outliers = false) {
  const int64_t groups = K / G;
  std::vector<float> x(M * K), s(N * groups), z(N * groups), y(M * N);
  std::vector<uint8_t> w(N * K / 2);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  for (auto& v : x) v = u(rng);
  if (outliers) x[K / 2] = 300.f;  // one large input: its group's sx grows, the others do not
  for (auto& v : s) v = 0.01f + 0.1f * std::fabs(u(rng));
  for (auto& v : z) v = static_cast<float>(rng() % 16);
  for (auto& b : w) b = static_cast<uint8_t>(rng());
  cpu::SplitAct act;
  cpu::split_activations(x.data(), K, M, K, G, act);
  // The split itself: x~ = sx (256 h + l) within 0.51 sx of x, h within [-127, 127], l a signed byte.
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) {
      const int64_t pos = m * act.chunks * 256 + (k / 128) * 256 + ((k % 32) >= 16 ? 64 : 0) + ((k % 128) / 32) * 16 + k % 16;
      const int h = act.digits[pos], l = act.digits[pos + 128];
      const float sx = act.lane_sx[m * act.chunks * 16 + 4 * (k / 32)];
      EXPECT(h >= -127 && h <= 127 && l >= -128 && l <= 127);
      EXPECT(std::fabs(sx * (256.0 * h + l) - x[m * K + k]) <= 0.51 * sx + 1e-12);
    }
  for (cpu::Isa isa : isas()) {
    const bool split = cpu::has_int4_split(isa);
    for (int64_t m0 = 0; m0 < M; m0 += cpu::kWoRows) {
      const int rows = static_cast<int>(std::min<int64_t>(cpu::kWoRows, M - m0));
      if (split)
        cpu::wo_int4_split_rows(isa, act, m0, rows, w.data(), s.data(), z.data(), nullptr, 0, N,
                                y.data() + m0 * N, N);
      else
        cpu::wo_int4_scalar(x.data() + m0 * K, K, rows, K, G, w.data(), s.data(), z.data(), groups,
                            nullptr, 0, N, y.data() + m0 * N, N);
    }
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) {
        double want = 0, mag = 0, act_err = 0;
        for (int64_t k = 0; k < K; ++k) {
          const double wv = (int4_code(w.data() + n * K / 2, k) - z[n * groups + k / G]) * s[n * groups + k / G];
          want += x[m * K + k] * wv;
          mag += std::fabs(x[m * K + k] * wv);
          act_err += std::fabs(wv) * act.lane_sx[m * act.chunks * 16 + 4 * (k / 32)] * 0.51;
        }
        const double bound = 4e-6 * mag + 1e-6 + (split ? act_err : 0.0);
        if (!(std::fabs(y[m * N + n] - want) <= bound))
          std::fprintf(stderr, "int4 %s M=%lld K=%lld G=%lld m=%lld n=%lld: %g vs %g (bound %g)\n",
                       cpu::isa_name(isa), (long long)M, (long long)K, (long long)G, (long long)m,
                       (long long)n, y[m * N + n], want, bound);
        EXPECT(std::fabs(y[m * N + n] - want) <= bound);
      }
  }
}

// int8 weight-only on the split kernel (AVX-512 VNNI builds): within the fp32 bound plus the
// activation rounding sum_k |w_k| 0.51 sx_c (chunks of 64 inputs), and the split as specified.
static void check_int8_split(int64_t M, int64_t K, int64_t N, int64_t G, std::mt19937& rng) {
#if PYPAPER_QL_VNNI
  const int64_t groups = K / G;
  std::vector<float> x(M * K), s(N * groups), y(M * N);
  std::vector<int8_t> w(N * K);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  for (auto& v : x) v = u(rng);
  x[K / 3] = -250.f;  // an outlier: only its chunk's scale grows
  for (auto& v : s) v = 0.001f + 0.01f * std::fabs(u(rng));
  for (auto& b : w) b = static_cast<int8_t>(static_cast<int>(rng() % 255) - 127);
  EXPECT(cpu::int8_split_ok(cpu::Isa::kVnni, K, G));
  cpu::SplitAct8 act;
  cpu::split8_prepare(M, K, G, act);
  cpu::split8_rows(x.data(), K, 0, M, act);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) {
      const int8_t* d = act.digits.data() + (m * act.chunks + k / 64) * 128 + k % 64;
      const float sx = act.sx[m * act.chunks + k / 64];
      EXPECT(d[0] >= -127 && d[0] <= 127);
      EXPECT(std::fabs(sx * (256.0 * d[0] + d[64]) - x[m * K + k]) <= 0.51 * sx + 1e-12);
    }
  for (int64_t m0 = 0; m0 < M; m0 += cpu::kWoRows)
    cpu::wo_int8_split_rows(act, m0, static_cast<int>(std::min<int64_t>(cpu::kWoRows, M - m0)),
                            w.data(), s.data(), nullptr, 0, N, y.data() + m0 * N, N);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double want = 0, mag = 0, act_err = 0;
      for (int64_t k = 0; k < K; ++k) {
        const double wv = double(w[n * K + k]) * s[n * groups + k / G];
        want += x[m * K + k] * wv;
        mag += std::fabs(x[m * K + k]) * (std::fabs(wv) + 128.0 * s[n * groups + k / G]);
        act_err += std::fabs(wv) * 0.51 * act.sx[m * act.chunks + k / 64];
      }
      EXPECT(std::fabs(y[m * N + n] - want) <= 4e-6 * mag + 1e-6 + act_err);
    }
#else
  (void)M; (void)K; (void)N; (void)G; (void)rng;
#endif
}

int main() {
  std::mt19937 rng(0);
  test_math();
  for (int32_t A : {127, 63}) {
    check_gemm(1, 7, 5, A, false, rng);
    check_gemm(13, 129, 40, A, false, rng);
    check_gemm(9, 1030, 33, A, false, rng);  // two K blocks
    check_gemm(3, 4100, 17, A, true, rng);   // saturation extremes
  }
  check_int4(1, 256, 9, 32, rng);
  check_int4(4, 512, 5, 128, rng);
  check_int4(3, 64, 3, 64, rng);       // one 64-input piece: a partial 128-chunk
  check_int4(7, 96, 4, 32, rng);       // rows 4 + 3; K % 128 == 96, K % 64 == 32: masked tails
  check_int4(2, 1024, 6, 256, rng, true);  // a group of 256 spans two chunks; an outlier input
  check_int4(1, 4096, 3, 64, rng, true);
  check_int8_split(1, 4096, 5, 4096, rng);  // per channel
  check_int8_split(6, 256, 7, 64, rng);     // groups of 64, rows 4 + 2
  check_int8_split(3, 100, 4, 100, rng);    // per channel, K % 64 == 36: masked tail
  if (failures) std::fprintf(stderr, "%d failures\n", failures);
  else std::printf("test_qlinear_cpu: all passed\n");
  return failures ? 1 : 0;
}
