"""Number checks that also hold under torch.compile, shared by the families' argument checks.

A float argument or attribute (a Hopfield beta, a local-loss threshold, and, the first case met,
a float attribute of a neuron that changes between calls of a compiled model (an annealed
v_threshold, a tau set by a schedule, a surrogate's alpha) reaches the argument checks as a
SymFloat once dynamo has seen two values of it (``torch._dynamo.config.specialize_float`` is
False by default), and every float does under ``dynamic=True``. ``math.isfinite`` refuses a
SymFloat (a graph break; ``fullgraph=True`` failed); a comparison is traced as a guard. So
finiteness is checked by comparisons. The ops take these values as numbers, so dynamo still
compiles once per value: a schedule of more values than ``torch._dynamo.config.recompile_limit``
(8) wants a tensor (a tensor alpha; a learnable threshold filled in place).
"""
from __future__ import annotations

import math
import numbers

import torch


def is_number(v) -> bool:
    """A real number that is not a bool (a Python float / int, a numpy scalar, a SymFloat)."""
    t = type(v)
    if t is float or t is int:  # the common case, without the ABC check below (~2 us each)
        return True
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def is_finite(v) -> bool:
    """math.isfinite(v) for a number, as comparisons (NaN fails both). A float (what a SymFloat
    looks like to dynamo's tracing too) is compared as it is; any other number as the float the
    ops will take: an int beyond float range (10**400) or a finite np.longdouble above float64's
    max, finite in its own type, would become inf there."""
    if not isinstance(v, (float, torch.SymFloat)):
        try:
            v = float(v)
        except OverflowError:
            return False
    return -math.inf < v < math.inf


def is_finite_number(v) -> bool:
    return is_number(v) and is_finite(v)


def shown(v):
    """v for an error message. A float as float(v): under torch.compile a SymFloat cannot be
    formatted into a string (dynamo's "BUILD_STRING type error" replaced the ValueError naming
    the argument), and float() reads its value."""
    return float(v) if isinstance(v, (float, torch.SymFloat)) else v


def plain_number(value):
    """A numpy scalar (np.float32(0.5), an element of np.linspace: a schedule computed with numpy)
    as the Python float it equals; anything else as it is. Applied where a neuron or surrogate
    number is assigned: dynamo traces a numpy scalar as an ndarray, which the checks refused
    under torch.compile ("tau must be a number or a tensor, got ndarray"), while eager took it."""
    if type(value).__module__ == "numpy" and is_number(value):
        return float(value)
    return value


def as_flag(value, name: str) -> bool:
    """A configuration flag as a bool: True / False (numpy's too) or the ints 0 / 1.

    Anything else is refused. bool('False') is True, so a flag read as text (a YAML or JSON
    config, argparse without type=bool handling: detach_reset='False') was taken as True and
    silently changed the dynamics (decay_input) or the gradients (detach_reset, sltt);
    SpikingJelly's BaseNode asserts that detach_reset is a bool."""
    if isinstance(value, bool):
        return value
    if type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"):
        return bool(value)
    if isinstance(value, numbers.Integral) and value in (0, 1):
        return bool(value)
    raise TypeError(f"{name} must be a bool (True or False), got {value!r}")
