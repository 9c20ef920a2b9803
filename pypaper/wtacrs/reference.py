"""Plain-PyTorch reference of WTA-CRS: the semantics every kernel reproduces.

Liu et al., "Winner-Take-All Column Row Sampling for Memory Efficient Adaptation of Language
Model" (NeurIPS 2023). For a linear layer y = x W^T + b over N rows (all leading dims flattened),

    grad_W = dY^T X = sum_t dy_t x_t^T
           ~= sum_{c in C} dy_c x_c^T + (1 - P_C)/(k - |C|) sum_{j=1..k-|C|} dy_{i_j} x_{i_j}^T / p_{i_j}

with p_t proportional to ||x_t|| * ||dy_t||, C the winner-take-all set (the |C| most probable
rows, |C| minimising (1 - P_C)/(k - |C|)), and the k - |C| draws taken with replacement from the
rows outside C with probability p_i / (1 - P_C). Each kept row is stored already multiplied by its
weight, so the backward is one GEMM over k rows: grad_W = dY[idx]^T X_kept.

Weights (kernels/common/wtacrs_math.h): w_t = s_t + 1e-3 * mean(s), s_t = ||x_t|| * g_t with g_t
the caller's gradient-norm estimate (last step's ||dy_t||) or 1; uniform when sum(s) is 0 or not
finite. The draws use the counter RNG of kernels/common/hash_rng.h: draw d reads the 24-bit
uniforms at counters 2d+1 and 2d+2 as u = a + b 2^-24 and picks the smallest t with cdf[t] > u R.
Sums over rows are sequential (cumsum), as in the C++ loops, so both choose the same rows.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ..quant.reference import _M32, _key, _pcg_hash

DEFENSIVE = 1e-3
_MAX_FINITE = 1.79e308


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def budget(n: int, keep_ratio: float, min_k: int) -> int:
    """k = min(N, max(ceil(keep_ratio * N), min_k)): the rows kept out of N."""
    return min(n, max(math.ceil(keep_ratio * n), min_k))


def row_norms(x: torch.Tensor) -> torch.Tensor:
    """||x_t||_2 of every row of the 2-D x, in x's math type."""
    return torch.linalg.vector_norm(x.to(math_dtype(x.dtype)), dim=1)


def uniform53(seed: int, draws: torch.Tensor) -> torch.Tensor:
    """The float64 uniforms in [0, 1) of draw numbers ``draws`` (int64)."""
    a_key, b_key = _key(int(seed))

    def u24(idx):
        lo, hi = idx & _M32, idx >> 32
        h = _pcg_hash(_pcg_hash(lo ^ a_key) ^ ((hi + b_key) & _M32))
        return (h >> 8).to(torch.float64) * (1.0 / 16777216.0)

    return u24(2 * draws + 1) + u24(2 * draws + 2) * (1.0 / 16777216.0)


