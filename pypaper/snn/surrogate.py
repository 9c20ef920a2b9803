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

import abc
import inspect
import sys
from typing import Optional

import torch
from torch import nn

from . import reference, spikingjelly_fallback
from .._numbers import as_flag, is_finite_number, plain_number, shown
from .reference import SURROGATE_IDS


def heaviside(x: torch.Tensor) -> torch.Tensor:
    """Theta(x): 1 where x >= 0, else 0 (SpikingJelly's convention at 0)."""
    return (x >= 0).to(x.dtype)


def alpha_value(alpha, where: str = "alpha") -> float:
    """A built-in surrogate's alpha as the kernels take it: a positive finite number, or a
    one-element tensor read now (SpikingJelly keeps a tensor alpha as it is given, so annealing
    it in place, alpha.fill_(a), takes effect at the next call; the spiking function gives it
    no gradient, as SpikingJelly's built-ins do not). A meta alpha has no value: ValueError
    (alpha_for gives the shape-only calls on meta inputs a tensor instead)."""
    value = alpha
    if isinstance(alpha, torch.Tensor):
        _check_alpha_tensor(alpha, where)
        if alpha.is_meta:
            raise ValueError(
                f"{where} is a tensor on the meta device (the module was built under "
                f"torch.device('meta')): it holds no value to compute the surrogate gradient "
                f"with. Materialise it first (module.to_empty(device=...) then "
                f"load_state_dict, or assign alpha a tensor with a value); to_empty moves an "
                f"nn.Parameter alpha, not a plain tensor attribute")
        value = float(alpha.detach())
    if not is_finite_number(value) or value <= 0:
        raise ValueError(f"{where} must be a positive finite number, got {shown(alpha)!r}")
    return float(value)


def _check_alpha_tensor(alpha: torch.Tensor, where: str) -> None:
    if alpha.numel() != 1 or not alpha.is_floating_point():
        raise ValueError(f"{where} must be a positive finite number or a one-element floating "
                         f"tensor, got a {alpha.dtype} tensor of shape {tuple(alpha.shape)}")


def alpha_operand(alpha, where: str = "alpha"):
    """alpha as the ops take it: a float (alpha_value), except a tensor alpha while torch.compile
    traces (and no torch.func transform or forward-mode AD is around the call), which stays a
    tensor: reading it there would break the graph. It becomes tensor_alpha.checked_alpha's
    snapshot, a float64 0-d tensor of its own that the compiled graph checks when it runs (a
    ValueError as here) and that autograd keeps, so annealing alpha in place between a forward
    and its backward leaves the backward with the forward's value, as eager. lif_multi_step then
    runs tensor_alpha.py's ops, or the reference, which computes with it."""
    if isinstance(alpha, torch.Tensor) and reference.traced_without_transforms():
        _check_alpha_tensor(alpha, where)
        from . import tensor_alpha

        return tensor_alpha.checked_alpha(alpha.detach(), where)
    return alpha_value(alpha, where)


def _is_meta(alpha) -> bool:
    return isinstance(alpha, torch.Tensor) and alpha.is_meta


def alpha_for(x: torch.Tensor, alpha, where: str = "alpha"):
    """alpha_operand for a call on ``x``, which also takes a meta alpha (a model built under
    torch.device('meta') with a tensor alpha, as deferred initialisation does). A meta alpha
    has no value to read; on meta inputs the call only propagates shapes and dtypes, so it
    computes with alpha as a float64 0-d tensor, the form a traced alpha takes
    (tensor_alpha.checked_alpha): the same result dtypes as a number alpha gives. On inputs
    with values, alpha_value's ValueError says to materialise alpha first."""
    if _is_meta(alpha) and x.is_meta:
        _check_alpha_tensor(alpha, where)
        return alpha.detach().reshape(()).to(torch.float64)
    return alpha_operand(alpha, where)


def _is_bool(v) -> bool:
    """A bool, numpy's or a one-element bool tensor: SpikingJelly 2.0's positional spiking."""
    if isinstance(v, bool) or (type(v).__module__ == "numpy" and type(v).__name__ in ("bool",
                                                                                    "bool_")):
        return True
    return isinstance(v, torch.Tensor) and v.dtype == torch.bool and v.numel() == 1


