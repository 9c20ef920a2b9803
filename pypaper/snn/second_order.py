"""Second-order AD of the fused LIF op: the backward op (lif_backward) differentiated again.

Double backward (``torch.autograd.grad(..., create_graph=True)`` then a backward through the
gradient: gradient penalties, MAML's meta-gradient, Hessian-vector products as HAWQ takes them)
and forward-over-reverse (``torch.func.hessian`` = jacfwd(jacrev), jvp of a vjp) both need the
derivatives of lif_backward. lif_backward computes, for fixed dynamics (the flags, v_reset, the
surrogate),

    B(gS, gVlast, gVseq, X, V0, decay, Vth) = J(X, V0, decay, Vth)^T (gS, gVlast, gVseq)

the vjp of the LIF forward F(X, V0, decay, Vth) = (S, V[T-1], V[0..T-1]) with the surrogate
derivative sigma'(H - Vth) standing for dS/dH (pypaper/snn/reference.py). B is linear in the
output gradients and nonlinear in X, V0 and the parameters: its derivatives carry sigma'' (the
derivative of the surrogate's derivative, as SpikingJelly's surrogate Functions give under
create_graph, whose backward is written in differentiable torch ops) and the reset's products
S * H. They are computed here as derivatives of the reference's vjp, in torch ops with
torch.func (vjp of B for the double backward; for the jvp, hessian's, the transpose of that
vjp): T steps of [N] tensors,
the reference's speed. Only the first derivative has a fused kernel; a second one is asked for
in meta-learning and curvature estimates, rarely per training step.

The derivative with respect to X exists only where the backward reads X: on the CPU, whose
backward reruns the forward from the kept x (lif_backward's RECOMPUTE flag). A GPU backward reads
the kept H[t], an output of the forward that carries no graph back to x, so a second derivative
through it would silently miss every path through H: it raises instead (NotImplementedError
naming the remedy: the CPU, or ``pypaper.use_backend("reference")``).
"""
from __future__ import annotations

import torch
from torch._functorch import pyfunctorch as _pyfunctorch

from .. import _autograd
from . import op_flags, reference

# lif_backward's arguments: the tensors it is differentiable in, then the constants.
# (grad_spikes, grad_v_last, grad_v_seq, h_seq, v_init, decay, v_threshold) /
# (v_reset, surrogate, alpha, flags)
_NUM_TENSORS = 7


def refuse_kept_h(flags: int, qualname: str) -> None:
    """Raises NotImplementedError where lif_backward read the kept H[t] (no RECOMPUTE flag)."""
    if not flags & op_flags.RECOMPUTE:
        raise NotImplementedError(
            f"{qualname} read the kept H[t] (the GPU backward), which carries no graph back to x: "
            f"a second derivative through it (create_graph=True then backward, torch.func.hessian, "
            f"forward-mode AD over a backward) would miss every path through H. Run the LIF layer "
            f"on the CPU (its backward reruns the forward from x) or under "
            f"pypaper.use_backend('reference') for second derivatives")


class KeptHGuard(torch.autograd.Function):
    """Identity on the gradients a kept-H backward returned under create_graph: differentiating
    through them raises (refuse_kept_h) even where no input of lif_backward requires grad (then
    autograd would not reach lif_backward's own double backward, and the paths through H would
    be dropped without a word: the gradient of x alone has no graph at all).

    ``tied`` (kept_h_anchor, made by the forward) joins the guard to the graphs of x and v_init,
    the inputs whose paths through H the kept-H backward loses. Without it autograd saw no path
    from the guarded gradients to x: torch.autograd.grad(penalty, x) said x was unused (and with
    allow_unused=True gave None), autograd.grad(meta_loss, [W]) for a W before the neuron
    skipped the guard and left out the terms through H, and under torch.func's grad over grad
    (jacrev(jacrev(f)), grad(grad(f)): its levels track x, not this leaf) the second derivative
    in x came out zero - all without an error."""

    generate_vmap_rule = True

    @staticmethod
    def forward(qualname, anchor, num_tied, *tied_and_grads):
        return tuple(g.view_as(g) for g in tied_and_grads[num_tied:])

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.qualname = inputs[0]

    @staticmethod
    def backward(ctx, *grads):
        refuse_kept_h(0, ctx.qualname)

    @staticmethod
    def jvp(ctx, *tangents):
        refuse_kept_h(0, ctx.qualname)


