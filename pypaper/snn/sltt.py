"""Online SLTT training: forward and backward per time step, memory independent of T.

SLTT (Meng et al., "Towards Memory- and Time-Efficient Backpropagation for Training Spiking Neural
Networks", ICCV 2023) drops the temporal part of BPTT's gradient: the membrane enters each charge
detached, so step t's gradient flows only through the spatial path (dL/dH[t] = dL/dS[t] sigma'),
and each step can be backpropagated as soon as it is computed. The per-step loss is loss_fn(out_t,
target) / T and parameter gradients accumulate over the steps, so activation memory is one step's
graph whatever T is. SLTT-K backpropagates only K random steps (the others run under no_grad).
"""
from __future__ import annotations

import contextlib
import operator
from typing import Any, Callable, NamedTuple, Optional

import torch
from torch import nn
from torch.utils import _pytree

from .delays import DelayedLinear
from .functional import reset_net, step_mode_modules
from .neuron import _is_own


class OnlineStep(NamedTuple):
    loss: float              # sum over the trained steps of loss_fn(out_t, target) / T
    output: Any              # mean over all T steps of the model's output (detached; a tuple /
                             # dict output keeps its structure, each tensor in it averaged)
    trained_steps: list      # the time steps whose gradient was taken


def _spikingjelly_neuron_names(model: nn.Module) -> list:
    """'name (Class)' of the modules of model that come from SpikingJelly's neuron package."""
    found = []
    for name, m in model.named_modules():
        where = getattr(type(m), "__module__", "") or ""
        if where.startswith("spikingjelly.activation_based.neuron"):
            found.append(f"{name or 'model'} ({type(m).__name__})")
    return found


def _neurons(model: nn.Module) -> list:
    # pypaper's own neurons (_is_own): isinstance(m, BaseNode) is True for SpikingJelly's
    # BaseNodes too, which the online step cannot drive (no sltt flag, their own loop); they
    # stay foreign memories, reset and detached per step (_foreign_memories)
    found = [m for m in model.modules() if _is_own(m)]
    if not found:
        theirs = _spikingjelly_neuron_names(model)
        hint = ""
        if theirs:
            # a ported SpikingJelly SLTT script: its neurons (SLTTLIFNode, LIFNode, ...) are not
            # pypaper's; said as "no neurons" the model looked empty to its user
            hint = (f"; it holds SpikingJelly's neurons {', '.join(theirs[:4])}"
                    f"{' ...' if len(theirs) > 4 else ''}: swap them with "
                    f"model = pypaper.snn.convert(model, sltt=True) first")
        raise ValueError(f"model has no pypaper.snn neurons (IFNode / LIFNode / "
                         f"ParametricLIFNode){hint}")
    return found


# Containers that run their children over a [T, N, *] sequence only, matched by name (SpikingJelly
# 0.0.0.0.14's have no supported_step_mode(); spikingjelly need not be imported): stepped online
# they would take the batch dim of a [N, *] step for time.
_MULTI_STEP_ONLY = frozenset(("MultiStepContainer", "SeqToANNContainer",
                              "TLastMultiStepContainer", "TLastSeqToANNContainer"))


def _single_step_modes(m: nn.Module) -> bool:
    """Whether m can run one [N, *] step: pypaper's layers declare ``supported_step_modes``,
    SpikingJelly 2.0's modules ``supported_step_mode()`` (its base.MultiStepModule: ('m',) -- PSN,
    TemporalWiseAttention, the threshold-dependent BatchNorms, TemporalBinSum, ...; PSN has no
    step_mode to switch, so nothing else stops it)."""
    if type(m).__name__ in _MULTI_STEP_ONLY:
        return False
    modes = getattr(m, "supported_step_modes", None)
    if modes is None and callable(getattr(m, "supported_step_mode", None)):
        modes = m.supported_step_mode()
    return modes is None or "s" in modes


def _refuse_multi_step_only(model: nn.Module) -> None:
    for name, m in model.named_modules():
        where = f"{name or 'model'} ({type(m).__name__})"
        if isinstance(m, DelayedLinear):
            # y[t] = b + sum_i w sum_d g(d) x[t - d]: step t reads the inputs of the past
            # max_delay - 1 steps, which a per-step call does not have. A [N, C] step raised the
            # layer's own shape error; a [N, L, C] step was read as a sequence over the batch.
            raise ValueError(
                f"train_step_online runs the model one time step at a time, but {where} reads "
                f"the inputs of the past time steps (up to max_delay - 1 = {m.max_delay - 1}) "
                f"and needs the whole [T, N, C] sequence; train it with BPTT (or the neurons' "
                f"sltt=True) on the sequence in step_mode 'm'")
        if not _single_step_modes(m):
            raise ValueError(
                f"train_step_online runs the model one time step at a time, but "
                f"{where} runs only on [T, N, *] sequences (it "
                f"would read a step's batch dim as time); use its layers unwrapped (pypaper.snn."
                f"layer's modules and neurons take both step modes)")


