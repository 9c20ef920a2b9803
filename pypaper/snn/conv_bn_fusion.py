"""Conv -> BatchNorm fusion for spiking networks: drop-in for SpikingJelly 2.0's
``spikingjelly.activation_based.functional.conv_bn_fusion``, and also
``pypaper.snn.functional.conv_bn_fusion``:

    from pypaper.snn.functional.conv_bn_fusion import fuse_conv_bn_eval_modules
    fused = fuse_conv_bn_eval_modules(model.eval())     # a torch.fx.GraphModule, no BatchNorm
    packed = pack_conv_bn_train_modules(model.train())  # Conv+BN pairs folded over [T, N] once

Eval: BatchNorm after a convolution is an affine map per output channel,
    BN(W * x + b) = g (W * x + b - mu) / s + beta,   s = sqrt(var + eps),
so the pair is one convolution with weight (g / s) W and bias g (b - mu) / s + beta
(torch.nn.utils.fusion.fuse_conv_bn_eval computes it): one pass over the activations less per
pair at inference, with the same outputs up to rounding.

Train: the statistics change with every batch, so nothing folds into the weights; the pair is
packed into one module that, in multi-step mode, flattens [T, N, ...] to [T*N, ...] once for both
layers instead of once per layer (SpikingJelly's 'pack', same results).

Why pypaper has its own: SpikingJelly's functions trace the model with torch.fx and keep only
SpikingJelly's own step modules as leaves, so on a model with pypaper's layers or neurons fx
traces into their multi-step forwards and stops with a TraceError. Here every module with a
``step_mode`` (pypaper's and SpikingJelly's layers, neurons and containers) is a leaf; and since a
leaf container (SeqToANNContainer(Conv2d, BatchNorm2d), SpikingJelly's older model style) hides
its pairs from the graph, the pairs among the consecutive children of a container are fused too,
in a copy of the container; pypaper's modules without a step mode (DelayedLinear, the
surrogates) are leaves too. The model passed in is never modified: the result shares its
unchanged modules (neurons included, so reset_net on either resets both).

A convolution whose weight is computed by torch.nn.utils.parametrize (parametrizations.weight_norm,
spectral_norm) is folded with the weight's current value. Pairs with hooks of their own (forward,
pre-forward or backward hooks, the older hook-based weight_norm / spectral_norm included) are left
as they are: folded or packed, the hooks would run on other tensors or not at all.

Only pairs that compute what torch's layers compute are folded or packed: a convolution or batch
norm subclass with a forward of its own, a convolution with a weight of its own (_conv_forward:
SpikingJelly's WSConv2d standardizes its weight, which would undo the folded scale) or a batch
norm with its own super_forward is left as it is (SpikingJelly's functions fold those too, and
change the outputs).
"""
from __future__ import annotations

import contextlib
import copy
import sys
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .._module_swap import float_stand_in
from .delays import DelayedLinear
from .surrogate import SurrogateFunctionBase

__all__ = ["fuse_conv_bn_eval_modules", "pack_conv_bn_train_modules"]

# (convolution, batch norm) of the same spatial rank; pypaper's and SpikingJelly's layers
# subclass these. Transposed convolutions are not fused (their weight is [in, out, ...]).
_PAIRS = ((nn.Conv1d, nn.BatchNorm1d), (nn.Conv2d, nn.BatchNorm2d), (nn.Conv3d, nn.BatchNorm3d))


def _pair_rank(conv: nn.Module, bn: nn.Module) -> Optional[int]:
    """The spatial rank (1, 2, 3) of a fusable (conv, bn) pair, or None."""
    for rank, (c, b) in enumerate(_PAIRS, start=1):
        if isinstance(conv, c) and isinstance(bn, b):
            return rank
    return None


def _same_step_mode(conv: nn.Module, bn: nn.Module) -> bool:
    # a plain torch layer has no step mode and runs whatever it is given
    a, b = getattr(conv, "step_mode", None), getattr(bn, "step_mode", None)
    return a is None or b is None or a == b


