// CPU implementations of the quant ops: argument checks, allocation and at::parallel_for around
// the torch-free loops of kernels/cpu/quant_cpu.h.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../../kernels/cpu/quant_cpu.h"
#include "../block_cache.h"
#include "quant_args.h"

namespace pypaper {
namespace quant {
namespace {

// Elements per task: big enough to amortise the task, small enough to balance two cores.
constexpr int64_t kGrain = 1 << 15;

// Calls f with the torch-free storage type of x's dtype.
template <typename F>
void dispatch_storage(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kFloat: f(float{}); break;
    case at::kDouble: f(double{}); break;
    case at::kBFloat16: f(cpu::bf16{}); break;
    case at::kHalf: f(cpu::fp16{}); break;
    default: TORCH_CHECK(false, "x must be float32, float64, float16 or bfloat16, got ", st);
  }
}

template <typename In>
In* ptr(const at::Tensor& t) {
  return reinterpret_cast<In*>(t.data_ptr());
}

at::Tensor fake_quantize_cpu(const at::Tensor& x_in, const at::Tensor& scale,
                             const at::Tensor& zero_point, int64_t qmin, int64_t qmax,
                             c10::optional<int64_t> axis, c10::optional<int64_t> group_size,
                             const c10::optional<at::Tensor>& seed, double /*grad_factor*/) {
  check_common(x_in, qmin, qmax);
  const at::Tensor x = x_in.contiguous();
  const QuantLayout L = layout_for(x, axis, group_size);
  const auto p = prepare_params(x, scale, zero_point, L, math_type_of(x));
  const int64_t seed_v = seed_or_zero_cpu(seed);
  at::Tensor y = empty_cached(x.sizes(), x.options());
  dispatch_storage(x.scalar_type(), [&](auto tag) {
    using In = decltype(tag);
    using T = typename cpu::acc_type<In>::type;
    const In* xp = ptr<In>(x);
    In* yp = ptr<In>(y);
    const T* sp = p.scale.data_ptr<T>();
    const T* zp = p.zero_point.data_ptr<T>();
    at::parallel_for(0, x.numel(), kGrain, [&](int64_t b, int64_t e) {
      if (seed.has_value()) {
        cpu::fake_quantize_range<In, true>(xp, yp, sp, zp, L, qmin, qmax, seed_v, b, e);
      } else {
        cpu::fake_quantize_range<In, false>(xp, yp, sp, zp, L, qmin, qmax, seed_v, b, e);
      }
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quantize_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& scale,
    const at::Tensor& zero_point, int64_t qmin, int64_t qmax, c10::optional<int64_t> axis,
    c10::optional<int64_t> group_size, const c10::optional<at::Tensor>& seed, double grad_factor,
    bool need_scale_grad, bool need_zero_point_grad) {
  check_common(x_in, qmin, qmax);
  TORCH_CHECK(grad_in.sizes() == x_in.sizes(), "grad has shape ", grad_in.sizes(),
              " but x has shape ", x_in.sizes());
  TORCH_CHECK(grad_in.scalar_type() == x_in.scalar_type(), "grad has dtype ",
              grad_in.scalar_type(), " but x has dtype ", x_in.scalar_type());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor grad = grad_in.contiguous();
  const QuantLayout L = layout_for(x, axis, group_size);
  const auto mt = math_type_of(x);
  const auto p = prepare_params(x, scale, zero_point, L, mt);
  const int64_t seed_v = seed_or_zero_cpu(seed);
  const bool need_sz = need_scale_grad || need_zero_point_grad;
  at::Tensor dx = empty_cached(x.sizes(), x.options());
  at::Tensor gs = at::zeros({L.channels}, x.options().dtype(at::kDouble));
  at::Tensor gz = at::zeros({L.channels}, x.options().dtype(at::kDouble));
  const int64_t n = x.numel();
  dispatch_storage(x.scalar_type(), [&](auto tag) {
    using In = decltype(tag);
    using T = typename cpu::acc_type<In>::type;
    const In* gp = ptr<In>(grad);
    const In* xp = ptr<In>(x);
    In* dxp = ptr<In>(dx);
    const T* sp = p.scale.data_ptr<T>();
    const T* zp = p.zero_point.data_ptr<T>();
    // An empty x has no element to sum over (gs = gz = 0, as torch's learnable fake-quantize
    // gives), and its layout may have inner == 0 (per-tensor over 0 elements, or a zero-size
    // dim after the channel axis), which the task split below would divide by.
    if (!need_sz || n == 0) {
      at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
        if (seed.has_value()) {
          cpu::fake_quantize_backward_range<In, true, false>(gp, xp, dxp, sp, zp, L, qmin, qmax,
                                                             seed_v, b, e, nullptr, nullptr);
        } else {
          cpu::fake_quantize_backward_range<In, false, false>(gp, xp, dxp, sp, zp, L, qmin, qmax,
                                                              seed_v, b, e, nullptr, nullptr);
        }
      });
      return;
    }
    // A fixed number of tasks, each with its own partial sums over the channels its element
    // range touches, added up in fp64 after. With outer == 1 (per-tensor, group-wise, axis 0)
    // a task's range covers consecutive channels only, so the buffers total about
    // channels + tasks values instead of tasks * channels.
    const int64_t tasks =
        std::max<int64_t>(1, std::min<int64_t>((n + kGrain - 1) / kGrain,
                                               4 * static_cast<int64_t>(at::get_num_threads())));
    const int64_t chunk = (n + tasks - 1) / tasks;
    std::vector<int64_t> c_lo(tasks, 0), offset(tasks + 1, 0);
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t b = std::min(n, t * chunk), e = std::min(n, b + chunk);
      int64_t width = L.channels;
      if (L.outer == 1) {
        c_lo[t] = b / L.inner;
        width = e > b ? (e - 1) / L.inner - c_lo[t] + 1 : 0;
      }
      offset[t + 1] = offset[t] + width;
    }
    std::vector<T> ds(static_cast<size_t>(offset[tasks]), T(0));
    std::vector<T> dz(static_cast<size_t>(offset[tasks]), T(0));
    at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = std::min(n, t * chunk), e = std::min(n, b + chunk);
        if (b >= e) continue;
        T* dsp = ds.data() + offset[t];
        T* dzp = dz.data() + offset[t];
        if (seed.has_value()) {
          cpu::fake_quantize_backward_range<In, true, true>(gp, xp, dxp, sp, zp, L, qmin, qmax,
                                                            seed_v, b, e, dsp, dzp, c_lo[t]);
        } else {
          cpu::fake_quantize_backward_range<In, false, true>(gp, xp, dxp, sp, zp, L, qmin, qmax,
                                                             seed_v, b, e, dsp, dzp, c_lo[t]);
        }
      }
    });
    double* gsp = gs.data_ptr<double>();
    double* gzp = gz.data_ptr<double>();
    for (int64_t t = 0; t < tasks; ++t) {
      for (int64_t k = 0; k < offset[t + 1] - offset[t]; ++k) {
        gsp[c_lo[t] + k] += static_cast<double>(ds[offset[t] + k]);
        gzp[c_lo[t] + k] += static_cast<double>(dz[offset[t] + k]);
      }
    }
  });
  return finish_backward(dx, x_in, gs, gz, grad_factor, scale, zero_point, need_scale_grad,
                         need_zero_point_grad);
}

