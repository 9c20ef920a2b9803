// CUDA implementations of the fused LIF ops (schemas in csrc/schemas.cpp): the checks, outputs and
// parameter-gradient reductions of snn_cpu.cpp around the launchers of kernels/cuda/snn_kernels.cu,
// on the current stream of x's device. Nothing here synchronizes with the device: the parameter
// values (tau > 1 or 0 < k <= 1, thresholds above v_reset) would need a device-to-host copy to
// check, so that check is the Python wrapper's (pypaper/snn/ops.py); out-of-range values give the
// formula's result, never a crash.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "../../kernels/cuda/snn_kernels.cuh"
#include "snn_args.h"

namespace pypaper {
namespace snn {
namespace {

// check_x has accepted the dtype already.
gpu::FloatType float_type(at::ScalarType st) {
  switch (st) {
    case at::kFloat: return gpu::FloatType::kFloat32;
    case at::kDouble: return gpu::FloatType::kFloat64;
    case at::kHalf: return gpu::FloatType::kFloat16;
    case at::kBFloat16: return gpu::FloatType::kBFloat16;
    default: break;
  }
  TORCH_INTERNAL_ASSERT(false, "unexpected dtype ", st);
}

at::Tensor contiguous_or_undefined(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
}

const void* cptr(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }

void* mptr(const at::Tensor& t) { return t.defined() ? t.mutable_data_ptr() : nullptr; }

void check_cuda(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.is_cuda(), name, " must be a CUDA tensor for the CUDA kernel, got ", x.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lif_forward_cuda(
    const at::Tensor& x_in, const c10::optional<at::Tensor>& v_init_in,
    const at::Tensor& decay_in, const at::Tensor& vth_in, c10::optional<double> v_reset,
    int64_t surrogate, double alpha, int64_t flags) {
  const LifFlags f = lif_flags(flags, kLifForwardFlags, "lif_forward");
  check_x(x_in);
  check_cuda(x_in, "x");
  check_state(v_init_in, x_in, "v_init");
  check_scalars(surrogate, alpha, v_reset);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const NeuronParam decay = prepare_param(decay_in, x, f.decay_is_tau ? "tau" : "k");
  const NeuronParam vth = prepare_param(vth_in, x, "v_threshold");
  const at::Tensor v_init = contiguous_or_undefined(v_init_in);
  const int64_t steps = x.size(0), neurons = neurons_of(x);
  at::Tensor spikes = at::empty(x.sizes(), x.options());
  at::Tensor h_seq = f.keep_h ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  at::Tensor v_last = at::empty(state_shape(x), x.options());
  at::Tensor v_seq =
      f.store_v_seq ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  gpu::LifForwardParams p{};
  p.x = cptr(x);
  p.v_init = cptr(v_init);
  p.decay = cptr(decay.values);
  p.decay_period = decay.period;
  p.vth = cptr(vth.values);
  p.vth_period = vth.period;
  p.spikes = mptr(spikes);
  p.h_seq = f.keep_h ? mptr(h_seq) : nullptr;
  p.v_seq = f.store_v_seq ? mptr(v_seq) : nullptr;
  p.v_last = mptr(v_last);
  p.steps = steps;
  p.neurons = neurons;
  p.v_reset = v_reset.value_or(0.0);
  p.decay_input = f.decay_input;
  p.div = f.decay_is_tau;
  p.hard = v_reset.has_value();
  C10_CUDA_CHECK(gpu::launch_lif_forward(float_type(x.scalar_type()), p,
                                         c10::cuda::getCurrentCUDAStream().stream()));
  return {spikes, v_last, h_seq, v_seq};
}

// A parameter's gradient in its own shape and dtype, from the kernel's per-neuron sums (summed
// over the batch here: [B, F] -> [F]) or its per-block fp64 partials (added here in fp64, then
// rounded to the math type as the CPU op does).
at::Tensor finish_param_grad(const at::Tensor& param, const NeuronParam& p, int64_t neurons,
                             const at::Tensor& per_n, const at::Tensor& partial) {
  if (neurons == 0) return at::zeros(param.sizes(), param.options());
  at::Tensor g = p.period > 1 ? at::sum(per_n.view({neurons / p.period, p.period}), {0})
                              : at::sum(partial).to(p.values.scalar_type());
  return fresh_copy(g, param.sizes(), param.scalar_type());  // not a view of g
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lif_backward_cuda(
    const at::Tensor& grad_spikes_in, const c10::optional<at::Tensor>& grad_v_last_in,
    const c10::optional<at::Tensor>& grad_v_seq_in, const at::Tensor& h_in,
    const c10::optional<at::Tensor>& v_init_in, const at::Tensor& decay_in,
    const at::Tensor& vth_in, c10::optional<double> v_reset, int64_t surrogate, double alpha,
    int64_t flags) {
  const LifFlags f = lif_flags(flags, kLifBackwardFlags, "lif_backward");
  TORCH_CHECK(!f.recompute, "lif_backward with the recompute flag (rerunning the forward from x "
              "instead of reading a kept H) has no CUDA kernel: run lif_forward with the keep_h "
              "flag on CUDA");
  check_x(h_in, "h_seq");
  check_cuda(h_in, "h_seq");
  check_state(v_init_in, h_in, "v_init");
  check_scalars(surrogate, alpha, v_reset);
  TORCH_CHECK(grad_spikes_in.sizes() == h_in.sizes() &&
                  grad_spikes_in.scalar_type() == h_in.scalar_type() &&
                  grad_spikes_in.device() == h_in.device(),
              "grad_spikes must match h_seq in shape, dtype and device");
  check_state(grad_v_last_in, h_in, "grad_v_last");
  if (grad_v_seq_in.has_value()) {
    TORCH_CHECK(grad_v_seq_in->sizes() == h_in.sizes() &&
                    grad_v_seq_in->scalar_type() == h_in.scalar_type() &&
                    grad_v_seq_in->device() == h_in.device(),
                "grad_v_seq must match h_seq in shape, dtype and device");
  }
  const c10::cuda::CUDAGuard guard(h_in.device());
  const at::Tensor h = h_in.contiguous();
  const at::Tensor gs = grad_spikes_in.contiguous();
  const at::Tensor gvl = contiguous_or_undefined(grad_v_last_in);
  const at::Tensor gvs = contiguous_or_undefined(grad_v_seq_in);
  const at::Tensor v_init = contiguous_or_undefined(v_init_in);
  const NeuronParam decay = prepare_param(decay_in, h, f.decay_is_tau ? "tau" : "k");
  const NeuronParam vth = prepare_param(vth_in, h, "v_threshold");
  const int64_t steps = h.size(0), neurons = neurons_of(h);
  int64_t partials = 0;
  C10_CUDA_CHECK(gpu::lif_backward_partials(neurons, &partials));
  at::Tensor gx = at::empty(h.sizes(), h.options());
  at::Tensor gv_init = at::empty(state_shape(h), h.options());
  const auto mopts = decay.values.options();
  const auto dopts = h.options().dtype(at::kDouble);
  at::Tensor gk_n, gk_p, gth_n, gth_p;
  if (f.need_decay_grad) {
    if (decay.period > 1) gk_n = at::empty({neurons}, mopts);
    else gk_p = at::empty({partials}, dopts);
  }
  if (f.need_threshold_grad) {
    if (vth.period > 1) gth_n = at::empty({neurons}, mopts);
    else gth_p = at::empty({partials}, dopts);
  }
  gpu::LifBackwardParams p{};
  p.grad_spikes = cptr(gs);
  p.grad_v_last = cptr(gvl);
  p.grad_v_seq = cptr(gvs);
  p.h_seq = cptr(h);
  p.v_init = cptr(v_init);
  p.decay = cptr(decay.values);
  p.decay_period = decay.period;
  p.vth = cptr(vth.values);
  p.vth_period = vth.period;
  p.grad_x = mptr(gx);
  p.grad_v_init = mptr(gv_init);
  p.grad_decay_n = mptr(gk_n);
  p.grad_decay_partial = gk_p.defined() ? gk_p.mutable_data_ptr<double>() : nullptr;
  p.grad_vth_n = mptr(gth_n);
  p.grad_vth_partial = gth_p.defined() ? gth_p.mutable_data_ptr<double>() : nullptr;
  p.steps = steps;
  p.neurons = neurons;
  p.v_reset = v_reset.value_or(0.0);
  p.alpha = alpha;
  p.surrogate = static_cast<int32_t>(surrogate);
  p.decay_input = f.decay_input;
  p.div = f.decay_is_tau;
  p.hard = v_reset.has_value();
  p.detach_reset = f.detach_reset;
  p.sltt = f.sltt;
  C10_CUDA_CHECK(gpu::launch_lif_backward(float_type(h.scalar_type()), p,
                                          c10::cuda::getCurrentCUDAStream().stream()));
  at::Tensor g_decay = f.need_decay_grad
                           ? finish_param_grad(decay_in, decay, neurons, gk_n, gk_p)
                           : at::zeros(decay_in.sizes(), decay_in.options());
  at::Tensor g_vth = f.need_threshold_grad
                         ? finish_param_grad(vth_in, vth, neurons, gth_n, gth_p)
                         : at::zeros(vth_in.sizes(), vth_in.options());
  return {gx, gv_init, g_decay, g_vth};
}

}  // namespace

TORCH_LIBRARY_IMPL(pypaper, CUDA, m) {
  m.impl("lif_forward", &lif_forward_cuda);
  m.impl("lif_backward", &lif_backward_cuda);
}

}  // namespace snn
}  // namespace pypaper
