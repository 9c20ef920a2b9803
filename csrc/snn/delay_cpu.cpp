// CPU implementation of the learnable-delay linear ops (pypaper::delay_linear and its backward):
// argument checks, the channel-major transpose, and at::parallel_for around the torch-free loops of
// kernels/cpu/delay_cpu.h. Math: kernels/common/delay_math.h (Hammouamri et al., ICLR 2024).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "../../kernels/cpu/cpu_vendor.h"
#include "../../kernels/cpu/delay_cpu.h"

namespace pypaper {
namespace snn {
namespace {

// Work items are (block of kRows accumulator rows, chunk of kChunk elements): the block's
// accumulators (32 x 1024 fp32 = 128 KiB) stay in the 512 KiB L2 of a core while each source row's
// window (chunk + (K-1)*N halo) is read once from memory and reused from L1 by the kRows rows.
// Measured on the shared 2-core AVX2 machine (T=100, N=32, C=256, K=25, fp32; noisy): the first,
// row-at-a-time version (every source row streamed once per output row) ran the forward 2-3x
// slower; between 8 and 32 rows and 256..3200-element chunks the differences are within noise.
constexpr int64_t kChunk = 1024;
constexpr int64_t kRows = 32;

void check_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& position,
                const c10::optional<at::Tensor>& bias, int64_t max_delay, double sigma) {
  TORCH_CHECK(max_delay >= 1, "max_delay must be >= 1, got ", max_delay);
  TORCH_CHECK(std::isfinite(sigma) && sigma >= 0, "sigma must be finite and >= 0, got ", sigma);
  TORCH_CHECK(x.dim() == 3, "x must have shape [T, N, C_in], got ", x.dim(), " dims");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(weight.dim() == 2, "weight must have shape [C_out, C_in], got ", weight.sizes());
  TORCH_CHECK(weight.size(1) == x.size(2), "x has ", x.size(2),
              " input features but weight expects ", weight.size(1));
  TORCH_CHECK(position.sizes() == weight.sizes(), "position must have weight's shape ",
              weight.sizes(), ", got ", position.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() &&
                  position.scalar_type() == x.scalar_type(),
              "weight and position must have x's dtype ", x.scalar_type(), ", got ",
              weight.scalar_type(), " and ", position.scalar_type());
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu() && position.device().is_cpu(),
              "delay_linear (CPU): x, weight and position must be CPU tensors");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "bias must have shape [",
                weight.size(0), "], got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "bias must have x's dtype ",
                x.scalar_type(), ", got ", bias->scalar_type());
    TORCH_CHECK(bias->device().is_cpu(), "bias must be a CPU tensor");
  }
}

// sigma arrives as a tensor (see schemas.cpp): one floating element on the CPU.
double sigma_value(const at::Tensor& sigma) {
  TORCH_CHECK(sigma.numel() == 1 && sigma.dim() <= 1,
              "sigma must be a one-element tensor, got shape ", sigma.sizes());
  TORCH_CHECK(at::isFloatingType(sigma.scalar_type()), "sigma must be a floating tensor, got ",
              sigma.scalar_type());
  TORCH_CHECK(sigma.device().is_cpu(), "sigma must be a CPU tensor, got ", sigma.device());
  return sigma.item<double>();
}

template <typename F>
void dispatch_float(at::ScalarType st, F&& f) {
  if (st == at::kDouble) {
    f(double{});
  } else {
    f(float{});
  }
}

// [T, N, C] -> channel-major rows [C, T*N], as a transpose of [L, C] in 32x32 tiles
// (cpu::transpose_tiles). ATen's permute + contiguous took 3.6 ms for 100x128x256 fp32 on the
// 2-core Zen 5 guest, the tiles 1.1-1.4 ms; the op transposes x in the forward and x and grad_y
// in the backward.
constexpr int64_t kTile = 32;

