"""Swap the activations of a built model for few-bit ones, in place; and back.

    convert(model, bits=2, filter_fn=None) -> model
    revert(model) -> model

Swapped: torch.nn's GELU, SiLU, Mish, ELU, SELU, Softplus, Sigmoid, Tanh, LogSigmoid, Hardswish,
ReLU, LeakyReLU, ReLU6, Hardtanh, Hardsigmoid modules; HuggingFace transformers' activation
modules whose forward is one of those torch functions (GELUActivation and GELUTanh /
PytorchGELUTanh when their ``act`` is F.gelu, SiLUActivation, MishActivation, ...); and module
attributes holding the torch functions themselves (e.g. ``self.act_fn = F.gelu`` in older model
code), replaced by a FunctionActivation that takes the function's own arguments: calls with
arguments the few-bit activation implements (``approximate='tanh'``, ``negative_slope=0.2``,
``alpha=``, ``inplace=False``, ... by keyword or position) use it, any other call
(``inplace=True``, ``out=``, a non-float tensor, an unknown argument) runs the original function.
Activations written out by hand (HF's NewGELUActivation / "gelu_new", "gelu_fast", "quick_gelu",
GELUTanh(use_gelu_tanh_python=True), ...: formulas that torch's functions match only to
rounding) are left alone, so the forward of a converted model is unchanged bit for bit; convert
warns when it finds nothing to convert. Converting a converted model again with another ``bits``
rebuilds the activations it converted before. ``filter_fn(module, fully_qualified_name) -> bool``
restricts the swap (torchao style). Modules inside torch.nn.utils.parametrize parametrizations
(weight transforms) are left alone.
"""
from __future__ import annotations

import functools
import math
import warnings
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..._module_swap import parametrized_modules, share_hooks
from . import modules as M
from . import ops, tables

_ORIGINAL = "_fewbit_original"


def _from_module(m: nn.Module, bits: int) -> Optional[nn.Module]:
    """The few-bit twin of activation module m, or None."""
    if isinstance(m, M.FewBitActivation):
        return None
    t = type(m)
    if t is nn.GELU:
        return M.GELU(m.approximate, bits=bits)
    if t is nn.SiLU:
        return M.SiLU(bits=bits)
    if t is nn.Mish:
        return M.Mish(bits=bits)
    if t is nn.ELU:
        return M.ELU(m.alpha, bits=bits)
    if t is nn.SELU:
        return M.SELU(bits=bits)
    if t is nn.Softplus:
        return M.Softplus(m.beta, m.threshold, bits=bits)
    if t is nn.Sigmoid:
        return M.Sigmoid(bits=bits)
    if t is nn.Tanh:
        return M.Tanh(bits=bits)
    if t is nn.LogSigmoid:
        return M.LogSigmoid(bits=bits)
    if t is nn.Hardswish:
        return M.Hardswish(bits=bits)
    if t is nn.ReLU:
        return M.ReLU()
    if t is nn.LeakyReLU:
        return M.LeakyReLU(m.negative_slope)
    if t is nn.ReLU6:
        return M.ReLU6()
    if t is nn.Hardtanh:
        return M.Hardtanh(m.min_val, m.max_val)
    if t is nn.Hardsigmoid:
        return M.Hardsigmoid()
    return _from_hf_module(m, bits)


def _from_hf_module(m: nn.Module, bits: int) -> Optional[nn.Module]:
    """HuggingFace transformers' activation classes (transformers/activations.py), recognised by
    module and class name so that transformers need not be imported."""
    if not type(m).__module__.startswith("transformers."):
        return None
    name = type(m).__name__
    if name == "GELUActivation":
        # its .act is F.gelu unless it was built with use_gelu_python (a hand-written erf form)
        return M.GELU(bits=bits) if getattr(m, "act", None) is F.gelu else None
    if name in ("GELUTanh", "PytorchGELUTanh"):
        # .act is functools.partial(F.gelu, approximate="tanh") unless built with
        # use_gelu_tanh_python (a hand-written tanh formula); versions without .act call
        # F.gelu(x, approximate="tanh") in forward
        act = getattr(m, "act", _MISSING)
        if act is _MISSING or _is_gelu_tanh(act):
            return M.GELU("tanh", bits=bits)
        return None
    if name == "SiLUActivation":
        return M.SiLU(bits=bits)
    if name == "MishActivation":
        return M.Mish(bits=bits) if getattr(m, "act", None) is F.mish else None
    return None


_MISSING = object()


def _is_gelu_tanh(act) -> bool:
    return (isinstance(act, functools.partial) and act.func is F.gelu and not act.args
            and act.keywords == {"approximate": "tanh"})


# ---- torch functions held as attributes --------------------------------------------------------

