"""pypaper: drop-in PyTorch layers from recent papers, backed by hand-written kernels.

Families: pypaper.quant (uniform quantization, fake-quant with STE/LSQ). See README.md.
"""
from ._backend import BACKENDS, BackendUnavailable, use_backend
from ._ext import build_info
from . import quant
from . import snn
from . import wtacrs

__version__ = "0.1.0"
__all__ = ["BACKENDS", "BackendUnavailable", "build_info", "quant", "snn", "use_backend", "wtacrs"]