def jvp_transform_active() -> bool:
    """Whether a torch.func jvp level (jvp, jacfwd, hessian) is on the transform stack."""
    return any(i.key() == _pyfunctorch.TransformType.Jvp
               for i in _pyfunctorch.retrieve_all_functorch_interpreters())


def kept_h_anchor(x: torch.Tensor, v_init):
    """Empty tensors that autograd (and every torch.func level) ties to x and v_init: a copy of
    a 0-size slice of each. Their backward keeps sizes only (no storage of x's), and making
    them launches no kernel (a copy of nothing). A forward that keeps H makes them for
    guard_kept_h: the paths from x and v_init through H[t] are what its backward cannot
    differentiate, and without a tie to them autograd may never reach the guard. None while
    torch.compile traces (a compiled graph is not differentiated twice: torch refuses)."""
    if torch.compiler.is_compiling():
        return None
    with torch.enable_grad():  # a Function's forward (and setup_context) runs without grad
        return tuple(t.narrow(0, 0, 0).clone() for t in (x, v_init) if t is not None)


def guard_kept_h(grads, qualname: str, tied=None):
    """grads (a tuple with Nones) through KeptHGuard; ``tied``: the call's kept_h_anchor."""
    present = [g for g in grads if g is not None]
    # the anchor requires grad, so the guarded gradients do (and reach the guard's backward)
    # even where nothing they were computed from does (only a parameter requires grad); tied
    # puts the guard on every path from x and v_init, through which their dependence went (H)
    anchor = torch.zeros((), device=present[0].device, requires_grad=True) if present else None
    tied = tuple(tied or ())
    guarded = iter(KeptHGuard.apply(qualname, anchor, len(tied), *tied, *present)
                   if present else ())
    return tuple(None if g is None else next(guarded) for g in grads)


def _first_order(constants):
    """B as a function of its 7 tensor arguments (None where the call had none), in torch ops:
    the vjp of the reference LIF loop. Returns (gx, gv_init, gdecay, gthreshold), each shaped
    and typed as lif_backward's outputs."""
    v_reset, sid, alpha, flags = constants
    decay_input = bool(flags & op_flags.DECAY_INPUT)
    decay_is_tau = bool(flags & op_flags.DECAY_IS_TAU)
    detach_reset = bool(flags & op_flags.DETACH_RESET)
    sltt = bool(flags & op_flags.SLTT)

    def backward(g_spikes, g_v_last, g_v_seq, x, v_init, decay, vth):
        store_v_seq = g_v_seq is not None
        if v_init is None:  # at rest: Vr (0 for a soft reset), a constant of the call
            v_init = torch.full(x.shape[1:], 0.0 if v_reset is None else v_reset,
                                dtype=x.dtype, device=x.device)

        def forward(x, v_init, decay, vth):
            s, v_last, v_seq = reference.lif_multi_step(
                x, v_init, decay, vth, v_reset, sid, alpha, decay_input, decay_is_tau,
                detach_reset, sltt, store_v_seq)
            return (s, v_last) + ((v_seq,) if store_v_seq else ())

        outputs, pull = torch.func.vjp(forward, x, v_init, decay, vth)
        cotangents = (g_spikes, torch.zeros_like(outputs[1]) if g_v_last is None else g_v_last)
        if store_v_seq:
            cotangents += (g_v_seq,)
        return pull(cotangents)

    return backward