# The arguments after the input of each torch activation function: (name, default, positional).
_KW, _POS = False, True
_INPLACE = ("inplace", False, _POS)
_SIGNATURES = {
    F.gelu: ("gelu", (("approximate", "none", _KW),)),
    F.silu: ("silu", (_INPLACE,)),
    F.mish: ("mish", (_INPLACE,)),
    F.elu: ("elu", (("alpha", 1.0, _POS), _INPLACE)),
    F.selu: ("selu", (_INPLACE,)),
    F.softplus: ("softplus", (("beta", 1.0, _POS), ("threshold", 20.0, _POS))),
    torch.sigmoid: ("sigmoid", ()), F.sigmoid: ("sigmoid", ()),
    torch.tanh: ("tanh", ()), F.tanh: ("tanh", ()),
    F.logsigmoid: ("logsigmoid", ()),
    F.hardswish: ("hardswish", (_INPLACE,)),
    F.relu: ("relu", (_INPLACE,)), torch.relu: ("relu", ()),
    F.relu6: ("relu6", (_INPLACE,)),
    F.hardsigmoid: ("hardsigmoid", (_INPLACE,)),
    F.leaky_relu: ("leaky_relu", (("negative_slope", 0.01, _POS), _INPLACE)),
    F.hardtanh: ("hardtanh", (("min_val", -1.0, _POS), ("max_val", 1.0, _POS), _INPLACE)),
}


def _number(v) -> Optional[float]:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def _table_key(kind: str, values: dict) -> Optional[tuple]:
    """(activation name, params) of the few-bit op for a call with these argument values, or
    None when the few-bit activation does not implement them (the original function runs)."""
    if values.get("inplace", False) is not False:
        return None  # in place: the caller may rely on x being overwritten
    if kind == "gelu":
        a = values["approximate"]
        return {"none": ("gelu", ()), "tanh": ("gelu_tanh", ())}.get(a) \
            if isinstance(a, str) else None
    if kind == "relu6":
        return "hardtanh", (0.0, 6.0)
    numbers = tuple(_number(v) for k, v in values.items() if k != "inplace")
    if any(v is None for v in numbers):
        return None
    if kind == "hardtanh" and not numbers[0] < numbers[1]:
        return None
    return kind, numbers


class FunctionActivation(M.FewBitActivation):
    """Stands in for a torch activation function held as a module attribute (``self.act =
    F.gelu``): called like that function. Arguments the few-bit activation implements (by
    keyword or position, e.g. ``approximate='tanh'``, ``negative_slope=0.2``, ``inplace=False``)
    run it (tables for non-default values are built at first use and kept); any other call runs
    the original function (``fn``), torch's own forward and backward."""

    def __init__(self, fn, bits: Optional[int] = tables.DEFAULT_BITS):
        kind, signature = _SIGNATURES[fn]
        key = _table_key(kind, {k: d for k, d, _ in signature})
        self.name = key[0]
        super().__init__(key[1], bits)
        object.__setattr__(self, "fn", fn)  # a function, not a submodule
        self.kind, self.signature = kind, signature
        self.requested_bits = tables.check_bits(bits)
        self._tables = {key: self.approximation}

    def extra_repr(self) -> str:
        name = getattr(self.fn, "__qualname__", None) or repr(self.fn)
        module = getattr(self.fn, "__module__", None) or "torch"
        return f"{module}.{name}, bits={self.requested_bits}"

    def _bind(self, args, kwargs):
        """(x, argument values) of a call, or None when it is not a plain call of the function
        with a float tensor (the original function then decides what it means)."""
        if args:
            x, rest = args[0], args[1:]
        elif "input" in kwargs:
            x, rest = kwargs["input"], ()
            kwargs = {k: v for k, v in kwargs.items() if k != "input"}
        else:
            return None
        if not isinstance(x, torch.Tensor) or x.dtype not in ops._FLOATS:
            return None
        positional = [name for name, _, pos in self.signature if pos]
        if len(rest) > len(positional):
            return None
        values = {name: default for name, default, _ in self.signature}
        values.update(zip(positional, rest))
        given = set(positional[:len(rest)])
        for k, v in kwargs.items():
            if k not in values or k in given:
                return None
            values[k] = v
        return x, values

    def forward(self, *args, **kwargs):
        bound = self._bind(args, kwargs)
        key = _table_key(self.kind, bound[1]) if bound is not None else None
        if key is None:
            return self.fn(*args, **kwargs)
        approx = self._tables.get(key)
        if approx is None:
            if torch.compiler.is_compiling():  # a table built while tracing: constants
                return ops.activation(bound[0], key[0], self.requested_bits, params=key[1])
            approx = tables.approximation(key[0], self.requested_bits, key[1])
            self._tables[key] = approx
        return ops.apply(bound[0], approx)


