"""NUPES / PowerQuant: per-layer power-exponent search, the learned (data-driven) variant, and the
``PowerExponentConfig`` of ``pypaper.quant.quantize_``.

Yvinec et al., "PowerQuant: Automorphism Search for Non-Uniform Quantization" (ICLR 2023) and
"NUPES: Non-Uniform Post-Training Quantization via Power Exponent Search" (2023). The quantizer is
pypaper/quant/power.py: codes of sign(w)·|w|^a quantized uniformly, one range m per output row,
dequantized by the inverse power.

* Data-free: the exponent of each layer minimises the weight reconstruction error
  E(a) = ‖Q_a(W) − W‖² (PowerQuant shows E locally convex in a). :func:`search_exponent` scans a
  coarse grid of a (E has small jumps where codes change, so a pure golden-section search could
  stop in a side valley) and refines the best bracket by golden-section search.
* Data-driven (``learn=True``): the layer keeps a latent float weight and a learnable exponent;
  :func:`calibrate` minimises, on calibration batches, each layer's output reconstruction error
  ‖x Q_a(W')ᵀ − x Wᵀ‖² over W' (straight-through, so W' moves over the whole quantized grid:
  NUPES' "new quantized weights over the entire quantized space", not only up/down rounding) and
  a (the exact piecewise derivative with codes fixed, log taken only at codes >= 1);
  :func:`freeze` then stores int8 codes.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .._module_swap import share_hooks
from .configs import QuantConfig
from .qlinear import apply_keeping_dtypes, cast_floats_on_load
from .power import (SUPPORTED_BITS, bits_to_qmax, channel_max_abs, power_dequantize,
                    power_fake_quantize, power_quantize)

__all__ = ["PowerExponentConfig", "PowerQuantLinear", "calibrate", "freeze",
           "reconstruction_error", "search_exponent"]

_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def _check_exponent_value(exponent, name: str = "exponent") -> float:
    if isinstance(exponent, bool) or not isinstance(exponent, (int, float)):
        raise TypeError(f"{name} must be None or a float, got {type(exponent).__name__}")
    a = float(exponent)
    if not math.isfinite(a) or a <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {exponent!r}")
    return a


def reconstruction_error(w: torch.Tensor, exponent: float, bits: int,
                         per_channel: bool = True) -> float:
    """‖Q_a(w) − w‖² of the power quantizer (one range per row of w when ``per_channel``)."""
    w = w.detach()
    m = channel_max_abs(w, per_channel)
    y = power_fake_quantize(w, float(exponent), bits, m)
    return float((y.double() - w.double()).pow(2).sum())


def search_exponent(w: torch.Tensor, bits: int, *, bounds: tuple[float, float] = (0.05, 2.0),
                    grid: int = 24, tol: float = 1e-4, per_channel: bool = True
                    ) -> tuple[float, float]:
    """Data-free exponent: argmin over a in ``bounds`` of ‖Q_a(w) − w‖².

    A grid of ``grid`` points (geometric in a), then golden-section search inside the bracket
    around the best grid point until it is narrower than ``tol``. Returns (a, error).
    """
    bits_to_qmax(bits)
    lo, hi = (_check_exponent_value(b, "bounds") for b in bounds)
    if not lo < hi:
        raise ValueError(f"bounds must be (low, high) with low < high, got {bounds!r}")
    if grid < 3:
        raise ValueError(f"grid must be >= 3, got {grid}")

    def f(a: float) -> float:
        return reconstruction_error(w, a, bits, per_channel)

    pts = [lo * (hi / lo) ** (i / (grid - 1)) for i in range(grid)]
    vals = [f(a) for a in pts]
    i = min(range(grid), key=vals.__getitem__)
    best_a, best_e = pts[i], vals[i]
    a, b = pts[max(i - 1, 0)], pts[min(i + 1, grid - 1)]
    c, d = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tol:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - _GOLDEN * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + _GOLDEN * (b - a)
            fd = f(d)
    for cand, e in ((c, fc), (d, fd)):
        if e < best_e:
            best_a, best_e = cand, e
    return best_a, best_e


class PowerQuantLinear(nn.Module):
    """nn.Linear with power-exponent quantized weights (PowerQuant / NUPES).

    Frozen (the default): buffers ``codes`` (int8 [out, in]), ``max_abs`` (one range per output
    row, float32), ``exponent`` (float32 scalar) and the float ``bias``; the forward dequantizes
    (the inverse power, pypaper.quant.power_dequantize) and runs F.linear. The state_dict holds
    exactly these, so it saves and loads.

    Learnable (``learnable=True``, NUPES' data-driven variant): a latent ``weight`` Parameter and
    an ``exponent`` Parameter; the forward fake-quantizes the weight (straight-through for the
    weight, the exact code-fixed derivative for the exponent). ``weight_fp`` keeps the original
    weight for :func:`calibrate`. :meth:`freeze` turns it into the frozen form.
    """

    def __init__(self, in_features: int, out_features: int, bits: int = 4, bias: bool = True,
                 *, learnable: bool = False, device=None, dtype=torch.float32):
        super().__init__()
        bits_to_qmax(bits)
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.learnable = learnable
        kw = dict(device=device)
        self.register_buffer("max_abs", torch.ones(out_features, dtype=torch.float32, **kw))
        if learnable:
            self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=dtype, **kw))
            self.exponent = nn.Parameter(torch.tensor(1.0, dtype=torch.float32, **kw))
            self.register_buffer("weight_fp", torch.zeros(out_features, in_features, dtype=dtype,
                                                          **kw))
        else:
            self.register_buffer("codes", torch.zeros(out_features, in_features, dtype=torch.int8,
                                                      **kw))
            self.register_buffer("exponent", torch.tensor(1.0, dtype=torch.float32, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, **kw)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, exponent: float,
                    learnable: bool = False) -> "PowerQuantLinear":
        w = linear.weight.detach()
        mod = cls(linear.in_features, linear.out_features, bits, linear.bias is not None,
                  learnable=learnable, device=w.device,
                  dtype=w.dtype if w.dtype == torch.float64 else torch.float32)
        if w.is_meta:
            # `with torch.device("meta"): quantize_(build(), config)` then
            # load_state_dict(checkpoint, assign=True), as for the int8 / int4 layers: there is
            # nothing to quantize (the range check reads values, .item() on meta raised)
            return mod
        with torch.no_grad():
            wf = w.to(mod.max_abs.dtype if w.dtype != torch.float64 else w.dtype)
            mod.max_abs.copy_(channel_max_abs(wf, per_channel=True).to(mod.max_abs.dtype))
            mod.exponent.fill_(float(exponent))
            if learnable:
                mod.weight.copy_(wf)
                mod.weight_fp.copy_(wf)
            else:
                mod.codes.copy_(power_quantize(wf, float(exponent), bits, mod.max_abs))
            if linear.bias is not None:
                mod.bias.copy_(linear.bias.detach())
        return mod

    def quantized_weight(self) -> torch.Tensor:
        """The weight the forward uses: dequantized codes (frozen) or the fake-quantized latent."""
        if self.learnable:
            return power_fake_quantize(self.weight, self.exponent, self.bits, self.max_abs)
        return power_dequantize(self.codes, self.exponent, self.bits, self.max_abs,
                                dtype=torch.float32)

    def _apply(self, fn, recurse=True):
        # The power quantizer takes float32 / float64 ranges, exponent and (learnable) weights: a
        # model-wide .to(bf16) / .half() keeps those (device moves apply; .double() converts, the
        # ops take it); the forward casts the weight and bias to the input's dtype.
        keep = [t for t in (*self._parameters.values(), *self._buffers.values())
                if t is not None and t.is_floating_point()]
        return apply_keeping_dtypes(self, fn, recurse, keep, (torch.float32, torch.float64))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # the same float32 / float64 invariant on load(assign=True) of a bf16 / fp16 checkpoint
        # (the forward raised "max_abs must be float32 or float64, got BFloat16")
        cast_floats_on_load(self, state_dict, prefix, (torch.float32, torch.float64))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.quantized_weight()
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def freeze(self) -> "PowerQuantLinear":
        """A frozen PowerQuantLinear with this layer's codes (learned exponent and weight)."""
        if not self.learnable:
            return self
        a = float(self.exponent.detach())
        if not math.isfinite(a) or a <= 0:
            raise ValueError(f"the learned exponent is not finite and > 0 ({a}): lower the lr")
        out = PowerQuantLinear(self.in_features, self.out_features, self.bits,
                               self.bias is not None, device=self.weight.device)
        out.max_abs.copy_(self.max_abs)
        out.exponent.fill_(a)
        out.codes.copy_(power_quantize(self.weight.detach(), a, self.bits, self.max_abs))
        if self.bias is not None:
            out.bias.copy_(self.bias.detach())
        return out.train(self.training)

    def storage_bits(self) -> int:
        """Bits stored: the codes (bits each), one float32 range per row, the exponent, bias."""
        n = self.in_features * self.out_features
        return self.bits * n + 32 * self.out_features + 32 + (
            32 * self.out_features if self.bias is not None else 0)

    def _exponent_repr(self) -> str:
        # a meta-device skeleton (quantize_ under torch.device("meta")) has no value to print
        return "meta" if self.exponent.is_meta else f"{float(self.exponent.detach()):.4f}"

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}, exponent={self._exponent_repr()}, "
                f"learnable={self.learnable}")


