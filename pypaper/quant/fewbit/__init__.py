"""pypaper.quant.fewbit: activations that keep 1-4 bits per element for their backward.

Novikov et al., "Few-Bit Backward: Quantized Gradients of Activation Functions for Memory
Footprint Reduction" (ICML 2023). Drop-in modules with torch.nn's names and arguments plus
``bits=`` (GELU, SiLU, Mish, ELU, SELU, Softplus, Sigmoid, Tanh, LogSigmoid, Hardswish; exact at
1 bit: ReLU, LeakyReLU, ReLU6, Hardtanh, Hardsigmoid), a converter for built models (torch
functions held as attributes become a FunctionActivation taking the function's arguments), and
the functional ``activation(x, name, bits)``.

Kernels: C++ kernels/cpu/fewbit_cpu.h (+ csrc/quant/fewbit_cpu.cpp), CUDA
kernels/cuda/fewbit_kernels.cu, Triton pypaper/quant/fewbit/triton_kernels.py; the code and its
packed layout kernels/common/fewbit_pack.h; the optimal tables csrc/quant/fewbit_dp.h via
tables.py; the plain-PyTorch reference reference.py.
"""
from ... import _ext
from . import _registration, reference, tables
from .convert import FunctionActivation, convert, revert
from .modules import (ELU, GELU, SELU, FewBitActivation, Hardsigmoid, Hardswish, Hardtanh,
                      LeakyReLU, LogSigmoid, Mish, ReLU, ReLU6, Sigmoid, SiLU, Softplus, Tanh)
from .ops import activation, apply, backend_for
from .tables import Approximation, approximation, fit_density, optimal_approximation

if _ext.LOADED:
    _registration.register_native()

__all__ = ["ELU", "GELU", "SELU", "Approximation", "FewBitActivation", "FunctionActivation",
           "Hardsigmoid", "Hardswish",
           "Hardtanh", "LeakyReLU", "LogSigmoid", "Mish", "ReLU", "ReLU6", "SiLU", "Sigmoid",
           "Softplus", "Tanh", "activation", "apply", "approximation", "backend_for", "convert",
           "fit_density", "optimal_approximation", "reference", "revert", "tables"]
