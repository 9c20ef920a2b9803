"""Public fused LIF op: lif_multi_step.

Checks its arguments (errors name the argument), picks a backend (pypaper/_backend.py) and calls
torch.ops.pypaper.lif_forward (C++ on CPU; a CUDA kernel on GPU once one is registered), its Triton
twin (pypaper/snn/triton_kernels.py, when it exists), or the plain-PyTorch reference
(pypaper/snn/reference.py). Fake kernels and autograd live in _registration.py.

Default backends, by device: CPU -> the C++ kernel, then the reference; CUDA -> the CUDA kernel,
then Triton, then the reference (each taken only where it exists: see _REASONS).
"""
from __future__ import annotations

import functools
import importlib.util
import math
from typing import Optional

import torch
from torch import nn

from .. import _autograd, _backend, _layout
from . import _registration, op_flags, reference, tensor_alpha
from .._numbers import is_finite as _is_finite, is_finite_number as _is_finite_number
from .._numbers import is_number as _is_number, shown as _shown
from .surrogate import surrogate_spec

_DEFAULT_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}
_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


_KERNELS = _backend.kernel_table("pypaper::lif_forward")  # probed once (_backend.has_kernel)


def _has_kernel(dispatch_key: str) -> bool:
    return _KERNELS[dispatch_key]


def _cpu_reason(device: torch.device) -> Optional[str]:
    return _backend.native_reason(device, "cpu")


def _cuda_reason(device: torch.device) -> Optional[str]:
    why = _backend.native_reason(device, "cuda")
    if why is None and not _has_kernel("CUDA"):
        why = "pypaper._C has no CUDA kernel for pypaper::lif_forward"
    return why


def _triton_reason(device: torch.device) -> Optional[str]:
    """Why the Triton LIF kernels cannot run on ``device`` (None if they can)."""
    if importlib.util.find_spec("pypaper.snn.triton_kernels") is None:
        return "there is no Triton kernel for the LIF ops (pypaper/snn/triton_kernels.py)"
    ok, why = _registration.load_triton().triton_available(device)
    return None if ok else why


_REASONS = {"cpu": _cpu_reason, "cuda": _cuda_reason, "triton": _triton_reason}


# The default backend per device: what the kernels that exist can serve does not change after
# import, and choosing again cost ~40 us a call when another layer's data fills the caches (a
# training step). An explicit request (context manager, PYPAPER_BACKEND) is not cached.
_DEFAULTS: dict = {}


def backend_for(x: torch.Tensor, device: Optional[torch.device] = None) -> str:
    """The backend lif_multi_step would use for x now (``device``: x.device, when known)."""
    device = x.device if device is None else device
    if _backend.requested() is not None:
        return _backend.select(device, (), _REASONS)
    # Traced code neither reads nor fills the cache: a trace that filled it (the process's first
    # LIF call compiled) guarded on its being empty, so the second call recompiled.
    tracing = torch.compiler.is_compiling()
    name = None if tracing else _DEFAULTS.get(device)
    if name is None:
        name = _backend.select(device, _DEFAULT_ORDER.get(device.type, ("reference",)), _REASONS)
        # the reference's fallback warning stays with select
        if name != "reference" and not tracing:
            _DEFAULTS[device] = name
    return name


def _ops(backend: str):
    """The forward and backward ops' overloads themselves (calling the packet adds a frame)."""
    ops = torch.ops.pypaper
    if backend == "triton":
        return ops.lif_forward_triton.default, ops.lif_backward_triton.default
    return ops.lif_forward.default, ops.lif_backward.default


# ---- argument checks ------------------------------------------------------------------------------

def _check_x(x_seq) -> None:
    if not isinstance(x_seq, torch.Tensor):
        raise TypeError(f"x_seq must be a torch.Tensor, got {type(x_seq).__name__}")
    if x_seq.dtype not in _FLOATS:
        raise TypeError(f"x_seq must be a floating tensor (float32, float64, float16 or bfloat16), "
                        f"got {x_seq.dtype}")
    if x_seq.dim() < 2:
        raise ValueError(f"x_seq must have shape [T, N, *] (at least 2 dims), got shape "
                         f"{tuple(x_seq.shape)}")


