"""Bit-wise training of integer weights (Ivan, "Bit-wise training of neural network weights",
2022): ``BitLinear`` learns every bit of its integer weights directly.

    w = α · (−1)^s · Σ_{i=0}^{n−1} b_i 2^i,      s, b_i ∈ {0, 1}

Each bit (and the sign) is the Heaviside step of a real latent z: b = [z > 0], trained with a
straight-through gradient (∂b/∂z = 1 for |z| <= 1, 0 beyond: the latent of a settled bit stops
moving). The latents start at ±1/2 for random bits, so the initial weights are uniform integers
with random signs, and α is fixed so that their standard deviation equals He's init std
sqrt(2 / fan_in): E[w²] = α² E[M²] with M uniform on {0, …, 2^n − 1}, E[M²] = (2^n − 1)(2^{n+1} − 1)/6.

The report (:func:`bits_report`) answers the paper's question — how many bits carry the
accuracy — by evaluating the model with only the top-k magnitude bits of every BitLinear kept
(lower bits zeroed), k = 0..n, and by counting how many bits of each position flipped during
training.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BitLinear", "bits_report", "he_alpha"]


def he_alpha(fan_in: int, bits: int) -> float:
    """α making α·(±M), M uniform on {0..2^bits−1} with a random sign, have He's std."""
    levels = 2 ** bits
    em2 = (levels - 1) * (2 * levels - 1) / 6.0
    return math.sqrt(2.0 / fan_in) / math.sqrt(em2)


class _StepSTE(torch.autograd.Function):
    """b = [z > 0]; straight-through gradient inside |z| <= 1. (setup_context and
    generate_vmap_rule: the form torch.func transforms accept; ~9 us more per call.)"""

    generate_vmap_rule = True

    @staticmethod
    def forward(z):
        return (z > 0).to(z.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (z,) = ctx.saved_tensors
        return g * (z.abs() <= 1).to(g.dtype)


class BitLinear(nn.Module):
    """nn.Linear whose weights are n-bit signed integers (times a fixed α) learned bit by bit.

    Parameters: ``bit_latents`` [n, out, in] (bit i of every weight, least significant first),
    ``sign_latent`` [out, in], ``bias`` (float). ``keep_top_bits`` (None or k): use only the k
    most significant bits (for the bits report).
    """

    def __init__(self, in_features: int, out_features: int, bits: int = 8, bias: bool = True,
                 *, generator: Optional[torch.Generator] = None, device=None):
        super().__init__()
        if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
            raise ValueError(f"bits must be an integer in 1..16, got {bits!r}")
        if in_features < 1 or out_features < 1:
            raise ValueError(f"in_features and out_features must be >= 1, got {in_features}, "
                             f"{out_features}")
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.alpha = he_alpha(in_features, bits)
        rb = torch.randint(0, 2, (bits, out_features, in_features), generator=generator)
        rs = torch.randint(0, 2, (out_features, in_features), generator=generator)
        self.bit_latents = nn.Parameter((rb.float() - 0.5).to(device))
        self.sign_latent = nn.Parameter((rs.float() - 0.5).to(device))
        self.register_buffer("initial_bits", rb.to(torch.bool).to(device), persistent=False)
        if bias:
            bound = 1.0 / math.sqrt(in_features)
            self.bias = nn.Parameter(torch.empty(out_features, device=device).uniform_(
                -bound, bound, generator=generator))
        else:
            self.bias = None
        self.keep_top_bits: Optional[int] = None
        self.register_buffer("powers", 2.0 ** torch.arange(bits, dtype=torch.float32,
                                                           device=device).view(bits, 1, 1),
                             persistent=False)

    def hard_bits(self) -> torch.Tensor:
        """The current bits b_i ∈ {0, 1}, [n, out, in] (bool)."""
        return self.bit_latents.detach() > 0

    def magnitude(self) -> torch.Tensor:
        """Σ b_i 2^i with straight-through bits (the top ``keep_top_bits`` only, when set)."""
        b = _StepSTE.apply(self.bit_latents)
        p = self.powers
        if self.keep_top_bits is not None:
            k = self.keep_top_bits
            mask = (torch.arange(self.bits, device=p.device) >= self.bits - k).to(p.dtype)
            p = p * mask.view(-1, 1, 1)
        return (b * p).sum(0)

    def weight(self) -> torch.Tensor:
        sign = 1.0 - 2.0 * _StepSTE.apply(self.sign_latent)
        return self.alpha * sign * self.magnitude()

    def integer_weight(self) -> torch.Tensor:
        """(−1)^s · Σ b_i 2^i as int32 (the stored integers)."""
        with torch.no_grad():
            m = (self.hard_bits().to(torch.int64) << torch.arange(
                self.bits, device=self.bit_latents.device).view(-1, 1, 1)).sum(0)
            return torch.where(self.sign_latent > 0, -m, m).to(torch.int32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight().to(x.dtype),
                        None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}, alpha={self.alpha:.3g}")


@torch.no_grad()
def bits_report(model: nn.Module, evaluate: Callable[[nn.Module], float]) -> dict:
    """How many bits carry the accuracy.

    ``evaluate(model) -> accuracy``. Returns {"top_k_accuracy": {k: accuracy with only the k most
    significant bits of every BitLinear kept}, "flipped_fraction": [fraction of weights whose
    bit i (least significant first) differs from its initial random value, per position]}.
    """
    layers = [m for m in model.modules() if isinstance(m, BitLinear)]
    if not layers:
        raise ValueError("model has no BitLinear layer")
    n = max(m.bits for m in layers)
    acc = {}
    try:
        for k in range(0, n + 1):
            for m in layers:
                m.keep_top_bits = min(k, m.bits)
            acc[k] = float(evaluate(model))
    finally:
        for m in layers:
            m.keep_top_bits = None
    flipped = []
    for i in range(n):
        tot = fl = 0
        for m in layers:
            if i < m.bits:
                fl += int((m.hard_bits()[i] != m.initial_bits[i]).sum())
                tot += m.hard_bits()[i].numel()
        flipped.append(fl / tot if tot else 0.0)
    return {"top_k_accuracy": acc, "flipped_fraction": flipped}
