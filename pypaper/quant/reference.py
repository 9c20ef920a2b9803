"""Plain-PyTorch reference of uniform quantization: the semantics every kernel must reproduce.

Math (kernels/common/quant_math.h has the same formulas, once, for the C++ and CUDA kernels):

    z    = clamp(round(zero_point), qmin, qmax)                 torch's rule for float zero points
    code = round_half_even(x * (1/s)) + z                       or floor(x * (1/s) + u) + z, u ~ U[0,1)
    q    = clamp(code, qmin, qmax)
    y    = (q - z) * s                                          fake-quantize

The math runs in fp32 for fp32/bf16/fp16 inputs (float64 for float64) and the result is cast back
to x's dtype, so the fp32 kernels match this reference to the bit. Gradients: straight-through for
x (masked to the clip range) and LSQ (Esser et al., 2020) / LSQ+ (Bhalgat et al., 2020) for scale
and zero point, as torch._fake_quantize_learnable_per_tensor_affine defines them.

The uniforms u of stochastic rounding come from the counter-based hash of
kernels/common/hash_rng.h, reproduced here in int64 arithmetic so that every backend draws the
same u for the same (seed, element index).
"""
from __future__ import annotations

from typing import Optional

import torch

from .layout import Layout, layout_of, math_dtype

_M32 = 0xFFFFFFFF


def _pcg_hash(v: torch.Tensor) -> torch.Tensor:
    """PCG hash on uint32 values held in int64 tensors."""
    state = (v * 747796405 + 2891336453) & _M32
    word = (((state >> ((state >> 28) + 4)) ^ state) * 277803737) & _M32
    return (word >> 22) ^ word


def _key(seed: int) -> tuple[int, int]:
    s = seed & 0xFFFFFFFFFFFFFFFF
    a = int(_pcg_hash(torch.tensor(s & _M32, dtype=torch.int64)))
    a2 = int(_pcg_hash(torch.tensor(a, dtype=torch.int64)))  # see kernels/common/hash_rng.h
    b = int(_pcg_hash(torch.tensor(((s >> 32) & _M32) ^ a2, dtype=torch.int64)))
    return a, b


def uniform_noise(seed: int, numel: int, device=None) -> torch.Tensor:
    """u[e] in [0, 1) for e in range(numel): the stochastic-rounding uniforms of every backend."""
    a, b = _key(int(seed))
    idx = torch.arange(numel, dtype=torch.int64, device=device)
    lo, hi = idx & _M32, idx >> 32
    h = _pcg_hash(_pcg_hash(lo ^ a) ^ ((hi + b) & _M32))
    return (h >> 8).to(torch.float32) * (1.0 / 16777216.0)


def _per_element(p: torch.Tensor, layout: Layout, dtype: torch.dtype) -> torch.Tensor:
    """Broadcast one value per channel to the [outer, channels, inner] view."""
    return p.reshape(-1).to(dtype).reshape(1, layout.channels, 1)


def _codes(x3, s3, z3, seed):
    """Unclamped codes; a seed selects stochastic rounding."""
    inv = 1.0 / s3
    if seed is not None:
        u = uniform_noise(seed, x3.numel(), x3.device).reshape(x3.shape).to(x3.dtype)
        return torch.floor(x3 * inv + u) + z3
    return torch.round(x3 * inv) + z3


def _prepare(x, scale, zero_point, qmin, qmax, axis, group_size):
    layout = layout_of(x.shape, axis, group_size)
    dt = math_dtype(x.dtype)
    x3 = x.to(dt).reshape(layout)
    s3 = _per_element(scale, layout, dt)
    z3 = torch.clamp(torch.round(_per_element(zero_point, layout, dt)), qmin, qmax)
    return layout, x3, s3, z3


