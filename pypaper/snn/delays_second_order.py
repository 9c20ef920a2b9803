"""Second-order AD of the learnable-delay op: delay_linear_backward differentiated again.

delay_linear computes y = b + conv(x, k), k[o, i, d] = w[o, i] g(d; p[o, i], sigma): the causal
convolution over time with each synapse's normalised Gaussian taps (pypaper/snn/delays_reference.py,
Hammouamri et al., ICLR 2024). Its backward op returns, for the incoming gradient gy,

    B(gy, x, w, p) = (dL/dx, dL/dw, dL/dp, dL/db) = J(x, w, p, b)^T gy,

linear in gy and x, bilinear in (gy, x) for w's and p's entries, nonlinear in p through g. A
double backward (create_graph=True then a backward through the gradient: gradient penalties,
MAML, Hessian-vector products) and forward-over-reverse (torch.func.hessian) need B's
derivatives. They are taken here from the reference's vjp, in torch ops (the dense convolution's
cost, not the gather's): the same function as the op, truncated window included, so the
second derivatives are those of the op's first derivative. sigma is a schedule, not a variable.
"""
from __future__ import annotations

import torch

from .. import _autograd
from . import delays_reference

_NUM_TENSORS = 4  # grad_y, x, weight, position: what B is differentiable in


def _first_order(max_delay, sigma):
    """B(gy, x, w, p) in torch ops: the vjp of the reference layer (with a bias, whose gradient
    is gy summed over time and batch)."""
    def backward(gy, x, w, p):
        b = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)

        def forward(x, w, p, b):
            return delays_reference.delayed_linear(x, w, p, b, max_delay, sigma)

        _, pull = torch.func.vjp(forward, x, w, p, b)
        return pull(gy)

    return backward


def _setup(ctx, inputs, output):
    gy, x, w, p, max_delay, sigma = inputs[:6]
    ctx.max_delay = max_delay
    ctx.needed = tuple(inputs[6:10])  # need_{x, weight, position, bias}_grad
    ctx.save_for_backward(gy, x, w, p, sigma)


def _double_backward(ctx, *grads):
    """d/d(gy, x, w, p) of <grads, B(gy, x, w, p)>: the vjp of B at the call's inputs. The op's
    outputs it was not asked for (need_* False) are zeros, constants: they carry no gradient
    back."""
    gy, x, w, p, sigma = ctx.saved_tensors
    none = (None,) * (_NUM_TENSORS + 6)
    grads = tuple(g if needed else None for g, needed in zip(grads, ctx.needed))
    if all(g is None for g in grads):
        return none
    fn = _first_order(ctx.max_delay, sigma)
    outputs, pull = torch.func.vjp(fn, gy, x, w, p)
    cotangents = tuple(torch.zeros_like(o) if g is None else g.to(o.dtype)
                       for o, g in zip(outputs, grads))
    pulled = pull(cotangents)
    needs = ctx.needs_input_grad
    return tuple(g if needs[i] else None for i, g in enumerate(pulled)) + none[_NUM_TENSORS:]


def _jvp(inputs, tangents):
    """register_jvp rule of delay_linear_backward: J_B . t, by reverse mode (the transpose of B's
    vjp: J_B t = d/du <J_B^T u, t> at u = 0), as pypaper/snn/second_order.py does for the LIF op:
    an eager forward-AD level cannot open a nested torch.func.jvp."""
    gy, x, w, p, max_delay, sigma = inputs[:6]
    primals = (gy, x, w, p)
    tans = tuple(torch.zeros_like(v) if t is None else t
                 for v, t in zip(primals, tangents[:_NUM_TENSORS]))
    outputs, pull = torch.func.vjp(_first_order(max_delay, sigma), *primals)
    _, transpose = torch.func.vjp(pull, tuple(torch.zeros_like(o) for o in outputs))
    (out,) = transpose(tans)
    # an output that was not asked for (need_* False) is zeros whatever the inputs: no tangent
    return tuple(t if needed else torch.zeros_like(t) for t, needed in zip(out, inputs[6:10]))


def register() -> None:
    """Double backward and jvp of pypaper::delay_linear_backward (the C++ op)."""
    qualname = "pypaper::delay_linear_backward"
    _autograd.register_autograd(qualname, _double_backward, setup_context=_setup)
    _autograd.register_jvp(qualname, _jvp)
