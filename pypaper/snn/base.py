"""SpikingJelly's memory functions (``spikingjelly.activation_based.base``) for models that hold
pypaper's neurons.

SpikingJelly 2.0's ``base.named_memories`` / ``extract_memories`` / ``load_memories`` /
``to_functional_forward`` walk a model for instances of its ``MemoryModule``. pypaper's neurons
and stateful layers are not such instances (pypaper does not depend on SpikingJelly), so those
functions skip them silently: the extracted state of a converted model has no membrane, and a
functional forward carries none. These functions have the same names, signatures and results,
and see both kinds of state:

- the state of pypaper's neurons: the membrane ``v`` and what a subclass registered with
  ``register_memory``, as their ``named_memories()`` yields it;
- the mask of pypaper's ``layer.Dropout`` / ``Dropout2d``;
- the memories of SpikingJelly's own ``MemoryModule``s, in a model that mixes the two.

A model written against SpikingJelly's ``base`` runs after changing the import:
``from pypaper.snn import base``. The order is SpikingJelly's: a module's own memories, then its
children's, depth first in registration order.
"""
from __future__ import annotations

import sys
from typing import Callable, Iterator, Optional

from torch import nn

from . import spikingjelly_fallback
from .layer import Dropout
from .neuron import _is_own

_OWN_NAMES = ["extract_memories", "load_memories", "memories", "named_memories",
              "to_functional_forward"]


def _is_memory_module(module: nn.Module) -> bool:
    """Whether the module's own state is what its ``named_memories()`` yields: pypaper's neurons
    and Dropout, and SpikingJelly's MemoryModule (looked up only where SpikingJelly is imported
    already: a model cannot hold one otherwise). Other modules are not asked, as SpikingJelly
    does not ask them: a wrapper whose method reports its children's state would count it
    twice."""
    # pypaper's own neurons (_is_own; isinstance(m, BaseNode) also holds for SpikingJelly's
    # BaseNodes, which its MemoryModule test below answers for)
    if _is_own(module) or isinstance(module, Dropout):
        return True
    sj_base = sys.modules.get("spikingjelly.activation_based.base")
    return sj_base is not None and isinstance(module, sj_base.MemoryModule)


def _own_memories(module: nn.Module):
    """(name, value) of the module's own state, without its children's."""
    return module.named_memories() if _is_memory_module(module) else ()


def named_memories(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, object]]:
    """(dotted name, value) of every memory in the module tree, as ``named_parameters()`` names
    parameters."""
    for name, value in _own_memories(module):
        yield (f"{prefix}.{name}" if prefix else name), value
    for child_name, child in module.named_children():
        yield from named_memories(child, f"{prefix}.{child_name}" if prefix else child_name)


def memories(module: nn.Module) -> Iterator[object]:
    """The values of ``named_memories(module)``."""
    for _, value in named_memories(module):
        yield value


def extract_memories(module: nn.Module) -> list:
    """Every memory value of the module tree, in ``named_memories`` order."""
    return list(memories(module))


def load_memories(module: nn.Module, memory_list: list) -> None:
    """Sets the module tree's memories to ``memory_list`` (``extract_memories`` order).
    ValueError when the lengths differ."""
    named = list(named_memories(module))
    if len(named) != len(memory_list):
        raise ValueError(f"Memory length mismatch: model has {len(named)} memories "
                         f"but list contains {len(memory_list)}")
    for (name, _), value in zip(named, memory_list):
        *path, attr = name.split(".")
        owner = module
        for part in path:
            owner = getattr(owner, part)
        setattr(owner, attr, value)


# Attributes of pypaper's and SpikingJelly's neurons that carry across calls without being
# memories: restored after a functional forward too, so that it leaves the module as it was.
_EXTRA_STATE = ("v_seq",)


def _sequential_forward(module: nn.Sequential) -> Callable:
    """An nn.Sequential's forward as SpikingJelly composes it here: every input and keyword to
    the first child, a child's tuple output unpacked into the next (nn.Sequential's own forward
    takes one input and no keywords)."""
    def forward(*inputs, **kwargs):
        outputs = inputs
        for index, child in enumerate(module._modules.values()):
            result = child(*outputs, **(kwargs if index == 0 else {}))
            outputs = tuple(result) if isinstance(result, (tuple, list)) else (result,)
        return outputs[0] if len(outputs) == 1 else outputs

    return forward


def to_functional_forward(module: nn.Module, fn: Optional[Callable] = None) -> Callable:
    """The module's forward with its state made explicit:
    ``f(inputs, states, **kwargs) -> (outputs, new_states)``, ``inputs`` and ``outputs`` tuples
    (one tensor too), ``states`` and ``new_states`` in ``extract_memories(module)`` order.

    The call loads ``states`` into the module, runs ``fn`` (default: the module's forward, hooks
    not run, as SpikingJelly's; for a plain nn.Sequential its children in turn, so that several
    inputs and keywords reach the first one), reads the new states and puts the module's own
    states back, ``v_seq`` included, also when the forward raises: the module is left as it
    was. SpikingJelly's version takes a shortcut for its MemoryModules that implement a
    functional forward; its results are those of this path. As there, a state tensor must not
    be modified in place by the forward (neither pypaper's neurons nor SpikingJelly's do).

    A neuron shared by two places of the model is two states here, as named_memories lists it
    twice; both are loaded into the one neuron and the later wins (SpikingJelly's version counts
    it once in one place and twice in another, and refuses both calls).
    """
    if fn is not None:
        forward_fn = fn
    elif (isinstance(module, nn.Sequential)
          and getattr(module.forward, "__func__", None) is nn.Sequential.forward):
        forward_fn = _sequential_forward(module)
    else:
        forward_fn = module.forward
    count = len(extract_memories(module))

    def functional_forward(inputs: tuple, states: tuple, **kwargs):
        if len(states) != count:
            raise ValueError(f"{type(module).__name__} expected {count} states, "
                             f"but got {len(states)}.")
        original = extract_memories(module)
        extra = [(m, name, m.__dict__[name]) for m in module.modules() for name in _EXTRA_STATE
                 if name in m.__dict__]
        load_memories(module, list(states))
        try:
            outputs = forward_fn(*inputs, **kwargs)
            outputs = tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)
            new_states = tuple(extract_memories(module))
        finally:
            load_memories(module, original)
            for m, name, value in extra:
                setattr(m, name, value)
        return outputs, new_states

    return functional_forward


# Names this module lacks (MemoryModule, StepModule, SingleStepModule, MultiStepModule) come from
# SpikingJelly's base (pypaper/snn/spikingjelly_fallback.py): a model's own stateful module,
# ``class Filter(base.MemoryModule)``, keeps working after ``from pypaper.snn import base``.
# __all__ too: pypaper's names, then SpikingJelly's.
__getattr__ = spikingjelly_fallback.forwarder(__name__, "base", _OWN_NAMES)
