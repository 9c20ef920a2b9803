"""Plain-PyTorch reference of the few-bit activation ops (runs on any device).

Same semantics as the C++/CUDA/Triton ops of csrc/schemas.cpp (``pypaper::fewbit_forward``,
``pypaper::fewbit_backward``); the layout is kernels/common/fewbit_pack.h:

    piece(x) = #{j : not x <= borders[j]}     code = piece, or piece % 2 when ``fold``
    (NaN is above every border: the top piece; fold takes 2 or 3 borders)
    n codes of b bits -> ceil(b*n/8) bytes, in blocks of 32 elements; block B (r = its length,
    32 but for the last) starts at bit 32*b*B, and bit k of element j of the block is at bit
    k*r + j (bit i of the stream = bit i%8 of byte i//8, LSB first)

    backward: grad_x = 0 if levels[code] == 0 else levels[code] * grad   (math in levels' dtype,
              rounded once to grad's dtype; a select, as torch's ReLU/Hardtanh backward)
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

BLOCK = 32

_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946


def activation(x: torch.Tensor, name: str, params: Sequence[float]) -> torch.Tensor:
    """y = f(x) with torch's functional API (the forward every backend must equal bit for bit)."""
    p = list(params)
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if name == "silu":
        return F.silu(x)
    if name == "mish":
        return F.mish(x)
    if name == "elu":
        return F.elu(x, p[0])
    if name == "selu":
        return F.selu(x)
    if name == "softplus":
        return F.softplus(x, p[0], p[1])
    if name == "sigmoid":
        return torch.sigmoid(x)
    if name == "tanh":
        return torch.tanh(x)
    if name == "logsigmoid":
        return F.logsigmoid(x)
    if name == "hardswish":
        return F.hardswish(x)
    if name == "relu":
        return F.relu(x)
    if name == "leaky_relu":
        return F.leaky_relu(x, p[0])
    if name == "hardtanh":
        return F.hardtanh(x, p[0], p[1])
    if name == "hardsigmoid":
        return F.hardsigmoid(x)
    raise ValueError(f"unknown activation {name!r}")


def codes_of(x: torch.Tensor, borders: torch.Tensor, fold: bool) -> torch.Tensor:
    """The int64 code of every element of x (flattened): the number of borders below it (all of
    them for NaN)."""
    xm = x.reshape(-1).to(borders.dtype)
    piece = (~(xm.unsqueeze(1) <= borders.unsqueeze(0))).sum(dim=1)
    return piece % 2 if fold else piece


def bit_positions(n: int, bits: int, device=None) -> torch.Tensor:
    """[n, bits] int64: the stream bit of bit k of element i's code."""
    i = torch.arange(n, dtype=torch.int64, device=device)
    first = i // BLOCK * BLOCK
    r = torch.clamp(n - first, max=BLOCK)
    k = torch.arange(bits, dtype=torch.int64, device=device)
    return first.unsqueeze(1) * bits + k.unsqueeze(0) * r.unsqueeze(1) + (i - first).unsqueeze(1)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """int codes [n] -> uint8 [ceil(bits*n/8)] in the layout above."""
    n = codes.numel()
    nbytes = (n * bits + 7) // 8
    k = torch.arange(bits, dtype=torch.int64, device=codes.device)
    bit_vals = (codes.reshape(-1, 1).to(torch.int64) >> k) & 1  # [n, bits]
    # out of place (index_put, not stream[...] = ...): runs under torch.func.vmap too
    stream = torch.zeros(nbytes * 8, dtype=torch.int64, device=codes.device).index_put(
        (bit_positions(n, bits, codes.device).reshape(-1),), bit_vals.reshape(-1))
    weights = 1 << torch.arange(8, dtype=torch.int64, device=codes.device)
    return (stream.reshape(nbytes, 8) * weights).sum(dim=1).to(torch.uint8)


def unpack(packed: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """uint8 [ceil(bits*n/8)] -> int64 codes [n]."""
    pos = bit_positions(n, bits, packed.device)  # [n, bits]
    byte = packed.to(torch.int64)[pos >> 3]
    bit = (byte >> (pos & 7)) & 1
    k = torch.arange(bits, dtype=torch.int64, device=packed.device)
    return (bit << k).sum(dim=1)


def fewbit_forward(x: torch.Tensor, name: str, params: Sequence[float], borders: torch.Tensor,
                   levels: torch.Tensor, bits: int, fold: bool):
    """(y, packed codes): y = f(x) exactly (torch's call on the contiguous x, as the C++, CUDA
    and Triton ops), codes of x under ``borders``."""
    y = activation(x.contiguous(), name, params)
    return y, pack(codes_of(x, borders, fold), bits)


def fewbit_backward(grad: torch.Tensor, codes: torch.Tensor, levels: torch.Tensor,
                    bits: int) -> torch.Tensor:
    """grad_x = levels[code] * grad (0 where the level is 0), math in levels' dtype, one rounding
    to grad's dtype."""
    c = unpack(codes, grad.numel(), bits)
    lv = levels[c]
    gx = torch.where(lv == 0, torch.zeros_like(lv), grad.reshape(-1).to(levels.dtype) * lv)
    return gx.to(grad.dtype).reshape(grad.shape)


class _FewBitFunction(torch.autograd.Function):
    """Autograd of the reference backend: saves only the packed codes. (setup_context and
    generate_vmap_rule: the form torch.func transforms accept.)"""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, name, params, borders, levels, bits, fold):
        y, codes = fewbit_forward(x, name, params, borders, levels, bits, fold)
        return y, codes

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, codes = output
        ctx.mark_non_differentiable(codes)
        ctx.save_for_backward(codes, inputs[4])
        ctx.bits = inputs[5]

    @staticmethod
    def backward(ctx, grad, _grad_codes):
        codes, levels = ctx.saved_tensors
        return fewbit_backward(grad, codes, levels, ctx.bits), None, None, None, None, None, None


def fewbit_activation(x, name, params, borders, levels, bits, fold) -> torch.Tensor:
    """The reference backend of pypaper.quant.fewbit.activation (differentiable)."""
    return _FewBitFunction.apply(x, name, tuple(params), borders, levels, bits, fold)[0]
