"""Swap the linear layers of a built model for WTACRSLinear, in place; and back.

    convert(model, keep_ratio=0.3, filter_fn=None, **options) -> model
    revert(model) -> model

Every module of type exactly torch.nn.Linear (HuggingFace transformers' models use it too) is
replaced by a WTACRSLinear sharing its Parameter objects, so the state_dict, optimizers and tied
weights are unchanged and the model keeps loading into (and from) its unconverted twin. Subclasses
of nn.Linear are left alone (e.g. nn.MultiheadAttention's out_proj, whose weight is read
directly), and so are Linears whose weight is computed rather than a Parameter (pruning,
parametrizations: a warning says so). ``filter_fn(module, fully_qualified_name) -> bool``
restricts the swap. One Linear under two names becomes one WTACRSLinear under both; its module
hooks are shared (the same dictionaries, so a handle given out before keeps removing them; also
back by ``revert``, which takes the converted layer's current Parameters); converting a
converted model again sets the new options on its layers.

Shared samples (``share_inputs=True``): sibling linears of one parent with the same in_features
(an attention block's query, key and value) get one SampleGroup. When they are called on the same
tensor, they keep one sample of it for their three backwards instead of three (the rows are chosen
by ||x_t|| times the root of their summed gradient norms); called on different tensors, each
samples its own.
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional

from torch import nn
from torch.nn.utils import parametrize

from .._module_swap import has_computed_tensors, parametrized_modules, share_hooks
from .modules import SampleGroup, WTACRSLinear, check_config

_ORIGINAL = "_wtacrs_original"


def convert(model: nn.Module, keep_ratio: float = 0.3,
            filter_fn: Optional[Callable[[nn.Module, str], bool]] = None, *, min_k: int = 32,
            estimator: str = "wta-crs", generator=None, store_dtype=None,
            grad_norm_device=None, share_inputs: bool = True) -> nn.Module:
    """Replace model's nn.Linear layers with WTACRSLinear in place; returns model.
    The options are WTACRSLinear's (keep_ratio, min_k, estimator, generator, store_dtype,
    grad_norm_device)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    keep_ratio, min_k = check_config(keep_ratio, min_k, estimator, store_dtype)
    if type(model) is nn.Linear:
        raise ValueError("model is itself an nn.Linear; use WTACRSLinear.from_linear(model)")
    done: dict = {}  # id(original) -> its WTACRSLinear: a module under two names stays one
    created: set = set()  # ids of the layers made by this call
    stream = 0
    # a Linear inside a parametrization computes a weight, not a layer of the model
    inside = parametrized_modules(model)
    for parent_name, parent in list(model.named_modules()):
        if isinstance(parent, WTACRSLinear) or id(parent) in inside:
            continue
        prefix = parent_name + "." if parent_name else ""
        siblings: dict = {}
        for attr, child in list(parent._modules.items()):
            if isinstance(child, WTACRSLinear) and id(child) not in created:
                # converted before: convert again sets the new options (no silent keep)
                if filter_fn is None or filter_fn(child, prefix + attr):
                    child.keep_ratio, child.min_k = keep_ratio, min_k
                    child.estimator, child.generator = estimator, generator
                    child.store_dtype = store_dtype
                continue
            # parametrize gives a parametrized nn.Linear a class of its own (ParametrizedLinear,
            # an nn.Linear subclass): it is an nn.Linear for this purpose, and gets the warning
            plain_cls = type(child).__bases__[0] if parametrize.is_parametrized(child) \
                else type(child)
            if plain_cls is not nn.Linear:
                continue
            if filter_fn is not None and not filter_fn(child, prefix + attr):
                continue
            if id(child) in done:
                setattr(parent, attr, done[id(child)])
                continue
            if has_computed_tensors(child) or "weight" not in child._parameters:
                # torch.nn.utils.prune / parametrize / weight_norm compute .weight from other
                # tensors on every call: sharing it as a Parameter would freeze one value
                warnings.warn(f"wtacrs.convert: {prefix + attr} is left as nn.Linear: its weight "
                              f"is computed (pruning or a parametrization), not a Parameter")
                continue
            new = WTACRSLinear.from_linear(child, keep_ratio, min_k, estimator, generator,
                                           store_dtype=store_dtype,
                                           grad_norm_device=grad_norm_device)
            share_hooks(child, new)  # the same hook dicts: handles given out keep removing
            new._stream = stream
            stream += 1
            object.__setattr__(new, _ORIGINAL, child)
            setattr(parent, attr, new)
            done[id(child)] = new
            created.add(id(new))
            siblings.setdefault(child.in_features, []).append(new)
        if share_inputs:
            for group in siblings.values():
                if len(group) > 1:
                    shared = SampleGroup(grad_norm_device)
                    for layer in group:
                        layer.sample_group = shared
    return model


def revert(model: nn.Module) -> nn.Module:
    """Undo ``convert``: put the original nn.Linear modules back (they hold the same, trained,
    Parameters)."""
    for parent in list(model.modules()):  # each parent once (not once per path to it)
        for attr, child in list(parent._modules.items()):
            original = getattr(child, _ORIGINAL, None) if child is not None else None
            if original is not None:
                original.train(child.training)
                # the converted layer's Parameters and hooks are the live ones (a
                # load_state_dict(assign=True) or a new weight may have replaced them)
                original.weight = child.weight
                original.bias = child.bias
                share_hooks(child, original)
                setattr(parent, attr, original)
    return model
