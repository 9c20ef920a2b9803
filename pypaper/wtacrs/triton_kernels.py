"""Triton twins of the WTA-CRS ops, as ``torch.library.triton_op`` ops.

    pypaper::wtacrs_row_norms_triton(x) -> norms
    pypaper::wtacrs_select_triton(scores, k, wta, seed) -> (indices, scales)
    pypaper::wtacrs_gather_scale_triton(x, indices, scales, dtype) -> x_kept
    pypaper::wtacrs_sample_triton(x, grad_norm, k, wta, seed, dtype) -> (x_kept, indices)
    pypaper::wtacrs_sampled_grad_weight_triton(grad_y, indices, x_kept) -> grad_W
    pypaper::wtacrs_linear_triton(x, weight, bias, x_kept, indices) -> y
    pypaper::wtacrs_linear_backward_triton(grad_y, weight, x_kept, indices, ni, nw, nb)

Same signatures and semantics as the C++ schemas (csrc/schemas.cpp); the math is reference.py /
kernels/common/wtacrs_math.h (Liu et al., NeurIPS 2023).

Kernels:
  row norms     - a program owns BLOCK_R rows and walks the features in BLOCK_D chunks,
                  summing squares in the math type.
  draws         - the selection's sort (winner-take-all set), prefix sums and argmin are torch
                  ops on the device (nothing returns to the host); one kernel then writes all k
                  outputs: slot j < |C| copies the j-th largest row (scale 1), slot j >= |C| is
                  draw d = j - |C|: the counter RNG of kernels/common/hash_rng.h at counters 2d + 1
                  and 2d + 2 (u = a + b 2^-24 in fp64), a vectorised binary search of u R in the
                  residual CDF, scale R / ((k - |C|) w_i).
  gather-scale  - [BLOCK_K rows, BLOCK_D features] tiles of scales[j] * x[indices[j]].
  grad_W        - a gather-GEMM: the [BLOCK_O, BLOCK_I] tile of sum_j grad_y[idx_j, o] x_kept[j, i]
                  accumulates tl.dot over BLOCK_J kept rows, reading grad_y's rows by index (no
                  gathered copy of grad_y). fp32 products use input_precision="ieee" (no TF32),
                  as torch's default matmul.
The forward GEMM and grad_input are torch's (cuBLAS): dense and already optimal.
"""
from typing import Optional

import torch
import torch.nn.functional as F

from . import reference

from .._triton import HAVE_TRITON, tl, triton, triton_available  # noqa: F401

__all__ = ["HAVE_TRITON", "triton_available", "gemm_blocks", "norm_blocks"]


# ---- launch heuristics (pure functions) ---------------------------------------------------------


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def norm_blocks(d: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_D) of the row-norm and gather kernels: a chunk of up to 1024 features
    (4 KiB of fp32 per row in flight), and 4096 elements per tile."""
    bd = max(16, min(1024, _pow2(d)))
    return max(1, 4096 // bd), bd


def gemm_blocks(d_out: int, d_in: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_O, BLOCK_I, BLOCK_J, num_warps) of the gather-GEMM: 64x64 output tiles of 16-bit
    inputs (128x64 is register-bound for fp32), 32 kept rows per step; smaller tiles for small
    layers so that the grid still has programs for every SM."""
    bo = 64 if d_out >= 64 else max(16, _pow2(d_out))
    bi = 64 if d_in >= 64 else max(16, _pow2(d_in))
    bj = 32
    return bo, bi, bj, 4


def _check_device(op: str, t: torch.Tensor) -> None:
    if t.device.type == "meta":
        return
    ok, why = triton_available(t.device)
    if not ok:
        raise RuntimeError(f"pypaper::{op}: {why} (got tensors on {t.device})")


_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _check_rows(x: torch.Tensor, name: str) -> None:
    if x.dtype not in _FLOATS:
        raise TypeError(f"{name} must be float32, float64, float16 or bfloat16, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be a 2-D [rows, features] tensor, got shape "
                         f"{tuple(x.shape)}")


