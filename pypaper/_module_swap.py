"""Swapping one module of a built model for another in place: the hooks go with it.

A converter (pypaper.wtacrs.convert, pypaper.snn.convert) replaces a layer under its parent's
attribute. Whoever registered a module hook on the old layer (a monitor, a profiler, a
state_dict hook of a training framework) expects it to keep firing on the layer that now runs
in its place, and the handle torch gave them to keep removing it: ``share_hooks`` hands the new
layer the old one's hook dictionaries themselves. ``copy_hooks`` (for a constructor such as
``WTACRSLinear.from_linear``, after which both layers live on) gives it copies.

torch's hook-based weight reparametrizations are the exception: ``torch.nn.utils.prune``
(weight = weight_orig * weight_mask), the deprecated ``torch.nn.utils.weight_norm`` (weight =
g v / ||v||) and ``torch.nn.utils.spectral_norm`` (weight = weight_orig / sigma) recompute the
layer's weight from the layer's own tensors in a forward pre-hook (spectral_norm adds state_dict
hooks). A layer swapped in for it (a quantized linear) has none of those tensors: the hook raised
AttributeError at the model's first forward, after the swap. They stay with the old layer only;
the converter builds the new one from their current value (``current_value``).

``parametrized_modules(model)``: the modules inside ``torch.nn.utils.parametrize``
parametrizations (``layer.parametrizations.weight[0]``, ...). They transform a weight, not the
model's activations: a converter of layers must not swap them (a few-bit Tanh inside a tanh
weight parametrization trained the weight with an approximate derivative).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.module import _WrappedHook
from torch.nn.utils import parametrize
from torch.nn.utils.prune import BasePruningMethod
from torch.nn.utils.spectral_norm import (SpectralNorm, SpectralNormLoadStateDictPreHook,
                                          SpectralNormStateDictHook)
from torch.nn.utils.weight_norm import WeightNorm

# nn.Module's per-module hook dictionaries (torch 2.x)
HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
              "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
              "_backward_pre_hooks", "_state_dict_hooks", "_state_dict_pre_hooks",
              "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


_REPARAM_HOOKS = (BasePruningMethod, WeightNorm, SpectralNorm, SpectralNormStateDictHook,
                  SpectralNormLoadStateDictPreHook)


def is_weight_reparam_hook(hook) -> bool:
    """Whether a module hook belongs to torch's hook-based weight reparametrization (prune,
    weight_norm, spectral_norm): it reads and writes tensors of the module it was applied to."""
    if isinstance(hook, _WrappedHook):
        hook = hook.hook
    return isinstance(hook, _REPARAM_HOOKS)


def reparam_pre_hooks(module: nn.Module) -> dict:
    """{tensor name: forward pre-hook} of the hook-based reparametrizations on ``module``
    (``{"weight": L1Unstructured}`` for a pruned weight, ...)."""
    out = {}
    for hook in getattr(module, "_forward_pre_hooks", {}).values():
        if isinstance(hook, BasePruningMethod):
            out[hook._tensor_name] = hook
        elif isinstance(hook, (WeightNorm, SpectralNorm)):
            out[hook.name] = hook
    return out


def current_value(module: nn.Module, name: str) -> torch.Tensor:
    """``module.<name>`` as the module's next forward computes it.

    A parametrized tensor is computed by its property. A hook-based one is recomputed here: the
    attribute ``module.weight`` of a pruned (or hook weight_norm) layer is only written by the
    forward pre-hook, so after an optimizer step on weight_orig (weight_v) and before the next
    forward it still holds the old weight. spectral_norm's estimate of sigma is taken as it is
    (no power iteration: the eval-mode forward's weight; this leaves its u, v untouched)."""
    hook = reparam_pre_hooks(module).get(name)
    if hook is None:
        return getattr(module, name)
    if isinstance(hook, BasePruningMethod):
        return hook.apply_mask(module)  # weight_orig * weight_mask
    if isinstance(hook, SpectralNorm):
        return hook.compute_weight(module, do_power_iteration=False)
    return hook.compute_weight(module)  # weight_norm: g * v / ||v||


def run_reparam_hooks(module: nn.Module) -> None:
    """Run ``module``'s forward pre-hooks of torch's hook-based weight reparametrizations
    (prune: weight = weight_orig * mask; the deprecated weight_norm: g v / ||v||; spectral_norm:
    W / sigma, with its power iteration in training), as a call of the module would. For a layer
    whose weight is read without calling it (a fused op taking ``layer.weight``): otherwise the
    attribute keeps the tensor the last call (or the reparametrization itself) computed - stale
    after an optimizer step on weight_orig / weight_g ... - and its graph, freed by the first
    backward, makes the second one raise "Trying to backward through the graph a second time".
    (A torch.nn.utils.parametrize parametrization needs nothing: its property recomputes on
    access.)"""
    for hook in list(module._forward_pre_hooks.values()):
        if is_weight_reparam_hook(hook):
            hook(module, ())


def has_computed_tensors(module: nn.Module) -> bool:
    """Whether a tensor of ``module`` (its weight, its bias) is computed from others on access or
    in a forward pre-hook, rather than held as a Parameter."""
    return parametrize.is_parametrized(module) or bool(reparam_pre_hooks(module))


def computed_tensor_names(module: nn.Module) -> list:
    """The names of ``module``'s computed tensors (parametrized, or written by a pre-hook)."""
    names = list(module.parametrizations.keys()) if parametrize.is_parametrized(module) else []
    return names + [n for n in reparam_pre_hooks(module) if n not in names]


def describe_reparam(module: nn.Module) -> str:
    """'weight: parametrized by _WeightNorm; bias: torch.nn.utils.prune.L1Unstructured (forward
    pre-hook)', for messages."""
    parts = []
    if parametrize.is_parametrized(module):
        for name, plist in module.parametrizations.items():
            parts.append(f"{name}: parametrized by "
                         + ", ".join(type(p).__name__ for p in plist))
    for name, hook in reparam_pre_hooks(module).items():
        parts.append(f"{name}: {type(hook).__module__}.{type(hook).__name__} (forward pre-hook)")
    return "; ".join(parts)


def parametrized_modules(model: nn.Module) -> set:
    """ids of the modules inside parametrizations of ``model``'s modules (the
    ``parametrizations`` ModuleDicts, their ParametrizationLists, the parametrizations and
    everything under them)."""
    inside = set()
    for m in model.modules():
        if parametrize.is_parametrized(m):
            inside.update(id(x) for x in m.parametrizations.modules())
    return inside


def copy_hooks(src: nn.Module, dst: nn.Module) -> None:
    """dst gets copies of src's module hooks (forward, backward, state_dict, load_state_dict), so
    a layer swapped in place behaves as the one it replaces for whoever hooked it. Handles given
    out for src keep removing from src only."""
    for name in HOOK_DICTS:
        if hasattr(src, name):
            setattr(dst, name, type(getattr(src, name))(
                (k, h) for k, h in getattr(src, name).items() if not is_weight_reparam_hook(h)))
    if getattr(src, "_is_full_backward_hook", None) is not None:
        dst._is_full_backward_hook = src._is_full_backward_hook


def share_hooks(src: nn.Module, dst: nn.Module) -> None:
    """dst takes src's hook dictionaries themselves, for a swap in place: a hook registered on
    either before or after the swap runs on whichever is in the model, and its handle (which
    holds the dictionary) removes it. load_state_dict pre-hooks registered with their module
    (``register_load_state_dict_pre_hook``: torch keeps a weak reference to the module and
    passes it to the hook) are pointed at dst, which now loads in src's place.

    The hooks of torch's hook-based reparametrizations (prune, weight_norm, spectral_norm: they
    compute src's weight from src's weight_orig / weight_g ..., which dst does not have) are not
    shared: src keeps every hook in dicts of its own (so src, out of the model, still runs as
    before, and prune.remove / remove_weight_norm still work on it), and dst takes the shared
    dicts without those hooks. A handle of another hook given out before the swap then removes
    it from dst only, not from src's copy."""
    # With a reparametrization hook anywhere, src keeps a copy of EVERY hook dict, not only of
    # the one holding it: a hook's entries are spread over companion dicts (_forward_pre_hooks
    # and _forward_pre_hooks_with_kwargs, ...), and a handle removing a kwargs hook from the
    # shared dicts took its flag away from src's copy of the hook, so src then called it without
    # its kwargs (TypeError)
    split = any(is_weight_reparam_hook(h) for name in HOOK_DICTS
                for h in getattr(src, name, {}).values())
    for name in HOOK_DICTS:
        if not hasattr(src, name):
            continue
        hooks = getattr(src, name)
        if split:
            setattr(src, name, type(hooks)(hooks))
            for k in [k for k, h in hooks.items() if is_weight_reparam_hook(h)]:
                del hooks[k]
        if name == "_load_state_dict_pre_hooks":
            for key, hook in list(hooks.items()):
                if isinstance(hook, _WrappedHook) and hook.with_module:
                    hooks[key] = _WrappedHook(hook.hook, dst)
        setattr(dst, name, hooks)
    if getattr(src, "_is_full_backward_hook", None) is not None:
        dst._is_full_backward_hook = src._is_full_backward_hook


def float_stand_in(linear: nn.Module, device=None) -> nn.Module:
    """The module a converter reads in place of ``linear`` (a Linear that quantize_ quantizes and
    HAWQ probes, a convolution conv_bn_fusion folds): ``linear`` itself when its weight and bias
    are plain Parameters and no device is asked for; else a shallow stand-in whose
    Parameters are new tensor objects (on ``device`` when given) holding the values the layer's
    next forward would use. The original module, its Parameters and its parametrizations are
    not changed.

    * A parametrized weight (torch.nn.utils.parametrizations.weight_norm / spectral_norm /
      orthogonal, a user's parametrization) is its current value W = f(original). parametrize
      gives the module a class of its own (ParametrizedLinear, a subclass of its class) whose
      ``weight`` property reads ``parametrizations``: the stand-in takes the module's own class
      back and plain Parameters (its ``parametrizations`` are left out, so the stand-in cannot
      reach, or write through, the ones the model's module holds). A plain copy of the module
      kept reading the original's tensors (``device=`` quantized them where they were).
    * A pruned weight (torch.nn.utils.prune) is weight_orig * weight_mask, computed now: the
      attribute ``weight`` is only refreshed by the forward pre-hook, so after an optimizer step
      it is stale. The hook-based weight_norm / spectral_norm likewise (current_value).
    """
    if device is None and not has_computed_tensors(linear):
        return linear
    parametrized = parametrize.is_parametrized(linear)
    move = (lambda t: t) if device is None else (lambda t: t.to(device))
    # a shallow copy made by hand (a parametrized module refuses copy.copy, which pickles): a
    # new __dict__, the tensors and submodules shared until replaced below
    cls = type(linear).__bases__[0] if parametrized else type(linear)
    src = cls.__new__(cls)
    src.__dict__.update(linear.__dict__)
    for name in HOOK_DICTS:  # hooks a config might register on src do not reach linear
        if name in src.__dict__:
            src.__dict__[name] = type(src.__dict__[name])(src.__dict__[name])
    params = {k: None if p is None else nn.Parameter(move(p.detach()),
                                                     requires_grad=p.requires_grad)
              for k, p in linear._parameters.items()}
    for name in computed_tensor_names(linear):
        t = current_value(linear, name)
        params[name] = nn.Parameter(move(t.detach()), requires_grad=t.requires_grad)
        src.__dict__.pop(name, None)  # prune's plain attribute would shadow the Parameter
    src._parameters = params
    src._buffers = {k: None if b is None else move(b) for k, b in linear._buffers.items()}
    src._modules = {k: m for k, m in linear._modules.items()
                    if not (parametrized and k == "parametrizations")}
    for k in [k for k, h in src._forward_pre_hooks.items() if is_weight_reparam_hook(h)]:
        del src._forward_pre_hooks[k]
    return src
