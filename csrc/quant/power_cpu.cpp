// CPU implementations of the power-quantizer ops (PowerQuant / NUPES): checks, allocation and
// at::parallel_for around the torch-free loops of kernels/cpu/power_quant_cpu.h.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../../kernels/cpu/power_quant_cpu.h"
#include "../block_cache.h"
#include "power_args.h"

namespace pypaper {
namespace power {
namespace {

constexpr int64_t kGrain = 1 << 15;

// The exponents as doubles on the host, each finite and > 0.
std::vector<double> exponents_of(const at::Tensor& exponent) {
  const at::Tensor e = exponent.to(at::kDouble).contiguous();
  std::vector<double> v(e.data_ptr<double>(), e.data_ptr<double>() + e.numel());
  for (double a : v) {
    TORCH_CHECK(std::isfinite(a) && a > 0.0, "exponent must be finite and > 0, got ", a);
  }
  return v;
}

struct Prepared {
  cpu::pw::UnitTables units;
  cpu::pw::Layout layout;
  at::Tensor m;  // max_abs in x's dtype, contiguous
};

Prepared prepare(int64_t numel, const at::Tensor& ref, const at::Tensor& max_abs,
                 const at::Tensor& exponent, int64_t qmax, at::ScalarType dtype) {
  check_qmax(qmax);
  const PowerShape s = power_shape(numel, ref, max_abs, exponent);
  const auto ex = exponents_of(exponent);
  return Prepared{cpu::pw::UnitTables(ex.data(), static_cast<int64_t>(ex.size()),
                                      static_cast<int>(qmax)),
                  cpu::pw::Layout{s.channels, s.inner, s.per_channel_exponent},
                  max_abs.to(dtype).contiguous()};
}

template <typename F>
void dispatch(at::ScalarType st, F&& f) {
  if (st == at::kDouble) {
    f(double{});
  } else {
    TORCH_CHECK(st == at::kFloat, "x must be float32 or float64, got ", st);
    f(float{});
  }
}

at::Tensor power_quantize_cpu(const at::Tensor& x_in, const at::Tensor& max_abs,
                              const at::Tensor& exponent, int64_t qmax) {
  check_float(x_in, "x");
  const at::Tensor x = x_in.contiguous();
  auto p = prepare(x.numel(), x, max_abs, exponent, qmax, x.scalar_type());
  at::Tensor q = empty_cached(x.sizes(), x.options().dtype(at::kChar));
  dispatch(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.data_ptr<T>();
    const T* mp = p.m.data_ptr<T>();
    int8_t* qp = q.data_ptr<int8_t>();
    at::parallel_for(0, x.numel(), kGrain, [&](int64_t b, int64_t e) {
      cpu::pw::quantize_range<T>(xp, qp, mp, p.units, p.layout, b, e);
    });
  });
  return q;
}

at::Tensor power_dequantize_cpu(const at::Tensor& codes_in, const at::Tensor& max_abs,
                                const at::Tensor& exponent, int64_t qmax, at::ScalarType dtype) {
  TORCH_CHECK(codes_in.scalar_type() == at::kChar, "codes must be int8, got ",
              codes_in.scalar_type());
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "dtype must be float32 or float64, got ",
              dtype);
  const at::Tensor codes = codes_in.contiguous();
  auto p = prepare(codes.numel(), codes, max_abs, exponent, qmax, dtype);
  at::Tensor y = empty_cached(codes.sizes(), codes.options().dtype(dtype));
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    const int8_t* qp = codes.data_ptr<int8_t>();
    const T* mp = p.m.data_ptr<T>();
    T* yp = y.data_ptr<T>();
    at::parallel_for(0, codes.numel(), kGrain, [&](int64_t b, int64_t e) {
      cpu::pw::dequantize_range<T>(qp, yp, mp, p.units, p.layout, b, e);
    });
  });
  return y;
}

