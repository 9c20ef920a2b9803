"""Triton kernels of the quantized linear ops (issue #7, linear kernels), as
``torch.library.triton_op`` ops with the C++ schemas' signatures plus a ``_triton`` suffix:

    pypaper::int8_dynamic_linear_triton, pypaper::int8_dynamic_linear_int32_triton,
    pypaper::int8_weight_only_linear_triton, pypaper::int4_weight_only_linear_triton

Formulas and layouts: kernels/common/qlinear_math.h (reference pypaper/quant/qlinear_reference.py).
  * activations: one program per row computes sa = max(max|x| / A, FLT_MIN) and the codes
    clamp(rint(x / sa), -A, A) (IEEE division, round half to even built from floor: exact, so
    the codes equal the reference's);
  * int8 GEMM: tiles of [BLOCK_M, BLOCK_N], int8 x int8 -> int32 tl.dot over k, the weights read
    straight from the packed panels; epilogue (float(acc) * sa) * sw + b with the second product
    in PTX mul.rn (no FMA contraction with the add), so it rounds like the reference;
  * weight-only: the weight tile is dequantized in registers ((q - z) * s per group) and
    multiplied in fp32 (input_precision "ieee": no TF32).
Block sizes come from :func:`blocks` (small pure function; the interpreter runs the same code).
"""
from __future__ import annotations

from typing import Optional

import torch

from .._triton import HAVE_TRITON, tl, triton, triton_available  # noqa: F401

FLT_MIN = float(torch.finfo(torch.float32).tiny)


