"""Learnable synaptic delays: ``DelayedLinear``, its op ``delayed_linear`` and the sigma schedule.

Hammouamri, Khalfaoui-Hassani, Masquelier, "Learning Delays in Spiking Neural Networks using
Dilated Convolutions with Learnable Spacings", ICLR 2024 (code: Thvnvtos/SNN-delays, on DCLS).
Every synapse (o, i) of a fully connected layer has a weight w and a delay position p in
[0, max_delay - 1] time steps, both learned by backpropagation:

    y[t, n, o] = b[o] + sum_i w[o, i] sum_d g_{o,i}(d) x[t - d, n, i]     (x[t < 0] = 0)

In training, g spreads the delay over the integer taps d by a normalised Gaussian of width sigma
around p, so p gets a gradient; sigma starts large (the delays explore) and is decayed to about
0.5 (``sigma_schedule``); at the end ``round_delays()`` rounds the positions and the layer uses one
integer delay per synapse (g one-hot, an exact shift).

sigma is the Gaussian's width itself. DCLS's 'gauss' kernel, which SNN-delays trains with, has
width |SIG| + 0.27 for its parameter SIG (DCLS/construct/modules.py: SIG = SIG.abs() + 0.27):
SNN-delays' SIG goes from K // 3 to 0.23, widths sigma = K // 3 + 0.27 to 0.5 here.

The kernel (kernels/cpu/delay_cpu.h) gathers only the taps each synapse needs: the Gaussian is
truncated to the 2R taps around p, R = ceil(3 sigma) (at most K), and renormalised
(kernels/common/delay_math.h has the window, and the bound on the output's jump when floor(p)
crosses an integer), instead of convolving with a dense [C_out, C_in, max_delay] kernel as DCLS
does. pypaper/snn/delays_reference.py is that dense convolution.

When the windows span many of the K taps (early in training: SNN-delays starts at sigma = K // 3
+ 0.27, R about K) the gather does about a dense convolution's work tap by tap, and a dense
formulation wins. Which one is the CPU's matter (csrc/snn/delay_cpu.cpp has the numbers): on Intel
CPUs the C++ op runs every window of more than K/3 taps (6R > K) as one GEMM per tap (2026-12-03
Xeon, T=100, N=128, 256x256, K=21, fwd+bwd: GEMMs 311-321 ms at any sigma, the gather 374 ms at R
= 4 and 1007 at sigma 7.27, oneDNN's conv1d 452-467); on AMD CPUs, whose MKL sgemm ran at half
that rate or less, the CPU backend runs the widest windows (2R >= 3K/4) as the convolution itself
(the reference's formulation, oneDNN's conv1d; Zen 5 guest, same shape: the gather ~60 ms + ~27 ms
per tap of the average window, the convolution ~430 ms at any sigma: equal near 14 taps, two
thirds of K). PYPAPER_DELAY_PATH overrides the choice: ``gather`` (always the C++ gather),
``conv`` (always the convolution), ``dense`` (always the C++ op's one GEMM per tap).

Under torch.compile sigma is a tensor (``DelayedLinear`` keeps it as one; a Python number would
make dynamo compile one graph per value of a schedule), and the graph does not read its value: on
the CPU the C++ op makes the choice itself (on AMD CPUs its GEMMs stand in for the convolution),
and the reference (other devices) is written so that no shape depends on sigma
(delays_reference.sigma_tensor_tap_weights).

Backends: CPU -> the C++ op (default), then the reference; CUDA -> the reference (no CUDA or
Triton kernel exists yet; an explicit request for one raises BackendUnavailable). float16 and
bfloat16 inputs run in float32 and are cast back. On the CPU backend torch.autocast changes
nothing: every path computes in float32 (float64 for float64 inputs) and returns x's dtype (the
convolution that stands in for the C++ op runs with autocast off, so the path choice never
changes the precision); the reference backend (CUDA) is plain PyTorch, where autocast applies.
"""
from __future__ import annotations

import math
import numbers
import os
from typing import Optional

import torch
from torch import nn
from torch.nn.utils import parametrize

