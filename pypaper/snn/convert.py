"""Swap SpikingJelly's neurons in a built model for pypaper's, in place; and back.

    model = pypaper.snn.convert(model, filter_fn=None, *, sltt=False)
    model = pypaper.snn.revert(model)

For a model that is already built with SpikingJelly's neurons: its model zoo
(``spikingjelly.activation_based.model``: spiking_resnet, sew_resnet, spiking_vgg,
parametric_lif_net, spikformer, ...) builds them from a class passed in, a checkpoint may have
been trained with them, and a code base may construct them in many places. ``convert`` replaces
every neuron whose type is exactly one of SpikingJelly's

    IFNode, SimpleIFNode                   -> pypaper.snn.IFNode
    LIFNode, SimpleLIFNode                 -> pypaper.snn.LIFNode
    SLTTLIFNode (SpikingJelly 2.0)         -> pypaper.snn.LIFNode(sltt=True)
    ParametricLIFNode                      -> pypaper.snn.ParametricLIFNode

by pypaper's, which runs the same dynamics (H = V + (X - (V - V_reset)) / tau, fire, hard or
soft reset, ``detach_reset``) as one fused kernel over all T steps. What goes over:

- the configuration: v_threshold, v_reset, tau, decay_input, detach_reset, step_mode,
  store_v_seq, and the surrogate_function object itself (SpikingJelly's surrogates of the eight
  built-in names run inside the kernels; another callable runs in pypaper's Python loop);
- the parameters as the same objects: a PLIF's ``w`` is the Parameter the optimizer already
  holds, so an optimizer built before ``convert`` keeps training the model, and the state_dict
  keeps its keys (a checkpoint saved either way loads into the other);
  (a threshold made an ``nn.Parameter`` becomes pypaper's learnable threshold, the same
  Parameter);
- the state: the carried membrane ``v`` (a model converted between two calls of a sequence goes
  on from where it was), ``v_seq``, the reset value set with ``set_reset_value('v', ...)``, train
  / eval mode, and the module hooks, shared (a SpikingJelly monitor on a neuron keeps recording,
  and a hook's handle keeps removing it).

No reference to the SpikingJelly neuron is kept: a model holds what it runs, and
SpikingJelly's ``functional.reset_net``, which caches the modules it resets per model, is told
of the swap (its cache is cleared) so that it resets the new neurons.

One neuron under two names becomes one pypaper neuron under both (``filter_fn`` sees it under
its first name). Left as they are: subclasses of those classes (they may change the dynamics),
every other SpikingJelly neuron (KLIF, QIF, Izhikevich, ..., and those that are not BaseNodes:
PSN, GatedLIF, DSR, ILC, a subclass of SimpleLIFNode: pypaper has no kernel for them),
anything ``filter_fn(module, fully_qualified_name) -> bool`` refuses, and, with a warning
naming the reason, neurons that hold what pypaper's would not keep: a Parameter, buffer or
submodule of their own beyond PLIF's ``w``, a learnable threshold and the surrogate (their
state_dict keys would be lost), a tensor tau or fixed tensor threshold of many values (pypaper's
would register it as a buffer, a new state_dict key), memories besides ``v``, or a reduced
precision set by SpikingJelly's ``precision`` module. A configuration pypaper refuses (pypaper's
neurons check ``v_threshold > v_reset`` and ``tau > 1`` as issue 3 asks; SpikingJelly takes any
value) raises ValueError naming the module, before anything is replaced. ``sltt=True`` turns on
SLTT (Meng et al., ICCV 2023) on the converted neurons. SpikingJelly's ``SLTTLIFNode`` is a LIF
neuron whose charge reads the carried membrane detached in training (SLTT's H[t] =
V[t-1].detach() decayed + X[t]): it becomes pypaper's LIFNode with ``sltt=True`` whatever the
``sltt`` argument says, so that its gradients stay SLTT's (the same forward; in eval mode
SpikingJelly's takes the Heaviside step, whose gradient is 0, where pypaper's keeps the
surrogate: only a backward in eval mode sees it). ``revert`` gives it back as an
``SLTTLIFNode``.

``revert`` builds SpikingJelly's neurons of the original classes again from the converted
ones' current configuration, Parameters (the same objects), state and hooks. A model whose root
is itself a neuron comes back as a new module: use the returned model (``model =
convert(model)``).
"""
from __future__ import annotations