def blocks(m: int, n: int, k: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K) of the GEMM tiles: tl.dot needs >= 16 on each side; small M
    (decoding) gets the smallest M tile, large problems 64 x 64 x 64."""
    bm = 16 if m <= 16 else (32 if m <= 64 else 64)
    bn = 32 if n <= 32 else 64
    bk = 32 if k <= 32 else 64
    return bm, bn, bk



if HAVE_TRITON:
    from .._triton import wrap_triton  # torch.library's; an interpreted kernel as it is

    from .._triton import triton_op  # torch.library's, plus its torch.func kernel

    from .._triton import _USE_RN, _launches, _mul, _rint

    @triton.jit
    def _act_quant_kernel(x_ptr, ldx, q_ptr, s_ptr, K, Kp, A, BLOCK_K: tl.constexpr):
        row = tl.program_id(0)
        amax = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + row * ldx + offs, mask=offs < K, other=0.0)
            amax = tl.maximum(amax, tl.abs(x))
        s = tl.math.div_rn(tl.max(amax, axis=0), A.to(tl.float32))
        s = tl.where(s > 1.1754943508222875e-38, s, 1.1754943508222875e-38)
        tl.store(s_ptr + row, s)
        a = A.to(tl.float32)
        for k0 in range(0, Kp, BLOCK_K):
            offs = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + row * ldx + offs, mask=offs < K, other=0.0)
            q = tl.minimum(tl.maximum(_rint(tl.math.div_rn(x, s), False), -a), a)  # IEEE x / s
            tl.store(q_ptr + row * Kp + offs, q.to(tl.int32).to(tl.int8), mask=offs < Kp)

    @triton.jit
    def _int8_gemm_kernel(q_ptr, w_ptr, sa_ptr, sw_ptr, b_ptr, out_ptr, M, N, Kp,
                          HAS_BIAS: tl.constexpr, OUT_INT32: tl.constexpr, USE_RN: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pm = tl.program_id(0)
        pn = tl.program_id(1)
        rm = pm * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pn * BLOCK_N + tl.arange(0, BLOCK_N)
        K4 = Kp // 4
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
        for k0 in range(0, Kp, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(q_ptr + rm[:, None] * Kp + rk[None, :],
                        mask=(rm[:, None] < M) & (rk[None, :] < Kp), other=0)
            # packed panels: byte of (n, k) = ((n // 16) * K4 + k // 4) * 64 + (n % 16) * 4 + k % 4
            woff = ((rn[None, :] // 16) * K4 + rk[:, None] // 4) * 64 + (rn[None, :] % 16) * 4 + rk[:, None] % 4
            b = tl.load(w_ptr + woff, mask=(rn[None, :] < N) & (rk[:, None] < Kp), other=0)
            acc += tl.dot(a, b, out_dtype=tl.int32)
        omask = (rm[:, None] < M) & (rn[None, :] < N)
        if OUT_INT32:
            tl.store(out_ptr + rm[:, None] * N + rn[None, :], acc, mask=omask)
        else:
            sa = tl.load(sa_ptr + rm, mask=rm < M, other=0.0)
            sw = tl.load(sw_ptr + rn, mask=rn < N, other=0.0)
            y = _mul(acc.to(tl.float32) * sa[:, None], sw[None, :], USE_RN)
            if HAS_BIAS:
                y = y + tl.load(b_ptr + rn, mask=rn < N, other=0.0)[None, :]
            else:
                y = y + 0.0
            tl.store(out_ptr + rm[:, None] * N + rn[None, :], y, mask=omask)

    @triton.jit
    def _wo_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, G, groups,
                   INT4: tl.constexpr, HAS_BIAS: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pm = tl.program_id(0)
        pn = tl.program_id(1)
        rm = pm * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pn * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            kmask = rk < K
            x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=(rm[:, None] < M) & kmask[None, :],
                        other=0.0)
            wmask = (rn[None, :] < N) & kmask[:, None]
            g = rk[:, None] // G
            s = tl.load(s_ptr + rn[None, :] * groups + g, mask=wmask, other=0.0)
            if INT4:
                # row n holds K / 2 bytes; k's byte (k // 32) * 16 + k % 16, high nibble if k % 32 >= 16
                byte = tl.load(w_ptr + rn[None, :] * (K // 2) + (rk[:, None] // 32) * 16 + rk[:, None] % 16,
                               mask=wmask, other=0).to(tl.int32)
                q = (byte >> (4 * ((rk[:, None] % 32) // 16))) & 15
                z = tl.load(z_ptr + rn[None, :] * groups + g, mask=wmask, other=0.0)
                w = (q.to(tl.float32) - z) * s
            else:
                q = tl.load(w_ptr + rn[None, :] * K + rk[:, None], mask=wmask, other=0)
                w = q.to(tl.float32) * s
            acc += tl.dot(x, w, input_precision="ieee")
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0)[None, :]
        tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


    # The epilogue rounds each product like the reference: PTX mul.rn on NVIDIA GPUs (no FMA
    # contraction with the bias add); plain ops under the interpreter and on ROCm.

    def _check(x: torch.Tensor, name: str) -> None:
        ok, why = triton_available(x.device)
        if not ok:
            raise RuntimeError(f"{name}: {why}")
        if x.dtype != torch.float32 or x.dim() != 2:
            raise TypeError(f"{name}: x must be a 2-D float32 tensor, got {x.dtype} {tuple(x.shape)}")

    def _quantize_rows(x: torch.Tensor, act_qmax: int):
        M, K = x.shape
        Kp = (K + 3) // 4 * 4
        q = torch.empty((M, Kp), dtype=torch.int8, device=x.device)
        sa = torch.empty((M,), dtype=torch.float32, device=x.device)
        if M and _launches(x):
            wrap_triton(_act_quant_kernel)[(M,)](x, x.stride(0), q, sa, K, Kp, act_qmax,
                                                 BLOCK_K=128)
        return q, sa, Kp

    def _gemm(x, w_packed, sw, bias, n, act_qmax, out_int32):
        if act_qmax not in (127, 63):
            raise ValueError(f"act_qmax must be 127 or 63, got {act_qmax}")
        if x.shape[1] > 0 and x.stride(1) != 1:
            x = x.contiguous()
        M = x.shape[0]
        q, sa, Kp = _quantize_rows(x, act_qmax)
        if tuple(w_packed.shape) != ((n + 15) // 16, Kp // 4, 16, 4):
            raise ValueError(f"w_packed {tuple(w_packed.shape)} does not hold N={n} x K={x.shape[1]}")
        out = torch.empty((M, n), dtype=torch.int32 if out_int32 else torch.float32, device=x.device)
        if M and n and _launches(x):
            bm, bn, bk = blocks(M, n, Kp)
            grid = (triton.cdiv(M, bm), triton.cdiv(n, bn))
            wrap_triton(_int8_gemm_kernel)[grid](
                q, w_packed, sa, sw if sw is not None else sa, bias if bias is not None else sa,
                out, M, n, Kp, HAS_BIAS=bias is not None, OUT_INT32=out_int32, BLOCK_M=bm,
                BLOCK_N=bn, BLOCK_K=bk, USE_RN=_USE_RN)
        return out, sa

    @triton_op("pypaper::int8_dynamic_linear_triton", mutates_args=())
    def int8_dynamic_linear_triton(x: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor,
                                   w_colsum: torch.Tensor, bias: Optional[torch.Tensor],
                                   act_qmax: int) -> torch.Tensor:
        """y = (float(qa @ qw^T) * sa) * w_scale + bias (kernels/common/qlinear_math.h)."""
        _check(x, "int8_dynamic_linear_triton")
        return _gemm(x, w_packed, w_scale, bias, w_scale.shape[0], act_qmax, False)[0]

    @triton_op("pypaper::int8_dynamic_linear_int32_triton", mutates_args=())
    def int8_dynamic_linear_int32_triton(x: torch.Tensor, w_packed: torch.Tensor,
                                         w_colsum: torch.Tensor, out_features: int,
                                         act_qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(int32 qa @ qw^T, sa)."""
        _check(x, "int8_dynamic_linear_int32_triton")
        return _gemm(x, w_packed, None, None, out_features, act_qmax, True)

    def _weight_only(x, w, scale, zero, bias, int4: bool):
        M, K = x.shape
        N = w.shape[0]
        groups = scale.shape[1]
        if K % groups or (int4 and (K // groups) % 32):
            raise ValueError(f"scale's {groups} groups do not fit in_features={K}")
        x = x.contiguous()
        y = torch.empty((M, N), dtype=torch.float32, device=x.device)
        if M and N and _launches(x):
            bm, bn, bk = blocks(M, N, K)
            grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
            wrap_triton(_wo_kernel)[grid](
                x, w.contiguous(), scale.contiguous(), zero.contiguous() if zero is not None else scale,
                bias if bias is not None else scale, y, M, N, K, K // groups, groups, INT4=int4,
                HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
        return y

    @triton_op("pypaper::int8_weight_only_linear_triton", mutates_args=())
    def int8_weight_only_linear_triton(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor,
                                       bias: Optional[torch.Tensor]) -> torch.Tensor:
        """y = x @ (w * scale)^T + bias."""
        _check(x, "int8_weight_only_linear_triton")
        return _weight_only(x, w, scale, None, bias, False)

    @triton_op("pypaper::int4_weight_only_linear_triton", mutates_args=())
    def int4_weight_only_linear_triton(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor,
                                       zero: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """y = x @ ((q - zero) * scale)^T + bias."""
        _check(x, "int4_weight_only_linear_triton")
        return _weight_only(x, w, scale, zero, bias, True)
