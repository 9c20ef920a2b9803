"""The config protocol of ``pypaper.quant.quantize_(model, config)`` (torchao-style).

One config class per method. A config is a small frozen dataclass that knows how to turn one
``nn.Linear`` into its quantized replacement; ``quantize_`` walks the model, asks
``filter_fn(module, fqn)`` which layers to touch and calls ``config.apply(module, fqn)`` on each.
New methods (int8/int4 linears, power-exponent NUPES, ...) subclass ``QuantConfig`` in their own
file; ``quantize_`` needs no change to learn about them.
"""
from __future__ import annotations

import dataclasses

from torch import nn


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """Base class of every quantization config.

    Subclasses implement :meth:`apply`. ``bits`` is the weight bit width the config stores, used by
    HAWQ's size budget (``model_bits``) and by reports.
    """

    def apply(self, module: nn.Linear, fqn: str = "") -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__}.apply is not implemented")

    @property
    def weight_bits(self) -> float:
        """Stored bits per weight element, scales included (for size budgets and reports)."""
        raise NotImplementedError(f"{type(self).__name__}.weight_bits is not implemented")