import inspect
import numbers
import sys
import warnings
from typing import Callable, Optional

import torch
from torch import nn

from .._module_swap import share_hooks
from . import neuron as _neuron

_FROM = "_snn_convert_from"  # on a converted neuron: the SpikingJelly class it replaced
_SJ_NEURON = "spikingjelly.activation_based.neuron"
_SJ_RESET_CACHE = "spikingjelly.activation_based.functional.net_config"
# SpikingJelly's class name -> pypaper's class
_TARGETS = {"IFNode": _neuron.IFNode, "SimpleIFNode": _neuron.IFNode,
            "LIFNode": _neuron.LIFNode, "SimpleLIFNode": _neuron.LIFNode,
            "ParametricLIFNode": _neuron.ParametricLIFNode,
            # SpikingJelly 2.0's SLTT neuron (neuron.online_learning): LIFNode's dynamics, the
            # membrane read detached by each charge in training; left as a subclass of LIFNode it
            # kept SpikingJelly's per-step Python loop, and sltt.train_step_online refused a model
            # of them ("no pypaper.snn neurons") after convert(model, sltt=True)
            "SLTTLIFNode": _neuron.LIFNode}
# classes whose every converted neuron runs SLTT, whatever convert's sltt says
_ALWAYS_SLTT = frozenset(("SLTTLIFNode",))
# classes whose constructor refuses step_mode 'm' (SLTTLIFNode asserts 's'): revert builds them
# in 's' and sets the converted neuron's mode after
_BUILT_SINGLE_STEP = frozenset(("SLTTLIFNode",))


def _spikingjelly_classes() -> dict:
    """{SpikingJelly neuron class: pypaper class} for the classes of the SpikingJelly that is
    imported (none when it is not: then the model cannot hold one of its neurons)."""
    module = sys.modules.get(_SJ_NEURON)
    if module is None:
        return {}
    found = {}
    for name, target in _TARGETS.items():
        cls = getattr(module, name, None)
        if isinstance(cls, type):
            found[cls] = target
    return found


def _spikingjelly_neuron(module: nn.Module) -> bool:
    """Whether module is one of SpikingJelly's neurons, or of a class derived from one: a class
    of its ``neuron`` package in its MRO. Not only BaseNode's tree: SimpleBaseNode (the
    SimpleIF/LIF nodes' base), PSN, GatedLIFNode, the DSR, ILC, Noisy and NonSpiking nodes are
    modules of their own, which the zoo's constructors take as well."""
    for cls in type(module).__mro__:
        where = getattr(cls, "__module__", None) or ""
        if where == _SJ_NEURON or where.startswith(_SJ_NEURON + "."):
            return True
    return False


def _forget_spikingjelly_reset_lists() -> None:
    """SpikingJelly 2.0's reset_net caches, per model passed to it, weak references to the
    modules it resets, and rebuilds the list only when one of them has died: after a swap it
    would go on resetting the replaced neurons while anything keeps them alive. Clearing the
    cache (keyed by whatever module the user passes, so all of it) makes it collect again."""
    cache = getattr(sys.modules.get(_SJ_RESET_CACHE), "_RESET_MODULE_CACHE", None)
    if cache is not None and hasattr(cache, "clear"):
        cache.clear()


