"""Swap the linear layers of a built model for WTACRSLinear, in place; and back.

    convert(model, keep_ratio=0.3, filter_fn=None, **options) -> model
    revert(model) -> model

Every module of type exactly torch.nn.Linear (HuggingFace transformers' models use it too) is
replaced by a WTACRSLinear sharing its Parameter objects, so the state_dict, optimizers and tied
weights are unchanged and the model keeps loading into (and from) its unconverted twin. Subclasses
of nn.Linear are left alone (e.g. nn.MultiheadAttention's out_proj, whose weight is read
directly). ``filter_fn(module, fully_qualified_name) -> bool`` restricts the swap.

Shared samples (``share_inputs=True``): sibling linears of one parent with the same in_features
(an attention block's query, key and value) get one SampleGroup. When they are called on the same
tensor, they keep one sample of it for their three backwards instead of three (the rows are chosen
by ||x_t|| times the root of their summed gradient norms); called on different tensors, each
samples its own.
"""
from __future__ import annotations

from typing import Callable, Optional

from torch import nn

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
    check_config(keep_ratio, min_k, estimator, store_dtype)
    if type(model) is nn.Linear:
        raise ValueError("model is itself an nn.Linear; use WTACRSLinear.from_linear(model)")
    for parent_name, parent in list(model.named_modules()):
        if isinstance(parent, WTACRSLinear):
            continue
        prefix = parent_name + "." if parent_name else ""
        siblings: dict = {}
        for attr, child in list(parent._modules.items()):
            if type(child) is not nn.Linear:
                continue
            if filter_fn is not None and not filter_fn(child, prefix + attr):
                continue
            new = WTACRSLinear.from_linear(child, keep_ratio, min_k, estimator, generator,
                                           store_dtype=store_dtype,
                                           grad_norm_device=grad_norm_device)
            object.__setattr__(new, _ORIGINAL, child)
            setattr(parent, attr, new)
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
    for _, parent in list(model.named_modules()):
        for attr, child in list(parent._modules.items()):
            original = getattr(child, _ORIGINAL, None) if child is not None else None
            if original is not None:
                original.train(child.training)
                setattr(parent, attr, original)
    return model
