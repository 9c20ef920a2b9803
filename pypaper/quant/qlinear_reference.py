"""Plain-PyTorch reference of the quantized linear layers (issue #7, linear kernels).

The formulas and storage layouts are kernels/common/qlinear_math.h; every backend (C++ CPU, CUDA,
Triton) is tested against these functions. This is also the backend that runs anywhere
(``PYPAPER_BACKEND=reference``) and the weight preparation used by every backend (quantizing and
packing weights happens once, at ``quantize_`` time, so it is plain PyTorch).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

PANEL = 16  # output channels per int8 panel
KSTEP = 4  # consecutive k per 32-bit lane
INT4_BLOCK = 32  # k per int4 block (16 bytes: low nibbles k 0..15, high nibbles k 16..31)
FLT_MIN = torch.finfo(torch.float32).tiny


def _ceil_to(v: int, m: int) -> int:
    return (v + m - 1) // m * m


# ---------------------------------------------------------------------------------------------
# Weight preparation (once per layer)


def quantize_weight_int8(w: torch.Tensor, group_size: Optional[int] = None):
    """Symmetric int8 codes in [-127, 127] with one scale per output channel (group_size None)
    or per group of ``group_size`` consecutive inputs: s = max|w| / 127, q = round(w / s).
    Returns (codes [N, K] int8, scale [N, groups] float32)."""
    w = w.detach().to(torch.float32)
    N, K = w.shape
    G = K if group_size is None else group_size
    groups = K // G if G else 1
    wg = w.reshape(N, groups, G) if K else w.reshape(N, 1, 0)
    amax = wg.abs().amax(dim=2) if K else torch.zeros(N, 1)
    scale = (amax / 127.0).clamp_min(FLT_MIN)
    q = torch.round(wg / scale[..., None]).clamp(-127, 127).to(torch.int8).reshape(N, K)
    return q, scale.reshape(N, groups).contiguous()


def quantize_weight_int4(w: torch.Tensor, group_size: int):
    """Asymmetric 4-bit codes in [0, 15] per group of ``group_size`` inputs, the range widened to
    hold 0: s = (max(w, 0) - min(w, 0)) / 15, z = clamp(round(-min(w, 0) / s), 0, 15),
    q = clamp(round(w / s) + z, 0, 15), w ~= (q - z) * s.
    Returns (codes [N, K] uint8 (unpacked), scale [N, groups], zero [N, groups]) float32."""
    w = w.detach().to(torch.float32)
    N, K = w.shape
    groups = K // group_size
    wg = w.reshape(N, groups, group_size)
    lo = wg.amin(dim=2).clamp(max=0)
    hi = wg.amax(dim=2).clamp(min=0)
    scale = ((hi - lo) / 15.0).clamp_min(FLT_MIN)
    zero = torch.clamp(torch.round(-lo / scale), 0, 15)
    q = torch.clamp(torch.round(wg / scale[..., None]) + zero[..., None], 0, 15)
    return q.to(torch.uint8).reshape(N, K), scale.contiguous(), zero.contiguous()


def pack_int8_panels(q: torch.Tensor) -> torch.Tensor:
    """int8 codes [N, K] -> panels [ceil(N/16), ceil(K/4), 16, 4] (zero padded)."""
    N, K = q.shape
    Np, Kp = _ceil_to(max(N, 1), PANEL), _ceil_to(max(K, 1), KSTEP)
    if N == 0:
        Np = 0
    if K == 0:
        Kp = 0
    p = F.pad(q, (0, Kp - K, 0, Np - N))
    return p.reshape(Np // PANEL, PANEL, Kp // KSTEP, KSTEP).permute(0, 2, 1, 3).contiguous()


def unpack_int8_panels(packed: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """Inverse of pack_int8_panels: int8 codes [N, K]."""
    P, K4 = packed.shape[0], packed.shape[1]
    return packed.permute(0, 2, 1, 3).reshape(P * PANEL, K4 * KSTEP)[:N, :K]


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """4-bit codes [N, K] (K a multiple of 32) -> bytes [N, K/2]: in each 32-k block, byte j holds
    k = j (low nibble) and k = 16 + j (high nibble)."""
    N, K = q.shape
    b = q.to(torch.uint8).reshape(N, K // INT4_BLOCK, 2, 16)
    return (b[:, :, 0] | (b[:, :, 1] << 4)).reshape(N, K // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4: codes [N, K] uint8."""
    N, half = packed.shape
    b = packed.reshape(N, half // 16, 1, 16)
    return torch.cat([b & 0xF, b >> 4], dim=2).reshape(N, 2 * half)


# ---------------------------------------------------------------------------------------------
# Dequantized weights (the backward, and tests)


def dequantize_int8_dynamic_weight(w_packed, w_scale, in_features: int) -> torch.Tensor:
    q = unpack_int8_panels(w_packed, w_scale.shape[0], in_features)
    return q.to(torch.float32) * w_scale[:, None]


def dequantize_int8_weight(w, scale) -> torch.Tensor:
    N, K = w.shape
    groups = scale.shape[1]
    return (w.to(torch.float32).reshape(N, groups, K // groups) * scale[..., None]).reshape(N, K)


def dequantize_int4_weight(w, scale, zero) -> torch.Tensor:
    q = unpack_int4(w).to(torch.float32)
    N, K = q.shape
    groups = scale.shape[1]
    qg = q.reshape(N, groups, K // groups)
    return ((qg - zero[..., None]) * scale[..., None]).reshape(N, K)


# ---------------------------------------------------------------------------------------------
# The ops


def quantize_activations(x: torch.Tensor, act_qmax: int):
    """Per-row codes (float tensor of integers) and scales: s = max(max|x_m| / A, FLT_MIN),
    q = clamp(round(x / s), -A, A)."""
    amax = x.abs().amax(dim=1) if x.shape[1] else x.new_zeros(x.shape[0])
    s = (amax / float(act_qmax)).clamp_min(FLT_MIN)
    q = torch.round(x / s[:, None]).clamp(-act_qmax, act_qmax)
    return q, s


def int8_dynamic_linear_int32(x, w_packed, w_colsum, out_features: int, act_qmax: int):
    """(acc [M, N] int32 = qa @ qw^T, exact (fp64 matmul of integers below 2^53), sa [M])."""
    K = x.shape[1]
    q, s = quantize_activations(x, act_qmax)
    qw = unpack_int8_panels(w_packed, out_features, K)
    acc = (q.to(torch.float64) @ qw.to(torch.float64).t()).to(torch.int32)
    return acc, s


def int8_dynamic_linear(x, w_packed, w_scale, w_colsum, bias, act_qmax: int):
    """y = (float(acc) * sa) * w_scale + bias, fp32, in this order (the kernels' epilogue)."""
    acc, s = int8_dynamic_linear_int32(x, w_packed, w_colsum, w_scale.shape[0], act_qmax)
    y = (acc.to(torch.float32) * s[:, None]) * w_scale[None, :]
    return y + (bias if bias is not None else 0.0)


def int8_weight_only_linear(x, w, scale, bias):
    """y = x @ (w * scale)^T + bias in fp64 then rounded to fp32 (the most accurate answer the
    kernels approximate)."""
    wd = dequantize_int8_weight(w, scale).to(torch.float64)
    y = x.to(torch.float64) @ wd.t()
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y.to(torch.float32)


def int4_weight_only_linear(x, w, scale, zero, bias):
    wd = dequantize_int4_weight(w, scale, zero).to(torch.float64)
    y = x.to(torch.float64) @ wd.t()
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y.to(torch.float32)
