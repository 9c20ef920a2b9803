"""Number checks that also hold under torch.compile.

A float attribute of a neuron that changes between calls of a compiled model (an annealed
v_threshold, a tau set by a schedule, a surrogate's alpha) reaches the op as a SymFloat once
dynamo has seen two values of it: dynamo then makes it an input of one graph instead of
recompiling per value (``torch._dynamo.config.specialize_float`` is False by default). A SymFloat
is a numbers.Real that ``math.isfinite`` refuses (a graph break; ``fullgraph=True`` failed), while a
comparison is traced as a guard. So finiteness is checked by comparisons.
"""
from __future__ import annotations

import math
import numbers


def is_number(v) -> bool:
    """A real number that is not a bool (a Python float / int, a numpy scalar, a SymFloat)."""
    t = type(v)
    if t is float or t is int:  # the common case, without the ABC check below (~2 us each)
        return True
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def is_finite(v) -> bool:
    """math.isfinite(v) for a number, as comparisons (NaN fails both). Against inf, not
    float_info.max: a numpy float32 would cast that to float32 (an overflow warning)."""
    return -math.inf < v < math.inf


def is_finite_number(v) -> bool:
    return is_number(v) and is_finite(v)