at::Tensor power_fake_quantize_cpu(const at::Tensor& x_in, const at::Tensor& max_abs,
                                   const at::Tensor& exponent, int64_t qmax, bool /*ste*/) {
  check_float(x_in, "x");
  const at::Tensor x = x_in.contiguous();
  auto p = prepare(x.numel(), x, max_abs, exponent, qmax, x.scalar_type());
  at::Tensor y = empty_cached(x.sizes(), x.options());
  dispatch(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.data_ptr<T>();
    const T* mp = p.m.data_ptr<T>();
    T* yp = y.data_ptr<T>();
    at::parallel_for(0, x.numel(), kGrain, [&](int64_t b, int64_t e) {
      cpu::pw::fake_quantize_range<T>(xp, yp, mp, p.units, p.layout, b, e);
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> power_fake_quantize_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& max_abs,
    const at::Tensor& exponent, int64_t qmax, bool need_max_grad, bool need_exponent_grad,
    bool ste) {
  check_float(x_in, "x");
  TORCH_CHECK(grad_in.sizes() == x_in.sizes(), "grad has shape ", grad_in.sizes(),
              " but x has shape ", x_in.sizes());
  TORCH_CHECK(grad_in.scalar_type() == x_in.scalar_type(), "grad has dtype ",
              grad_in.scalar_type(), " but x has dtype ", x_in.scalar_type());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor g = grad_in.contiguous();
  auto p = prepare(x.numel(), x, max_abs, exponent, qmax, x.scalar_type());
  const auto ex = exponents_of(exponent);
  const bool need_sums = need_max_grad || need_exponent_grad;
  const int64_t C = p.layout.channels, n = x.numel();
  at::Tensor dx = empty_cached(x.sizes(), x.options());
  // Tasks: every channel split into `parts` chunks (one per channel when there are many
  // channels), each with its own partial sums; added up in a fixed order after (deterministic).
  const int64_t inner = p.layout.inner;
  const int64_t want_tasks = 4 * static_cast<int64_t>(at::get_num_threads());
  const int64_t parts =
      (C >= want_tasks || inner == 0) ? 1
                                      : std::max<int64_t>(1, std::min<int64_t>(
                                                                 (want_tasks + C - 1) / C,
                                                                 (inner + kGrain - 1) / kGrain));
  const int64_t chunk = parts > 0 && inner > 0 ? (inner + parts - 1) / parts : 0;
  std::vector<double> da(static_cast<size_t>(C * parts), 0.0), dm(static_cast<size_t>(C * parts), 0.0);
  dispatch(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* gp = g.data_ptr<T>();
    const T* xp = x.data_ptr<T>();
    const T* mp = p.m.data_ptr<T>();
    T* dxp = dx.data_ptr<T>();
    if (!need_sums) {
      at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
        cpu::pw::backward_range<T>(gp, xp, dxp, mp, p.units, p.layout, b, e, nullptr, nullptr);
      });
      return;
    }
    const int64_t grain = parts == 1 ? std::max<int64_t>(1, kGrain / std::max<int64_t>(inner, 1)) : 1;
    at::parallel_for(0, C * parts, grain, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t c = t / parts, part = t % parts;
        const int64_t b = c * inner + std::min(inner, part * chunk);
        const int64_t e = c * inner + std::min(inner, (part + 1) * chunk);
        if (b >= e) continue;
        // The loop adds into da[c], dm[c] of its own (shifted) buffers: one slot per task.
        cpu::pw::backward_range<T>(gp, xp, dxp, mp, p.units, p.layout, b, e,
                                   da.data() + part * C, dm.data() + part * C, ste, ex.data());
      }
    });
  });
  at::Tensor gm = at::zeros({C}, x.options().dtype(at::kDouble));
  at::Tensor ga = at::zeros({exponent.numel()}, x.options().dtype(at::kDouble));
  if (need_sums) {
    double* gmp = gm.data_ptr<double>();
    double* gap = ga.data_ptr<double>();
    const bool per_ch = p.layout.per_channel_exponent;
    for (int64_t c = 0; c < C; ++c) {
      double sa = 0.0, sm = 0.0;
      for (int64_t part = 0; part < parts; ++part) {
        sa += da[part * C + c];
        sm += dm[part * C + c];
      }
      gmp[c] = sm;
      gap[per_ch ? c : 0] += sa;
    }
  }
  TORCH_INTERNAL_ASSERT(dx.sizes() == x_in.sizes());  // allocated in x's shape: not a view
  return {dx,
          need_max_grad ? fresh_copy(gm, max_abs.sizes(), max_abs.scalar_type())
                        : at::zeros(max_abs.sizes(), max_abs.options()),
          need_exponent_grad ? fresh_copy(ga, exponent.sizes(), exponent.scalar_type())
                             : at::zeros(exponent.sizes(), exponent.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(pypaper, CPU, m) {
  m.impl("power_quantize", &power_quantize_cpu);
  m.impl("power_dequantize", &power_dequantize_cpu);
  m.impl("power_fake_quantize", &power_fake_quantize_cpu);
  m.impl("power_fake_quantize_backward", &power_fake_quantize_backward_cpu);
}

}  // namespace power
}  // namespace pypaper