@dataclasses.dataclass(frozen=True)
class PowerExponentConfig(QuantConfig):
    """Power-exponent (NUPES / PowerQuant) weight quantization of an nn.Linear.

    Args:
        bits: 2..8 (symmetric codes, qmax = 2^(bits-1) - 1, one range per output row).
        exponent: the power a (> 0; a = 1 is uniform symmetric quantization); None searches it
            per layer, data-free (:func:`search_exponent`).
        learn: build the learnable layer (latent weight + learnable exponent) for
            :func:`calibrate`, then :func:`freeze`.
    """

    bits: int = 4
    exponent: Optional[float] = None
    learn: bool = False

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or \
                self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits!r}")
        if self.exponent is not None:
            _check_exponent_value(self.exponent)
        if not isinstance(self.learn, bool):
            raise TypeError(f"learn must be a bool, got {type(self.learn).__name__}")

    @property
    def weight_bits(self) -> float:
        """Bits per stored weight code (the per-row float32 range adds 32 / in_features)."""
        return float(self.bits)

    def apply(self, module: nn.Linear, fqn: str = "") -> nn.Module:
        if not isinstance(module, nn.Linear):
            raise TypeError(f"PowerExponentConfig applies to nn.Linear, got "
                            f"{type(module).__name__} at {fqn!r}")
        a = self.exponent
        if a is None and not module.weight.is_meta:
            a, _ = search_exponent(module.weight.detach().float(), self.bits)
        # a model built on the meta device has no values to search on: its layers get their
        # shapes, and their exponent, ranges and codes from load_state_dict(..., assign=True)
        return PowerQuantLinear.from_linear(module, self.bits, a, learnable=self.learn)


