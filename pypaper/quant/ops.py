"""Public uniform-quantization ops: quantize, dequantize, fake_quantize.

Each checks its arguments (errors name the argument), picks a backend (pypaper/_backend.py) and
calls torch.ops.pypaper.<op> (C++ on CPU, CUDA on GPU), its Triton twin, or the plain-PyTorch
reference (pypaper/quant/reference.py). Fake kernels and autograd live in _registration.py.

Default backends, by device: CPU -> the C++ kernel; CUDA -> the hand-written CUDA kernel, then
Triton (no GPU timing has been taken yet to rank them; bench/quant.py does it on a GPU machine).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _autograd, _backend
from . import reference
from .layout import (check_bits, check_float_input, check_params, layout_of, math_dtype,
                     normalize_axis, param_shape, quant_range)
from .qtensor import QuantizedTensor

_DEFAULT_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}


def _load_triton():
    from . import _registration

    return _registration.load_triton()


_REASONS = _backend.standard_reasons(_load_triton)


def backend_for(x: torch.Tensor) -> str:
    """The backend the quant ops would use for x now."""
    return _backend.select(x.device, _DEFAULT_ORDER.get(x.device.type, ("reference",)), _REASONS)


def _op(name: str, backend: str):
    if backend == "triton":
        return getattr(torch.ops.pypaper, name + "_triton")
    return getattr(torch.ops.pypaper, name)


def _draw_seed(device: torch.device, generator: Optional[torch.Generator]) -> torch.Tensor:
    """One int64 seed on x's device, drawn from ``generator`` (or the default generator)."""
    gen_device = generator.device if generator is not None else device
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=gen_device, generator=generator)
    return seed.to(device)


def _as_tensor(v, like: torch.Tensor, dtype: torch.dtype, shape: tuple) -> torch.Tensor:
    """A Python number as a tensor of ``shape`` on x's device (a float keeps its fraction:
    a float zero point is rounded by the kernels, not truncated here)."""
    if isinstance(v, torch.Tensor):
        return v
    if isinstance(v, float) and not dtype.is_floating_point:
        dtype = torch.float32
    return torch.full(shape, v, dtype=dtype, device=like.device)


def fake_quantize(x: torch.Tensor, scale, zero_point, bits: int = 8, *, axis: Optional[int] = None,
                  group_size: Optional[int] = None, symmetric: bool = True,
                  stochastic: bool = False, generator: Optional[torch.Generator] = None,
                  grad_factor: float = 1.0) -> torch.Tensor:
    """Quantize-dequantize ``x``: y = (clamp(round(x/s) + z, qmin, qmax) - z) * s.

    Straight-through estimator for x (the gradient passes where the code is inside
    [qmin, qmax], zero outside); LSQ gradients (Esser et al., "Learned Step Size Quantization",
    ICLR 2020; LSQ+ zero point, Bhalgat et al. 2020) for ``scale`` and ``zero_point`` when they
    require grad, multiplied by ``grad_factor`` (LSQ's g = 1/sqrt(numel * qmax)).

    Args:
        x: float32, bfloat16, float16 or float64 tensor; math runs in fp32 (fp64 for fp64).
        scale: positive float tensor, shape () per-tensor, [x.shape[axis]] per-channel,
            [*x.shape[:-1], x.shape[-1] // group_size] group-wise; a Python number stands for
            that shape filled with it.
        zero_point: int or float tensor (or number) of scale's shape; float zero points are
            rounded and clamped to the code range (torch's rule), gradients flow through.
        bits: 2..8. ``symmetric``: signed codes [-2^(b-1), 2^(b-1)-1], else [0, 2^b-1].
        axis / group_size: per-channel axis, or groups of ``group_size`` along the last dim.
        stochastic: round x/s down or up with probability given by its fraction (unbiased:
            E[y] = x inside the range); reproducible with ``generator`` (or torch.manual_seed).
            The uniforms come from a counter-based hash of (seed, element index), so the
            backward recomputes them instead of storing anything. Under torch.compile pass no
            generator (dynamo cannot trace one); seeding the default generator works there.
    """
    check_float_input(x)
    check_bits(bits)
    axis = normalize_axis(axis, group_size, x.dim())
    layout_of(x.shape, axis, group_size)
    pshape = param_shape(x.shape, axis, group_size)
    scale = _as_tensor(scale, x, math_dtype(x.dtype), pshape)
    zero_point = _as_tensor(zero_point, x, torch.int32, pshape)
    check_params(x, scale, zero_point, axis, group_size)
    qmin, qmax = quant_range(bits, symmetric)
    seed = _draw_seed(x.device, generator) if stochastic else None
    backend = backend_for(x)
    if backend == "reference":
        return reference.fake_quantize(x, scale, zero_point, qmin, qmax, axis, group_size, seed,
                                       grad_factor)
    return _op("fake_quantize", backend)(x, scale, zero_point, qmin, qmax, axis, group_size, seed,
                                         float(grad_factor))


