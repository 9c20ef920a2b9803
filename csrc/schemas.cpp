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
  // ---- quant.fewbit: few-bit backward activations, kernels/common/fewbit_pack.h ----------------
  // y = activation(x) exactly (torch's own kernel), codes = the b-bit piece index of every element
  // of x under `borders` (math dtype; its parity when `fold`), packed in ceil(b*n/8) uint8 bytes.
  // `levels` (2^b values) is not read by the forward: autograd saves it for the backward.
  // params: the activation's scalars (elu alpha, softplus beta/threshold, leaky_relu slope, ...).
  m.def(
      "fewbit_forward(Tensor x, str activation, float[] params, Tensor borders, Tensor levels, "
      "int bits, bool fold) -> (Tensor, Tensor)");
  // grad_x = levels[code] * grad, in grad's dtype (math in levels' dtype).
  m.def("fewbit_backward(Tensor grad, Tensor codes, Tensor levels, int bits) -> Tensor");
  // ---- snn: fused multi-step LIF neuron, kernels/common/snn_math.h ------------------------------
  // x: [T, N, *]; v_init: the membrane before step 0, shape x.shape[1:] (None: at rest, v_reset or
  // 0 for a soft reset). decay: tau when decay_is_tau ("/ tau", SpikingJelly's LIFNode), else
  // k = 1/tau ("* k", PLIF's sigmoid(w)); decay and v_threshold hold one value or one per neuron
  // (shape x.shape[2:], broadcast over the batch). v_reset None = soft reset. surrogate: the id of
  // kernels/common/snn_math.h (0 Sigmoid, 1 ATan, 2 PiecewiseQuadratic, 3 PiecewiseExp,
  // 4 SoftSign, 5 SuperSpike, 6 Erf, 7 Rect) with its alpha. sltt: the backward drops the
  // temporal gradient path (Meng et al., ICCV 2023).
  // Returns (spikes, v_last, h_seq, v_seq): h_seq is the pre-fire membrane H[t], the one value per
  // neuron-step the backward keeps; v_seq is V[t] after reset when store_v_seq, else shape [0].
  m.def(
      "lif_forward(Tensor x, Tensor? v_init, Tensor decay, Tensor v_threshold, float? v_reset, "
      "int surrogate, float alpha, bool decay_input, bool decay_is_tau, bool detach_reset, "
      "bool sltt, bool store_v_seq) -> (Tensor, Tensor, Tensor, Tensor)");
  // The reverse scan: (grad_x, grad_v_init, grad_decay, grad_v_threshold); the parameter
  // gradients are summed over time and batch inside the kernel (zeros when not asked for).
  m.def(
      "lif_backward(Tensor grad_spikes, Tensor? grad_v_last, Tensor? grad_v_seq, Tensor h_seq, "
      "Tensor? v_init, Tensor decay, Tensor v_threshold, float? v_reset, int surrogate, "
      "float alpha, bool decay_input, bool decay_is_tau, bool detach_reset, bool sltt, "
      "bool need_decay_grad, bool need_threshold_grad) -> (Tensor, Tensor, Tensor, Tensor)");
  // ---- snn.delays: learnable synaptic delays (Hammouamri et al., ICLR 2024), kernels/common/delay_math.h
  // x: [T, N, C_in] (time-major); weight, position: [C_out, C_in]; bias: [C_out] or None.
  // y[t, n, o] = b[o] + sum_i w[o, i] sum_d g_{o,i}(d) x[t - d, n, i], x[t < 0] = 0, d < max_delay:
  // g is the Gaussian of width sigma around clamp(position, 0, max_delay - 1), truncated to the
  // 2*ceil(3 sigma) taps of its window and renormalised; sigma == 0: one tap at round(position).
  m.def(
      "delay_linear(Tensor x, Tensor weight, Tensor position, Tensor? bias, int max_delay, "
      "float sigma) -> Tensor");
  // (grad_x, grad_weight, grad_position, grad_bias); each is zeros when its need_* flag is off.
  m.def(
      "delay_linear_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor position, "
      "int max_delay, float sigma, bool need_x_grad, bool need_weight_grad, "
      "bool need_position_grad, bool need_bias_grad) -> (Tensor, Tensor, Tensor, Tensor)");
  // ---- wtacrs: winner-take-all column-row sampling, kernels/common/wtacrs_math.h ---------------
  // Liu et al., NeurIPS 2023: grad_W = dY^T X estimated from k kept rows of X. x: [N, d] rows.
  // norms[t] = ||x[t]||_2 in x's math type (fp32; fp64 for fp64).
  m.def("wtacrs_row_norms(Tensor x) -> Tensor");
  // (indices [k] int64, scales [k] in scores' dtype): the winner-take-all set (largest weights,
  // scale 1; none when wta=False: plain CRS) then k - |C| draws with replacement from the rest
  // (counter RNG keyed by seed, an int64 tensor of one element on scores' device), scale
  // R / ((k - |C|) w_i). weights w = scores + 1e-3 * mean(scores). k >= N keeps every row.
  m.def("wtacrs_select(Tensor scores, int k, bool wta, Tensor seed) -> (Tensor, Tensor)");
  // out[j] = scales[j] * x[indices[j]] (a plain gather without scales), stored in dtype
  // (default x's; fp32, bf16 or fp16 for non-fp64 x).
  m.def(
      "wtacrs_gather_scale(Tensor x, Tensor indices, Tensor? scales=None, "
      "ScalarType? dtype=None) -> Tensor");
  // (x_kept [k, d], indices [k]): row norms, scores = norms * grad_norm, select, gather-scale.
  m.def(
      "wtacrs_sample(Tensor x, Tensor? grad_norm, int k, bool wta, Tensor seed, "
      "ScalarType? dtype=None) -> (Tensor, Tensor)");
  // grad_W [d_out, d_in] = sum_j grad_y[indices[j]] x_kept[j]^T (grad_y rows read by index).
  m.def("wtacrs_sampled_grad_weight(Tensor grad_y, Tensor indices, Tensor x_kept) -> Tensor");
  // y = x W^T + b exactly; autograd keeps x_kept and indices instead of x.
  m.def(
      "wtacrs_linear(Tensor x, Tensor weight, Tensor? bias, Tensor x_kept, Tensor indices) "
      "-> Tensor");
  // (grad_x = grad_y W, grad_W = the estimator, grad_b = sum of grad_y); [0] when not needed.
  m.def(
      "wtacrs_linear_backward(Tensor grad_y, Tensor weight, Tensor x_kept, Tensor indices, "
      "bool need_input, bool need_weight, bool need_bias) -> (Tensor, Tensor, Tensor)");
  // ---- hopfield (issue #4): schemas go here ----
  // ---- local (issue #6): schemas go here ----
  // ---- quant models (issue #7, linear kernels): schemas go here ----
  // ---- quant models (issue #7, power quantizer): schemas go here ----
}
