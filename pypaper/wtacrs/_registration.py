"""Fake kernels and autograd of the WTA-CRS ops (C++/CUDA ops and their Triton twins).

wtacrs_linear saves (weight, x_kept, indices) - not x - and its backward is the op
wtacrs_linear_backward: grad_x = dY W and grad_b = sum dY exactly, grad_W = dY[indices]^T x_kept.
The sampling ops (row norms, select, gather, sample) are not differentiable: the layer calls them
on x.detach().
"""
from __future__ import annotations

import torch

from .. import _autograd

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_rows(x, name):
    torch._check(x.dtype in _FLOATS, lambda: f"{name} must be a float tensor, got {x.dtype}")
    torch._check(x.dim() == 2, lambda: f"{name} must be 2-D, got {x.dim()}-D")


def _fake_row_norms(x):
    _check_rows(x, "x")
    return x.new_empty((x.shape[0],), dtype=_math_dtype(x.dtype))


def _fake_select(scores, k, wta, seed):
    torch._check(scores.dim() == 1, lambda: "scores must be 1-D")
    torch._check(0 <= k <= scores.shape[0], lambda: "k must be in [1, N]")
    return scores.new_empty((k,), dtype=torch.int64), scores.new_empty((k,))


def _fake_gather_scale(x, indices, scales=None, dtype=None):
    _check_rows(x, "x")
    torch._check(indices.dtype == torch.int64, lambda: "indices must be int64")
    return x.new_empty((indices.shape[0], x.shape[1]), dtype=dtype or x.dtype)


def _fake_sample(x, grad_norm, k, wta, seed, dtype=None):
    _check_rows(x, "x")
    torch._check(0 <= k <= x.shape[0], lambda: "k must be in [1, N]")
    return (x.new_empty((k, x.shape[1]), dtype=dtype or x.dtype),
            x.new_empty((k,), dtype=torch.int64))


def _fake_sampled_grad_weight(grad_y, indices, x_kept):
    _check_rows(grad_y, "grad_y")
    _check_rows(x_kept, "x_kept")
    return grad_y.new_empty((grad_y.shape[1], x_kept.shape[1]))


def _fake_linear(x, weight, bias, x_kept, indices):
    _check_rows(x, "x")
    torch._check(x.shape[1] == weight.shape[1], lambda: "x must have in_features features")
    return x.new_empty((x.shape[0], weight.shape[0]))


def _fake_linear_backward(grad_y, weight, x_kept, indices, need_input, need_weight, need_bias):
    _check_rows(grad_y, "grad_y")
    empty = grad_y.new_empty((0,))
    gx = grad_y.new_empty((grad_y.shape[0], weight.shape[1])) if need_input else empty
    gw = weight.new_empty(weight.shape) if need_weight else empty.to(weight.dtype)
    gb = weight.new_empty((weight.shape[0],)) if need_bias else empty.to(weight.dtype)
    return gx, gw, gb


def _linear_setup(ctx, inputs, output):
    x, weight, bias, x_kept, indices = inputs
    ctx.save_for_backward(weight, x_kept, indices)
    ctx.has_bias = bias is not None


def _make_linear_backward(backward_op):
    def backward(ctx, gy):
        weight, x_kept, indices = ctx.saved_tensors
        need = ctx.needs_input_grad
        nb = ctx.has_bias and need[2]
        if torch.is_grad_enabled() and (gy.requires_grad or weight.requires_grad):
            # create_graph=True (a gradient penalty): the same formulas in differentiable torch
            # ops (reference.linear_backward), so the double backward is autograd's own
            from .reference import linear_backward

            gx, gw, gb = linear_backward(gy, weight, x_kept, indices, need[0], need[1], nb)
        else:
            gx, gw, gb = backward_op(gy.contiguous(), weight, x_kept, indices, need[0], need[1],
                                     nb)
        return (gx if need[0] else None, gw if need[1] else None, gb if nb else None, None, None)

    return backward


def register_fakes() -> None:
    """Fake kernels of the C++/CUDA ops (the Triton twins are triton_ops: traced through)."""
    lib = "pypaper::wtacrs_"
    for name, fake in (("row_norms", _fake_row_norms), ("select", _fake_select),
                       ("gather_scale", _fake_gather_scale), ("sample", _fake_sample),
                       ("sampled_grad_weight", _fake_sampled_grad_weight),
                       ("linear", _fake_linear), ("linear_backward", _fake_linear_backward)):
        torch.library.register_fake(lib + name)(fake)


def _register_steps(suffix: str) -> None:
    """The ops without a backward (suffix "" native, "_triton" the Triton twins)."""
    # the sampler's decision: which rows, with which estimator weights
    _autograd.register_constant(f"pypaper::wtacrs_select{suffix}")
    for name in ("row_norms", "gather_scale", "sample"):
        _autograd.register_no_backward(
            f"pypaper::wtacrs_{name}{suffix}", "a step of the WTA-CRS sampler, which runs on "
            "detached inputs (pypaper.wtacrs.WTACRSLinear); use torch ops to differentiate "
            "through it")
    for name in ("sampled_grad_weight", "linear_backward"):
        _autograd.register_no_backward(
            f"pypaper::wtacrs_{name}{suffix}", "a step of wtacrs_linear's backward (its double "
            "backward runs on the reference formulas)")


def register_native() -> None:
    register_fakes()
    _register_steps("")
    _autograd.register_autograd("pypaper::wtacrs_linear",
                                _make_linear_backward(torch.ops.pypaper.wtacrs_linear_backward),
                                setup_context=_linear_setup)


_triton_module = None


def load_triton():
    """Imports pypaper/wtacrs/triton_kernels.py once and registers the autograd of its linear op;
    returns the module."""
    global _triton_module
    if _triton_module is None:
        from . import triton_kernels

        if triton_kernels.HAVE_TRITON:
            _register_steps("_triton")
            _autograd.register_autograd(
                "pypaper::wtacrs_linear_triton",
                _make_linear_backward(torch.ops.pypaper.wtacrs_linear_backward_triton),
                setup_context=_linear_setup)
        _triton_module = triton_kernels
    return _triton_module
