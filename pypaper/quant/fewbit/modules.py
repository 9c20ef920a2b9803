"""Drop-in activation modules with torch.nn's names, arguments and defaults, plus ``bits=``.

    nn.GELU(approximate="tanh")  ->  pypaper.quant.fewbit.GELU(approximate="tanh", bits=2)

The forward equals torch's module; the backward uses the few-bit table (tables.py) and keeps
ceil(bits * numel / 8) bytes instead of the input. ``inplace=True`` is accepted for
compatibility and ignored: the output is a new tensor (the input must stay intact until the
codes are taken, and the saved codes make an in-place result pointless memory-wise).
``density=`` fits the table to another input distribution (a callable, or samples; see
tables.fit_density); ``grid=(lo, hi, n)`` sets the DP grid.

ReLU, LeakyReLU, ReLU6, Hardtanh and Hardsigmoid are exact with one bit (torch's own backward,
bit for bit): they accept ``bits=`` (1..4 or None, so that code written for the approximated
ones works) and ignore it. ``bits=None`` means the default, 2, everywhere.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from . import ops, tables


class FewBitActivation(nn.Module):
    """Base: activation ``name`` with scalar ``params`` and its derivative table."""

    name: str = ""

    def __init__(self, params=(), bits: Optional[int] = tables.DEFAULT_BITS, density=None,
                 grid=None):
        super().__init__()
        self.approximation = tables.approximation(self.name, bits, params, density, grid)

    @property
    def bits(self) -> int:
        return self.approximation.bits

    def forward(self, x):
        return ops.apply(x, self.approximation)

    def extra_repr(self) -> str:
        p = ", ".join(f"{v:g}" for v in self.approximation.params)
        return (f"{p + ', ' if p else ''}bits={self.bits}"
                f"{', exact' if self.approximation.exact else ''}")


class GELU(FewBitActivation):
    def __init__(self, approximate: str = "none", *, bits: Optional[int] = 2, density=None,
                 grid=None):
        if approximate not in ("none", "tanh"):
            raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
        self.name = "gelu" if approximate == "none" else "gelu_tanh"
        self.approximate = approximate
        super().__init__((), bits, density, grid)

    def extra_repr(self) -> str:
        rest = super().extra_repr()
        return rest if self.approximate == "none" else f"approximate='tanh', {rest}"


class SiLU(FewBitActivation):
    name = "silu"

    def __init__(self, inplace: bool = False, *, bits: Optional[int] = 2, density=None, grid=None):
        super().__init__((), bits, density, grid)
        self.inplace = inplace


class Mish(FewBitActivation):
    name = "mish"

    def __init__(self, inplace: bool = False, *, bits: Optional[int] = 2, density=None, grid=None):
        super().__init__((), bits, density, grid)
        self.inplace = inplace


class ELU(FewBitActivation):
    name = "elu"

    def __init__(self, alpha: float = 1.0, inplace: bool = False, *, bits: Optional[int] = 2,
                 density=None, grid=None):
        super().__init__((alpha,), bits, density, grid)
        self.alpha, self.inplace = alpha, inplace


class SELU(FewBitActivation):
    name = "selu"

    def __init__(self, inplace: bool = False, *, bits: Optional[int] = 2, density=None, grid=None):
        super().__init__((), bits, density, grid)
        self.inplace = inplace


class Softplus(FewBitActivation):
    name = "softplus"

    def __init__(self, beta: float = 1.0, threshold: float = 20.0, *, bits: Optional[int] = 2,
                 density=None, grid=None):
        super().__init__((beta, threshold), bits, density, grid)
        self.beta, self.threshold = beta, threshold


class Sigmoid(FewBitActivation):
    name = "sigmoid"

    def __init__(self, *, bits: Optional[int] = 2, density=None, grid=None):
        super().__init__((), bits, density, grid)


class Tanh(FewBitActivation):
    name = "tanh"

    def __init__(self, *, bits: Optional[int] = 2, density=None, grid=None):
        super().__init__((), bits, density, grid)


class LogSigmoid(FewBitActivation):
    name = "logsigmoid"

    def __init__(self, *, bits: Optional[int] = 2, density=None, grid=None):
        super().__init__((), bits, density, grid)


class Hardswish(FewBitActivation):
    name = "hardswish"

    def __init__(self, inplace: bool = False, *, bits: Optional[int] = 2, density=None, grid=None):
        super().__init__((), bits, density, grid)
        self.inplace = inplace


# ---- exact with one bit: bits= (1..4 or None) is accepted and ignored ------------------------


class ReLU(FewBitActivation):
    name = "relu"

    def __init__(self, inplace: bool = False, *, bits: Optional[int] = None):
        tables.check_bits(bits)
        super().__init__((), 1)
        self.inplace = inplace


class LeakyReLU(FewBitActivation):
    name = "leaky_relu"

    def __init__(self, negative_slope: float = 1e-2, inplace: bool = False, *,
                 bits: Optional[int] = None):
        tables.check_bits(bits)
        super().__init__((negative_slope,), 1)
        self.negative_slope, self.inplace = negative_slope, inplace


class Hardtanh(FewBitActivation):
    name = "hardtanh"

    def __init__(self, min_val: float = -1.0, max_val: float = 1.0, inplace: bool = False, *,
                 bits: Optional[int] = None):
        tables.check_bits(bits)
        if not min_val < max_val:
            raise ValueError(f"min_val must be below max_val, got {min_val} and {max_val}")
        super().__init__((min_val, max_val), 1)
        self.min_val, self.max_val, self.inplace = min_val, max_val, inplace


class ReLU6(Hardtanh):
    def __init__(self, inplace: bool = False, *, bits: Optional[int] = None):
        super().__init__(0.0, 6.0, inplace, bits=bits)


class Hardsigmoid(FewBitActivation):
    name = "hardsigmoid"

    def __init__(self, inplace: bool = False, *, bits: Optional[int] = None):
        tables.check_bits(bits)
        super().__init__((), 1)
        self.inplace = inplace
