// CPU implementations of the quantized linear ops (issue #7, linear kernels; schemas in
// csrc/schemas.cpp). The loops are kernels/cpu/qlinear_cpu.h, the math and layouts
// kernels/common/qlinear_math.h.
//
// Instruction path: PYPAPER_QLINEAR_ISA = auto (default: the best compiled in) | vnni | avx2 |
// scalar, read on every call so that tests compare the paths in one process. Asking for a path
// that was not compiled in raises.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "../../kernels/cpu/qlinear_cpu.h"
#include "../../kernels/cpu/qlinear_int4_split.h"
#include "../../kernels/cpu/qlinear_int8_madd.h"
#include "../../kernels/cpu/qlinear_int8_split.h"
#include "qlinear_args.h"

namespace pypaper {
namespace qlinear {
namespace {

using cpu::Isa;

Isa requested_isa() {
  const char* env = std::getenv("PYPAPER_QLINEAR_ISA");
  const std::string v = env ? env : "";
  Isa isa;
  if (v.empty() || v == "auto") return cpu::best_isa();
  if (v == "scalar") {
    isa = Isa::kScalar;
  } else if (v == "avx2") {
    isa = Isa::kAvx2;
  } else if (v == "vnni") {
    isa = Isa::kVnni;
  } else {
    TORCH_CHECK(false, "PYPAPER_QLINEAR_ISA must be auto, vnni, avx2 or scalar, got '", v, "'");
  }
  TORCH_CHECK(cpu::isa_compiled(isa), "PYPAPER_QLINEAR_ISA=", v,
              " was requested but pypaper._C was built without it (compile flags: set "
              "PYPAPER_CPU_ARCH, e.g. -march=native, on a CPU that has it)");
  return isa;
}

// x with unit stride along k (rows may be strided).
at::Tensor rows_view(const at::Tensor& x) {
  return (x.size(1) <= 1 || x.stride(1) == 1) ? x : x.contiguous();
}

struct Quantized {
  std::vector<uint8_t> qa;
  at::Tensor sa;
  int64_t Kp;
  int32_t off;
};

Quantized quantize_activations(const at::Tensor& x, int64_t act_qmax, Isa isa) {
  const int64_t M = x.size(0), K = x.size(1);
  Quantized q;
  q.Kp = round_up(K, kKStep);
  q.off = cpu::act_offset(isa, static_cast<int32_t>(act_qmax));
  q.qa.resize(static_cast<size_t>(M * q.Kp));
  q.sa = at::empty({M}, x.options());
  const float* xp = x.const_data_ptr<float>();
  const int64_t ldx = x.stride(0);
  float* sp = q.sa.mutable_data_ptr<float>();
  uint8_t* qp = q.qa.data();
  const int64_t Kp = q.Kp;
  const int32_t off = q.off;
  // Up to 2^20 elements (~0.3 ms single-threaded) the rows are quantized on the calling thread:
  // one parallel region per call (the GEMM's) instead of two, which matters on loaded machines.
  const int64_t grain = M * K <= (int64_t{1} << 20) ? M : std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1));
  at::parallel_for(0, M, grain,
                   [&](int64_t m0, int64_t m1) {
                     cpu::quantize_act_rows(xp, ldx, m0, m1, K, Kp, static_cast<int32_t>(act_qmax),
                                            off, qp, sp, isa);
                   });
  return q;
}

void run_gemm(Isa isa, const Quantized& q, int64_t M, const at::Tensor& w_packed, int64_t N,
              const at::Tensor& w_colsum, const cpu::DynOut& out) {
  const int64_t panels = w_packed.size(0);
  const int64_t pairs = (panels + 1) / 2;
  const int8_t* wp = w_packed.const_data_ptr<int8_t>();
  const int32_t* cs = w_colsum.const_data_ptr<int32_t>();
  at::parallel_for(0, pairs, 1, [&](int64_t b, int64_t e) {
    std::vector<int32_t> cbuf(static_cast<size_t>(cpu::kMaxPanels * M * kPanel));
    cpu::int8_gemm_panels(isa, q.qa.data(), M, q.Kp, wp, N, cs, q.off, 2 * b,
                          std::min(panels, 2 * e), out, cbuf.data());
  });
}

at::Tensor int8_dynamic_linear_cpu(const at::Tensor& x_in, const at::Tensor& w_packed,
                                   const at::Tensor& w_scale, const at::Tensor& w_colsum,
                                   const c10::optional<at::Tensor>& bias_in, int64_t act_qmax) {
  const int64_t N = check_int8_dynamic(x_in, w_packed, w_scale, w_colsum, act_qmax);
  check_bias(x_in, bias_in, N);
  const Isa isa = requested_isa();
  const at::Tensor x = rows_view(x_in);
  const int64_t M = x.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const Quantized q = quantize_activations(x, act_qmax, isa);
  const at::Tensor sw = w_scale.contiguous();
  const at::Tensor cs = w_colsum.contiguous();
  at::Tensor bias;
  if (bias_in.has_value()) bias = bias_in->contiguous();
  cpu::DynOut out;
  out.y = y.mutable_data_ptr<float>();
  out.sa = q.sa.const_data_ptr<float>();
  out.sw = sw.const_data_ptr<float>();
  out.bias = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
  run_gemm(isa, q, M, w_packed, N, cs, out);
  return y;
}

std::tuple<at::Tensor, at::Tensor> int8_dynamic_linear_int32_cpu(const at::Tensor& x_in,
                                                                 const at::Tensor& w_packed,
                                                                 const at::Tensor& w_colsum,
                                                                 int64_t out_features,
                                                                 int64_t act_qmax) {
  TORCH_CHECK(out_features >= 0, "out_features must be non-negative, got ", out_features);
  const at::Tensor dummy_scale = at::empty({out_features}, x_in.options());
  const int64_t N = check_int8_dynamic(x_in, w_packed, dummy_scale, w_colsum, act_qmax);
  const Isa isa = requested_isa();
  const at::Tensor x = rows_view(x_in);
  const int64_t M = x.size(0);
  at::Tensor acc = at::empty({M, N}, x.options().dtype(at::kInt));
  if (M == 0) return {acc, at::empty({0}, x.options())};
  const Quantized q = quantize_activations(x, act_qmax, isa);
  if (N == 0) return {acc, q.sa};
  const at::Tensor cs = w_colsum.contiguous();
  cpu::DynOut out;
  out.acc = acc.mutable_data_ptr<int32_t>();
  run_gemm(isa, q, M, w_packed, N, cs, out);
  return {acc, q.sa};
}

// Up to this many rows the weight-only kernels run directly on the codes (each 16-channel chunk
// of the weights is unpacked once per 4 rows while it sits in cache); above, the weights are
// dequantized a block of channels at a time and multiplied by torch's fp32 GEMM (compute-bound
// there, so the unpacking is amortized over M rows).
constexpr int64_t kDirectMaxRows = 8;
// int4 on the split-activation integer kernels (qlinear_int4_split.h) stays direct up to here:
// measured against dequantize + sgemm at K = N = 4096, 2 threads (vs fp32): M = 16: 2.27x /
// 0.84x, 32: 1.59x / 0.88x, 64: 1.18x / 0.89x, 128: 0.96x / 0.91x; at 256 the GEMM wins.
constexpr int64_t kSplitMaxRows = 128;
// int8 on its split kernel (qlinear_int8_split.h; twice the integer work per weight of int4's),
// measured against the fp32-unpacking kernel / dequantize + sgemm, 1 thread (vs fp32): M = 1: 3.7x /
// 1.7x, 8: 2.5x / 1.2x, 32: 1.03x / 0.81x, 64: 0.84x / 0.88x.
constexpr int64_t kSplit8MaxRows = 32;

template <typename Direct, typename Dequant>
at::Tensor weight_only(const at::Tensor& x, int64_t N, const c10::optional<at::Tensor>& bias_in,
                       Direct&& direct, Dequant&& dequant, int64_t max_direct = kDirectMaxRows) {
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  at::Tensor bias;
  if (bias_in.has_value()) bias = bias_in->contiguous();
  const float* bp = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
  float* yp = y.mutable_data_ptr<float>();
  if (M <= max_direct || K == 0) {
    const int64_t chunk = 16;
    // Channel blocks of NB (NB = 64 at K = 4096: 128 KB of int4 codes) run every pass of
    // kWoRows rows while they sit in L2 (M = 32: 1.50x -> 1.59x fp32 for int4).
    const int64_t NB = std::max<int64_t>(chunk, (int64_t{1} << 19) / std::max<int64_t>(K, 1) / chunk * chunk);
    at::parallel_for(0, (N + chunk - 1) / chunk, 1, [&](int64_t b, int64_t e) {
      const int64_t n0 = b * chunk, n1 = std::min(N, e * chunk);
      for (int64_t nb = n0; nb < n1; nb += NB) {
        const int64_t ne = std::min(n1, nb + NB);
        for (int64_t m0 = 0; m0 < M; m0 += cpu::kWoRows) {
          const int rows = static_cast<int>(std::min<int64_t>(cpu::kWoRows, M - m0));
          direct(m0, rows, nb, ne, bp, yp);
        }
      }
    });
    return y;
  }
  // One parallel region: each task dequantizes a block of channels into its own buffer and
  // multiplies it with torch's GEMM, which runs single-threaded inside a parallel region. (A
  // sequence of parallel regions, one per block, is what oversubscribed machines punish most.)
  // 256 channels per task (measured: 64 leaves torch's GEMM at a third of its speed on these
  // thin blocks), fewer when N would not give every thread two blocks.
  const int64_t per_thread = (N + 2 * at::get_num_threads() - 1) / (2 * at::get_num_threads());
  const int64_t block = std::min<int64_t>(256, std::max<int64_t>(16, round_up(per_thread, 16)));
  const int64_t nblocks = (N + block - 1) / block;
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    at::Tensor w = at::empty({block, K}, x.options());
    float* wp = w.mutable_data_ptr<float>();
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * block, nb = std::min(block, N - n0);
      dequant(n0, n0 + nb, wp);
      const at::Tensor yb = at::mm(x, w.narrow(0, 0, nb).t());
      const float* ybp = yb.const_data_ptr<float>();
      for (int64_t m = 0; m < M; ++m)
        for (int64_t j = 0; j < nb; ++j)
          yp[m * N + n0 + j] = ybp[m * nb + j] + (bp ? bp[n0 + j] : 0.f);
    }
  });
  return y;
}