def _seq_sum(v: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(v, 0)[-1]


def weights(scores: torch.Tensor) -> torch.Tensor:
    """w_t = s_t + DEFENSIVE * mean(s) in float64 (NaN, negative and inf scores count as 0);
    all ones when sum(s) is 0 or not finite."""
    s = scores.to(torch.float64)
    clean = torch.where((s > 0) & (s <= _MAX_FINITE), s, torch.zeros_like(s))
    total = float(_seq_sum(clean))
    if not (0.0 < total <= _MAX_FINITE):
        return torch.ones_like(s)
    return clean + DEFENSIVE * (total / s.numel())


def wta_size(w_sorted_top: torch.Tensor, total: float, k: int) -> int:
    """c* = the first c in [0, k) minimising (W - sum of the c largest weights) / (k - c)."""
    prefix = torch.cat([w_sorted_top.new_zeros(1), torch.cumsum(w_sorted_top[: k - 1], 0)])
    c = torch.arange(k, dtype=torch.float64, device=w_sorted_top.device)
    return int(torch.argmin((total - prefix) / (k - c)))


def select(scores: torch.Tensor, k: int, wta: bool, seed) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices [k] int64, scales [k] in scores' dtype): the winner-take-all set, largest weight
    first (ties: lower index), with scale 1, then the draws in draw order with scale
    R / ((k - |C|) w_i). k >= N keeps every row with scale 1 (the exact gradient)."""
    n = scores.numel()
    dev = scores.device
    if k >= n:
        return torch.arange(n, device=dev), torch.ones(n, dtype=scores.dtype, device=dev)
    seed = int(seed)
    w = weights(scores)
    total = float(_seq_sum(w))
    if wta:
        order = torch.sort(w, descending=True, stable=True).indices
        c = wta_size(w[order[:k]], total, k)
        winners = order[:c]
    else:
        c, winners = 0, torch.zeros(0, dtype=torch.long, device=dev)
    masked = w.clone()
    masked[winners] = 0.0
    cdf = torch.cumsum(masked, 0)
    residual = float(cdf[-1])
    u = uniform53(seed, torch.arange(k - c, dtype=torch.int64, device=dev))
    picks = torch.searchsorted(cdf, u * residual, right=True).clamp_max(n - 1)
    draw_scales = residual / ((k - c) * w[picks])
    idx = torch.cat([winners, picks])
    scales = torch.cat([torch.ones(c, dtype=torch.float64, device=dev), draw_scales])
    return idx, scales.to(scores.dtype)


def gather_scale(x: torch.Tensor, indices: torch.Tensor, scales: Optional[torch.Tensor] = None,
                 dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """out[j] = scales[j] * x[indices[j]] in x's math type, rounded once to ``dtype``."""
    rows = x.to(math_dtype(x.dtype))[indices]
    if scales is not None:
        rows = rows * scales.to(rows.dtype)[:, None]
    return rows.to(dtype or x.dtype)


def sample(x: torch.Tensor, grad_norm: Optional[torch.Tensor], k: int, wta: bool, seed,
           dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_kept, indices) of the rows of the 2-D x: scores ||x_t|| * grad_norm[t]."""
    scores = row_norms(x)
    if grad_norm is not None:
        scores = scores * grad_norm.to(scores.dtype)
    idx, scales = select(scores, k, wta, seed)
    return gather_scale(x, idx, scales, dtype), idx


def sampled_grad_weight(grad_y: torch.Tensor, indices: torch.Tensor,
                        x_kept: torch.Tensor) -> torch.Tensor:
    """sum_j grad_y[indices[j]] x_kept[j]^T, [d_out, d_in] in grad_y's dtype."""
    return grad_y[indices].t() @ x_kept.to(grad_y.dtype)


def linear_backward(grad_y, weight, x_kept, indices, need_input, need_weight, need_bias):
    empty = grad_y.new_empty(0)
    gx = grad_y @ weight.to(grad_y.dtype) if need_input else empty
    gw = sampled_grad_weight(grad_y, indices, x_kept).to(weight.dtype) if need_weight else empty
    gb = grad_y.sum(0).to(weight.dtype) if need_bias else empty
    return gx, gw, gb


class _Linear(torch.autograd.Function):
    """y = F.linear(x, W, b); the backward of linear_backward (the reference backend).
    (setup_context and generate_vmap_rule: the form torch.func transforms accept.)"""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, x_kept, indices):
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, x_kept, indices = inputs
        ctx.save_for_backward(weight, x_kept, indices)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, gy):
        weight, x_kept, indices = ctx.saved_tensors
        need = ctx.needs_input_grad
        gx, gw, gb = linear_backward(gy.contiguous(), weight, x_kept, indices, need[0], need[1],
                                     ctx.has_bias and need[2])
        return (gx if need[0] else None, gw if need[1] else None,
                gb if ctx.has_bias and need[2] else None, None, None)


def linear(x, weight, bias, x_kept, indices):
    """y = x W^T + b; grad_W from the kept rows (reference backend)."""
    return _Linear.apply(x, weight, bias, x_kept, indices)


# ---- the estimator on its own (tests, benchmarks) ---------------------------------------------


def estimate_grad_weight(x: torch.Tensor, dy: torch.Tensor, k: int, wta: bool, seed,
                         use_dy: bool = True) -> torch.Tensor:
    """One sample of the estimator of dY^T X with the paper's oracle probabilities
    p_t ~ ||x_t|| ||dy_t|| (``use_dy``) or ||x_t|| alone, in plain PyTorch."""
    scores = row_norms(x)
    if use_dy:
        scores = scores * row_norms(dy)
    idx, scales = select(scores, k, wta, seed)
    return dy[idx].t() @ (x[idx] * scales.to(x.dtype)[:, None])
