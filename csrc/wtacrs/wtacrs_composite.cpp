// Device-generic WTA-CRS ops (CompositeExplicitAutograd): the sampling step of a layer and the
// linear layer itself, built from the per-device kernels (wtacrs_row_norms, wtacrs_select,
// wtacrs_gather_scale, wtacrs_sampled_grad_weight; CPU in wtacrs_cpu.cpp, CUDA in
// wtacrs_cuda.cpp) and torch's GEMM. Autograd is registered from Python
// (pypaper/wtacrs/_registration.py): wtacrs_linear saves only x_kept and indices, and its
// backward is the op wtacrs_linear_backward.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sum.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "wtacrs_args.h"

namespace pypaper {
namespace wtacrs {
namespace {

at::Tensor call_row_norms(const at::Tensor& x) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("pypaper::wtacrs_row_norms", "")
                       .typed<at::Tensor(const at::Tensor&)>();
  return op.call(x);
}

std::tuple<at::Tensor, at::Tensor> call_select(const at::Tensor& scores, int64_t k, bool wta,
                                               const at::Tensor& seed) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("pypaper::wtacrs_select", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, int64_t, bool,
                                                                 const at::Tensor&)>();
  return op.call(scores, k, wta, seed);
}

at::Tensor call_gather(const at::Tensor& x, const at::Tensor& indices,
                       const std::optional<at::Tensor>& scales,
                       std::optional<at::ScalarType> dtype) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("pypaper::wtacrs_gather_scale", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                         const std::optional<at::Tensor>&,
                                         std::optional<at::ScalarType>)>();
  return op.call(x, indices, scales, dtype);
}

at::Tensor call_sampled_grad_weight(const at::Tensor& grad_y, const at::Tensor& indices,
                                    const at::Tensor& x_kept) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("pypaper::wtacrs_sampled_grad_weight", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&)>();
  return op.call(grad_y, indices, x_kept);
}

// (x_kept, indices): the k rows of x the estimator keeps for grad_W, each already multiplied by
// its weight (1 for the winner-take-all set, R / ((k - |C|) w_i) for a draw), stored in `dtype`.
// Sampling scores: ||x_t|| * grad_norm[t] (||x_t|| alone without grad_norm).
std::tuple<at::Tensor, at::Tensor> sample(const at::Tensor& x,
                                          const std::optional<at::Tensor>& grad_norm, int64_t k,
                                          bool wta, const at::Tensor& seed,
                                          std::optional<at::ScalarType> dtype) {
  check_rows(x, "x");
  check_grad_norm(grad_norm, x);
  check_k(k, x.size(0));
  kept_dtype(x, dtype);
  at::Tensor scores = call_row_norms(x);
  if (grad_norm.has_value()) scores = at::mul(scores, grad_norm->to(scores.scalar_type()));
  auto [indices, scales] = call_select(scores, k, wta, seed);
  return {call_gather(x, indices, scales, dtype), indices};
}

// y = x W^T + b, exactly torch's linear. x_kept and indices are not read: they are what autograd
// saves for the backward in place of x.
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, const at::Tensor& x_kept,
                  const at::Tensor& indices) {
  check_rows(x, "x");
  check_weight(weight, bias, x);
  TORCH_CHECK_VALUE(x.size(1) == weight.size(1), "x must have in_features = ", weight.size(1),
                    " features, got shape ", x.sizes());
  check_kept(x_kept, indices, weight.size(1), x);
  return at::linear(x, weight, bias);
}

// grad_x = grad_y W (exact), grad_W = sum_j grad_y[indices[j]] x_kept[j]^T (the estimator),
// grad_b = sum_t grad_y[t] (exact, full grad_y). Gradients not asked for are empty [0] tensors.
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_backward(
    const at::Tensor& grad_y, const at::Tensor& weight, const at::Tensor& x_kept,
    const at::Tensor& indices, bool need_input, bool need_weight, bool need_bias) {
  check_rows(grad_y, "grad_y");
  check_weight(weight, std::nullopt, grad_y);
  TORCH_CHECK_VALUE(grad_y.size(1) == weight.size(0), "grad_y must have out_features = ",
                    weight.size(0), " features, got shape ", grad_y.sizes());
  check_kept(x_kept, indices, weight.size(1), grad_y);
  const auto empty = [&] { return at::empty({0}, grad_y.options()); };
  at::Tensor gx = need_input ? at::mm(grad_y, weight.to(grad_y.scalar_type())) : empty();
  at::Tensor gw = need_weight ? call_sampled_grad_weight(grad_y, indices, x_kept)
                                    .to(weight.scalar_type())
                              : empty();
  at::Tensor gb = need_bias ? at::sum(grad_y, {0}).to(weight.scalar_type()) : empty();
  return {gx, gw, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(pypaper, CompositeExplicitAutograd, m) {
  m.impl("wtacrs_sample", &sample);
  m.impl("wtacrs_linear", &linear);
  m.impl("wtacrs_linear_backward", &linear_backward);
}

}  // namespace wtacrs
}  // namespace pypaper
