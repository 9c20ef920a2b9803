// CUDA implementations of the WTA-CRS kernels (schemas in csrc/schemas.cpp): the checks and
// outputs of wtacrs_cpu.cpp around the launchers of kernels/cuda/wtacrs_kernels.cu, on the
// current stream. The selection's sort, prefix sums and argmin are torch's CUDA ops and stay on
// the device (no host synchronisation anywhere): the WTA set size c* is a device scalar that the
// draws kernel reads. The dense GEMMs of the layer are torch's (cuBLAS), in the composites.
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/add.h>
#include <ATen/ops/argmin.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/div.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/gt.h>
#include <ATen/ops/le.h>
#include <ATen/ops/logical_and.h>
#include <ATen/ops/lt.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/rsub.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/sub.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../../kernels/common/wtacrs_math.h"
#include "../../kernels/cuda/wtacrs_kernels.cuh"
#include "wtacrs_args.h"

namespace pypaper {
namespace wtacrs {
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

// 0 < v <= max double: finite positive scores (NaN, negatives and +inf count as 0).
at::Tensor in_range(const at::Tensor& v) {
  return at::logical_and(at::gt(v, 0), at::le(v, 1.79e308));
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

at::Tensor rows_view(const at::Tensor& x) {
  return (x.size(1) <= 1 || x.stride(1) == 1) ? x : x.contiguous();
}

at::Tensor row_norms_cuda(const at::Tensor& x_in) {
  check_rows(x_in, "x");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = rows_view(x_in);
  at::Tensor out = at::empty({x.size(0)}, x.options().dtype(math_type_of(x.scalar_type())));
  C10_CUDA_CHECK(gpu::launch_wtacrs_row_norms(float_type(x.scalar_type()), x.const_data_ptr(),
                                              x.size(0), x.size(1), x.stride(0),
                                              out.mutable_data_ptr(), stream()));
  return out;
}

// The weights, the winner-take-all set and the residual CDF with torch's CUDA ops (the math of
// kernels/common/wtacrs_math.h, element for element), then one kernel writes the k slots.
std::tuple<at::Tensor, at::Tensor> select_cuda(const at::Tensor& scores, int64_t k, bool wta,
                                               const at::Tensor& seed) {
  check_scores(scores);
  check_seed(seed, scores);
  const int64_t n = scores.numel();
  check_k(k, n);
  const c10::cuda::CUDAGuard guard(scores.device());
  if (k >= n) {
    return {at::arange(n, scores.options().dtype(at::kLong)), at::ones({n}, scores.options())};
  }
  const auto f64 = scores.options().dtype(at::kDouble);
  const at::Tensor s = scores.to(at::kDouble);
  const at::Tensor clean = at::where(in_range(s), s, at::zeros_like(s));
  const at::Tensor total_s = at::cumsum(clean, 0).select(0, n - 1);
  const at::Tensor finite = in_range(total_s);
  const at::Tensor w = at::where(finite, at::add(clean, at::mul(total_s, kDefensive / static_cast<double>(n))),
                                 at::ones({n}, f64));
  at::Tensor order, c, masked;
  if (wta) {
    const at::Tensor total = at::cumsum(w, 0).select(0, n - 1);
    order = std::get<1>(at::sort(w, /*stable=*/true, /*dim=*/0, /*descending=*/true))
                .slice(0, 0, k)
                .contiguous();
    const at::Tensor top = w.index_select(0, order);
    const at::Tensor prefix = at::cat({at::zeros({1}, f64), at::cumsum(top.slice(0, 0, k - 1), 0)});
    const at::Tensor cs = at::arange(k, f64);
    c = at::argmin(at::div(at::sub(total, prefix), at::rsub(cs, static_cast<double>(k))))
            .reshape({1});
    const at::Tensor keep = at::where(at::lt(cs, c), at::zeros_like(top), top);
    masked = w.scatter(0, order, keep);
  } else {
    order = at::zeros({1}, scores.options().dtype(at::kLong));
    c = at::zeros({1}, scores.options().dtype(at::kLong));
    masked = w;
  }
  const at::Tensor cdf = at::cumsum(masked, 0);
  at::Tensor idx = at::empty({k}, scores.options().dtype(at::kLong));
  at::Tensor scales = at::empty({k}, scores.options());
  C10_CUDA_CHECK(gpu::launch_wtacrs_draws(
      order.const_data_ptr<int64_t>(), c.const_data_ptr<int64_t>(), cdf.const_data_ptr<double>(),
      w.const_data_ptr<double>(), n, k, seed.const_data_ptr<int64_t>(),
      idx.mutable_data_ptr<int64_t>(), scales.mutable_data_ptr(),
      scores.scalar_type() == at::kDouble, stream()));
  return {idx, scales};
}

at::Tensor gather_scale_cuda(const at::Tensor& x_in, const at::Tensor& indices_in,
                             const std::optional<at::Tensor>& scales_in,
                             std::optional<at::ScalarType> dtype) {
  check_gather(x_in, indices_in, scales_in);
  const at::ScalarType out_type = kept_dtype(x_in, dtype);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = rows_view(x_in);
  const at::Tensor indices = indices_in.contiguous();
  at::Tensor scales;
  if (scales_in.has_value()) scales = scales_in->contiguous();
  const int64_t k = indices.numel(), d = x.size(1);
  at::Tensor out = at::empty({k, d}, x.options().dtype(out_type));
  // Index bounds are not checked on the device (a check would synchronise); the layer's indices
  // come from wtacrs_select, always in range.
  C10_CUDA_CHECK(gpu::launch_wtacrs_gather(
      float_type(x.scalar_type()), float_type(out_type), x.const_data_ptr(), x.stride(0), d,
      indices.const_data_ptr<int64_t>(), scales.defined() ? scales.const_data_ptr() : nullptr,
      out.mutable_data_ptr(), k, stream()));
  return out;
}

at::Tensor sampled_grad_weight_cuda(const at::Tensor& grad_y_in, const at::Tensor& indices_in,
                                    const at::Tensor& x_kept) {
  check_rows(grad_y_in, "grad_y");
  check_kept(x_kept, indices_in, x_kept.size(1), grad_y_in);
  const c10::cuda::CUDAGuard guard(grad_y_in.device());
  const at::Tensor gy = rows_view(grad_y_in);
  const at::Tensor indices = indices_in.contiguous();
  const at::Tensor xk = x_kept.to(gy.scalar_type()).contiguous();
  const int64_t d_out = gy.size(1), d_in = xk.size(1);
  at::Tensor out = at::empty({d_out, d_in}, gy.options());
  C10_CUDA_CHECK(gpu::launch_wtacrs_grad_weight(
      float_type(gy.scalar_type()), gy.const_data_ptr(), gy.stride(0),
      indices.const_data_ptr<int64_t>(), xk.const_data_ptr(), out.mutable_data_ptr(),
      indices.numel(), d_out, d_in, stream()));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pypaper, CUDA, m) {
  m.impl("wtacrs_row_norms", &row_norms_cuda);
  m.impl("wtacrs_select", &select_cuda);
  m.impl("wtacrs_gather_scale", &gather_scale_cuda);
  m.impl("wtacrs_sampled_grad_weight", &sampled_grad_weight_cuda);
}

}  // namespace wtacrs
}  // namespace pypaper
