"""Fake kernels and autograd of the few-bit ops (C++/CUDA ops and their Triton twins).

The forward op returns (y, codes); autograd saves only the packed codes and the 2^b levels, and
its backward is the op fewbit_backward. fewbit_backward is linear in grad, so its own backward
(for double backward, e.g. Hessian-vector products in HAWQ) is the same op again: d(grad_x)/d(grad)
= levels[code]; the approximate f' is piecewise constant, so nothing flows to x a second time.
"""
from __future__ import annotations

import torch

from ... import _autograd

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_device(t, name: str, like) -> None:
    torch._check(t.device == like.device,
                 lambda: f"{name} must be on {like.device}, got {t.device}")


def _fake_forward(x, activation, params, borders, levels, bits, fold):
    torch._check(x.dtype in _FLOATS, lambda: f"x must be a floating tensor, got {x.dtype}")
    torch._check(1 <= bits <= 4, lambda: f"bits must be 1, 2, 3 or 4, got {bits}")
    torch._check(levels.numel() == 2 ** bits, lambda: "levels must hold 2^bits values")
    # the C++ kernels check the devices too; here it matters most: a table on the meta device
    # with a real x dispatched to this fake kernel, which returned uninitialised y and codes
    _check_device(borders, "borders", x)
    _check_device(levels, "levels", x)
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    codes = x.new_empty(((x.numel() * bits + 7) // 8,), dtype=torch.uint8)
    return y, codes


def _fake_backward(grad, codes, levels, bits):
    torch._check(grad.dtype in _FLOATS, lambda: f"grad must be a floating tensor, got {grad.dtype}")
    torch._check(codes.dtype == torch.uint8, lambda: f"codes must be uint8, got {codes.dtype}")
    torch._check(codes.numel() == (grad.numel() * bits + 7) // 8,
                 lambda: "codes must hold ceil(bits * grad.numel() / 8) bytes")
    _check_device(codes, "codes", grad)
    _check_device(levels, "levels", grad)
    return torch.empty_like(grad, memory_format=torch.contiguous_format)


def _forward_setup(ctx, inputs, output):
    x, activation, params, borders, levels, bits, fold = inputs
    _, codes = output
    ctx.save_for_backward(codes, levels)
    ctx.bits = bits
    ctx.set_materialize_grads(False)  # no zero gradient for the (integer) codes output


def _make_forward_backward(backward_op):
    def backward(ctx, grad_y, grad_codes):
        codes, levels = ctx.saved_tensors
        if grad_y is None:
            return None, None, None, None, None, None, None
        gx = backward_op(grad_y.contiguous(), codes, levels, ctx.bits)
        return gx, None, None, None, None, None, None

    return backward


def _backward_setup(ctx, inputs, output):
    grad, codes, levels, bits = inputs
    ctx.save_for_backward(codes, levels)
    ctx.bits = bits


def _make_backward_backward(backward_op):
    def backward(ctx, gg):
        codes, levels = ctx.saved_tensors
        return backward_op(gg.contiguous(), codes, levels, ctx.bits), None, None, None

    return backward


def register_autograd(forward_name: str, backward_name: str, backward_op) -> None:
    """Autograd of a (forward, backward) pair: the C++/CUDA ops or their Triton twins."""
    _autograd.register_autograd(forward_name, _make_forward_backward(backward_op),
                                setup_context=_forward_setup)
    _autograd.register_autograd(backward_name, _make_backward_backward(backward_op),
                                setup_context=_backward_setup)


def register_native() -> None:
    torch.library.register_fake("pypaper::fewbit_forward")(_fake_forward)
    torch.library.register_fake("pypaper::fewbit_backward")(_fake_backward)
    register_autograd("pypaper::fewbit_forward", "pypaper::fewbit_backward",
                      torch.ops.pypaper.fewbit_backward)


_triton_module = None


def load_triton():
    """Imports pypaper/quant/fewbit/triton_kernels.py once (its triton_ops exist when triton is
    installed) and registers their autograd; returns the module."""
    global _triton_module
    if _triton_module is None:
        from . import triton_kernels

        if triton_kernels.HAVE_TRITON:
            register_autograd("pypaper::fewbit_forward_triton", "pypaper::fewbit_backward_triton",
                              torch.ops.pypaper.fewbit_backward_triton)
        _triton_module = triton_kernels
    return _triton_module
