// The one TORCH_LIBRARY(pypaper) block: every op's schema, once. Implementations register per
// device with TORCH_LIBRARY_IMPL (csrc/<family>/*_cpu.cpp, *_cuda.cpp); fake kernels and autograd
// are registered from Python (pypaper/<family>/_registration.py).
#include <torch/library.h>

TORCH_LIBRARY(pypaper, m) {
  // ---- quant: uniform affine (fake) quantization, kernels/common/quant_math.h -------------------
  // quant_min/quant_max: the integer code range; axis: per-channel; group_size: groups along the
  // last dim; seed: an int64 tensor of one element on x's device selects stochastic rounding;
  // grad_factor: the LSQ gradient scale g applied to grad_scale / grad_zero_point in backward.
  m.def(
      "fake_quantize(Tensor x, Tensor scale, Tensor zero_point, int quant_min, int quant_max, "
      "int? axis=None, int? group_size=None, Tensor? seed=None, float grad_factor=1.0) -> Tensor");
  m.def(
      "fake_quantize_backward(Tensor grad, Tensor x, Tensor scale, Tensor zero_point, "
      "int quant_min, int quant_max, int? axis, int? group_size, Tensor? seed, float grad_factor, "
      "bool need_scale_grad, bool need_zero_point_grad) -> (Tensor, Tensor, Tensor)");
  // Codes: int8 (signed range) or uint8 (unsigned range); pack=True (bits <= 4) stores two codes
  // per byte along the last dim, shape [..., ceil(last/2)].
  m.def(
      "quantize(Tensor x, Tensor scale, Tensor zero_point, int quant_min, int quant_max, "
      "int? axis=None, int? group_size=None, bool pack=False) -> Tensor");
  m.def(
      "dequantize(Tensor data, Tensor scale, Tensor zero_point, int quant_min, int quant_max, "
      "int? axis, int? group_size, bool packed, int last_dim, ScalarType dtype) -> Tensor");
}