at::Tensor quantize_cpu(const at::Tensor& x_in, const at::Tensor& scale,
                        const at::Tensor& zero_point, int64_t qmin, int64_t qmax,
                        c10::optional<int64_t> axis, c10::optional<int64_t> group_size,
                        bool pack) {
  check_common(x_in, qmin, qmax);
  check_pack(pack, qmin, qmax);
  const at::Tensor x = x_in.contiguous();
  const QuantLayout L = layout_for(x, axis, group_size);
  const auto p = prepare_params(x, scale, zero_point, L, math_type_of(x));
  const bool is_signed = qmin < 0;
  at::Tensor q;
  dispatch_storage(x.scalar_type(), [&](auto tag) {
    using In = decltype(tag);
    using T = typename cpu::acc_type<In>::type;
    const In* xp = ptr<In>(x);
    const T* sp = p.scale.data_ptr<T>();
    const T* zp = p.zero_point.data_ptr<T>();
    if (pack) {
      const int64_t last = x.dim() ? x.size(-1) : 1;
      const int64_t rows = last ? x.numel() / last : 0;
      std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
      if (!shape.empty()) shape.back() = (last + 1) / 2;  // 0-dim x: 0-dim codes (1 byte)
      q = empty_cached(shape, x.options().dtype(at::kByte));
      uint8_t* qp = q.data_ptr<uint8_t>();
      at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(last, 1)),
                       [&](int64_t b, int64_t e) {
                         cpu::quantize_packed_rows<In>(xp, qp, sp, zp, L, qmin, qmax, last, b, e);
                       });
    } else if (is_signed) {
      q = empty_cached(x.sizes(), x.options().dtype(at::kChar));
      int8_t* qp = q.data_ptr<int8_t>();
      at::parallel_for(0, x.numel(), kGrain, [&](int64_t b, int64_t e) {
        cpu::quantize_range<In, int8_t>(xp, qp + b, sp, zp, L, qmin, qmax, b, e);
      });
    } else {
      q = empty_cached(x.sizes(), x.options().dtype(at::kByte));
      uint8_t* qp = q.data_ptr<uint8_t>();
      at::parallel_for(0, x.numel(), kGrain, [&](int64_t b, int64_t e) {
        cpu::quantize_range<In, uint8_t>(xp, qp + b, sp, zp, L, qmin, qmax, b, e);
      });
    }
  });
  return q;
}

