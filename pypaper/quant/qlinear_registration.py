"""Fake kernels and autograd of the quantized linear ops (issue #7, linear kernels).

Fake kernels give shapes and dtypes, so a quantized model traces under
torch.compile(fullgraph=True). Autograd: the quantized layers are inference layers, but they pass
gradients to their input (and bias) so that a model can be fine-tuned around them or analysed
(HAWQ-style sensitivity, input attributions): grad_x = grad_y @ W_hat with W_hat the dequantized
weight (straight-through for the activation rounding of the dynamic op), grad_bias = sum grad_y.
The weights themselves (integer codes) get no gradient. The backward is plain torch ops on the
packed weights, so it compiles too.
"""
from __future__ import annotations

import torch

from .. import _autograd
from . import qlinear_reference as reference
from . import vmap_rules


def _fake_int8_dynamic(x, w_packed, w_scale, w_colsum, bias, act_qmax):
    torch._check(x.dtype == torch.float32, lambda: f"x must be float32, got {x.dtype}")
    torch._check(x.dim() == 2, lambda: "x must be 2-D")
    return x.new_empty((x.shape[0], w_scale.shape[0]))


def _fake_int8_dynamic_int32(x, w_packed, w_colsum, out_features, act_qmax):
    torch._check(x.dim() == 2, lambda: "x must be 2-D")
    return (x.new_empty((x.shape[0], out_features), dtype=torch.int32), x.new_empty((x.shape[0],)))


def _fake_int8_wo(x, w, scale, bias):
    torch._check(x.dim() == 2 and x.shape[1] == w.shape[1], lambda: "x must be [M, K]")
    return x.new_empty((x.shape[0], w.shape[0]))


def _fake_int4_wo(x, w, scale, zero, bias):
    torch._check(x.dim() == 2 and x.shape[1] == 2 * w.shape[1], lambda: "x must be [M, K]")
    return x.new_empty((x.shape[0], w.shape[0]))


def _grads(ctx, grad, w_hat, bias_index):
    gx = grad @ w_hat if ctx.needs_input_grad[0] else None
    gb = grad.sum(0) if ctx.needs_input_grad[bias_index] else None
    return gx, gb


def _dyn_setup(ctx, inputs, output):
    x, w_packed, w_scale, w_colsum, bias, act_qmax = inputs
    ctx.save_for_backward(w_packed, w_scale)
    ctx.in_features = x.shape[1]


def _dyn_backward(ctx, grad):
    w_packed, w_scale = ctx.saved_tensors
    w_hat = reference.dequantize_int8_dynamic_weight(w_packed, w_scale, ctx.in_features)
    gx, gb = _grads(ctx, grad, w_hat, 4)
    return gx, None, None, None, gb, None


def _wo8_setup(ctx, inputs, output):
    x, w, scale, bias = inputs
    ctx.save_for_backward(w, scale)


def _wo8_backward(ctx, grad):
    w, scale = ctx.saved_tensors
    gx, gb = _grads(ctx, grad, reference.dequantize_int8_weight(w, scale), 3)
    return gx, None, None, gb


def _wo4_setup(ctx, inputs, output):
    x, w, scale, zero, bias = inputs
    ctx.save_for_backward(w, scale, zero)


def _wo4_backward(ctx, grad):
    w, scale, zero = ctx.saved_tensors
    gx, gb = _grads(ctx, grad, reference.dequantize_int4_weight(w, scale, zero), 4)
    return gx, None, None, None, gb


def _register_autograd(suffix: str) -> None:
    _autograd.register_constant(f"pypaper::int8_dynamic_linear_int32{suffix}")  # int32 sums
    _autograd.register_autograd(f"pypaper::int8_dynamic_linear{suffix}", _dyn_backward,
                                setup_context=_dyn_setup)
    _autograd.register_autograd(f"pypaper::int8_weight_only_linear{suffix}", _wo8_backward,
                                setup_context=_wo8_setup)
    _autograd.register_autograd(f"pypaper::int4_weight_only_linear{suffix}", _wo4_backward,
                                setup_context=_wo4_setup)
    vmap_rules.register_linear(suffix)


def register_native() -> None:
    """Fake kernels and autograd of the C++/CUDA ops."""
    torch.library.register_fake("pypaper::int8_dynamic_linear")(_fake_int8_dynamic)
    torch.library.register_fake("pypaper::int8_dynamic_linear_int32")(_fake_int8_dynamic_int32)
    torch.library.register_fake("pypaper::int8_weight_only_linear")(_fake_int8_wo)
    torch.library.register_fake("pypaper::int4_weight_only_linear")(_fake_int4_wo)
    _register_autograd("")


_triton_module = None


def load_triton():
    """Imports pypaper/quant/qlinear_triton.py once (defining its triton_ops when triton is
    installed), registers their autograd, and returns the module."""
    global _triton_module
    if _triton_module is None:
        from . import qlinear_triton

        if qlinear_triton.HAVE_TRITON:
            _register_autograd("_triton")
        _triton_module = qlinear_triton
    return _triton_module
