"""The hopfield retrieval ops under torch.func.vmap: the vmap batch folded into the op's own batch.

Per sample the op takes q [B, H, L, d], k [B, H, S, d], v [B, H, S, dv]; a vmap over V samples
becomes one call on [V*B, ...] (an unbatched k or v is expanded to every sample, a copy), the
outputs split back into [V, B, ...]. Every batch row is retrieved on its own except for one
thing: a head keeps updating while the largest change over the op's batch is above eps, so with
update steps a folded call could run a sample's head for longer than the sample alone. The forward
folds only where no head updates (steps = 0 for every head: one softmax, attention; hflayers'
default ``update_steps_max=0``); otherwise the rule runs it once per sample, padding the saved
states of unbounded heads (whose counts differ per sample) to the largest. The backward folds
whenever the step counts (nsteps) are one for all samples (unbatched): it has no coupling across
the batch.

Per-sample gradients of stored patterns (a HopfieldLayer's k, v made from parameters) come out
per sample and batch row, as vmap(grad(...)) wants them.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _autograd


def _fold(t: Optional[torch.Tensor], dim: Optional[int], batch: int,
          rows: Optional[int] = None) -> Optional[torch.Tensor]:
    """[V, B, *rest] (batched along ``dim``, or unbatched and expanded) -> [V*B, *rest]. ``rows``:
    B, to which a per-sample size-1 leading dim (a broadcasting mask) is expanded; None keeps a
    tensor's own leading size."""
    if t is None:
        return None
    t = _autograd.batch_first(t, dim, batch)
    if rows is not None and t.shape[1] != rows:
        t = t.expand(t.shape[0], rows, *t.shape[2:])
    return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])


def _mask(m, dim, batch, rows):
    """attn_mask / pad_mask: unbatched and broadcast over the op's batch (leading size 1) it
    stays as it is; otherwise folded like the inputs, a leading size 1 expanded to the rows."""
    if m is None or (dim is None and m.shape[0] == 1):
        return m
    return _fold(m, dim, batch, rows)


def _split(t: torch.Tensor, at: int, batch: int, rows: int) -> torch.Tensor:
    """Dim ``at`` of size V*B -> two dims (V, B): ``batch`` V, ``rows`` B (given, not divided
    out: V may be 0)."""
    return t.reshape(*t.shape[:at], batch, rows, *t.shape[at + 1:])


def _rows(t: torch.Tensor, dim: Optional[int]) -> int:
    """B, the op's batch size: the leading size of one sample of t."""
    return t.shape[1 if dim == 0 else 0] if dim is not None else t.shape[0]


def _per_sample(op, n, in_dims, args):
    """The op once per sample, outputs stacked along a new dim 0. With unbounded heads (steps
    -1) the samples' state counts differ: states and lse are padded with zeros to the largest,
    slots the backward never reads (it stops at nsteps, as for a head that converged before
    its limit)."""
    outs = [op(*[a if d is None or not isinstance(a, torch.Tensor) else a.select(d, i)
                 for a, d in zip(args, in_dims)]) for i in range(n)]
    if not outs:
        return NotImplemented
    slots = max(o[1].shape[0] for o in outs)

    def pad(t, size):
        if t.shape[0] == size:
            return t
        return torch.cat((t, t.new_zeros((size - t.shape[0], *t.shape[1:]))))

    out = torch.stack([o[0] for o in outs])
    states = torch.stack([pad(o[1], slots) for o in outs])
    lse = torch.stack([pad(o[2], slots + 1) for o in outs])
    nsteps = torch.stack([o[3] for o in outs])
    return (out, states, lse, nsteps), (0, 0, 0, 0)


def make_forward_rule(op):
    def rule(info, in_dims, q, k, v, beta, steps, eps, attn_mask=None, pad_mask=None):
        n = info.batch_size
        if any(s != 0 for s in steps):  # update steps: convergence is judged over the batch
            return _per_sample(op, n, tuple(in_dims) + (None,) * (8 - len(in_dims)),
                               (q, k, v, beta, steps, eps, attn_mask, pad_mask))
        dq, dk, dv, _, _, _, dm, dp = (tuple(in_dims) + (None,) * 8)[:8]
        rows = _rows(q, dq)
        out, states, lse, nsteps = op(_fold(q, dq, n), _fold(k, dk, n), _fold(v, dv, n), beta,
                                      steps, eps, _mask(attn_mask, dm, n, rows),
                                      _mask(pad_mask, dp, n, rows))
        return ((_split(out, 0, n, rows), _split(states, 1, n, rows), _split(lse, 1, n, rows),
                 nsteps), (0, 1, 1, None))

    return rule


def make_backward_rule(op):
    def rule(info, in_dims, grad_out, q, k, v, out, states, lse, nsteps, beta, attn_mask=None,
             pad_mask=None):
        d = (tuple(in_dims) + (None,) * 11)[:11]
        if d[7] is not None:
            return NotImplemented  # step counts per sample: the forward ran sample by sample
        n = info.batch_size
        qf = _fold(q, d[1], n)
        rows = _rows(q, d[1])
        # states [steps, B, ...] and lse [steps + 1, B, ...]: the op's batch is their dim 1
        st = _autograd.batch_first(states, d[5], n)
        ls = _autograd.batch_first(lse, d[6], n)
        st = st.movedim(0, 1).reshape(st.shape[1], n * st.shape[2], *st.shape[3:])
        ls = ls.movedim(0, 1).reshape(ls.shape[1], n * ls.shape[2], *ls.shape[3:])
        gq, gk, gv = op(_fold(grad_out, d[0], n), qf, _fold(k, d[2], n), _fold(v, d[3], n),
                        _fold(out, d[4], n), st, ls, nsteps, beta,
                        _mask(attn_mask, d[9], n, rows), _mask(pad_mask, d[10], n, rows))
        return (_split(gq, 0, n, rows), _split(gk, 0, n, rows), _split(gv, 0, n, rows)), (0, 0, 0)

    return rule


def register(suffix: str = "") -> None:
    """Batching rules of hopfield_retrieve{suffix} and its backward (C++ or Triton twins)."""
    ops = torch.ops.pypaper
    _autograd.register_vmap(f"pypaper::hopfield_retrieve{suffix}",
                            make_forward_rule(getattr(ops, f"hopfield_retrieve{suffix}").default))
    _autograd.register_vmap(
        f"pypaper::hopfield_retrieve_backward{suffix}",
        make_backward_rule(getattr(ops, f"hopfield_retrieve_backward{suffix}").default))
