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
import warnings
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
    ``sign_latent`` [out, in], ``bias`` (float). Buffer ``initial_bits`` [n, out, in] (uint8, 0
    or 1): the random start, saved in the state_dict for :func:`bits_report` (empty when
    unknown: loaded from a checkpoint that lacks it). ``keep_top_bits`` (None or k in 0..n):
    use only the k most significant bits (for the bits report). The weight is computed in
    float32 (float64 for float64 latents) whatever the latents' dtype, so it is exact after
    ``.half()`` too.
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
        # With a generator every draw runs on its device, then moves to ``device`` (the default
        # device when None): a generator only draws on its own device, so a CPU generator with
        # device="cuda" must not draw there, and one seed gives one initialisation everywhere.
        gdev = generator.device if generator is not None else None
        if device is None:
            device = torch.empty(0).device
        rb = torch.randint(0, 2, (bits, out_features, in_features), generator=generator,
                           device=gdev)
        rs = torch.randint(0, 2, (out_features, in_features), generator=generator, device=gdev)
        self.bit_latents = nn.Parameter((rb.float() - 0.5).to(device))
        self.sign_latent = nn.Parameter((rs.float() - 0.5).to(device))
        # The random start of every bit, for bits_report's "flipped from init" count. Persistent,
        # so a checkpoint reloaded into a fresh BitLinear (whose own random start differs)
        # reports against the real start; an empty tensor means "unknown" (a checkpoint saved
        # before this buffer was persistent), see _load_from_state_dict. uint8 0/1, not bool:
        # torch.optim.swa_utils.AveragedModel(model, use_buffers=True) (SWA averaging the
        # BatchNorm statistics along) subtracts buffers, which torch refuses for bool ("Subtraction
        # ... with two bool tensors is not supported"); a 0/1 integer buffer equal in the model
        # and the average stays as it is. A checkpoint holding the bool buffer loads (copy_).
        self.register_buffer("initial_bits", rb.to(torch.uint8).to(device))
        if bias:
            bound = 1.0 / math.sqrt(in_features)
            self.bias = nn.Parameter(torch.empty(out_features, device=gdev).uniform_(
                -bound, bound, generator=generator).to(device))
        else:
            self.bias = None
        self.keep_top_bits: Optional[int] = None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Checkpoints written before ``initial_bits`` was persistent lack it: load them (also
        # strictly) and mark the start unknown (an empty buffer) rather than keep this module's
        # own random start, which would make bits_report's flipped fractions silently wrong.
        key = prefix + "initial_bits"
        src = state_dict.get(key)
        dev = self.bit_latents.device
        lat = state_dict.get(prefix + "bit_latents")
        if dev.type == "meta" and isinstance(lat, torch.Tensor):  # load_state_dict(assign=True)
            dev = lat.device
        # Legacy means: this layer's latents are loaded, without their start. A state_dict that
        # does not hold this layer at all (load_state_dict(strict=False) of another part of the
        # model, a backbone without its head) replaces none of its bits, so its own random
        # start is still the right one and stays (torch reports the keys missing as usual).
        legacy = src is None and (prefix + "bit_latents") in state_dict
        if legacy or (src is not None and src.numel() == 0):
            self._buffers["initial_bits"] = torch.zeros(0, dtype=torch.uint8, device=dev)
        elif src is not None and self.initial_bits.numel() == 0:  # unknown start here, a known one in the checkpoint
            self._buffers["initial_bits"] = torch.zeros(self.bit_latents.shape, dtype=torch.uint8,
                                                        device=dev)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if legacy and key in missing_keys:
            missing_keys.remove(key)

    def hard_bits(self) -> torch.Tensor:
        """The current bits b_i ∈ {0, 1}, [n, out, in] (bool)."""
        return self.bit_latents.detach() > 0

    def _math_dtype(self) -> torch.dtype:
        # The integer sum Σ b_i 2^i needs bits <= 16 significant bits: exact in float32 (24),
        # not in float16 (11: 4095 rounds to 4096 at 12 bits, 65535 overflows to inf at 16) or
        # bfloat16 (8: 511 -> 512 at 9 bits). After .half() / .to(bfloat16) the latents are
        # 16-bit, but the bits b_i ∈ {0, 1} and the powers 2^i are still exact there, so the
        # sum and α·sign·M run in float32 (float64 for float64 latents), rounded once at the end.
        return torch.float64 if self.bit_latents.dtype == torch.float64 else torch.float32

    def magnitude(self) -> torch.Tensor:
        """Σ b_i 2^i with straight-through bits (the top ``keep_top_bits`` only, when set), in
        float32 (float64 for float64 latents): exact integers for every ``bits`` <= 16."""
        mt = self._math_dtype()
        b = _StepSTE.apply(self.bit_latents).to(mt)
        # 2^i made here, not kept in a non-persistent buffer: such a buffer stays on the meta
        # device after meta-device construction + load_state_dict(assign=True)
        p = (1 << torch.arange(self.bits, device=b.device)).to(mt).view(-1, 1, 1)
        k = self.keep_top_bits
        if k is not None:
            if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= self.bits:
                raise ValueError(f"keep_top_bits must be None or an integer in 0..{self.bits} "
                                 f"(bits={self.bits}), got {k!r}")
            mask = (torch.arange(self.bits, device=p.device) >= self.bits - k).to(mt)
            p = p * mask.view(-1, 1, 1)
        return (b * p).sum(0)

    def _weight_math(self) -> torch.Tensor:
        """α·(−1)^s·M in the math dtype (float32 / float64)."""
        sign = 1.0 - 2.0 * _StepSTE.apply(self.sign_latent).to(self._math_dtype())
        return self.alpha * sign * self.magnitude()

    def weight(self) -> torch.Tensor:
        """The weight α·(−1)^s·Σ b_i 2^i [out, in], in the latents' dtype (computed in float32,
        rounded once)."""
        return self._weight_math().to(self.bit_latents.dtype)

    def integer_weight(self) -> torch.Tensor:
        """(−1)^s · Σ b_i 2^i as int32 (the stored integers)."""
        with torch.no_grad():
            m = (self.hard_bits().to(torch.int64) << torch.arange(
                self.bits, device=self.bit_latents.device).view(-1, 1, 1)).sum(0)
            return torch.where(self.sign_latent > 0, -m, m).to(torch.int32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._weight_math().to(x.dtype),
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
    Layers whose initial bits are unknown (loaded from a checkpoint without ``initial_bits``)
    are left out of the fractions, with a warning; a position left with no layer is NaN.
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
    # A layer loaded from a checkpoint without its initial bits (empty buffer) has no known
    # start: it is left out of the counts; a position no layer with a known start has is NaN.
    unknown = [m for m in layers if m.initial_bits.numel() == 0]
    if unknown:
        warnings.warn(f"{len(unknown)} of {len(layers)} BitLinear layers were loaded from a "
                      "checkpoint without their initial bits: flipped_fraction leaves them out "
                      "(NaN where no layer is left)", stacklevel=2)
    flipped = []
    for i in range(n):
        tot = fl = 0
        for m in layers:
            if i < m.bits and m.initial_bits.numel():
                fl += int((m.hard_bits()[i] != m.initial_bits[i]).sum())
                tot += m.hard_bits()[i].numel()
        flipped.append(fl / tot if tot else math.nan)
    return {"top_k_accuracy": acc, "flipped_fraction": flipped}