def _channel_min_max(x: torch.Tensor, layout) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel min and max of x (no temporary of x's size when x is contiguous; a
    non-contiguous x is copied once by reshape).

    torch.aminmax is fast for a full reduction but 4-5x slower than amin + amax along a dim on
    this CPU build (measured: 27 ms against 7 ms on [131072, 128]), hence the split.
    """
    o, c, i = layout
    if o * c == 1:  # per-tensor: the full reduction is parallel; a one-row dim reduction is not
        return torch.aminmax(x)
    if i == 1:  # channels along the last dim: reduce over the rows
        x2 = x.reshape(o, c)
        return x2.amin(dim=0), x2.amax(dim=0)
    x2 = x.reshape(o * c, i)
    lo, hi = x2.amin(dim=1), x2.amax(dim=1)
    if o == 1:
        return lo, hi
    return lo.reshape(o, c).amin(dim=0), hi.reshape(o, c).amax(dim=0)


def _params_from_range(x: torch.Tensor, bits: int, axis, group_size, symmetric: bool):
    """Scale and zero point that map the range of x (per channel) onto the code range.

    symmetric:  s = max|x| / qmax, z = 0 (so -max|x| and max|x| are both representable);
    asymmetric: s = (max(x, 0) - min(x, 0)) / (qmax - qmin), z = qmin - round(min(x, 0) / s).
    A channel of zeros gets the smallest normal scale (all codes z).
    """
    qmin, qmax = quant_range(bits, symmetric)
    layout = layout_of(x.shape, axis, group_size)
    shape = param_shape(x.shape, axis, group_size)
    mt = math_dtype(x.dtype)
    tiny = torch.finfo(mt).tiny
    if x.numel() == 0:
        return (torch.ones(shape, dtype=mt, device=x.device),
                torch.zeros(shape, dtype=torch.int32, device=x.device))
    lo, hi = _channel_min_max(x.detach(), layout)
    lo, hi = lo.to(mt), hi.to(mt)
    if symmetric:
        amax = torch.maximum(-lo, hi)
        scale = (amax / qmax).clamp_min(tiny)
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
    else:
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        scale = ((hi - lo) / (qmax - qmin)).clamp_min(tiny)
        zero_point = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax).to(torch.int32)
    finite = torch.compiler.is_compiling() or bool(torch.isfinite(_autograd.values_of(scale)).all())
    if not finite:
        raise ValueError("x contains inf or NaN: no finite scale covers its range")
    return scale.reshape(shape), zero_point.reshape(shape)


def quantize(x: torch.Tensor, bits: int = 8, *, axis: Optional[int] = None,
             group_size: Optional[int] = None, symmetric: bool = True) -> QuantizedTensor:
    """Uniform quantization of ``x`` to ``bits``-bit integer codes with min/max scales.

    Per-tensor (default), per-channel (``axis``) or group-wise (``group_size`` along the last
    dim). Codes are int8 (symmetric) or uint8 (asymmetric); for bits <= 4 two codes share a byte.
    Returns a QuantizedTensor; ``dequantize(q)`` maps it back: x ~= (code - z) * s.
    """
    check_float_input(x)
    check_bits(bits)
    axis = normalize_axis(axis, group_size, x.dim())
    scale, zero_point = _params_from_range(x, bits, axis, group_size, symmetric)
    qmin, qmax = quant_range(bits, symmetric)
    pack = bits <= 4
    backend = backend_for(x)
    if backend == "reference":
        codes = reference.quantize_codes(x, scale, zero_point, qmin, qmax, axis, group_size)
        if pack:
            data = reference.pack_nibbles(codes.reshape(x.shape if x.dim() else (1,)))
            data = data.reshape(()) if x.dim() == 0 else data
        else:
            data = codes.to(torch.int8 if symmetric else torch.uint8)
    else:
        data = _op("quantize", backend)(x, scale, zero_point, qmin, qmax, axis, group_size, pack)
    return QuantizedTensor(data, scale, zero_point, bits, axis, group_size, symmetric, x.shape,
                           x.dtype)


def dequantize(q: QuantizedTensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Float tensor (q.dtype, or ``dtype``) from a QuantizedTensor: (code - z) * s."""
    if not isinstance(q, QuantizedTensor):
        raise TypeError(f"q must be a QuantizedTensor (from pypaper.quant.quantize), got {type(q).__name__}")
    dtype = dtype or q.dtype
    last = q.shape[-1] if len(q.shape) else 1
    backend = backend_for(q.data)
    if backend == "reference":
        codes = q.data
        if q.packed:
            data = q.data if q.data.dim() else q.data.reshape(1)
            codes = reference.unpack_nibbles(data, last, q.symmetric).reshape(q.shape)
        return reference.dequantize_codes(codes, q.scale, q.zero_point, q.quant_min, q.quant_max,
                                          q.axis, q.group_size, dtype)
    data = q.data if q.data.dim() else q.data.reshape(1)
    y = _op("dequantize", backend)(data, q.scale, q.zero_point, q.quant_min, q.quant_max, q.axis,
                                   q.group_size, q.packed, last, dtype)
    return y.reshape(q.shape)