at::Tensor to_rows(const at::Tensor& x_in) {
  const at::Tensor x = x_in.contiguous();
  const int64_t L = x.size(0) * x.size(1), C = x.size(2);
  at::Tensor out = at::empty({C, x.size(0), x.size(1)}, x.options());
  const int64_t tiles = ((L + kTile - 1) / kTile) * ((C + kTile - 1) / kTile);
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* src = x.data_ptr<T>();
    T* dst = out.data_ptr<T>();
    at::parallel_for(0, tiles, 16, [&](int64_t b, int64_t e) {
      cpu::transpose_tiles<kTile, T>(src, dst, L, C, b, e);
    });
  });
  return out;
}

// sigma in the kernels' type T, saturated at T's largest value (a larger double does not convert;
// that wide a Gaussian is flat over the window anyway: 1/sigma^2 = 0).
template <typename T>
T sigma_as(double sigma) {
  return static_cast<T>(std::min(sigma, static_cast<double>(std::numeric_limits<T>::max())));
}

// Per-synapse tap tables (kernels/cpu/delay_cpu.h delay_tables), filled in parallel.
struct Tables {
  std::vector<int64_t> lo, cnt;
  at::Tensor coef;  // [S, M] in x's dtype
};

template <typename T>
Tables make_tables(const at::Tensor& w, const at::Tensor& pos, T sigma, int64_t R, int64_t K,
                   int64_t M) {
  const int64_t S = w.numel();
  Tables t;
  t.lo.resize(S);
  t.cnt.resize(S);
  t.coef = at::empty({S, M}, w.options());
  const T* wp = w.data_ptr<T>();
  const T* pp = pos.data_ptr<T>();
  T* cp = t.coef.data_ptr<T>();
  at::parallel_for(0, S, 1024, [&](int64_t b, int64_t e) {
    cpu::delay_tables<T>(wp, pp, b, e, sigma, R, K, M, t.lo.data(), t.cnt.data(), cp);
  });
  return t;
}

// ---- the dense path: one GEMM per delay tap ---------------------------------------------------
// When the windows cover most of the K taps (sigma large, early in training) the gather loses to
// GEMMs: scatter the tap tables into a dense kernel Wd[d] = [C_out, C_in] (zero where a synapse's
// window excludes d) and, in the time-major layout where x[t - d] is a row block,
//     y[d*N:]            += x[:(T-d)*N] @ Wd[d]^T          (forward)
//     grad_x[:(T-d)*N]   += gy[d*N:] @ Wd[d]               (backward)
//     gC[d]               = gy[d*N:]^T @ x[:(T-d)*N]        (dL/dc for every synapse at tap d)
// This is the dense convolution's cost (K taps per synapse) at GEMM speed. Measured on the 2-core
// AVX2 (AMD EPYC) build machine, T=100 N=32 C=256 K=25 fp32, interleaved runs under load: the
// gather beats it at every sigma in the forward (sigma 0: ~4x, 0.5: ~4x, 3: ~2x) and matches it in
// the backward at sigma 3 (MKL's sgemm reaches only ~14 GFMA/s per core on this CPU). On the
// 2-core AVX-512 Xeon (2026-12-03, T=100 N=128 C=256 K=25, fwd+bwd): gather 1099 / 704 / 469 /
// 352 ms at sigma 8.27 / 3.27 / 2 / 1.27, these GEMMs 345 / 356 / 342 / 346, oneDNN's conv1d
// (the Python path, pypaper/snn/delays.py) 516 at every sigma; at K=21 the GEMMs 311-321 ms at
// every sigma, the gather 124 (sigma 0), 217-229 (R = 2), 314-316 (R = 3), 374 (R = 4).
// So on Intel CPUs the GEMMs take every window of more than K/3 taps (6R > K); on AMD CPUs, where
// MKL's sgemm ran at half the Xeon's rate or less (the benchmark's matmul column: 60-75 GFLOP/s
// on the AVX2 EPYC, 92-185 on the Zen 5 guests, 254-346 on the Xeons), eager mode runs the
// widest windows (2R >= 3K/4) as oneDNN's convolution instead of calling this op, and this op
// takes the GEMMs only for those (reached there under torch.compile, where sigma's value is
// read only here). PYPAPER_DELAY_PATH=dense / =gather force a path.
bool use_dense(int64_t R, int64_t K) {
  if (K <= 1) return false;
  const char* env = std::getenv("PYPAPER_DELAY_PATH");
  if (env != nullptr && std::strcmp(env, "dense") == 0) return true;
  if (env != nullptr && std::strcmp(env, "gather") == 0) return false;
  if (R <= 0) return false;
  return cpu::cpu_is_amd() ? 8 * R >= 3 * K : 6 * R > K;
}

