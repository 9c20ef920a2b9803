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

from typing import Callable, Iterator, Optional

from torch import nn

__all__ = ["extract_memories", "load_memories", "memories", "named_memories",
           "to_functional_forward"]


def _own_memories(module: nn.Module):
    """(name, value) of the module's own state, without its children's: what its
    ``named_memories()`` method yields (pypaper's neurons and Dropout, SpikingJelly's
    MemoryModule); nothing for a module without one."""
    method = getattr(module, "named_memories", None)
    return method() if callable(method) else ()


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


def to_functional_forward(module: nn.Module, fn: Optional[Callable] = None) -> Callable:
    """The module's forward with its state made explicit:
    ``f(inputs, states, **kwargs) -> (outputs, new_states)``, ``inputs`` and ``outputs`` tuples
    (one tensor too), ``states`` and ``new_states`` in ``extract_memories(module)`` order.

    The call loads ``states`` into the module, runs ``fn`` (default ``module.forward``, hooks not
    run, as SpikingJelly's), reads the new states and puts the module's own states back, also
    when the forward raises: the module is left as it was. SpikingJelly's version takes a
    shortcut for its MemoryModules that implement a functional forward; its results are those
    of this path. As there, a state tensor must not be modified in place by the forward (neither
    pypaper's neurons nor SpikingJelly's do).
    """
    forward_fn = module.forward if fn is None else fn
    count = len(extract_memories(module))

    def functional_forward(inputs: tuple, states: tuple, **kwargs):
        if len(states) != count:
            raise ValueError(f"{type(module).__name__} expected {count} states, "
                             f"but got {len(states)}.")
        original = extract_memories(module)
        load_memories(module, list(states))
        try:
            outputs = forward_fn(*inputs, **kwargs)
            outputs = tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)
            new_states = tuple(extract_memories(module))
        finally:
            load_memories(module, original)
        return outputs, new_states

    return functional_forward
