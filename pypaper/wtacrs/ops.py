"""Typed wrappers of the WTA-CRS ops, with backend selection (pypaper/_backend.py).

Liu et al., "Winner-Take-All Column Row Sampling for Memory Efficient Adaptation of Language
Model" (NeurIPS 2023); the estimator and its math are in reference.py and
kernels/common/wtacrs_math.h.

    row_norms(x) -> norms                                 ||x_t||_2 per row
    select(scores, k, wta, seed) -> (indices, scales)     winner-take-all set + draws
    gather_scale(x, indices, scales=None, dtype=None)     scales[j] * x[indices[j]]
    sample(x, grad_norm, k, wta, seed, dtype=None) -> (x_kept, indices)
    sampled_grad_weight(grad_y, indices, x_kept)          sum_j grad_y[idx_j] x_kept_j^T
    linear(x, weight, bias, x_kept, indices) -> y         exact y; grad_W from the kept rows

Defaults: the C++ kernels on CPU; CUDA kernels, then Triton, on GPUs; the plain-PyTorch
reference anywhere. ``seed`` is an int64 tensor of one element (or a Python int).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from .. import _backend
from . import reference

_DEFAULT_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}
_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _load_triton():
    from . import _registration

    return _registration.load_triton()


_REASONS = _backend.standard_reasons(_load_triton)


def backend_for(x: torch.Tensor) -> str:
    """The backend the WTA-CRS ops would use for x now."""
    return _backend.select(x.device, _DEFAULT_ORDER.get(x.device.type, ("reference",)), _REASONS)


def _op(name: str, backend: str):
    return getattr(torch.ops.pypaper, name + "_triton" if backend == "triton" else name)


def _check_tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _check_rows(x, name: str = "x") -> None:
    _check_tensor(x, name)
    if x.dtype not in _FLOATS:
        raise TypeError(f"{name} must be float32, float64, float16 or bfloat16, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be a 2-D [rows, features] tensor, got shape "
                         f"{tuple(x.shape)}")


def seed_tensor(seed, device) -> torch.Tensor:
    """seed as an int64 tensor of one element on ``device``."""
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or seed.numel() != 1:
            raise ValueError(f"seed must be an int64 tensor of one element, got {seed.dtype} "
                             f"with {seed.numel()} elements")
        return seed.reshape(1).to(device)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or an int64 tensor, got {type(seed).__name__}")
    return torch.tensor([seed], dtype=torch.int64, device=device)


def _check_k(k, n: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, torch.SymInt)):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not (0 <= k <= n and (k >= 1 or n == 0)):
        raise ValueError(f"k must be in [1, N] = [1, {n}] (N: rows to sample from), got {k}")
    return k


def row_norms(x: torch.Tensor) -> torch.Tensor:
    """||x_t||_2 of every row of the 2-D ``x`` (fp32 math; fp64 for fp64): the activation half
    of WTA-CRS's sampling probabilities p_t ~ ||x_t|| ||dy_t||."""
    _check_rows(x)
    b = backend_for(x)
    if b == "reference":
        return reference.row_norms(x)
    return _op("wtacrs_row_norms", b)(x)


