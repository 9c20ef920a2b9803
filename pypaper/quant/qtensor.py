"""The result of pypaper.quant.quantize: integer codes plus what is needed to map them back."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .layout import quant_range


@dataclass
class QuantizedTensor:
    """Codes of a uniformly quantized tensor.

    data:        int8 codes (signed range), uint8 (unsigned range), or for bits <= 4 uint8 with
                 two codes per byte along the last dim (element 2j in the low nibble), shape
                 [..., ceil(last / 2)].
    scale:       one float per channel (shape () per-tensor, [C] per-channel, [..., last/g] groups).
    zero_point:  int32, same shape as scale (zeros when symmetric).
    x ~= (code - zero_point) * scale.
    """

    data: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    bits: int
    axis: Optional[int]
    group_size: Optional[int]
    symmetric: bool
    shape: torch.Size
    dtype: torch.dtype

    @property
    def packed(self) -> bool:
        return self.bits <= 4

    @property
    def quant_min(self) -> int:
        return quant_range(self.bits, self.symmetric)[0]

    @property
    def quant_max(self) -> int:
        return quant_range(self.bits, self.symmetric)[1]

    def dequantize(self) -> torch.Tensor:
        from .ops import dequantize

        return dequantize(self)

    @property
    def nbytes(self) -> int:
        """Bytes of codes, scales and zero points together."""
        return sum(t.numel() * t.element_size() for t in (self.data, self.scale, self.zero_point))

    def to(self, device) -> "QuantizedTensor":
        return QuantizedTensor(self.data.to(device), self.scale.to(device), self.zero_point.to(device),
                               self.bits, self.axis, self.group_size, self.symmetric, self.shape,
                               self.dtype)

    def __repr__(self) -> str:
        gran = (f"group_size={self.group_size}" if self.group_size is not None
                else f"axis={self.axis}" if self.axis is not None else "per-tensor")
        return (f"QuantizedTensor(shape={tuple(self.shape)}, bits={self.bits}, {gran}, "
                f"symmetric={self.symmetric}, dtype={self.dtype}, device={self.data.device})")
