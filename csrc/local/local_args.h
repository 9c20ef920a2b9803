// Argument checks of the pypaper.local ops, shared by the CPU and CUDA implementations. The Python
// wrappers (pypaper/local/ops.py) check first with friendlier errors; these keep a direct
// torch.ops.pypaper.* call from crashing or answering wrong. Every message names the argument.
#pragma once
#include <ATen/core/Tensor.h>

#include <cmath>
#include <cstdint>
#include <optional>

namespace pypaper {
namespace local {

inline bool is_float_type(at::ScalarType st) {
  return st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16;
}

// fp32 math for fp32/bf16/fp16 storage, fp64 for fp64.
inline at::ScalarType math_type_of(at::ScalarType st) {
  return st == at::kDouble ? at::kDouble : at::kFloat;
}

// x [N, in] and weight [out, in] of the same float dtype and device; bias [out] or None.
inline void check_linear(const at::Tensor& x, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias, const char* xname = "x") {
  TORCH_CHECK(is_float_type(x.scalar_type()), xname,
              " must be a float32, float64, float16 or bfloat16 tensor, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2, xname, " must have shape [N, in_features], got ", x.sizes());
  TORCH_CHECK(weight.dim() == 2, "weight must have shape [out_features, in_features], got ",
              weight.sizes());
  TORCH_CHECK(weight.size(1) == x.size(1), "weight has ", weight.size(1), " input features but ",
              xname, " has ", x.size(1));
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "weight dtype ", weight.scalar_type(),
              " must match ", xname, " dtype ", x.scalar_type());
  TORCH_CHECK(weight.device() == x.device(), "weight is on ", weight.device(), " but ", xname,
              " is on ", x.device());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0),
                "bias must have shape [out_features] = [", weight.size(0), "], got ",
                bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "bias dtype ", bias->scalar_type(),
                " must match ", xname, " dtype ", x.scalar_type());
    TORCH_CHECK(bias->device() == x.device(), "bias is on ", bias->device(), " but ", xname,
                " is on ", x.device());
  }
}

// y: int64 labels [n] on x's device; the range is checked where the values are read.
inline void check_labels(const at::Tensor& y, int64_t n, const at::Tensor& x) {
  TORCH_CHECK(y.scalar_type() == at::kLong, "y must be an int64 tensor of class labels, got ",
              y.scalar_type());
  TORCH_CHECK(y.dim() == 1 && y.size(0) == n, "y must have shape [N] = [", n, "], got ",
              y.sizes());
  TORCH_CHECK(y.device() == x.device(), "y is on ", y.device(), " but the input is on ",
              x.device());
}

inline void check_label_values(const int64_t* y, int64_t n, int64_t num_classes) {
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_INDEX(y[i] >= 0 && y[i] < num_classes, "y must hold class labels in [0, ",
                      num_classes, "), got ", y[i], " at position ", i);
  }
}

inline void check_finite(double v, const char* name) {
  TORCH_CHECK_VALUE(std::isfinite(v), name, " must be finite, got ", v);
}

}  // namespace local
}  // namespace pypaper
