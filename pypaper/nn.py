"""Every pypaper layer in one namespace: ``pypaper.nn.<Layer>``, next to ``torch.nn``.

Each family defines its modules in ``pypaper/<family>/``; this module only re-exports them. One
line per family; add yours below.
"""
from .quant.fewbit.modules import (ELU as FewBitELU, GELU as FewBitGELU, SELU as FewBitSELU,
                                   SiLU as FewBitSiLU, Mish as FewBitMish,
                                   FewBitActivation)
from .snn.neuron import LIFNode, ParametricLIFNode
from .snn.delays import DelayedLinear
from .wtacrs.modules import WTACRSLinear
# ---- hopfield (issue #4): add the import line here ----
# ---- local (issue #6): add the import line here ----
# ---- quant models (issue #7, linear kernels): add the import line here ----
# ---- quant models (issue #7, BitLinear): add the import line here ----

__all__ = [name for name in dir() if not name.startswith("_")]
