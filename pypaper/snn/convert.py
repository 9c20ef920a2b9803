"""Swap SpikingJelly's neurons in a built model for pypaper's, in place; and back.

    model = pypaper.snn.convert(model, filter_fn=None, *, sltt=False)
    model = pypaper.snn.revert(model)

For a model that is already built with SpikingJelly's neurons: its model zoo
(``spikingjelly.activation_based.model``: spiking_resnet, sew_resnet, spiking_vgg,
parametric_lif_net, spikformer, ...) builds them from a class passed in, a checkpoint may have
been trained with them, and a code base may construct them in many places. ``convert`` replaces
every neuron whose type is exactly one of SpikingJelly's

    IFNode, SimpleIFNode                   -> pypaper.snn.IFNode
    LIFNode, SimpleLIFNode                 -> pypaper.snn.LIFNode
    ParametricLIFNode                      -> pypaper.snn.ParametricLIFNode

by pypaper's, which runs the same dynamics (H = V + (X - (V - V_reset)) / tau, fire, hard or
soft reset, ``detach_reset``) as one fused kernel over all T steps. What goes over:

- the configuration: v_threshold, v_reset, tau, decay_input, detach_reset, step_mode,
  store_v_seq, and the surrogate_function object itself (SpikingJelly's surrogates of the eight
  built-in names run inside the kernels; another callable runs in pypaper's Python loop);
- the parameters as the same objects: a PLIF's ``w`` is the Parameter the optimizer already
  holds, so an optimizer built before ``convert`` keeps training the model, and the state_dict
  keeps its keys (a checkpoint saved either way loads into the other);
- the state: the carried membrane ``v`` (a model converted between two calls of a sequence goes
  on from where it was), ``v_seq``, the reset value set with ``set_reset_value('v', ...)``, train
  / eval mode, and the module hooks (a SpikingJelly monitor on a neuron keeps recording).

One neuron under two names becomes one pypaper neuron under both. Left as they are: subclasses of
those classes (they may change the dynamics), every other SpikingJelly neuron (KLIF, QIF,
Izhikevich, ...: pypaper has no kernel for them), neurons set to a reduced precision by
SpikingJelly's ``precision`` module (a warning says so), and anything ``filter_fn(module,
fully_qualified_name) -> bool`` refuses. A configuration pypaper refuses (pypaper's neurons check
``v_threshold > v_reset`` and ``tau > 1`` as issue 3 asks; SpikingJelly takes any value) raises
ValueError naming the module, before anything is replaced. ``sltt=True`` turns on SLTT
(Meng et al., ICCV 2023) on the converted neurons.

``revert`` puts the original SpikingJelly neurons back, with the converted neurons' current
configuration, parameters, state and hooks. A model whose root is itself a neuron comes back as
a new module: use the returned model (``model = convert(model)``).
"""
from __future__ import annotations

import math
import numbers
import sys
import warnings
from typing import Callable, Optional

import torch
from torch import nn

from .._module_swap import copy_hooks
from . import neuron as _neuron

_ORIGINAL = "_snn_convert_original"
_SJ_NEURON = "spikingjelly.activation_based.neuron"
# SpikingJelly's class name -> pypaper's class
_TARGETS = {"IFNode": _neuron.IFNode, "SimpleIFNode": _neuron.IFNode,
            "LIFNode": _neuron.LIFNode, "SimpleLIFNode": _neuron.LIFNode,
            "ParametricLIFNode": _neuron.ParametricLIFNode}


def _spikingjelly_classes() -> dict:
    """{SpikingJelly neuron class: pypaper class} for the classes of the SpikingJelly that is
    imported (none when it is not: then the model cannot hold one of its neurons)."""
    module = sys.modules.get(_SJ_NEURON)
    if module is None:
        return {}
    found = {}
    for name, target in _TARGETS.items():
        cls = getattr(module, name, None)
        if isinstance(cls, type):
            found[cls] = target
    return found


def _rest_value(old: nn.Module):
    """Where SpikingJelly's reset() puts v: its MemoryModule's reset value of the memory v."""
    rv = getattr(old, "_memories_rv", None)
    return rv.get("v") if isinstance(rv, dict) else None