at::Tensor int8_weight_only_linear_cpu(const at::Tensor& x_in, const at::Tensor& w,
                                       const at::Tensor& scale_in,
                                       const c10::optional<at::Tensor>& bias) {
  const int64_t N = check_weight_only(x_in, w, scale_in, false);
  check_bias(x_in, bias, N);
  const Isa isa = requested_isa();
  const at::Tensor x = x_in.contiguous();
  const at::Tensor scale = scale_in.contiguous();
  const int64_t K = x.size(1), groups = scale.size(1), G = K / groups;
  const float* xp = x.const_data_ptr<float>();
  const int8_t* wq = w.const_data_ptr<int8_t>();
  const float* sp = scale.const_data_ptr<float>();
  const int64_t M = x.size(0);
  // AVX-512 VNNI: split activations and vpdpbusd on the codes (kernels/cpu/qlinear_int8_split.h);
  // AVX2: int16 activations and vpmaddwd on the widened codes (kernels/cpu/qlinear_int8_madd.h).
  const bool split = cpu::int8_split_ok(isa, K, G) && M <= kSplit8MaxRows;
  const bool madd = cpu::int8_madd_ok(isa, K, G) && M <= kDirectMaxRows;
#if PYPAPER_QL_VNNI
  cpu::SplitAct8 act;
  if (split) {
    cpu::split8_prepare(M, K, G, act);
    at::parallel_for(0, M, 16, [&](int64_t r0, int64_t r1) { cpu::split8_rows(xp, K, r0, r1, act); });
  }
#endif
  cpu::SplitAct16 act16;
  if (madd) {
    cpu::split16_prepare(M, K, G, act16);
    cpu::split16_rows(xp, K, 0, M, act16);
  }
  return weight_only(
      x, N, bias,
      [&](int64_t m0, int rows, int64_t n0, int64_t n1, const float* bp, float* yp) {
#if PYPAPER_QL_VNNI
        if (split) {
          cpu::wo_int8_split_rows(act, m0, rows, wq, sp, bp, n0, n1, yp + m0 * N, N);
          return;
        }
#endif
#if PYPAPER_QL_AVX2
        if (madd) {
          cpu::wo_int8_madd_rows(act16, m0, rows, wq, sp, groups, bp, n0, n1, yp + m0 * N, N);
          return;
        }
#endif
        cpu::wo_int8_rows(isa, xp + m0 * K, K, rows, K, G, wq, sp, groups, bp, n0, n1,
                          yp + m0 * N, N);
      },
      [&](int64_t n0, int64_t n1, float* out) { cpu::dequant_int8_rows(isa, K, G, wq, sp, n0, n1, out); },
      split ? kSplit8MaxRows : kDirectMaxRows);
}