def backward_with_graph(grads_out, x, v_init, decay, vth, scalars, dynamics, needs):
    """The LIF op's backward under eager create_graph=True (CPU, where x was kept): autograd of
    the reference loop rerun from x, with the graph built, so the double backward is plain
    autograd over torch ops (SpikingJelly's cost; through lif_backward's own rule it was ~3x
    that: torch.func nests a vjp in a vjp). grads_out: (grad_spikes, grad_v_last or None,
    grad_v_seq or None); needs: which of (x, v_init, decay, vth) want a gradient."""
    v_reset, sid, alpha = scalars
    g_spikes, g_v_last, g_v_seq = grads_out
    with torch.enable_grad():
        s, v_last, v_seq = reference.lif_multi_step(
            x, v_init, decay, vth, v_reset, sid, alpha, bool(dynamics & op_flags.DECAY_INPUT),
            bool(dynamics & op_flags.DECAY_IS_TAU), bool(dynamics & op_flags.DETACH_RESET),
            bool(dynamics & op_flags.SLTT), g_v_seq is not None)
        pairs = [(s, g_spikes), (v_last, g_v_last), (v_seq, g_v_seq)]
        # an output without a graph (T = 0: v_last is the constant initial state when v_init
        # is none) has no gradient to pass on; autograd.grad refuses it
        pairs = [(o, g) for o, g in pairs if g is not None and o.requires_grad]
        wanted = [t for t, need in zip((x, v_init, decay, vth), needs) if need]
        if pairs:
            grads = iter(torch.autograd.grad([o for o, _ in pairs], wanted,
                                             [g for _, g in pairs], create_graph=True,
                                             allow_unused=True, materialize_grads=True))
        else:
            grads = iter([torch.zeros_like(t) for t in wanted])
    return tuple(next(grads) if need else None for need in needs)


def _split(inputs):
    tensors, constants = tuple(inputs[:_NUM_TENSORS]), tuple(inputs[_NUM_TENSORS:])
    present = [i for i, t in enumerate(tensors) if t is not None]
    return tensors, constants, present


def _bind(tensors, present, backward):
    """backward as a function of the present tensors only (torch.func takes no None)."""
    def fn(*values):
        full = list(tensors)
        for i, v in zip(present, values):
            full[i] = v
        return backward(*full)

    return fn


def _setup(ctx, inputs, output):
    tensors, constants, present = _split(inputs)
    ctx.constants, ctx.present = constants, present
    ctx.save_for_backward(*[tensors[i] for i in present])


def _make_double_backward(qualname: str):
    def double_backward(ctx, *grads):
        """d/d(inputs) of <grads, B(inputs)>: the vjp of B at the call's inputs."""
        flags = ctx.constants[-1]
        if not any(g is not None for g in grads):
            return (None,) * (_NUM_TENSORS + len(ctx.constants))
        refuse_kept_h(flags, qualname)
        present = ctx.present
        values = ctx.saved_tensors
        tensors = [None] * _NUM_TENSORS
        for i, v in zip(present, values):
            tensors[i] = v
        fn = _bind(tensors, present, _first_order(ctx.constants))
        outputs, pull = torch.func.vjp(fn, *values)
        cotangents = tuple(torch.zeros_like(o) if g is None else g.to(o.dtype)
                           for o, g in zip(outputs, grads))
        pulled = pull(cotangents)
        result = [None] * (_NUM_TENSORS + len(ctx.constants))
        needs = ctx.needs_input_grad
        for i, g in zip(present, pulled):
            if needs[i]:
                result[i] = g
        return tuple(result)

    return double_backward


def _make_jvp(qualname: str):
    def backward_jvp(inputs, tangents):
        """register_jvp rule of lif_backward: J_B(inputs) . tangents. By reverse mode only (the
        transpose of B's vjp: J_B t = d/du <J_B^T u, t>, linear in u, taken at u = 0), because
        an eager forward-AD level (torch.autograd.forward_ad, where this rule runs for dual
        tensors) cannot open a nested one for torch.func.jvp."""
        tensors, constants, present = _split(inputs)
        refuse_kept_h(constants[-1], qualname)
        fn = _bind(tensors, present, _first_order(constants))
        primals = tuple(tensors[i] for i in present)
        tans = tuple(torch.zeros_like(tensors[i]) if tangents[i] is None else tangents[i]
                     for i in present)
        outputs, pull = torch.func.vjp(fn, *primals)
        _, transpose = torch.func.vjp(pull, tuple(torch.zeros_like(o) for o in outputs))
        (out,) = transpose(tans)
        return tuple(out)

    return backward_jvp


def register(suffix: str = "") -> None:
    """Double backward and jvp of pypaper::lif_backward{suffix} (the C++/CUDA op, or the Triton
    twin with suffix "_triton")."""
    qualname = f"pypaper::lif_backward{suffix}"
    _autograd.register_autograd(qualname, _make_double_backward(qualname), setup_context=_setup)
    _autograd.register_jvp(qualname, _make_jvp(qualname))