def _number(value, what: str):
    """A float for pypaper's constructor: SpikingJelly keeps numbers as given (an int, a 0-d
    tensor)."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.requires_grad:
        return float(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    raise ValueError(f"{what} must be a number, got {value!r}")


def _many(value) -> bool:
    return isinstance(value, torch.Tensor) and (value.numel() != 1 or value.requires_grad)


def _constructor_threshold(vth):
    """The number a constructor takes for a threshold that may be a (learnable) tensor: its first
    value; the tensor itself is assigned after construction."""
    return float(vth.detach().reshape(-1)[0]) if isinstance(vth, torch.Tensor) else vth


def _skip_reason(module: nn.Module, target: type) -> Optional[str]:
    """Why ``module`` stays SpikingJelly's (None: it converts)."""
    if getattr(module, "_neuron_precision", None) is not None:
        return "it runs in a reduced precision set by SpikingJelly's precision module"
    memories = getattr(module, "_memories", None)
    if isinstance(memories, dict) and set(memories) - {"v"}:
        return f"it holds memories besides v ({', '.join(sorted(set(memories) - {'v'}))})"
    allowed = {"w"} if target is _neuron.ParametricLIFNode else set()
    if isinstance(module._parameters.get("v_threshold"), nn.Parameter):
        allowed.add("v_threshold")  # -> pypaper's learnable threshold, the same Parameter
    own = ([f"Parameter {n}" for n, p in module._parameters.items()
            if p is not None and n not in allowed]
           + [f"buffer {n}" for n, b in module._buffers.items() if b is not None]
           + [f"submodule {n}" for n, m in module._modules.items()
              if m is not None and n != "surrogate_function"])
    if own:
        return (f"it holds {', '.join(own)}, which pypaper's neuron would not keep (its "
                f"state_dict key would be lost)")
    if "v_threshold" not in allowed and _many(module.v_threshold):
        return ("its v_threshold is a tensor of many values, which pypaper's neuron would keep "
                "as a buffer (a new state_dict key)")
    if target is _neuron.LIFNode and _many(module.tau):
        return ("its tau is a tensor, which pypaper's LIFNode would keep as a buffer (a new "
                "state_dict key)")
    # A w (or threshold) of any shape converts: the op broadcasts it against each step's
    # [N, *F] as SpikingJelly's elementwise charge does ((C, 1, 1): one w per channel).
    return None


def _build(old: nn.Module, target: type, sltt: bool) -> nn.Module:
    """pypaper's neuron for SpikingJelly's ``old``: the same configuration, Parameters and
    state."""
    vth = old.v_threshold
    learnable = isinstance(vth, nn.Parameter)
    backend = getattr(old, "backend", "torch")
    common = dict(
        v_threshold=_constructor_threshold(vth) if learnable else _number(vth, "v_threshold"),
        v_reset=_number(old.v_reset, "v_reset"),
        surrogate_function=old.surrogate_function, detach_reset=bool(old.detach_reset),
        step_mode=old.step_mode, store_v_seq=bool(getattr(old, "store_v_seq", False)),
        backend=backend if backend in _neuron.BaseNode.supported_backends else "torch",
        sltt=sltt or type(old).__name__ in _ALWAYS_SLTT, learnable_threshold=learnable,
        # No threshold_shape: the Parameter is assigned below, undeclared, as PLIF's w is. A
        # declared shape must have the features' rank ((C, 1, 1) for [N, C, H, W]), which
        # SpikingJelly never asked of it: its charge broadcasts the threshold against each step
        # by torch's rules, so a (1, C, 1, 1), or a (C,) against [N, L, C] tokens, ran there and
        # the converted neuron raised at its first call. Undeclared, the op takes it by the same
        # broadcasting.
        threshold_shape=None)
    if target is _neuron.IFNode:
        new = target(**common)
    elif target is _neuron.LIFNode:
        new = target(tau=_number(old.tau, "tau"), decay_input=bool(old.decay_input), **common)
    else:
        new = target(decay_input=bool(old.decay_input), **common)
        new.w = old.w  # the same Parameter: optimizers, tied weights and state_dict keys hold
    if learnable:
        # pypaper's constructor checked the first value only; a soft reset has no bound
        if new.v_reset is not None and not bool(torch.all(vth.detach() > new.v_reset)):
            raise ValueError(f"v_threshold must be greater than v_reset ({new.v_reset}) "
                             f"for every neuron")
        new.v_threshold = vth
    rest = getattr(old, "_memories_rv", {}).get("v")
    if rest is not None:
        rest = _number(rest, "the reset value of v")
        if rest != new.rest_value:
            new.set_reset_value("v", rest)
    v = old.v
    new.v = v if isinstance(v, torch.Tensor) else float(v)
    if new.store_v_seq:
        new.v_seq = getattr(old, "v_seq", None)
    # SpikingJelly 2.0's Lava scale, an attribute its users tune (0.0.0.0.14's nodes lack it)
    new.lava_s_cale = getattr(old, "lava_s_cale", new.lava_s_cale)
    new.train(old.training)
    share_hooks(old, new)
    object.__setattr__(new, _FROM, type(old))
    return new


