"""Online SLTT training: forward and backward per time step, memory independent of T.

SLTT (Meng et al., "Towards Memory- and Time-Efficient Backpropagation for Training Spiking Neural
Networks", ICCV 2023) drops the temporal part of BPTT's gradient: the membrane enters each charge
detached, so step t's gradient flows only through the spatial path (dL/dH[t] = dL/dS[t] sigma'),
and each step can be backpropagated as soon as it is computed. The per-step loss is loss_fn(out_t,
target) / T and parameter gradients accumulate over the steps, so activation memory is one step's
graph whatever T is. SLTT-K backpropagates only K random steps (the others run under no_grad).
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
from torch import nn

from .functional import reset_net, step_mode_modules
from .neuron import BaseNode


class OnlineStep(NamedTuple):
    loss: float              # sum over the trained steps of loss_fn(out_t, target) / T
    output: torch.Tensor     # mean over all T steps of the model's output (detached)
    trained_steps: list      # the time steps whose gradient was taken


def _neurons(model: nn.Module) -> list:
    found = [m for m in model.modules() if isinstance(m, BaseNode)]
    if not found:
        raise ValueError("model has no pypaper.snn neurons (LIFNode / ParametricLIFNode)")
    return found


# Containers that run their children over a [T, N, *] sequence only (SpikingJelly's, matched by
# name so that spikingjelly need not be imported; pypaper's declare supported_step_modes ('m',)):
# stepped online they would take the batch dim of a [N, *] step for time.
_MULTI_STEP_ONLY = frozenset(("MultiStepContainer", "SeqToANNContainer",
                              "TLastMultiStepContainer", "TLastSeqToANNContainer"))


def _refuse_multi_step_only(model: nn.Module) -> None:
    for name, m in model.named_modules():
        modes = getattr(m, "supported_step_modes", None)
        if type(m).__name__ in _MULTI_STEP_ONLY or (modes is not None and "s" not in modes):
            raise ValueError(
                f"train_step_online runs the model one time step at a time, but "
                f"{name or 'model'} ({type(m).__name__}) runs only on [T, N, *] sequences (it "
                f"would read a step's batch dim as time); use its layers unwrapped (pypaper.snn."
                f"layer's modules and neurons take both step modes)")


def _foreign_memories(model: nn.Module, neurons: list) -> list:
    """Stateful modules that are not pypaper neurons (SpikingJelly's MemoryModules: a neuron
    convert() left, a QIFNode, a SynapseFilter): a reset() and a detach()."""
    ours = {id(n) for n in neurons}
    return [m for m in model.modules() if id(m) not in ours
            and callable(getattr(m, "reset", None)) and callable(getattr(m, "detach", None))]


def train_step_online(model: nn.Module, x_seq: torch.Tensor, target, loss_fn: Callable,
                      optimizer: Optional[torch.optim.Optimizer] = None, k: Optional[int] = None,
                      generator: Optional[torch.Generator] = None) -> OnlineStep:
    """One SLTT training step on a batch.

    ``model`` maps one time step [N, *] to an output: its neurons are switched to step_mode 's'
    and ``sltt=True`` for the call (and restored after), and reset before and after. Other
    stateful modules (SpikingJelly's) have their state detached after each step; a container
    that runs only on sequences (SeqToANNContainer, MultiStepContainer) is refused. ``x_seq``:
    [T, N, *] (a static input repeated over time can be ``x.expand(T, *x.shape)``). ``k``: SLTT-K,
    the number of random steps to backpropagate (None: all T), drawn with ``generator``.
    With ``optimizer``: zero_grad before, step after; without it the gradients are left in .grad
    (added to what is there).
    """
    if not isinstance(x_seq, torch.Tensor) or x_seq.dim() < 2:
        raise ValueError("x_seq must be a tensor of shape [T, N, *]")
    steps = x_seq.shape[0]
    if steps < 1:
        raise ValueError("x_seq has no time steps (T = x_seq.shape[0] = 0): nothing to train on")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= steps):
        raise ValueError(f"k must be an integer in 1..T ({steps}), got {k!r}")
    neurons = _neurons(model)
    _refuse_multi_step_only(model)
    foreign = _foreign_memories(model, neurons)
    saved = [(m.step_mode, m.sltt) for m in neurons]
    # every other step-mode module (SpikingJelly's layer.Conv2d, BatchNorm2d, ...) runs single
    # step too, and gets its mode back after
    # (a module that runs in 'm' only, a SeqToANNContainer, is left alone: set_step_mode's rule)
    others = [m for m in step_mode_modules(model) if not any(m is n for n in neurons)
              and "s" in getattr(m, "supported_step_modes", ("s", "m"))]
    others_saved = [m.step_mode for m in others]
    if k is None:
        trained = list(range(steps))
    else:
        trained = sorted(torch.randperm(steps, generator=generator)[:k].tolist())
    chosen = set(trained)
    try:
        for m in neurons:
            m.step_mode, m.sltt = "s", True
        for m in others:
            m.step_mode = "s"
        reset_net(model)
        if optimizer is not None:
            optimizer.zero_grad()
        total, out_sum = 0.0, None
        # An x_seq that requires grad (a leaf: adversarial training, saliency; or an encoder's
        # output): each step runs on a detached leaf of its own row; after the loop (a later
        # step's backward can still reach an earlier row through state a model keeps outside its
        # neurons) their gradients go into x_seq by one backward, which accumulates, runs
        # x_seq's hooks and, for an encoder's output, backpropagates through the encoder once
        # (the sum of the steps' row gradients, by linearity). Through x_seq[t] each step's
        # backward zero-filled a whole [T, ...] gradient to accumulate one row of it (O(T^2)
        # memory traffic per call), and an encoder's graph was freed by the first step's
        # backward, so the second step raised autograd's "backward through the graph a second
        # time".
        rows = {} if x_seq.requires_grad and torch.is_grad_enabled() else None
        for t in range(steps):
            if t in chosen:
                xt = x_seq[t]
                if rows is not None:
                    xt = rows[t] = xt.detach().requires_grad_()
                out = model(xt)
                loss = loss_fn(out, target) / steps
                loss.backward()
                total += float(loss.detach())
            else:
                with torch.no_grad():
                    out = model(x_seq[t])
            out = out.detach()
            out_sum = out if out_sum is None else out_sum + out
            # their state still holds this step's (freed) graph: detached, their temporal
            # gradient is dropped as SLTT drops the neurons' (the next step's backward raised
            # autograd's "backward through the graph a second time")
            for m in foreign:
                m.detach()
        if rows and any(r.grad is not None for r in rows.values()):
            x_grad = torch.zeros_like(x_seq)
            for t, r in rows.items():
                if r.grad is not None:
                    x_grad[t] = r.grad
            x_seq.backward(x_grad)
        if optimizer is not None:
            optimizer.step()
    finally:
        for m, (mode, sl) in zip(neurons, saved):
            m.step_mode, m.sltt = mode, sl
        for m, mode in zip(others, others_saved):
            m.step_mode = mode
        reset_net(model)
    return OnlineStep(total, out_sum / steps, trained)


__all__ = ["OnlineStep", "train_step_online"]
