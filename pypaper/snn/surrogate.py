"""Surrogate spike functions, drop-in for ``spikingjelly.activation_based.surrogate``.

Each is an nn.Module taking ``alpha`` and ``spiking`` like SpikingJelly's. Called on x (= H - Vth)
it returns Theta(x) (1 where x >= 0) with the surrogate derivative sigma'(x) as its gradient
(``spiking=False``: the smooth primitive sigma(x) itself). Inside the neurons it is never called:
the fused kernels get the integer ``surrogate_id`` and ``alpha`` (kernels/common/snn_math.h).

    Sigmoid(4)             sigma' = a s (1 - s), s = sigmoid(a x)
    ATan(2)                sigma' = (a/2) / (1 + (pi/2 a x)^2)
    PiecewiseQuadratic(1)  sigma' = a - a^2 |x|  for |x| <= 1/a, else 0
    Rect(1)                sigma' = a  for |x| < 1/(2a), else 0   (STBP's rectangle, width 1/a)
    PiecewiseExp(1)        sigma' = (a/2) exp(-a |x|)
    SoftSign(2)            sigma' = 1 / (2 a (1/a + |x|)^2)
    SuperSpike(1)          sigma' = a / (1 + |x|)^2     (Zenke & Ganguli 2018)
    Erf(2)                 sigma' = a / sqrt(pi) exp(-(a x)^2)
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import nn

from . import reference, spikingjelly_fallback
from .reference import SURROGATE_IDS


def heaviside(x: torch.Tensor) -> torch.Tensor:
    """Theta(x): 1 where x >= 0, else 0 (SpikingJelly's convention at 0)."""
    return (x >= 0).to(x.dtype)


class SurrogateFunctionBase(nn.Module):
    """Theta forward with a surrogate derivative backward; subclasses set ``surrogate_id``.

    SpikingJelly's contract holds too: ``spiking_function(x, alpha)`` and
    ``primitive_function(x, alpha)`` are static methods, and a subclass that keeps
    ``surrogate_id = -1`` and defines them (a surrogate of the user's own) runs in the neurons
    through the plain-PyTorch loop, which calls it."""

    surrogate_id: int = -1
    default_alpha: float = 1.0

    def __init__(self, alpha: Optional[float] = None, spiking: bool = True):
        super().__init__()
        alpha = self.default_alpha if alpha is None else alpha
        if isinstance(alpha, torch.Tensor) and alpha.numel() == 1 and not alpha.requires_grad:
            alpha = alpha.item()  # SpikingJelly takes a tensor alpha too (a constant here)
        if (isinstance(alpha, bool) or not isinstance(alpha, numbers.Real)
                or not math.isfinite(alpha) or alpha <= 0):
            raise ValueError(f"alpha must be a positive finite number, got {alpha!r}")
        self.alpha = float(alpha)
        self.spiking = bool(spiking)

    def set_spiking_mode(self, spiking: bool) -> None:
        self.spiking = bool(spiking)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, spiking={self.spiking}"

    def derivative(self, x: torch.Tensor) -> torch.Tensor:
        """sigma'(x) (pypaper's built-in surrogates)."""
        if self.surrogate_id < 0:
            raise NotImplementedError(f"{type(self).__name__} is not one of pypaper's surrogates: "
                                      f"it has no built-in derivative")
        return reference.surrogate_grad(x, self.surrogate_id, self.alpha)

    @staticmethod
    def spiking_function(x: torch.Tensor, alpha) -> torch.Tensor:
        """Theta(x) whose gradient is the surrogate's (SpikingJelly's static method)."""
        raise NotImplementedError("a surrogate of your own must define the static method "
                                  "spiking_function(x, alpha), as in SpikingJelly")

    @staticmethod
    def primitive_function(x: torch.Tensor, alpha) -> torch.Tensor:
        """sigma(x) (SpikingJelly's static method; used when spiking=False)."""
        raise NotImplementedError("a surrogate of your own must define the static method "
                                  "primitive_function(x, alpha) to run with spiking=False")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spiking:
            return self.spiking_function(x, self.alpha)
        return self.primitive_function(x, self.alpha)


def _make(name: str, alpha: float, doc: str):
    sid = SURROGATE_IDS[name]

    def spiking_function(x: torch.Tensor, alpha) -> torch.Tensor:
        return reference.spike(x, sid, float(alpha))

    def primitive_function(x: torch.Tensor, alpha) -> torch.Tensor:
        return reference.surrogate_primitive(x, sid, float(alpha))

    def backward(grad_output: torch.Tensor, x: torch.Tensor, alpha) -> torch.Tensor:
        """grad_output * sigma'(x) (SpikingJelly's static backward)."""
        return grad_output * reference.surrogate_grad(x, sid, float(alpha))

    spiking_function._pypaper_surrogate_id = sid  # what surrogate_spec trusts to be this id
    cls = type(name, (SurrogateFunctionBase,), {
        "surrogate_id": sid,
        "default_alpha": alpha,
        "__doc__": doc,
        "spiking_function": staticmethod(spiking_function),
        "primitive_function": staticmethod(primitive_function),
        "backward": staticmethod(backward),
    })

    def __init__(self, alpha: float = alpha, spiking: bool = True):
        SurrogateFunctionBase.__init__(self, alpha, spiking)

    cls.__init__ = __init__
    cls.__module__ = __name__
    return cls


Sigmoid = _make("Sigmoid", 4.0, "sigma = sigmoid(a x); sigma' = a s (1 - s).")
ATan = _make("ATan", 2.0, "sigma = atan(pi/2 a x)/pi + 1/2; sigma' = (a/2) / (1 + (pi/2 a x)^2).")
PiecewiseQuadratic = _make("PiecewiseQuadratic", 1.0,
                           "sigma' = a - a^2 |x| for |x| <= 1/a, else 0 (a triangle).")
PiecewiseExp = _make("PiecewiseExp", 1.0, "sigma' = (a/2) exp(-a |x|).")
SoftSign = _make("SoftSign", 2.0, "sigma = (softsign(a x) + 1)/2; sigma' = 1/(2a (1/a + |x|)^2).")
SuperSpike = _make("SuperSpike", 1.0,
                   "sigma' = a / (1 + |x|)^2 (Zenke & Ganguli, 2018); no primitive (spiking only).")
Erf = _make("Erf", 2.0, "sigma = erfc(-a x)/2; sigma' = a/sqrt(pi) exp(-(a x)^2).")
Rect = _make("Rect", 1.0, "sigma = clip(a x + 1/2, 0, 1); sigma' = a for |x| < 1/(2a), else 0.")


def surrogate_spec(fn) -> Optional[tuple[int, float]]:
    """(surrogate_id, alpha) when the kernels can run ``fn``'s derivative, else None.

    Accepts pypaper's surrogates and SpikingJelly's of the same names (so a model keeps its
    ``spikingjelly...surrogate.ATan()`` objects after switching the neuron import); anything else
    (a custom callable, spiking=False, a tensor alpha) runs the plain-PyTorch loop calling ``fn``.
    """
    if fn is None:
        return SURROGATE_IDS["Sigmoid"], 4.0
    if isinstance(fn, SurrogateFunctionBase):
        # a subclass of the user's own (surrogate_id -1) runs its spiking_function in Python
        # (also a subclass of a built-in that overrides spiking_function)
        # (and a subclass that overrides forward, which the kernels would never call)
        own = getattr(type(fn).spiking_function, "_pypaper_surrogate_id", None)
        ok = (fn.spiking and fn.surrogate_id >= 0 and own == fn.surrogate_id
              and type(fn).forward is SurrogateFunctionBase.forward)
        return (fn.surrogate_id, fn.alpha) if ok else None
    cls = type(fn)
    if cls.__module__.startswith("spikingjelly") and cls.__name__ in SURROGATE_IDS:
        alpha = getattr(fn, "alpha", None)
        if (getattr(fn, "spiking", True) and isinstance(alpha, numbers.Real)
                and not isinstance(alpha, bool) and math.isfinite(alpha) and alpha > 0):
            return SURROGATE_IDS[cls.__name__], float(alpha)
    return None


__all__ = ["ATan", "Erf", "PiecewiseExp", "PiecewiseQuadratic", "Rect", "Sigmoid", "SoftSign",
           "SuperSpike", "SurrogateFunctionBase", "heaviside", "surrogate_spec"]


# Names this module lacks come from SpikingJelly (pypaper/snn/spikingjelly_fallback.py).
__getattr__ = spikingjelly_fallback.forwarder(__name__, "surrogate")
