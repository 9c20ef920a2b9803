"""The energy of a modern continuous Hopfield network (Ramsauer et al., ICLR 2021, eq. (2)):

    E(xi) = -lse(beta, X^T xi) + 1/2 xi^T xi + beta^-1 log N + 1/2 M^2,
    lse(beta, z) = beta^-1 log sum_i exp(beta z_i),   M = max_i ||x_i||,

for stored patterns x_1..x_N (the rows of ``stored``). The update xi <- X softmax(beta X^T xi)
is the CCCP step of this energy, so it never increases E (Theorem 1); the tests check that for
every step of the fused op.
"""
from __future__ import annotations

import math

import torch

from .._numbers import is_finite


def energy(state: torch.Tensor, stored: torch.Tensor, beta) -> torch.Tensor:
    """E(xi) for every state row.

    Args:
        state: [..., L, d] (or [d]) state patterns xi.
        stored: [..., N, d] stored patterns X (rows), broadcast against state's leading dims.
        beta: inverse temperature, > 0 (a number).

    Returns the energies, shape state.shape[:-1] (a scalar for a single state vector).
    """
    if not isinstance(state, torch.Tensor) or not isinstance(stored, torch.Tensor):
        raise TypeError("state and stored must be tensors")
    if state.shape[-1] != stored.shape[-1]:
        raise ValueError(f"state has pattern size {state.shape[-1]} but stored has "
                         f"{stored.shape[-1]}")
    if stored.dim() < 2 or stored.shape[-2] == 0:
        raise ValueError(f"stored must have shape [..., N, d] with N >= 1, got "
                         f"{tuple(stored.shape)}")
    beta = float(beta)
    # is_finite checks by comparisons: under torch.compile(dynamic=True) beta arrives as a
    # symbolic float, which math.isfinite cannot trace but a comparison can
    if not (is_finite(beta) and beta > 0):
        raise ValueError(f"beta must be positive and finite, got {beta}")
    single = state.dim() == 1
    xi = state.unsqueeze(0) if single else state
    n = stored.shape[-2]
    scores = torch.matmul(xi, stored.transpose(-1, -2))  # [..., L, N]
    lse = torch.logsumexp(beta * scores, dim=-1) / beta
    big_m = stored.norm(dim=-1).amax(dim=-1, keepdim=True)  # [..., 1]
    e = -lse + 0.5 * (xi * xi).sum(-1) + math.log(n) / beta + 0.5 * big_m * big_m
    return e.squeeze(0) if single else e
