"""Plain-PyTorch reference of the LIF neuron: the semantics every kernel must reproduce.

Math (kernels/common/snn_math.h has the same formulas, once, for the C++ and CUDA kernels):

    charge   decay_input:  H = V + (X - (V - Vr)) / tau      (or * k, k = 1/tau: PLIF's sigmoid(w))
             otherwise:    H = V - (V - Vr) / tau + X
    fire     S = Theta(H - Vth)   (1 where H - Vth >= 0; backward: the surrogate derivative)
    reset    hard:  V = S * Vr + (1 - S) * H          soft (v_reset None, Vr = 0):  V = H - S * Vth

in SpikingJelly's operation order, so fp32 results match its LIFNode / ParametricLIFNode to the bit.
The loop runs in fp32 for fp32/bf16/fp16 inputs (fp64 for fp64), like the kernels; ``math_dtype``
overrides it (the tests use bf16 math as the plain-PyTorch-in-that-dtype baseline).

Gradients come from autograd through this loop, with the surrogate derivative at the spike.
``detach_reset`` detaches S in the reset term. ``sltt`` (Meng et al., ICCV 2023, "Towards Memory-
and Time-Efficient Backpropagation for Training Spiking Neural Networks") charges from V.detach():
every temporal gradient path - leak and reset, which reach the loss only through V[t-1] -> H[t] -
is dropped, leaving dL/dH[t] = dL/dS[t] * sigma'(H[t] - Vth) (+ the gradient of V[t] when V is
itself an output).
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch

# Surrogate ids shared with kernels/common/snn_math.h (SpikingJelly's ids 0..6, Rect 7).
SURROGATE_IDS = {
    "Sigmoid": 0,
    "ATan": 1,
    "PiecewiseQuadratic": 2,
    "PiecewiseExp": 3,
    "SoftSign": 4,
    "SuperSpike": 5,
    "Erf": 6,
    "Rect": 7,
}


def traced_without_transforms() -> bool:
    """torch.compile is tracing, and no torch.func transform (grad, vmap, ...) nor forward-mode
    AD level is open around the call: where a tensor alpha stays a tensor in the graph and the
    spike Function runs without its jvp (dynamo refuses a Function with one). Under a transform
    or dual tensors the calls keep their eager form (a graph break, dynamo runs them eagerly):
    traced, the functorch wrappers reach the ops' storage, which they cannot give.
    (maybe_current_level, not peek_interpreter_stack: dynamo answers "is None" about the latter's
    result with False even outside every transform.)"""
    return (torch.compiler.is_compiling() and torch._C._functorch.maybe_current_level() is None
            and torch.autograd.forward_ad._current_level < 0)


def surrogate_grad(x: torch.Tensor, surrogate_id: int, alpha: float) -> torch.Tensor:
    """sigma'(x) of surrogate ``surrogate_id`` (SpikingJelly's formulas). alpha: a number, or
    while torch.compile traces a tensor alpha, a 0-d float64 tensor (surrogate.alpha_operand):
    the constants made of it are then float64 like a number's, and the result takes x's dtype."""
    if isinstance(alpha, torch.Tensor):
        # a 0-d x would promote to float64 with the 0-d alpha: computed as one element, in x's
        # dtype with the constants rounded once, as with a number
        return _surrogate_grad(x.reshape(1), surrogate_id, alpha).reshape(()) if x.dim() == 0 \
            else _surrogate_grad(x, surrogate_id, alpha)
    return _surrogate_grad(x, surrogate_id, float(alpha))


def _surrogate_grad(x: torch.Tensor, surrogate_id: int, a) -> torch.Tensor:
    # pi and sqrt(pi) are written as literals, not math.pi: under torch.compile(dynamic=True) a
    # float read from a module (math.pi) can be traced as a graph input, which dynamo cannot lift
    # into the backward of an autograd.Function ("lift_tracked_freevar_to_input should not be
    # called on root SubgraphTracer"; fullgraph failed once a neuron's float changed)
    if surrogate_id == 0:  # Sigmoid: a s (1 - s), s = sigmoid(a x)
        s = torch.sigmoid(x * a)
        return (1.0 - s) * s * a
    if surrogate_id == 1:  # ATan: (a/2) / (1 + (pi/2 a x)^2)
        z = x * (a * 1.5707963267948966)  # pi/2 (a literal: see _surrogate_grad's note)
        return (a / 2) / (1 + z * z)
    if surrogate_id == 2:  # PiecewiseQuadratic: a - a^2 |x| inside |x| <= 1/a
        ax = x.abs()
        return torch.where(ax > 1.0 / a, torch.zeros_like(x), a - a * a * ax)
    if surrogate_id == 3:  # PiecewiseExp: (a/2) exp(-a |x|)
        return a / 2 * torch.exp(-a * x.abs())
    if surrogate_id == 4:  # SoftSign: 1 / (2 a (1/a + |x|)^2)
        z = 1.0 / a + x.abs()
        return 1.0 / (2 * a * (z * z))
    if surrogate_id == 5:  # SuperSpike: a / (1 + |x|)^2
        z = x.abs() + 1.0
        return a / (z * z)
    if surrogate_id == 6:  # Erf: a / sqrt(pi) exp(-(a x)^2)
        z = x * a
        return torch.exp(-(z * z)) * (a / 1.7724538509055159)  # sqrt(pi)
    if surrogate_id == 7:  # Rect: a [|x| < 1/(2a)]
        return (x.abs() < 0.5 / a).to(x.dtype) * a
    raise ValueError(f"surrogate id must be in 0..7, got {surrogate_id}")


def surrogate_primitive(x: torch.Tensor, surrogate_id: int, alpha: float) -> torch.Tensor:
    """sigma(x), the smooth function whose derivative the backward uses (spiking=False). A
    tensor alpha stays one (an nn.Parameter alpha gets its gradient here, as in SpikingJelly)."""
    a = alpha if isinstance(alpha, torch.Tensor) else float(alpha)
    if surrogate_id == 0:
        return torch.sigmoid(x * a)
    if surrogate_id == 1:
        return torch.atan(x * (1.5707963267948966 * a)) / 3.141592653589793 + 0.5  # pi/2, pi
    if surrogate_id == 2:
        ax = x.abs()
        inner = -(a * a) / 2 * x * x * torch.sign(x) + a * x + 0.5
        return torch.where(ax > 1.0 / a, (x > 0).to(x.dtype), inner)
    if surrogate_id == 3:
        pos = (x >= 0).to(x.dtype)
        sign = pos * 2 - 1
        return pos - torch.exp(sign * x * -a) / 2 * sign
    if surrogate_id == 4:
        return (torch.nn.functional.softsign(x * a) + 1) / 2
    if surrogate_id == 5:
        raise NotImplementedError("SuperSpike has no primitive function (use spiking=True)")
    if surrogate_id == 6:
        return torch.special.erfc(-a * x) / 2
    if surrogate_id == 7:
        return torch.clamp(a * x + 0.5, 0.0, 1.0)
    raise ValueError(f"surrogate id must be in 0..7, got {surrogate_id}")


def _saved_derivative(ctx) -> torch.Tensor:
    x, *alpha = ctx.saved_tensors
    return surrogate_grad(x, ctx.surrogate_id, alpha[0] if alpha else ctx.alpha)


class _Spike(torch.autograd.Function):
    """S = Theta(x) (1 where x >= 0) forward, grad * sigma'(x) backward. Without forward mode:
    what torch.compile traces (dynamo refuses a Function with a jvp: fullgraph failed on it)."""

    generate_vmap_rule = True  # torch.func.vmap over it (per-sample gradients)

    @staticmethod
    def forward(x, surrogate_id, alpha):
        return (x >= 0).to(x.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, surrogate_id, alpha = inputs
        # a tensor alpha (torch.compile tracing one: surrogate.alpha_operand) is saved with x
        kept = (x, alpha) if isinstance(alpha, torch.Tensor) else (x,)
        ctx.save_for_backward(*kept)
        ctx.save_for_forward(*kept)
        ctx.surrogate_id = surrogate_id
        ctx.alpha = None if isinstance(alpha, torch.Tensor) else alpha

    @staticmethod
    def backward(ctx, grad):
        return grad * _saved_derivative(ctx), None, None


class SpikeFunction(_Spike):
    """_Spike with forward mode (torch.func.jvp, jacfwd, dual tensors): what eager calls run."""

    @staticmethod
    def jvp(ctx, x_tangent, _surrogate_id, _alpha):
        """Forward mode: the same surrogate Jacobian, dS = sigma'(x) dx. Under a torch.func jvp
        nested in another that tracks x (jacfwd(jacfwd(f)), jvp of a jvp) torch takes this
        tangent as a constant at the outer level (pytorch#197867): sigma'' would come out 0
        without a word, so that is refused as the fused ops refuse it (hessian, jacrev over
        jacfwd and jacrev over jacrev differentiate this rule's ops and are right)."""
        level = torch._C._functorch.maybe_current_level()
        if level is not None:
            from .._autograd import refuse_nested_forward

            refuse_nested_forward("the surrogate spike function (reference backend, or a "
                                  "surrogate module called on a tensor)",
                                  (ctx.saved_tensors[0], x_tangent), level)
        return x_tangent * _saved_derivative(ctx)


@functools.cache
def _spike_outside_the_graph():
    """SpikeFunction.apply run eagerly from a compiled region: traced, its jvp is lost without a
    word (dual tensors came out with no tangent: pytorch#187284, #192985), so dynamo breaks the
    graph there and the tangent is computed as in eager. Made on first use: torch.compiler.disable
    at import would load torch._dynamo (and Triton) with pypaper."""
    return torch.compiler.disable(SpikeFunction.apply)


def spike(x: torch.Tensor, surrogate_id: int, alpha: float) -> torch.Tensor:
    """Heaviside forward with the surrogate derivative backward (and forward mode, except in
    the graphs torch.compile builds without it)."""
    if not torch.compiler.is_compiling():
        spikes = SpikeFunction.apply(x, surrogate_id, alpha)
    elif traced_without_transforms():
        spikes = _Spike.apply(x, surrogate_id, alpha)
    else:  # compiling with forward-mode AD or a torch.func transform open
        spikes = _spike_outside_the_graph()(x, surrogate_id, alpha)
    if isinstance(alpha, torch.Tensor):
        # The traced alpha (tensor_alpha.checked_alpha's checked copy) is read by the backward
        # only, and the compiler moves what only the backward needs into the backward graph:
        # the check would run only when differentiated, and on alpha annealed after the
        # forward. Tied to the spikes (times alpha > 0, which the check makes 1), it stays in
        # the forward and its copy is what the backward keeps.
        spikes = spikes * (alpha > 0)
    return spikes


def default_math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def one_value(p: torch.Tensor) -> torch.Tensor:
    """A parameter of one element as shape (): the ops take one value in any shape of numel 1
    (lif_multi_step's per-sample path passes a [1, 1, 1] tau with x flattened to [T, 1, M]); kept
    as it is, its dims broadcast into the state and the outputs gained them ([T, 1, 1, M])."""
    return p.reshape(()) if p.dim() > 0 and p.numel() == 1 else p


def lif_multi_step(x_seq: torch.Tensor, v_init: Optional[torch.Tensor], decay: torch.Tensor,
                   v_threshold: torch.Tensor, v_reset: Optional[float], surrogate_id: int,
                   alpha: float, decay_input: bool, decay_is_tau: bool, detach_reset: bool,
                   sltt: bool, store_v_seq: bool, math_dtype: Optional[torch.dtype] = None,
                   surrogate_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
    """The LIF time loop over x_seq [T, N, *]. Returns (spikes, v_last, v_seq or None) in x's dtype.

    ``decay``: tau (decay_is_tau) or k = 1/tau, shape () or x.shape[2:]; ``v_threshold`` likewise.
    ``surrogate_fn``: any callable spike function (e.g. a SpikingJelly surrogate object) used
    instead of (surrogate_id, alpha).
    """
    dt = math_dtype or default_math_dtype(x_seq.dtype)
    x = x_seq.to(dt)
    decay = one_value(decay).to(dt)
    vth = one_value(v_threshold).to(dt)
    hard = v_reset is not None
    vr = float(v_reset) if hard else 0.0
    v = v_init.to(dt) if v_init is not None else torch.full(x.shape[1:], vr, dtype=dt,
                                                            device=x.device)
    fire = surrogate_fn if surrogate_fn is not None else (lambda z: spike(z, surrogate_id, alpha))
    spikes, vs = [], []
    # unbind, not x[t]: the backward of T selects writes T zero-filled [T, N] gradients (O(T^2)
    # memory traffic: T = 32, 2^18 neurons, fwd + bwd 409 ms, double backward 1.07 s); unbind's
    # stacks the T step gradients once
    # Vr = 0 (the default, and every soft reset) skips the ops that add or multiply by it: the
    # same values (v - 0 is v; S * 0 + (1 - S) H is (1 - S) H but for the sign of a zero) and
    # fewer graph nodes, which a double backward differentiates again
    for xt in x.unbind(0):
        vp = v.detach() if sltt else v
        rel = vp - vr if vr != 0.0 else vp  # V - Vr
        if decay_input:
            d = xt - rel
            h = vp + (d / decay if decay_is_tau else d * decay)
        elif decay_is_tau:
            h = vp - rel / decay + xt
        else:
            # k = 0 is the IF neuron: V + X, which keeps an infinite V infinite (not inf * 0 =
            # NaN): rel is taken as 0 only there, where it is infinite and k = 0. Elsewhere the
            # formula stands, so dH/dk = -(V - Vr) reaches a k at 0 too, as the kernels give it
            # (a where around V + X gave k no gradient at k = 0)
            rel_k = torch.where(torch.isinf(rel) & (decay == 0), torch.zeros_like(rel), rel)
            h = vp - rel_k * decay + xt
        s = fire(h - vth)
        sr = s.detach() if detach_reset else s
        if hard:
            v = sr * vr + (1.0 - sr) * h if vr != 0.0 else (1.0 - sr) * h
        else:
            v = h - sr * vth
        spikes.append(s)
        if store_v_seq:
            vs.append(v)
    out_dtype = x_seq.dtype
    # T = 0: empty outputs, still attached to x_seq's graph
    s_seq = torch.stack(spikes).to(out_dtype) if spikes else x_seq * 0
    v_seq = None
    if store_v_seq:
        v_seq = torch.stack(vs).to(out_dtype) if vs else x_seq * 0
    # v_last never aliases v_init (T = 0): callers may keep and modify both.
    v_last = v.to(out_dtype) if x.shape[0] else v.to(out_dtype).clone()
    return s_seq, v_last, v_seq
