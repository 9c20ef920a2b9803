"""pypaper: drop-in PyTorch layers from recent papers, backed by hand-written kernels.

Families: pypaper.quant (quantization, few-bit backward), pypaper.snn (spiking neurons),
pypaper.wtacrs (sampled linear layers), pypaper.hopfield, pypaper.local. Every layer is also in
pypaper.nn and every op in pypaper.ops. See README.md.
"""
from ._backend import BACKENDS, BackendUnavailable, use_backend
from ._ext import build_info
from . import quant
from . import snn
from . import wtacrs
from . import hopfield
from . import local
from . import memory
from . import nn, ops

__version__ = "0.1.0"
__all__ = ["BACKENDS", "BackendUnavailable", "build_info", "hopfield", "local", "memory", "nn", "ops", "quant",
           "snn", "use_backend", "wtacrs"]
