"""Triton kernels of uniform affine (fake) quantization, as ``torch.library.triton_op`` ops.

Ops (same signatures as the C++ schemas of csrc/schemas.cpp, so a dispatcher can pick either):
``pypaper::fake_quantize_triton``, ``pypaper::fake_quantize_backward_triton``,
``pypaper::quantize_triton`` and ``pypaper::dequantize_triton``.

Math (the reference is pypaper/quant/reference.py; kernels/common/quant_math.h is the same in
C++). Scale s > 0, zero point zp, integer range [qmin, qmax]:

    z    = clamp(round_half_even(zp), qmin, qmax)
    code = rint(x * (1/s)) + z                    deterministic (round half to even)
    code = floor(x * (1/s) + u) + z               stochastic, u = uniform01(seed, flat index)
    y    = (clamp(code, qmin, qmax) - z) * s      fake-quantize
    q    = clamp(code, qmin, qmax), NaN -> z      quantize (int8 / uint8, or two 4-bit codes a byte)

Backward: straight-through for x (dx = dy inside [qmin, qmax], else 0; a NaN code is "above"),
LSQ (Esser et al. 2020) / LSQ+ (Bhalgat et al. 2020) for s and z, summed per channel and scaled
by grad_factor. Math runs in fp32 (fp64 for fp64 inputs) and is cast to x's dtype, so the
results match the reference to the bit: 1/s and z are computed on the host with the same torch
ops as the reference, and on the GPU every product, sum and rounding that must be exact is one
PTX instruction in inline asm (Triton would otherwise contract a*b+c into an FMA, and it links
libdevice with fp32 subnormals flushed to zero).

Layout (pypaper/quant/layout.py): the contiguous tensor is [outer, channels, inner] and element
e uses channel (e // inner) % channels. The kernels tile it as a 2-D array in one of two views so
that the channel is a per-row or per-column vector, not a per-element division:
  row view     [outer*channels, inner],   row r has channel r % channels;
  column view  [outer, channels*inner],   column j has channel j // inner.
The backward writes per-tile partial sums of dscale / dzero_point (one value per row or column
of the tile) that torch sums afterwards in fp64: deterministic, no atomics.
"""
import math
from typing import NamedTuple, Optional

import torch

from .._autograd import fresh_output
from .._triton import HAVE_TRITON, tl, triton, triton_available  # noqa: F401
from .layout import layout_of, math_dtype

__all__ = ["HAVE_TRITON", "triton_available"]


# ---- launch heuristics (pure functions) ----------------------------------------------------------

# Elements per program: 4096 fp32 = 16 KiB per streamed tensor, enough bytes in flight per SM
# for a memory-bound kernel with 4-8 warps, and few programs under the CPU interpreter.
_TILE = 4096
# Rows per tile in the column view, at least: the backward's partial-sum buffer is then at most
# numel / 32 per gradient, a few percent of the traffic of x, dy and dx.
_COL_VIEW_ROWS = 32


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def num_warps_for(tile: int) -> int:
    """4 warps up to 2048 elements a tile (16 per thread), 8 above."""
    return 4 if tile <= 2048 else 8