def _as_number(value, what: str):
    """A float for pypaper's constructor: SpikingJelly keeps numbers as given (an int, a 0-d
    tensor); pypaper's neurons take real numbers."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    raise ValueError(f"{what} must be a number, got {value!r}")


def _build(old: nn.Module, target: type, sltt: bool) -> nn.Module:
    """pypaper's neuron for SpikingJelly's ``old``: the same configuration, parameters and
    state."""
    common = dict(
        v_threshold=_as_number(old.v_threshold, "v_threshold"),
        v_reset=_as_number(old.v_reset, "v_reset"),
        surrogate_function=old.surrogate_function, detach_reset=bool(old.detach_reset),
        step_mode=old.step_mode, store_v_seq=bool(getattr(old, "store_v_seq", False)),
        backend=getattr(old, "backend", "torch") if getattr(old, "backend", "torch") in
        _neuron.BaseNode.supported_backends else "torch",
        sltt=sltt)
    if target is _neuron.IFNode:
        new = target(**common)
    elif target is _neuron.LIFNode:
        new = target(tau=_as_number(old.tau, "tau"), decay_input=bool(old.decay_input), **common)
    else:
        new = target(decay_input=bool(old.decay_input), **common)
        new.w = old.w  # the same Parameter: optimizers, tied weights and state_dict keys hold
    rest = _rest_value(old)
    if rest is not None and not (isinstance(rest, numbers.Real) and math.isfinite(rest)):
        raise ValueError(f"the reset value of v must be a finite number, got {rest!r}")
    if rest is not None and float(rest) != new.rest_value:
        new.set_reset_value("v", float(rest))
    v = old.v
    new.v = v if isinstance(v, torch.Tensor) else float(v)
    if new.store_v_seq:
        new.v_seq = getattr(old, "v_seq", None)
    new.train(old.training)
    copy_hooks(old, new)
    object.__setattr__(new, _ORIGINAL, old)
    return new


def _skip_reason(module: nn.Module) -> Optional[str]:
    if getattr(module, "_neuron_precision", None) is not None:
        return "it runs in a reduced precision set by SpikingJelly's precision module"
    memories = getattr(module, "_memories", None)
    if isinstance(memories, dict) and set(memories) - {"v"}:
        return f"it holds memories besides v ({', '.join(sorted(set(memories) - {'v'}))})"
    return None


def convert(model: nn.Module, filter_fn: Optional[Callable[[nn.Module, str], bool]] = None, *,
            sltt: bool = False) -> nn.Module:
    """Replace model's SpikingJelly IF / LIF / PLIF neurons with pypaper's, in place; returns
    model (or, if model itself is such a neuron, its replacement)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(sltt, bool):
        raise TypeError(f"sltt must be a bool, got {sltt!r}")
    classes = _spikingjelly_classes()
    if not classes:
        return model
    # First build every replacement (a configuration pypaper refuses raises before anything
    # changes), then swap them in.
    made: dict = {}  # id(SpikingJelly neuron) -> pypaper neuron
    for name, module in model.named_modules():
        target = classes.get(type(module))
        if target is None or id(module) in made:
            continue
        if filter_fn is not None and not filter_fn(module, name):
            continue
        reason = _skip_reason(module)
        if reason is not None:
            warnings.warn(f"snn.convert: {name or 'model'} is left as SpikingJelly's "
                          f"{type(module).__name__}: {reason}")
            continue
        try:
            made[id(module)] = _build(module, target, sltt)
        except (ValueError, TypeError) as err:
            raise type(err)(f"snn.convert: {name or 'model'} ({type(module).__name__}): "
                            f"{err}") from err
    if id(model) in made:
        return made[id(model)]
    for _, parent in list(model.named_modules(remove_duplicate=False)):
        for attr, child in list(parent._modules.items()):
            if child is not None and id(child) in made:
                setattr(parent, attr, made[id(child)])
    return model


def _restore(new: nn.Module) -> nn.Module:
    """The original SpikingJelly neuron of ``new``, given new's current configuration,
    parameters, state and hooks."""
    old = getattr(new, _ORIGINAL)
    for attr in ("v_threshold", "v_reset", "surrogate_function", "detach_reset", "step_mode"):
        setattr(old, attr, getattr(new, attr))
    if hasattr(old, "store_v_seq"):
        old.store_v_seq = new.store_v_seq  # (clears v_seq, set below)
    if hasattr(old, "tau") and not isinstance(new, _neuron.ParametricLIFNode):
        old.tau = new.tau
    if hasattr(old, "decay_input"):
        old.decay_input = new.decay_input
    if isinstance(new, _neuron.ParametricLIFNode):
        old.w = new.w
    if hasattr(old, "set_reset_value"):
        old.set_reset_value("v", new.rest_value)
    old.v = new.v
    if hasattr(old, "v_seq"):
        old.v_seq = new.v_seq
    old.train(new.training)
    copy_hooks(new, old)
    return old


def revert(model: nn.Module) -> nn.Module:
    """Undo ``convert``: the original SpikingJelly neurons, with the converted ones' current
    configuration, parameters, membrane state and hooks; returns model (or, if model itself is a
    converted neuron, the original)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if getattr(model, _ORIGINAL, None) is not None:
        return _restore(model)
    done: dict = {}
    for _, parent in list(model.named_modules(remove_duplicate=False)):
        for attr, child in list(parent._modules.items()):
            if child is None or getattr(child, _ORIGINAL, None) is None:
                continue
            if id(child) not in done:
                done[id(child)] = _restore(child)
            setattr(parent, attr, done[id(child)])
    return model
