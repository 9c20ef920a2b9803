// CPU implementations of the fused LIF ops: argument checks, allocation and at::parallel_for over
// neuron chunks around the torch-free loops of kernels/cpu/snn_cpu.h.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

// The loops themselves are compiled in csrc/snn/lif_loops/ (declared extern here).
#include "../../kernels/cpu/snn_cpu_instances.h"
#include "../block_cache.h"
#include "snn_args.h"

namespace pypaper {
namespace snn {
namespace {

// Calls f with the torch-free storage type of x's dtype.
template <typename F>
void dispatch_storage(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kFloat: f(float{}); break;
    case at::kDouble: f(double{}); break;
    case at::kBFloat16: f(cpu::bf16{}); break;
    case at::kHalf: f(cpu::fp16{}); break;
    default: TORCH_CHECK(false, "x must be float32, float64, float16 or bfloat16, got ", st);
  }
}

template <typename In>
const In* cptr(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<const In*>(t.data_ptr()) : nullptr;
}

template <typename In>
In* mptr(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<In*>(t.data_ptr()) : nullptr;
}

// Chunks per task: at least ~64K neuron-steps each, so small calls stay on one thread.
int64_t chunk_grain(int64_t steps) {
  return std::max<int64_t>(1, (int64_t{1} << 16) / (std::max<int64_t>(steps, 1) * cpu::kLifChunk));
}

// Whether every value is a power of two whose reciprocal is a normal number: then d / tau equals
// d * (1 / tau) bit for bit (both round the same real number d 2^-e once, subnormal results
// included), and the multiply is several times cheaper than the divide in the forward loop
// (tau = 2 is the default). The reciprocal must be normal because of denormals-are-zero
// (torch.set_flush_denormal(True)): a subnormal k = 2^-127 (tau = 2^127 in fp32, 2^1023 in fp64)
// is then read as 0, so d * k = 0 where d / tau is a normal number (d = 2^10: 2^-117).
// v = 2^(e-1) (frexp's 0.5 * 2^e), 1/v = 2^(1-e), normal iff 1 - e >= min_exponent - 1.
template <typename T>
bool all_powers_of_two(const T* v, int64_t n) {
  constexpr int kMaxExp = 2 - std::numeric_limits<T>::min_exponent;  // fp32: 127, so v <= 2^126
  for (int64_t i = 0; i < n; ++i) {
    int e = 0;
    if (!(std::frexp(v[i], &e) == T(0.5)) || e > kMaxExp) return false;
  }
  return n > 0;
}

// The decay the forward loop charges with: tau itself ("/ tau", div), or k = 1 / tau ("* k") when
// the decay is k already or every tau is a power of two. `keep` holds the reciprocals, computed
// here rather than by an ATen op: one ATen call costs ~50 us when the caches hold another layer's
// data, which is where a training step finds them (a tenth of this op's fixed cost there).
template <typename T>
std::pair<const T*, bool> charge_decay(const NeuronParam& decay, bool decay_is_tau,
                                       std::vector<T>& keep) {
  const T* dp = decay.values.template data_ptr<T>();
  const int64_t n = decay.values.numel();
  if (decay_is_tau && all_powers_of_two(dp, n)) {
    keep.resize(n);
    for (int64_t i = 0; i < n; ++i) keep[i] = T(1) / dp[i];  // exact
    return {keep.data(), false};
  }
  return {dp, decay_is_tau};
}

// Zeros of the given shape and options: an empty tensor and a memset (all-zero bytes are +0 in
// every float type), for the same reason: no TensorIterator fill for these few values.
at::Tensor zeros_shaped(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor z = at::empty(sizes, options);
  if (z.nbytes() > 0) std::memset(z.data_ptr(), 0, z.nbytes());
  return z;
}

at::Tensor contiguous_or_undefined(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
}

// The checked, prepared inputs of a forward pass (lif_forward, lif_forward_jvp).
struct ForwardInputs {
  at::Tensor x, v_init;
  NeuronParam decay, vth;
  int64_t steps, neurons;
};

ForwardInputs forward_inputs(const at::Tensor& x_in, const c10::optional<at::Tensor>& v_init_in,
                             const at::Tensor& decay_in, const at::Tensor& vth_in,
                             const LifFlags& f, int64_t surrogate, double alpha,
                             const c10::optional<double>& v_reset) {
  check_x(x_in);
  check_state(v_init_in, x_in, "v_init");
  check_scalars(surrogate, alpha, v_reset);
  const at::Tensor x = x_in.contiguous();
  return ForwardInputs{x, contiguous_or_undefined(v_init_in),
                       prepare_param(decay_in, x, f.decay_is_tau ? "tau" : "k"),
                       prepare_param(vth_in, x, "v_threshold"), x.size(0), neurons_of(x)};
}

// The parameters as a forward loop reads them, range-checked: the threshold, the decay argument
// (tau or k) and the decay it charges with (charge_decay).
template <typename T>
struct ChargeParams {
  const T* decay;
  const T* vth;
  const T* charge;
  bool div;
  std::vector<T> keep;  // charge's storage where it holds reciprocals
};

template <typename T>
ChargeParams<T> charge_params(const ForwardInputs& in, const LifFlags& f,
                              const c10::optional<double>& v_reset) {
  ChargeParams<T> c;
  c.decay = in.decay.values.template data_ptr<T>();
  c.vth = in.vth.values.template data_ptr<T>();
  check_param_values(c.decay, in.decay.values.numel(), f.decay_is_tau, f.decay_input, c.vth,
                     in.vth.values.numel(), v_reset);
  std::tie(c.charge, c.div) = charge_decay<T>(in.decay, f.decay_is_tau, c.keep);
  return c;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lif_forward_cpu(
    const at::Tensor& x_in, const c10::optional<at::Tensor>& v_init_in,
    const at::Tensor& decay_in, const at::Tensor& vth_in, c10::optional<double> v_reset,
    int64_t surrogate, double alpha, int64_t flags) {
  const LifFlags f = lif_flags(flags, kLifForwardFlags, "lif_forward");
  const ForwardInputs in = forward_inputs(x_in, v_init_in, decay_in, vth_in, f, surrogate, alpha,
                                          v_reset);
  const at::Tensor& x = in.x;
  const int64_t steps = in.steps, neurons = in.neurons;
  // The outputs come from the block cache (csrc/block_cache.h; it hands requests under 1 MiB to
  // torch's allocator): a training loop asks for the same sizes every step, and fresh pages cost
  // more than this kernel's own pass over them. That holds for the [N] state too: glibc maps and
  // zeroes a 1 MiB v_last again on about half the calls (~256 page faults each).
  at::Tensor spikes = empty_cached(x.sizes(), x.options());
  at::Tensor h_seq = f.keep_h ? empty_cached(x.sizes(), x.options()) : at::empty({0}, x.options());
  at::Tensor v_last = empty_cached(state_shape(x), x.options());
  at::Tensor v_seq =
      f.store_v_seq ? empty_cached(x.sizes(), x.options()) : at::empty({0}, x.options());
  dispatch_storage(x.scalar_type(), [&](auto tag) {
    using In = decltype(tag);
    using T = typename cpu::acc_type<In>::type;
    const ChargeParams<T> p = charge_params<T>(in, f, v_reset);
    cpu::LifForwardArgs<In, T> a{};
    a.x = cptr<In>(x);
    a.v_init = cptr<In>(in.v_init);
    a.decay = p.charge;
    a.decay_period = in.decay.period;
    a.vth = p.vth;
    a.vth_period = in.vth.period;
    a.spikes = mptr<In>(spikes);
    a.h_seq = f.keep_h ? mptr<In>(h_seq) : nullptr;
    a.v_seq = f.store_v_seq ? mptr<In>(v_seq) : nullptr;
    a.v_last = mptr<In>(v_last);
    a.steps = steps;
    a.neurons = neurons;
    a.v_reset = static_cast<T>(v_reset.value_or(0.0));
    a.decay_input = f.decay_input;
    a.div = p.div;
    a.hard = v_reset.has_value();
    a.stream = x.numel() * x.element_size() >= cpu::kStreamBytes;  // per [T, N] output
    a.prefetch_nta = cpu::lif_prefetch_nta_default();
    at::parallel_for(0, cpu::lif_num_chunks(neurons), chunk_grain(steps),
                     [&](int64_t c0, int64_t c1) { cpu::lif_forward(a, c0, c1); });
  });
  return {spikes, v_last, h_seq, v_seq};
}

// A parameter's gradient from per-neuron sums (summed over the batch here) or per-chunk partials
// (added in chunk order), in the parameter's own shape and dtype.
at::Tensor finish_param_grad(const at::Tensor& param, const NeuronParam& p, const at::Tensor& per_n,
                             const std::vector<double>& partial) {
  // A per-neuron parameter over zero features (period 0) has an empty gradient.
  if (param.numel() == 0) return zeros_shaped(param.sizes(), param.options());
  at::Tensor g;
  if (p.period > 1) {
    const int64_t n = per_n.numel();
    g = n == 0 ? zeros_shaped({p.period}, per_n.options())
               : at::sum(per_n.view({n / p.period, p.period}), {0});
  } else {
    double acc = 0.0;
    for (double v : partial) acc += v;
    g = at::empty({}, p.values.options());
    if (g.scalar_type() == at::kDouble) {
      *g.data_ptr<double>() = acc;
    } else {
      *g.data_ptr<float>() = static_cast<float>(acc);
    }
  }
  return fresh_copy(g, param.sizes(), param.scalar_type());  // not a view of g
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lif_backward_cpu(
    const at::Tensor& grad_spikes_in, const c10::optional<at::Tensor>& grad_v_last_in,
    const c10::optional<at::Tensor>& grad_v_seq_in, const at::Tensor& h_in,
    const c10::optional<at::Tensor>& v_init_in, const at::Tensor& decay_in,
    const at::Tensor& vth_in, c10::optional<double> v_reset, int64_t surrogate, double alpha,
    int64_t flags) {
  const LifFlags f = lif_flags(flags, kLifBackwardFlags, "lif_backward");
  // recompute: h_in is the forward's input x (it kept no H); the loops rerun the forward per chunk.
  check_x(h_in, f.recompute ? "x" : "h_seq");
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
  const at::Tensor h = h_in.contiguous();
  const at::Tensor gs = grad_spikes_in.contiguous();
  const at::Tensor gvl = contiguous_or_undefined(grad_v_last_in);
  const at::Tensor gvs = contiguous_or_undefined(grad_v_seq_in);
  const at::Tensor v_init = contiguous_or_undefined(v_init_in);
  const NeuronParam decay = prepare_param(decay_in, h, f.decay_is_tau ? "tau" : "k");
  const NeuronParam vth = prepare_param(vth_in, h, "v_threshold");
  const int64_t steps = h.size(0), neurons = neurons_of(h);
  const int64_t chunks = cpu::lif_num_chunks(neurons);
  at::Tensor gx = empty_cached(h.sizes(), h.options());
  at::Tensor gv_init = empty_cached(state_shape(h), h.options());
  const auto mopts = decay.values.options();
  at::Tensor gk_n, gth_n;
  std::vector<double> gk_c, gth_c;
  if (f.need_decay_grad) {
    if (decay.period > 1) gk_n = empty_cached({neurons}, mopts);
    else gk_c.assign(chunks, 0.0);
  }
  if (f.need_threshold_grad) {
    if (vth.period > 1) gth_n = empty_cached({neurons}, mopts);
    else gth_c.assign(chunks, 0.0);
  }
  dispatch_storage(h.scalar_type(), [&](auto tag) {
    using In = decltype(tag);
    using T = typename cpu::acc_type<In>::type;
    const T* dp = decay.values.template data_ptr<T>();
    const T* tp = vth.values.template data_ptr<T>();
    check_param_values(dp, decay.values.numel(), f.decay_is_tau, f.decay_input, tp,
                       vth.values.numel(), v_reset);
    cpu::LifBackwardArgs<In, T> a{};
    a.grad_spikes = cptr<In>(gs);
    a.grad_v_last = cptr<In>(gvl);
    a.grad_v_seq = cptr<In>(gvs);
    std::vector<T> k_values;
    if (f.recompute) {  // the rerun charges as the forward did (see lif_forward_cpu)
      a.x_seq = cptr<In>(h);
      std::tie(a.charge_decay, a.charge_div) = charge_decay<T>(decay, f.decay_is_tau, k_values);
    } else {
      a.h_seq = cptr<In>(h);
    }
    a.v_init = cptr<In>(v_init);
    a.decay = dp;
    a.decay_period = decay.period;
    a.vth = tp;
    a.vth_period = vth.period;
    a.grad_x = mptr<In>(gx);
    a.grad_v_init = mptr<In>(gv_init);
    a.grad_decay_n = mptr<T>(gk_n);
    a.grad_decay_chunk = f.need_decay_grad && decay.period == 1 ? gk_c.data() : nullptr;
    a.grad_vth_n = mptr<T>(gth_n);
    a.grad_vth_chunk = f.need_threshold_grad && vth.period == 1 ? gth_c.data() : nullptr;
    a.steps = steps;
    a.neurons = neurons;
    a.v_reset = static_cast<T>(v_reset.value_or(0.0));
    a.alpha = static_cast<T>(alpha);
    a.surrogate = static_cast<int32_t>(surrogate);
    a.decay_input = f.decay_input;
    a.div = f.decay_is_tau;
    a.hard = v_reset.has_value();
    a.detach_reset = f.detach_reset;
    a.sltt = f.sltt;
    a.stream = h.numel() * h.element_size() >= cpu::kStreamBytes;
    a.prefetch_nta = cpu::lif_prefetch_nta_default();
    at::parallel_for(0, chunks, chunk_grain(steps),
                     [&](int64_t c0, int64_t c1) { cpu::lif_backward(a, c0, c1); });
  });
  at::Tensor g_decay = f.need_decay_grad ? finish_param_grad(decay_in, decay, gk_n, gk_c)
                                         : zeros_shaped(decay_in.sizes(), decay_in.options());
  at::Tensor g_vth = f.need_threshold_grad ? finish_param_grad(vth_in, vth, gth_n, gth_c)
                                           : zeros_shaped(vth_in.sizes(), vth_in.options());
  return {gx, gv_init, g_decay, g_vth};
}

// A tangent of a parameter, as the parameter is prepared (math type, contiguous); undefined when
// there is none.
at::Tensor prepare_tangent(const c10::optional<at::Tensor>& t, const at::Tensor& param,
                           const at::Tensor& x, const char* name) {
  if (!t.has_value()) return at::Tensor();
  TORCH_CHECK(t->sizes() == param.sizes(), name, " has shape ", t->sizes(), ", expected ",
              param.sizes());
  return prepare_param(*t, x, name).values;
}

// Forward-mode derivative (kernels/cpu/snn_jvp_cpu.h): the tangents of (spikes, v_last, v_seq)
// given tangents of x, v_init, the decay and the threshold (any may be None: zero).
std::tuple<at::Tensor, at::Tensor, at::Tensor> lif_forward_jvp_cpu(
    const at::Tensor& x_in, const c10::optional<at::Tensor>& x_tangent_in,
    const c10::optional<at::Tensor>& v_init_in, const c10::optional<at::Tensor>& v_tangent_in,
    const at::Tensor& decay_in, const c10::optional<at::Tensor>& decay_tangent_in,
    const at::Tensor& vth_in, const c10::optional<at::Tensor>& vth_tangent_in,
    c10::optional<double> v_reset, int64_t surrogate, double alpha, int64_t flags) {
  const LifFlags f = lif_flags(flags, kLifForwardFlags & ~kKeepH, "lif_forward_jvp");
  const ForwardInputs in = forward_inputs(x_in, v_init_in, decay_in, vth_in, f, surrogate, alpha,
                                          v_reset);
  if (x_tangent_in.has_value()) {
    TORCH_CHECK(x_tangent_in->sizes() == x_in.sizes(), "x_tangent has shape ",
                x_tangent_in->sizes(), ", expected x's ", x_in.sizes());
    TORCH_CHECK(x_tangent_in->scalar_type() == x_in.scalar_type() &&
                    x_tangent_in->device() == x_in.device(),
                "x_tangent must have x's dtype and device");
  }
  check_state(v_tangent_in, x_in, "v_init_tangent");
  const at::Tensor& x = in.x;
  const at::Tensor dx = contiguous_or_undefined(x_tangent_in);
  const at::Tensor ddecay = prepare_tangent(decay_tangent_in, decay_in, x, "decay_tangent");
  const at::Tensor dvth = prepare_tangent(vth_tangent_in, vth_in, x, "v_threshold_tangent");
  const at::Tensor dv_init = contiguous_or_undefined(v_tangent_in);
  const int64_t steps = in.steps, neurons = in.neurons;
  at::Tensor ds = empty_cached(x.sizes(), x.options());  // as the forward's outputs
  at::Tensor dv_last = empty_cached(state_shape(x), x.options());
  at::Tensor dv_seq =
      f.store_v_seq ? empty_cached(x.sizes(), x.options()) : at::empty({0}, x.options());
  dispatch_storage(x.scalar_type(), [&](auto tag) {
    using In = decltype(tag);
    using T = typename cpu::acc_type<In>::type;
    const ChargeParams<T> p = charge_params<T>(in, f, v_reset);
    cpu::LifJvpArgs<In, T> a{};
    a.x = cptr<In>(x);
    a.x_tangent = cptr<In>(dx);
    a.v_init = cptr<In>(in.v_init);
    a.v_init_tangent = cptr<In>(dv_init);
    a.decay = p.charge;
    a.div = p.div;
    a.decay_tangent = ddecay.defined() ? ddecay.template data_ptr<T>() : nullptr;
    a.decay_is_tau = f.decay_is_tau;
    a.tau_or_k = p.decay;
    a.decay_period = in.decay.period;
    a.vth = p.vth;
    a.vth_tangent = dvth.defined() ? dvth.template data_ptr<T>() : nullptr;
    a.vth_period = in.vth.period;
    a.spikes_tangent = mptr<In>(ds);
    a.v_seq_tangent = f.store_v_seq ? mptr<In>(dv_seq) : nullptr;
    a.v_last_tangent = mptr<In>(dv_last);
    a.steps = steps;
    a.neurons = neurons;
    a.v_reset = static_cast<T>(v_reset.value_or(0.0));
    a.alpha = static_cast<T>(alpha);
    a.surrogate = static_cast<int32_t>(surrogate);
    a.decay_input = f.decay_input;
    a.hard = v_reset.has_value();
    a.detach_reset = f.detach_reset;
    a.sltt = f.sltt;
    a.stream = x.numel() * x.element_size() >= cpu::kStreamBytes;
    a.prefetch_nta = cpu::lif_prefetch_nta_default();
    at::parallel_for(0, cpu::lif_num_chunks(neurons), chunk_grain(steps),
                     [&](int64_t c0, int64_t c1) { cpu::lif_jvp(a, c0, c1); });
  });
  return {ds, dv_last, dv_seq};
}

}  // namespace

TORCH_LIBRARY_IMPL(pypaper, CPU, m) {
  m.impl("lif_forward", &lif_forward_cpu);
  m.impl("lif_backward", &lif_backward_cpu);
  m.impl("lif_forward_jvp", &lif_forward_jvp_cpu);
}

}  // namespace snn
}  // namespace pypaper