def _standard_methods() -> Tuple[set, set, set, set]:
    """The forwards of torch's, pypaper's and SpikingJelly's Conv1-3d and BatchNorm1-3d: (conv
    forward, conv _conv_forward, bn forward, bn super_forward). SpikingJelly's are added when it
    is imported (a model holding its layers has imported it)."""
    from . import layer  # here: layer imports functional, which imports this module
    convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    conv_fwd = {c.forward for c in convs} | {layer._SeqToANN.forward}
    conv_cf = {c._conv_forward for c in convs}
    bn_fwd = {_BatchNorm.forward, layer._BatchNormSteps.forward}
    bn_super = {None, layer._BatchNormSteps.super_forward}
    sj = sys.modules.get("spikingjelly.activation_based.layer")
    for rank in ("1d", "2d", "3d"):
        for name, fwd, extra in (("Conv", conv_fwd, None), ("BatchNorm", bn_fwd, bn_super)):
            cls = getattr(sj, name + rank, None)
            if isinstance(cls, type) and cls.__module__.startswith("spikingjelly."):
                fwd.add(cls.forward)
                if extra is not None and hasattr(cls, "super_forward"):
                    extra.add(cls.super_forward)
    return conv_fwd, conv_cf, bn_fwd, bn_super


def _standard(conv: nn.Module, bn: nn.Module, fold: bool) -> bool:
    """Whether the pair computes what torch's layers compute, so that folding it (``fold``: the
    eval fusion, torch.nn.utils.fusion's arithmetic) or running both in step mode 's' on
    [T * N, *] (packing) gives the same result. A subclass with a forward of its own (or, when
    folding, a weight of its own through _conv_forward, as a weight-standardized conv such as
    SpikingJelly's WSConv2d, or a batch norm of its own through super_forward) is left alone."""
    conv_fwd, conv_cf, bn_fwd, bn_super = _standard_methods()
    names = ("forward", "_conv_forward", "super_forward")
    if any(n in m.__dict__ for m in (conv, bn) for n in names):  # set on the instance
        return False
    if type(conv).forward not in conv_fwd or type(bn).forward not in bn_fwd:
        return False
    return not fold or (type(conv)._conv_forward in conv_cf
                        and getattr(type(bn), "super_forward", None) in bn_super)


class _Tracer(fx.Tracer):
    """fx tracer with every step module as a leaf: neurons (their state and time loop), step-mode
    layers and containers (their [T, N] folding reads shapes fx cannot trace), and packed pairs;
    and pypaper's modules without a step mode (DelayedLinear, the surrogates), whose checks and
    autograd functions fx cannot trace either."""

    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        if (isinstance(m, (PackedConvBN, DelayedLinear, SurrogateFunctionBase))
                or hasattr(m, "step_mode")):
            return True
        return super().is_leaf_module(m, qualified_name)


class PackedConvBN(nn.Module):
    """A convolution and the batch norm after it as one module (pack_conv_bn_train_modules).
    Multi-step input ([T, N, C, *spatial]) with neither layer in single-step mode is flattened to
    [T*N, ...] once and run through both as single-step layers; anything else goes through the two
    modules as they are. The two modules are the model's own (same parameters and running
    statistics)."""

    def __init__(self, conv: nn.Module, bn: nn.Module, rank: int):
        super().__init__()
        self.conv = conv
        self.bn = bn
        self.rank = rank

    @staticmethod
    @contextlib.contextmanager
    def _single_step(module: nn.Module) -> Iterator[None]:
        mode = getattr(module, "step_mode", None)
        if mode is None or mode == "s":
            yield
            return
        module.step_mode = "s"
        try:
            yield
        finally:
            module.step_mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        modes = (getattr(self.conv, "step_mode", "m"), getattr(self.bn, "step_mode", "m"))
        if modes != ("m", "m") or x.dim() != self.rank + 3:
            return self.bn(self.conv(x))
        steps, batch = x.shape[0], x.shape[1]
        y = x.flatten(0, 1)
        with self._single_step(self.conv):
            y = self.conv(y)
        with self._single_step(self.bn):
            y = self.bn(y)
        return y.reshape(steps, batch, *y.shape[1:])