def _spiking_flag(v) -> bool:
    """``spiking`` as a bool: a bool (numpy's, a one-element bool tensor), or the ints 0 / 1.
    Anything else is refused: bool('False') is True, so spiking='False' from a config file ran
    the spiking function where the primitive was asked for (SpikingJelly's keeps the string
    and does the same): the neurons' flag rule (as_flag), plus a one-element bool tensor."""
    return bool(v) if _is_bool(v) else as_flag(v, "spiking")


# How _call_static passes parameters: {(function, bound, parameter names): by_name}. Keyed by the
# plain function (a bound method's __func__), which its class holds anyway: a spiking_function
# written as an ordinary method (no @staticmethod; SpikingJelly's forward calls that too) is a
# new bound method at each access, and a key that kept the bound method kept the surrogate, and
# everything it refers to, alive for the rest of the process. (A plain dict, not a weak one:
# torch.compile traces this lookup, and a WeakKeyDictionary's fails there, "weak object has gone
# away".) The names are in the key: one function may serve a 2.0-style class (passed by name) and
# a 0.0.0.0.14-style one (alpha by position, whatever the function calls it).
_BY_NAME: dict = {}


def _passes_by_name(fn, names: tuple) -> bool:
    try:
        sig = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return True
    return (any(p.kind == p.VAR_KEYWORD for p in sig.values())
            or all(n in sig and sig[n].kind != sig[n].POSITIONAL_ONLY for n in names))


def _call_static(fn, x: torch.Tensor, params: dict):
    """fn(x, **params) where fn takes every parameter by its name (SpikingJelly 2.0 passes them
    so), else fn(x, *params.values()) (0.0.0.0.14 passed alpha by position, whatever the
    function named it: spiking_function(x, a)). Decided once per function and parameter names."""
    bound = hasattr(fn, "__func__")
    key = (fn.__func__ if bound else fn, bound, tuple(params))
    try:
        by_name = _BY_NAME.get(key)
    except TypeError:  # an unhashable callable: decided at each call
        by_name = _passes_by_name(fn, key[2])
    if by_name is None:
        by_name = _BY_NAME[key] = _passes_by_name(fn, key[2])
    return fn(x, **params) if by_name else fn(x, *params.values())


def _requires_alpha(cls) -> bool:
    """Whether cls's spiking_function or primitive_function takes an ``alpha`` without a
    default (SpikingJelly 0.0.0.0.14's spiking_function(x, alpha))."""
    for name in ("spiking_function", "primitive_function"):
        try:
            param = inspect.signature(getattr(cls, name)).parameters.get("alpha")
        except (TypeError, ValueError):
            continue
        if param is not None and param.default is inspect.Parameter.empty:
            return True
    return False


def _spikingjelly_base():
    """SpikingJelly's SurrogateFunctionBase where its surrogate module is imported, else None (no
    object of its classes can exist before it is: nothing is imported here)."""
    module = sys.modules.get("spikingjelly.activation_based.surrogate")
    base = getattr(module, "SurrogateFunctionBase", None)
    return base if isinstance(base, type) else None


def _is_own(fn) -> bool:
    """fn's class derives from pypaper's SurrogateFunctionBase itself (isinstance also answers
    True for SpikingJelly's surrogates: SurrogateFunctionBase.__subclasshook__)."""
    return SurrogateFunctionBase in type(fn).__mro__


