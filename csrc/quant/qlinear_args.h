// Argument checks of the quantized linear ops (issue #7, linear kernels), shared by the CPU and
// CUDA implementations. The Python wrappers (pypaper/quant/qlinear_ops.py) check first with
// friendlier errors; these keep a direct torch.ops.pypaper.* call from crashing.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cstdint>

#include "../../kernels/common/qlinear_math.h"

namespace pypaper {
namespace qlinear {

inline void check_x(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, "x must be float32, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2, "x must be 2-D [M, K], got ", x.dim(), " dims");
}

inline void check_same_device(const at::Tensor& x, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device() == x.device(), name, " is on ", t.device(), " but x is on ", x.device());
}

inline void check_bias(const at::Tensor& x, const c10::optional<at::Tensor>& bias, int64_t N) {
  if (!bias.has_value()) return;
  check_same_device(x, *bias, "bias");
  TORCH_CHECK(bias->scalar_type() == at::kFloat, "bias must be float32, got ",
              bias->scalar_type());
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "bias must have shape [", N, "], got ",
              bias->sizes());
}

// The int8 dynamic linear: w_packed [ceil(N/16), ceil(K/4), 16, 4] int8, w_scale [N] float32,
// w_colsum [N] int32. Returns N.
inline int64_t check_int8_dynamic(const at::Tensor& x, const at::Tensor& w_packed,
                                  const at::Tensor& w_scale, const at::Tensor& w_colsum,
                                  int64_t act_qmax) {
  check_x(x);
  check_same_device(x, w_packed, "w_packed");
  check_same_device(x, w_scale, "w_scale");
  check_same_device(x, w_colsum, "w_colsum");
  TORCH_CHECK(act_qmax == 127 || act_qmax == 63,
              "act_qmax must be 127 (8-bit activations) or 63 (7-bit), got ", act_qmax);
  TORCH_CHECK(w_packed.scalar_type() == at::kChar && w_packed.dim() == 4 &&
                  w_packed.size(2) == kPanel && w_packed.size(3) == kKStep,
              "w_packed must be int8 [ceil(N/16), ceil(K/4), 16, 4], got ", w_packed.scalar_type(),
              " ", w_packed.sizes());
  TORCH_CHECK(w_packed.is_contiguous(), "w_packed must be contiguous");
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.dim() == 1,
              "w_scale must be a 1-D float32 tensor [N]");
  const int64_t N = w_scale.size(0);
  const int64_t K = x.size(1);
  TORCH_CHECK(w_packed.size(0) == round_up(N, kPanel) / kPanel &&
                  w_packed.size(1) == round_up(K, kKStep) / kKStep,
              "w_packed ", w_packed.sizes(), " does not hold N=", N, " (w_scale) x K=", K,
              " (x's last dim) weights");
  TORCH_CHECK(w_colsum.scalar_type() == at::kInt && w_colsum.dim() == 1 && w_colsum.size(0) == N,
              "w_colsum must be int32 [", N, "]");
  // int32 accumulators: |acc| <= K * 255 * 127 must stay below 2^31.
  TORCH_CHECK(K <= 65536, "in_features (x's last dim) must be at most 65536 for int32 "
              "accumulation, got ", K);
  return N;
}

// Weight-only: codes [N, K] int8 (int8) or [N, K/2] uint8 (int4), scale [N, groups] float32.
inline int64_t check_weight_only(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                                 bool int4) {
  check_x(x);
  check_same_device(x, w, "w");
  check_same_device(x, scale, "scale");
  const int64_t K = x.size(1);
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "w must be a contiguous 2-D tensor");
  TORCH_CHECK(w.scalar_type() == (int4 ? at::kByte : at::kChar), "w must be ",
              int4 ? "uint8 (two 4-bit codes per byte)" : "int8", ", got ", w.scalar_type());
  TORCH_CHECK(w.size(1) == (int4 ? K / 2 : K) && (!int4 || K % 2 == 0), "w has ", w.size(1),
              " columns, expected ", int4 ? K / 2 : K, " for in_features=", K);
  const int64_t N = w.size(0);
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.dim() == 2 && scale.size(0) == N &&
                  scale.size(1) >= 1,
              "scale must be float32 [", N, ", groups], got ", scale.scalar_type(), " ",
              scale.sizes());
  const int64_t groups = scale.size(1);
  TORCH_CHECK(K % groups == 0, "scale's ", groups, " groups do not divide in_features=", K);
  if (int4) {
    TORCH_CHECK((K / groups) % kInt4Block == 0 || K == 0,
                "int4 group size (in_features / groups = ", K / groups,
                ") must be a multiple of 32");
  }
  return N;
}

}  // namespace qlinear
}  // namespace pypaper