template <typename T>
at::Tensor dense_taps(const Tables& tab, int64_t S, int64_t M, int64_t K, int64_t C_out,
                      int64_t C_in, const at::TensorOptions& opt) {
  at::Tensor wd = at::zeros({K, C_out, C_in}, opt);
  T* wp = wd.data_ptr<T>();
  const T* cp = tab.coef.data_ptr<T>();
  for (int64_t s = 0; s < S; ++s) {
    for (int64_t j = 0; j < tab.cnt[s]; ++j) wp[(tab.lo[s] + j) * S + s] = cp[s * M + j];
  }
  return wd;
}

at::Tensor delay_linear_cpu(const at::Tensor& x_in, const at::Tensor& weight_in,
                            const at::Tensor& position_in, const c10::optional<at::Tensor>& bias,
                            int64_t max_delay, const at::Tensor& sigma_t) {
  const double sigma = sigma_value(sigma_t);
  check_args(x_in, weight_in, position_in, bias, max_delay, sigma);
  const int64_t T_ = x_in.size(0), N = x_in.size(1), C_in = x_in.size(2);
  const int64_t C_out = weight_in.size(0);
  const int64_t L = T_ * N;
  // One window radius for every kernel and dtype, from the double sigma (delay_math.h).
  const int64_t R = delay::window_radius(sigma, max_delay);
  const int64_t M = delay::max_taps(R, max_delay);
  at::Tensor yc = at::empty({C_out, T_, N}, x_in.options());
  if (L == 0 || C_out == 0) return yc.permute({1, 2, 0}).clone(at::MemoryFormat::Contiguous);
  if (use_dense(R, max_delay)) {
    const at::Tensor x2 = x_in.reshape({L, C_in}).contiguous();
    // the output is allocated in its own shape and worked on through a [T*N, C_out] view: an
    // op must not return a view (forward-mode AD through autograd.Function asserts on one)
    at::Tensor y = at::zeros({T_, N, C_out}, x_in.options());
    at::Tensor y2 = y.view({L, C_out});
    if (bias.has_value()) y2.add_(*bias);
    dispatch_float(x_in.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      const Tables tab = make_tables<T>(weight_in.contiguous(), position_in.contiguous(),
                                        sigma_as<T>(sigma), R, max_delay, M);
      const at::Tensor wd = dense_taps<T>(tab, weight_in.numel(), M, max_delay, C_out, C_in,
                                          x_in.options());
      for (int64_t d = 0; d < std::min(max_delay, T_); ++d) {
        y2.narrow(0, d * N, (T_ - d) * N).addmm_(x2.narrow(0, 0, (T_ - d) * N), wd[d].t());
      }
    });
    return y;
  }
  const at::Tensor xc = to_rows(x_in);
  const at::Tensor w = weight_in.contiguous(), pos = position_in.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  dispatch_float(x_in.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const Tables tab = make_tables<T>(w, pos, sigma_as<T>(sigma), R, max_delay, M);
    const int64_t chunks = (L + kChunk - 1) / kChunk;
    const int64_t blocks = (C_out + kRows - 1) / kRows;
    const T* xp = xc.data_ptr<T>();
    T* yp = yc.data_ptr<T>();
    const T* bp = b.defined() ? b.data_ptr<T>() : nullptr;
    const T* cp = tab.coef.data_ptr<T>();
    at::parallel_for(0, blocks * chunks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t it = b0; it < b1; ++it) {
        const int64_t ob = it / chunks, ch = it % chunks;
        const int64_t o0 = ob * kRows, o1 = std::min(C_out, o0 + kRows);
        const int64_t e0 = ch * kChunk, e1 = std::min(L, e0 + kChunk);
        cpu::delay_forward_block<T>(xp, yp, bp, tab.lo.data(), tab.cnt.data(), cp, C_in, M, N, L,
                                    o0, o1, e0, e1);
      }
    });
  });
  return yc.permute({1, 2, 0}).clone(at::MemoryFormat::Contiguous);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> delay_linear_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x_in, const at::Tensor& weight_in,
    const at::Tensor& position_in, int64_t max_delay, const at::Tensor& sigma_t, bool need_x_grad,
    bool need_weight_grad, bool need_position_grad, bool need_bias_grad) {
  const double sigma = sigma_value(sigma_t);
  check_args(x_in, weight_in, position_in, c10::nullopt, max_delay, sigma);
  const int64_t T_ = x_in.size(0), N = x_in.size(1), C_in = x_in.size(2);
  const int64_t C_out = weight_in.size(0);
  TORCH_CHECK(grad_y.dim() == 3 && grad_y.size(0) == T_ && grad_y.size(1) == N &&
                  grad_y.size(2) == C_out,
              "grad_y must have shape [", T_, ", ", N, ", ", C_out, "], got ", grad_y.sizes());
  TORCH_CHECK(grad_y.scalar_type() == x_in.scalar_type(), "grad_y must have x's dtype ",
              x_in.scalar_type(), ", got ", grad_y.scalar_type());
  const int64_t L = T_ * N;
  const int64_t R = delay::window_radius(sigma, max_delay);
  const int64_t M = delay::max_taps(R, max_delay);
  at::Tensor gxc = at::zeros({C_in, T_, N}, x_in.options());
  at::Tensor gw = at::zeros_like(weight_in, at::MemoryFormat::Contiguous);
  at::Tensor gp = at::zeros_like(position_in, at::MemoryFormat::Contiguous);
  at::Tensor gb = at::zeros({C_out}, x_in.options());
  if (C_in == 0) {  // no synapses: y = bias, whose gradient is still sum over (t, n) of grad_y
    if (need_bias_grad && L > 0 && C_out > 0) gb = grad_y.reshape({L, C_out}).sum(0);
    return {gxc.permute({1, 2, 0}).clone(at::MemoryFormat::Contiguous), gw, gp, gb};
  }
  if (L > 0 && C_out > 0 && use_dense(R, max_delay)) {
    const at::Tensor x2 = x_in.reshape({L, C_in}).contiguous();
    const at::Tensor gy2 = grad_y.reshape({L, C_out}).contiguous();
    const at::Tensor w = weight_in.contiguous(), pos = position_in.contiguous();
    at::Tensor gx = at::zeros({T_, N, C_in}, x_in.options());  // returned: not a view
    at::Tensor gx2 = gx.view({L, C_in});
    dispatch_float(x_in.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      const T sg = sigma_as<T>(sigma);
      const int64_t S = w.numel();
      const int64_t D = std::min(max_delay, T_);
      if (need_x_grad) {
        const Tables tab = make_tables<T>(w, pos, sg, R, max_delay, M);
        const at::Tensor wd = dense_taps<T>(tab, S, M, max_delay, C_out, C_in, x_in.options());
        for (int64_t d = 0; d < D; ++d) {
          gx2.narrow(0, 0, (T_ - d) * N).addmm_(gy2.narrow(0, d * N, (T_ - d) * N), wd[d]);
        }
      }
      if (need_bias_grad) gb.copy_(gy2.sum(0));
      if (need_weight_grad || need_position_grad) {
        at::Tensor gC = at::zeros({max_delay, C_out, C_in}, x_in.options());
        for (int64_t d = 0; d < D; ++d) {
          at::Tensor gcd = gC[d];
          at::mm_out(gcd, gy2.narrow(0, d * N, (T_ - d) * N).t(), x2.narrow(0, 0, (T_ - d) * N));
        }
        const T* gcp = gC.data_ptr<T>();
        const T* wp = w.data_ptr<T>();
        const T* pp = pos.data_ptr<T>();
        T* gwp = gw.data_ptr<T>();
        T* gpp = gp.data_ptr<T>();
        at::parallel_for(0, S, 1024, [&](int64_t b0, int64_t b1) {
          std::vector<T> g(M), dg(M);
          for (int64_t s = b0; s < b1; ++s) {
            int64_t lo = 0;
            const int64_t c = delay::tap_weights<T>(pp[s], sg, R, max_delay, &lo, g.data(),
                                                    dg.data());
            T aw = T(0), ap = T(0);
            for (int64_t j = 0; j < c; ++j) {
              const T v = gcp[(lo + j) * S + s];
              aw += g[j] * v;
              ap += dg[j] * v;
            }
            if (need_weight_grad) gwp[s] = aw;
            if (need_position_grad) gpp[s] = delay::position_inside(pp[s], max_delay) ? wp[s] * ap : T(0);
          }
        });
      }
    });
    return {gx, gw, gp, gb};
  }
  if (L > 0 && C_out > 0) {
    const at::Tensor gyc = to_rows(grad_y);
    const at::Tensor w = weight_in.contiguous(), pos = position_in.contiguous();
    const bool need_params = need_weight_grad || need_position_grad || need_bias_grad;
    const at::Tensor xc = (need_weight_grad || need_position_grad) ? to_rows(x_in) : at::Tensor();
    dispatch_float(x_in.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      const T sg = sigma_as<T>(sigma);
      const T* gyp = gyc.data_ptr<T>();
      if (need_x_grad) {
        const Tables tab = make_tables<T>(w, pos, sg, R, max_delay, M);
        const int64_t chunks = (L + kChunk - 1) / kChunk;
        const int64_t blocks = (C_in + kRows - 1) / kRows;
        T* gxp = gxc.data_ptr<T>();
        const T* cp = tab.coef.data_ptr<T>();
        at::parallel_for(0, blocks * chunks, 1, [&](int64_t b0, int64_t b1) {
          for (int64_t it = b0; it < b1; ++it) {
            const int64_t ib = it / chunks, ch = it % chunks;
            const int64_t i0 = ib * kRows, i1 = std::min(C_in, i0 + kRows);
            const int64_t e0 = ch * kChunk, e1 = std::min(L, e0 + kChunk);
            cpu::delay_grad_x_block<T>(gyp, gxp, tab.lo.data(), tab.cnt.data(), cp, C_in, C_out,
                                       M, N, L, i0, i1, e0, e1);
          }
        });
      }
      if (need_params) {
        // Work items: (block of kRows outputs, block of kRows inputs), whole rows (the dot
        // products run over all of L); the bias goes with the first input block.
        const int64_t oblocks = (C_out + kRows - 1) / kRows;
        const int64_t blocks = (C_in + kRows - 1) / kRows;
        const T* xp = xc.defined() ? xc.data_ptr<T>() : nullptr;
        const T* wp = w.data_ptr<T>();
        const T* pp = pos.data_ptr<T>();
        T* gwp = need_weight_grad ? gw.data_ptr<T>() : nullptr;
        T* gpp = need_position_grad ? gp.data_ptr<T>() : nullptr;
        T* gbp = need_bias_grad ? gb.data_ptr<T>() : nullptr;
        at::parallel_for(0, oblocks * blocks, 1, [&](int64_t b0, int64_t b1) {
          std::vector<T> scratch(3 * M);
          for (int64_t it = b0; it < b1; ++it) {
            const int64_t ob = it / blocks, blk = it % blocks;
            const int64_t o0 = ob * kRows, o1 = std::min(C_out, o0 + kRows);
            const int64_t i0 = blk * kRows, i1 = std::min(C_in, i0 + kRows);
            cpu::delay_grad_params_block<T>(gyp, xp, wp, pp, sg, R, max_delay, M, C_in, N, L,
                                            o0, o1, i0, i1, gwp, gpp, gbp, scratch.data());
          }
        });
      }
    });
  }
  return {gxc.permute({1, 2, 0}).clone(at::MemoryFormat::Contiguous), gw, gp, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(pypaper, CPU, m) {
  m.impl("delay_linear", &delay_linear_cpu);
  m.impl("delay_linear_backward", &delay_linear_backward_cpu);
}

}  // namespace snn
}  // namespace pypaper