def _check_k(k: int, n: int) -> None:
    if not (0 <= k <= n and (k >= 1 or n == 0)):
        raise ValueError(f"k must be in [1, N] = [1, {n}] (N: rows to sample from), got {k}")


def _check_seed(seed: torch.Tensor, like: torch.Tensor) -> None:
    if seed.dtype != torch.int64 or seed.numel() != 1:
        raise ValueError("seed must be an int64 tensor of one element")
    if seed.device != like.device:
        raise ValueError(f"seed must be on {like.device}, got {seed.device}")


def _kept_dtype(x: torch.Tensor, dtype) -> torch.dtype:
    out = dtype or x.dtype
    if x.dtype == torch.float64:
        if out != torch.float64:
            raise TypeError(f"dtype must be float64 for float64 x, got {out}")
    elif out not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"dtype must be float32, bfloat16 or float16 for {x.dtype} x, got {out}")
    return out


def _check_indices(indices: torch.Tensor, n: int) -> None:
    if indices.dtype != torch.int64:
        raise TypeError(f"indices must be int64, got {indices.dtype}")
    if indices.dim() != 1:
        raise ValueError(f"indices must be 1-D, got shape {tuple(indices.shape)}")


if triton is not None:
    from .._triton import wrap_triton  # torch.library's; an interpreted kernel as it is

    from .._triton import triton_op  # torch.library's, plus its torch.func kernel

    from .._triton import _bf16_bits, _bits, _launches, _load_as, _pcg, _store_as

    @triton.jit
    def _row_norms_kernel(x_ptr, out_ptr, n, d, ld, BF16_BITS: tl.constexpr,
                          BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = rows < n
        mt = out_ptr.dtype.element_ty
        acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=mt)
        for d0 in range(0, d, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            m = rmask[:, None] & (cols < d)[None, :]
            v = _load_as(x_ptr + rows[:, None] * ld + cols[None, :], m, mt, BF16_BITS)
            acc += v * v
        tl.store(out_ptr + rows, tl.sqrt(tl.sum(acc, axis=1)), mask=rmask)

    @triton.jit
    def _u24(key_a, key_b, e):
        """uniform01 of kernels/common/hash_rng.h at counters e (int64 < 2^32 here: k < 2^31)."""
        h = _pcg(_pcg(e.to(tl.uint32) ^ key_a) ^ key_b)
        return (h >> 8).to(tl.float64) * (1.0 / 16777216.0)

    @triton.jit
    def _draw_kernel(seed_ptr, order_ptr, c_ptr, cdf_ptr, w_ptr, idx_ptr, scale_ptr, n, k,
                     STEPS: tl.constexpr, BLOCK: tl.constexpr):
        j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        jm = j < k
        c = tl.load(c_ptr)
        sd = tl.load(seed_ptr).to(tl.uint64, bitcast=True)
        ka = _pcg(sd.to(tl.uint32))
        kb = _pcg((sd >> 32).to(tl.uint32) ^ _pcg(ka))  # kernels/common/hash_rng.h
        dnum = tl.maximum(j - c, 0)
        u = _u24(ka, kb, 2 * dnum + 1) + _u24(ka, kb, 2 * dnum + 2) * (1.0 / 16777216.0)
        residual = tl.load(cdf_ptr + n - 1)
        target = u * residual
        # smallest t with cdf[t] > target: STEPS = ceil(log2 n) halvings of [lo, hi]
        lo = tl.zeros([BLOCK], dtype=tl.int64)
        hi = tl.zeros([BLOCK], dtype=tl.int64) + (n - 1)
        for _ in tl.static_range(STEPS):
            mid = lo + (hi - lo) // 2
            go_left = tl.load(cdf_ptr + mid, mask=jm, other=0.0) > target
            active = lo < hi
            hi = tl.where(active & go_left, mid, hi)
            lo = tl.where(active & (~go_left), mid + 1, lo)
        w = tl.load(w_ptr + lo, mask=jm, other=1.0)
        draws = (k - c).to(tl.float64)
        scale = residual / (draws * w)
        winner = j < c
        top = tl.load(order_ptr + j, mask=jm & winner, other=0)
        tl.store(idx_ptr + j, tl.where(winner, top, lo), mask=jm)
        tl.store(scale_ptr + j, tl.where(winner, 1.0, scale).to(scale_ptr.dtype.element_ty),
                 mask=jm)

    @triton.jit
    def _gather_kernel(x_ptr, idx_ptr, scale_ptr, out_ptr, k, d, ld, HAS_SCALE: tl.constexpr,
                       MATH_F64: tl.constexpr, IN_BF16: tl.constexpr, OUT_BF16: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        j = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
        jm = j < k
        m = jm[:, None] & (cols < d)[None, :]
        row = tl.load(idx_ptr + j, mask=jm, other=0)
        mt = tl.float64 if MATH_F64 else tl.float32
        v = _load_as(x_ptr + row[:, None] * ld + cols[None, :], m, mt, IN_BF16)
        if HAS_SCALE:
            v = v * tl.load(scale_ptr + j, mask=jm, other=0.0).to(mt)[:, None]
        _store_as(out_ptr + j[:, None] * d + cols[None, :], v, m, OUT_BF16)

    @triton.jit
    def _grad_weight_kernel(gy_ptr, idx_ptr, xk_ptr, out_ptr, k, d_out, d_in, ld_gy,
                            F64: tl.constexpr, F32: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
                            BLOCK_J: tl.constexpr):
        o = tl.program_id(0).to(tl.int64) * BLOCK_O + tl.arange(0, BLOCK_O)
        i = tl.program_id(1).to(tl.int64) * BLOCK_I + tl.arange(0, BLOCK_I)
        om = o < d_out
        im = i < d_in
        acc = tl.zeros([BLOCK_O, BLOCK_I], dtype=tl.float64 if F64 else tl.float32)
        for j0 in range(0, k, BLOCK_J):
            j = j0 + tl.arange(0, BLOCK_J)
            jm = j < k
            rows = tl.load(idx_ptr + j, mask=jm, other=0)
            # a[o, j] = grad_y[rows[j], o]: the rows the estimator needs, read in place
            a = tl.load(gy_ptr + rows[None, :] * ld_gy + o[:, None],
                        mask=om[:, None] & jm[None, :], other=0.0)
            b = tl.load(xk_ptr + j[:, None] * d_in + i[None, :], mask=jm[:, None] & im[None, :],
                        other=0.0).to(a.dtype)
            if F64:
                acc += tl.sum(a[:, :, None] * b[None, :, :], axis=1)
            elif F32:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
        tl.store(out_ptr + o[:, None] * d_in + i[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=om[:, None] & im[None, :])


    # ---- ops -------------------------------------------------------------------------------------

    def _rows(x: torch.Tensor) -> torch.Tensor:
        return x if x.shape[1] <= 1 or x.stride(1) == 1 else x.contiguous()

    @triton_op("pypaper::wtacrs_row_norms_triton", mutates_args=())
    def wtacrs_row_norms_triton(x: torch.Tensor) -> torch.Tensor:
        """||x_t||_2 per row of the 2-D x, in x's math type."""
        _check_device("wtacrs_row_norms_triton", x)
        _check_rows(x, "x")
        x = _rows(x)
        n, d = x.shape
        out = torch.empty(n, dtype=reference.math_dtype(x.dtype), device=x.device)
        if n == 0 or not _launches(x):
            return out
        br, bd = norm_blocks(d)
        wrap_triton(_row_norms_kernel)[(triton.cdiv(n, br),)](
            _bits(x), out, n, d, x.stride(0), BF16_BITS=_bf16_bits(x.dtype), BLOCK_R=br,
            BLOCK_D=bd)
        return out

    @triton_op("pypaper::wtacrs_select_triton", mutates_args=())
    def wtacrs_select_triton(scores: torch.Tensor, k: int, wta: bool,
                             seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The winner-take-all set and the draws (see ops.select); no host synchronisation."""
        _check_device("wtacrs_select_triton", scores)
        if scores.dtype not in (torch.float32, torch.float64) or scores.dim() != 1:
            raise TypeError("scores must be a 1-D float32 or float64 tensor")
        n = scores.shape[0]
        _check_k(k, n)
        _check_seed(seed, scores)
        dev = scores.device
        idx = torch.empty(k, dtype=torch.int64, device=dev)
        scales = torch.empty(k, dtype=scores.dtype, device=dev)
        if k >= n:
            return torch.arange(n, device=dev), torch.ones(n, dtype=scores.dtype, device=dev)
        # weights (reference.weights without the host round trip)
        s = scores.to(torch.float64)
        clean = torch.where((s > 0) & (s <= 1.79e308), s, torch.zeros_like(s))
        total_s = torch.cumsum(clean, 0)[-1]
        ok = (total_s > 0) & (total_s <= 1.79e308)
        w = torch.where(ok, clean + reference.DEFENSIVE * (total_s / n), torch.ones_like(s))
        total = torch.cumsum(w, 0)[-1]
        if wta:
            order = torch.sort(w, descending=True, stable=True).indices[:k]
            top = w[order]
            prefix = torch.cat([top.new_zeros(1), torch.cumsum(top[: k - 1], 0)])
            cs = torch.arange(k, dtype=torch.float64, device=dev)
            c = torch.argmin((total - prefix) / (k - cs)).reshape(1)
            keep = torch.where(cs < c, torch.zeros_like(top), top)
            masked = w.scatter(0, order, keep)
        else:
            order = torch.zeros(1, dtype=torch.int64, device=dev)
            c = torch.zeros(1, dtype=torch.int64, device=dev)
            masked = w
        cdf = torch.cumsum(masked, 0)
        if not _launches(scores):
            return idx, scales
        block = 128
        wrap_triton(_draw_kernel)[(triton.cdiv(k, block),)](
            seed, order, c, cdf, w, idx, scales, n, k,
            STEPS=max(1, (n - 1).bit_length()), BLOCK=block)
        return idx, scales

    @triton_op("pypaper::wtacrs_gather_scale_triton", mutates_args=())
    def wtacrs_gather_scale_triton(x: torch.Tensor, indices: torch.Tensor,
                                   scales: Optional[torch.Tensor] = None,
                                   dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """out[j] = scales[j] * x[indices[j]] (math in x's math type, one rounding to dtype).
        Index bounds are not checked on the device (the C++ CPU op checks them)."""
        _check_device("wtacrs_gather_scale_triton", x)
        _check_rows(x, "x")
        _check_indices(indices, x.shape[0])
        out_dtype = _kept_dtype(x, dtype)
        x = _rows(x)
        k, d = indices.shape[0], x.shape[1]
        if scales is not None and (scales.dtype != reference.math_dtype(x.dtype)
                                   or scales.shape != indices.shape):
            raise TypeError(f"scales must be {reference.math_dtype(x.dtype)} with one value per "
                            f"index, got {scales.dtype} of shape {tuple(scales.shape)}")
        out = torch.empty(k, d, dtype=out_dtype, device=x.device)
        if k == 0 or d == 0 or not _launches(x):
            return out
        br, bd = norm_blocks(d)
        wrap_triton(_gather_kernel)[(triton.cdiv(k, br), triton.cdiv(d, bd))](
            _bits(x), indices.contiguous(), scales if scales is not None else indices,
            _bits(out), k, d, x.stride(0), HAS_SCALE=scales is not None,
            MATH_F64=x.dtype == torch.float64, IN_BF16=_bf16_bits(x.dtype),
            OUT_BF16=_bf16_bits(out_dtype), BLOCK_R=br, BLOCK_D=bd)
        return out

    @triton_op("pypaper::wtacrs_sample_triton", mutates_args=())
    def wtacrs_sample_triton(x: torch.Tensor, grad_norm: Optional[torch.Tensor], k: int,
                             wta: bool, seed: torch.Tensor,
                             dtype: Optional[torch.dtype] = None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_kept, indices): row norms, scores = norms * grad_norm, select, gather-scale."""
        _check_rows(x, "x")
        _check_k(k, x.shape[0])
        scores = wtacrs_row_norms_triton(x)
        if grad_norm is not None:
            if grad_norm.shape != (x.shape[0],):
                raise ValueError(f"grad_norm must be 1-D with one value per row of x "
                                 f"({x.shape[0]}), got shape {tuple(grad_norm.shape)}")
            scores = scores * grad_norm.to(scores.dtype)
        idx, scales = wtacrs_select_triton(scores, k, wta, seed)
        return wtacrs_gather_scale_triton(x, idx, scales, dtype), idx

    @triton_op("pypaper::wtacrs_sampled_grad_weight_triton", mutates_args=())
    def wtacrs_sampled_grad_weight_triton(grad_y: torch.Tensor, indices: torch.Tensor,
                                          x_kept: torch.Tensor) -> torch.Tensor:
        """sum_j grad_y[indices[j]] x_kept[j]^T, a gather-GEMM reading grad_y's rows by index."""
        _check_device("wtacrs_sampled_grad_weight_triton", grad_y)
        _check_rows(grad_y, "grad_y")
        _check_rows(x_kept, "x_kept")
        _check_indices(indices, grad_y.shape[0])
        if indices.shape[0] != x_kept.shape[0]:
            raise ValueError(f"indices must hold one index per row of x_kept "
                             f"({x_kept.shape[0]}), got {indices.shape[0]}")
        gy = _rows(grad_y)
        xk = x_kept.contiguous()
        d_out, d_in, k = gy.shape[1], xk.shape[1], xk.shape[0]
        out = torch.empty(d_out, d_in, dtype=gy.dtype, device=gy.device)
        if d_out == 0 or d_in == 0 or not _launches(gy):
            return out
        if k == 0:
            return out.zero_()
        bo, bi, bj, nw = gemm_blocks(d_out, d_in, gy.dtype)
        wrap_triton(_grad_weight_kernel)[(triton.cdiv(d_out, bo), triton.cdiv(d_in, bi))](
            gy, indices.contiguous(), xk, out, k, d_out, d_in, gy.stride(0),
            F64=gy.dtype == torch.float64, F32=gy.dtype == torch.float32, BLOCK_O=bo, BLOCK_I=bi, BLOCK_J=bj, num_warps=nw)
        return out

    @triton_op("pypaper::wtacrs_linear_triton", mutates_args=())
    def wtacrs_linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                             x_kept: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """y = x W^T + b (torch's GEMM); autograd keeps x_kept and indices."""
        _check_rows(x, "x")
        if x.shape[1] != weight.shape[1]:
            raise ValueError(f"x must have in_features = {weight.shape[1]} features, got shape "
                             f"{tuple(x.shape)}")
        return F.linear(x, weight, bias)

    @triton_op("pypaper::wtacrs_linear_backward_triton", mutates_args=())
    def wtacrs_linear_backward_triton(grad_y: torch.Tensor, weight: torch.Tensor,
                                      x_kept: torch.Tensor, indices: torch.Tensor,
                                      need_input: bool, need_weight: bool, need_bias: bool
                                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(grad_y W, the gather-GEMM estimate of grad_W, sum of grad_y); [0] when not needed."""
        empty = grad_y.new_empty(0)
        gx = grad_y @ weight.to(grad_y.dtype) if need_input else empty
        gw = (wtacrs_sampled_grad_weight_triton(grad_y, indices, x_kept).to(weight.dtype)
              if need_weight else empty)
        gb = grad_y.sum(0).to(weight.dtype) if need_bias else empty
        return gx, gw, gb

    __all__ += ["wtacrs_row_norms_triton", "wtacrs_select_triton", "wtacrs_gather_scale_triton",
                "wtacrs_sample_triton", "wtacrs_sampled_grad_weight_triton",
                "wtacrs_linear_triton", "wtacrs_linear_backward_triton"]
