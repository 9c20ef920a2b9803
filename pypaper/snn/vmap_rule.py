"""The LIF ops under torch.func.vmap: one call with the batch folded into the feature dims.

Each neuron's time loop is independent of every other's, so a vmap over the ops is the same op
over more neurons. A batched sequence [B, T, N, *F] becomes [T, N, B, *F]: T stays the scan axis,
the feature shape becomes (B, *F), and the ops' per-neuron parameters (one value or one per
feature, broadcast over N) carry one value per sample, or per sample and feature:

- a parameter batched over the samples (models stacked by torch.func.stack_module_state, a
  different tau per sample) becomes a per-neuron parameter of shape [B, *F];
- an unbatched one that is one value stays one value; one per feature is expanded to [B, *F];
- in the backward, a parameter whose gradient is asked for is always expanded to [B, *F], so that
  the kernel's reduction (over time and N) gives one gradient per sample and feature; a parameter
  of one value per sample then sums its F dims in torch. That is the gradient vmap(grad(...))
  wants (per-sample gradients), where a fold into N would have summed over the samples.

Without this rule vmap ran the op once per sample (pypaper/_autograd.py's fallback loop): per-sample
gradients of a Linear + LIFNode + Linear model, batch 64, T = 8, 256 neurons: see README's
"torch.func and forward-mode AD". Values equal the per-sample loop's (the same kernel on the same
numbers; a parameter gradient's sum may associate differently).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _autograd
from . import op_flags


def _sequence(t, dim, batch):
    """[T, N, *F] per sample -> [T, N, B, *F] (None stays None)."""
    t = _autograd.batch_first(t, dim, batch)
    if t is None:
        return None
    if t.dim() < 3:
        raise ValueError(f"the LIF ops take sequences of shape [T, N, *] (at least 2 dims) per "
                         f"sample, got shape {tuple(t.shape[1:])} under vmap")
    return t.movedim(0, 2)


def _state(t, dim, batch):
    """[N, *F] per sample -> [N, B, *F]."""
    t = _autograd.batch_first(t, dim, batch)
    return None if t is None else t.movedim(0, 1)


def _parameter(p: torch.Tensor, dim: Optional[int], batch: int, features: tuple,
               per_sample: bool) -> torch.Tensor:
    """A parameter for the folded op (feature shape (B, *F)): one value stays one value when it
    is unbatched and ``per_sample`` is not asked for; otherwise [B, *F]. Per sample, p is one
    value (any shape of numel 1) or of shape F, as the ops take it."""
    if dim is None and not per_sample:
        return p if p.numel() == 1 else p.expand(batch, *features)
    p = _autograd.batch_first(p, dim, batch)
    if p.shape[1:].numel() == 1:
        p = p.reshape(batch, *([1] * len(features)))
    return p.expand(batch, *features)


def _parameter_grad(g: torch.Tensor, sample_shape: tuple, batch: int) -> torch.Tensor:
    """The folded op's [B, *F] gradient of a parameter back to [B, *sample shape]: a parameter of
    one value per sample sums its features."""
    if g.dim() == 0 or g.shape[0] != batch:  # can only be an unbatched one-value zero gradient
        return g.reshape(sample_shape).unsqueeze(0).expand(batch, *sample_shape)
    if len(sample_shape) == 0 or torch.Size(sample_shape).numel() == 1:
        return g.reshape(batch, -1).sum(1).reshape(batch, *sample_shape)
    return g


def make_forward_rule(op):
    """The batching rule of lif_forward (``op``: the C++ or the Triton overload)."""
    def rule(info, in_dims, x, v_init, decay, v_threshold, v_reset, surrogate, alpha, flags):
        b = info.batch_size
        dx, dv, dd, dt = in_dims[:4]
        xs = _sequence(x, dx, b)
        features = tuple(xs.shape[3:])
        outs = op(xs, _state(v_init, dv, b),
                  _parameter(decay, dd, b, features, False),
                  _parameter(v_threshold, dt, b, features, False),
                  v_reset, surrogate, alpha, flags)
        keep_h, store = flags & op_flags.KEEP_H, flags & op_flags.STORE_V_SEQ
        return outs, (2, 1, 2 if keep_h else None, 2 if store else None)

    return rule


def make_backward_rule(op):
    """The batching rule of lif_backward (``op``: the C++ or the Triton overload)."""
    def rule(info, in_dims, grad_spikes, grad_v_last, grad_v_seq, h_seq, v_init, decay,
             v_threshold, v_reset, surrogate, alpha, flags):
        b = info.batch_size
        d_gs, d_gvl, d_gvs, d_h, d_v, dd, dt = in_dims[:7]
        gs = _sequence(grad_spikes, d_gs, b)
        features = tuple(gs.shape[3:])
        need_d = bool(flags & op_flags.NEED_DECAY_GRAD)
        need_t = bool(flags & op_flags.NEED_THRESHOLD_GRAD)
        gx, gv, gd, gt = op(gs, _state(grad_v_last, d_gvl, b), _sequence(grad_v_seq, d_gvs, b),
                            _sequence(h_seq, d_h, b), _state(v_init, d_v, b),
                            _parameter(decay, dd, b, features, need_d),
                            _parameter(v_threshold, dt, b, features, need_t),
                            v_reset, surrogate, alpha, flags)
        gd = _parameter_grad(gd, _autograd.sample_shape(decay, dd), b)
        gt = _parameter_grad(gt, _autograd.sample_shape(v_threshold, dt), b)
        return (gx, gv, gd, gt), (2, 1, 0, 0)

    return rule


def register(suffix: str = "") -> None:
    """Batching rules of lif_forward{suffix} and lif_backward{suffix} (the C++ ops, or with
    "_triton" their Triton twins: the same signatures)."""
    ops = torch.ops.pypaper
    _autograd.register_vmap(f"pypaper::lif_forward{suffix}",
                            make_forward_rule(getattr(ops, f"lif_forward{suffix}").default))
    _autograd.register_vmap(f"pypaper::lif_backward{suffix}",
                            make_backward_rule(getattr(ops, f"lif_backward{suffix}").default))
