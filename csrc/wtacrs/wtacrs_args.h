// Argument checks of the WTA-CRS ops (schemas in csrc/schemas.cpp), shared by the CPU and CUDA
// implementations (wtacrs_cpu.cpp, wtacrs_cuda.cpp) and the device-generic composites
// (wtacrs_composite.cpp). Messages name the argument and what was expected.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

namespace pypaper {
namespace wtacrs {

inline bool is_float(at::ScalarType st) {
  return st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16;
}

// fp64 for fp64 storage, fp32 for every other float type.
inline at::ScalarType math_type_of(at::ScalarType st) {
  return st == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(is_float(t.scalar_type()), name,
                   " must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
}

inline void check_rows(const at::Tensor& x, const char* name) {
  check_float(x, name);
  TORCH_CHECK_VALUE(x.dim() == 2, name, " must be a 2-D [rows, features] tensor, got shape ",
                    x.sizes());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.device() == like.device(), name, " must be on ", like.device(), ", got ",
              t.device());
}

inline void check_seed(const at::Tensor& seed, const at::Tensor& like) {
  TORCH_CHECK_TYPE(seed.scalar_type() == at::kLong, "seed must be an int64 tensor, got ",
                   seed.scalar_type());
  TORCH_CHECK_VALUE(seed.numel() == 1, "seed must hold one value, got ", seed.numel());
  check_same_device(seed, like, "seed");
}

// 1 <= k <= n (k == 0 only for n == 0).
inline void check_k(int64_t k, int64_t n) {
  TORCH_CHECK_VALUE(k >= 0 && k <= n && (k >= 1 || n == 0), "k must be in [1, N] = [1, ", n,
                    "] (N: rows to sample from), got ", k);
}

inline void check_scores(const at::Tensor& scores) {
  TORCH_CHECK_TYPE(scores.scalar_type() == at::kFloat || scores.scalar_type() == at::kDouble,
                   "scores must be float32 or float64, got ", scores.scalar_type());
  TORCH_CHECK_VALUE(scores.dim() == 1, "scores must be 1-D (one score per row), got shape ",
                    scores.sizes());
}

inline void check_indices(const at::Tensor& indices, const at::Tensor& like) {
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kLong, "indices must be int64, got ",
                   indices.scalar_type());
  TORCH_CHECK_VALUE(indices.dim() == 1, "indices must be 1-D, got shape ", indices.sizes());
  check_same_device(indices, like, "indices");
}

// The dtype of the kept rows: x's math type or a 16-bit type (fp64 x keeps fp64).
inline at::ScalarType kept_dtype(const at::Tensor& x, std::optional<at::ScalarType> dtype) {
  const at::ScalarType out = dtype.value_or(x.scalar_type());
  if (x.scalar_type() == at::kDouble) {
    TORCH_CHECK_TYPE(out == at::kDouble, "dtype must be float64 for float64 x, got ", out);
  } else {
    TORCH_CHECK_TYPE(out == at::kFloat || out == at::kBFloat16 || out == at::kHalf,
                     "dtype must be float32, bfloat16 or float16 for ", x.scalar_type(),
                     " x, got ", out);
  }
  return out;
}

inline void check_gather(const at::Tensor& x, const at::Tensor& indices,
                         const std::optional<at::Tensor>& scales) {
  check_rows(x, "x");
  check_indices(indices, x);
  if (scales.has_value()) {
    const at::Tensor& s = *scales;
    TORCH_CHECK_TYPE(s.scalar_type() == math_type_of(x.scalar_type()), "scales must be ",
                     math_type_of(x.scalar_type()), " for ", x.scalar_type(), " x, got ",
                     s.scalar_type());
    TORCH_CHECK_VALUE(s.dim() == 1 && s.numel() == indices.numel(),
                      "scales must be 1-D with one value per index (", indices.numel(),
                      "), got shape ", s.sizes());
    check_same_device(s, x, "scales");
  }
}

inline void check_grad_norm(const std::optional<at::Tensor>& g, const at::Tensor& x) {
  if (!g.has_value()) return;
  TORCH_CHECK_TYPE(is_float(g->scalar_type()), "grad_norm must be a float tensor, got ",
                   g->scalar_type());
  TORCH_CHECK_VALUE(g->dim() == 1 && g->numel() == x.size(0),
                    "grad_norm must be 1-D with one value per row of x (", x.size(0),
                    "), got shape ", g->sizes());
  check_same_device(*g, x, "grad_norm");
}

// x_kept [k, d_in] and indices [k] of a linear layer whose input rows have d_in features.
inline void check_kept(const at::Tensor& x_kept, const at::Tensor& indices, int64_t d_in,
                       const at::Tensor& like) {
  check_rows(x_kept, "x_kept");
  check_indices(indices, like);
  check_same_device(x_kept, like, "x_kept");
  TORCH_CHECK_VALUE(x_kept.size(1) == d_in, "x_kept must have ", d_in,
                    " features (in_features of the weight), got shape ", x_kept.sizes());
  TORCH_CHECK_VALUE(indices.numel() == x_kept.size(0), "indices must hold one index per row of "
                    "x_kept (", x_kept.size(0), "), got ", indices.numel());
}

inline void check_weight(const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         const at::Tensor& like) {
  check_rows(weight, "weight");
  check_same_device(weight, like, "weight");
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->numel() == weight.size(0),
                      "bias must be 1-D with out_features = ", weight.size(0),
                      " values, got shape ", bias->sizes());
    check_same_device(*bias, like, "bias");
  }
}

}  // namespace wtacrs
}  // namespace pypaper