def select(scores: torch.Tensor, k: int, wta: bool, seed) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows WTA-CRS keeps out of N = scores.numel(), and their weights.

    Weights w_t = s_t + 1e-3 mean(s) (uniform when sum(s) is 0 or not finite). With ``wta``:
    the winner-take-all set C = the |C| largest weights (scale 1), |C| the first minimiser of
    (W - W_C) / (k - |C|) over [0, k); then k - |C| draws with replacement from the other rows
    with probability w_i / R (R = W - W_C), scale R / ((k - |C|) w_i), so that
    sum_j scale_j dy_{i_j} x_{i_j}^T is an unbiased estimate of dY^T X. Without ``wta``: plain
    CRS, k draws. k >= N keeps every row with scale 1.

    Returns (indices [k] int64, scales [k] in scores' dtype).
    """
    _check_tensor(scores, "scores")
    if scores.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"scores must be float32 or float64, got {scores.dtype}")
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D (one score per row), got shape "
                         f"{tuple(scores.shape)}")
    k = _check_k(k, scores.numel())
    b = backend_for(scores)
    if b == "reference":
        return reference.select(scores, k, bool(wta), int(seed_tensor(seed, "cpu")))
    return _op("wtacrs_select", b)(scores, k, bool(wta), seed_tensor(seed, scores.device))


def gather_scale(x: torch.Tensor, indices: torch.Tensor, scales: Optional[torch.Tensor] = None,
                 dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """out[j] = scales[j] * x[indices[j]]: the compact buffer of kept rows (math in x's math
    type, one rounding to ``dtype``: x's dtype by default, bf16/fp16 to halve it again)."""
    _check_rows(x)
    _check_tensor(indices, "indices")
    b = backend_for(x)
    if b == "reference":
        if indices.dtype != torch.int64:
            raise TypeError(f"indices must be int64, got {indices.dtype}")
        return reference.gather_scale(x, indices, scales, dtype)
    return _op("wtacrs_gather_scale", b)(x, indices, scales, dtype)


def sample(x: torch.Tensor, grad_norm: Optional[torch.Tensor], k: int, wta: bool, seed,
           dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_kept [k, d], indices [k]): the rows of the 2-D ``x`` that a WTA-CRS linear layer keeps
    for its backward, each multiplied by its estimator weight. Scores ||x_t|| * grad_norm[t]
    (``grad_norm``: last step's ||dy_t|| of the same samples, or None)."""
    _check_rows(x)
    k = _check_k(k, x.shape[0])
    b = backend_for(x)
    if b == "reference":
        return reference.sample(x, grad_norm, k, bool(wta), int(seed_tensor(seed, "cpu")), dtype)
    return _op("wtacrs_sample", b)(x, grad_norm, k, bool(wta), seed_tensor(seed, x.device), dtype)


def sampled_grad_weight(grad_y: torch.Tensor, indices: torch.Tensor,
                        x_kept: torch.Tensor) -> torch.Tensor:
    """grad_W ~= sum_j grad_y[indices[j]] x_kept[j]^T: the GEMM over the k kept rows, reading
    grad_y's rows by index. [d_out, d_in] in grad_y's dtype."""
    _check_rows(grad_y, "grad_y")
    _check_rows(x_kept, "x_kept")
    b = backend_for(grad_y)
    if b == "reference":
        return reference.sampled_grad_weight(grad_y, indices, x_kept)
    return _op("wtacrs_sampled_grad_weight", b)(grad_y, indices, x_kept)


def _autocast_linear_inputs(x, weight, bias):
    """torch.autocast's policy for linear (lower_precision_fp): every floating tensor but fp64
    is cast to the autocast dtype of x's device, by differentiable casts (the gradients reach
    fp32 parameters in fp32, as nn.Linear's do). Returns (x, weight, bias, autocast dtype or
    None)."""
    if not isinstance(x, torch.Tensor):
        return x, weight, bias, None
    dev = x.device.type
    if not torch.is_autocast_enabled(dev):
        return x, weight, bias, None
    low = torch.get_autocast_dtype(dev)

    def cast(t):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64:
            return t.to(low)
        return t

    return cast(x), cast(weight), cast(bias), low


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
           x_kept: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """y = x W^T + b exactly, for the 2-D x. Autograd keeps only (x_kept, indices) of ``sample``
    instead of x: grad_x = dY W and grad_b = sum_t dy_t are exact, grad_W is the WTA-CRS
    estimate dY[indices]^T x_kept.

    Under torch.autocast, x, W and b are cast as autocast casts nn.Linear's and the op runs with
    autocast off. Left to the dispatcher, the op (which has no autocast kernel) computed in the
    autocast dtype in eager mode only through the at::linear it calls inside, while its fake
    kernel, and so torch.compile, computed in fp32: compiled and eager models differed.
    x_kept is not cast: the backward reads it in dY's dtype."""
    _check_rows(x)
    x, weight, bias, low = _autocast_linear_inputs(x, weight, bias)
    b = backend_for(x)
    ctx = torch.autocast(x.device.type, enabled=False) if low is not None \
        else contextlib.nullcontext()
    with ctx:
        if b == "reference":
            return reference.linear(x, weight, bias, x_kept, indices)
        return _op("wtacrs_linear", b)(x, weight, bias, x_kept, indices)
