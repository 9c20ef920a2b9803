"""Fake kernels and autograd of the pypaper.local ops, registered once at import.

Fake kernels give shapes and dtypes, so the ops trace under torch.compile(fullgraph=True).

Autograd. The ops compute their parameter gradients in the forward (gradient-in-forward), so the
"backward" of the loss output only scales what the forward already produced:
  d loss / d weight = grad_weight, d loss / d bias = grad_bias (layer ops; the input x gets no
  gradient: the layer is trained by its local loss only, which is the point of local learning);
  local_head: d loss / d feat = grad_pooled / S broadcast over the S spatial positions.
What autograd keeps is therefore the op's own gradient outputs (parameter-sized, and [N, C] for
the head), never the layer's input or its activations; the backward's context also refers to the
weight and bias (parameters, alive anyway: not saved tensors, so an in-place update of them
between forward and backward stays allowed), which tie a second derivative to the graph so that
one is refused (_NoSecondDerivative). The backward uses aten ops only (a scalar multiply and an expand), so it compiles as
well.
"""
from __future__ import annotations

import math

import torch

from .. import _autograd

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _mdt(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_linear(x, weight, bias):
    torch._check(x.dtype in _FLOATS, lambda: f"x must be a float tensor, got {x.dtype}")
    torch._check(x.dim() == 2, lambda: "x must have shape [N, in_features]")
    torch._check(weight.dim() == 2, lambda: "weight must have shape [out, in]")
    torch._check(weight.shape[1] == x.shape[1], lambda: "weight and x disagree on in_features")
    torch._check(weight.dtype == x.dtype, lambda: "weight dtype must match x")
    if bias is not None:
        torch._check(bias.shape == (weight.shape[0],), lambda: "bias must have shape [out]")


def _grad_bias_like(weight, bias):
    m = weight.shape[0]
    return weight.new_empty((m,)) if bias is not None else weight.new_empty((0,))


def _fake_ff(x, weight, bias, num_pos, threshold, normalize, eps):
    _check_linear(x, weight, bias)
    n, m = x.shape[0], weight.shape[0]
    return (x.new_empty((n, m)), x.new_empty((), dtype=_mdt(x.dtype)),
            torch.empty_like(weight, memory_format=torch.contiguous_format),
            _grad_bias_like(weight, bias))


def _fake_ff_sf(x, class_x, weight, bias, y, normalize, eps, temperature):
    _check_linear(x, weight, bias)
    _check_linear(class_x, weight, bias)
    n, m, k = x.shape[0], weight.shape[0], class_x.shape[0]
    return (x.new_empty((n, m)), x.new_empty((k, m)), x.new_empty((), dtype=_mdt(x.dtype)),
            torch.empty_like(weight, memory_format=torch.contiguous_format),
            _grad_bias_like(weight, bias))


def _fake_tp(x, weight, bias, proj, y, activation, sign):
    _check_linear(x, weight, bias)
    torch._check(proj.dim() == 2 and proj.shape[1] == weight.shape[0],
                 lambda: "proj must have shape [num_classes, out_features]")
    n, m = x.shape[0], weight.shape[0]
    return (x.new_empty((n, m)), x.new_empty((), dtype=_mdt(x.dtype)),
            torch.empty_like(weight, memory_format=torch.contiguous_format),
            _grad_bias_like(weight, bias))


def _fake_head(feat, weight, bias, y):
    torch._check(feat.dim() >= 2, lambda: "feat must have shape [N, C, *]")
    torch._check(weight.dim() == 2 and weight.shape[1] == feat.shape[1],
                 lambda: "weight must have shape [num_classes, C]")
    n, c, k = feat.shape[0], feat.shape[1], weight.shape[0]
    mdt = _mdt(feat.dtype)
    gb = weight.new_empty((k,)) if bias is not None else weight.new_empty((0,))
    return (feat.new_empty((), dtype=mdt), feat.new_empty((n, k), dtype=mdt),
            feat.new_empty((n, c), dtype=mdt),
            torch.empty_like(weight, memory_format=torch.contiguous_format), gb)


# ---- autograd --------------------------------------------------------------------------------

class _NoSecondDerivative(torch.autograd.Function):
    """grad unchanged, tied to ``anchors`` (the weight and the bias: those that require grad;
    for the local head also one element of its input, _feature_anchor) in the autograd graph;
    differentiating it raises. The fused ops' parameter gradients come out of
    the forward's kernels as plain tensors, so a backward built with create_graph=True (double
    backward, a gradient penalty, HAWQ's Hutchinson traces) saw them as constants:
    d(grad_weight)/d(weight) came out as zero, silently. Tied to the parameters, a second
    derivative through them reaches this node and stops with an error instead. Both parameters
    are anchors: tied to the weight alone, d(grad_bias)/d(bias) (a penalty on the bias's
    gradient, or any bias-only second derivative, a frozen weight included) still came out as
    zero without an error, as the bias was not in the gradient's graph."""

    generate_vmap_rule = True  # per-sample gradients (vmap over torch.func.grad) pass here

    @staticmethod
    def forward(grad, anchor, anchor2, anchor3, op):
        return grad.view_as(grad)

    @staticmethod
    def setup_context(ctx, inputs, output):  # the form torch.func transforms accept
        ctx.op = inputs[4]

    @staticmethod
    def backward(ctx, *_):
        raise NotImplementedError(
            f"{ctx.op}: its gradients are computed inside the fused forward, without a graph, so "
            f"it has no second derivative (create_graph=True double backward, gradient "
            f"penalties, Hessian traces); use pypaper.local.reference's formulas with plain "
            f"autograd for that")


def _first_order_only(ctx, grads):
    """grads as they are, unless the backward runs with create_graph=True and the weight, the
    bias or the head's feature anchor (ctx.anchors) takes part in the graph: then each is tied
    to those that do through _NoSecondDerivative."""
    if not torch.is_grad_enabled():
        return grads
    anchors = [t for t in ctx.anchors if t is not None and t.requires_grad]
    if not anchors:
        return grads
    a, b, c = (anchors + [None, None])[:3]
    return tuple(g if g is None else _NoSecondDerivative.apply(g, a, b, c, ctx.op_name)
                 for g in grads)


def _feature_anchor(feat):
    """One element of ``feat`` copied out (a 1-element tensor whose graph leads to feat's), or
    None: the local head's third anchor. The head's input gradient is also formed without a
    graph (the broadcast of the saved [N, C] grad_pooled), so a second derivative through it
    toward what made feat (an input-gradient penalty on the block's parameters; the head's
    own weight and bias frozen or not asked for) came out as zero, silently. Tied to this
    element, such a derivative reaches _NoSecondDerivative and raises. One element, not feat:
    its select keeps only feat's sizes, and the [N, C, H, W] map the fused head exists to drop
    is not kept alive."""
    if not (feat.requires_grad and feat.numel() > 0):
        return None
    with torch.enable_grad():  # setup_context runs inside the op's forward, without grad
        return feat[(0,) * feat.dim()].clone()


def _scaled(g, t, like):
    return (g * t).to(like.dtype)


def _layer_setup(loss_index, w_index, n_inputs):
    def setup(ctx, inputs, output):
        weight, bias = inputs[w_index], inputs[w_index + 1]
        outs = list(output)
        gw, gb = outs[-2], outs[-1]
        for i, o in enumerate(outs):
            if i != loss_index:
                ctx.mark_non_differentiable(o)
        ctx.has_bias = bias is not None
        # weight, bias: the anchors of _first_order_only. Referred to, not saved: they are
        # parameters (alive anyway), and a saved tensor's version check would refuse the
        # backward after an in-place update of them (an optimizer or EMA step in between)
        ctx.anchors = (weight, bias)
        ctx.save_for_backward(gw, gb)
        ctx.w_index = w_index
        ctx.n_inputs = n_inputs
        ctx.wdtype = weight.dtype
    return setup


def _make_layer_backward(loss_index):
    def backward(ctx, *grads):
        g = grads[loss_index]
        gw, gb = ctx.saved_tensors
        out = [None] * ctx.n_inputs
        if g is None:
            return tuple(out)
        if ctx.needs_input_grad[ctx.w_index]:
            out[ctx.w_index] = (g * gw).to(ctx.wdtype)
        if ctx.has_bias and ctx.needs_input_grad[ctx.w_index + 1]:
            out[ctx.w_index + 1] = (g * gb).to(ctx.wdtype)
        return _first_order_only(ctx, tuple(out))
    return backward


def _head_setup(ctx, inputs, output):
    feat, weight, bias, y = inputs
    loss, logits, gp, gw, gb = output
    for o in (logits, gp, gw, gb):
        ctx.mark_non_differentiable(o)
    # referred to, not saved (see _layer_setup); the third: _feature_anchor
    ctx.anchors = (weight, bias, _feature_anchor(feat))
    ctx.save_for_backward(gp, gw, gb)
    ctx.feat_shape = feat.shape
    ctx.feat_dtype = feat.dtype
    ctx.w_dtype = weight.dtype
    ctx.has_bias = bias is not None


def _head_backward(ctx, g_loss, g_logits, g_gp, g_gw, g_gb):
    gp, gw, gb = ctx.saved_tensors
    if g_loss is None:
        return None, None, None, None
    gfeat = gwt = gbias = None
    if ctx.needs_input_grad[0]:
        shape = ctx.feat_shape
        s = math.prod(shape[2:]) if len(shape) > 2 else 1
        gfeat = (g_loss * gp / s).to(ctx.feat_dtype)
        gfeat = gfeat.reshape(tuple(shape[:2]) + (1,) * (len(shape) - 2)).expand(shape)
    if ctx.needs_input_grad[1]:
        gwt = (g_loss * gw).to(ctx.w_dtype)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        gbias = (g_loss * gb).to(ctx.w_dtype)
    return _first_order_only(ctx, (gfeat, gwt, gbias, None))


def register_autograd(suffix: str = "") -> None:
    """Autograd of the layer ops and the head (suffix "" native, "_triton" the Triton twins;
    ops that do not exist with the suffix are skipped)."""
    table = [("local_ff_linear", _make_layer_backward(1), _layer_setup(1, 1, 7)),
             ("local_ff_sf_linear", _make_layer_backward(2), _layer_setup(2, 2, 8)),
             ("local_tp_linear", _make_layer_backward(1), _layer_setup(1, 1, 7)),
             ("local_head", _head_backward, _head_setup)]
    for name, backward, setup in table:
        if hasattr(torch.ops.pypaper, name + suffix):
            _autograd.register_autograd(f"pypaper::{name}{suffix}", backward,
                                        setup_context=_named(setup, f"pypaper::{name}{suffix}"))


def _named(setup, qualname: str):
    """setup, which also records the op's name for _first_order_only's error."""
    def named_setup(ctx, inputs, output):
        setup(ctx, inputs, output)
        ctx.op_name = qualname
    return named_setup


def _fake_ff_out(x, weight, bias, num_pos, threshold, normalize, eps, accumulate, h,
                 grad_weight, grad_bias):
    _check_linear(x, weight, bias)
    return x.new_empty((), dtype=_mdt(x.dtype))


def _fake_tp_out(x, weight, bias, proj, y, activation, sign, accumulate, h, grad_weight,
                 grad_bias):
    _check_linear(x, weight, bias)
    return x.new_empty((), dtype=_mdt(x.dtype))


def _fake_ff_sf_out(x, class_x, weight, bias, y, normalize, eps, temperature, accumulate, h,
                    grad_weight, grad_bias):
    _check_linear(x, weight, bias)
    _check_linear(class_x, weight, bias)
    return (x.new_empty((class_x.shape[0], weight.shape[0])),
            x.new_empty((), dtype=_mdt(x.dtype)))


def register_native() -> None:
    """Fake kernels and autograd of the C++ (and, when built, CUDA) local ops."""
    torch.library.register_fake("pypaper::local_ff_linear_out")(_fake_ff_out)
    torch.library.register_fake("pypaper::local_tp_linear_out")(_fake_tp_out)
    torch.library.register_fake("pypaper::local_ff_sf_linear_out")(_fake_ff_sf_out)
    torch.library.register_fake("pypaper::local_ff_linear")(_fake_ff)
    torch.library.register_fake("pypaper::local_ff_sf_linear")(_fake_ff_sf)
    torch.library.register_fake("pypaper::local_tp_linear")(_fake_tp)
    torch.library.register_fake("pypaper::local_head")(_fake_head)
    register_autograd("")
