"""Plain-PyTorch reference of the learnable-delay linear layer: the dense convolution.

Hammouamri, Khalfaoui-Hassani, Masquelier, "Learning Delays in Spiking Neural Networks using
Dilated Convolutions with Learnable Spacings", ICLR 2024. As in their DCLS-based code, the delays
are a causal 1-D convolution over time whose [C_out, C_in, K] kernel holds, for every synapse, its
weight spread over the K = max_delay taps by a normalised Gaussian around its learnable position:

    k[o, i, d] = w[o, i] * g_{o,i}(d),   g(d) = softmax_d(-(d - p)^2 / (2 sigma^2))
    y[t, n, o] = b[o] + sum_{i, d} k[o, i, d] x[t - d, n, i]          (x[t < 0] = 0)

with p = clamp(position, 0, K - 1). ``truncate=True`` restricts the softmax to the window the
kernels use (kernels/common/delay_math.h): the 2R taps [floor(p) - R + 1, floor(p) + R], R =
ceil(3 sigma), clipped to [0, K - 1]. sigma == 0 is the rounded case: a one-hot tap at round(p).
The window is piecewise constant in p, so autograd through this function gives the gradients the
kernels compute. The whole kernel is materialised and convolved: O(K) work per synapse and step,
which is what pypaper's gather kernel avoids.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F


def tap_weights(position: torch.Tensor, sigma: float, max_delay: int,
                truncate: bool = True) -> torch.Tensor:
    """g[o, i, d], d = 0..max_delay-1: the normalised (truncated) Gaussian tap weights."""
    K = int(max_delay)
    p = position.clamp(0, K - 1)
    d = torch.arange(K, dtype=position.dtype, device=position.device)
    if sigma == 0:
        idx = torch.round(p.detach()).long()
        return F.one_hot(idx, K).to(position.dtype)
    logits = -0.5 * ((d - p.unsqueeze(-1)) / sigma) ** 2
    if truncate:
        R = math.ceil(3 * sigma)
        f = torch.floor(p.detach()).unsqueeze(-1)
        inside = (d >= f - R + 1) & (d <= f + R)
        logits = logits.masked_fill(~inside, float("-inf"))
    return torch.softmax(logits, dim=-1)


def dense_kernel(weight: torch.Tensor, position: torch.Tensor, sigma: float, max_delay: int,
                 truncate: bool = True) -> torch.Tensor:
    """The dense delay kernel k[o, i, d] = w[o, i] g_{o,i}(d), shape [C_out, C_in, max_delay]."""
    return weight.unsqueeze(-1) * tap_weights(position, sigma, max_delay, truncate)


def delayed_linear(x: torch.Tensor, weight: torch.Tensor, position: torch.Tensor,
                   bias: Optional[torch.Tensor], max_delay: int, sigma: float,
                   truncate: bool = True) -> torch.Tensor:
    """y [T, N, C_out] from x [T, N, C_in]: causal conv1d over time with the dense kernel."""
    K = int(max_delay)
    k = dense_kernel(weight, position, sigma, K, truncate)
    if x.shape[0] == 0:  # no steps: conv1d refuses an input shorter than its kernel
        y = torch.einsum("tni,oik->tno", x, k)  # empty, with weight and position in the graph
        return y if bias is None else y + bias
    xs = x.permute(1, 2, 0)                      # [N, C_in, T]
    xs = F.pad(xs, (K - 1, 0))                   # causal: x[t < 0] = 0
    # conv1d correlates: out[t] = sum_j k'[j] xpad[t + j] = sum_j k'[j] x[t + j - (K-1)], so the
    # tap of delay d sits at j = K - 1 - d: flip the kernel in time.
    y = F.conv1d(xs, k.flip(-1), bias)           # [N, C_out, T]
    return y.permute(2, 0, 1).contiguous()
