"""pypaper.hopfield: modern Hopfield layers with a fused multi-step retrieval kernel, a drop-in
for hflayers (github ml-jku/hopfield-layers).

    from pypaper.hopfield import Hopfield, HopfieldPooling, HopfieldLayer   # was: from hflayers import ...
    hopfield_retrieve(q, k, v, beta, steps, eps, mask)                      # the fused op
    energy(state, stored, beta)                                             # the paper's energy

Kernels: C++ kernels/cpu/hopfield_cpu.h; shared math kernels/common/hopfield_math.h; the
plain-PyTorch reference pypaper/hopfield/reference.py.
"""
from .. import _ext
from . import _registration, reference
from .ops import backend_for, hopfield_retrieve
from .energy import energy
from .layers import Hopfield, HopfieldCore, HopfieldLayer, HopfieldPooling

if _ext.LOADED and hasattr(_ext._C, "build_info"):
    import torch as _torch

    if hasattr(_torch.ops.pypaper, "hopfield_retrieve"):
        _registration.register_native()

__all__ = ["Hopfield", "HopfieldCore", "HopfieldLayer", "HopfieldPooling", "backend_for", "energy",
           "hopfield_retrieve", "reference"]
