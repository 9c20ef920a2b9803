// Argument checks and preparation shared by the CPU and CUDA implementations of the snn ops.
// The Python wrappers (pypaper/snn/ops.py) check first with friendlier errors; these checks keep a
// direct torch.ops.pypaper.lif_* call from crashing or answering wrong.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "../../kernels/common/snn_math.h"
#include "../fresh_output.h"

namespace pypaper {
namespace snn {

// The bools of lif_forward / lif_backward travel as one int, `flags` (bit set = true), not as
// nine schema arguments: torch.library's Python autograd path of an op costs ~9 us more per
// schema argument when another layer's data fills the caches, as in a training step (do-nothing
// ops right after a snntorch fwd + bwd: 13 arguments 0.58 ms, 8 arguments 0.54 ms; hot ~54 us for
// 13 against 7). The bits are pypaper/snn/op_flags.py's.
enum LifFlag : int64_t {
  kDecayInput = 1 << 0,        // charge H = V + (X - (V - Vr)) / tau, else V - (V - Vr)/tau + X
  kDecayIsTau = 1 << 1,        // decay holds tau ("/ tau"), else k = 1/tau ("* k")
  kDetachReset = 1 << 2,       // S is detached in the reset term (backward)
  kSltt = 1 << 3,              // SLTT: no temporal gradient path (backward)
  kStoreVSeq = 1 << 4,         // forward: also return V[t] for every t
  kKeepH = 1 << 5,             // forward: return H[t] for the backward
  kNeedDecayGrad = 1 << 6,     // backward: the decay's gradient is wanted
  kNeedThresholdGrad = 1 << 7, // backward: the threshold's gradient is wanted
  kRecompute = 1 << 8,         // backward: h_seq holds x; rerun the forward per chunk (CPU)
};
constexpr int64_t kLifForwardFlags =
    kDecayInput | kDecayIsTau | kDetachReset | kSltt | kStoreVSeq | kKeepH;
constexpr int64_t kLifBackwardFlags = kDecayInput | kDecayIsTau | kDetachReset | kSltt |
                                      kNeedDecayGrad | kNeedThresholdGrad | kRecompute;

// The flags unpacked (the bits an op does not take are false).
struct LifFlags {
  bool decay_input, decay_is_tau, detach_reset, sltt;  // both ops
  bool store_v_seq, keep_h;                            // lif_forward
  bool need_decay_grad, need_threshold_grad, recompute;  // lif_backward
};

// flags of the op `op`, which takes the bits in `allowed`; anything else is a caller's mistake.
inline LifFlags lif_flags(int64_t flags, int64_t allowed, const char* op) {
  TORCH_CHECK(flags >= 0 && (flags & ~allowed) == 0, op, ": flags ", flags,
              " has bits this op does not take (allowed: ", allowed,
              "; pypaper/snn/op_flags.py builds them)");
  const auto has = [flags](int64_t bit) { return (flags & bit) != 0; };
  return LifFlags{has(kDecayInput),    has(kDecayIsTau),     has(kDetachReset),
                  has(kSltt),          has(kStoreVSeq),      has(kKeepH),
                  has(kNeedDecayGrad), has(kNeedThresholdGrad), has(kRecompute)};
}

inline bool is_float_type(at::ScalarType st) {
  return st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16;
}

// x: [T, N, *] of a float type.
inline void check_x(const at::Tensor& x, const char* name = "x") {
  TORCH_CHECK(is_float_type(x.scalar_type()), name,
              " must be a float32, float64, float16 or bfloat16 tensor, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 2, name, " must have shape [T, N, *] (at least 2 dims), got ", x.dim(),
              " dims");
}

// fp32 math for fp32/bf16/fp16, fp64 for fp64.
inline at::ScalarType math_type_of(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Neurons per step (N times the feature count) and features per sample (x.shape[2:]).
inline int64_t neurons_of(const at::Tensor& x) {
  int64_t n = 1;
  for (int64_t d = 1; d < x.dim(); ++d) n *= x.size(d);
  return n;
}

inline int64_t features_of(const at::Tensor& x) {
  int64_t f = 1;
  for (int64_t d = 2; d < x.dim(); ++d) f *= x.size(d);
  return f;
}

// A per-layer (one element) or per-neuron (shape x.shape[2:], broadcast over the batch)
// parameter, as a contiguous tensor of the math type, and its period (1 or the feature count).
struct NeuronParam {
  at::Tensor values;
  int64_t period;
};

inline NeuronParam prepare_param(const at::Tensor& p, const at::Tensor& x, const char* name) {
  TORCH_CHECK(p.device() == x.device(), name, " is on ", p.device(), " but x is on ", x.device());
  TORCH_CHECK(is_float_type(p.scalar_type()), name, " must be a floating tensor, got ",
              p.scalar_type());
  const auto feat = x.sizes().slice(2);
  TORCH_CHECK(p.numel() == 1 || p.sizes() == feat, name, " has shape ", p.sizes(),
              ", expected one element or the feature shape x.shape[2:] = ", feat);
  const at::ScalarType mt = math_type_of(x);  // .to() only where it converts: it dispatches
  return NeuronParam{(p.scalar_type() == mt ? p : p.to(mt)).contiguous(),
                     p.numel() == 1 ? 1 : features_of(x)};
}

// v_init: the membrane before step 0, shape x.shape[1:], x's dtype and device.
inline void check_state(const c10::optional<at::Tensor>& v, const at::Tensor& x,
                        const char* name) {
  if (!v.has_value()) return;
  TORCH_CHECK(v->device() == x.device(), name, " is on ", v->device(), " but x is on ",
              x.device());
  TORCH_CHECK(v->scalar_type() == x.scalar_type(), name, " has dtype ", v->scalar_type(),
              " but x has dtype ", x.scalar_type());
  TORCH_CHECK(v->sizes() == x.sizes().slice(1), name, " has shape ", v->sizes(),
              ", expected x.shape[1:] = ", x.sizes().slice(1));
}

inline void check_scalars(int64_t surrogate, double alpha, const c10::optional<double>& v_reset) {
  TORCH_CHECK(valid_surrogate(surrogate), "surrogate must be an id in [0, ", kNumSurrogates,
              "), got ", surrogate);
  TORCH_CHECK(std::isfinite(alpha) && alpha > 0, "alpha must be positive and finite, got ",
              alpha);
  TORCH_CHECK(!v_reset.has_value() || std::isfinite(*v_reset),
              "v_reset must be finite or None, got ", v_reset.has_value() ? *v_reset : 0.0);
}

// Values of the (prepared, contiguous, host-readable) parameters: tau > 1 (decay_is_tau) or
// 0 < k <= 1 (k = 0 too without decay_input: no leak, H = V + X, the IF neuron), finite
// thresholds. Reads the data: CPU tensors here; a CUDA implementation checks a host copy of these
// small tensors or leaves it to Python. A threshold at or below v_reset is computed as defined (the
// neuron fires at every step): a learnable threshold can get there while it trains, and
// pypaper/snn/ops.py refuses it only where the user passed it.
template <typename T>
inline void check_param_values(const T* decay, int64_t nd, bool decay_is_tau, bool decay_input,
                               const T* vth, int64_t nv, const c10::optional<double>& v_reset) {
  for (int64_t i = 0; i < nd; ++i) {
    const double d = static_cast<double>(decay[i]);
    if (decay_is_tau) {
      TORCH_CHECK(std::isfinite(d) && d > 1.0, "tau must be finite and > 1, got ", d);
    } else {
      TORCH_CHECK(std::isfinite(d) && (d > 0.0 || (d == 0.0 && !decay_input)) && d <= 1.0,
                  "k = 1/tau must be in ", decay_input ? "(0, 1]" : "[0, 1] (0: no leak, IF)",
                  ", got ", d);
    }
  }
  for (int64_t i = 0; i < nv; ++i) {
    const double t = static_cast<double>(vth[i]);
    TORCH_CHECK(std::isfinite(t), "v_threshold must be finite, got ", t);
  }
}

inline std::vector<int64_t> state_shape(const at::Tensor& x) {
  return std::vector<int64_t>(x.sizes().begin() + 1, x.sizes().end());
}

}  // namespace snn
}  // namespace pypaper