at::Tensor dequantize_cpu(const at::Tensor& data_in, const at::Tensor& scale,
                          const at::Tensor& zero_point, int64_t qmin, int64_t qmax,
                          c10::optional<int64_t> axis, c10::optional<int64_t> group_size,
                          bool packed, int64_t last_dim, at::ScalarType dtype) {
  const auto shape = dequantize_shape(data_in, qmin, qmax, packed, last_dim, dtype);
  const at::Tensor data = data_in.contiguous();
  const bool is_signed = qmin < 0;
  at::Tensor y = empty_cached(shape, data.options().dtype(dtype));
  const QuantLayout L = layout_for(y, axis, group_size);
  const auto p = prepare_params(y, scale, zero_point, L, math_type_of(y));
  dispatch_storage(dtype, [&](auto tag) {
    using Out = decltype(tag);
    using T = typename cpu::acc_type<Out>::type;
    Out* yp = ptr<Out>(y);
    const T* sp = p.scale.data_ptr<T>();
    const T* zp = p.zero_point.data_ptr<T>();
    if (packed) {
      const int64_t rows = last_dim ? y.numel() / last_dim : 0;
      const uint8_t* qp = data.data_ptr<uint8_t>();
      at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(last_dim, 1)),
                       [&](int64_t b, int64_t e) {
                         cpu::dequantize_packed_rows<Out>(qp, yp, sp, zp, L, qmin, qmax, last_dim,
                                                          b, e);
                       });
    } else if (is_signed) {
      const int8_t* qp = data.data_ptr<int8_t>();
      at::parallel_for(0, y.numel(), kGrain, [&](int64_t b, int64_t e) {
        cpu::dequantize_range<int8_t, Out>(qp + b, yp, sp, zp, L, qmin, qmax, b, e);
      });
    } else {
      const uint8_t* qp = data.data_ptr<uint8_t>();
      at::parallel_for(0, y.numel(), kGrain, [&](int64_t b, int64_t e) {
        cpu::dequantize_range<uint8_t, Out>(qp + b, yp, sp, zp, L, qmin, qmax, b, e);
      });
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(pypaper, CPU, m) {
  m.impl("fake_quantize", &fake_quantize_cpu);
  m.impl("fake_quantize_backward", &fake_quantize_backward_cpu);
  m.impl("quantize", &quantize_cpu);
  m.impl("dequantize", &dequantize_cpu);
}

}  // namespace quant
}  // namespace pypaper
