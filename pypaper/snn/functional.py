"""Whole-network helpers, drop-in for ``spikingjelly.activation_based.functional``:

    from pypaper.snn import functional
    functional.reset_net(model)            # every neuron back to rest, between samples
    functional.set_step_mode(model, "m")   # every neuron to single- ('s') or multi-step ('m')
    functional.detach_net(model)           # cut carried state from the graph (truncated BPTT)
    functional.set_backend(model, "cupy")  # SpikingJelly 0.0.0.0.14's backend names, accepted
    functional.seq_to_ann_forward(x_seq, stateless)      # [T, N, *] through a layer in one call
    functional.multi_step_forward(x_seq, single_step)    # ... or once per time step
"""
from __future__ import annotations

import warnings
from typing import Callable, Sequence, Union

import torch
from torch import nn

_Layers = Union[nn.Module, Sequence[Callable], Callable]


def _chain(layers: _Layers) -> Callable:
    if isinstance(layers, (list, tuple)):
        def run(x):
            for f in layers:
                x = f(x)
            return x
        return run
    return layers


def seq_to_ann_forward(x_seq: torch.Tensor, stateless_module: _Layers):
    """Run stateless layers on a sequence in one call: [T, N, *] is flattened to [T * N, *],
    passed through ``stateless_module`` (a module, a callable, or a list / tuple of them, applied
    in order) and split back to [T, N, *'] (a tuple output is split element-wise). One conv over
    T * N samples instead of T convs over N."""
    if not isinstance(x_seq, torch.Tensor) or x_seq.dim() < 2:
        shape = tuple(x_seq.shape) if isinstance(x_seq, torch.Tensor) else type(x_seq).__name__
        raise ValueError(f"x_seq must be a tensor [T, N, *] (at least 2 dims), got {shape}")
    tn = x_seq.shape[:2]
    y = _chain(stateless_module)(x_seq.flatten(0, 1))
    if isinstance(y, tuple):
        return tuple(t.unflatten(0, tn) for t in y)
    return y.unflatten(0, tn)


def multi_step_forward(x_seq: torch.Tensor, single_step_module: _Layers) -> torch.Tensor:
    """Run single-step layers once per time step: y[t] = single_step_module(x_seq[t]),
    stacked to [T, N, *'] (state carries from step to step inside stateful modules)."""
    if not isinstance(x_seq, torch.Tensor) or x_seq.dim() < 1:
        raise ValueError("x_seq must be a tensor [T, ...]")
    f = _chain(single_step_module)
    return torch.stack([f(x_seq[t]) for t in range(x_seq.shape[0])])


def reset_net(net: nn.Module) -> None:
    """Call ``reset()`` on every submodule that has one (pypaper's neurons, and stateful modules
    of other libraries such as SpikingJelly's), like SpikingJelly's reset_net."""
    for m in net.modules():
        fn = getattr(m, "reset", None)
        if callable(fn):
            fn()


# SpikingJelly's containers that fix their children's step mode (a MultiStepContainer loops a
# single-step module over T; a StepModeContainer runs its children in the mode it was built
# with): set_step_mode sets the container but leaves what is inside it alone, as SpikingJelly
# 2.0's functional.set_step_mode does. Matched by name so that spikingjelly need not be imported.
_KEEP_STEP_MODE_CONTAINERS = frozenset((
    "StepModeContainer", "MultiStepContainer", "SeqToANNContainer", "TLastMultiStepContainer",
    "TLastSeqToANNContainer", "ElementWiseRecurrentContainer", "LinearRecurrentContainer"))


def _keeps_step_mode(m: nn.Module) -> bool:
    cls = type(m)
    if getattr(cls, "keeps_children_step_mode", False):  # pypaper.snn.layer's containers
        return True
    return cls.__name__ in _KEEP_STEP_MODE_CONTAINERS and cls.__module__.startswith("spikingjelly")


def step_mode_modules(net: nn.Module) -> list:
    """The modules set_step_mode sets: those with a ``step_mode``, not inside a SpikingJelly
    container that fixes its children's mode (each module once)."""
    out, seen, stack = [], set(), [net]
    while stack:
        m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        if hasattr(m, "step_mode"):
            out.append(m)
        if not _keeps_step_mode(m):
            stack.extend(reversed(list(m.children())))
    return out


def set_step_mode(net: nn.Module, step_mode: str) -> None:
    """Set ``step_mode`` ('s' or 'm') on every submodule that has one, except the children of
    SpikingJelly's StepModeContainer / MultiStepContainer / SeqToANNContainer / TLast* /
    recurrent containers (SpikingJelly's rule: their children keep the mode they need)."""
    if step_mode not in ("s", "m"):
        raise ValueError(f"step_mode must be 's' or 'm', got {step_mode!r}")
    for m in step_mode_modules(net):
        m.step_mode = step_mode


def detach_net(net: nn.Module) -> None:
    """Call ``detach()`` on every submodule that has one (the stateful ones)."""
    for m in net.modules():
        fn = getattr(m, "detach", None)
        if callable(fn):
            fn()


def set_backend(net: nn.Module, backend: str, instance=(nn.Module,)) -> None:
    """SpikingJelly 0.0.0.0.14's set_backend: ``backend`` on every module of type ``instance``
    that has one and supports it (pypaper's neurons accept 'torch' and 'cupy' and run their fused
    kernel either way). Like SpikingJelly it skips, with a warning, a module that does not
    support the name."""
    for m in net.modules():
        if isinstance(m, instance) and hasattr(m, "backend"):
            supported = getattr(m, "supported_backends", ())
            if backend in supported:
                m.backend = backend
            else:
                warnings.warn(f"{type(m).__name__} does not support backend={backend!r} "
                              f"(supported: {supported}); it keeps backend={m.backend!r}")


__all__ = ["detach_net", "multi_step_forward", "reset_net", "seq_to_ann_forward", "set_backend",
           "set_step_mode"]