def _foreign_memories(model: nn.Module, neurons: list) -> list:
    """Stateful modules that are not pypaper neurons (SpikingJelly's MemoryModules: a neuron
    convert() left, a QIFNode, a SynapseFilter): a reset() and a detach()."""
    ours = {id(n) for n in neurons}
    return [m for m in model.modules() if id(m) not in ours
            and callable(getattr(m, "reset", None)) and callable(getattr(m, "detach", None))]


def _detach_foreign(m: nn.Module) -> None:
    """m.detach(), then the tensors held in list / tuple memories: SpikingJelly's MemoryModule.
    detach() detaches tensor memories only, and SlidingPSN keeps its last k inputs in a list
    (queue), whose tensors still held the previous steps' freed graphs (the next step's backward
    raised autograd's "backward through the graph a second time"). Rebound, not detach_(): the
    queue's entries are views (x.flatten()), which cannot be detached in place."""
    m.detach()
    memories = m.__dict__.get("_memories")
    if not isinstance(memories, dict):
        return
    for key, value in list(memories.items()):
        if type(value) in (list, tuple) and any(isinstance(v, torch.Tensor) for v in value):
            setattr(m, key, type(value)(v.detach() if isinstance(v, torch.Tensor) else v
                                        for v in value))


def _detached(tree):
    return _pytree.tree_map(lambda o: o.detach() if isinstance(o, torch.Tensor) else o, tree)


def _add(total, tree):
    """total + tree leaf by leaf for the tensors (the time sum of the outputs); a leaf that is not
    a tensor keeps the latest step's value."""
    if total is None:
        return tree
    return _pytree.tree_map(lambda a, b: a + b if isinstance(b, torch.Tensor) else b, total, tree)


def _shape_of(tree) -> str:
    """The shapes of the tensors in an output or target, for a message."""
    if isinstance(tree, torch.Tensor):
        return f"tensor of shape {tuple(tree.shape)}"
    leaves = _pytree.tree_leaves(tree)
    shapes = [tuple(v.shape) for v in leaves if isinstance(v, torch.Tensor)]
    return f"{type(tree).__name__} of tensors of shapes {shapes}" if shapes else type(tree).__name__


def _step_loss(loss_fn: Callable, out, target, t: int, steps: int):
    """loss_fn(out, target) for step t, its error said with the shapes involved: a target of one
    label per step ([T, N]) or the [T, N, *] outputs of a BPTT loss gave torch's message about a
    batch size of T, which did not say that each step's [N, *] output meets the whole target."""
    try:
        return loss_fn(out, target)
    except (RuntimeError, ValueError, IndexError) as err:
        message = (f"loss_fn(output, target) failed on time step {t}: {err}\n(output: "
                   f"{_shape_of(out)}, the model's output for the one step [N, *]; target: "
                   f"{_shape_of(target)}, passed whole to every step's loss_fn)")
        if isinstance(target, torch.Tensor) and target.dim() >= 2 and target.shape[0] == steps:
            message += (f"; a target with one entry per time step (T = {steps} rows) is not "
                        f"split: give the target all steps share (SLTT's loss is "
                        f"sum_t loss_fn(out_t, target) / T)")
        try:
            wrapped = type(err)(message)
        except Exception:  # an exception class that takes other arguments: its own message
            raise err from None
        raise wrapped from err


def _scalar_loss(loss):
    """The step's loss, checked: autograd's own errors for a per-sample loss ('grad can be
    implicitly created only for scalar outputs') or a float named neither loss_fn nor the
    shape."""
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"loss_fn must return a tensor (a scalar loss to backpropagate), got "
                        f"{type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(f"loss_fn must return a scalar (one-element) loss, got shape "
                         f"{tuple(loss.shape)}; reduce it (e.g. reduction='mean')")
    return loss


