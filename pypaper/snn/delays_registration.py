"""Fake (meta) kernels and autograd of the learnable-delay ops, registered once at import.

The backward is itself an op (pypaper::delay_linear_backward), so the backward traces under
torch.compile(fullgraph=True) too. Autograd keeps x, weight and position (no per-tap tensor: the
backward recomputes the tap weights of each synapse from its position, 2R exponentials per synapse).
"""
from __future__ import annotations

import torch

from .. import _autograd
from . import delays_reference, delays_second_order

_FLOATS = (torch.float32, torch.float64)


def _check_devices(x, sigma, **tensors):
    """Every tensor on x's device, sigma on the CPU (or x's). This kernel is also the op's Meta
    kernel, and the dispatcher picks it whenever any input is a meta tensor: called with a real
    CPU x and a meta sigma (a layer built under ``with torch.device('meta')``) it returned an
    uninitialised CPU tensor, a silent garbage output. Under FakeTensorMode the devices checked
    are the fake tensors' own, so a traced call passes as its real one would."""
    for name, t in tensors.items():
        if t is not None:
            torch._check(t.device == x.device,
                         lambda: f"{name} is on {t.device} but x is on {x.device}")
    torch._check(sigma.device.type == "cpu" or sigma.device == x.device,
                 lambda: f"sigma must be a CPU tensor (the kernels read it on the host), got "
                         f"{sigma.device}")


def _fake_delay_linear(x, weight, position, bias, max_delay, sigma):
    _check_devices(x, sigma, weight=weight, position=position, bias=bias)
    torch._check(x.dtype in _FLOATS, lambda: f"x must be float32 or float64, got {x.dtype}")
    torch._check(x.dim() == 3, lambda: "x must have shape [T, N, C_in]")
    torch._check(weight.dim() == 2 and weight.shape[1] == x.shape[2],
                 lambda: "weight must have shape [C_out, C_in]")
    torch._check(max_delay >= 1, lambda: "max_delay must be >= 1")
    torch._check(sigma.numel() == 1, lambda: "sigma must be a one-element tensor")
    return x.new_empty((x.shape[0], x.shape[1], weight.shape[0]))


def _fake_delay_linear_backward(grad_y, x, weight, position, max_delay, sigma, need_x_grad,
                                need_weight_grad, need_position_grad, need_bias_grad):
    _check_devices(x, sigma, grad_y=grad_y, weight=weight, position=position)
    torch._check(grad_y.dim() == 3 and grad_y.shape[2] == weight.shape[0],
                 lambda: "grad_y must have shape [T, N, C_out]")
    return (x.new_empty(x.shape), weight.new_empty(weight.shape),
            position.new_empty(position.shape), x.new_empty((weight.shape[0],)))


def _setup(ctx, inputs, output):
    x, weight, position, bias, max_delay, sigma = inputs
    ctx.save_for_backward(x, weight, position, sigma)
    ctx.max_delay = max_delay
    ctx.has_bias = bias is not None


def _backward(ctx, grad_y):
    x, weight, position, sigma = ctx.saved_tensors
    max_delay = ctx.max_delay
    need_x, need_w, need_p, need_b = ctx.needs_input_grad[:4]
    need_b = need_b and ctx.has_bias
    gx, gw, gp, gb = torch.ops.pypaper.delay_linear_backward(
        grad_y.contiguous(), x, weight, position, max_delay, sigma, need_x, need_w, need_p, need_b)
    return (gx if need_x else None, gw if need_w else None, gp if need_p else None,
            gb if need_b else None, None, None)


def _jvp(inputs, tangents):
    """Forward-mode rule of delay_linear (dual tensors, torch.func.jvp, jacfwd). The layer is
    y = b + conv(x, k), k[o, i, d] = w[o, i] g(d; p[o, i]) (delays_reference), so

        dy = db + conv(dx, k) + conv(x, dw g + w dg),   dg = g (dl - sum_d g dl) dp,

    with dl = (d - p) / sigma^2 the logits' derivative in p (logits -(d - p)^2 / (2 sigma^2),
    sigma at its floor as the kernels take it), zero where p lies outside [0, K - 1] (the clamp)
    and for sigma == 0 (the rounded delays: g does not move with p). The tangent is computed with
    the reference's dense convolution (the op's GEMM cost, not the gather's); the primal output is
    the op's own."""
    x, weight, position, bias, max_delay, sigma = inputs
    dx, dw, dp, db = tangents[:4]
    K = int(max_delay)
    g = delays_reference.tap_weights(position, sigma, K)
    out = x.new_zeros((x.shape[0], x.shape[1], weight.shape[0]))
    if dx is not None:
        out = out + delays_reference.causal_conv(dx, weight.unsqueeze(-1) * g, None)
    dk = None if dw is None else dw.unsqueeze(-1) * g
    if dp is not None:
        s = delays_reference.floored_sigma(sigma, position.dtype)
        inv = (1.0 / (s * s)).to(position.dtype)
        d = torch.arange(K, dtype=position.dtype, device=position.device)
        dl = (d - position.clamp(0, K - 1).unsqueeze(-1)) * inv
        inside = ((position >= 0) & (position <= K - 1)).to(position.dtype)
        dg = g * (dl - (g * dl).sum(-1, keepdim=True)) * (dp * inside).unsqueeze(-1)
        dg = torch.where(sigma.to(position.device) == 0, torch.zeros_like(dg), dg)
        dk = weight.unsqueeze(-1) * dg if dk is None else dk + weight.unsqueeze(-1) * dg
    if dk is not None:
        out = out + delays_reference.causal_conv(x, dk, None)
    if db is not None:
        out = out + db
    return out


def register_native() -> None:
    """Fake kernels and autograd of the C++ delay ops."""
    torch.library.register_fake("pypaper::delay_linear")(_fake_delay_linear)
    torch.library.register_fake("pypaper::delay_linear_backward")(_fake_delay_linear_backward)
    _autograd.register_autograd("pypaper::delay_linear", _backward, setup_context=_setup)
    delays_second_order.register()  # the backward's own derivatives (double backward, hessian)
    _autograd.register_jvp("pypaper::delay_linear", _jvp)