def _check_running_stats(bn: nn.Module, name: str) -> None:
    if not getattr(bn, "track_running_stats", True) or bn.running_mean is None \
            or bn.running_var is None:
        raise ValueError(f"cannot fuse {name}: a BatchNorm without running statistics "
                         f"(track_running_stats=False) normalizes with each batch's own, which "
                         f"no fixed convolution reproduces")


def _has_hooks(m: nn.Module) -> bool:
    """Whether the module runs hooks of its own around its forward or backward. Folded away, the
    batch norm's hooks would no longer run, and a convolution's forward hook would run on the
    folded output, BN(W x) instead of W x (a hook scaling its output by 2: BN(2 W x) before,
    2 BN(W x) after, silently); packed, both would see [T * N, ...] instead of the [T, N, ...]
    they saw. torch.nn.utils.weight_norm / spectral_norm (the older, hook-based ones) recompute
    the weight in a forward pre-hook, which would undo a fold (and spectral_norm's assignment
    then failed on the fused Parameter): such a pair is left as it is."""
    return bool(m._forward_pre_hooks or m._forward_hooks or m._backward_hooks
                or getattr(m, "_backward_pre_hooks", None))


def _fusable(conv: nn.Module, bn: nn.Module, fold: bool) -> bool:
    """A (conv, bn) pair this module rewrites: same rank, same step mode, standard forwards,
    no hooks of their own."""
    return (_pair_rank(conv, bn) is not None and _same_step_mode(conv, bn)
            and _standard(conv, bn, fold) and not _has_hooks(conv) and not _has_hooks(bn))


def _fold(conv: nn.Module, bn: nn.Module, bn_name: str) -> nn.Module:
    """The one convolution computing bn(conv(x)) in eval mode (a new module)."""
    _check_running_stats(bn, bn_name)
    # a conv under parametrizations.weight_norm / spectral_norm: a stand-in with the weight's
    # current value as a Parameter (on the parametrized module fuse_conv_bn_eval raised KeyError
    # "attribute 'weight' already exists"; removing the parametrization from a deep copy deleted
    # the weight property from parametrize's class, which the model's own module shares)
    return fuse_conv_bn_eval(float_stand_in(conv), float_stand_in(bn))


def _fused_children(container: nn.Module, name: str) -> nn.Module:
    """A shallow copy of a leaf container (an nn.Sequential with a step mode) with each pair of
    consecutive (conv, bn) children fused, nested Sequentials included; the container itself
    when nothing in it changes. (Training needs no packing there: the container already folds
    [T, N] once for all its children.)"""
    children = list(container.named_children())
    replaced: Dict[str, nn.Module] = {}
    i = 0
    while i < len(children):
        key, child = children[i]
        if isinstance(child, nn.Sequential):
            new = _fused_children(child, f"{name}.{key}")
            if new is not child:
                replaced[key] = new
        elif i + 1 < len(children):
            bn_key, bn = children[i + 1]
            if _fusable(child, bn, fold=True):
                replaced[key] = _fold(child, bn, f"{name}.{bn_key}")
                replaced[bn_key] = nn.Identity()
                i += 2
                continue
        i += 1
    if not replaced:
        return container
    out = copy.copy(container)
    # the copy's own tables (children, parameters, buffers, hooks): a shallow copy shares them,
    # and a child replaced or a hook registered on the copy would change the original
    for key, value in container.__dict__.items():
        if isinstance(value, (dict, set)):
            out.__dict__[key] = copy.copy(value)
    out._modules.update(replaced)
    return out


