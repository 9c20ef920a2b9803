// CUDA implementations of the few-bit activation ops (schemas in csrc/schemas.cpp): the checks and
// outputs of fewbit_cpu.cpp around the launchers of kernels/cuda/fewbit_kernels.cu, on the current
// stream of x's device. y = f(x) is torch's own CUDA kernel (activation_out in fewbit_args.h goes
// through the dispatcher), so the forward is bit-exact with torch; the kernel adds the codes.
// Nothing here synchronizes with the device.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

#include "../../kernels/cuda/fewbit_kernels.cuh"
#include "fewbit_args.h"

namespace pypaper {
namespace fewbit {
namespace {

// check_float has accepted the dtype already.
gpu::FloatType float_type(at::ScalarType st) {
  switch (st) {
    case at::kFloat: return gpu::FloatType::kFloat32;
    case at::kDouble: return gpu::FloatType::kFloat64;
    case at::kHalf: return gpu::FloatType::kFloat16;
    case at::kBFloat16: return gpu::FloatType::kBFloat16;
    default: break;
  }
  TORCH_INTERNAL_ASSERT(false, "unexpected dtype ", st);
}

std::tuple<at::Tensor, at::Tensor> fewbit_forward_cuda(const at::Tensor& x_in,
                                                       c10::string_view activation,
                                                       at::ArrayRef<double> params,
                                                       const at::Tensor& borders_in,
                                                       const at::Tensor& levels, int64_t bits,
                                                       bool fold) {
  check_forward(x_in, borders_in, levels, bits, fold);
  const std::vector<double> p(params.begin(), params.end());
  const Act act = parse_activation(std::string(activation), p);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor borders = borders_in.contiguous();
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t n = x.numel();
  at::Tensor codes = at::empty({packed_bytes(n, bits)}, x.options().dtype(at::kByte));
  if (n == 0) return {y, codes};
  activation_out(y, x, act, p);  // torch's CUDA kernel, on the current stream
  C10_CUDA_CHECK(gpu::launch_fewbit_pack(
      float_type(x.scalar_type()), x.const_data_ptr(), codes.mutable_data_ptr<uint8_t>(), n,
      borders.const_data_ptr(), static_cast<int>(borders.numel()), static_cast<int>(bits), fold,
      c10::cuda::getCurrentCUDAStream().stream()));
  return {y, codes};
}

at::Tensor fewbit_backward_cuda(const at::Tensor& grad_in, const at::Tensor& codes_in,
                                const at::Tensor& levels_in, int64_t bits) {
  check_backward(grad_in, codes_in, levels_in, bits);
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor codes = codes_in.contiguous();
  const at::Tensor levels = levels_in.contiguous();
  at::Tensor gx = at::empty_like(grad, at::MemoryFormat::Contiguous);
  const int64_t n = grad.numel();
  if (n == 0) return gx;
  C10_CUDA_CHECK(gpu::launch_fewbit_backward(
      float_type(grad.scalar_type()), grad.const_data_ptr(), codes.const_data_ptr<uint8_t>(),
      gx.mutable_data_ptr(), n, levels.const_data_ptr(), static_cast<int>(bits),
      c10::cuda::getCurrentCUDAStream().stream()));
  return gx;
}

}  // namespace

TORCH_LIBRARY_IMPL(pypaper, CUDA, m) {
  m.impl("fewbit_forward", &fewbit_forward_cuda);
  m.impl("fewbit_backward", &fewbit_backward_cuda);
}

}  // namespace fewbit
}  // namespace pypaper
