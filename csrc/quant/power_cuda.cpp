// CUDA implementations of the power-quantizer ops: the checks and outputs of power_cpu.cpp around
// the launchers of kernels/cuda/power_quant_kernels.cu, on the current stream of x's device.
// Nothing here synchronizes: the exponents stay on the device (the Python wrapper checks that
// they are finite and positive before the call).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../../kernels/cuda/power_quant_kernels.cuh"
#include "power_args.h"

namespace pypaper {
namespace power {
namespace {

struct Prepared {
  gpu::PowerShape shape;
  at::Tensor m;   // in the data type, contiguous
  at::Tensor ex;  // float64, contiguous
};

Prepared prepare(int64_t numel, const at::Tensor& ref, const at::Tensor& max_abs,
                 const at::Tensor& exponent, int64_t qmax, at::ScalarType dtype) {
  check_qmax(qmax);
  const PowerShape s = power_shape(numel, ref, max_abs, exponent);
  return Prepared{gpu::PowerShape{s.channels, s.inner, s.per_channel_exponent},
                  max_abs.to(dtype).contiguous(), exponent.to(at::kDouble).contiguous()};
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

at::Tensor power_quantize_cuda(const at::Tensor& x_in, const at::Tensor& max_abs,
                               const at::Tensor& exponent, int64_t qmax) {
  check_float(x_in, "x");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  auto p = prepare(x.numel(), x, max_abs, exponent, qmax, x.scalar_type());
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(at::kChar));
  C10_CUDA_CHECK(gpu::launch_power_quantize(
      x.scalar_type() == at::kDouble, x.const_data_ptr(), q.mutable_data_ptr<int8_t>(),
      p.m.const_data_ptr(), p.ex.const_data_ptr<double>(), p.shape, static_cast<int>(qmax),
      stream()));
  return q;
}

at::Tensor power_dequantize_cuda(const at::Tensor& codes_in, const at::Tensor& max_abs,
                                 const at::Tensor& exponent, int64_t qmax, at::ScalarType dtype) {
  TORCH_CHECK(codes_in.scalar_type() == at::kChar, "codes must be int8, got ",
              codes_in.scalar_type());
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "dtype must be float32 or float64, got ",
              dtype);
  const c10::cuda::CUDAGuard guard(codes_in.device());
  const at::Tensor codes = codes_in.contiguous();
  auto p = prepare(codes.numel(), codes, max_abs, exponent, qmax, dtype);
  at::Tensor y = at::empty(codes.sizes(), codes.options().dtype(dtype));
  C10_CUDA_CHECK(gpu::launch_power_dequantize(
      dtype == at::kDouble, codes.const_data_ptr<int8_t>(), y.mutable_data_ptr(),
      p.m.const_data_ptr(), p.ex.const_data_ptr<double>(), p.shape, static_cast<int>(qmax),
      stream()));
  return y;
}

at::Tensor power_fake_quantize_cuda(const at::Tensor& x_in, const at::Tensor& max_abs,
                                    const at::Tensor& exponent, int64_t qmax, bool /*ste*/) {
  check_float(x_in, "x");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  auto p = prepare(x.numel(), x, max_abs, exponent, qmax, x.scalar_type());
  at::Tensor y = at::empty_like(x);
  C10_CUDA_CHECK(gpu::launch_power_fake_quantize(
      x.scalar_type() == at::kDouble, x.const_data_ptr(), y.mutable_data_ptr(),
      p.m.const_data_ptr(), p.ex.const_data_ptr<double>(), p.shape, static_cast<int>(qmax),
      stream()));
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> power_fake_quantize_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& max_abs,
    const at::Tensor& exponent, int64_t qmax, bool need_max_grad, bool need_exponent_grad,
    bool ste) {
  check_float(x_in, "x");
  TORCH_CHECK(grad_in.sizes() == x_in.sizes(), "grad has shape ", grad_in.sizes(),
              " but x has shape ", x_in.sizes());
  TORCH_CHECK(grad_in.scalar_type() == x_in.scalar_type(), "grad has dtype ",
              grad_in.scalar_type(), " but x has dtype ", x_in.scalar_type());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor g = grad_in.contiguous();
  auto p = prepare(x.numel(), x, max_abs, exponent, qmax, x.scalar_type());
  const bool need = need_max_grad || need_exponent_grad;
  const int64_t C = p.shape.channels;
  const int64_t bpc = gpu::power_blocks_per_channel(p.shape.inner);
  at::Tensor dx = at::empty_like(x);
  at::Tensor pa = at::zeros({C, bpc}, x.options().dtype(at::kDouble));
  at::Tensor pm = at::zeros({C, bpc}, x.options().dtype(at::kDouble));
  C10_CUDA_CHECK(gpu::launch_power_fake_quantize_backward(
      x.scalar_type() == at::kDouble, g.const_data_ptr(), x.const_data_ptr(),
      dx.mutable_data_ptr(), p.m.const_data_ptr(), p.ex.const_data_ptr<double>(), p.shape,
      static_cast<int>(qmax), ste, need ? pa.mutable_data_ptr<double>() : nullptr,
      need ? pm.mutable_data_ptr<double>() : nullptr, stream()));
  at::Tensor gm = pm.sum(1);
  at::Tensor ga_ch = pa.sum(1);
  at::Tensor ga = p.shape.per_channel_exponent ? ga_ch : ga_ch.sum().reshape({1});
  TORCH_INTERNAL_ASSERT(dx.sizes() == x_in.sizes());  // allocated in x's shape: not a view
  return {dx,
          need_max_grad ? fresh_copy(gm, max_abs.sizes(), max_abs.scalar_type())
                        : at::zeros(max_abs.sizes(), max_abs.options()),
          need_exponent_grad ? fresh_copy(ga, exponent.sizes(), exponent.scalar_type())
                             : at::zeros(exponent.sizes(), exponent.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(pypaper, CUDA, m) {
  m.impl("power_quantize", &power_quantize_cuda);
  m.impl("power_dequantize", &power_dequantize_cuda);
  m.impl("power_fake_quantize", &power_fake_quantize_cuda);
  m.impl("power_fake_quantize_backward", &power_fake_quantize_backward_cuda);
}

}  // namespace power
}  // namespace pypaper
