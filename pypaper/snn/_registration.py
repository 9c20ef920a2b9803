"""Fake (meta) kernels and autograd of the LIF ops, registered once at import.

Fake kernels give shapes and dtypes without computing, so the ops trace under
torch.compile(fullgraph=True); the autograd backward is itself an op (lif_backward), so the
backward compiles too. What autograd keeps for the backward: h_seq (H[t], one value per
neuron-step in x's dtype), the two parameter tensors (one value or one per feature), and v_init
only when the decay needs its gradient (its step-0 term dH/dk reads V[-1]). On the CPU the forward
runs without keep_h and writes no h_seq at all: autograd keeps x (and v_init) instead, and the
backward reruns the forward from them (lif_backward with the recompute flag).

The ops take their bools as one int, ``flags`` (pypaper/snn/op_flags.py).
"""
from __future__ import annotations

import torch

from .. import _autograd
from . import jvp_rule, op_flags, second_order, vmap_rule


def _fake_lif_forward(x, v_init, decay, v_threshold, v_reset, surrogate, alpha, flags):
    torch._check(x.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16),
                 lambda: f"x must be a floating tensor, got {x.dtype}")
    torch._check(x.dim() >= 2, lambda: "x must have shape [T, N, *]")
    spikes = torch.empty_like(x, memory_format=torch.contiguous_format)
    h_seq = (torch.empty_like(x, memory_format=torch.contiguous_format)
             if flags & op_flags.KEEP_H else x.new_empty((0,)))
    v_last = x.new_empty(x.shape[1:])
    v_seq = (torch.empty_like(x, memory_format=torch.contiguous_format)
             if flags & op_flags.STORE_V_SEQ else x.new_empty((0,)))
    return spikes, v_last, h_seq, v_seq


def _fake_lif_backward(grad_spikes, grad_v_last, grad_v_seq, h_seq, v_init, decay, v_threshold,
                       v_reset, surrogate, alpha, flags):
    torch._check(grad_spikes.shape == h_seq.shape, lambda: "grad_spikes must match h_seq")
    return (torch.empty_like(h_seq, memory_format=torch.contiguous_format),
            h_seq.new_empty(h_seq.shape[1:]),
            torch.empty_like(decay, memory_format=torch.contiguous_format),
            torch.empty_like(v_threshold, memory_format=torch.contiguous_format))


def _lif_setup(ctx, inputs, output, also_saved=()):
    """What autograd keeps of a lif_forward call (see the module doc); ``also_saved``: tensors
    saved after those (tensor_alpha.py's alpha)."""
    x, v_init, decay, v_threshold, v_reset, surrogate, alpha, flags = inputs
    ctx.scalars = (v_reset, surrogate, alpha)
    ctx.dynamics = flags & op_flags.DYNAMICS
    ctx.keep_h = bool(flags & op_flags.KEEP_H)
    ctx.store_v_seq = bool(flags & op_flags.STORE_V_SEQ)
    ctx.num_inputs = len(inputs)
    _, _, h_seq, _ = output
    ctx.mark_non_differentiable(h_seq)
    # Outputs nobody differentiated (h_seq always; v_last and v_seq mostly) reach the backward as
    # None instead of zero tensors: materialising them cost a [T, N] zero fill per backward, as
    # much memory traffic as a quarter of the kernel's (T = 32, 2^18 neurons: 5.4 -> ~3 ms).
    ctx.set_materialize_grads(False)
    need_decay = ctx.needs_input_grad[2]
    # A CPU forward that kept no H: the backward reruns the forward from x (and v_init), chunk by
    # chunk in cache, instead of reading a stored H (lif_backward's recompute flag): x is kept in
    # H's place, so the bytes kept are the same, and 4 fewer bytes per neuron-step are moved.
    ctx.recompute = not ctx.keep_h and x.device.type == "cpu"
    keep_v = (need_decay or ctx.recompute) and v_init is not None
    ctx.keep_v = keep_v
    ctx.save_for_backward(x if ctx.recompute else h_seq, decay, v_threshold,
                          *((v_init,) if keep_v else ()), *also_saved)
    # a backward that reads the kept H cannot be differentiated along x's and v_init's paths
    # through H: the tie by which second_order.guard_kept_h refuses it (no storage kept)
    ctx.tied = None if ctx.recompute else second_order.kept_h_anchor(x, v_init)


def call_op(op, args, through_autograd: bool):
    """op(*args); without through_autograd the call skips the Autograd key, as torch.library's
    own no-grad path does, without its Python redispatch (~15 us a call, ~70 us when another
    layer's data fills the caches). Only where no graph is built over the call, and not while
    tracing (torch.compile sees the op with its autograd)."""
    if through_autograd or torch.compiler.is_compiling():
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():  # the private guard torch.library uses
        return op(*args)