class SurrogateFunctionBase(nn.Module, metaclass=abc.ABCMeta):
    """Theta forward with a surrogate derivative backward; subclasses set ``surrogate_id``.

    Both of SpikingJelly's constructor contracts hold, so a surrogate of the user's own written
    for either runs after the import changes (a subclass that keeps ``surrogate_id = -1`` runs in
    the neurons through the plain-PyTorch loop, which calls it):

    - SpikingJelly 2.0: ``__init__(spiking=True, **params)``; each keyword is a parameter, kept
      as an attribute (a Parameter is registered, so it is in the state_dict) and passed by name
      to the static ``spiking_function(x, **params)`` / ``primitive_function(x, **params)``;
    - SpikingJelly 0.0.0.0.14: ``__init__(alpha, spiking=True)`` and ``spiking_function(x,
      alpha)``, alpha passed by position whatever the function names it.

    A lone positional argument is spiking where it is a bool or comes with keyword parameters
    (2.0's ``super().__init__(spiking, alpha=alpha)``), else alpha; two are (alpha, spiking).

    The built-in surrogates (ATan, Sigmoid, ...) take ``alpha`` (their default when omitted):
    a positive finite number or a one-element tensor, read at each call (alpha_value)."""

    surrogate_id: int = -1
    default_alpha: float = 1.0

    @classmethod
    def __subclasshook__(cls, subclass):
        # isinstance(m, surrogate.SurrogateFunctionBase) holds for SpikingJelly's surrogates too,
        # as it does with SpikingJelly's import: pypaper's surrogate module hands out its classes
        # (S2NN, LeakyKReLU, ... forwarded) and convert() keeps its ATan objects, and code that
        # finds a model's surrogates this way (to anneal alpha, set_spiking_mode, or keep them
        # whole as pack_conv_bn_train_modules's fx tracer does: traced into, SpikingJelly's
        # spiking function left the heaviside without its surrogate gradient, and the layers
        # before it got none) skipped them. Only this base class: SpikingJelly's ATan is not a
        # pypaper ATan (its alpha, its spiking_function are SpikingJelly's).
        if cls is SurrogateFunctionBase:
            base = _spikingjelly_base()
            if base is not None and isinstance(subclass, type) and issubclass(subclass, base):
                return True
        return NotImplemented

    def __init__(self, *args, **params):
        super().__init__()
        if len(args) == 1 and (_is_bool(args[0]) or (params and "spiking" not in params)):
            # 2.0: (spiking, **params); 0.0.0.0.14 passed alpha alone or with spiking
            if "spiking" in params:
                raise TypeError(f"{type(self).__name__}: spiking given by position and by keyword")
            spiking = args[0]
        elif 1 <= len(args) <= 2:  # 0.0.0.0.14: (alpha, spiking=True)
            spiking = params.pop("spiking", True)
            if "alpha" in params:
                raise TypeError(f"{type(self).__name__}: alpha given by position and by keyword")
            params = {"alpha": args[0], **params}
            if len(args) == 2:
                spiking = args[1]
        elif not args:
            spiking = params.pop("spiking", True)
        else:
            raise TypeError(f"{type(self).__name__}: SurrogateFunctionBase takes (spiking=True, "
                            f"**params) or (alpha, spiking=True), got {len(args)} positional "
                            f"arguments")
        if ("alpha" in params and params["alpha"] is None) or (
                "alpha" not in params and (self.surrogate_id >= 0 or _requires_alpha(type(self)))):
            params["alpha"] = self.default_alpha  # also a 0.0.0.0.14-style subclass without one
        if self.surrogate_id >= 0:
            # checked now; a tensor is read again at each call. A meta tensor (built under
            # torch.device('meta'), to be materialised later) holds no value: its shape and
            # dtype are checked, its value when a call reads it
            alpha = params["alpha"]
            if _is_meta(alpha):
                _check_alpha_tensor(alpha, "alpha")
            else:
                alpha_value(alpha)
        self.spiking = _spiking_flag(spiking)
        self._sg_param_names = tuple(params)
        for name, value in params.items():
            setattr(self, name, value)

    def __setattr__(self, name: str, value) -> None:
        if name == "alpha" and self.surrogate_id >= 0:  # a built-in's alpha: a numpy scalar
            value = plain_number(value)                # as a float (torch.compile refused it)
        super().__setattr__(name, value)

    @property
    def _sg_params(self) -> dict:
        """The parameters passed to spiking_function / primitive_function (SpikingJelly 2.0).
        A surrogate pickled before pypaper kept their names had alpha alone."""
        names = self.__dict__.get("_sg_param_names", ("alpha",))
        return {name: getattr(self, name) for name in names}

    def set_spiking_mode(self, spiking: bool) -> None:
        self.spiking = _spiking_flag(spiking)

    def extra_repr(self) -> str:
        parts = [f"{name}={value}" for name, value in self._sg_params.items()]
        return ", ".join(parts + [f"spiking={self.spiking}"])

    def derivative(self, x: torch.Tensor) -> torch.Tensor:
        """sigma'(x) (pypaper's built-in surrogates)."""
        if self.surrogate_id < 0:
            raise NotImplementedError(f"{type(self).__name__} is not one of pypaper's surrogates: "
                                      f"it has no built-in derivative")
        return reference.surrogate_grad(x, self.surrogate_id, alpha_for(x, self.alpha))

    @staticmethod
    def spiking_function(x: torch.Tensor, **params) -> torch.Tensor:
        """Theta(x) whose gradient is the surrogate's (SpikingJelly's static method)."""
        raise NotImplementedError("a surrogate of your own must define the static method "
                                  "spiking_function(x, **params) (e.g. (x, alpha)), as in "
                                  "SpikingJelly")

    @staticmethod
    def primitive_function(x: torch.Tensor, **params) -> torch.Tensor:
        """sigma(x) (SpikingJelly's static method; used when spiking=False)."""
        raise NotImplementedError("a surrogate of your own must define the static method "
                                  "primitive_function(x, **params) to run with spiking=False")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fn = self.spiking_function if self.spiking else self.primitive_function
        return _call_static(fn, x, self._sg_params)


