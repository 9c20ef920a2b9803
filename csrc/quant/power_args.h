// Argument checks shared by the CPU and CUDA implementations of the power-quantizer ops
// (schemas in csrc/schemas.cpp). The Python wrappers (pypaper/quant/power.py) check first with
// friendlier errors; these keep a direct torch.ops.pypaper.* call from crashing or answering wrong.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>

#include "../../kernels/common/power_quant_math.h"
#include "../fresh_output.h"

namespace pypaper {
namespace power {

inline void check_qmax(int64_t qmax) {
  TORCH_CHECK(qmax >= 1 && qmax <= kMaxQmax, "qmax must be in [1, ", kMaxQmax,
              "] (bits 2..8: qmax = 2^(bits-1) - 1), got ", qmax);
}

inline void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
              " must be float32 or float64, got ", t.scalar_type());
}

// [channels, inner] of a tensor of `numel` elements with C = max_abs.numel() channels along the
// leading elements; the exponent holds one value or one per channel.
struct PowerShape {
  int64_t channels;
  int64_t inner;
  bool per_channel_exponent;
};

inline PowerShape power_shape(int64_t numel, const at::Tensor& ref, const at::Tensor& max_abs,
                              const at::Tensor& exponent) {
  TORCH_CHECK(max_abs.device() == ref.device(), "max_abs is on ", max_abs.device(),
              " but x is on ", ref.device());
  TORCH_CHECK(exponent.device() == ref.device(), "exponent is on ", exponent.device(),
              " but x is on ", ref.device());
  check_float(max_abs, "max_abs");
  check_float(exponent, "exponent");
  const int64_t C = max_abs.numel();
  TORCH_CHECK(C >= 1, "max_abs must hold at least one value");
  TORCH_CHECK(numel % C == 0, "max_abs has ", C, " values, which does not divide x's ", numel,
              " elements (one range per leading channel)");
  TORCH_CHECK(exponent.numel() == 1 || exponent.numel() == C, "exponent must hold 1 or ", C,
              " values, got ", exponent.numel());
  return PowerShape{C, C ? numel / C : 0, exponent.numel() == C && C > 1};
}

}  // namespace power
}  // namespace pypaper