def _swap(model: nn.Module, made: dict) -> nn.Module:
    """Puts made[id(child)] in each child's place (every parent once: a block shared many times
    is walked once); returns the root's replacement or model."""
    for parent in list(model.modules()):
        for attr, child in list(parent._modules.items()):
            if child is not None and id(child) in made:
                setattr(parent, attr, made[id(child)])
    _forget_spikingjelly_reset_lists()
    return made.get(id(model), model)


def convert(model: nn.Module, filter_fn: Optional[Callable[[nn.Module, str], bool]] = None, *,
            sltt: bool = False) -> nn.Module:
    """Replace model's SpikingJelly IF / LIF / PLIF neurons with pypaper's, in place; returns
    model (or, if model itself is such a neuron, its replacement)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(sltt, bool):
        raise TypeError(f"sltt must be a bool, got {sltt!r}")
    classes = _spikingjelly_classes()
    if not classes:
        return model
    # First build every replacement (a configuration pypaper refuses raises before anything
    # changes), then swap them in.
    made: dict = {}  # id(SpikingJelly neuron) -> pypaper neuron
    others = []  # SpikingJelly neurons of other classes (subclasses included): left, said once
    inside = []  # their names: what they hold is theirs, not said again
    for name, module in model.named_modules():
        target = classes.get(type(module))
        if filter_fn is not None and not filter_fn(module, name):
            continue
        if target is None:
            if _spikingjelly_neuron(module) and not any(
                    name.startswith(f"{p}.") or not p for p in inside):
                others.append(f"{name or 'model'} ({type(module).__name__})")
                inside.append(name)
            continue
        where = f"{name or 'model'} ({type(module).__name__})"
        reason = _skip_reason(module, target)
        if reason is not None:
            warnings.warn(f"snn.convert: {where} is left as SpikingJelly's: {reason}")
            continue
        try:
            made[id(module)] = _build(module, target, sltt)
        except (ValueError, TypeError) as err:
            raise type(err)(f"snn.convert: {where}: {err}") from err
    if others:
        names = ", ".join(others[:8]) + (f" and {len(others) - 8} more" if len(others) > 8 else "")
        warnings.warn(f"snn.convert: {names} left as SpikingJelly's: pypaper converts the classes "
                      f"{', '.join(sorted(_TARGETS))} themselves, not subclasses or other neurons")
    return _swap(model, made) if made else model


def _restore(new: nn.Module) -> nn.Module:
    """SpikingJelly's neuron of the class ``new`` replaced, built from new's current
    configuration, with its Parameters, state and hooks."""
    cls = getattr(new, _FROM)
    vth = new.v_threshold
    config = dict(v_threshold=_constructor_threshold(vth), v_reset=new.v_reset,
                  surrogate_function=new.surrogate_function,
                  detach_reset=new.detach_reset, step_mode=new.step_mode,
                  store_v_seq=new.store_v_seq, backend=new.backend,
                  decay_input=new.decay_input, init_tau=2.0)
    if isinstance(new, _neuron.LIFNode):
        config["tau"] = new.tau
    if cls.__name__ in _BUILT_SINGLE_STEP:
        config["step_mode"] = "s"
    accepted = inspect.signature(cls.__init__).parameters
    old = cls(**{k: v for k, v in config.items() if k in accepted})
    old.step_mode = new.step_mode
    if isinstance(vth, torch.Tensor):
        old.v_threshold = vth  # the learnable threshold's Parameter
    if isinstance(new, _neuron.ParametricLIFNode):
        old.w = new.w
    if hasattr(old, "set_reset_value"):
        old.set_reset_value("v", new.rest_value)
    v = new.v
    # a view (the 0-d state of a one-neuron step) would refuse SpikingJelly's in-place detach
    old.v = v.clone() if isinstance(v, torch.Tensor) and v._is_view() else v
    if getattr(old, "store_v_seq", False):
        old.v_seq = new.v_seq
    if hasattr(old, "lava_s_cale"):
        old.lava_s_cale = new.lava_s_cale
    old.train(new.training)
    share_hooks(new, old)
    return old


def revert(model: nn.Module) -> nn.Module:
    """Undo ``convert``: SpikingJelly's neurons of the original classes, with the converted ones'
    current configuration, Parameters, membrane state and hooks; returns model (or, if model
    itself is a converted neuron, its SpikingJelly neuron)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    made = {id(m): _restore(m) for m in model.modules() if getattr(m, _FROM, None) is not None}
    return _swap(model, made) if made else model