def _make(name: str, alpha: float, doc: str):
    sid = SURROGATE_IDS[name]

    def spiking_function(x: torch.Tensor, alpha) -> torch.Tensor:
        return reference.spike(x, sid, alpha_for(x, alpha))

    def primitive_function(x: torch.Tensor, alpha) -> torch.Tensor:
        return reference.surrogate_primitive(x, sid, alpha)

    def backward(grad_output: torch.Tensor, x: torch.Tensor, alpha) -> torch.Tensor:
        """grad_output * sigma'(x) (SpikingJelly's static backward)."""
        return grad_output * reference.surrogate_grad(x, sid, alpha_for(x, alpha))

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


def check_surrogate_function(fn) -> None:
    """Refuse a class given as ``surrogate_function`` (``neuron.LIFNode(surrogate_function=
    surrogate.ATan)``, the parentheses forgotten). A surrogate is called on H - V_threshold
    for every step; calling a class constructs an object instead: the loop then built
    ``ATan(alpha=<the membrane tensor>)`` and raised "alpha must be a positive finite number
    ... got a float32 tensor of shape (2, 3)" (SpikingJelly's own neurons fail at the next
    arithmetic, "unsupported operand type(s) for *: 'ATan' and 'float'"), neither naming the
    mistake. No class is a surrogate (an autograd.Function is given as ``MyFn.apply``)."""
    if isinstance(fn, type):
        raise TypeError(
            f"surrogate_function must be a surrogate object such as surrogate.ATan() (or a "
            f"function of the membrane minus the threshold), got the class {fn.__name__} "
            f"itself: construct it, surrogate_function={fn.__name__}()")


def surrogate_spec(fn) -> Optional[tuple[int, float]]:
    """(surrogate_id, alpha) when the kernels can run ``fn``'s derivative, else None.

    Accepts pypaper's surrogates and SpikingJelly's of the same names (so a model keeps its
    ``spikingjelly...surrogate.ATan()`` objects after switching the neuron import); anything else
    (a custom callable, spiking=False) runs the plain-PyTorch loop calling ``fn``. A tensor alpha
    is read at the call (alpha_value).
    """
    if fn is None:
        return SURROGATE_IDS["Sigmoid"], 4.0
    check_surrogate_function(fn)
    if _is_own(fn):
        # a subclass of the user's own (surrogate_id -1) runs its spiking_function in Python
        # (also a subclass of a built-in that overrides spiking_function)
        # (and a subclass that overrides forward, which the kernels would never call)
        # (and a meta alpha, which the kernels cannot read: the loop's call of fn computes
        # with it on meta inputs, and says to materialise it on others)
        own = getattr(type(fn).spiking_function, "_pypaper_surrogate_id", None)
        ok = (fn.spiking and fn.surrogate_id >= 0 and own == fn.surrogate_id
              and type(fn).forward is SurrogateFunctionBase.forward and not _is_meta(fn.alpha))
        return (fn.surrogate_id, alpha_operand(fn.alpha, f"{type(fn).__name__}'s alpha")) if ok \
            else None
    cls = type(fn)
    if cls.__module__.startswith("spikingjelly") and cls.__name__ in SURROGATE_IDS:
        if getattr(fn, "spiking", True):
            try:
                return SURROGATE_IDS[cls.__name__], alpha_operand(getattr(fn, "alpha", None))
            except ValueError:
                pass  # not a value the kernels take (or a meta one): the loop calls fn itself
    return None


_OWN_NAMES = ["ATan", "Erf", "PiecewiseExp", "PiecewiseQuadratic", "Rect", "Sigmoid", "SoftSign",
              "SuperSpike", "SurrogateFunctionBase", "alpha_for", "alpha_operand", "alpha_value",
              "check_surrogate_function", "heaviside", "surrogate_spec"]


# Names this module lacks come from SpikingJelly (pypaper/snn/spikingjelly_fallback.py).
# __all__ too: pypaper's names, then SpikingJelly's (a star import gets both).
__getattr__ = spikingjelly_fallback.forwarder(__name__, "surrogate", _OWN_NAMES)
