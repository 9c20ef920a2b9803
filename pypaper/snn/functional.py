"""Whole-network helpers, drop-in for ``spikingjelly.activation_based.functional``:

    from pypaper.snn import functional
    functional.reset_net(model)            # every neuron back to rest, between samples
    functional.set_step_mode(model, "m")   # every neuron to single- ('s') or multi-step ('m')
    functional.detach_net(model)           # cut carried state from the graph (truncated BPTT)
    functional.set_backend(model, "cupy")  # SpikingJelly 0.0.0.0.14's backend names, accepted
    functional.seq_to_ann_forward(x_seq, stateless)      # [T, N, *] through a layer in one call
    functional.multi_step_forward(x_seq, single_step)    # ... or once per time step
    functional.checkpoint(block, x_seq)    # activation checkpointing that restores the neurons'
                                           # state for the recompute (pypaper/snn/checkpoint.py)
    functional.conv_bn_fusion.fuse_conv_bn_eval_modules(model.eval())  # Conv+BN -> one conv
"""
from __future__ import annotations

import sys
import warnings
from typing import Callable, Sequence, Union

import torch
from torch import nn

from . import conv_bn_fusion, spikingjelly_fallback
from .checkpoint import checkpoint

# SpikingJelly 2.0 has conv_bn_fusion as a submodule of its functional package; pypaper's
# functional is one module, so the submodule path is registered by name: both
# `from pypaper.snn.functional.conv_bn_fusion import fuse_conv_bn_eval_modules` and
# `functional.conv_bn_fusion.fuse_conv_bn_eval_modules` work (pypaper/snn/conv_bn_fusion.py).
sys.modules[__name__ + ".conv_bn_fusion"] = conv_bn_fusion

_Layers = Union[nn.Module, Sequence[Callable], Callable]


def _apply(x, layers: _Layers):
    """SpikingJelly's order: a tuple input is unpacked into the first layer's arguments; each
    later layer (of a list / tuple) gets the previous output as its one argument."""
    args = x if isinstance(x, tuple) else (x,)
    if isinstance(layers, (list, tuple)):
        for f in layers:
            x = f(*args)
            args = (x,)
        return x
    return layers(*args)


def _merge_time_batch(t: torch.Tensor) -> torch.Tensor:
    """[T, N, *] -> [T * N, *], as ``t.flatten(0, 1)``: a view where dims 0 and 1 merge
    (stride[0] == N * stride[1]), else a copy.

    Under torch.export the view is built with ``as_strided`` instead. torch's symbolic view rule
    gives the merged dim the stride Min(stride[1], stride[0]) (Min(12, 12 * N) for a contiguous
    [T, N, 3, 4] with a dynamic N: it cannot rule out N = 0), and a module that only views
    (nn.Flatten, a reshape) hands back an alias of the input whose [T, N, *] unflatten then
    needs the guard N * Min(12, 12 * N) == 12 * N, which export refuses as a constraint
    violation of the dynamic dim. When the dims merge, the merged stride is exactly stride[1]
    (element (t, n) sits at t * stride[0] + n * stride[1] = (t * N + n) * stride[1]), so
    as_strided with that stride is the same view (same storage, offset, values and strides)
    without the Min. Eager keeps flatten, whose backward is a plain reshape (as_strided's
    scatters into the base's geometry)."""
    if torch.compiler.is_exporting() and t.dim() >= 2 and t.stride(0) == t.shape[1] * t.stride(1):
        return t.as_strided((t.shape[0] * t.shape[1],) + tuple(t.shape[2:]),
                            (t.stride(1),) + tuple(t.stride()[2:]))
    return t.flatten(0, 1)


def seq_to_ann_forward(x_seq, stateless_module: _Layers):
    """Run stateless layers on a sequence in one call: [T, N, *] is flattened to [T * N, *],
    passed through ``stateless_module`` (a module, a callable, or a list / tuple of them, applied
    in order) and split back to [T, N, *'] (a tuple output is split element-wise). One conv over
    T * N samples instead of T convs over N. ``x_seq`` may be a tuple of such tensors with the
    same [T, N] (pooled values and their indices, say): each is flattened and the first layer
    takes them as its arguments, as in SpikingJelly."""
    items = x_seq if isinstance(x_seq, tuple) else (x_seq,)
    for t in items:
        if not isinstance(t, torch.Tensor) or t.dim() < 2:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"x_seq must be a tensor [T, N, *] (at least 2 dims) or a tuple of "
                             f"them, got {shape}")
    tn = items[0].shape[:2]
    if any(t.shape[:2] != tn for t in items[1:]):
        raise ValueError(f"the tensors of x_seq must share their [T, N] leading dims, got "
                         f"{[tuple(t.shape[:2]) for t in items]}")
    flat = tuple(_merge_time_batch(t) for t in items)
    y = _apply(flat if isinstance(x_seq, tuple) else flat[0], stateless_module)
    if isinstance(y, tuple):
        return tuple(t.unflatten(0, tn) for t in y)
    return y.unflatten(0, tn)


def multi_step_forward(x_seq: torch.Tensor, single_step_module: _Layers) -> torch.Tensor:
    """Run single-step layers once per time step: y[t] = single_step_module(x_seq[t]),
    stacked to [T, N, *'] (state carries from step to step inside stateful modules)."""
    if not isinstance(x_seq, torch.Tensor) or x_seq.dim() < 1:
        raise ValueError("x_seq must be a tensor [T, ...]")
    # unbind rather than x_seq[t]: the backward of T selects writes T zero-filled [T, N, *]
    # gradients (O(T^2) memory traffic), unbind's stacks the step gradients once
    return torch.stack([_apply(xt, single_step_module) for xt in x_seq.unbind(0)])


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
    # SpikingJelly's containers and the user's subclasses of them (its rule is an isinstance)
    return any(c.__name__ in _KEEP_STEP_MODE_CONTAINERS and c.__module__.startswith("spikingjelly")
               for c in cls.__mro__)


def step_mode_modules(net: nn.Module) -> list:
    """The modules set_step_mode sets: those with a ``step_mode``, not inside a container that
    fixes its children's mode (SpikingJelly's, or pypaper.snn.layer's; each module once)."""
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
    StepModeContainer / MultiStepContainer / SeqToANNContainer (SpikingJelly's or
    pypaper.snn.layer's) and SpikingJelly's TLast* / recurrent containers (SpikingJelly's rule:
    their children keep the mode they need). SpikingJelly's own set_step_mode does not know
    pypaper's containers: swap ``functional`` together with ``layer``."""
    if step_mode not in ("s", "m"):
        raise ValueError(f"step_mode must be 's' or 'm', got {step_mode!r}")
    for m in step_mode_modules(net):
        # A module that runs in one mode only (SeqToANNContainer, MultiStepContainer: 'm') keeps
        # it, as SpikingJelly's containers (which have no step_mode) are skipped by its rule.
        if step_mode in getattr(m, "supported_step_modes", ("s", "m")):
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


_OWN_NAMES = ["checkpoint", "conv_bn_fusion", "detach_net", "multi_step_forward", "reset_net",
              "seq_to_ann_forward", "set_backend", "set_step_mode"]


# Names this module lacks come from SpikingJelly (pypaper/snn/spikingjelly_fallback.py).
# __all__ too: pypaper's names, then SpikingJelly's (a star import gets both).
__getattr__ = spikingjelly_fallback.forwarder(__name__, "functional", _OWN_NAMES)
