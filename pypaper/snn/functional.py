"""Whole-network helpers, drop-in for ``spikingjelly.activation_based.functional``:

    from pypaper.snn import functional
    functional.reset_net(model)            # every neuron back to rest, between samples
    functional.set_step_mode(model, "m")   # every neuron to single- ('s') or multi-step ('m')
    functional.detach_net(model)           # cut carried state from the graph (truncated BPTT)
"""
from __future__ import annotations

from torch import nn


def reset_net(net: nn.Module) -> None:
    """Call ``reset()`` on every submodule that has one (pypaper's neurons, and stateful modules
    of other libraries such as SpikingJelly's), like SpikingJelly's reset_net."""
    for m in net.modules():
        fn = getattr(m, "reset", None)
        if callable(fn):
            fn()


def set_step_mode(net: nn.Module, step_mode: str) -> None:
    """Set ``step_mode`` ('s' or 'm') on every submodule that has one."""
    if step_mode not in ("s", "m"):
        raise ValueError(f"step_mode must be 's' or 'm', got {step_mode!r}")
    for m in net.modules():
        if hasattr(m, "step_mode"):
            m.step_mode = step_mode


def detach_net(net: nn.Module) -> None:
    """Call ``detach()`` on every submodule that has one (the stateful ones)."""
    for m in net.modules():
        fn = getattr(m, "detach", None)
        if callable(fn):
            fn()


__all__ = ["detach_net", "reset_net", "set_step_mode"]
