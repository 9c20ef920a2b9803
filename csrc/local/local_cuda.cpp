// CUDA implementations of pypaper.local's fused layer ops (schemas in csrc/schemas.cpp): the
// checks and outputs of local_cpu.cpp around the row-epilogue kernels of
// kernels/cuda/local_kernels.cu, on the current stream. The two GEMMs of a layer are torch's
// (cuBLAS). The label range is checked on the host (one synchronisation), as a wrong label would
// read out of bounds.
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "../../kernels/cuda/local_kernels.cuh"
#include "local_args.h"

namespace pypaper {
namespace local {
namespace {

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

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

void check_label_range(const at::Tensor& y, int64_t k) {
  if (y.numel() == 0) return;
  const int64_t lo = y.min().item<int64_t>(), hi = y.max().item<int64_t>();
  TORCH_CHECK_INDEX(lo >= 0 && hi < k, "y must hold class labels in [0, ", k, "), got values in [",
                    lo, ", ", hi, "]");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ff_linear_cuda(
    const at::Tensor& x_in, const at::Tensor& weight_in, const std::optional<at::Tensor>& bias_in,
    int64_t num_pos, double threshold, bool normalize, double eps) {
  check_linear(x_in, weight_in, bias_in);
  const int64_t n = x_in.size(0), d = x_in.size(1), m = weight_in.size(0);
  TORCH_CHECK_VALUE(num_pos >= 0 && num_pos <= n, "num_pos must be in [0, N] = [0, ", n,
                    "], got ", num_pos);
  check_finite(threshold, "threshold");
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, "eps must be finite and >= 0, got ", eps);
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.detach().contiguous(), w = weight_in.detach().contiguous();
  const at::ScalarType mt = math_type_of(x.scalar_type());
  at::Tensor h = at::mm(x, w.t());
  at::Tensor dz = at::empty_like(h);
  at::Tensor rows = at::zeros({n}, x.options().dtype(mt));
  at::Tensor db = at::zeros({bias_in.has_value() ? m : 0}, x.options().dtype(mt));
  at::Tensor b = bias_in.has_value() ? bias_in->detach().contiguous() : at::Tensor();
  C10_CUDA_CHECK(gpu::launch_local_ff_rows(
      float_type(x.scalar_type()), h.data_ptr(), x.const_data_ptr(),
      b.defined() ? b.const_data_ptr() : nullptr, dz.data_ptr(), rows.data_ptr(), db.data_ptr(),
      n, m, d, num_pos, threshold, eps, normalize, stream()));
  at::Tensor gw = at::mm(dz.t(), x);
  return {h, rows.sum(), gw, db.to(w.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> tp_linear_cuda(
    const at::Tensor& x_in, const at::Tensor& weight_in, const std::optional<at::Tensor>& bias_in,
    const at::Tensor& proj_in, const at::Tensor& y_in, int64_t activation, bool sign) {
  check_linear(x_in, weight_in, bias_in);
  const int64_t n = x_in.size(0), m = weight_in.size(0);
  TORCH_CHECK_VALUE(activation >= 0 && activation <= 2,
                    "activation must be 0 (sigmoid), 1 (tanh) or 2 (relu), got ", activation);
  TORCH_CHECK(proj_in.dim() == 2 && proj_in.size(1) == m,
              "proj must have shape [num_classes, out_features] (P^T) with out_features = ", m,
              ", got ", proj_in.sizes());
  check_labels(y_in, n, x_in);
  check_label_range(y_in, proj_in.size(0));
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.detach().contiguous(), w = weight_in.detach().contiguous();
  const at::ScalarType mt = math_type_of(x.scalar_type());
  const at::Tensor proj = proj_in.to(mt).contiguous(), y = y_in.contiguous();
  at::Tensor h = at::mm(x, w.t());
  at::Tensor dz = at::empty_like(h);
  at::Tensor rows = at::zeros({n}, x.options().dtype(mt));
  at::Tensor db = at::zeros({bias_in.has_value() ? m : 0}, x.options().dtype(mt));
  at::Tensor b = bias_in.has_value() ? bias_in->detach().contiguous() : at::Tensor();
  C10_CUDA_CHECK(gpu::launch_local_tp_rows(
      float_type(x.scalar_type()), h.data_ptr(), b.defined() ? b.const_data_ptr() : nullptr,
      proj.const_data_ptr(), y.const_data_ptr<int64_t>(), dz.data_ptr(), rows.data_ptr(),
      db.data_ptr(), n, m, static_cast<int>(activation), sign, stream()));
  at::Tensor gw = at::mm(dz.t(), x);
  return {h, rows.sum(), gw, db.to(w.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> local_head_cuda(
    const at::Tensor& feat_in, const at::Tensor& weight_in,
    const std::optional<at::Tensor>& bias_in, const at::Tensor& y_in) {
  TORCH_CHECK(is_float_type(feat_in.scalar_type()), "feat must be a float tensor, got ",
              feat_in.scalar_type());
  TORCH_CHECK(feat_in.dim() >= 2, "feat must have shape [N, C, *spatial], got ", feat_in.sizes());
  const int64_t n = feat_in.size(0), c = feat_in.size(1);
  TORCH_CHECK(weight_in.dim() == 2 && weight_in.size(1) == c,
              "weight must have shape [num_classes, C] with C = feat.shape[1] = ", c, ", got ",
              weight_in.sizes());
  const int64_t k = weight_in.size(0);
  check_labels(y_in, n, feat_in);
  check_label_range(y_in, k);
  c10::cuda::CUDAGuard guard(feat_in.device());
  int64_t s = 1;
  for (int64_t i = 2; i < feat_in.dim(); ++i) s *= feat_in.size(i);
  const at::Tensor feat = feat_in.detach().contiguous(), y = y_in.contiguous();
  const at::ScalarType mt = math_type_of(feat.scalar_type());
  const at::Tensor wt = weight_in.detach().to(mt).contiguous();
  at::Tensor pooled = at::empty({n, c}, feat.options().dtype(mt));
  C10_CUDA_CHECK(gpu::launch_local_pool(float_type(feat.scalar_type()), feat.const_data_ptr(),
                                        pooled.data_ptr(), n, c, s, stream()));
  at::Tensor logits = bias_in.has_value() ? at::addmm(bias_in->detach().to(mt), pooled, wt.t())
                                          : at::mm(pooled, wt.t());
  at::Tensor dl = at::empty_like(logits);
  at::Tensor rows = at::zeros({n}, logits.options());
  C10_CUDA_CHECK(gpu::launch_local_ce_rows(mt == at::kDouble, logits.const_data_ptr(),
                                           y.const_data_ptr<int64_t>(), dl.data_ptr(),
                                           rows.data_ptr(), n, k, stream()));
  at::Tensor gb = bias_in.has_value() ? dl.sum(0).to(bias_in->scalar_type())
                                      : at::empty({0}, weight_in.options());
  return {rows.sum(), logits, at::mm(dl, wt), at::mm(dl.t(), pooled).to(weight_in.scalar_type()),
          gb};
}

// Single-forward FF: [x; class_x] W^T by one GEMM, the k class rows' E = ReLU(inv_c z_c + b) by
// torch ops (k rows), the data rows by sf_rows_kernel, then dE = dlogits^T H through E's ReLU and
// the single dW GEMM [dZ; dZ_c]^T [x; class_x] (the structure of the CPU op, local_cpu.cpp).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ff_sf_linear_cuda(
    const at::Tensor& x_in, const at::Tensor& class_x_in, const at::Tensor& weight_in,
    const std::optional<at::Tensor>& bias_in, const at::Tensor& y_in, bool normalize, double eps,
    double temperature) {
  check_linear(x_in, weight_in, bias_in);
  check_linear(class_x_in, weight_in, bias_in, "class_x");
  const int64_t n = x_in.size(0), d = x_in.size(1), m = weight_in.size(0);
  const int64_t k = class_x_in.size(0);
  TORCH_CHECK_VALUE(k >= 1, "class_x must hold one row per class (at least 1), got 0 rows");
  TORCH_CHECK_VALUE(k <= gpu::kSfMaxClasses, "class_x: the CUDA kernel takes up to ",
                    gpu::kSfMaxClasses, " classes, got ", k);
  check_labels(y_in, n, x_in);
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0,
                    "temperature must be finite and > 0, got ", temperature);
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, "eps must be finite and >= 0, got ", eps);
  check_label_range(y_in, k);
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.detach().contiguous(), cx = class_x_in.detach().contiguous();
  const at::Tensor w = weight_in.detach().contiguous(), y = y_in.contiguous();
  const at::ScalarType mt = math_type_of(x.scalar_type());
  const at::Tensor xa = at::cat({x, cx});
  at::Tensor za = at::mm(xa, w.t());
  at::Tensor zc = za.narrow(0, n, k).to(mt);
  at::Tensor inv_c;
  if (normalize) {
    inv_c = cx.to(mt).pow(2).sum({1}, true).sqrt().add(eps).reciprocal();
    zc = zc.mul(inv_c);
  }
  if (bias_in.has_value()) zc = zc.add(bias_in->detach().to(mt));
  const at::Tensor emb = zc.relu().contiguous();
  at::Tensor h = za.narrow(0, 0, n);
  at::Tensor dz = at::empty_like(h);
  at::Tensor dl = at::zeros({n, k}, x.options().dtype(mt));
  at::Tensor rows = at::zeros({n}, x.options().dtype(mt));
  at::Tensor db = at::zeros({bias_in.has_value() ? m : 0}, x.options().dtype(mt));
  at::Tensor b = bias_in.has_value() ? bias_in->detach().contiguous() : at::Tensor();
  C10_CUDA_CHECK(gpu::launch_local_sf_rows(
      float_type(x.scalar_type()), h.data_ptr(), x.const_data_ptr(),
      b.defined() ? b.const_data_ptr() : nullptr, emb.const_data_ptr(),
      y.const_data_ptr<int64_t>(), dz.data_ptr(), dl.data_ptr(), rows.data_ptr(),
      b.defined() ? db.data_ptr() : nullptr, n, m, d, k, eps, 1.0 / temperature, normalize,
      stream()));
  at::Tensor gc = at::mm(dl.t(), h.to(mt)).mul(emb.gt(0).to(mt));  // dE through E's ReLU
  if (bias_in.has_value()) db = db.add(gc.sum(0));
  if (normalize) gc = gc.mul(inv_c);
  const at::Tensor gw = at::mm(at::cat({dz, gc.to(x.scalar_type())}).t(), xa);
  at::Tensor gb = bias_in.has_value() ? db.to(weight_in.scalar_type())
                                      : at::empty({0}, weight_in.options());
  return {h.clone(), emb.to(x.scalar_type()), rows.sum(), gw, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(pypaper, CUDA, m) {
  m.impl("local_ff_sf_linear", &ff_sf_linear_cuda);
  m.impl("local_ff_linear", &ff_linear_cuda);
  m.impl("local_tp_linear", &tp_linear_cuda);
  m.impl("local_head", &local_head_cuda);
}

}  // namespace local
}  // namespace pypaper