@functools.lru_cache(maxsize=64)
def _scalar(value: float, sign: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A 0-dim tensor of a number parameter (tau, v_threshold), made once per value: creating it
    is an ATen call, ~50 us when another layer's data fills the caches. The ops only read it (the
    backward keeps it); ``sign`` keeps -0.0 apart from 0.0."""
    return torch.tensor(value, dtype=dtype, device=device)


def _check_param_shape(value, name: str, x: torch.Tensor, per_sample: bool = False) -> None:
    """A tensor parameter: one value, one per neuron (x.shape[2:], broadcast over the batch) or,
    ``per_sample``, one per sample and neuron (x.shape[1:]). (Shapes that only broadcast to
    these were expanded by _broadcast_param; a shape left here broadcasts to neither.)"""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a number or a tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {value.dtype}")
    shape, feat = tuple(value.shape), tuple(x.shape[2:])
    if value.numel() != 1 and shape != feat and not (per_sample and _is_per_sample(value, x)):
        raise ValueError(f"{name} has shape {shape}, expected () (one value), the feature shape "
                         f"x.shape[2:] = {feat} (one per neuron) or x.shape[1:] = "
                         f"{tuple(x.shape[1:])} (one per sample and neuron), or a shape that "
                         f"broadcasts to one of them")


def broadcasts_to(shape: tuple, target: tuple) -> bool:
    """Whether a tensor of ``shape`` broadcasts to ``target`` by torch's rules without growing
    ``target``: no more dims, and each of its trailing-aligned sizes 1 or target's. (The ranks
    first: traced with symbolic sizes, a size compared only where the ranks agree guards less.)"""
    if len(shape) > len(target):
        return False
    return all(s == 1 or s == t for s, t in zip(shape[::-1], target[::-1]))


def _broadcast_param(value, x: torch.Tensor):
    """A tensor tau / k / v_threshold as the op takes it, by torch's broadcasting of the value
    against one step's shape x.shape[1:] = [N, *F] (SpikingJelly's neurons multiply their
    parameters into a step's tensors, so any shape that broadcasts works there):

    - one element, the feature shape F, or [N, *F] (one per sample and neuron): as it is;
    - a shape that broadcasts to F, such as (C, 1, 1) for x [T, N, C, H, W] (one time constant
      or threshold per channel, as conv SNNs train them), or [1, *s] with s broadcasting to F:
      one value per neuron, expanded to F (a view; the kernels read a per-neuron tensor with
      its strides, and autograd sums the gradient of the expanded F values back onto the
      parameter's own shape);
    - [N, *s] with s broadcasting to F (a per-sample value, constant over some features):
      expanded to [N, *F], one value per sample and neuron.

    Anything else is left for _check_param_shape to refuse, naming the shapes."""
    if not isinstance(value, torch.Tensor) or value.numel() == 1:
        return value
    shape, feat, state = tuple(value.shape), tuple(x.shape[2:]), tuple(x.shape[1:])
    if len(shape) == len(feat) and shape == feat:
        return value
    if broadcasts_to(shape, feat):
        return value.expand(feat)
    if len(shape) == len(state) and shape != state and broadcasts_to(shape, state):
        if shape[0] == 1:  # the same for every sample: one value per neuron
            return value.squeeze(0).expand(feat)
        return value.expand(state)
    return value


def _is_per_sample(value, x: torch.Tensor) -> bool:
    """A tensor of shape x.shape[1:] (not one element): one value per sample and neuron, as
    SpikingJelly's functional.set_threshold_margin assigns to an output layer's v_threshold."""
    # the ranks first: traced with a symbolic batch, comparing the shapes of a per-neuron tau
    # (C,) with (N, C) guarded N != C (torch.export refused a dynamic batch over its range)
    return (isinstance(value, torch.Tensor) and value.numel() != 1
            and value.dim() == x.dim() - 1 and tuple(value.shape) == tuple(x.shape[1:]))


def _lif_per_sample(x_seq: torch.Tensor, v: Optional[torch.Tensor], kwargs: dict):
    """lif_multi_step where tau / k or v_threshold holds one value per sample and neuron: every
    (sample, neuron) pair is a neuron of one batch row, x_seq [T, N, *] -> [T, 1, M] (a view of a
    contiguous x), per-sample parameters -> [M], per-neuron ones broadcast over the batch first
    (autograd sums their gradients back), then the outputs reshaped back. The dynamics are
    elementwise in the neurons, so this is the same computation, bit for bit."""
    steps, state = x_seq.shape[0], tuple(x_seq.shape[1:])
    flat = dict(kwargs)
    for key in ("tau", "k", "v_threshold"):
        p = kwargs[key]
        if p is None or _is_number(p):
            continue
        name = kwargs["threshold_name"] if key == "v_threshold" else (kwargs["tau_name"] or key)
        _check_param_shape(p, name, x_seq, per_sample=True)
        if p.numel() != 1:
            flat[key] = (p if tuple(p.shape) == state else p.expand(state)).reshape(-1)
    neurons = math.prod(state)  # not -1: T = 0 leaves it undetermined in a reshape of x
    if v is not None:
        _check_v_shape(v, x_seq)
        v = v.reshape(1, neurons)
    spikes, v_last, v_seq = lif_multi_step(x_seq.reshape(steps, 1, neurons), v, **flat)
    return (spikes.reshape(x_seq.shape), v_last.reshape(state),
            None if v_seq is None else v_seq.reshape(x_seq.shape))


def _lif_in_storage_order(x_seq: torch.Tensor, v: Optional[torch.Tensor], order: list,
                          kwargs: dict):
    """lif_multi_step on x_seq's memory as it lies (``order``: pypaper/_layout.py's
    storage_order, the time dim first): x, v and the tensor parameters are permuted to views in
    which that memory is contiguous, the kernel runs on them, and the outputs are permuted back,
    so they have x_seq's strides (a channels_last input gives channels_last spikes and
    membrane). Before, the op copied such an x into the standard layout and its outputs stayed
    there (a channels_last [32, 64, 32, 32] step: 2.3-4.1 ms against 0.8-1.0 now, and the next
    channels_last convolution copied the spikes back). The dynamics are elementwise over the
    neurons: the same computation, bit for bit. A per-neuron parameter (x.shape[2:]) needs the
    batch dim to stay outermost among the neurons' dims; where it is not, x is copied as
    before."""
    state_order = [d - 1 for d in order[1:]]
    feature_order = [d - 2 for d in order[2:]]
    permuted = dict(kwargs)
    for key in ("tau", "k", "v_threshold"):
        p = kwargs[key]
        if p is None or _is_number(p) or not isinstance(p, torch.Tensor) or p.numel() == 1:
            continue
        name = kwargs["threshold_name"] if key == "v_threshold" else (kwargs["tau_name"] or key)
        _check_param_shape(p, name, x_seq, per_sample=True)
        if _is_per_sample(p, x_seq):
            permuted[key] = p.permute(state_order)
        elif order[1] == 1:
            permuted[key] = p.permute(feature_order)
        else:
            return lif_multi_step(x_seq.contiguous(), v, **kwargs)
    if v is not None:
        _check_v_shape(v, x_seq)
        v = v.permute(state_order)
    spikes, v_last, v_seq = lif_multi_step(x_seq.permute(order), v, **permuted)
    back = _layout.inverse(order)
    state_back = [d - 1 for d in back[1:]]
    return (spikes.permute(back), v_last.permute(state_back),
            None if v_seq is None else v_seq.permute(back))


def _is_broadcast(x: torch.Tensor) -> bool:
    """Whether x repeats values: a dim of more than one element with stride 0 (x.expand, a
    static input broadcast over the time steps).

    lif_multi_step copies a non-contiguous x that no permutation makes dense (a slice with
    gaps: y[..., :k], y.chunk(2, dim=2)[0], y[..., ::2]) unless it is broadcast. The kernels
    copy such an x anyway, but autograd kept the view itself for the CPU backward, which reruns
    the forward from x, and a view keeps its whole base alive: lif(linear(x)[..., :F]) of an
    8F-wide projection kept 8 values per neuron-step instead of one, and the backward copied x
    once more. The copy, made here, is what the kernel reads and what is kept: one value per
    neuron-step. A broadcast view's base holds fewer values than x (T times fewer, expanded
    over T steps): it is kept as it is."""
    return any(s == 0 and n != 1 for s, n in zip(x.stride(), x.shape))


def _check_v_shape(v, x_seq: torch.Tensor) -> None:
    if not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(x_seq.shape[1:]):
        got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
        raise ValueError(f"v has shape {got}, expected x_seq.shape[1:] = "
                         f"{tuple(x_seq.shape[1:])}")


def _param(value, name: str, x: torch.Tensor, mdt: torch.dtype, device: torch.device,
           tracing: bool) -> torch.Tensor:
    """A neuron parameter as a tensor of the math dtype on x's device (``device``): one value, or
    one per neuron of shape x.shape[2:] (broadcast over the batch)."""
    if _is_number(value):
        if not _is_finite(value):
            raise ValueError(f"{name} must be finite, got {_shown(value)}")
        # Not cached: a constant of a traced graph; a tensor made under inference_mode (it
        # could never be saved for a later backward), under a dispatch mode such as
        # FakeTensorMode (a fake tensor) or inside a torch.func transform (a tensor wrapped for
        # its level: a process whose first call was a hessian failed every later grad or
        # jacrev with functorch's "escaped?" assert): cached, each would poison every later call.
        if (tracing or torch.is_inference_mode_enabled()
                or torch._C._len_torch_dispatch_stack() != 0
                or torch._C._functorch.peek_interpreter_stack() is not None):
            return torch.tensor(float(value), dtype=mdt, device=device)
        v = float(value)
        return _scalar(v, math.copysign(1.0, v), mdt, device)
    _check_param_shape(value, name, x)
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but x_seq is on {device}")
    return value.to(mdt)


def _check_values(decay, decay_is_tau: bool, vth, v_reset: Optional[float], decay_name: str,
                  vth_name: str, decay_input: bool = True, *, learnable_threshold: bool = False,
                  math_dtype: torch.dtype = torch.float64, tracing: bool = False,
                  decay_needs_grad: bool = False) -> None:
    """Range checks of the decay and threshold, each a number (checked in Python: the tensor ops
    cost ~30 us a call, a fifth of the op's fixed cost) or a tensor. k = 0 (no leak) is allowed
    without decay_input: H = V - (V - Vr) * 0 + X = V + X, SpikingJelly's IFNode, to the bit;
    with decay_input it would make H = V, a neuron that never integrates, and its gradient,
    formed as (H - V) / k, has no value (nor one that is finite in the math dtype below its
    smallest normal number: refused there when decay_needs_grad). While tracing
    (torch.compile) a tensor's values cannot be read: numbers are still checked."""
    def bounds(v):  # (min, max, all finite), or None: a tensor while tracing
        if _is_number(v):
            return float(v), float(v), _is_finite(v)
        if tracing or v.is_meta:  # meta tensors (shape inference, deferred init) hold no values
            return None
        d = _autograd.values_of(v.detach())
        if d.numel() == 0:  # a per-neuron parameter over zero features
            return math.inf, -math.inf, True
        return float(d.min()), float(d.max()), bool(torch.all(torch.isfinite(d)))

    b = bounds(decay)
    if b is not None:
        lo, hi, finite = b
        if decay_is_tau:
            if not (finite and lo > 1):
                raise ValueError(f"{decay_name} must be finite and > 1, got min {lo}")
            if math_dtype != torch.float64 and lo <= 1 + torch.finfo(math_dtype).eps / 2:
                # what the kernels compute with: a tau within half an ulp of 1 is 1 in float32
                # (1 + eps/2 ties to even: 1). A comparison, not a float32 tensor read back: under
                # torch.compile an annealed tau is a SymFloat, and the read failed as a
                # data-dependent guard
                raise ValueError(f"{decay_name} must be > 1 in {math_dtype} (the kernels' math "
                                 f"type), got min {lo!r}, which rounds to 1")
        elif not (finite and (lo > 0 or (lo == 0 and not decay_input)) and hi <= 1):
            where = "(0, 1]" if decay_input else "[0, 1] (0: no leak, IF)"
            raise ValueError(f"{decay_name}: k = 1/tau must lie in {where}, got [{lo}, {hi}]")
        elif decay_input and decay_needs_grad and lo < torch.finfo(math_dtype).tiny:
            # dH/dk = X - (V - Vr) is formed in the backward as (H - V) / k: 1/k overflows below
            # ~2.9e-39 in float32 (NaN gradients), and below the smallest normal number H - V
            # keeps only a few bits of d * k
            raise ValueError(
                f"{decay_name}: k = 1/tau below {torch.finfo(math_dtype).tiny} (the smallest "
                f"normal {math_dtype}) has no decay gradient in the kernels' math (it is formed "
                f"as (H - V) / k), got min {lo}: pass k without requires_grad, or clamp it "
                f"(ParametricLIFNode holds sigmoid(w) at 2^-126 or above)")
    b = bounds(vth)
    if b is None:
        return
    lo, _, finite = b
    if not finite:
        raise ValueError(f"{vth_name} must be finite")
    # A learnable threshold (a trained parameter, or a tensor that requires grad: the caller
    # says) may drift to v_reset or below while it trains: the neuron then fires at every step,
    # which the kernels compute as well; refusing it would stop training mid-run (or an eval of
    # the trained model). Its constructor value was checked.
    if v_reset is not None and not learnable_threshold and not lo > v_reset:
        raise ValueError(f"{vth_name} must be greater than v_reset ({_shown(v_reset)}), got min "
                         f"{lo}")


def lif_multi_step(x_seq: torch.Tensor, v: Optional[torch.Tensor] = None, *, tau=None, k=None,
                   v_threshold=1.0, v_reset: Optional[float] = 0.0, surrogate_function=None,
                   decay_input: bool = True, detach_reset: bool = False, sltt: bool = False,
                   store_v_seq: bool = False, tau_name: Optional[str] = None,
                   threshold_name: str = "v_threshold", learnable_threshold: bool = False):
    """Leaky integrate-and-fire neurons over T steps in one fused kernel.

    For t = 0..T-1, with V[-1] = ``v`` (None: at rest, v_reset or 0 for a soft reset):

        H[t] = V[t-1] + (X[t] - (V[t-1] - Vr)) / tau      decay_input (else V - (V - Vr)/tau + X)
        S[t] = Theta(H[t] - v_threshold)                   (1 where H - Vth >= 0)
        V[t] = S Vr + (1 - S) H   (hard reset)   or   H - S Vth   (v_reset=None, soft reset)

    Backward: BPTT as the reverse scan of the same kernel, with the surrogate derivative at the
    spike (``surrogate_function``: pypaper.snn.surrogate.*, default Sigmoid(alpha=4)); it keeps
    one value per neuron-step: on the CPU x itself (the backward reruns the forward from it, chunk
    by chunk in cache), on GPUs H[t]. ``detach_reset`` detaches S in the reset term. ``sltt``:
    SLTT (Meng et al., ICCV 2023) drops the temporal gradient path, dL/dH[t] = dL/dS[t] sigma'.
    SpikingJelly's LIFNode (tau) and ParametricLIFNode (k = sigmoid(w); Fang et al., ICCV 2021)
    compute the same, in the same operation order.

    Args:
        x_seq: [T, N, *] float32, float64, float16 or bfloat16; math runs in fp32 (fp64 for fp64).
        v: membrane before step 0, shape x_seq.shape[1:].
        tau: the time constant (> 1), a number or a tensor of shape () or x_seq.shape[2:] (one per
            neuron, broadcast over the batch); divides, like SpikingJelly's LIFNode. Default 2.
            A tensor tau, k or v_threshold may also have any shape that broadcasts against one
            step, x_seq.shape[1:], by torch's rules: (C, 1, 1) for x [T, N, C, H, W] is one
            value per channel (its gradient is summed back onto that shape).
        k: instead of tau, 1/tau in (0, 1] (multiplies; PLIF passes sigmoid(w)). Differentiable.
            k = 0 with decay_input=False is the integrate-and-fire neuron, H = V + X (IFNode).
            With decay_input, a k that requires grad must be at least the math dtype's smallest
            normal number (2^-126 in float32): the backward forms dH/dk as (H - V) / k.
        v_threshold: number or tensor of shape () or x_seq.shape[2:]; differentiable.
            tau, k and v_threshold also take a tensor of shape x_seq.shape[1:], one value per
            sample and neuron (SpikingJelly's functional.set_threshold_margin assigns one).
        store_v_seq: also return V[t] for every step.
        tau_name / threshold_name: the argument names used in error messages.
        learnable_threshold: v_threshold is a trained parameter (also when passed detached, as
            torch.func.functional_call or a frozen model does): it may have reached v_reset,
            which is then not refused (a tensor that requires grad or an nn.Parameter counts
            as one anyway).

    Returns (spikes [T, N, *], v_last [N, *], v_seq [T, N, *] or None), in x_seq's dtype.
    """
    _check_x(x_seq)
    if tau is not None and k is not None:
        raise ValueError("pass tau or k (= 1/tau), not both")
    if v_reset is not None and not _is_finite_number(v_reset):
        raise ValueError(f"v_reset must be a finite number or None, got {_shown(v_reset)!r}")
    learnable_threshold = (learnable_threshold or isinstance(v_threshold, nn.Parameter)
                           or (isinstance(v_threshold, torch.Tensor) and v_threshold.requires_grad))
    # a parameter that broadcasts to one step's shape, as an elementwise torch op takes it (after
    # the Parameter test above: the expanded view is no longer the Parameter itself)
    tau, k = _broadcast_param(tau, x_seq), _broadcast_param(k, x_seq)
    v_threshold = _broadcast_param(v_threshold, x_seq)
    order = None if x_seq.is_contiguous() else _layout.storage_order(x_seq, fixed=1)
    if order is not None:
        return _lif_in_storage_order(x_seq, v, order, dict(
            tau=tau, k=k, v_threshold=v_threshold, v_reset=v_reset,
            surrogate_function=surrogate_function, decay_input=decay_input,
            detach_reset=detach_reset, sltt=sltt, store_v_seq=store_v_seq, tau_name=tau_name,
            threshold_name=threshold_name, learnable_threshold=learnable_threshold))
    if order is None and not x_seq.is_contiguous() and not _is_broadcast(x_seq):
        x_seq = x_seq.contiguous()  # a view with gaps: see _is_broadcast
    if any(_is_per_sample(p, x_seq) for p in (tau, k, v_threshold)):
        return _lif_per_sample(x_seq, v, dict(
            tau=tau, k=k, v_threshold=v_threshold, v_reset=v_reset,
            surrogate_function=surrogate_function, decay_input=decay_input,
            detach_reset=detach_reset, sltt=sltt, store_v_seq=store_v_seq, tau_name=tau_name,
            threshold_name=threshold_name, learnable_threshold=learnable_threshold))
    mdt = reference.default_math_dtype(x_seq.dtype)
    device = x_seq.device
    tracing = torch.compiler.is_compiling()  # value checks read tensor data: not while tracing
    if tracing and torch._C._functorch.maybe_current_level() is not None:
        # torch.compile over a torch.func transform (grad, vmap, jacrev): traced there the ops
        # fail ("Cannot access storage of TensorWrapper"); after a graph break the transform
        # runs eagerly, its rules included (and fullgraph=True says where it broke). Dynamo
        # already stops at the level query under a transform; the explicit break says why.
        torch._dynamo.graph_break()
    decay_is_tau = k is None
    decay_name = tau_name or ("tau" if decay_is_tau else "k")
    decay_value = (2.0 if tau is None else tau) if decay_is_tau else k
    decay = _param(decay_value, decay_name, x_seq, mdt, device, tracing)
    vth = _param(v_threshold, threshold_name, x_seq, mdt, device, tracing)
    _check_values(decay_value if _is_number(decay_value) else decay, decay_is_tau,
                  v_threshold if _is_number(v_threshold) else vth, v_reset, decay_name,
                  threshold_name, decay_input, learnable_threshold=learnable_threshold,
                  math_dtype=mdt, tracing=tracing,
                  decay_needs_grad=torch.is_grad_enabled() and decay.requires_grad)
    if v is not None:
        _check_v_shape(v, x_seq)
        v = v.to(dtype=x_seq.dtype, device=device)
        if not tracing and v.is_inference() and not torch.is_inference_mode_enabled():
            # the membrane a call under inference_mode left (SpikingJelly continues from it):
            # an inference tensor cannot be saved for this call's backward
            v = v.clone()
    spec = surrogate_spec(surrogate_function)
    v_reset = None if v_reset is None else float(v_reset)
    backend = backend_for(x_seq, device)
    if spec is None or backend == "reference":
        sid, alpha = spec if spec is not None else (0, 1.0)
        fn = surrogate_function if spec is None else None
        # x_seq is contiguous here (any other layout went through _lif_in_storage_order, which
        # permuted v with it); v contiguous too, as the kernels take it, so that v_last and
        # v_seq come back in x's layout (a channels_last x: channels_last outputs) as theirs do
        v = v if v is None else v.contiguous()
        return reference.lif_multi_step(x_seq, v, decay, vth, v_reset, sid, alpha, decay_input,
                                        decay_is_tau, detach_reset, sltt, store_v_seq,
                                        surrogate_fn=fn)
    sid, alpha = spec
    # Forward-mode tangents (torch.autograd.forward_ad, torch.func.jvp / jacfwd) go through the
    # op's Autograd kernel, which runs its jvp rule (pypaper/snn/jvp_rule.py); the eager paths
    # below skip that kernel.
    tangents = _autograd.forward_ad_active() and _autograd.has_tangent((x_seq, v, decay, vth))
    # The forward writes no H (8 bytes per neuron-step instead of 12) when nothing will be
    # differentiated, and never on the CPU, whose backward reruns the forward from x instead:
    # fwd + bwd then move 20 bytes per neuron-step instead of 24 (T = 32, 2^18 neurons, cold
    # inputs: 4.8 -> 4.1 ms in the standalone loop).
    needs_grad = torch.is_grad_enabled() and (
        x_seq.requires_grad or decay.requires_grad or vth.requires_grad
        or (v is not None and v.requires_grad))
    keep_h = backend != "cpu" and needs_grad
    if needs_grad and not keep_h and not tracing and x_seq.is_inference():
        # The CPU backward reruns the forward from x, so autograd saves x itself, and refuses an
        # inference tensor ("Inference tensors cannot be saved for backward"): input made under
        # torch.inference_mode (a frozen backbone's features) reaching a neuron whose tau or
        # threshold trains. SpikingJelly and the GPU kernels keep H instead and run; here the
        # copy is saved. (Under inference_mode itself needs_grad is False: nothing is saved.)
        x_seq = x_seq.clone()
    args = (x_seq, v, decay, vth, v_reset, sid, alpha,
            op_flags.forward_flags(decay_input, decay_is_tau, detach_reset, sltt, store_v_seq,
                                   keep_h))
    # Nothing to differentiate: the call skips the Autograd key (its Python kernel would only
    # redispatch); else, in eager mode, the same autograd without torch.library's wrapper.
    forward_op, backward_op = _ops(backend)
    if isinstance(alpha, torch.Tensor):
        # torch.compile traces a tensor alpha (surrogate.alpha_operand): the ops that read it
        # when the compiled graph runs (tensor_alpha.py); eager calls got a float
        forward_op, backward_op = tensor_alpha.ops(backend)
        args = (*args, backend)
    if tangents:
        spikes, v_last, _, v_seq = forward_op(*args)
    elif needs_grad:
        spikes, v_last, _, v_seq = _registration.call_with_grad(forward_op, backward_op, args)
    else:
        spikes, v_last, _, v_seq = _registration.call_op(forward_op, args, False)
    return spikes, v_last, (v_seq if store_v_seq else None)