from .. import _backend, _ext
from .._module_swap import reparam_pre_hooks
from . import delays_reference

_DEFAULT_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "reference")}
_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

_registered = False


def _register() -> None:
    global _registered
    if not _registered and _ext.LOADED:
        from . import delays_registration

        delays_registration.register_native()
        _registered = True


_register()


_KERNELS = _backend.kernel_table("pypaper::delay_linear")  # probed once (_backend.has_kernel)


def _has_kernel(dispatch_key: str) -> bool:
    return _KERNELS[dispatch_key]


def _cpu_reason(device: torch.device) -> Optional[str]:
    return _backend.native_reason(device, "cpu")


def _cuda_reason(device: torch.device) -> Optional[str]:
    why = _backend.native_reason(device, "cuda")
    if why is None and not _has_kernel("CUDA"):
        why = "pypaper._C has no CUDA kernel for pypaper::delay_linear"
    return why


def _triton_reason(device: torch.device) -> Optional[str]:
    return "there is no Triton kernel for pypaper::delay_linear"


_REASONS = {"cpu": _cpu_reason, "cuda": _cuda_reason, "triton": _triton_reason}


def backend_for(x: torch.Tensor) -> str:
    """The backend delayed_linear would use for x now."""
    return _backend.select(x.device, _DEFAULT_ORDER.get(x.device.type, ("reference",)), _REASONS)


# ---- argument checks ----------------------------------------------------------------------------

def _check_max_delay(max_delay) -> int:
    if not isinstance(max_delay, numbers.Integral) or isinstance(max_delay, bool):
        raise TypeError(f"max_delay must be an int, got {type(max_delay).__name__}")
    if max_delay < 1:
        raise ValueError(f"max_delay must be >= 1 (delays 0 .. max_delay-1), got {max_delay}")
    return int(max_delay)


def _check_sigma(sigma, name: str = "sigma") -> float:
    if not isinstance(sigma, numbers.Real) or isinstance(sigma, bool):
        raise TypeError(f"{name} must be a number, got {type(sigma).__name__}")
    # Comparisons, not math.isfinite: under torch.compile a sigma that changed between calls
    # arrives as a SymFloat, which math.isfinite rejects; comparing specialises on its value (one
    # graph per sigma). NaN fails both comparisons. Against inf, not float_info.max: a numpy
    # float32 sigma would cast that to float32 (an overflow warning).
    if not (sigma >= 0 and sigma < math.inf):
        raise ValueError(f"{name} must be finite and >= 0 (0: integer delays), got {sigma}")
    return float(sigma)


def _check_sigma_tensor(sigma: torch.Tensor) -> None:
    """A sigma tensor: one floating element on the CPU (the kernels read it on the host), not
    requiring grad (sigma is a schedule, not learned). Its value is checked where it is read."""
    if sigma.numel() != 1 or sigma.dim() > 1:
        raise ValueError(f"sigma must be a number or a one-element tensor, got shape "
                         f"{tuple(sigma.shape)}")
    if not sigma.is_floating_point():
        raise TypeError(f"sigma must be a floating tensor, got {sigma.dtype}")
    if sigma.device.type != "cpu":
        raise ValueError(f"sigma must be a CPU tensor (the kernels read it on the host), got "
                         f"{sigma.device}")
    if sigma.requires_grad:
        raise ValueError("sigma must not require grad: it is set by a schedule, not learned")


def _sigma_tensor(sigma: float) -> torch.Tensor:
    # on the CPU whatever the default device: torch.tensor follows ``with torch.device('meta')``
    # (deferred initialisation) or torch.set_default_device, and the kernels read sigma on the
    # host (a meta sigma sent the C++ op to its Meta kernel: an uninitialised output)
    return torch.tensor(sigma, dtype=torch.float64, device="cpu")