at::Tensor int4_weight_only_linear_cpu(const at::Tensor& x_in, const at::Tensor& w,
                                       const at::Tensor& scale_in, const at::Tensor& zero_in,
                                       const c10::optional<at::Tensor>& bias) {
  const int64_t N = check_weight_only(x_in, w, scale_in, true);
  check_bias(x_in, bias, N);
  check_same_device(x_in, zero_in, "zero");
  TORCH_CHECK(zero_in.scalar_type() == at::kFloat && zero_in.sizes() == scale_in.sizes(),
              "zero must be float32 of scale's shape ", scale_in.sizes(), ", got ",
              zero_in.scalar_type(), " ", zero_in.sizes());
  const Isa isa = requested_isa();
  const at::Tensor x = x_in.contiguous();
  const at::Tensor scale = scale_in.contiguous();
  const at::Tensor zero = zero_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), groups = scale.size(1), G = K / groups;
  const float* xp = x.const_data_ptr<float>();
  const uint8_t* wq = w.const_data_ptr<uint8_t>();
  const float* sp = scale.const_data_ptr<float>();
  const float* zp = zero.const_data_ptr<float>();
  // The direct (M <= kSplitMaxRows = 128) SIMD kernels take the activations split into two bytes per input
  // (kernels/cpu/qlinear_int4_split.h: 16-bit fixed point per group, integer dot products).
  const bool split = cpu::has_int4_split(isa) && M <= kSplitMaxRows && K > 0;
  cpu::SplitAct act;
  if (split) {
    cpu::split_prepare(M, K, G, act);
    at::parallel_for(0, M, 16, [&](int64_t r0, int64_t r1) { cpu::split_rows(xp, K, r0, r1, act); });
  }
  return weight_only(
      x, N, bias,
      [&](int64_t m0, int rows, int64_t n0, int64_t n1, const float* bp, float* yp) {
        if (split)
          cpu::wo_int4_split_rows(isa, act, m0, rows, wq, sp, zp, bp, n0, n1, yp + m0 * N, N);
        else
          cpu::wo_int4_scalar(xp + m0 * K, K, rows, K, G, wq, sp, zp, groups, bp, n0, n1,
                              yp + m0 * N, N);
      },
      [&](int64_t n0, int64_t n1, float* out) {
        cpu::dequant_int4_rows(isa, K, G, wq, sp, zp, n0, n1, out);
      },
      split ? kSplitMaxRows : kDirectMaxRows);
}

}  // namespace

TORCH_LIBRARY_IMPL(pypaper, CPU, m) {
  m.impl("int8_dynamic_linear", &int8_dynamic_linear_cpu);
  m.impl("int8_dynamic_linear_int32", &int8_dynamic_linear_int32_cpu);
  m.impl("int8_weight_only_linear", &int8_weight_only_linear_cpu);
  m.impl("int4_weight_only_linear", &int4_weight_only_linear_cpu);
}

}  // namespace qlinear
}  // namespace pypaper