def _from_function(fn, bits: int) -> Optional[nn.Module]:
    """The few-bit stand-in of a torch activation function held as an attribute, or None."""
    try:
        known = fn in _SIGNATURES
    except TypeError:  # unhashable attribute
        return None
    return FunctionActivation(fn, bits) if known else None


def _check_bits(bits) -> int:
    return tables.check_bits(bits)


def _rebuilt(current: nn.Module, bits: int) -> Optional[nn.Module]:
    """A module made by an earlier convert, rebuilt from its original with ``bits`` (None when
    it already has those bits)."""
    original = getattr(current, _ORIGINAL)
    if isinstance(original, nn.Module):
        new = _from_module(original, bits)
    else:
        new = _from_function(original, bits)
    if new is None or _bits_of(new) == _bits_of(current):
        return None
    object.__setattr__(new, _ORIGINAL, original)
    return new


def _bits_of(m: nn.Module):
    return getattr(m, "requested_bits", None) or m.bits


def convert(model: nn.Module, bits: Optional[int] = tables.DEFAULT_BITS,
            filter_fn: Optional[Callable[[nn.Module, str], bool]] = None) -> nn.Module:
    """Replace model's activations with few-bit ones in place (see the module docstring);
    returns model. The state_dict is unchanged: activations have no parameters. ``bits=None``
    means the default, 2. Activations converted by an earlier call are rebuilt with ``bits``
    (revert still restores the originals). Warns when the model has no convertible
    activation."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    bits = _check_bits(bits)
    if isinstance(model, M.FewBitActivation):
        raise ValueError("model is itself a few-bit activation; convert its parent")
    replaced = set()  # modules swapped out: left untouched, so revert restores them as they were
    # the modules inside parametrizations (a tanh weight transform:
    # layer.parametrizations.weight[0].act) act on weights, not on the model's activations: a
    # few-bit backward there saves no memory (the weight is kept anyway) and trained the weight
    # with the table's approximate derivative
    inside = parametrized_modules(model)
    converted = 0  # activations converted now or by an earlier call (and kept by filter_fn)
    for parent_name, parent in list(model.named_modules()):
        if (isinstance(parent, M.FewBitActivation) or id(parent) in replaced
                or id(parent) in inside):
            continue
        prefix = parent_name + "." if parent_name else ""
        for attr, child in list(parent._modules.items()):
            if child is None:
                continue
            original = getattr(child, _ORIGINAL, None)
            if original is not None:  # converted before: rebuilt with these bits
                seen = original if isinstance(original, nn.Module) else parent
                if filter_fn is not None and not filter_fn(seen, prefix + attr):
                    continue
                converted += 1
                new = _rebuilt(child, bits)
                if new is not None:
                    share_hooks(child, new)
                    setattr(parent, attr, new.train(child.training))
                continue
            if filter_fn is not None and not filter_fn(child, prefix + attr):
                continue
            new = _from_module(child, bits)
            if new is not None:
                object.__setattr__(new, _ORIGINAL, child)
                replaced.update(id(m) for m in child.modules())
                # hooks on the activation (activation statistics, monitors) fire on its few-bit
                # twin, and their handles keep removing them (revert hands them back)
                share_hooks(child, new)
                setattr(parent, attr, new.train(child.training))  # keeps the model's eval mode
                converted += 1
        for attr, value in list(vars(parent).items()):
            if attr.startswith("_") or not callable(value) or isinstance(value, nn.Module):
                continue
            if filter_fn is not None and not filter_fn(parent, prefix + attr):
                continue
            new = _from_function(value, bits)
            if new is not None:
                object.__setattr__(new, _ORIGINAL, value)
                object.__delattr__(parent, attr)
                setattr(parent, attr, new.train(parent.training))
                converted += 1
    if converted == 0:
        warnings.warn(
            f"pypaper.quant.fewbit.convert: no activation of {type(model).__name__} was converted. "
            "Only torch's activation modules and functions (and HF modules that call them) are "
            "swapped; activations written out by hand (e.g. HF's NewGELUActivation 'gelu_new', "
            "'gelu_fast', 'quick_gelu') are left alone, so that the forward stays bit-identical.",
            UserWarning, stacklevel=2)
    return model


def revert(model: nn.Module) -> nn.Module:
    """Undo ``convert``: put the original activation modules and functions back."""
    for _, parent in list(model.named_modules()):
        for attr, child in list(parent._modules.items()):
            original = getattr(child, _ORIGINAL, None) if child is not None else None
            if original is None:
                continue
            if isinstance(original, nn.Module):
                # the original sat outside the model while it was converted (not a submodule),
                # so model.train() / .eval() since then did not reach it: it takes the mode of
                # the module it replaces, as convert gave that module the original's mode
                share_hooks(child, original)
                setattr(parent, attr, original.train(child.training))
            else:
                del parent._modules[attr]
                object.__setattr__(parent, attr, original)
    return model
