"""pypaper.quant: uniform quantization with hand-written kernels.

    quantize(x, bits=8, *, axis=None, group_size=None, symmetric=True) -> QuantizedTensor
    dequantize(q) -> Tensor
    fake_quantize(x, scale, zero_point, bits=8, *, axis=None, group_size=None, symmetric=True,
                  stochastic=False, generator=None, grad_factor=1.0) -> Tensor   (STE / LSQ)

Kernels: C++ kernels/cpu/quant_cpu.h, CUDA kernels/cuda/quant_kernels.cu, Triton
pypaper/quant/triton_kernels.py; the shared per-element math kernels/common/quant_math.h; the
plain-PyTorch reference pypaper/quant/reference.py.
"""
from .. import _ext
from . import _registration, reference
from .ops import backend_for, dequantize, fake_quantize, quantize
from .qtensor import QuantizedTensor
# ---- issue #7, linear kernels + quantize_ API: imports here ----
# ---- issue #7, NUPES / HAWQ / BitLinear: imports here ----

if _ext.LOADED:
    _registration.register_native()

# The Triton twins (pypaper/quant/triton_kernels.py) load on first use: importing triton takes
# seconds, and on a CPU-only machine they can only run under TRITON_INTERPRET=1.

__all__ = ["QuantizedTensor", "backend_for", "dequantize", "fake_quantize", "quantize", "reference"]
# ---- issue #7, linear kernels + quantize_ API: __all__ += [...] here ----
# ---- issue #7, NUPES / HAWQ / BitLinear: __all__ += [...] here ----
