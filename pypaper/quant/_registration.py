"""Fake (meta) kernels and autograd of the quant ops, registered once at import.

Fake kernels give shapes and dtypes without computing, so the ops trace under
torch.compile(fullgraph=True); autograd backward is itself an op (fake_quantize_backward), so the
backward also compiles. The same autograd formula serves the C++/CUDA op and its Triton twin.
"""
from __future__ import annotations

import torch

from .. import _autograd
from . import vmap_rules

_INT_CODE = {True: torch.int8, False: torch.uint8}


def _fake_fake_quantize(x, scale, zero_point, quant_min, quant_max, axis=None, group_size=None,
                        seed=None, grad_factor=1.0):
    torch._check(x.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16),
                 lambda: f"x must be a floating tensor, got {x.dtype}")
    torch._check(quant_min < quant_max, lambda: "quant_min must be below quant_max")
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _fake_fake_quantize_backward(grad, x, scale, zero_point, quant_min, quant_max, axis,
                                 group_size, seed, grad_factor, need_scale_grad,
                                 need_zero_point_grad):
    torch._check(grad.shape == x.shape, lambda: "grad and x must have one shape")
    zp_dtype = zero_point.dtype if zero_point.is_floating_point() else scale.dtype
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            scale.new_empty(scale.shape),
            zero_point.new_empty(zero_point.shape, dtype=zp_dtype))


def _fake_quantize_codes(x, scale, zero_point, quant_min, quant_max, axis=None, group_size=None,
                         pack=False):
    torch._check(x.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16),
                 lambda: f"x must be a floating tensor, got {x.dtype}")
    if pack:
        shape = list(x.shape) or [1]
        shape[-1] = (shape[-1] + 1) // 2
        out = x.new_empty(shape, dtype=torch.uint8)
        return out.reshape(()) if x.dim() == 0 else out
    return x.new_empty(x.shape, dtype=_INT_CODE[quant_min < 0])


def _fake_dequantize(data, scale, zero_point, quant_min, quant_max, axis, group_size, packed,
                     last_dim, dtype):
    shape = list(data.shape)
    if packed:
        torch._check(len(shape) >= 1, lambda: "packed data needs a last dim")
        shape[-1] = last_dim
    return data.new_empty(shape, dtype=dtype)


def _fq_setup(ctx, inputs, output):
    x, scale, zero_point, qmin, qmax, axis, group_size, seed, grad_factor = inputs
    ctx.save_for_backward(x, scale, zero_point, seed)
    ctx.args = (qmin, qmax, axis, group_size, grad_factor)


def _make_fq_backward(backward_op):
    def backward(ctx, grad):
        x, scale, zero_point, seed = ctx.saved_tensors
        qmin, qmax, axis, group_size, grad_factor = ctx.args
        need_s = ctx.needs_input_grad[1]
        need_z = ctx.needs_input_grad[2] and zero_point.is_floating_point()
        gx, gs, gz = backward_op(grad.contiguous(), x, scale, zero_point, qmin, qmax, axis,
                                 group_size, seed, grad_factor, need_s, need_z)
        return (gx if ctx.needs_input_grad[0] else None, gs if need_s else None,
                gz if need_z else None, None, None, None, None, None, None)

    return backward


def _dq_setup(ctx, inputs, output):
    data, scale, zero_point, qmin, qmax, axis, group_size, packed, last_dim, dtype = inputs
    ctx.save_for_backward(data, scale, zero_point)
    ctx.args = (qmin, qmax, axis, group_size, packed, last_dim)


def _dq_backward(ctx, grad):
    """y = (q - z) * s: dy/ds = q - z, dy/dz = -s (z rounded straight-through), summed per channel."""
    from .layout import layout_of

    data, scale, zero_point = ctx.saved_tensors
    qmin, qmax, axis, group_size, packed, last_dim = ctx.args
    gs = gz = None
    layout = layout_of(grad.shape, axis, group_size)
    g3 = grad.to(scale.dtype).reshape(layout)
    if ctx.needs_input_grad[1]:
        centered = torch.ops.pypaper.dequantize(data, torch.ones_like(scale), zero_point, qmin,
                                                qmax, axis, group_size, packed, last_dim,
                                                scale.dtype)
        gs = (g3 * centered.reshape(layout)).sum(dim=(0, 2)).reshape(scale.shape)
    if ctx.needs_input_grad[2] and zero_point.is_floating_point():
        gz = (-g3.sum(dim=(0, 2)) * scale.reshape(-1)).reshape(zero_point.shape).to(zero_point.dtype)
    return None, gs, gz, None, None, None, None, None, None, None


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "pypaper.quant.fake_quantize has no double backward (its gradients are the "
        "straight-through / LSQ surrogates); do not differentiate through its gradient "
        "(create_graph=True)")


def _setup_nothing(ctx, inputs, output):
    pass


def register_native() -> None:
    """Fake kernels and autograd of the C++/CUDA ops in torch.ops.pypaper."""
    lib = torch.ops.pypaper
    torch.library.register_fake("pypaper::fake_quantize")(_fake_fake_quantize)
    torch.library.register_fake("pypaper::fake_quantize_backward")(_fake_fake_quantize_backward)
    torch.library.register_fake("pypaper::quantize")(_fake_quantize_codes)
    torch.library.register_fake("pypaper::dequantize")(_fake_dequantize)
    _autograd.register_autograd("pypaper::fake_quantize",
                                _make_fq_backward(lib.fake_quantize_backward),
                                setup_context=_fq_setup)
    _autograd.register_autograd("pypaper::dequantize", _dq_backward, setup_context=_dq_setup)
    _autograd.register_autograd("pypaper::fake_quantize_backward", _no_double_backward,
                                setup_context=_setup_nothing)
    _autograd.register_constant("pypaper::quantize")  # integer codes
    vmap_rules.register_fake_quantize()


_triton_module = None


def load_triton():
    """Imports pypaper/quant/triton_kernels.py once (defining its triton_ops when triton is
    installed) and registers their autograd; returns the module."""
    global _triton_module
    if _triton_module is None:
        from . import triton_kernels

        if triton_kernels.HAVE_TRITON:
            ops = torch.ops.pypaper
            _autograd.register_autograd(
                "pypaper::fake_quantize_triton", _make_fq_backward(ops.fake_quantize_backward_triton),
                setup_context=_fq_setup)
            _autograd.register_autograd("pypaper::dequantize_triton", _dq_backward,
                                        setup_context=_dq_setup)
            _autograd.register_autograd("pypaper::fake_quantize_backward_triton",
                                        _no_double_backward, setup_context=_setup_nothing)
            _autograd.register_constant("pypaper::quantize_triton")
            vmap_rules.register_fake_quantize("_triton")
        _triton_module = triton_kernels
    return _triton_module
