// Argument checks and preparation shared by the CPU and CUDA implementations of the quant ops.
// The Python wrappers check first with friendlier errors; these checks keep a direct
// torch.ops.pypaper.* call from crashing or answering wrong.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <tuple>
#include <vector>

#include "../../kernels/common/quant_layout.h"
#include "../fresh_output.h"

namespace pypaper {
namespace quant {

// Codes are stored as int8 (a signed range) or uint8 (an unsigned one): the range must fit.
inline void check_range(int64_t qmin, int64_t qmax) {
  TORCH_CHECK(qmin < qmax, "quant_min (", qmin, ") must be below quant_max (", qmax, ")");
  TORCH_CHECK((qmin >= -128 && qmax <= 127) || (qmin >= 0 && qmax <= 255),
              "quant_min/quant_max must fit int8 ([-128, 127]) or uint8 ([0, 255]), got [", qmin,
              ", ", qmax, "]");
}

// The [outer, channels, inner] view of x (kernels/common/quant_layout.h). Normalizes axis.
inline QuantLayout layout_for(const at::Tensor& x, c10::optional<int64_t>& axis,
                              c10::optional<int64_t> group_size) {
  TORCH_CHECK(!(axis.has_value() && group_size.has_value()),
              "axis and group_size are exclusive: pass one of them");
  const int64_t numel = x.numel();
  if (group_size.has_value()) {
    const int64_t g = *group_size;
    TORCH_CHECK(g > 0, "group_size must be positive, got ", g);
    const int64_t last = x.dim() ? x.size(-1) : 1;
    TORCH_CHECK(last % g == 0, "group_size ", g, " does not divide the last dimension (", last,
                ") of x");
    return QuantLayout{1, numel / g, g};
  }
  if (axis.has_value()) {
    const int64_t nd = x.dim();
    TORCH_CHECK(nd > 0 && *axis >= -nd && *axis < nd, "axis ", *axis,
                " is out of range for a tensor of ", nd, " dims");
    const int64_t a = *axis < 0 ? *axis + nd : *axis;
    axis = a;
    int64_t outer = 1, inner = 1;
    for (int64_t d = 0; d < a; ++d) outer *= x.size(d);
    for (int64_t d = a + 1; d < nd; ++d) inner *= x.size(d);
    return QuantLayout{outer, x.size(a), inner};
  }
  return QuantLayout{1, 1, numel};
}

inline void check_float_x(const at::Tensor& x, const char* name) {
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              name, " must be float32, float64, float16 or bfloat16, got ", st);
}

// Scale and zero point as contiguous tensors of the math type (fp32, or fp64 for fp64 x), one
// value per channel, on x's device.
struct QuantParams {
  at::Tensor scale;
  at::Tensor zero_point;
};

inline QuantParams prepare_params(const at::Tensor& x, const at::Tensor& scale,
                                  const at::Tensor& zero_point, const QuantLayout& L,
                                  at::ScalarType math_type) {
  TORCH_CHECK(scale.device() == x.device(), "scale is on ", scale.device(), " but x is on ",
              x.device());
  TORCH_CHECK(zero_point.device() == x.device(), "zero_point is on ", zero_point.device(),
              " but x is on ", x.device());
  TORCH_CHECK(at::isFloatingType(scale.scalar_type()), "scale must be a floating tensor, got ",
              scale.scalar_type());
  TORCH_CHECK(scale.numel() == L.channels, "scale has ", scale.numel(), " elements, expected ",
              L.channels);
  TORCH_CHECK(zero_point.numel() == L.channels, "zero_point has ", zero_point.numel(),
              " elements, expected ", L.channels);
  return QuantParams{scale.to(math_type).contiguous(), zero_point.to(math_type).contiguous()};
}

// The checks every op that reads x starts with.
inline void check_common(const at::Tensor& x, int64_t qmin, int64_t qmax) {
  check_float_x(x, "x");
  check_range(qmin, qmax);
}

inline at::ScalarType math_type_of(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline int64_t seed_or_zero_cpu(const c10::optional<at::Tensor>& seed) {
  if (!seed.has_value()) return 0;
  TORCH_CHECK(seed->scalar_type() == at::kLong && seed->numel() == 1,
              "seed must be an int64 tensor of one element");
  return *seed->data_ptr<int64_t>();
}

// Packed codes are 4-bit nibbles: two's complement [-8, 7] or unsigned [0, 15].
inline void check_pack(bool pack, int64_t qmin, int64_t qmax) {
  TORCH_CHECK(!pack || (qmin >= -8 && qmax <= 7) || (qmin >= 0 && qmax <= 15),
              "pack=True needs a 4-bit code range inside [-8, 7] or [0, 15], got [", qmin, ", ",
              qmax, "]");
}

// dequantize's argument checks; returns the shape of its output (codes contiguous or not).
inline std::vector<int64_t> dequantize_shape(const at::Tensor& data, int64_t qmin, int64_t qmax,
                                             bool packed, int64_t last_dim,
                                             at::ScalarType dtype) {
  check_range(qmin, qmax);
  check_pack(packed, qmin, qmax);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              "dtype must be float32, float64, float16 or bfloat16, got ", dtype);
  const auto want = packed ? at::kByte : (qmin < 0 ? at::kChar : at::kByte);
  TORCH_CHECK(data.scalar_type() == want, "data must be ", want, " for this code range, got ",
              data.scalar_type());
  std::vector<int64_t> shape(data.sizes().begin(), data.sizes().end());
  if (packed) {
    TORCH_CHECK(data.dim() >= 1 && data.size(-1) == (last_dim + 1) / 2, "packed data's last dim ",
                data.dim() ? data.size(-1) : 0, " does not hold last_dim=", last_dim, " codes");
    shape.back() = last_dim;
  }
  return shape;
}

// The backward's outputs from the fp64 per-channel sums gs, gz: times grad_factor, cast to the
// parameters' dtypes (a float zero point keeps its own), zeros where no gradient was asked for.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> finish_backward(
    const at::Tensor& dx, const at::Tensor& x_in, at::Tensor gs, at::Tensor gz,
    double grad_factor, const at::Tensor& scale, const at::Tensor& zero_point,
    bool need_scale_grad, bool need_zero_point_grad) {
  gs.mul_(grad_factor);
  gz.mul_(grad_factor);
  const auto zp_type = at::isFloatingType(zero_point.scalar_type()) ? zero_point.scalar_type()
                                                                     : scale.scalar_type();
  TORCH_INTERNAL_ASSERT(dx.sizes() == x_in.sizes());  // allocated in x's shape: not a view
  return {dx,
          need_scale_grad ? fresh_copy(gs, scale.sizes(), scale.scalar_type())
                          : at::zeros(scale.sizes(), scale.options()),
          need_zero_point_grad ? fresh_copy(gz, zero_point.sizes(), zp_type)
                               : at::zeros(zero_point.sizes(), scale.options().dtype(zp_type))};
}

}  // namespace quant
}  // namespace pypaper
