"""Activation checkpointing for blocks of spiking layers: torch.utils.checkpoint that gives
stateful neurons their own state back when it recomputes.

    from pypaper.snn import functional
    y = functional.checkpoint(block, x_seq)      # instead of torch.utils.checkpoint(block, x_seq)

Why. torch.utils.checkpoint keeps a block's inputs, drops the activations inside it, and runs
the block's forward again during backward to get them back. It asks the block to be a function
of its inputs; a spiking neuron is not: its membrane v carries across calls (SpikingJelly's
MemoryModule, pypaper's neurons). By the time the backward recomputes, the forward has moved v
on, so the recompute starts from the wrong membrane and the gradients are silently wrong
(SpikingJelly's neurons and pypaper's alike: a block called twice without reset, under
torch.utils.checkpoint, gave x.grad 7.0763 against 7.0839 without checkpointing), and the
recompute leaves v wherever it stopped.

What this does. The forward runs under a context that records every stateful module's state as
the block starts (references to its tensors: the neurons and Dropout rebind their state; a
memory that a module writes in place, as SpikingJelly 2.0's MemoryModule.reset does for a tensor
reset value of the same shape, is not recorded by value). The recompute runs under one that
sets that state, and sets back the state the modules hold at that moment when it ends, also
when torch stops the recompute early (it raises once it has what it needs), and each time a
second backward recomputes again. So the recompute is the forward, to the bit, and the model's
state is untouched by the backward. Checkpointing each time step of a single-step loop works the
same way (each call records its own start).

State, per module of the block: SpikingJelly's memories (``named_memories()``: pypaper's neurons
give v and the memories a subclass registers; SpikingJelly's MemoryModule its ``_memories``),
plus ``v_seq``, pypaper's Dropout ``mask``, DelayedLinear's sigma and a neuron's configuration
held as plain attributes (tau, v_threshold, v_reset, decay_input, detach_reset: a schedule may
set them between the forward and the backward); the running statistics of normalization layers in
training mode are put back after the recompute (counted once). Parameters are not state: an
optimizer step between the forward and the backward breaks torch's checkpoint for any layer.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Optional

import torch
from torch import nn

# plain attributes that carry across calls, or that a call reads and a later call may find changed:
# DelayedLinear's sigma (float and tensor) is the forward's in the recompute too, as the plain
# layer's backward keeps the forward's sigma; so are a neuron's numbers and flags (pypaper's and
# SpikingJelly's keep them as plain attributes; a Parameter or buffer of that name is not in
# __dict__ and is not recorded): a schedule that sets tau, v_threshold or v_reset between the
# forward and the backward gave silently wrong gradients (tau, v_threshold: the op's backward
# keeps the forward's values, the recompute read the new ones) or a CheckpointError (v_reset)
_EXTRA_STATE = ("v_seq", "mask", "_sigma", "_sigma_t",
                "tau", "v_threshold", "v_reset", "decay_input", "detach_reset")


def _state_names(m: nn.Module) -> list:
    names = [n for n, _ in m.named_memories()] if callable(getattr(m, "named_memories",
                                                                    None)) else []
    return names + [n for n in _EXTRA_STATE if n not in names and n in m.__dict__]


def _stateful(modules: Iterable[nn.Module]) -> list:
    return [(m, names) for m in modules if (names := _state_names(m))]


def _read(stateful: list) -> list:
    return [{n: getattr(m, n) for n in names} for m, names in stateful]


def _write(stateful: list, states: list) -> None:
    for (m, _), state in zip(stateful, states):
        for n, value in state.items():
            setattr(m, n, value)


def _with_submodules(modules) -> list:
    """Every module given, with its submodules, once each. modules=block (or [block]) names the
    block: list(block) took a Sequential's direct children (a bare module alone), so a neuron
    nested deeper kept the membrane the later calls had left in the recompute, and the gradients
    were silently wrong. Listing a module that the block does not move costs nothing: its state
    is set to itself for the recompute."""
    roots = [modules] if isinstance(modules, nn.Module) else list(modules)
    seen: dict = {}
    for root in roots:
        if not isinstance(root, nn.Module):
            raise TypeError(f"checkpoint: modules must hold nn.Modules, got "
                            f"{type(root).__name__}")
        for m in root.modules():
            seen.setdefault(id(m), m)
    return list(seen.values())


class _Recompute:
    """The recompute's context: sets the state the forward started from, and on exit the state
    the modules held when it was entered. Entered once per recompute: a second backward
    (retain_graph, or a double backward) recomputes again, and nested entries stack.

    Normalization layers in training mode (BatchNorm, InstanceNorm with running stats) update
    their running statistics in place at every call, the recompute's too: their buffers are
    copied on entry and written back on exit, so they count the block's forward once, as
    without checkpointing (torch.utils.checkpoint alone counts it twice)."""

    def __init__(self, stateful: list, start: list, norms: list):
        self.stateful, self.start, self.norms, self.held = stateful, start, norms, []

    def __enter__(self):
        buffers = [(b, b.clone()) for m in self.norms if m.training
                   for b in m.buffers(recurse=False)]
        self.held.append((_read(self.stateful), buffers))
        _write(self.stateful, self.start)

    def __exit__(self, *exc) -> None:
        states, buffers = self.held.pop()
        _write(self.stateful, states)
        with torch.no_grad():
            for b, kept in buffers:
                b.copy_(kept)


def checkpoint(function, *args, modules: Optional[Iterable[nn.Module]] = None,
               use_reentrant: bool = False, **kwargs):
    """``torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, **kwargs)``
    whose recompute starts every stateful module of the block from the state it had when the
    forward started, and leaves the modules' state as it found it.

    Args:
        function: the block, an ``nn.Module`` (its submodules are searched for state), or any
            callable together with ``modules``.
        modules: the modules whose state the block reads and moves (default: function's
            ``modules()``): one module or an iterable of them, each with its submodules.
        use_reentrant: only False (torch's reentrant checkpoint takes no contexts).
        kwargs: torch.utils.checkpoint's (``preserve_rng_state``, ``determinism_check``, ...)
            and the block's own keyword arguments.
    """
    if use_reentrant:
        raise ValueError("checkpoint: use_reentrant=True cannot restore the neurons' state for "
                         "the recompute; use the default use_reentrant=False")
    if "context_fn" in kwargs:
        raise ValueError("checkpoint: context_fn is this function's own (it restores the "
                         "neurons' state); call torch.utils.checkpoint.checkpoint for another")
    if modules is None:
        if not isinstance(function, nn.Module):
            raise TypeError(f"checkpoint: pass modules= (the stateful modules the block uses) "
                            f"when function is not an nn.Module, got {type(function).__name__}")
        modules = function.modules()
    modules = _with_submodules(modules)
    stateful = _stateful(modules)
    norms = [m for m in modules if isinstance(m, nn.modules.batchnorm._NormBase)]
    start: list = []

    @contextlib.contextmanager
    def forward_context():
        start[:] = _read(stateful)
        yield

    recompute = _Recompute(stateful, start, norms)
    return torch.utils.checkpoint.checkpoint(
        function, *args, use_reentrant=False,
        context_fn=lambda: (forward_context(), recompute), **kwargs)
