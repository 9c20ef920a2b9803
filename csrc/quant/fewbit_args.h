// Argument checks of the few-bit ops and the exact forward activation, shared by the CPU and CUDA
// implementations (csrc/quant/fewbit_cpu.cpp, fewbit_cuda.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/clamp_min.h>
#include <ATen/ops/elu.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/hardsigmoid.h>
#include <ATen/ops/hardswish.h>
#include <ATen/ops/hardtanh.h>
#include <ATen/ops/leaky_relu.h>
#include <ATen/ops/log_sigmoid.h>
#include <ATen/ops/mish.h>
#include <ATen/ops/sigmoid.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/softplus.h>
#include <ATen/ops/tanh.h>
#include <c10/util/Exception.h>

#include <string>
#include <vector>

#include "../../kernels/common/fewbit_pack.h"

namespace pypaper {
namespace fewbit {

// The activations whose forward the op computes, and how many scalar params each takes.
enum class Act { gelu, gelu_tanh, silu, mish, elu, selu, softplus, sigmoid, tanh, logsigmoid,
                 hardswish, relu, leaky_relu, hardtanh, hardsigmoid };

struct ActSpec {
  const char* name;
  Act act;
  size_t num_params;
};

inline const ActSpec* act_specs(size_t* count) {
  static const ActSpec specs[] = {
      {"gelu", Act::gelu, 0},          {"gelu_tanh", Act::gelu_tanh, 0},
      {"silu", Act::silu, 0},          {"mish", Act::mish, 0},
      {"elu", Act::elu, 1},            {"selu", Act::selu, 0},
      {"softplus", Act::softplus, 2},  {"sigmoid", Act::sigmoid, 0},
      {"tanh", Act::tanh, 0},          {"logsigmoid", Act::logsigmoid, 0},
      {"hardswish", Act::hardswish, 0}, {"relu", Act::relu, 0},
      {"leaky_relu", Act::leaky_relu, 1}, {"hardtanh", Act::hardtanh, 2},
      {"hardsigmoid", Act::hardsigmoid, 0},
  };
  *count = sizeof(specs) / sizeof(specs[0]);
  return specs;
}

inline Act parse_activation(const std::string& name, const std::vector<double>& params) {
  size_t count = 0;
  const ActSpec* specs = act_specs(&count);
  std::string known;
  for (size_t i = 0; i < count; ++i) {
    if (name == specs[i].name) {
      TORCH_CHECK(params.size() == specs[i].num_params, "activation '", name, "' takes ",
                  specs[i].num_params, " params, got ", params.size());
      return specs[i].act;
    }
    known += std::string(i ? ", " : "") + specs[i].name;
  }
  TORCH_CHECK_VALUE(false, "activation must be one of ", known, "; got '", name, "'");
}

// out = f(x) with torch's own kernel, so the forward is bit-exact with torch's activation. The
// calls are those torch's functional API makes (F.selu is elu with SELU's constants, F.relu is
// clamp_min(x, 0), F.relu6 hardtanh(x, 0, 6)).
inline void activation_out(at::Tensor& out, const at::Tensor& x, Act act,
                           const std::vector<double>& p) {
  constexpr double kSeluAlpha = 1.6732632423543772848170429916717;
  constexpr double kSeluScale = 1.0507009873554804934193349852946;
  switch (act) {
    case Act::gelu: at::gelu_out(out, x, "none"); break;
    case Act::gelu_tanh: at::gelu_out(out, x, "tanh"); break;
    case Act::silu: at::silu_out(out, x); break;
    case Act::mish: at::mish_out(out, x); break;
    case Act::elu: at::elu_out(out, x, p[0]); break;
    case Act::selu: at::elu_out(out, x, kSeluAlpha, kSeluScale); break;
    case Act::softplus: at::softplus_out(out, x, p[0], p[1]); break;
    case Act::sigmoid: at::sigmoid_out(out, x); break;
    case Act::tanh: at::tanh_out(out, x); break;
    case Act::logsigmoid: at::log_sigmoid_out(out, x); break;
    case Act::hardswish: at::hardswish_out(out, x); break;
    case Act::relu: at::clamp_min_out(out, x, 0); break;
    case Act::leaky_relu: at::leaky_relu_out(out, x, p[0]); break;
    case Act::hardtanh: at::hardtanh_out(out, x, p[0], p[1]); break;
    case Act::hardsigmoid: at::hardsigmoid_out(out, x); break;
  }
}

inline at::ScalarType math_type_of(at::ScalarType st) {
  return st == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_bits(int64_t bits) {
  TORCH_CHECK_VALUE(bits >= 1 && bits <= kMaxBits, "bits must be 1, 2, 3 or 4, got ", bits);
}

inline void check_float(const at::Tensor& t, const char* name) {
  const auto st = t.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
                   name, " must be float32, float64, float16 or bfloat16, got ", st);
}

inline void check_levels(const at::Tensor& levels, const at::Tensor& like, int64_t bits) {
  TORCH_CHECK_VALUE(levels.dim() == 1 && levels.numel() == (int64_t{1} << bits),
                    "levels must be a 1-D tensor of 2^bits = ", int64_t{1} << bits,
                    " values, got shape ", levels.sizes());
  TORCH_CHECK_TYPE(levels.scalar_type() == math_type_of(like.scalar_type()), "levels must be ",
                   math_type_of(like.scalar_type()), " for ", like.scalar_type(), " input, got ",
                   levels.scalar_type());
  TORCH_CHECK(levels.device() == like.device(), "levels must be on ", like.device(), ", got ",
              levels.device());
}

inline void check_forward(const at::Tensor& x, const at::Tensor& borders, const at::Tensor& levels,
                          int64_t bits, bool fold) {
  check_float(x, "x");
  check_bits(bits);
  TORCH_CHECK_VALUE(borders.dim() == 1 && borders.numel() >= 1 && borders.numel() <= kMaxBorders,
                    "borders must be a 1-D tensor of 1..", kMaxBorders, " values, got shape ",
                    borders.sizes());
  TORCH_CHECK_TYPE(borders.scalar_type() == math_type_of(x.scalar_type()), "borders must be ",
                   math_type_of(x.scalar_type()), " for ", x.scalar_type(), " input, got ",
                   borders.scalar_type());
  TORCH_CHECK(borders.device() == x.device(), "borders must be on ", x.device(), ", got ",
              borders.device());
  if (fold) {
    TORCH_CHECK_VALUE(borders.numel() == 2 || borders.numel() == kMaxFoldBorders,
                      "fold=True needs 2 or 3 borders (an open interval, then +inf), got ",
                      borders.numel());
  } else {
    TORCH_CHECK_VALUE(borders.numel() + 1 <= (int64_t{1} << bits), borders.numel() + 1,
                      " pieces do not fit in ", bits, " bits");
  }
  check_levels(levels, x, bits);
}

inline void check_backward(const at::Tensor& grad, const at::Tensor& codes,
                           const at::Tensor& levels, int64_t bits) {
  check_float(grad, "grad");
  check_bits(bits);
  TORCH_CHECK_TYPE(codes.scalar_type() == at::kByte, "codes must be uint8, got ",
                   codes.scalar_type());
  TORCH_CHECK_VALUE(codes.dim() == 1 && codes.numel() == packed_bytes(grad.numel(), bits),
                    "codes must be a 1-D tensor of ceil(bits * grad.numel() / 8) = ",
                    packed_bytes(grad.numel(), bits), " bytes, got shape ", codes.sizes());
  TORCH_CHECK(codes.device() == grad.device(), "codes must be on ", grad.device(), ", got ",
              codes.device());
  check_levels(levels, grad, bits);
}

}  // namespace fewbit
}  // namespace pypaper
