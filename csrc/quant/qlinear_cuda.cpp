// CUDA implementations of the quantized linear ops (issue #7, linear kernels): the checks of
// qlinear_args.h and the allocations around the launchers of kernels/cuda/qlinear_kernels.cu, on
// the current stream of x's device. Nothing here synchronizes.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "../../kernels/cuda/qlinear_kernels.cuh"
#include "qlinear_args.h"

namespace pypaper {
namespace qlinear {
namespace {

at::Tensor rows_view(const at::Tensor& x) {
  return (x.size(1) <= 1 || x.stride(1) == 1) ? x : x.contiguous();
}

// Codes [M, Kp] int8 and scales [M] of x's rows.
std::tuple<at::Tensor, at::Tensor> quantize_rows(const at::Tensor& x, int64_t act_qmax,
                                                 cudaStream_t stream) {
  const int64_t M = x.size(0), K = x.size(1), Kp = round_up(K, kKStep);
  at::Tensor qa = at::empty({M, Kp}, x.options().dtype(at::kChar));
  at::Tensor sa = at::empty({M}, x.options());
  C10_CUDA_CHECK(gpu::launch_qlinear_quantize_rows(x.const_data_ptr<float>(), x.stride(0), M, K,
                                                   Kp, static_cast<int32_t>(act_qmax),
                                                   qa.mutable_data_ptr<int8_t>(),
                                                   sa.mutable_data_ptr<float>(), stream));
  return {qa, sa};
}

at::Tensor int8_dynamic_linear_cuda(const at::Tensor& x_in, const at::Tensor& w_packed,
                                    const at::Tensor& w_scale, const at::Tensor& w_colsum,
                                    const c10::optional<at::Tensor>& bias_in, int64_t act_qmax) {
  const int64_t N = check_int8_dynamic(x_in, w_packed, w_scale, w_colsum, act_qmax);
  check_bias(x_in, bias_in, N);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  const at::Tensor x = rows_view(x_in);
  const int64_t M = x.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  auto [qa, sa] = quantize_rows(x, act_qmax, stream);
  const at::Tensor sw = w_scale.contiguous();
  at::Tensor bias;
  if (bias_in.has_value()) bias = bias_in->contiguous();
  C10_CUDA_CHECK(gpu::launch_qlinear_int8_gemm(
      qa.const_data_ptr<int8_t>(), M, qa.size(1), w_packed.const_data_ptr<int8_t>(), N,
      sa.const_data_ptr<float>(), sw.const_data_ptr<float>(),
      bias.defined() ? bias.const_data_ptr<float>() : nullptr, y.mutable_data_ptr<float>(),
      nullptr, stream));
  return y;
}

std::tuple<at::Tensor, at::Tensor> int8_dynamic_linear_int32_cuda(const at::Tensor& x_in,
                                                                  const at::Tensor& w_packed,
                                                                  const at::Tensor& w_colsum,
                                                                  int64_t out_features,
                                                                  int64_t act_qmax) {
  TORCH_CHECK(out_features >= 0, "out_features must be non-negative, got ", out_features);
  const at::Tensor dummy = at::empty({out_features}, x_in.options());
  const int64_t N = check_int8_dynamic(x_in, w_packed, dummy, w_colsum, act_qmax);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  const at::Tensor x = rows_view(x_in);
  const int64_t M = x.size(0);
  at::Tensor acc = at::empty({M, N}, x.options().dtype(at::kInt));
  auto [qa, sa] = quantize_rows(x, act_qmax, stream);
  if (M == 0 || N == 0) return {acc, sa};
  C10_CUDA_CHECK(gpu::launch_qlinear_int8_gemm(
      qa.const_data_ptr<int8_t>(), M, qa.size(1), w_packed.const_data_ptr<int8_t>(), N, nullptr,
      nullptr, nullptr, nullptr, acc.mutable_data_ptr<int32_t>(), stream));
  return {acc, sa};
}

at::Tensor weight_only_cuda(const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& scale_in,
                            const at::Tensor* zero_in, const c10::optional<at::Tensor>& bias_in,
                            bool int4) {
  const int64_t N = check_weight_only(x_in, w, scale_in, int4);
  check_bias(x_in, bias_in, N);
  if (zero_in) {
    check_same_device(x_in, *zero_in, "zero");
    TORCH_CHECK(zero_in->scalar_type() == at::kFloat && zero_in->sizes() == scale_in.sizes(),
                "zero must be float32 of scale's shape ", scale_in.sizes());
  }
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor scale = scale_in.contiguous();
  at::Tensor zero, bias;
  if (zero_in) zero = zero_in->contiguous();
  if (bias_in.has_value()) bias = bias_in->contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor y = at::empty({M, N}, x.options());
  C10_CUDA_CHECK(gpu::launch_qlinear_weight_only(
      x.const_data_ptr<float>(), M, K, w.const_data_ptr(), int4, scale.const_data_ptr<float>(),
      zero.defined() ? zero.const_data_ptr<float>() : nullptr, scale.size(1),
      bias.defined() ? bias.const_data_ptr<float>() : nullptr, N, y.mutable_data_ptr<float>(),
      c10::cuda::getCurrentCUDAStream().stream()));
  return y;
}

at::Tensor int8_weight_only_linear_cuda(const at::Tensor& x, const at::Tensor& w,
                                        const at::Tensor& scale,
                                        const c10::optional<at::Tensor>& bias) {
  return weight_only_cuda(x, w, scale, nullptr, bias, false);
}

at::Tensor int4_weight_only_linear_cuda(const at::Tensor& x, const at::Tensor& w,
                                        const at::Tensor& scale, const at::Tensor& zero,
                                        const c10::optional<at::Tensor>& bias) {
  return weight_only_cuda(x, w, scale, &zero, bias, true);
}

}  // namespace

TORCH_LIBRARY_IMPL(pypaper, CUDA, m) {
  m.impl("int8_dynamic_linear", &int8_dynamic_linear_cuda);
  m.impl("int8_dynamic_linear_int32", &int8_dynamic_linear_int32_cuda);
  m.impl("int8_weight_only_linear", &int8_weight_only_linear_cuda);
  m.impl("int4_weight_only_linear", &int4_weight_only_linear_cuda);
}

}  // namespace qlinear
}  // namespace pypaper
