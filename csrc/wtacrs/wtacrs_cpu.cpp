// CPU implementations of the WTA-CRS kernels (schemas in csrc/schemas.cpp): row norms, the
// winner-take-all selection with its with-replacement draws, and gather-and-scale. The loops are
// kernels/cpu/wtacrs_cpu.h; the math kernels/common/wtacrs_math.h.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "../../kernels/cpu/wtacrs_cpu.h"
#include "wtacrs_args.h"

namespace pypaper {
namespace wtacrs {
namespace {

using pypaper::cpu::bf16;
using pypaper::cpu::fp16;

template <typename F>
void dispatch_storage(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kFloat: f(float{}); break;
    case at::kDouble: f(double{}); break;
    case at::kBFloat16: f(bf16{}); break;
    case at::kHalf: f(fp16{}); break;
    default: TORCH_CHECK_TYPE(false, "expected a float tensor, got ", st);
  }
}

// Rows of at least ~32 KiB per task.
int64_t row_grain(int64_t d) { return std::max<int64_t>(1, (int64_t{1} << 13) / std::max<int64_t>(1, d)); }

// x with unit stride along the features (rows may be strided, e.g. a slice).
at::Tensor rows_view(const at::Tensor& x) {
  return (x.size(1) <= 1 || x.stride(1) == 1) ? x : x.contiguous();
}

at::Tensor row_norms_cpu(const at::Tensor& x_in) {
  check_rows(x_in, "x");
  const at::Tensor x = rows_view(x_in);
  const int64_t n = x.size(0), d = x.size(1);
  at::Tensor out = at::empty({n}, x.options().dtype(math_type_of(x.scalar_type())));
  if (n == 0) return out;
  const int64_t ld = x.stride(0);
  dispatch_storage(x.scalar_type(), [&](auto tag) {
    using In = decltype(tag);
    using T = typename pypaper::cpu::acc_type<In>::type;
    const In* xp = reinterpret_cast<const In*>(x.const_data_ptr());
    T* op = out.mutable_data_ptr<T>();
    at::parallel_for(0, n, row_grain(d), [&](int64_t r0, int64_t r1) {
      cpu::row_norms<In>(xp, ld, d, r0, r1, op);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> select_cpu(const at::Tensor& scores_in, int64_t k, bool wta,
                                              const at::Tensor& seed) {
  check_scores(scores_in);
  check_seed(seed, scores_in);
  const int64_t n = scores_in.numel();
  check_k(k, n);
  const at::Tensor scores = scores_in.contiguous();
  at::Tensor idx = at::empty({k}, scores.options().dtype(at::kLong));
  at::Tensor scales = at::empty({k}, scores.options());
  if (k == 0) return {idx, scales};
  int64_t* ip = idx.mutable_data_ptr<int64_t>();
  const rng::Key key = rng::make_key(seed.item<int64_t>());
  dispatch_storage(scores.scalar_type(), [&](auto tag) {
    using S = decltype(tag);
    if constexpr (std::is_same_v<S, float> || std::is_same_v<S, double>) {
      S* sp = scales.mutable_data_ptr<S>();
      if (k >= n) {  // every row, weight 1: the exact gradient
        for (int64_t t = 0; t < n; ++t) {
          ip[t] = t;
          sp[t] = S(1);
        }
        return;
      }
      std::vector<double> w(n), cdf(n);
      std::vector<int64_t> order(wta ? n : 0);
      const double total = cpu::weights(scores.const_data_ptr<S>(), n, w.data());
      const int64_t c = cpu::winners(w.data(), n, k, wta, total, order.data(), ip);
      for (int64_t j = 0; j < c; ++j) sp[j] = S(1);
      const double residual = cpu::residual_cdf(w.data(), n, ip, c, cdf.data());
      // A draw is a binary search (~log2 N steps): threads only pay off for very many draws.
      at::parallel_for(c, k, int64_t{1} << 16, [&](int64_t j0, int64_t j1) {
        cpu::draw_range<S>(cdf.data(), w.data(), n, c, k, residual, key, j0, j1, ip, sp);
      });
    }
  });
  return {idx, scales};
}

at::Tensor gather_scale_cpu(const at::Tensor& x_in, const at::Tensor& indices_in,
                            const std::optional<at::Tensor>& scales_in,
                            std::optional<at::ScalarType> dtype) {
  check_gather(x_in, indices_in, scales_in);
  const at::ScalarType out_type = kept_dtype(x_in, dtype);
  const at::Tensor x = rows_view(x_in);
  const at::Tensor indices = indices_in.contiguous();
  const int64_t n = x.size(0), d = x.size(1), k = indices.numel();
  const int64_t* ip = indices.const_data_ptr<int64_t>();
  for (int64_t j = 0; j < k; ++j) {
    TORCH_CHECK_INDEX(ip[j] >= 0 && ip[j] < n, "indices must be in [0, ", n,
                      ") (rows of x), got ", ip[j], " at position ", j);
  }
  at::Tensor out = at::empty({k, d}, x.options().dtype(out_type));
  if (k == 0 || d == 0) return out;
  at::Tensor scales;
  if (scales_in.has_value()) scales = scales_in->contiguous();
  const int64_t ld = x.stride(0);
  dispatch_storage(x.scalar_type(), [&](auto in_tag) {
    using In = decltype(in_tag);
    using T = typename pypaper::cpu::acc_type<In>::type;
    const In* xp = reinterpret_cast<const In*>(x.const_data_ptr());
    const T* sp = scales.defined() ? scales.const_data_ptr<T>() : nullptr;
    dispatch_storage(out_type, [&](auto out_tag) {
      using Out = decltype(out_tag);
      // kept_dtype admits Out == T (fp32 or fp64) and 16-bit Out for fp32 math only.
      if constexpr (std::is_same_v<Out, T> ||
                    (std::is_same_v<T, float> && !std::is_same_v<Out, double>)) {
        Out* op = reinterpret_cast<Out*>(out.mutable_data_ptr());
        at::parallel_for(0, k, row_grain(d), [&](int64_t j0, int64_t j1) {
          cpu::gather_rows<In, Out>(xp, ld, d, ip, sp, op, j0, j1);
        });
      }
    });
  });
  return out;
}

// grad_W = sum_j grad_y[indices[j]] x_kept[j]^T: the rows of grad_y the estimator needs are
// gathered (one pass over k rows), then torch's GEMM does [d_out, k] x [k, d_in].
at::Tensor sampled_grad_weight_cpu(const at::Tensor& grad_y, const at::Tensor& indices,
                                   const at::Tensor& x_kept) {
  check_rows(grad_y, "grad_y");
  check_kept(x_kept, indices, x_kept.size(1), grad_y);
  const at::Tensor g = gather_scale_cpu(grad_y, indices, std::nullopt,
                                        grad_y.scalar_type() == at::kDouble
                                            ? at::kDouble
                                            : grad_y.scalar_type());
  const at::Tensor xk = x_kept.scalar_type() == g.scalar_type() ? x_kept
                                                                 : x_kept.to(g.scalar_type());
  return at::mm(g.t(), xk);
}

}  // namespace

TORCH_LIBRARY_IMPL(pypaper, CPU, m) {
  m.impl("wtacrs_row_norms", &row_norms_cpu);
  m.impl("wtacrs_select", &select_cpu);
  m.impl("wtacrs_gather_scale", &gather_scale_cpu);
  m.impl("wtacrs_sampled_grad_weight", &sampled_grad_weight_cpu);
}

}  // namespace wtacrs
}  // namespace pypaper
