"""Memory layouts for elementwise kernels: run on a tensor's memory as it lies.

A kernel that walks its input as one flat contiguous array (the LIF time loop: each neuron's
steps are computed alone, so the result does not depend on where a neuron lies in memory) needs
a contiguous input. A tensor that is a permutation of a contiguous one (channels_last
[N, C, H, W]; a channels_last convolution's [T*N, C, H, W] output viewed as [T, N, C, H, W]) is
contiguous once its dims are put in its storage order: x.permute(order) is a view of the same
memory, the kernel runs on it, and the outputs, permuted back with inverse(order), have x's
strides, as torch's own elementwise ops give them (an ``empty_like`` of a dense tensor keeps its
strides). Copying such an input to the standard layout instead costs a pass over it and hands
the next channels_last layer a tensor it copies back. Not for ops whose result must equal a
torch kernel's to the bit (the few-bit activations promise torch's call on the contiguous
input): torch's vectorized activations round some elements differently by their place in memory
(its tanh GELU on a transposed [27, 37] input, or its GELU on a channels_last one, differs from
the contiguous call in the last bit).
"""
from __future__ import annotations

from typing import Optional

import torch


def storage_order(x: torch.Tensor, fixed: int = 0) -> Optional[list]:
    """The order of x's dims in which its memory is contiguous, dims [0, fixed) staying first
    in place (the LIF's time dim must stay outermost), when x is not contiguous but is a
    permutation of a contiguous tensor. None otherwise (gaps, overlaps, broadcast dims, or the
    fixed dims not outermost: the caller copies, as before)."""
    if x.dim() - fixed < 2:
        return None
    strides, sizes = x.stride(), x.shape
    # The dims of more than one element by decreasing stride; those of one element (their
    # strides mean nothing) keep their places. An insertion sort of explicit comparisons: under
    # torch.compile with dynamic shapes the strides are symbolic, which sorted() cannot trace
    # (each comparison becomes a guard).
    moving: list = []
    for d in range(fixed, x.dim()):
        if sizes[d] != 1:
            at = len(moving)
            while at > 0 and strides[moving[at - 1]] < strides[d]:
                at -= 1
            moving.insert(at, d)
    ordered = iter(moving)
    order = list(range(fixed)) + [d if sizes[d] == 1 else next(ordered)
                                  for d in range(fixed, x.dim())]
    if order == list(range(x.dim())) or not x.permute(order).is_contiguous():
        return None
    return order


def inverse(order: list) -> list:
    """The permutation that undoes x.permute(order)."""
    return sorted(range(len(order)), key=order.__getitem__)