def backward_tensors(ctx, g_spikes, g_v_last, g_v_seq):
    """The tensor arguments of the backward op for a forward _lif_setup saw, (grad_spikes,
    grad_v_last, grad_v_seq, h_seq (x when ctx.recompute), v_init, decay, v_threshold), and its
    flags: the forward's dynamics, the parameter gradients asked for, recompute."""
    if not ctx.keep_h and not ctx.recompute:
        raise RuntimeError("pypaper::lif_forward ran without the keep_h flag, which keeps no "
                           "H for the backward (only the CPU backward can rerun the forward "
                           "instead): set op_flags.KEEP_H to differentiate it")
    try:
        saved = ctx.saved_tensors
    except RuntimeError as e:
        if "second time" not in str(e):
            raise
        # The commonest way here (SpikingJelly's users know it): a neuron's membrane carried from
        # the previous batch, whose backward has freed this call's graph, into the next batch's
        # forward - no reset_net between batches of the same size. torch's message names neither
        # the state nor the fix (SpikingJelly's neither).
        raise RuntimeError(
            f"{e}\npypaper.snn: this is a LIF neuron's call whose graph a backward has freed. "
            f"If a neuron's membrane carried over from an earlier batch into this forward, call "
            f"pypaper.snn.functional.reset_net(model) after each batch (or functional.detach_net"
            f"(model) to keep the state without its graph: truncated BPTT); if the same loss is "
            f"backpropagated twice, pass retain_graph=True to the first backward.") from None
    h_seq, decay, v_threshold = saved[:3]  # h_seq holds x when ctx.recompute
    v_init = saved[3] if ctx.keep_v else None
    need_decay, need_vth = ctx.needs_input_grad[2:4]
    if g_spikes is None:
        g_spikes = torch.zeros_like(h_seq)
    g_v_seq = g_v_seq.contiguous() if (ctx.store_v_seq and g_v_seq is not None) else None
    g_v_last = g_v_last.contiguous() if g_v_last is not None else None
    flags = (ctx.dynamics | (op_flags.NEED_DECAY_GRAD if need_decay else 0)
             | (op_flags.NEED_THRESHOLD_GRAD if need_vth else 0)
             | (op_flags.RECOMPUTE if ctx.recompute else 0))
    return (g_spikes.contiguous(), g_v_last, g_v_seq, h_seq, v_init, decay, v_threshold), flags


def _make_lif_backward(backward_op):
    def backward(ctx, g_spikes, g_v_last, g_h, g_v_seq):
        tensors, flags = backward_tensors(ctx, g_spikes, g_v_last, g_v_seq)
        g_spikes, g_v_last, g_v_seq, h_seq, v_init, decay, v_threshold = tensors
        need_x, need_v, need_decay, need_vth = ctx.needs_input_grad[:4]
        args = (*tensors, *ctx.scalars, flags)
        # create_graph=True builds a graph over this backward, and forward-mode tangents reach
        # it under forward-over-reverse: then through the backward op's autograd, whose
        # derivatives are pypaper/snn/second_order.py's.
        through = torch.is_grad_enabled() or (_autograd.forward_ad_active()
                                              and _autograd.has_tangent(args[:7]))
        if not ctx.recompute and _autograd.forward_ad_active() and (
                _autograd.jvp_ran(ctx) or second_order.jvp_transform_active()):
            # forward-over-reverse (hessian, dual tensors over a backward): the tangents of x's
            # paths through the kept H cannot be had. Under torch.func's jvp levels whether x
            # carries one cannot be read, so any refuses there.
            second_order.refuse_kept_h(0, backward_op.name())
        if (ctx.recompute and torch.is_grad_enabled() and not torch.compiler.is_compiling()
                and not getattr(ctx, "under_functorch", False)
                and torch._C._functorch.peek_interpreter_stack() is None
                and not _autograd.forward_ad_active()):
            # eager create_graph=True (MAML, gradient penalties, HVPs): the gradient with its
            # graph, so the double backward is plain autograd (second_order.backward_with_graph)
            grads = second_order.backward_with_graph(
                (g_spikes, g_v_last, g_v_seq), h_seq, v_init, decay, v_threshold, ctx.scalars,
                ctx.dynamics, (need_x, need_v, need_decay, need_vth))
            return grads + (None,) * (ctx.num_inputs - 4)
        gx, gv, gd, gt = call_op(backward_op, args, through)
        grads = (gx if need_x else None, gv if need_v else None, gd if need_decay else None,
                 gt if need_vth else None)
        if through and not ctx.recompute and torch.is_grad_enabled():
            grads = second_order.guard_kept_h(grads, backward_op.name(), ctx.tied)
        return grads + (None,) * (ctx.num_inputs - 4)

    return backward


