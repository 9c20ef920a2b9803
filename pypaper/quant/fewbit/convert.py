"""Swap the activations of a built model for few-bit ones, in place; and back.

    convert(model, bits=2, filter_fn=None) -> model
    revert(model) -> model

Swapped: torch.nn's GELU, SiLU, Mish, ELU, SELU, Softplus, Sigmoid, Tanh, LogSigmoid, Hardswish,
ReLU, LeakyReLU, ReLU6, Hardtanh, Hardsigmoid modules; HuggingFace transformers' activation
modules whose forward is one of those torch functions (GELUActivation, GELUTanh /
PytorchGELUTanh, SiLUActivation, MishActivation, ...); and module attributes holding the torch
functions themselves (e.g. ``self.act_fn = F.gelu`` in older model code). Activations written
out by hand (e.g. HF's NewGELUActivation, a tanh formula that torch's gelu(approximate="tanh")
matches only to rounding) are left alone, so the forward of a converted model is unchanged bit
for bit. ``filter_fn(module, fully_qualified_name) -> bool`` restricts the swap (torchao style).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import modules as M

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
        return M.GELU("tanh", bits=bits)
    if name == "SiLUActivation":
        return M.SiLU(bits=bits)
    if name == "MishActivation":
        return M.Mish(bits=bits) if getattr(m, "act", None) is F.mish else None
    return None


def _from_function(fn, bits: int) -> Optional[nn.Module]:
    """The few-bit module of a torch activation function held as an attribute, or None."""
    table = {
        F.gelu: lambda: M.GELU(bits=bits), F.silu: lambda: M.SiLU(bits=bits),
        F.mish: lambda: M.Mish(bits=bits), F.elu: lambda: M.ELU(bits=bits),
        F.selu: lambda: M.SELU(bits=bits), F.softplus: lambda: M.Softplus(bits=bits),
        torch.sigmoid: lambda: M.Sigmoid(bits=bits), F.sigmoid: lambda: M.Sigmoid(bits=bits),
        torch.tanh: lambda: M.Tanh(bits=bits), F.tanh: lambda: M.Tanh(bits=bits),
        F.logsigmoid: lambda: M.LogSigmoid(bits=bits), F.hardswish: lambda: M.Hardswish(bits=bits),
        F.relu: M.ReLU, torch.relu: M.ReLU, F.relu6: M.ReLU6, F.hardsigmoid: M.Hardsigmoid,
        F.leaky_relu: M.LeakyReLU, F.hardtanh: M.Hardtanh,
    }
    try:
        make = table.get(fn)
    except TypeError:  # unhashable attribute
        return None
    return make() if make is not None else None


def _check_bits(bits) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 4:
        raise ValueError(f"bits must be an int in 1..4, got {bits!r}")


def convert(model: nn.Module, bits: int = 2,
            filter_fn: Optional[Callable[[nn.Module, str], bool]] = None) -> nn.Module:
    """Replace model's activations with few-bit ones in place (see the module docstring);
    returns model. The state_dict is unchanged: activations have no parameters."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _check_bits(bits)
    if isinstance(model, M.FewBitActivation):
        raise ValueError("model is itself a few-bit activation; convert its parent")
    replaced = set()  # modules swapped out: left untouched, so that revert restores them as they were
    for parent_name, parent in list(model.named_modules()):
        if isinstance(parent, M.FewBitActivation) or id(parent) in replaced:
            continue
        prefix = parent_name + "." if parent_name else ""
        for attr, child in list(parent._modules.items()):
            if child is None or (filter_fn is not None and not filter_fn(child, prefix + attr)):
                continue
            new = _from_module(child, bits)
            if new is not None:
                object.__setattr__(new, _ORIGINAL, child)
                replaced.update(id(m) for m in child.modules())
                setattr(parent, attr, new)
        for attr, value in list(vars(parent).items()):
            if attr.startswith("_") or not callable(value) or isinstance(value, nn.Module):
                continue
            if filter_fn is not None and not filter_fn(parent, prefix + attr):
                continue
            new = _from_function(value, bits)
            if new is not None:
                object.__setattr__(new, _ORIGINAL, value)
                object.__delattr__(parent, attr)
                setattr(parent, attr, new)
    return model


def revert(model: nn.Module) -> nn.Module:
    """Undo ``convert``: put the original activation modules and functions back."""
    for _, parent in list(model.named_modules()):
        for attr, child in list(parent._modules.items()):
            original = getattr(child, _ORIGINAL, None) if child is not None else None
            if original is None:
                continue
            if isinstance(original, nn.Module):
                setattr(parent, attr, original)
            else:
                del parent._modules[attr]
                object.__setattr__(parent, attr, original)
    return model
