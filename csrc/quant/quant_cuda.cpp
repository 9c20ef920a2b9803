// CUDA implementations of the quant ops: the checks, allocation and outputs of quant_cpu.cpp
// around the launchers of kernels/cuda/quant_kernels.cu, on the current stream of x's device.
// Nothing here synchronizes with the device: the stochastic-rounding seed stays on the GPU and
// the kernels read it there.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "../../kernels/cuda/quant_kernels.cuh"
#include "quant_args.h"

namespace pypaper {
namespace quant {
namespace {

gpu::FloatType float_type(at::ScalarType st, const char* name) {
  switch (st) {
    case at::kFloat: return gpu::FloatType::kFloat32;
    case at::kDouble: return gpu::FloatType::kFloat64;
    case at::kHalf: return gpu::FloatType::kFloat16;
    case at::kBFloat16: return gpu::FloatType::kBFloat16;
    default: break;
  }
  TORCH_CHECK(false, name, " must be float32, float64, float16 or bfloat16, got ", st);
}

// The seed of stochastic rounding as a device pointer (read by the kernel: no host sync), or
// nullptr for round-to-nearest.
const int64_t* seed_ptr(const c10::optional<at::Tensor>& seed, const at::Tensor& x) {
  if (!seed.has_value()) return nullptr;
  TORCH_CHECK(seed->scalar_type() == at::kLong && seed->numel() == 1,
              "seed must be an int64 tensor of one element, got ", seed->scalar_type(),
              " with ", seed->numel(), " elements");
  TORCH_CHECK(seed->device() == x.device(), "seed is on ", seed->device(), " but x is on ",
              x.device(), ": the seed must be on x's device");
  return seed->const_data_ptr<int64_t>();
}

at::Tensor fake_quantize_cuda(const at::Tensor& x_in, const at::Tensor& scale,
                              const at::Tensor& zero_point, int64_t qmin, int64_t qmax,
                              c10::optional<int64_t> axis, c10::optional<int64_t> group_size,
                              const c10::optional<at::Tensor>& seed, double /*grad_factor*/) {
  check_common(x_in, qmin, qmax);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const QuantLayout L = layout_for(x, axis, group_size);
  const auto p = prepare_params(x, scale, zero_point, L, math_type_of(x));
  const int64_t* seed_p = seed_ptr(seed, x);
  at::Tensor y = at::empty_like(x);
  C10_CUDA_CHECK(gpu::launch_fake_quantize(
      float_type(x.scalar_type(), "x"), x.const_data_ptr(), y.mutable_data_ptr(),
      p.scale.const_data_ptr(), p.zero_point.const_data_ptr(), L, static_cast<int32_t>(qmin),
      static_cast<int32_t>(qmax), seed_p, c10::cuda::getCurrentCUDAStream().stream()));
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quantize_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& scale,
    const at::Tensor& zero_point, int64_t qmin, int64_t qmax, c10::optional<int64_t> axis,
    c10::optional<int64_t> group_size, const c10::optional<at::Tensor>& seed, double grad_factor,
    bool need_scale_grad, bool need_zero_point_grad) {
  check_common(x_in, qmin, qmax);
  TORCH_CHECK(grad_in.sizes() == x_in.sizes(), "grad has shape ", grad_in.sizes(),
              " but x has shape ", x_in.sizes());
  TORCH_CHECK(grad_in.scalar_type() == x_in.scalar_type(), "grad has dtype ",
              grad_in.scalar_type(), " but x has dtype ", x_in.scalar_type());
  TORCH_CHECK(grad_in.device() == x_in.device(), "grad is on ", grad_in.device(),
              " but x is on ", x_in.device());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor grad = grad_in.contiguous();
  const QuantLayout L = layout_for(x, axis, group_size);
  const auto p = prepare_params(x, scale, zero_point, L, math_type_of(x));
  const int64_t* seed_p = seed_ptr(seed, x);
  const bool need_sz = need_scale_grad || need_zero_point_grad;
  at::Tensor dx = at::empty_like(x);
  // fp64 per-channel sums (the kernels' partial sums are in the math type, as on the CPU).
  at::Tensor gs = at::zeros({L.channels}, x.options().dtype(at::kDouble));
  at::Tensor gz = at::zeros({L.channels}, x.options().dtype(at::kDouble));
  C10_CUDA_CHECK(gpu::launch_fake_quantize_backward(
      float_type(x.scalar_type(), "x"), grad.const_data_ptr(), x.const_data_ptr(),
      dx.mutable_data_ptr(), p.scale.const_data_ptr(), p.zero_point.const_data_ptr(), L,
      static_cast<int32_t>(qmin), static_cast<int32_t>(qmax), seed_p,
      need_sz ? gs.mutable_data_ptr<double>() : nullptr,
      need_sz ? gz.mutable_data_ptr<double>() : nullptr,
      c10::cuda::getCurrentCUDAStream().stream()));
  return finish_backward(dx, x_in, gs, gz, grad_factor, scale, zero_point, need_scale_grad,
                         need_zero_point_grad);
}

at::Tensor quantize_cuda(const at::Tensor& x_in, const at::Tensor& scale,
                         const at::Tensor& zero_point, int64_t qmin, int64_t qmax,
                         c10::optional<int64_t> axis, c10::optional<int64_t> group_size,
                         bool pack) {
  check_common(x_in, qmin, qmax);
  check_pack(pack, qmin, qmax);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const QuantLayout L = layout_for(x, axis, group_size);
  const auto p = prepare_params(x, scale, zero_point, L, math_type_of(x));
  const auto type = float_type(x.scalar_type(), "x");
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  at::Tensor q;
  if (pack) {
    const int64_t last = x.dim() ? x.size(-1) : 1;
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    if (!shape.empty()) shape.back() = (last + 1) / 2;  // 0-dim x: 0-dim codes (1 byte)
    q = at::empty(shape, x.options().dtype(at::kByte));
    C10_CUDA_CHECK(gpu::launch_quantize_packed(
        type, x.const_data_ptr(), q.mutable_data_ptr<uint8_t>(), p.scale.const_data_ptr(),
        p.zero_point.const_data_ptr(), L, static_cast<int32_t>(qmin), static_cast<int32_t>(qmax),
        last, stream));
  } else {
    q = at::empty(x.sizes(), x.options().dtype(qmin < 0 ? at::kChar : at::kByte));
    C10_CUDA_CHECK(gpu::launch_quantize(type, x.const_data_ptr(), q.mutable_data_ptr(),
                                        p.scale.const_data_ptr(), p.zero_point.const_data_ptr(),
                                        L, static_cast<int32_t>(qmin), static_cast<int32_t>(qmax),
                                        stream));
  }
  return q;
}

at::Tensor dequantize_cuda(const at::Tensor& data_in, const at::Tensor& scale,
                           const at::Tensor& zero_point, int64_t qmin, int64_t qmax,
                           c10::optional<int64_t> axis, c10::optional<int64_t> group_size,
                           bool packed, int64_t last_dim, at::ScalarType dtype) {
  const auto shape = dequantize_shape(data_in, qmin, qmax, packed, last_dim, dtype);
  const c10::cuda::CUDAGuard guard(data_in.device());
  const at::Tensor data = data_in.contiguous();
  at::Tensor y = at::empty(shape, data.options().dtype(dtype));
  const QuantLayout L = layout_for(y, axis, group_size);
  const auto p = prepare_params(y, scale, zero_point, L, math_type_of(y));
  const auto type = float_type(dtype, "dtype");
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  if (packed) {
    C10_CUDA_CHECK(gpu::launch_dequantize_packed(
        type, data.const_data_ptr<uint8_t>(), y.mutable_data_ptr(), p.scale.const_data_ptr(),
        p.zero_point.const_data_ptr(), L, static_cast<int32_t>(qmin), static_cast<int32_t>(qmax),
        last_dim, stream));
  } else {
    C10_CUDA_CHECK(gpu::launch_dequantize(type, data.const_data_ptr(), y.mutable_data_ptr(),
                                          p.scale.const_data_ptr(), p.zero_point.const_data_ptr(),
                                          L, static_cast<int32_t>(qmin),
                                          static_cast<int32_t>(qmax), stream));
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(pypaper, CUDA, m) {
  m.impl("fake_quantize", &fake_quantize_cuda);
  m.impl("fake_quantize_backward", &fake_quantize_backward_cuda);
  m.impl("quantize", &quantize_cuda);
  m.impl("dequantize", &dequantize_cuda);
}

}  // namespace quant
}  // namespace pypaper
