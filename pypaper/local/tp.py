"""Target-projection networks (tpSGD, Lomnitz et al. 2022): hidden TargetProjectionLinear layers,
each trained toward its own fixed random projection of the label, and an output layer trained by
the fused local head (linear -> cross-entropy) on the last hidden activations - every layer
updated from a local signal, no backward pass across layers."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .blocks import LinearHead
from .layers import TargetProjectionLinear


class TPNetwork(nn.Module):
    def __init__(self, sizes: Sequence[int], num_classes: int, activation: str = "sigmoid",
                 sign: bool = False, seed: int = 0):
        super().__init__()
        self.num_classes = num_classes
        self.layers = nn.ModuleList(
            TargetProjectionLinear(a, b, num_classes, activation=activation, seed=seed + i,
                                   sign=sign)
            for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])))
        self.out = LinearHead(sizes[-1], num_classes)

    def train_step(self, x, y, optimizer):
        """Every layer's local step, the output head's local loss, then the optimizer."""
        h = x
        losses = []
        for layer in self.layers:
            loss, h = layer.local_step(h, y)
            losses.append(loss)
        loss, _ = self.out.loss(h.detach(), y)
        loss.backward()
        losses.append(loss.detach())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return torch.stack(losses)

    @torch.no_grad()
    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.out(x)
