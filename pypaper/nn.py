"""Every pypaper layer in one namespace: ``pypaper.nn.<Layer>``, next to ``torch.nn``.

Each family defines its modules in ``pypaper/<family>/``; this module only re-exports them. One
line per family.
"""
from .quant.fewbit.modules import (ELU as FewBitELU, GELU as FewBitGELU, SELU as FewBitSELU,
                                   SiLU as FewBitSiLU, Mish as FewBitMish,
                                   FewBitActivation)
from .snn.neuron import IFNode, LIFNode, ParametricLIFNode
from .snn.delays import DelayedLinear
from .wtacrs.modules import WTACRSLinear
from .hopfield import Hopfield, HopfieldLayer, HopfieldPooling
from .local import (FFClassEmbeddingLinear, FFLinear, LocalBlock, LocalSequential,
                    TargetProjectionLinear)
from .quant.qlinear import Int4WeightOnlyLinear, Int8DynamicLinear, Int8WeightOnlyLinear
from .quant.bitlinear import BitLinear
from .quant.nupes import PowerQuantLinear

__all__ = [name for name in dir() if not name.startswith("_")]