def _matches(gm: fx.GraphModule, modules: Dict[str, nn.Module],
             fold: bool) -> List[Tuple[str, str, list]]:
    """(conv target, bn target, the bn call nodes) for every convolution whose every call feeds
    only the same batch norm, with matching rank and step modes, both computing what torch's
    layers compute (_standard)."""
    calls: Dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    found: Dict[str, Tuple[str, list]] = {}
    spoiled = set()
    for node in gm.graph.nodes:
        if node.op != "call_module" or not node.args:
            continue
        src = node.args[0]
        if not (isinstance(src, fx.Node) and src.op == "call_module"):
            continue
        conv, bn = modules[src.target], modules[node.target]
        if not _fusable(conv, bn, fold):
            continue
        if len(src.users) != 1 or len(node.args) != 1 or node.kwargs:
            spoiled.add(src.target)  # the conv's output is used elsewhere: BN cannot fold in
            continue
        prev = found.setdefault(src.target, (node.target, []))
        if prev[0] != node.target:
            spoiled.add(src.target)  # one conv feeding two different batch norms
            continue
        prev[1].append(node)
    return [(c, b, nodes) for c, (b, nodes) in found.items()
            if c not in spoiled and len(nodes) == calls[c]]


def _set_module(gm: fx.GraphModule, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, module)


def _transform(net: nn.Module, mode: str) -> nn.Module:
    tracer = _Tracer()
    if tracer.is_leaf_module(net, ""):
        # The model is itself a step module (a container such as SeqToANNContainer(conv, bn), a
        # layer, a neuron): fx cannot trace its forward, and there is no graph around it to
        # rewrite. Its pairs are those of a leaf container: fused in a copy in eval mode; as it
        # is for training (the container folds [T, N] once for all its children already).
        if mode == "eval" and isinstance(net, nn.Sequential):
            return _fused_children(net, type(net).__name__)
        return net
    graph = tracer.trace(net)
    gm = fx.GraphModule(tracer.root, graph, net.__class__.__name__)
    modules = dict(gm.named_modules())
    for conv_t, bn_t, bn_nodes in _matches(gm, modules, fold=mode == "eval"):
        conv, bn = modules[conv_t], modules[bn_t]
        new = _fold(conv, bn, bn_t) if mode == "eval" else PackedConvBN(conv, bn,
                                                                         _pair_rank(conv, bn))
        _set_module(gm, conv_t, new)
        for node in bn_nodes:  # the conv's call now does both
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    if mode == "eval":  # pairs inside leaf containers (nn.Sequential step modules), in copies
        for node in gm.graph.nodes:
            m = gm.get_submodule(node.target) if node.op == "call_module" else None
            if isinstance(m, nn.Sequential):
                new = _fused_children(m, node.target)
                if new is not m:
                    _set_module(gm, node.target, new)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def fuse_conv_bn_eval_modules(net: nn.Module) -> nn.Module:
    """Every Conv{1,2,3}d -> BatchNorm{1,2,3}d pair of an eval-mode model folded into one
    convolution; returns the rewritten model as a torch.fx.GraphModule (``net`` is unchanged).
    A model that is itself a step module (SeqToANNContainer(conv, bn, ...), a layer, a neuron:
    nothing fx could trace) comes back as a copy of its class with its pairs fused (a BatchNorm
    replaced by nn.Identity, the children keeping their names), or as itself when it has none.
    Raises ValueError for a model in training mode or a pair whose BatchNorm keeps no running
    statistics. A convolution whose output also goes elsewhere is left unfused."""
    if net.training:
        raise ValueError("fuse_conv_bn_eval_modules takes a model in eval() mode (in training "
                         "mode BatchNorm normalizes with each batch's statistics)")
    return _transform(net, "eval")


def pack_conv_bn_train_modules(net: nn.Module) -> nn.Module:
    """Every Conv -> BatchNorm pair of a training-mode model packed into one module that folds
    the multi-step [T, N] dimensions once for both (PackedConvBN); the parameters and running
    statistics stay the model's own. Returns a torch.fx.GraphModule (``net`` is unchanged); a
    model that is itself a step module comes back as itself (a container already folds [T, N]
    once for all its children)."""
    if not net.training:
        raise ValueError("pack_conv_bn_train_modules takes a model in train() mode (for "
                         "inference, fuse_conv_bn_eval_modules folds the pairs away)")
    return _transform(net, "train")