def _no_sync_unless_last(model: nn.Module, last: bool):
    """DDP's no_sync() for every trained step but the last. DDP all-reduces the gradients at
    each backward; T backwards per call would all-reduce T times (T - 1 of them wasted: the
    gradient of a call is the sum over its steps, and all-reducing the sum once gives the same
    average). Under no_sync the steps' gradients accumulate locally in .grad, and the last
    step's backward all-reduces them all."""
    if last or not isinstance(model, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()


def train_step_online(model: nn.Module, x_seq: torch.Tensor, target, loss_fn: Callable,
                      optimizer: Optional[torch.optim.Optimizer] = None, k: Optional[int] = None,
                      generator: Optional[torch.Generator] = None,
                      scaler: Optional[torch.amp.GradScaler] = None) -> OnlineStep:
    """One SLTT training step on a batch.

    ``model`` maps one time step [N, *] to an output: its neurons (pypaper's; a model built with
    SpikingJelly's, its ``SLTTLIFNode`` included, takes ``pypaper.snn.convert(model, sltt=True)``
    first) are switched to step_mode 's'
    and ``sltt=True`` for the call (and restored after), and reset before and after. Other
    stateful modules (SpikingJelly's) have their state detached after each step; a module that
    runs only on sequences (SeqToANNContainer, MultiStepContainer, SpikingJelly's MultiStepModules
    such as PSN, DelayedLinear) is refused. ``loss_fn(output, target)`` gets the model's output as
    it is (a tuple or dict too) and must return a scalar tensor. A BatchNorm runs on each step's
    [N, *] batch (its running statistics updated once per step, as the SLTT authors' per-step
    loop does), not on the [T * N, *] batch of the model in step_mode 'm'. ``x_seq``:
    [T, N, *] (a static input repeated over time can be ``x.expand(T, *x.shape)``). ``k``: SLTT-K,
    the number of random steps to backpropagate (None: all T), drawn with ``generator``.
    With ``optimizer``: zero_grad before, step after; without it the gradients are left in .grad
    (added to what is there). ``scaler``: a ``torch.amp.GradScaler`` for float16 autocast (needs
    ``optimizer``): each step's loss is scaled before its backward, then ``scaler.step`` (which
    skips the step when a gradient is inf or NaN) and ``scaler.update()``; ``loss`` reports the
    unscaled loss. A ``DistributedDataParallel`` model all-reduces once per call: every trained
    step but the last runs in its ``no_sync()``, and the last one's backward reduces the gradients
    accumulated over all of them (the sum's average is the average's sum).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(x_seq, torch.Tensor) or x_seq.dim() < 2:
        raise ValueError("x_seq must be a tensor of shape [T, N, *]")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(output, target), got "
                        f"{type(loss_fn).__name__}")
    if optimizer is not None and not (callable(getattr(optimizer, "step", None))
                                      and callable(getattr(optimizer, "zero_grad", None))):
        # checked first: a module given in its place (it has zero_grad) zeroed its gradients
        # and failed only after the whole forward and backward
        raise TypeError(f"optimizer must be a torch.optim.Optimizer (with step() and "
                        f"zero_grad()) or None, got {type(optimizer).__name__}")
    steps = x_seq.shape[0]
    if steps < 1:
        raise ValueError("x_seq has no time steps (T = x_seq.shape[0] = 0): nothing to train on")
    if k is not None:
        # any integer (a numpy integer, a 0-d integer tensor from a config or a schedule), not a
        # bool and not a float
        k_given = k
        try:
            k = None if isinstance(k, bool) else operator.index(k)
        except TypeError:
            k = None
        if k is None or not 1 <= k <= steps:
            raise ValueError(f"k must be an integer in 1..T ({steps}), got {k_given!r}")
    if scaler is not None and optimizer is None:
        raise ValueError("scaler needs optimizer: the scaled gradients are unscaled and checked "
                         "by scaler.step(optimizer)")
    neurons = _neurons(model)
    _refuse_multi_step_only(model)
    foreign = _foreign_memories(model, neurons)
    saved = [(m.step_mode, m.sltt) for m in neurons]
    # every other step-mode module (SpikingJelly's layer.Conv2d, BatchNorm2d, ...) runs single
    # step too, and gets its mode back after (_refuse_multi_step_only has refused those that
    # cannot)
    others = [m for m in step_mode_modules(model) if not any(m is n for n in neurons)]
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
                with _no_sync_unless_last(model, t == trained[-1]):
                    out = model(xt)
                    loss = _scalar_loss(_step_loss(loss_fn, out, target, t, steps)) / steps
                    if not loss.requires_grad:
                        # autograd's 'element 0 of tensors does not require grad' named none of
                        # the causes
                        raise RuntimeError(
                            f"the loss of time step {t} does not require grad: nothing to train "
                            f"(train_step_online was called under torch.no_grad() or "
                            f"torch.inference_mode(), or no parameter of model and not x_seq "
                            f"requires grad)")
                    (loss if scaler is None else scaler.scale(loss)).backward()
                total += float(loss.detach())
            else:
                with torch.no_grad():
                    out = model(x_seq[t])
            out_sum = _add(out_sum, _detached(out))
            # their state still holds this step's (freed) graph: detached, their temporal
            # gradient is dropped as SLTT drops the neurons' (the next step's backward raised
            # autograd's "backward through the graph a second time")
            for m in foreign:
                _detach_foreign(m)
        if rows and any(r.grad is not None for r in rows.values()):
            x_grad = torch.zeros_like(x_seq)
            for t, r in rows.items():
                if r.grad is not None:
                    x_grad[t] = r.grad
            x_seq.backward(x_grad)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        elif optimizer is not None:
            optimizer.step()
    finally:
        for m, (mode, sl) in zip(neurons, saved):
            m.step_mode, m.sltt = mode, sl
        for m, mode in zip(others, others_saved):
            m.step_mode = mode
        reset_net(model)
    mean = _pytree.tree_map(lambda o: o / steps if isinstance(o, torch.Tensor) else o, out_sum)
    return OnlineStep(total, mean, trained)


__all__ = ["OnlineStep", "train_step_online"]
