"""Plain-PyTorch reference of the learnable-delay linear layer: the dense convolution.

Hammouamri, Khalfaoui-Hassani, Masquelier, "Learning Delays in Spiking Neural Networks using
Dilated Convolutions with Learnable Spacings", ICLR 2024. As in their DCLS-based code, the delays
are a causal 1-D convolution over time whose [C_out, C_in, K] kernel holds, for every synapse, its
weight spread over the K = max_delay taps by a normalised Gaussian around its learnable position:

    k[o, i, d] = w[o, i] * g_{o,i}(d),   g(d) = softmax_d(-(d - p)^2 / (2 sigma^2))
    y[t, n, o] = b[o] + sum_{i, d} k[o, i, d] x[t - d, n, i]          (x[t < 0] = 0)

with p = clamp(position, 0, K - 1). ``truncate=True`` restricts the softmax to the window the
kernels use (kernels/common/delay_math.h): the 2R taps [floor(p) - R + 1, floor(p) + R] within
[0, K - 1], R = ceil(3 sigma) at most K (``window_radius``). sigma == 0 is the rounded case: a
one-hot tap at round(p). As in the kernels, the logits are taken relative to the nearest
tap and sigma below ``SIGMA_FLOOR`` is evaluated at the floor (the limit sigma -> 0+, one-hot on
the nearest tap; delay_math.h sigma_floor says why), so no sigma >= 0 gives NaN. sigma is the
Gaussian's width: DCLS's 'gauss' kernel has width |SIG| + 0.27 for its parameter SIG.
The window is piecewise constant in p, so autograd through this function gives the gradients the
kernels compute. The whole kernel is materialised and convolved: O(K) work per synapse and step,
which is what pypaper's gather kernel avoids.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F


# kernels/common/delay_math.h sigma_floor: below it every tap but the nearest has g == 0 exactly.
SIGMA_FLOOR = {torch.float32: 1e-6, torch.float64: 1e-12}


def window_radius(sigma: float, max_delay: int) -> int:
    """R = ceil(3 sigma) in double (0 for sigma == 0), clamped to K = max_delay: floor(p) lies in
    [0, K - 1], so every R >= K keeps all K taps (and a huge sigma gives no huge integer)."""
    K = int(max_delay)
    if not sigma > 0:
        return 0
    r = 3.0 * float(sigma)
    return K if r >= K else math.ceil(r)


def floored_sigma(sigma: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A 0-dim sigma in float64, raised to ``SIGMA_FLOOR`` of dtype (as the number form's max)."""
    return torch.clamp(sigma.detach().to(torch.float64),
                       min=SIGMA_FLOOR.get(dtype, SIGMA_FLOOR[torch.float32]))