def _seed_int(seed) -> Optional[int]:
    if seed is None:
        return None
    return int(seed.reshape(-1)[0]) if isinstance(seed, torch.Tensor) else int(seed)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int,
                  qmax: int, axis: Optional[int] = None, group_size: Optional[int] = None,
                  seed=None, grad_factor: float = 1.0) -> torch.Tensor:
    """Fake quantization (a seed selects stochastic rounding), differentiable by autograd.

    Rounding is made straight-through with the detach trick r = v + (round(v) - v).detach()
    (exact: round(v) - v is exact in floating point), so autograd of this plain formula yields
    the STE gradient for x and the LSQ gradients for scale and zero point, independently of the
    hand-written backward formulas below. grad_factor scales the scale/zero-point gradients
    without changing the values: s' = s.detach() + (s - s.detach()) * g (exactly s, gradient g).
    """
    seed = _seed_int(seed)
    layout = layout_of(x.shape, axis, group_size)
    dt = math_dtype(x.dtype)
    x3 = x.to(dt).reshape(layout)
    s3 = _per_element(scale, layout, dt)
    zp3 = _per_element(zero_point, layout, dt)
    if grad_factor != 1.0:
        s3 = s3.detach() + (s3 - s3.detach()) * grad_factor
        zp3 = zp3.detach() + (zp3 - zp3.detach()) * grad_factor
    # z = clamp(round(zp)) in value; its gradient passes straight through both the rounding
    # and the clamp, as in torch's learnable fake-quant (and the kernels): dz = -dy*s outside.
    z3 = torch.clamp(torch.round(zp3), qmin, qmax).detach() + (zp3 - zp3.detach())
    # ±inf would make round(v) - v NaN: clamp far outside every code range first (the clip
    # below saturates there anyway, so values and gradients are unchanged).
    v = torch.clamp(x3 * (1.0 / s3), -2.0**24, 2.0**24)
    if seed is not None:
        u = uniform_noise(seed, x3.numel(), x3.device).reshape(x3.shape).to(dt)
        v = v + u
        r = v + (torch.floor(v) - v).detach()
    else:
        r = v + (torch.round(v) - v).detach()
    # The clip passes the gradient on the closed range [qmin, qmax], as the kernels and torch's
    # fake_quantize ops do, whatever torch.clamp's subgradient at its bounds is (1 up to torch
    # 2.13, 0 from 2.14 on: pytorch#191142): the code itself inside, the clamp (constant) outside.
    code = r + z3
    inside = (code >= qmin) & (code <= qmax)
    y = (torch.where(inside, code, torch.clamp(code, qmin, qmax)) - z3) * s3
    return y.reshape(x.shape).to(x.dtype)


def fake_quantize_backward(grad: torch.Tensor, x: torch.Tensor, scale: torch.Tensor,
                           zero_point: torch.Tensor, qmin: int, qmax: int,
                           axis: Optional[int] = None, group_size: Optional[int] = None,
                           seed=None, grad_factor: float = 1.0):
    """(grad_x, grad_scale, grad_zero_point) of fake quantization: STE for x, LSQ for s and z,
    written out as the kernels compute them (kernels/common/quant_math.h)."""
    seed = _seed_int(seed)
    layout, x3, s3, z3 = _prepare(x, scale, zero_point, qmin, qmax, axis, group_size)
    code = _codes(x3, s3, z3, seed)
    g3 = grad.to(x3.dtype).reshape(layout)
    inside = (code >= qmin) & (code <= qmax)
    below = code < qmin
    bound = torch.where(below, torch.full_like(code, qmin), torch.full_like(code, qmax))
    xfq = (code - z3) * s3
    ds = torch.where(inside, g3 * (xfq - x3) * (1.0 / s3), g3 * (bound - z3))
    dz = torch.where(inside, torch.zeros_like(g3), -g3 * s3)
    gx = torch.where(inside, g3, torch.zeros_like(g3))
    gs = ds.sum(dim=(0, 2)) * grad_factor
    gz = dz.sum(dim=(0, 2)) * grad_factor
    zp_dtype = zero_point.dtype if zero_point.is_floating_point() else scale.dtype
    return (gx.reshape(x.shape).to(x.dtype), gs.reshape(scale.shape).to(scale.dtype),
            gz.reshape(zero_point.shape).to(zp_dtype))


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int,
                   qmax: int, axis: Optional[int] = None,
                   group_size: Optional[int] = None) -> torch.Tensor:
    """Integer codes clamp(round(x/s) + z) as int32, unpacked, in x's shape (NaN -> z)."""
    _, x3, s3, z3 = _prepare(x, scale, zero_point, qmin, qmax, axis, group_size)
    code = torch.round(x3 * (1.0 / s3)) + z3  # NaN -> z below
    code = torch.where(torch.isnan(code), z3.expand_as(code), torch.clamp(code, qmin, qmax))
    return code.reshape(x.shape).to(torch.int32)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                     qmin: int, qmax: int, axis: Optional[int], group_size: Optional[int],
                     dtype: torch.dtype) -> torch.Tensor:
    """(q - z) * s for unpacked integer codes of the original shape."""
    layout = layout_of(codes.shape, axis, group_size)
    dt = math_dtype(dtype)
    s3 = _per_element(scale, layout, dt)
    z3 = torch.clamp(torch.round(_per_element(zero_point, layout, dt)), qmin, qmax)
    y = (codes.to(dt).reshape(layout) - z3) * s3
    return y.reshape(codes.shape).to(dtype)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Two codes of <= 4 bits per byte along the last dim: element 2j low nibble, 2j+1 high."""
    c = codes.to(torch.int32) & 0xF
    if c.shape[-1] % 2:
        c = torch.nn.functional.pad(c, (0, 1))
    lo, hi = c[..., 0::2], c[..., 1::2]
    return (lo | (hi << 4)).to(torch.uint8)


def unpack_nibbles(packed: torch.Tensor, last_dim: int, signed: bool) -> torch.Tensor:
    p = packed.to(torch.int32)
    both = torch.stack((p & 0xF, (p >> 4) & 0xF), dim=-1).reshape(*packed.shape[:-1], -1)
    both = both[..., :last_dim]
    return ((both ^ 8) - 8) if signed else both
