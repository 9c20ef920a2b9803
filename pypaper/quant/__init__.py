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
from . import qlinear_ops, qlinear_reference
from .api import (FqnToConfig, Int4WeightOnlyConfig, Int8DynamicActivationInt8WeightConfig,
                  Int8DynamicConfig, Int8WeightOnlyConfig, ModuleFqnToConfig, model_bytes, quantize_)
from .configs import QuantConfig
from .qlinear import Int4WeightOnlyLinear, Int8DynamicLinear, Int8WeightOnlyLinear
from . import bitlinear, hawq, nupes, power
from .bitlinear import BitLinear, bits_report
from .hawq import HAWQResult, allocate_bits, hutchinson_trace, top_eigenvalue
from .hawq import hawq as hawq_allocate
from .nupes import PowerExponentConfig, PowerQuantLinear, calibrate, freeze, search_exponent
from .power import power_dequantize, power_fake_quantize, power_quantize

if _ext.LOADED:
    _registration.register_native()

# The Triton twins (pypaper/quant/triton_kernels.py) load on first use: importing triton takes
# seconds, and on a CPU-only machine they can only run under TRITON_INTERPRET=1.

__all__ = ["QuantizedTensor", "backend_for", "dequantize", "fake_quantize", "quantize", "reference"]
__all__ += ["FqnToConfig", "Int4WeightOnlyConfig", "Int4WeightOnlyLinear",
            "Int8DynamicActivationInt8WeightConfig", "ModuleFqnToConfig", "Int8DynamicConfig",
            "Int8DynamicLinear", "Int8WeightOnlyConfig", "Int8WeightOnlyLinear", "QuantConfig",
            "model_bytes", "qlinear_ops", "qlinear_reference", "quantize_"]
__all__ += ["BitLinear", "HAWQResult", "PowerExponentConfig", "PowerQuantLinear", "allocate_bits",
            "bitlinear", "bits_report", "calibrate", "freeze", "hawq", "hawq_allocate",
            "hutchinson_trace", "nupes", "power", "power_dequantize", "power_fake_quantize",
            "power_quantize", "search_exponent", "top_eigenvalue"]