class TilePlan(NamedTuple):
    row_channel: bool  # True: row view, channel = row % channels; False: column view
    rows: int
    cols: int
    block_r: int
    block_c: int
    num_warps: int

    @property
    def row_blocks(self) -> int:
        return -(-self.rows // self.block_r)

    @property
    def col_blocks(self) -> int:
        return -(-self.cols // self.block_c)

    @property
    def programs(self) -> int:
        return self.row_blocks * self.col_blocks

    @property
    def partials(self) -> int:
        """Size of the backward's partial-sum buffer: rows * col_blocks or row_blocks * cols."""
        return self.rows * self.col_blocks if self.row_channel else self.row_blocks * self.cols


def tile_plan(outer: int, channels: int, inner: int, tile: int = _TILE) -> TilePlan:
    """2-D tiling of an [outer, channels, inner] tensor (numel > 0).

    Row view when the inner extent is long (per-tensor, per-channel on a leading axis,
    group-wise): tiles run along inner and reduce along it. Column view when inner is short and
    outer long (per-channel on the last axes): tiles stack 32 outer rows and reduce across them.
    Of the two, the one with the smaller partial-sum buffer wins.
    """
    rows_a, cols_a = outer * channels, inner
    bc = min(_pow2(cols_a), tile)
    br = min(_pow2(rows_a), max(1, tile // bc))
    a = TilePlan(True, rows_a, cols_a, br, bc, num_warps_for(br * bc))
    rows_b, cols_b = outer, channels * inner
    bc = min(_pow2(cols_b), tile // _COL_VIEW_ROWS)
    br = min(_pow2(rows_b), max(1, tile // bc))
    b = TilePlan(False, rows_b, cols_b, br, bc, num_warps_for(br * bc))
    return a if a.partials <= b.partials else b


def packed_plan(rows: int, cols: int, tile: int = _TILE) -> TilePlan:
    """Tiling of the packed kernels over [rows, cols] (bytes when packing, codes when unpacking);
    the channel is computed per element there."""
    bc = min(_pow2(cols), tile)
    br = min(_pow2(rows), max(1, tile // bc))
    return TilePlan(True, rows, cols, br, bc, num_warps_for(br * bc))


def _needs_int64(plan: TilePlan, row_len: Optional[int] = None) -> bool:
    """int64 indices when a (masked) lane of the padded grid could pass int32: the flat index
    is row * row_len + col (row_len = cols, or the unpacked row length of the packing kernel)."""
    padded_cols = plan.col_blocks * plan.block_c
    row_len = padded_cols if row_len is None else max(row_len, padded_cols)
    return plan.row_blocks * plan.block_r * row_len + 2 * padded_cols >= 2**31


# ---- host-side checks shared by the ops ----------------------------------------------------------


def _check_float(dtype: torch.dtype, name: str) -> None:
    if dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise TypeError(f"{name} must be float32, float64, float16 or bfloat16, got {dtype}")


def _check_range(qmin: int, qmax: int) -> None:
    if not qmin < qmax:
        raise ValueError(f"quant_min ({qmin}) must be below quant_max ({qmax})")
    # codes are stored as int8 (signed range) or uint8: the range must fit (as in quant_args.h)
    if not ((qmin >= -128 and qmax <= 127) or (qmin >= 0 and qmax <= 255)):
        raise ValueError("quant_min/quant_max must fit int8 ([-128, 127]) or uint8 ([0, 255]), "
                         f"got [{qmin}, {qmax}]")


def _check_pack(pack: bool, qmin: int, qmax: int) -> None:
    """Packed codes are 4-bit nibbles: two's complement [-8, 7] or unsigned [0, 15]."""
    if pack and not ((qmin >= -8 and qmax <= 7) or (qmin >= 0 and qmax <= 15)):
        raise ValueError("pack=True needs a 4-bit code range inside [-8, 7] or [0, 15], "
                         f"got [{qmin}, {qmax}]")


def _check_device(op: str, t: torch.Tensor) -> None:
    if t.device.type == "meta":
        return
    ok, why = triton_available(t.device)
    if not ok:
        raise RuntimeError(f"pypaper::{op}: {why} (got tensors on {t.device})")


def _layout(shape, axis: Optional[int], group_size: Optional[int]):
    """[outer, channels, inner] of ``shape``, with the argument checks of the C++ ops."""
    if axis is not None and group_size is not None:
        raise ValueError("axis and group_size are exclusive: pass one of them")
    if group_size is not None:
        if group_size <= 0:
            raise ValueError(f"group_size must be positive, got {group_size}")
    if axis is not None:
        nd = len(shape)
        if nd == 0 or not -nd <= axis < nd:
            raise ValueError(f"axis {axis} is out of range for a tensor of {nd} dims")
        axis = axis % nd
    return tuple(layout_of(tuple(shape), axis, group_size))


def _params(x_device, scale: torch.Tensor, zero_point: torch.Tensor, channels: int,
            mt: torch.dtype, qmin: int, qmax: int):
    """One (s, 1/s, z) per channel in the math type, computed with the reference's torch ops."""
    for name, t in (("scale", scale), ("zero_point", zero_point)):
        if t.device != x_device:
            raise ValueError(f"{name} is on {t.device} but x is on {x_device}")
        if t.numel() != channels:
            raise ValueError(f"{name} has {t.numel()} elements, expected {channels}")
    if not scale.is_floating_point():
        raise TypeError(f"scale must be a floating tensor, got {scale.dtype}")
    if zero_point.dtype == torch.bool or zero_point.is_complex():
        raise TypeError(f"zero_point must be an integer or floating tensor, got {zero_point.dtype}")
    s = scale.reshape(-1).to(mt).contiguous()
    inv = 1.0 / s
    z = torch.clamp(torch.round(zero_point.reshape(-1).to(mt)), qmin, qmax).contiguous()
    return s, inv, z


def _check_seed(seed: Optional[torch.Tensor], x: torch.Tensor) -> None:
    if seed is None:
        return
    if seed.dtype != torch.int64 or seed.numel() != 1:
        raise ValueError(f"seed must be an int64 tensor of one element, got {seed.dtype} "
                         f"with {seed.numel()} elements")
    if seed.device != x.device:
        raise ValueError(f"seed is on {seed.device} but x is on {x.device}")


if triton is not None:
    from .._triton import wrap_triton  # torch.library's; an interpreted kernel as it is

    from .._triton import triton_op  # torch.library's, plus its torch.func kernel

    from .._triton import (_USE_RN, _add, _bf16_bits, _bits, _floor, _launches, _load_as, _mul,
                           _rint, _store_as, _uniform)

    # ---- device math: the shared helpers of pypaper/_triton.py, then the quant-specific ones --

    @triton.jit
    def _clamp(v, QMIN: tl.constexpr, QMAX: tl.constexpr):
        # where() rather than min/max: NaN passes through, as torch.clamp does.
        return tl.where(v < QMIN, QMIN * 1.0, tl.where(v > QMAX, QMAX * 1.0, v)).to(v.dtype)

    @triton.jit
    def _tile(rows, cols, n_cb, IDX64: tl.constexpr, BLOCK_R: tl.constexpr,
              BLOCK_C: tl.constexpr):
        """Row and column indices of this program's tile, its mask and flat element indices."""
        pid = tl.program_id(0)
        if IDX64:
            pid = pid.to(tl.int64)
        r = (pid // n_cb) * BLOCK_R + tl.arange(0, BLOCK_R)
        c = (pid % n_cb) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (r < rows)[:, None] & (c < cols)[None, :]
        e = r[:, None] * cols + c[None, :]
        return r, c, mask, e

    @triton.jit
    def _channel_params(s_ptr, inv_ptr, z_ptr, r, c, rows, cols, channels, inner,
                        ROW_CH: tl.constexpr):
        """s, 1/s, z of the tile, shaped [BLOCK_R, 1] (row view) or [1, BLOCK_C] (column view)."""
        if ROW_CH:
            ch = r % channels
            m = r < rows
            s = tl.load(s_ptr + ch, mask=m, other=1.0)[:, None]
            inv = tl.load(inv_ptr + ch, mask=m, other=1.0)[:, None]
            z = tl.load(z_ptr + ch, mask=m, other=0.0)[:, None]
        else:
            ch = c // inner
            m = c < cols
            s = tl.load(s_ptr + ch, mask=m, other=1.0)[None, :]
            inv = tl.load(inv_ptr + ch, mask=m, other=1.0)[None, :]
            z = tl.load(z_ptr + ch, mask=m, other=0.0)[None, :]
        return s, inv, z

    @triton.jit
    def _code(x, inv, z, seed_ptr, e, STOCH: tl.constexpr, IDX64: tl.constexpr,
              USE_RN: tl.constexpr):
        """Unclamped code: rint(x * (1/s)) + z, or floor(x * (1/s) + u) + z."""
        xs = _mul(x, inv, USE_RN)
        if STOCH:
            u = _uniform(seed_ptr, e, IDX64).to(x.dtype)
            return _floor(_add(xs, u, USE_RN), USE_RN) + z
        else:
            return _rint(xs, USE_RN) + z

    # ---- kernels ---------------------------------------------------------------------------------

    @triton.jit
    def _fake_quant_fwd_kernel(x_ptr, y_ptr, s_ptr, inv_ptr, z_ptr, seed_ptr, rows, cols, n_cb,
                               channels, inner, QMIN: tl.constexpr, QMAX: tl.constexpr,
                               ROW_CH: tl.constexpr, STOCH: tl.constexpr, IDX64: tl.constexpr,
                               USE_RN: tl.constexpr, BF16_BITS: tl.constexpr,
                               BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        r, c, mask, e = _tile(rows, cols, n_cb, IDX64, BLOCK_R, BLOCK_C)
        s, inv, z = _channel_params(s_ptr, inv_ptr, z_ptr, r, c, rows, cols, channels, inner,
                                    ROW_CH)
        x = _load_as(x_ptr + e, mask, s.dtype, BF16_BITS)
        code = _code(x, inv, z, seed_ptr, e, STOCH, IDX64, USE_RN)
        y = _mul(_clamp(code, QMIN, QMAX) - z, s, USE_RN)
        _store_as(y_ptr + e, y, mask, BF16_BITS)

    @triton.jit
    def _fake_quant_bwd_kernel(g_ptr, x_ptr, dx_ptr, s_ptr, inv_ptr, z_ptr, seed_ptr, ps_ptr,
                               pz_ptr, rows, cols, n_cb, channels, inner, QMIN: tl.constexpr,
                               QMAX: tl.constexpr, ROW_CH: tl.constexpr, STOCH: tl.constexpr,
                               NEED_SZ: tl.constexpr, IDX64: tl.constexpr, USE_RN: tl.constexpr,
                               BF16_BITS: tl.constexpr, BLOCK_R: tl.constexpr,
                               BLOCK_C: tl.constexpr):
        r, c, mask, e = _tile(rows, cols, n_cb, IDX64, BLOCK_R, BLOCK_C)
        s, inv, z = _channel_params(s_ptr, inv_ptr, z_ptr, r, c, rows, cols, channels, inner,
                                    ROW_CH)
        x = _load_as(x_ptr + e, mask, s.dtype, BF16_BITS)
        g = _load_as(g_ptr + e, mask, s.dtype, BF16_BITS)
        code = _code(x, inv, z, seed_ptr, e, STOCH, IDX64, USE_RN)
        inside = (code >= QMIN) & (code <= QMAX)  # False for a NaN code
        zero = tl.zeros_like(g)
        _store_as(dx_ptr + e, tl.where(inside, g, zero), mask, BF16_BITS)
        if NEED_SZ:
            # LSQ: inside, ds = dy * (fq(x) - x) / s; outside, ds = dy * (bound - z), dz = -dy * s.
            xfq = _mul(code - z, s, USE_RN)
            ds_in = _mul(_mul(g, xfq - x, USE_RN), inv, USE_RN)
            bound = tl.where(code < QMIN, QMIN * 1.0, QMAX * 1.0).to(s.dtype)
            ds_out = _mul(g, bound - z, USE_RN)
            ds = tl.where(mask, tl.where(inside, ds_in, ds_out), zero)
            dz = tl.where(mask & (~inside), -_mul(g, s, USE_RN), zero)
            pid = tl.program_id(0)
            if IDX64:
                pid = pid.to(tl.int64)
            if ROW_CH:
                # partials[row, col_block]
                m = r < rows
                off = r * n_cb + pid % n_cb
                tl.store(ps_ptr + off, tl.sum(ds, axis=1), mask=m)
                tl.store(pz_ptr + off, tl.sum(dz, axis=1), mask=m)
            else:
                # partials[row_block, col]
                m = c < cols
                off = (pid // n_cb) * cols + c
                tl.store(ps_ptr + off, tl.sum(ds, axis=0), mask=m)
                tl.store(pz_ptr + off, tl.sum(dz, axis=0), mask=m)

    @triton.jit
    def _quantize_kernel(x_ptr, q_ptr, s_ptr, inv_ptr, z_ptr, rows, cols, n_cb, channels, inner,
                         QMIN: tl.constexpr, QMAX: tl.constexpr, ROW_CH: tl.constexpr,
                         IDX64: tl.constexpr, USE_RN: tl.constexpr, BF16_BITS: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        r, c, mask, e = _tile(rows, cols, n_cb, IDX64, BLOCK_R, BLOCK_C)
        s, inv, z = _channel_params(s_ptr, inv_ptr, z_ptr, r, c, rows, cols, channels, inner,
                                    ROW_CH)
        x = _load_as(x_ptr + e, mask, s.dtype, BF16_BITS)
        code = _rint(_mul(x, inv, USE_RN), USE_RN) + z
        q = tl.where(code != code, z, _clamp(code, QMIN, QMAX))  # NaN input -> z
        tl.store(q_ptr + e, q.to(tl.int32).to(q_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _code_at(x_ptr, inv_ptr, z_ptr, e, m, channels, inner, QMIN: tl.constexpr,
                 QMAX: tl.constexpr, USE_RN: tl.constexpr, BF16_BITS: tl.constexpr):
        """Clamped int32 code of flat element e (channel computed per element)."""
        ch = (e // inner) % channels
        inv = tl.load(inv_ptr + ch, mask=m, other=1.0)
        z = tl.load(z_ptr + ch, mask=m, other=0.0)
        x = _load_as(x_ptr + e, m, inv.dtype, BF16_BITS)
        code = _rint(_mul(x, inv, USE_RN), USE_RN) + z
        return tl.where(code != code, z, _clamp(code, QMIN, QMAX)).to(tl.int32)

    @triton.jit
    def _quantize_packed_kernel(x_ptr, q_ptr, inv_ptr, z_ptr, rows, last, half, n_cb, channels,
                                inner, QMIN: tl.constexpr, QMAX: tl.constexpr,
                                IDX64: tl.constexpr, USE_RN: tl.constexpr,
                                BF16_BITS: tl.constexpr, BLOCK_R: tl.constexpr,
                                BLOCK_C: tl.constexpr):
        # Tile over the packed bytes [rows, half]; byte j holds codes 2j (low) and 2j+1 (high).
        r, j, mask, b = _tile(rows, half, n_cb, IDX64, BLOCK_R, BLOCK_C)
        e0 = r[:, None] * last + 2 * j[None, :]
        m1 = mask & (2 * j + 1 < last)[None, :]
        lo = _code_at(x_ptr, inv_ptr, z_ptr, e0, mask, channels, inner, QMIN, QMAX, USE_RN,
                      BF16_BITS)
        hi = _code_at(x_ptr, inv_ptr, z_ptr, e0 + 1, m1, channels, inner, QMIN, QMAX, USE_RN,
                      BF16_BITS)
        hi = tl.where(m1, hi, 0)  # odd last dim: high nibble 0
        byte = (lo & 0xF) | ((hi & 0xF) << 4)
        tl.store(q_ptr + b, byte.to(tl.uint8), mask=mask)

    @triton.jit
    def _dequantize_kernel(q_ptr, y_ptr, s_ptr, inv_ptr, z_ptr, rows, cols, n_cb, channels,
                           inner, ROW_CH: tl.constexpr, IDX64: tl.constexpr,
                           USE_RN: tl.constexpr, BF16_BITS: tl.constexpr, BLOCK_R: tl.constexpr,
                           BLOCK_C: tl.constexpr):
        r, c, mask, e = _tile(rows, cols, n_cb, IDX64, BLOCK_R, BLOCK_C)
        s, inv, z = _channel_params(s_ptr, inv_ptr, z_ptr, r, c, rows, cols, channels, inner,
                                    ROW_CH)
        q = tl.load(q_ptr + e, mask=mask, other=0).to(s.dtype)
        y = _mul(q - z, s, USE_RN)
        _store_as(y_ptr + e, y, mask, BF16_BITS)

    @triton.jit
    def _dequantize_packed_kernel(q_ptr, y_ptr, s_ptr, z_ptr, rows, last, half, n_cb, channels,
                                  inner, SIGNED: tl.constexpr, IDX64: tl.constexpr,
                                  USE_RN: tl.constexpr, BF16_BITS: tl.constexpr,
                                  BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        # Tile over the codes [rows, last]; code l sits in nibble l & 1 of byte l // 2.
        r, l, mask, e = _tile(rows, last, n_cb, IDX64, BLOCK_R, BLOCK_C)
        byte = tl.load(q_ptr + r[:, None] * half + (l // 2)[None, :], mask=mask, other=0)
        v = (byte.to(tl.int32) >> ((l & 1) * 4)[None, :]) & 0xF
        if SIGNED:
            v = (v ^ 8) - 8  # sign-extend the two's-complement nibble
        ch = (e // inner) % channels
        s = tl.load(s_ptr + ch, mask=mask, other=1.0)
        z = tl.load(z_ptr + ch, mask=mask, other=0.0)
        y = _mul(v.to(s.dtype) - z, s, USE_RN)
        _store_as(y_ptr + e, y, mask, BF16_BITS)

    def _tiled_launch(kernel, plan: TilePlan, *args, **consts):
        wrap_triton(kernel)[(plan.programs,)](
            *args, IDX64=_needs_int64(plan), USE_RN=_USE_RN, BLOCK_R=plan.block_r,
            BLOCK_C=plan.block_c, num_warps=plan.num_warps, **consts)

    # ---- ops -------------------------------------------------------------------------------------

    @triton_op("pypaper::fake_quantize_triton", mutates_args=())
    def fake_quantize_triton(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                             quant_min: int, quant_max: int, axis: Optional[int] = None,
                             group_size: Optional[int] = None,
                             seed: Optional[torch.Tensor] = None,
                             grad_factor: float = 1.0) -> torch.Tensor:
        """y = (clamp(code) - z) * s in x's dtype (module docstring); seed selects stochastic.
        grad_factor only scales the LSQ gradients (used by the autograd formula)."""
        _check_device("fake_quantize_triton", x)
        _check_float(x.dtype, "x")
        _check_range(quant_min, quant_max)
        _check_seed(seed, x)
        x = x.contiguous()
        outer, channels, inner = _layout(x.shape, axis, group_size)
        s, inv, z = _params(x.device, scale, zero_point, channels, math_dtype(x.dtype),
                            quant_min, quant_max)
        y = torch.empty_like(x, memory_format=torch.contiguous_format)
        if x.numel() == 0 or not _launches(x):
            return y
        plan = tile_plan(outer, channels, inner)
        _tiled_launch(_fake_quant_fwd_kernel, plan, _bits(x), _bits(y), s, inv, z,
                      seed if seed is not None else s, plan.rows, plan.cols, plan.col_blocks,
                      channels, inner, QMIN=quant_min, QMAX=quant_max,
                      ROW_CH=plan.row_channel, STOCH=seed is not None,
                      BF16_BITS=_bf16_bits(x.dtype))
        return y

    @triton_op("pypaper::fake_quantize_backward_triton", mutates_args=())
    def fake_quantize_backward_triton(
            grad: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
            quant_min: int, quant_max: int, axis: Optional[int], group_size: Optional[int],
            seed: Optional[torch.Tensor], grad_factor: float, need_scale_grad: bool,
            need_zero_point_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dx, dscale, dzero_point): STE for x, LSQ/LSQ+ sums per channel times grad_factor."""
        _check_device("fake_quantize_backward_triton", x)
        _check_float(x.dtype, "x")
        _check_range(quant_min, quant_max)
        _check_seed(seed, x)
        if tuple(grad.shape) != tuple(x.shape):
            raise ValueError(f"grad has shape {tuple(grad.shape)} but x has shape {tuple(x.shape)}")
        if grad.dtype != x.dtype:
            raise TypeError(f"grad has dtype {grad.dtype} but x has dtype {x.dtype}")
        if grad.device != x.device:
            raise ValueError(f"grad is on {grad.device} but x is on {x.device}")
        x = x.contiguous()
        grad = grad.contiguous()
        outer, channels, inner = _layout(x.shape, axis, group_size)
        mt = math_dtype(x.dtype)
        s, inv, z = _params(x.device, scale, zero_point, channels, mt, quant_min, quant_max)
        # grad_zero_point in zero_point's dtype when it is floating, else scale's (as the C++ op).
        zp_dtype = zero_point.dtype if zero_point.is_floating_point() else scale.dtype
        dx = torch.empty_like(x, memory_format=torch.contiguous_format)
        need_sz = need_scale_grad or need_zero_point_grad
        gs = gz = None
        if x.numel() == 0 or not _launches(x):
            gs = torch.zeros(channels, dtype=torch.float64, device=x.device)
            gz = torch.zeros(channels, dtype=torch.float64, device=x.device)
        else:
            plan = tile_plan(outer, channels, inner)
            n_part = plan.partials if need_sz else 1
            ps = torch.empty(n_part, dtype=mt, device=x.device)
            pz = torch.empty(n_part, dtype=mt, device=x.device)
            _tiled_launch(_fake_quant_bwd_kernel, plan, _bits(grad), _bits(x), _bits(dx), s,
                          inv, z, seed if seed is not None else s, ps, pz, plan.rows, plan.cols,
                          plan.col_blocks, channels, inner, QMIN=quant_min, QMAX=quant_max,
                          ROW_CH=plan.row_channel, STOCH=seed is not None, NEED_SZ=need_sz,
                          BF16_BITS=_bf16_bits(x.dtype))
            if need_sz:
                # Sum the partials in fp64 (as the C++ op); channel = middle axis of each view.
                if plan.row_channel:
                    view = (outer, channels, plan.col_blocks)
                else:
                    view = (plan.row_blocks, channels, inner)
                gs = ps.view(view).sum(dim=(0, 2), dtype=torch.float64)
                gz = pz.view(view).sum(dim=(0, 2), dtype=torch.float64)
        if need_scale_grad:
            grad_scale = fresh_output(gs * grad_factor, scale.shape, scale.dtype)
        else:
            grad_scale = torch.zeros(scale.shape, dtype=scale.dtype, device=scale.device)
        if need_zero_point_grad:
            grad_zp = fresh_output(gz * grad_factor, zero_point.shape, zp_dtype)
        else:
            grad_zp = torch.zeros(zero_point.shape, dtype=zp_dtype, device=scale.device)
        return dx, grad_scale, grad_zp

    @triton_op("pypaper::quantize_triton", mutates_args=())
    def quantize_triton(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                        quant_min: int, quant_max: int, axis: Optional[int] = None,
                        group_size: Optional[int] = None, pack: bool = False) -> torch.Tensor:
        """Codes clamp(rint(x/s) + z) (NaN -> z): int8 for a signed range, uint8 otherwise;
        pack=True: two codes per byte along the last dim (2j low nibble, 2j+1 high)."""
        _check_device("quantize_triton", x)
        _check_float(x.dtype, "x")
        _check_range(quant_min, quant_max)
        _check_pack(pack, quant_min, quant_max)
        x = x.contiguous()
        outer, channels, inner = _layout(x.shape, axis, group_size)
        s, inv, z = _params(x.device, scale, zero_point, channels, math_dtype(x.dtype),
                            quant_min, quant_max)
        if pack:
            last = x.shape[-1] if x.dim() else 1
            shape = list(x.shape)  # 0-dim x: 0-dim codes, one byte (an op returns no views)
            if shape:
                shape[-1] = (last + 1) // 2
            q = torch.empty(shape, dtype=torch.uint8, device=x.device)
            if x.numel() and _launches(x):
                rows, half = x.numel() // last, (last + 1) // 2
                plan = packed_plan(rows, half)
                wrap_triton(_quantize_packed_kernel)[(plan.programs,)](
                    _bits(x), q, inv, z, rows, last, half, plan.col_blocks, channels, inner,
                    QMIN=quant_min, QMAX=quant_max, IDX64=_needs_int64(plan, last),
                    USE_RN=_USE_RN, BF16_BITS=_bf16_bits(x.dtype),
                    BLOCK_R=plan.block_r, BLOCK_C=plan.block_c, num_warps=plan.num_warps)
            return q
        q = torch.empty(x.shape, dtype=torch.int8 if quant_min < 0 else torch.uint8,
                        device=x.device)
        if x.numel() and _launches(x):
            plan = tile_plan(outer, channels, inner)
            _tiled_launch(_quantize_kernel, plan, _bits(x), q, s, inv, z, plan.rows, plan.cols,
                          plan.col_blocks, channels, inner, QMIN=quant_min, QMAX=quant_max,
                          ROW_CH=plan.row_channel, BF16_BITS=_bf16_bits(x.dtype))
        return q

    @triton_op("pypaper::dequantize_triton", mutates_args=())
    def dequantize_triton(data: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                          quant_min: int, quant_max: int, axis: Optional[int],
                          group_size: Optional[int], packed: bool, last_dim: int,
                          dtype: torch.dtype) -> torch.Tensor:
        """y = (q - z) * s in ``dtype`` from int8/uint8 codes, or uint8 packed nibbles."""
        _check_device("dequantize_triton", data)
        _check_range(quant_min, quant_max)
        _check_pack(packed, quant_min, quant_max)
        _check_float(dtype, "dtype")
        signed = quant_min < 0
        want = torch.uint8 if packed or not signed else torch.int8
        if data.dtype != want:
            raise TypeError(f"data must be {want} for this code range, got {data.dtype}")
        data = data.contiguous()
        shape = list(data.shape)
        if packed:
            if data.dim() < 1 or data.shape[-1] != (last_dim + 1) // 2:
                raise ValueError(f"packed data's last dim {data.shape[-1] if data.dim() else 0} "
                                 f"does not hold last_dim={last_dim} codes")
            shape[-1] = last_dim
        outer, channels, inner = _layout(shape, axis, group_size)
        mt = math_dtype(dtype)
        s, inv, z = _params(data.device, scale, zero_point, channels, mt, quant_min, quant_max)
        y = torch.empty(shape, dtype=dtype, device=data.device)
        n = math.prod(shape)
        if n == 0 or not _launches(data):
            return y
        if packed:
            rows, half = n // last_dim, (last_dim + 1) // 2
            plan = packed_plan(rows, last_dim)
            wrap_triton(_dequantize_packed_kernel)[(plan.programs,)](
                data, _bits(y), s, z, rows, last_dim, half, plan.col_blocks, channels, inner,
                SIGNED=signed, IDX64=_needs_int64(plan), USE_RN=_USE_RN,
                BF16_BITS=_bf16_bits(dtype), BLOCK_R=plan.block_r, BLOCK_C=plan.block_c,
                num_warps=plan.num_warps)
            return y
        plan = tile_plan(outer, channels, inner)
        _tiled_launch(_dequantize_kernel, plan, data, _bits(y), s, inv, z, plan.rows, plan.cols,
                      plan.col_blocks, channels, inner, ROW_CH=plan.row_channel,
                      BF16_BITS=_bf16_bits(dtype))
        return y

    __all__ += ["fake_quantize_triton", "fake_quantize_backward_triton", "quantize_triton",
                "dequantize_triton", "tile_plan", "packed_plan", "num_warps_for"]