def _learnable_layers(model: nn.Module):
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, PowerQuantLinear) and m.learnable]


def calibrate(model: nn.Module, batches: Iterable, *, steps: int = 200, lr: float = 1e-4,
              exponent_lr: float = 1e-3, input_fn: Optional[Callable] = None) -> list[float]:
    """NUPES' data-driven variant: learn the latent weights and exponents of every learnable
    PowerQuantLinear in ``model`` on calibration batches.

    Each step runs the model on one batch (cycled), keeps every learnable layer's input x and
    minimises sum over layers of mean((x Q_a(W')ᵀ − x W_fpᵀ)²) / mean((x W_fpᵀ)²) (the relative
    output reconstruction error; x detached, so layers learn side by side) with Adam and a cosine
    learning-rate decay to 0 over ``steps``. ``batches``:
    tensors, or tuples whose first element is the input (``input_fn(batch)`` picks it otherwise).
    Returns the loss of every step. Call :func:`freeze` after.
    """
    layers = _learnable_layers(model)
    if not layers:
        raise ValueError("model has no learnable PowerQuantLinear (quantize_ it with "
                         "PowerExponentConfig(learn=True) first)")
    batches = list(batches)
    if not batches:
        raise ValueError("batches is empty: calibration needs at least one batch")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    inputs: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(
        lambda mod, args, name=n: inputs.__setitem__(name, args[0].detach())) for n, m in layers]
    opt = torch.optim.Adam([
        {"params": [m.weight for _, m in layers], "lr": lr},
        {"params": [m.exponent for _, m in layers], "lr": exponent_lr},
    ])
    # Cosine decay to 0: the straight-through weights otherwise keep hopping across rounding
    # boundaries at the end and the loss creeps back up.
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, steps) / steps)))
    losses = []
    was_training = model.training
    model.eval()
    try:
        for step in range(steps):
            batch = batches[step % len(batches)]
            x = input_fn(batch) if input_fn else (batch[0] if isinstance(batch, (tuple, list))
                                                  else batch)
            # this step's inputs only: a layer that did not run on this batch (an unused head,
            # a branch the batch does not take) has no reconstruction term this step, instead
            # of a KeyError or a stale input from an earlier batch
            inputs.clear()
            with torch.no_grad():
                model(x)
            ran = [(n, m) for n, m in layers if n in inputs]
            if not ran:
                raise ValueError("no learnable PowerQuantLinear ran in the model's forward on "
                                 f"calibration batch {step % len(batches)}: nothing to learn")
            loss = 0.0
            for n, m in ran:
                xin = inputs[n]
                ref = F.linear(xin, m.weight_fp.to(xin.dtype))
                out = F.linear(xin, m.quantized_weight().to(xin.dtype))
                loss = loss + (out - ref).pow(2).mean() / ref.pow(2).mean().clamp_min(1e-12)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                for _, m in layers:
                    m.exponent.clamp_(min=0.05, max=4.0)  # keep a in the quantizer's domain
            losses.append(float(loss.detach()))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return losses


def freeze(model: nn.Module) -> nn.Module:
    """Replace every learnable PowerQuantLinear of ``model`` by its frozen (int8 codes) form.
    A layer under several names (quantize_ gives a tied nn.Linear one quantized module) is
    frozen once and that one frozen module goes under every name, so the tie survives."""
    done: dict = {}  # id(learnable layer) -> (that layer, kept alive so ids stay unique; frozen)
    for m in list(model.modules()):
        # parent._modules, not named_children(): the latter lists a module under two names of
        # one parent once, which left the second name learnable
        for child_name, child in list(m._modules.items()):
            if isinstance(child, PowerQuantLinear) and child.learnable:
                if id(child) not in done:
                    frozen = child.freeze()
                    share_hooks(child, frozen)  # the layer's hooks fire on its frozen form
                    done[id(child)] = (child, frozen)
                setattr(m, child_name, done[id(child)][1])
    return model
