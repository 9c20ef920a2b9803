"""The fused LIF ops with the surrogate's alpha as a tensor, for torch.compile over a tensor alpha.

SpikingJelly keeps a surrogate's alpha as it is given, so a model may carry a tensor alpha (an
nn.Parameter loaded from a state_dict, or a buffer annealed in place, alpha.fill_(a)). The
kernels' ops take alpha as a float (csrc/schemas.cpp): eager calls read the tensor at each call
(surrogate.alpha_value). Under torch.compile that read is a graph break (dynamo turns it into an
unbacked SymFloat, which a ``float`` schema argument refuses), so torch.compile(fullgraph=True)
failed on such a model. While tracing, lif_multi_step therefore calls these two ops instead:

    lif_forward_alpha_tensor(x, v_init, decay, v_threshold, v_reset, surrogate, alpha, flags,
                             backend)
    lif_backward_alpha_tensor(grad_spikes, grad_v_last, grad_v_seq, h_seq, v_init, decay,
                              v_threshold, v_reset, surrogate, alpha, flags, backend)

with lif_forward / lif_backward's arguments, alpha a one-element tensor, and ``backend`` the
kernels' op pair they run ("cpu" or "cuda": pypaper::lif_forward / lif_backward; "triton": the
Triton twins). Each reads alpha when it runs - checked as the eager path checks it (a positive,
finite number; ValueError otherwise) - and calls that op: the compiled graph holds alpha as an
input, so annealing it in place takes effect without a recompile, and the neurons run the fused
kernels, not the compiled reference (about 9x slower fwd + bwd at T = 32, README table).

alpha gets no gradient, as from the eager spiking function and SpikingJelly's built-ins. The
backward op has no derivative of its own (torch.compile does not run double backward through a
compiled graph; eager calls never reach these ops).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _autograd
from . import _registration
from .surrogate import alpha_value

_Outputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _kernels(backend: str):
    ops = torch.ops.pypaper
    if backend == "triton":
        return ops.lif_forward_triton.default, ops.lif_backward_triton.default
    if backend in ("cpu", "cuda"):
        return ops.lif_forward.default, ops.lif_backward.default
    raise ValueError(f"backend must be 'cpu', 'cuda' or 'triton', got {backend!r}")


# Reading alpha on the host when the op runs is what CUDA graphs cannot replay: captured once,
# the value read at capture would be baked in (annealing silently ignored) or, alpha on the GPU,
# the read's synchronization fails the capture. Tagged, inductor's mode="reduce-overhead" keeps
# these ops out of its CUDA graphs. (torch before 2.9 has no such tag.)
_TAGS = tuple(t for t in (getattr(torch.Tag, "cudagraph_unsafe", None),) if t is not None)


def _alpha(alpha: torch.Tensor) -> float:
    return alpha_value(alpha, "the surrogate's alpha")


@torch.library.custom_op("pypaper::checked_alpha", mutates_args=(), tags=_TAGS)
def checked_alpha(alpha: torch.Tensor, where: str) -> torch.Tensor:
    """A one-element floating alpha as a float64 0-d tensor of its own on alpha's device, after
    the check eager calls make (surrogate.alpha_value: a positive finite number, else ValueError
    naming ``where``). What the traced graph computes with and autograd keeps: float64, so the
    constants made of it round as a Python number's do; a copy, so alpha annealed in place after
    the forward does not reach that forward's backward; an op of its own, so the compiler
    neither drops the check nor recomputes the copy from the annealed alpha in the backward."""
    value = alpha_value(alpha, where)
    return torch.full((), value, dtype=torch.float64, device=alpha.device)


@checked_alpha.register_fake
def _(alpha, where):
    return alpha.new_empty((), dtype=torch.float64)


@torch.library.custom_op("pypaper::lif_forward_alpha_tensor", mutates_args=(), tags=_TAGS)
def lif_forward_alpha_tensor(x: torch.Tensor, v_init: Optional[torch.Tensor], decay: torch.Tensor,
                             v_threshold: torch.Tensor, v_reset: Optional[float], surrogate: int,
                             alpha: torch.Tensor, flags: int, backend: str) -> _Outputs:
    """lif_forward with alpha read from a one-element tensor when it runs."""
    forward, _ = _kernels(backend)
    args = (x, v_init, decay, v_threshold, v_reset, surrogate, _alpha(alpha), flags)
    return _registration.call_op(forward, args, False)


@torch.library.custom_op("pypaper::lif_backward_alpha_tensor", mutates_args=(), tags=_TAGS)
def lif_backward_alpha_tensor(grad_spikes: torch.Tensor, grad_v_last: Optional[torch.Tensor],
                              grad_v_seq: Optional[torch.Tensor], h_seq: torch.Tensor,
                              v_init: Optional[torch.Tensor], decay: torch.Tensor,
                              v_threshold: torch.Tensor, v_reset: Optional[float], surrogate: int,
                              alpha: torch.Tensor, flags: int, backend: str) -> _Outputs:
    """lif_backward with alpha read from a one-element tensor when it runs."""
    _, backward = _kernels(backend)
    args = (grad_spikes, grad_v_last, grad_v_seq, h_seq, v_init, decay, v_threshold, v_reset,
            surrogate, _alpha(alpha), flags)
    return _registration.call_op(backward, args, False)


@lif_forward_alpha_tensor.register_fake
def _(x, v_init, decay, v_threshold, v_reset, surrogate, alpha, flags, backend):
    return _registration._fake_lif_forward(x, v_init, decay, v_threshold, v_reset, surrogate,
                                           1.0, flags)


@lif_backward_alpha_tensor.register_fake
def _(grad_spikes, grad_v_last, grad_v_seq, h_seq, v_init, decay, v_threshold, v_reset,
      surrogate, alpha, flags, backend):
    return _registration._fake_lif_backward(grad_spikes, grad_v_last, grad_v_seq, h_seq, v_init,
                                            decay, v_threshold, v_reset, surrogate, 1.0, flags)


def _setup(ctx, inputs, output):
    *op_inputs, backend = inputs
    alpha = op_inputs[6]
    # the lif_forward setup, with alpha saved after its tensors (a tensor kept on ctx as an
    # attribute is not one autograd or AOT tracing knows to keep)
    _registration._lif_setup(ctx, tuple(op_inputs), output, also_saved=(alpha,))
    ctx.scalars = ctx.scalars[:2]  # (v_reset, surrogate): alpha comes from the saved tensors
    ctx.backend = backend
    ctx.num_inputs = len(inputs)


def _backward(ctx, g_spikes, g_v_last, g_h, g_v_seq):
    tensors, flags = _registration.backward_tensors(ctx, g_spikes, g_v_last, g_v_seq)
    alpha = ctx.saved_tensors[-1]
    gx, gv, gd, gt = lif_backward_alpha_tensor(*tensors, *ctx.scalars, alpha, flags, ctx.backend)
    needs = ctx.needs_input_grad[:4]
    grads = tuple(g if need else None for g, need in zip((gx, gv, gd, gt), needs))
    return grads + (None,) * (ctx.num_inputs - 4)


# alpha is a hyperparameter: eager reads it as a number, so no gradient reaches it (a parameter
# alpha gets none in either mode)
_autograd.register_constant("pypaper::checked_alpha")
_autograd.register_autograd("pypaper::lif_forward_alpha_tensor", _backward, setup_context=_setup)
_autograd.register_no_backward(
    "pypaper::lif_backward_alpha_tensor",
    "the backward of lif_forward_alpha_tensor, which runs inside graphs torch.compile built "
    "(torch.compile does not differentiate those twice; eager double backward runs lif_backward)")


def ops(backend: str):
    """The (forward, backward) pair lif_multi_step calls for ``backend`` with a tensor alpha."""
    _kernels(backend)
    return (torch.ops.pypaper.lif_forward_alpha_tensor.default,
            torch.ops.pypaper.lif_backward_alpha_tensor.default)