def _check_inputs(x, weight, position, bias) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"x must be a floating tensor (float32, float64, float16 or bfloat16), "
                        f"got {x.dtype}")
    for name, t in (("weight", weight), ("position", position), ("bias", bias)):
        if not (isinstance(t, torch.Tensor) or (name == "bias" and t is None)):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 3:
        raise ValueError(f"x must have shape [T, N, C_in] (time-major, 3 dims), got shape "
                         f"{tuple(x.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape [C_out, C_in], got {tuple(weight.shape)}")
    if x.shape[2] != weight.shape[1]:
        raise ValueError(f"x has {x.shape[2]} input features (x.shape[-1]) but weight expects "
                         f"in_features = {weight.shape[1]}")
    if position.shape != weight.shape:
        raise ValueError(f"position must have weight's shape {tuple(weight.shape)}, got "
                         f"{tuple(position.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("position", position), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
        if t is not None and not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")


_DELAY_PATHS = ("auto", "gather", "conv", "dense")


def _runs_as_convolution(max_delay: int, sigma: Optional[float]) -> bool:
    """Whether the CPU backend computes the layer as one dense convolution (see the module doc).
    sigma None: its value is not known here (a tensor under torch.compile), which takes the C++
    op unless PYPAPER_DELAY_PATH=conv."""
    path = os.environ.get("PYPAPER_DELAY_PATH", "auto")
    if path not in _DELAY_PATHS:
        raise ValueError(f"PYPAPER_DELAY_PATH must be one of {_DELAY_PATHS}, got {path!r}")
    if path == "conv":
        return True
    if path != "auto" or sigma is None or not cpu_is_amd():
        return False
    R = delays_reference.window_radius(sigma, max_delay)
    return R > 0 and 8 * R >= 3 * max_delay  # 2R >= 3K/4


# read once at import: torch.compile cannot trace the pybind call (a number sigma compiles)
_CPU_IS_AMD = bool(_ext.LOADED and _ext._C.cpu_is_amd())


def cpu_is_amd() -> bool:
    """The C++ kernels' vendor test (kernels/cpu/cpu_vendor.h): on AMD CPUs eager mode runs the
    widest windows as oneDNN's convolution, elsewhere the C++ op picks GEMMs or the gather."""
    return _CPU_IS_AMD


def delayed_linear(x: torch.Tensor, weight: torch.Tensor, position: torch.Tensor,
                   bias: Optional[torch.Tensor] = None, *, max_delay: int,
                   sigma) -> torch.Tensor:
    """Linear layer with one learnable delay per synapse (Hammouamri et al., ICLR 2024).

        y[t, n, o] = b[o] + sum_i w[o, i] sum_d g_{o,i}(d) x[t - d, n, i],  x[t < 0] = 0

    g_{o,i} is the normalised Gaussian of width ``sigma`` around clamp(position[o, i], 0,
    max_delay - 1) over the integer taps d in [0, max_delay), truncated to the 2R taps
    [floor(p) - R + 1, floor(p) + R], R = min(ceil(3 sigma), max_delay), and renormalised there;
    ``sigma=0`` means integer delays, one tap at round(p) (no position gradient), and a tiny sigma
    its limit (below 1e-6 in float32, 1e-12 in float64: all weight on the nearest tap). Gradients
    flow to x, weight, position (where 0 <= p <= max_delay - 1) and bias.

    Args:
        x: [T, N, C_in] floating tensor, time-major (SpikingJelly's multi-step layout).
        weight, position: [C_out, C_in]. bias: [C_out] or None.
        max_delay: K >= 1, the number of taps (delays 0 .. K-1 steps).
        sigma: the Gaussian's width in time steps, >= 0 (DCLS's 'gauss' SIG + 0.27): a number, or
            a one-element float CPU tensor. torch.compile specialises on a number (one graph per
            value); a tensor is read by the kernels, so a schedule of sigmas runs in one graph
            (``DelayedLinear`` keeps its sigma as such a tensor).
    Returns: [T, N, C_out] in x's dtype.
    """
    K = _check_max_delay(max_delay)
    if isinstance(sigma, torch.Tensor):
        _check_sigma_tensor(sigma)
        value = None if torch.compiler.is_compiling() else _check_sigma(float(sigma))
        return _delayed_linear(x, weight, position, bias, K, value, sigma.reshape(()))
    return _delayed_linear(x, weight, position, bias, K, _check_sigma(sigma), None)


def _delayed_linear(x, weight, position, bias, K: int, s: Optional[float],
                    sigma_t: Optional[torch.Tensor]) -> torch.Tensor:
    """delayed_linear with sigma's value s (None when unknown: under torch.compile) and/or its
    tensor sigma_t (None: made from s for the C++ op)."""
    _check_inputs(x, weight, position, bias)
    backend = backend_for(x)
    out_dtype = x.dtype
    mt = torch.float64 if x.dtype == torch.float64 else torch.float32
    xs, w, p = x.to(mt), weight.to(mt), position.to(mt)
    b = bias.to(mt) if bias is not None else None
    if backend == "reference":
        y = delays_reference.delayed_linear(xs, w, p, b, K, sigma_t if s is None else s)
    elif backend == "cpu" and _runs_as_convolution(K, s):
        # The convolution stands in for the C++ op here (a speed choice, made from sigma and the
        # CPU vendor), so it computes what the op computes: in mt. Under
        # torch.autocast('cpu', bfloat16) conv1d ran in bfloat16 while the op (and the same
        # layer under torch.compile, or at a smaller sigma) stayed in float32: on AMD CPUs the
        # layer's precision changed with the sigma schedule, and eager differed from compiled.
        with torch.autocast("cpu", enabled=False):
            y = delays_reference.delayed_linear(xs, w, p, b, K, sigma_t if s is None else s)
    else:
        st = _sigma_tensor(s) if sigma_t is None else sigma_t
        y = torch.ops.pypaper.delay_linear(xs, w, p, b, K, st)
    return y.to(out_dtype)


def sigma_schedule(epoch: int, epochs: int, sigma_init: float, sigma_final: float = 0.5, *,
                   decay_epochs: Optional[int] = None) -> float:
    """Sigma for ``epoch`` (0-based): exponential decay from ``sigma_init`` to ``sigma_final``.

        sigma(e) = sigma_init * (sigma_final / sigma_init) ** min(1, e / decay_epochs)

    sigma is the Gaussian's width. decay_epochs defaults to epochs // 2 (SNN-delays decays over
    the first half of training). Their code multiplies DCLS's SIG by a constant factor each epoch,
    from K // 3 to 0.23, and DCLS's 'gauss' width is |SIG| + 0.27: widths K // 3 + 0.27 down to
    0.5, the paper's final sigma. ``sigma_schedule(e, epochs, K // 3 + 0.27)`` has the same end
    points, decaying the width itself geometrically. Call ``layer.set_sigma(sigma_schedule(...))``
    each epoch, then ``round_delays()`` at the end.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    # finite: an infinite sigma_init gave sigma_init * 0 = nan after the first epoch, reported
    # by set_sigma as a bad "sigma" instead of naming the schedule's argument
    for name, v in (("sigma_init", sigma_init), ("sigma_final", sigma_final)):
        if not (v > 0 and v < math.inf):
            raise ValueError(f"{name} must be finite and > 0, got {v}")
    span = max(1, epochs // 2) if decay_epochs is None else int(decay_epochs)
    if span < 1:
        raise ValueError(f"decay_epochs must be >= 1, got {decay_epochs}")
    frac = min(1.0, max(0.0, epoch / span))
    return float(sigma_init * (sigma_final / sigma_init) ** frac)


class DelayedLinear(nn.Module):
    """Fully connected layer with a learnable weight and delay per synapse, on [T, N, C_in].

    Output [T, N, C_out]: y[t] = b + sum over synapses of w * (x delayed by the synapse's delay),
    the delay spread over the integer taps by a Gaussian of width ``sigma`` during training
    (Hammouamri et al., ICLR 2024; see ``delayed_linear``).

    Args:
        in_features, out_features: C_in, C_out.
        max_delay: K >= 1; delays range over 0 .. K-1 time steps.
        bias: learn a bias (SNN-delays trains without one, behind a BatchNorm).
        sigma_init: starting Gaussian width in steps; default max(K / 3, 0.5) (SNN-delays starts
            at DCLS SIG = K // 3, a width of K // 3 + 0.27). ``set_sigma`` or ``sigma_schedule``
            decays it.

    Initialisation (documented choices): weights as nn.Linear (Kaiming-uniform, bound
    1/sqrt(C_in); SNN-delays uses Kaiming-uniform with the ReLU gain, sqrt(6 / C_in) - scale
    ``weight`` up if you want theirs), bias as nn.Linear, positions uniform over [0, K - 1] (the
    paper's uniform init over the whole delay range).

    Training loop, as in the paper: separate (higher) learning rate for ``position``, and no
    weight decay on it (SNN-delays trains the positions with their own plain Adam: a decay, AdamW's
    default 0.01 included, pulls every delay towards 0 steps, a bias unrelated to the task); after
    each optimizer step call ``clamp_positions_()`` (DCLS's clamp_parameters: the op clamps p to
    [0, K-1] and gives no position gradient outside); each epoch
    ``set_sigma(sigma_schedule(epoch, epochs, layer.sigma_init))``; at the end ``round_delays()``.

    Porting from SNN-delays (``Dcls1d`` on ``F.pad(x.permute(1, 2, 0), (K - 1, (K - 1) // 2))``):
    this layer takes [T, N, C_in] and does the causal left padding itself; SNN-delays' right
    padding, which adds (K - 1) // 2 output steps so that late delays still reach the loss, is
    not part of the layer: pad x on the right in time (``F.pad(x, (0, 0, 0, 0, 0, (K - 1) //
    2))``) to keep it. A DCLS position P (in [-(K // 2), K // 2]) is the delay
    ``position = K - 1 - K // 2 - P`` steps, and DCLS SIG is ``sigma = SIG + 0.27``.

    Under torch.compile the layer hands its sigma to the op as a tensor, so a whole schedule runs
    in one compiled graph (no recompile per sigma); on the CPU the C++ op then picks its path from
    sigma's value (on AMD CPUs its GEMMs for the widest windows, where eager mode runs the
    convolution).
    """

    def __init__(self, in_features: int, out_features: int, max_delay: int, bias: bool = True,
                 sigma_init: Optional[float] = None, *, device=None, dtype=None):
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.max_delay = _check_max_delay(max_delay)
        if sigma_init is None:
            sigma_init = max(self.max_delay / 3.0, 0.5)
        self.sigma_init = _check_sigma(sigma_init, "sigma_init")
        # sigma lives twice (the setter keeps both): a float for Python (repr, path choice in
        # eager mode) and a 0-dim float64 CPU tensor, a plain attribute (not a buffer: .to(device)
        # / .half() leave it alone), which forward hands to the op. torch.compile reads the
        # tensor as a graph input and guards on no value, so a sigma schedule runs in one graph.
        self.sigma = self.sigma_init
        self.finalized = False
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **kw))
        self.position = nn.Parameter(torch.empty(out_features, in_features, **kw))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **kw))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    @property
    def sigma(self) -> float:
        """The Gaussian width in time steps (0: integer delays)."""
        return self._sigma

    @sigma.setter
    def sigma(self, value: float) -> None:
        value = _check_sigma(value)
        # round_delays() fixes sigma at 0 (one tap per synapse at the integer delay). set_sigma
        # refused another value but the attribute took it silently: a schedule loop written as
        # ``layer.sigma = sigma_schedule(...)`` that went on after round_delays() (fine-tuning
        # the weights on the rounded delays, as SNN-delays does) spread every frozen integer
        # delay over a Gaussian of that width again, with ``finalized`` still saying rounded.
        if value != 0 and getattr(self, "finalized", False):
            raise RuntimeError(f"the delays were rounded (round_delays()); sigma is fixed at 0, "
                               f"got sigma = {value:g} (reset_parameters() makes them learnable "
                               f"again)")
        self._sigma = value
        # A new tensor, not fill_: the op saves sigma for its backward, so a sigma set between a
        # forward and its backward must leave that one alone (in place it raised autograd's
        # version error), and a copy.copy of the layer must not share it. Dynamo reads the
        # attribute on every call and guards on no tensor value: no recompile. Made outside
        # inference mode even when set inside it (set_sigma, round_delays or load_state_dict in
        # an evaluation loop): an inference tensor cannot be saved for a backward, so every
        # later training step raised.
        with torch.inference_mode(False):
            self._sigma_t = _sigma_tensor(self._sigma)

    def __setstate__(self, state) -> None:
        # a layer pickled before sigma became a property kept it as a plain float attribute
        if "_sigma" not in state and "sigma" in state:
            state = dict(state)
            sigma = state.pop("sigma")
            state["_sigma"] = float(sigma)
        super().__setstate__(state)
        # sigma's tensor is made again from the float, on the CPU: torch.load(map_location=...)
        # moves every pickled storage, this one too, but the C++ op reads sigma on the host: a
        # layer loaded with map_location="cuda" and then moved with .cpu() raised "sigma must be
        # a CPU tensor, got cuda:0"; one loaded with map_location="meta" held a meta sigma
        if "_sigma" in self.__dict__:
            with torch.inference_mode(False):
                self._sigma_t = _sigma_tensor(self._sigma)

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's rule
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)
        nn.init.uniform_(self.position, 0.0, float(self.max_delay - 1))
        if getattr(self, "finalized", False):  # rounded before: the positions learn again
            self.position.requires_grad_(True)
        self.finalized = False  # before sigma: a rounded layer takes only sigma 0
        self.sigma = self.sigma_init

    def set_sigma(self, sigma: float) -> None:
        """Set the Gaussian width (steps). 0 means integer delays (round(p), no position grad)."""
        if self.finalized:
            raise RuntimeError("the delays were rounded (round_delays()); sigma is fixed at 0")
        self.sigma = sigma

    def _position_reparam(self) -> Optional[str]:
        """How ``position`` is computed from other tensors, or None when it is the Parameter."""
        if parametrize.is_parametrized(self, "position"):
            return ("torch.nn.utils.parametrize (" + ", ".join(
                type(m).__name__ for m in self.parametrizations["position"]) + ")")
        hook = reparam_pre_hooks(self).get("position")
        return None if hook is None else f"the forward pre-hook {type(hook).__name__}"

    @torch.no_grad()
    def clamp_positions_(self) -> None:
        """Clamp the positions to [0, max_delay - 1] in place (call after optimizer.step()).

        Under a parametrization of ``position`` (a user constraint, e.g. p = (K - 1)
        sigmoid(u)) the attribute is recomputed on every access: clamping it in place changed a
        temporary and left the parameter u alone, silently. Positions already in range are left
        as they are (the parametrization keeps them there); out-of-range ones are written back
        through the parametrization's right_inverse (an error names it when it has none)."""
        how = self._position_reparam()
        if how is None:
            self.position.clamp_(0, self.max_delay - 1)
            return
        if not parametrize.is_parametrized(self, "position"):
            raise RuntimeError(f"clamp_positions_: position is computed by {how}, whose stored "
                               "tensors are not the positions; remove it first")
        p = self.position
        if p.numel() == 0 or (p.min() >= 0 and p.max() <= self.max_delay - 1):
            return
        try:
            self.position = p.clamp(0, self.max_delay - 1)  # parametrize: via right_inverse
        except (NotImplementedError, RuntimeError) as e:
            raise RuntimeError(
                f"clamp_positions_: position is parametrized by {how}, which gives positions "
                f"outside [0, {self.max_delay - 1}] and cannot be assigned the clamped ones "
                f"({e}); give the parametrization a right_inverse, or make it keep the "
                "positions in range") from e

    @torch.no_grad()
    def round_delays(self) -> "DelayedLinear":
        """Round the positions to integer delays and switch to the exact integer gather
        (sigma = 0): one tap per synapse, as the paper does for inference. The delays are fixed
        from here: the positions are frozen as PyTorch freezes a parameter (requires_grad
        False, .grad cleared), so an optimizer that keeps training the weights skips them (with
        the op's zero gradient Adam's momentum and weight decay moved them off the integers,
        changing the delays). As for any frozen parameter, build DistributedDataParallel after
        it (or pass find_unused_parameters=True). reset_parameters() makes them learnable
        again.

        A ``position`` computed by a parametrization (or pruning / weight_norm hook) is refused:
        rounding and freezing the recomputed attribute changed a temporary, so the positions
        kept learning (Adam's momentum moving the delays) with ``finalized`` saying rounded."""
        how = self._position_reparam()
        if how is not None:
            raise RuntimeError(
                f"round_delays: position is computed by {how}, so the rounded delays cannot be "
                "stored and frozen in it; remove the parametrization first, keeping the current "
                "positions (torch.nn.utils.parametrize.remove_parametrizations(layer, "
                "'position'), or torch.nn.utils.prune.remove(layer, 'position')), then call "
                "round_delays()")
        self.position.clamp_(0, self.max_delay - 1).round_()
        self.position.grad = None
        self.position.requires_grad_(False)
        self.sigma = 0.0
        self.finalized = True
        return self

    finalize = round_delays

    @property
    def delays(self) -> torch.Tensor:
        """The integer delays round(clamp(position)) as int64 [C_out, C_in]."""
        return self.position.detach().clamp(0, self.max_delay - 1).round().long()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.Tensor) and x.dim() == 3 and x.shape[-1] != self.in_features:
            raise ValueError(f"x has {x.shape[-1]} input features (x.shape[-1]) but the layer "
                             f"has in_features = {self.in_features}")
        value = None if torch.compiler.is_compiling() else self._sigma
        return _delayed_linear(x, self.weight, self.position, self.bias, self.max_delay, value,
                               self._sigma_t)

    def get_extra_state(self) -> torch.Tensor:
        """[sigma, finalized, max_delay] as one float64 tensor (exact for each). A tensor, not a
        dict: safetensors (Hugging Face's save_pretrained default) and torch.distributed.
        checkpoint store tensors only, and refused the state_dict ("expected torch.Tensor but
        received dict"); dropping the entry to save it loaded an unrounded layer at sigma_init."""
        return torch.tensor([self.sigma, float(self.finalized), float(self.max_delay)],
                            dtype=torch.float64)

    def set_extra_state(self, state) -> None:
        if isinstance(state, torch.Tensor):
            if state.shape != (3,):
                raise ValueError(f"DelayedLinear's extra state is [sigma, finalized, max_delay], "
                                 f"got a tensor of shape {tuple(state.shape)}")
            sigma, finalized, saved = state.tolist()
            state = {"sigma": sigma, "finalized": finalized != 0, "max_delay": int(saved)}
        # else the dict of state_dicts saved before 2026-12-06 (with or without max_delay)
        # positions are steps in [0, max_delay - 1]: a state saved with another max_delay would
        # load into position's unchanged shape and be clamped silently (a state from before
        # max_delay was saved has no key and loads as before)
        saved = state.get("max_delay", self.max_delay)
        if saved != self.max_delay:
            raise ValueError(f"this state_dict was saved from a DelayedLinear with max_delay = "
                             f"{saved}, this layer has max_delay = {self.max_delay}; build the "
                             f"layer with max_delay={saved} to load it")
        was_finalized = self.finalized
        self.finalized = bool(state["finalized"])  # before sigma: a rounded layer takes only 0
        self.sigma = float(state["sigma"])
        if self.finalized:  # frozen, as round_delays() leaves them (.grad cleared too: a
            # zeroed, not cleared, gradient let Adam's momentum move the loaded integer delays)
            self.position.grad = None
            self.position.requires_grad_(False)
        elif was_finalized:  # a training state loaded into a rounded layer: the positions learn
            self.position.requires_grad_(True)  # again (as reset_parameters() does); positions
            # the user froze on an unrounded layer stay frozen

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"max_delay={self.max_delay}, bias={self.bias is not None}, sigma={self.sigma:g}"
                f"{', finalized' if self.finalized else ''}")