def _rounded_taps(p: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """One-hot at round(p) over the taps d (sigma == 0): a comparison, not F.one_hot, whose index
    check reads values (vmap refuses it). The taps do not move with p (their derivative is 0,
    as round's), but stay in p's graph: a gradient of zeros, as the C++ op gives, not None. p is
    clamped (finite or NaN): a NaN position gives NaN taps (0 * p), so the synapse's outputs are
    NaN as at sigma > 0, not silently zero."""
    hit = (d == torch.round(p.detach()).unsqueeze(-1)).to(p.dtype)
    return hit + 0.0 * p.unsqueeze(-1)


def clip_position(position: torch.Tensor, max_delay: int) -> torch.Tensor:
    """position clamped to [0, max_delay - 1], with gradient 1 on the closed range (the C++ op's
    position_inside, kernels/common/delay_math.h) and 0 outside. Not position.clamp alone: its
    gradient at the bounds is 1 up to torch 2.13 and 0 from 2.14 on (pytorch#191142), and
    clamp_positions_() puts every overshooting delay exactly on a bound, where it must be able
    to move back inward."""
    K = int(max_delay)
    inside = (position >= 0) & (position <= K - 1)
    return torch.where(inside, position, position.clamp(0, K - 1))


def tap_weights(position: torch.Tensor, sigma, max_delay: int,
                truncate: bool = True) -> torch.Tensor:
    """g[o, i, d], d = 0..max_delay-1: the normalised (truncated) Gaussian tap weights.

    sigma is a number or a 0-dim tensor (``sigma_tensor_tap_weights``: the same numbers, read
    by tensor ops only)."""
    K = int(max_delay)
    if isinstance(sigma, torch.Tensor):
        if not truncate:
            raise ValueError("truncate=False takes sigma as a number")
        return sigma_tensor_tap_weights(position, sigma, K)
    p = clip_position(position, K)
    d = torch.arange(K, dtype=position.dtype, device=position.device)
    if sigma == 0:
        return _rounded_taps(p, d)
    s = max(float(sigma), SIGMA_FLOOR.get(position.dtype, SIGMA_FLOOR[torch.float32]))
    u2 = (d - p.unsqueeze(-1)) ** 2
    if truncate:
        R = window_radius(sigma, K)
        f = torch.floor(p.detach()).unsqueeze(-1)
        inside = (d >= f - R + 1) & (d <= f + R)
        # relative to the nearest tap (exactly 0 there); softmax is shift-invariant, so the
        # detached shift changes no gradient
        near2 = u2.detach().masked_fill(~inside, float("inf")).amin(-1, keepdim=True)
        logits = (-0.5 / (s * s)) * (u2 - near2)
        logits = logits.masked_fill(~inside, float("-inf"))
    else:
        logits = (-0.5 / (s * s)) * (u2 - u2.detach().amin(-1, keepdim=True))
    return torch.softmax(logits, dim=-1)


def sigma_tensor_tap_weights(position: torch.Tensor, sigma: torch.Tensor,
                             max_delay: int) -> torch.Tensor:
    """``tap_weights(position, float(sigma), max_delay)`` without reading sigma's value in Python.

    No shape depends on sigma: every synapse gets all K taps, those outside its window weigh 0,
    and the rounded case (sigma == 0) is selected by ``torch.where``. So torch.compile traces one
    graph for every sigma of a schedule (the number form specialises on each value). R, the
    floor on sigma and -1 / (2 sigma^2) are computed in float64 from the 0-dim sigma, as the
    number form computes them in Python, and the coefficient meets position's dtype the way a
    Python number does: the same bits.
    """
    K = int(max_delay)
    sig = sigma.detach().to(torch.float64)
    # the number form's check (delays._check_sigma), without reading the value on the host
    torch._assert_async((sig >= 0) & (sig <= torch.finfo(torch.float64).max),
                        "sigma must be finite and >= 0 (0: integer delays)")
    p = clip_position(position, K)
    d = torch.arange(K, dtype=position.dtype, device=position.device)
    # R = min(ceil(3 sigma), K), at least 1 in the Gaussian branch (R = 0 is the rounded case,
    # taken by the where below; an empty window would put NaN into that branch's backward)
    R = torch.clamp(torch.ceil(3.0 * sig), min=1.0, max=float(K))
    s = floored_sigma(sig, position.dtype)
    coef = -0.5 / (s * s)
    u2 = (d - p.unsqueeze(-1)) ** 2
    f = torch.floor(p.detach()).unsqueeze(-1)
    inside = (d >= f - R.to(position.dtype) + 1) & (d <= f + R.to(position.dtype))
    near2 = u2.detach().masked_fill(~inside, float("inf")).amin(-1, keepdim=True)
    logits = (coef * (u2 - near2)).masked_fill(~inside, float("-inf"))
    gauss = torch.softmax(logits, dim=-1)
    return torch.where(sig.to(position.device) == 0, _rounded_taps(p, d), gauss)


def dense_kernel(weight: torch.Tensor, position: torch.Tensor, sigma, max_delay: int,
                 truncate: bool = True) -> torch.Tensor:
    """The dense delay kernel k[o, i, d] = w[o, i] g_{o,i}(d), shape [C_out, C_in, max_delay]."""
    return weight.unsqueeze(-1) * tap_weights(position, sigma, max_delay, truncate)


def delayed_linear(x: torch.Tensor, weight: torch.Tensor, position: torch.Tensor,
                   bias: Optional[torch.Tensor], max_delay: int, sigma,
                   truncate: bool = True) -> torch.Tensor:
    """y [T, N, C_out] from x [T, N, C_in]: causal conv1d over time with the dense kernel."""
    return causal_conv(x, dense_kernel(weight, position, sigma, int(max_delay), truncate), bias)


def causal_conv(x: torch.Tensor, k: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """y[t, n, o] = b[o] + sum_{i, d} k[o, i, d] x[t - d, n, i] (x[t < 0] = 0) for a dense
    kernel k [C_out, C_in, K]: conv1d over time."""
    K = k.shape[-1]
    if x.shape[0] == 0 or x.shape[2] == 0 or k.shape[0] == 0:
        # no steps (conv1d refuses an input shorter than its kernel), no input channels (its
        # output would have 0 channels) or no outputs (conv1d refuses an empty weight):
        # y = bias, weight and position stay in the graph
        y = torch.einsum("tni,oik->tno", x, k)
        return y if bias is None else y + bias
    xs = x.permute(1, 2, 0)                      # [N, C_in, T]
    xs = F.pad(xs, (K - 1, 0))                   # causal: x[t < 0] = 0
    # conv1d correlates: out[t] = sum_j k'[j] xpad[t + j] = sum_j k'[j] x[t + j - (K-1)], so the
    # tap of delay d sits at j = K - 1 - d: flip the kernel in time.
    y = F.conv1d(xs, k.flip(-1), bias)           # [N, C_out, T]
    return y.permute(2, 0, 1).contiguous()