def _eager_function(op, backward_op):
    """A torch.autograd.Function with the same forward, saved tensors and backward as the op's
    registered autograd (_lif_setup, _make_lif_backward), for eager calls that build a graph.
    Through the Autograd key a call pays torch.library's Python wrapper (argument defaults filled
    per call, a redispatch, its own Function): T = 1, 16 neurons, on the Zen 4 guest 80 us forward
    and 196 us forward + backward against 20 us without grad. A training loop in SpikingJelly's
    default step_mode 's' pays that once per layer per time step."""
    backward = _make_lif_backward(backward_op)

    # forward(ctx, ...) rather than a setup_context: with one, every apply binds its arguments
    # to forward's signature through inspect (~30 us).
    class LifMultiStep(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            output = call_op(op, args, False)
            _lif_setup(ctx, args, output)
            return output

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    return LifMultiStep


_EAGER: dict = {}
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def call_with_grad(op, backward_op, args):
    """op(*args) building the autograd graph: through _eager_function's Function when nothing
    can tell the difference (no torch.compile / export / jit.trace, no dispatch mode such as
    FakeTensorMode or make_fx's, no functorch transform, plain tensors; ops.lif_multi_step has
    refused dual tensors already), else through the op's Autograd key."""
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() != 0
            or torch._C._get_tracing_state() is not None
            or torch._C._functorch.peek_interpreter_stack() is not None
            or any(a is not None and type(a) not in _PLAIN for a in args[:4])):
        return op(*args)
    fn = _EAGER.get(op)
    if fn is None:
        fn = _EAGER[op] = _eager_function(op, backward_op)
    return fn.apply(*args)


def register_native() -> None:
    """Fake kernels and autograd of the C++ (and, when built, CUDA) LIF ops."""
    torch.library.register_fake("pypaper::lif_forward")(_fake_lif_forward)
    torch.library.register_fake("pypaper::lif_backward")(_fake_lif_backward)
    _autograd.register_autograd("pypaper::lif_forward",
                                _make_lif_backward(torch.ops.pypaper.lif_backward.default),
                                setup_context=_lif_setup)
    second_order.register()
    vmap_rule.register()
    jvp_rule.register_native()
    jvp_rule.register()


# ---- the carried membrane's copy (neuron.BaseNode._run, traced) -------------------------------

@torch.library.custom_op("pypaper::membrane_copy", mutates_args=())
def membrane_copy(v: torch.Tensor) -> torch.Tensor:
    """A copy of the carried membrane ``v`` (v's values forward, the identity backward), made
    where a compiled call may receive the membrane a call under torch.inference_mode left: an
    inference tensor, which autograd refuses to save ("Inference tensors cannot be saved for
    backward"), and the CPU LIF op saves its v_init (its backward reruns the forward from it).
    The copy is a normal tensor the op can save. It is an op of its own because a traced
    ``v.clone()`` does not survive the compiler: inductor's min-cut partitioner counts a clone
    as free to recompute and saves the graph input v for the backward in its place, which is the
    inference tensor again (the default backend failed where aot_eager ran). An opaque op is
    never recomputed in the backward: its output is what is saved."""
    return v.clone()


@membrane_copy.register_fake
def _(v):
    return torch.empty_like(v)


def _membrane_copy_backward(ctx, grad):
    return grad  # d(copy of v)/dv = 1


_autograd.register_autograd("pypaper::membrane_copy", _membrane_copy_backward)


_triton_module = None


def load_triton():
    """Imports pypaper/snn/triton_kernels.py once (a later addition: it defines the triton_ops
    lif_forward_triton / lif_backward_triton and triton_available(device)) and registers their
    autograd with the same backward formula; returns the module."""
    global _triton_module
    if _triton_module is None:
        from . import triton_kernels  # noqa: F401  (absent until the Triton twin lands)

        if getattr(triton_kernels, "HAVE_TRITON", False):
            _autograd.register_autograd(
                "pypaper::lif_forward_triton",
                _make_lif_backward(torch.ops.pypaper.lif_backward_triton.default),
                setup_context=_lif_setup)
            second_order.register("_triton")
            vmap_rule.register("_triton")
            jvp_rule.register("_triton")
            jvp_rule.register_triton()
        _triton_module = triton_kernels
    return _triton_module
