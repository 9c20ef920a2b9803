"""Argument checks and the [outer, channels, inner] picture shared by every quant backend.

A quantized tensor has one (scale, zero_point) pair per *channel*; every granularity is the
contiguous tensor seen as ``[outer, channels, inner]`` with element ``(o*channels + c)*inner + i``
using ``scale[c]`` (see kernels/common/quant_layout.h):

* per-tensor: ``(1, 1, numel)``, scale of one element;
* per-channel (``axis=a``): ``(prod(shape[:a]), shape[a], prod(shape[a+1:]))``, scale ``[shape[a]]``;
* group-wise (``group_size=g``, groups along the last dim): ``(1, numel // g, g)``,
  scale ``[*shape[:-1], shape[-1] // g]``.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import torch

from .._autograd import values_of

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class Layout(NamedTuple):
    outer: int
    channels: int
    inner: int


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """The kernels' math type for an input dtype: fp32, or fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def quant_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer range of a ``bits``-bit code: signed two's complement, or unsigned."""
    if symmetric:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def check_bits(bits: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 2..8, got {bits!r}")


def check_float_input(x: torch.Tensor, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating tensor (float32, bfloat16, float16 or float64), got {x.dtype}"
        )


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def normalize_axis(axis: Optional[int], group_size: Optional[int], ndim: int) -> Optional[int]:
    """Checks axis / group_size against a tensor of ``ndim`` dims; returns axis in [0, ndim)."""
    if axis is not None and group_size is not None:
        raise ValueError("axis and group_size are exclusive: pass one of them (or neither, per-tensor)")
    if group_size is not None:
        if not _is_int(group_size) or group_size <= 0:
            raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
        if ndim == 0:
            raise ValueError("group_size needs x with at least one dim (groups run along the last dim)")
    if axis is None:
        return None
    if not _is_int(axis):
        raise ValueError(f"axis must be an integer, got {axis!r}")
    if not -ndim <= axis < max(ndim, 1) or ndim == 0:
        raise ValueError(f"axis {axis} is out of range for a tensor of {ndim} dims")
    return axis % ndim


def layout_of(shape: Sequence[int], axis: Optional[int], group_size: Optional[int]) -> Layout:
    """The [outer, channels, inner] view of a tensor of ``shape`` (axis already normalized)."""
    numel = math.prod(shape)
    if group_size is not None:
        if not _is_int(group_size) or group_size <= 0:
            raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
        last = shape[-1] if len(shape) else 1
        if last % group_size != 0:
            raise ValueError(
                f"group_size {group_size} does not divide the last dimension ({last}) of x"
            )
        return Layout(1, numel // group_size, group_size)
    if axis is not None:
        axis = axis % len(shape)
        return Layout(math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:]))
    return Layout(1, 1, numel)


def param_shape(shape: Sequence[int], axis: Optional[int], group_size: Optional[int]) -> tuple:
    """Shape of the scale / zero point for this granularity."""
    if group_size is not None:
        return (*shape[:-1], shape[-1] // group_size)
    if axis is not None:
        return (shape[axis],)
    return ()


def check_params(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                 axis: Optional[int], group_size: Optional[int]) -> None:
    """Shape, dtype, device and value checks of scale / zero_point against x."""
    for name, t in (("scale", scale), ("zero_point", zero_point)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}: put them on one device")
    if not scale.is_floating_point():
        raise TypeError(f"scale must be a floating tensor, got {scale.dtype}")
    if zero_point.dtype == torch.bool or zero_point.is_complex():
        raise TypeError(f"zero_point must be an integer or floating tensor, got {zero_point.dtype}")
    want = param_shape(x.shape, axis, group_size)
    n = math.prod(want)
    for name, t in (("scale", scale), ("zero_point", zero_point)):
        ok = tuple(t.shape) == tuple(want) or (t.numel() == 1 and n == 1 and t.dim() <= 1)
        if not ok:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}, expected {tuple(want)} for "
                + ("group-wise" if group_size is not None else "per-channel" if axis is not None else "per-tensor")
                + f" quantization of x with shape {tuple(x.shape)}"
            )
    if not torch.compiler.is_compiling() and scale.numel() and scale.device.type != "meta":
        # One small reduction over the scales (not over x), in the kernels' math dtype: a scale
        # <= 0, NaN, inf, or too small for 1/s to be finite there (a subnormal, or an fp64 scale
        # that underflows in fp32) would give NaN or zeros silently. On CUDA this reads one bool
        # back from the device per call.
        mt = math_dtype(x.dtype)
        s = values_of(scale.detach()).to(mt)  # every sample's under vmap
        tiny = torch.finfo(mt).tiny
        bad = ~(s >= tiny) | ~torch.isfinite(s)
        if bool(bad.any()):
            raise ValueError(
                f"scale must be positive, finite and at least {tiny:.3g} (the smallest normal "
                f"{str(mt).replace('torch.', '')}, the kernels' math type); got a value "
                "outside that (<= 0, NaN, inf, subnormal, or out of range after conversion)")
