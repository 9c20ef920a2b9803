"""Swapping one module of a built model for another in place: the hooks go with it.

A converter (pypaper.wtacrs.convert, pypaper.snn.convert) replaces a layer under its parent's
attribute. Whoever registered a module hook on the old layer (a monitor, a profiler, a
state_dict hook of a training framework) expects it to keep firing on the layer that now runs
in its place, and the handle torch gave them to keep removing it: ``share_hooks`` hands the new
layer the old one's hook dictionaries themselves. ``copy_hooks`` (for a constructor such as
``WTACRSLinear.from_linear``, after which both layers live on) gives it copies.
"""
from __future__ import annotations

from torch import nn
from torch.nn.modules.module import _WrappedHook

# nn.Module's per-module hook dictionaries (torch 2.x)
HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
              "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
              "_backward_pre_hooks", "_state_dict_hooks", "_state_dict_pre_hooks",
              "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def copy_hooks(src: nn.Module, dst: nn.Module) -> None:
    """dst gets copies of src's module hooks (forward, backward, state_dict, load_state_dict), so
    a layer swapped in place behaves as the one it replaces for whoever hooked it. Handles given
    out for src keep removing from src only."""
    for name in HOOK_DICTS:
        if hasattr(src, name):
            setattr(dst, name, type(getattr(src, name))(getattr(src, name)))
    if getattr(src, "_is_full_backward_hook", None) is not None:
        dst._is_full_backward_hook = src._is_full_backward_hook


def share_hooks(src: nn.Module, dst: nn.Module) -> None:
    """dst takes src's hook dictionaries themselves, for a swap in place: a hook registered on
    either before or after the swap runs on whichever is in the model, and its handle (which
    holds the dictionary) removes it. load_state_dict pre-hooks registered with their module
    (``register_load_state_dict_pre_hook``: torch keeps a weak reference to the module and
    passes it to the hook) are pointed at dst, which now loads in src's place."""
    for name in HOOK_DICTS:
        if not hasattr(src, name):
            continue
        hooks = getattr(src, name)
        if name == "_load_state_dict_pre_hooks":
            for key, hook in list(hooks.items()):
                if isinstance(hook, _WrappedHook) and hook.with_module:
                    hooks[key] = _WrappedHook(hook.hook, dst)
        setattr(dst, name, hooks)
    if getattr(src, "_is_full_backward_hook", None) is not None:
        dst._is_full_backward_hook = src._is_full_backward_hook
