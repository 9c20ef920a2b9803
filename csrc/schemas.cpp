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
  // temporal gradient path (Meng et al., ICCV 2023). flags: the op's bools as bits
  // (csrc/snn/snn_args.h LifFlag, pypaper/snn/op_flags.py): decay_input, decay_is_tau,
  // detach_reset, sltt, and for the forward store_v_seq, keep_h; one int instead of six
  // arguments, since every schema argument costs time on torch.library's Python autograd path.
  // Returns (spikes, v_last, h_seq, v_seq): h_seq is the pre-fire membrane H[t], the one value per
  // neuron-step the backward keeps; v_seq is V[t] after reset when store_v_seq, else shape [0].
  // without keep_h: h_seq is shape [0] and never written (8 instead of 12 bytes per neuron-step);
  // on the CPU the backward then reruns the forward from x (lif_backward with recompute).
  m.def(
      "lif_forward(Tensor x, Tensor? v_init, Tensor decay, Tensor v_threshold, float? v_reset, "
      "int surrogate, float alpha, int flags) -> (Tensor, Tensor, Tensor, Tensor)");
  // The reverse scan: (grad_x, grad_v_init, grad_decay, grad_v_threshold); the parameter
  // gradients are summed over time and batch inside the kernel (zeros when not asked for).
  // flags: decay_input .. sltt as for the forward, need_decay_grad, need_threshold_grad, and
  // recompute: h_seq holds the forward's x instead of H, and v_init its v_init; each chunk of
  // neurons reruns the forward into a cache-resident buffer first (CPU only): 20 bytes per
  // neuron-step over forward and backward instead of 24, the same results to the bit.
  m.def(
      "lif_backward(Tensor grad_spikes, Tensor? grad_v_last, Tensor? grad_v_seq, Tensor h_seq, "
      "Tensor? v_init, Tensor decay, Tensor v_threshold, float? v_reset, int surrogate, "
      "float alpha, int flags) -> (Tensor, Tensor, Tensor, Tensor)");
  // Forward-mode derivative of lif_forward (pypaper/snn/jvp_rule.py): the tangents of (spikes,
  // v_last, v_seq) given the tangents of x, v_init, decay and v_threshold (None: zero); v_seq's
  // has shape [0] unless flags has store_v_seq. flags: lif_forward's, without keep_h.
  m.def(
      "lif_forward_jvp(Tensor x, Tensor? x_tangent, Tensor? v_init, Tensor? v_init_tangent, "
      "Tensor decay, Tensor? decay_tangent, Tensor v_threshold, Tensor? v_threshold_tangent, "
      "float? v_reset, int surrogate, float alpha, int flags) -> (Tensor, Tensor, Tensor)");
  // ---- snn.delays: learnable synaptic delays (Hammouamri et al., ICLR 2024), kernels/common/delay_math.h
  // x: [T, N, C_in] (time-major); weight, position: [C_out, C_in]; bias: [C_out] or None.
  // y[t, n, o] = b[o] + sum_i w[o, i] sum_d g_{o,i}(d) x[t - d, n, i], x[t < 0] = 0, d < max_delay:
  // g is the Gaussian of width sigma around clamp(position, 0, max_delay - 1), truncated to the
  // 2*ceil(3 sigma) taps of its window and renormalised; sigma == 0: one tap at round(position).
  // sigma is a one-element floating CPU tensor read on the host: a tensor, not a float, so that
  // torch.compile does not specialise a graph on each value of a sigma schedule.
  m.def(
      "delay_linear(Tensor x, Tensor weight, Tensor position, Tensor? bias, int max_delay, "
      "Tensor sigma) -> Tensor");
  // (grad_x, grad_weight, grad_position, grad_bias); each is zeros when its need_* flag is off.
  m.def(
      "delay_linear_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor position, "
      "int max_delay, Tensor sigma, bool need_x_grad, bool need_weight_grad, "
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
  // ---- hopfield: fused multi-step retrieval, kernels/common/hopfield_math.h ----------------------
  // Modern Hopfield retrieval (Ramsauer et al., ICLR 2021), kernels/common/hopfield_math.h.
  // q [B, H, L, d] (state patterns xi_0), k [B, H, S, d] (stored), v [B, H, S, dv] (projections).
  // Per head h: P_n = softmax(beta_h xi_n k^T + attn_mask + pad_mask), xi_{n+1} = P_n k while
  // n < steps_h (steps_h = -1: unbounded) and, from n = 1 on, max over the batch of
  // ||P_n - P_{n-1}||_F > eps_h; out = P_N v at the head's last step N. beta/steps/eps: one value
  // or one per head. Masks are additive floats: attn_mask 4-d broadcastable to [B, H, L, S],
  // pad_mask [B, S]. Online softmax over tiles of S: nothing L x S is kept.
  // Returns (out [B, H, L, dv], states [n, B, H, L, d] = xi_1..xi_n in the math dtype (n = max
  // steps), lse [n + 1, B, H, L] (row log-sum-exp of every P_n), nsteps [H] int64 = N per head).
  m.def(
      "hopfield_retrieve(Tensor q, Tensor k, Tensor v, float[] beta, int[] steps, float[] eps, "
      "Tensor? attn_mask=None, Tensor? pad_mask=None) -> (Tensor, Tensor, Tensor, Tensor)");
  // (grad_q, grad_k, grad_v): the reverse of the chain, recomputing every P_n tile by tile from
  // the saved states and lse (flash-attention-style backward per step).
  m.def(
      "hopfield_retrieve_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor states, Tensor lse, Tensor nsteps, float[] beta, Tensor? attn_mask, "
      "Tensor? pad_mask) -> (Tensor, Tensor, Tensor)");
  // ---- local: fused local-loss layers, kernels/common/local_math.h ------------------------------
  // Fused local-loss layers: each op is the layer forward, its local loss and the local parameter
  // gradient in one call; it returns the output (detached: nothing is kept for a global backward),
  // the loss (math dtype: fp32, fp64 for fp64) and (grad_weight, grad_bias) ([0] without a bias).
  // Forward-Forward (Hinton 2022): x_hat = x / (||x|| + eps) when normalize, h = ReLU(x_hat W^T + b),
  // g = sum_j h_j^2; rows [0, num_pos) positive, the rest negative;
  // loss = mean_pos softplus(threshold - g) + mean_neg softplus(g - threshold).
  m.def(
      "local_ff_linear(Tensor x, Tensor weight, Tensor? bias, int num_pos, float threshold, "
      "bool normalize, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  // Single-forward FF with class embeddings (ForwardGNN's SF): E = ReLU(class_x_hat W^T + b)
  // [num_classes, out], logits = h E^T / temperature, loss = mean CE(logits, y); the gradient
  // flows through h and E. Returns (h, E, loss, grad_weight, grad_bias).
  m.def(
      "local_ff_sf_linear(Tensor x, Tensor class_x, Tensor weight, Tensor? bias, Tensor y, "
      "bool normalize, float eps, float temperature) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Target projection (tpSGD, Lomnitz et al. 2022): h = act(x W^T + b) (activation 0 sigmoid,
  // 1 tanh, 2 relu), t = proj[y] (proj = P^T [num_classes, out]: a row gather; sign: sign(t)),
  // loss = 1/(2N) sum ||h - t||^2, dZ = (h - t) act'(z) / N, grad_weight = dZ^T x.
  m.def(
      "local_tp_linear(Tensor x, Tensor weight, Tensor? bias, Tensor proj, Tensor y, "
      "int activation, bool sign) -> (Tensor, Tensor, Tensor, Tensor)");
  // The same two layers writing into given outputs: h (overwritten) and grad_weight / grad_bias
  // (overwritten, or accumulated into when accumulate: a module's .grad, updated by the dW GEMM
  // itself). Return the loss.
  m.def(
      "local_ff_linear_out(Tensor x, Tensor weight, Tensor? bias, int num_pos, float threshold, "
      "bool normalize, float eps, bool accumulate, Tensor(a!) h, Tensor(b!) grad_weight, "
      "Tensor(c!)? grad_bias) -> Tensor");
  m.def(
      "local_tp_linear_out(Tensor x, Tensor weight, Tensor? bias, Tensor proj, Tensor y, "
      "int activation, bool sign, bool accumulate, Tensor(a!) h, Tensor(b!) grad_weight, "
      "Tensor(c!)? grad_bias) -> Tensor");
  // Single-forward FF into given outputs (h, grad_weight, grad_bias as above); returns (E, loss).
  m.def(
      "local_ff_sf_linear_out(Tensor x, Tensor class_x, Tensor weight, Tensor? bias, Tensor y, "
      "bool normalize, float eps, float temperature, bool accumulate, Tensor(a!) h, "
      "Tensor(b!) grad_weight, Tensor(c!)? grad_bias) -> (Tensor, Tensor)");
  // Local head of a block: pooled = mean over feat's spatial dims ([N, C, *] -> [N, C]),
  // logits = pooled W^T + b, loss = mean CE(logits, y). Returns (loss, logits, grad_pooled
  // [N, C] = dloss/dpooled, grad_weight, grad_bias), all math dtype but the parameter gradients.
  m.def(
      "local_head(Tensor feat, Tensor weight, Tensor? bias, Tensor y) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // ---- quant: int8 / int4 linear layers, kernels/common/qlinear_math.h ---------------------------
  // Quantized linear layers, kernels/common/qlinear_math.h (layouts and formulas there). x: [M, K]
  // float32. int8 dynamic: per-row activation codes qa = clamp(round(x / sa), -A, A) with
  // sa = max|x_m| / A, A = act_qmax (127 or 63); acc = qa @ qw^T in int32 (exact);
  // y = (float(acc) * sa) * w_scale + bias. w_packed: [ceil(N/16), ceil(K/4), 16, 4] int8 panels;
  // w_colsum[n] = sum_k qw[n, k] (int32), used to undo the unsigned activation offset.
  m.def(
      "int8_dynamic_linear(Tensor x, Tensor w_packed, Tensor w_scale, Tensor w_colsum, "
      "Tensor? bias, int act_qmax) -> Tensor");
  // The same GEMM without the epilogue: (acc [M, N] int32, sa [M] float32).
  m.def(
      "int8_dynamic_linear_int32(Tensor x, Tensor w_packed, Tensor w_colsum, int out_features, "
      "int act_qmax) -> (Tensor, Tensor)");
  // Weight-only, float activations, groups of G = K / scale.size(1) along k:
  // int8: y = sum_g scale[n, g] * sum_{k in g} x[m, k] * w[n, k] + bias   (w [N, K] int8)
  // int4: y = sum_g scale[n, g] * sum_{k in g} x[m, k] * (q[n, k] - zero[n, g]) + bias
  //       (w [N, K/2] uint8, two codes per byte in 32-k blocks, kernels/common/qlinear_math.h)
  m.def("int8_weight_only_linear(Tensor x, Tensor w, Tensor scale, Tensor? bias) -> Tensor");
  m.def(
      "int4_weight_only_linear(Tensor x, Tensor w, Tensor scale, Tensor zero, Tensor? bias) "
      "-> Tensor");
  // ---- quant: power-exponent quantization, kernels/common/power_quant_math.h ---------------------
  // Power-exponent quantization (PowerQuant, ICLR 2023; NUPES, Yvinec et al. 2023),
  // kernels/common/power_quant_math.h. x (float32/float64) is seen as [C, numel / C] with
  // C = max_abs.numel() ranges m (per tensor, or one per leading row); exponent a (> 0) holds one
  // value or C. qmax = 2^(bits-1) - 1 in [1, 127].
  // codes = sign(x) * min(round(qmax * (|x| / m)^a), qmax) as int8 (ties round up).
  m.def("power_quantize(Tensor x, Tensor max_abs, Tensor exponent, int qmax) -> Tensor");
  // y = sign(code) * m * (|code| / qmax)^(1/a) in dtype (float32 or float64).
  m.def(
      "power_dequantize(Tensor codes, Tensor max_abs, Tensor exponent, int qmax, "
      "ScalarType dtype) -> Tensor");
  // y = power_dequantize(power_quantize(x)) in x's dtype, one pass. ste selects the backward's
  // exponent / range gradient (below).
  m.def(
      "power_fake_quantize(Tensor x, Tensor max_abs, Tensor exponent, int qmax, bool ste=True) "
      "-> Tensor");
  // (grad_x, grad_max_abs, grad_exponent): grad_x = grad where |x| <= m (straight-through);
  // dy/da, dy/dm summed per range (per exponent), zeros where not needed: ste=True through the
  // rounding as LSQ does for a scale, ste=False with the codes c held fixed
  // (dy/da = -sign(x) l_c log(c/qmax) / a^2, dy/dm = sign(x) (c/qmax)^(1/a)).
  m.def(
      "power_fake_quantize_backward(Tensor grad, Tensor x, Tensor max_abs, Tensor exponent, "
      "int qmax, bool need_max_grad, bool need_exponent_grad, bool ste) "
      "-> (Tensor, Tensor, Tensor)");
}
