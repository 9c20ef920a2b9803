"""IF, LIF and parametric LIF neurons, drop-in for ``spikingjelly.activation_based.neuron``.

Same constructor arguments, defaults and state semantics as SpikingJelly's IFNode, LIFNode and
ParametricLIFNode: ``step_mode='s'`` takes one step [N, *], ``'m'`` a sequence [T, N, *]; the
membrane ``v`` is the float rest value until the first step, then a tensor that carries across
calls (and across modes) until ``reset()`` (or ``pypaper.snn.reset_net(model)``). Every call runs
the fused kernel of pypaper.snn.ops.lif_multi_step: all T steps in one pass, backward as the
reverse scan keeping one value per neuron-step.

Additions (keyword-only): ``sltt=True`` (SLTT: the backward drops the temporal gradient path,
Meng et al., ICCV 2023; the carried membrane enters the next call detached), per-neuron time
constants (``LIFNode(tau=<tensor>)`` fixed, ``ParametricLIFNode(tau_shape=...)`` learnable) and
learnable thresholds (``learnable_threshold=True``, ``threshold_shape=...``). Per-neuron shapes are the
feature shape: x.shape[2:] in 'm' mode, x.shape[1:] in 's' mode (broadcast over the batch), or a
shape of its rank with sizes of 1 where one value is shared: ``tau_shape=(C, 1, 1)`` for
[N, C, H, W] steps is one time constant per channel.
"""
from __future__ import annotations

import abc
import copy
import math
from typing import Optional, Sequence

import torch
from torch import nn

from . import _registration, ops, spikingjelly_fallback
from .._numbers import as_flag as _flag, is_finite_number as _finite_number, plain_number
from .surrogate import Sigmoid, check_surrogate_function

_STEP_MODES = ("s", "m")
# the numbers a schedule may set between calls: a numpy scalar is stored as a float (plain_number)
_NUMBER_ATTRIBUTES = frozenset({"tau", "v_threshold", "v_reset"})
# the configuration flags each call reads (_flag)
_FLAG_ATTRIBUTES = frozenset({"detach_reset", "decay_input", "sltt"})


def _shape(value, name: str) -> tuple:
    try:
        shape = tuple(int(d) for d in value)
    except TypeError:
        raise TypeError(f"{name} must be a tuple of ints, got {value!r}") from None
    if any(d < 0 for d in shape):
        raise ValueError(f"{name} must hold non-negative sizes, got {shape}")
    return shape


def _as_float(x: torch.Tensor) -> torch.Tensor:
    """Integer or bool input currents in torch's default float dtype, as SpikingJelly's
    arithmetic (v + (x - v) / tau with a float v) promotes them. Complex input is refused
    (SpikingJelly's heaviside raises on it; a cast would drop the imaginary part)."""
    if x.is_complex():
        raise TypeError(f"x must be a real tensor, got {x.dtype}")
    return x if x.is_floating_point() else x.to(torch.get_default_dtype())


def _escaped_from_vmap(t) -> bool:
    """Whether ``t`` is state a call inside torch.func.vmap left on the module: outside every
    transform, a tensor that is (or wraps) a vmap-batched tensor. It holds one value per vmapped
    model or sample and none for the module itself; functorch refuses to read its storage
    (deepcopy, pickle) or to compute with it (.to(), detach()). A wrapper that torch.func.grad
    alone left is not one: outside the transform it reads as the values it wraps."""
    if not isinstance(t, torch.Tensor) or torch.compiler.is_compiling():
        return False  # traced code sees no escaped wrapper (dynamo runs its own functorch)
    f = torch._C._functorch
    if not f.is_functorch_wrapped_tensor(t) or f.peek_interpreter_stack() is not None:
        return False  # a plain tensor, or a live wrapper: the state of a call inside a transform
    while f.is_functorch_wrapped_tensor(t):
        if f.is_batchedtensor(t):
            return True
        t = f.get_unwrapped(t)
    return False


def _held_tensor(t) -> bool:
    """Whether ``t`` is a tensor state that holds this module's value: not one a torch.func.vmap
    left behind (_escaped_from_vmap), which .to() / detach() cannot compute with; that one stays
    as it is for the next forward to refuse, or reset() to clear."""
    return isinstance(t, torch.Tensor) and not _escaped_from_vmap(t)


# The attribute, on a membrane a call inside torch.func.vmap wrote, naming the vmap calls it
# belongs to (_vmap_call_tokens)
_VMAP_CALLS = "_pypaper_vmap_calls"


def _vmap_call_tokens() -> tuple:
    """One token per torch.func.vmap level on the transform stack now: an empty tensor wrapped
    at that level, which functorch marks dead (its life handle) when that level's call exits.
    The level number alone cannot tell this call from an exited one: the next call reuses it
    (the next chunk of vmap(f, chunk_size=k), the next vmap of a loop)."""
    f = torch._C._functorch
    stack = f.get_interpreter_stack() or ()
    return tuple(f._wrap_for_grad(_TOKEN_BASE, i.level()) for i in stack
                 if i.key() == f.TransformType.Vmap)


# What the tokens wrap: made at import, outside every transform (a tensor made inside a grad
# level is already wrapped at that level, and wrapping it at an outer vmap level is refused)
_TOKEN_BASE = torch.empty(0)


def _left_by_exited_vmap(t) -> bool:
    """Whether the membrane ``t`` was written inside a vmap call that has exited (one of the
    tokens its writer attached is dead)."""
    tokens = getattr(t, _VMAP_CALLS, ())
    return any(torch._C._functorch.is_dead_tensor_wrapper(k) for k in tokens)


def _same_vmap_calls(new: torch.Tensor, old) -> torch.Tensor:
    """``new`` (a reshape of the membrane ``old``) marked as written by the same vmap calls."""
    tokens = getattr(old, _VMAP_CALLS, None)
    if tokens:
        setattr(new, _VMAP_CALLS, tokens)
    return new


class MemoryKeyError(KeyError, AttributeError):
    """get_reset_value / set_reset_value of a name that is not a registered memory. SpikingJelly's
    MemoryModule raises KeyError there (code written for it catches KeyError); pypaper raised
    AttributeError, which it keeps catching too."""

    def __str__(self) -> str:  # KeyError's str() is the repr of its argument: show the text
        return str(self.args[0]) if self.args else ""


class MemoryExistsError(ValueError, AssertionError):
    """register_memory of a name the module already has. SpikingJelly's MemoryModule asserts
    there (AssertionError); pypaper raised ValueError, which it keeps catching too."""


# SpikingJelly's places for a neuron's own dynamics: 0.0.0.0.14's per-step hooks (2.0 keeps them
# in SimpleBaseNode) and 2.0's functional steps. pypaper's nodes never call them (the fused op runs
# the LIF dynamics), so a subclass defining one would be silently ignored.
_SPIKINGJELLY_DYNAMICS = ("neuronal_charge", "neuronal_fire", "neuronal_reset",
                          "single_step_functional_forward", "multi_step_functional_forward")


# SpikingJelly's neuron package (2.0: a package, its BaseNode in neuron.base_node; 0.0.0.0.14: a
# module), matched by name so that nothing of SpikingJelly's is imported here
_SJ_NEURON = "spikingjelly.activation_based.neuron"


def _spikingjelly_base_node(cls: type) -> bool:
    """Whether ``cls`` derives from SpikingJelly's ``neuron.BaseNode``: a class of that name
    defined in its neuron package is in cls's MRO. By name, so that nothing is imported and no
    answer depends on whether SpikingJelly had finished importing when it was first asked (ABCMeta
    caches the answer per class). SpikingJelly's SimpleBaseNode, PSN, DSR and FlexSN neurons are
    not its BaseNodes, and are not here either."""
    for c in cls.__mro__:
        if c.__name__ == "BaseNode":
            where = getattr(c, "__module__", None) or ""
            if where == _SJ_NEURON or where.startswith(_SJ_NEURON + "."):
                return True
    return False


def _is_own(module) -> bool:
    """Whether ``module`` is one of pypaper's neurons: its class derives from pypaper's BaseNode
    itself (a user's subclass included). ``isinstance(m, BaseNode)`` also answers True for
    SpikingJelly's BaseNodes (BaseNode.__subclasshook__), which pypaper's code must not drive as
    its own (SLTT's flag, the fused op's attributes): pypaper asks this instead."""
    return BaseNode in type(module).__mro__


class BaseNode(nn.Module, metaclass=abc.ABCMeta):
    """State, step modes and the call into the fused op; subclasses give the decay.

    ``isinstance(m, neuron.BaseNode)`` is True for pypaper's neurons and for SpikingJelly's
    BaseNode neurons (QIFNode, IzhikevichNode, EIFNode, KLIFNode, ..., served through this
    module, and its IF / LIF / PLIF nodes), as ``isinstance(m, neuron.BaseNode)`` is for all of
    them with SpikingJelly's import: see __subclasshook__."""

    @classmethod
    def __subclasshook__(cls, subclass):
        # After `from pypaper.snn import neuron`, neuron.QIFNode (and every neuron pypaper does
        # not implement) is SpikingJelly's class, served through this module
        # (spikingjelly_fallback.py), while neuron.BaseNode is this class. Code written for
        # SpikingJelly that finds a model's neurons by class (monitor.OutputMonitor(net,
        # neuron.BaseNode), firing-rate counters, [m for m in net.modules() if isinstance(m,
        # neuron.BaseNode)]) then skipped SpikingJelly's neurons silently. ABCMeta lets this base
        # class answer for them (nn.Module's metaclass is type, of which ABCMeta is a subclass).
        # Only this base class: SpikingJelly's LIFNode is not a pypaper LIFNode (its dynamics,
        # its state), and pypaper's code asks _is_own where it means its own neurons.
        if cls is BaseNode and _spikingjelly_base_node(subclass):
            return True
        return NotImplemented

    # SpikingJelly 2.0's Lava fixed-point scale (see __init__), also as a class default: a neuron
    # pickled or torch.save'd before the attribute existed has none in its __dict__, and
    # reading it (convert.revert copies it to SpikingJelly's neuron) raised AttributeError
    lava_s_cale = 1 << 6

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # The user's classes in the MRO (mixins included); a class that also overrides a step
        # forward may call its hooks itself.
        users = [k for k in cls.__mro__
                 if k.__module__ != __name__ and k not in (nn.Module, object)]
        hooks = [h for h in _SPIKINGJELLY_DYNAMICS if any(h in k.__dict__ for k in users)]
        steps = any(f in k.__dict__ for k in users
                    for f in ("forward", "single_step_forward", "multi_step_forward"))
        if hooks and not steps:
            base = next(k for k in cls.__mro__ if k.__module__ == __name__)
            raise TypeError(
                f"{cls.__name__} defines {', '.join(hooks)}: pypaper's {base.__name__} "
                f"runs the fused LIF kernel and never calls SpikingJelly's dynamics hooks. A "
                f"neuron with dynamics of its own subclasses spikingjelly.activation_based."
                f"neuron's BaseNode / SimpleBaseNode (it mixes with pypaper's layers and "
                f"neurons); to change the input, override single_step_forward / "
                f"multi_step_forward and call super()")

    def __init__(self, v_threshold: float = 1.0, v_reset: Optional[float] = 0.0,
                 surrogate_function: Optional[nn.Module] = None, detach_reset: bool = False,
                 step_mode: str = "s", store_v_seq: bool = False, *, backend: str = "torch",
                 sltt: bool = False, learnable_threshold: bool = False,
                 threshold_shape: Optional[Sequence[int]] = None):
        super().__init__()
        if not isinstance(store_v_seq, bool):
            raise TypeError(f"store_v_seq must be a bool, got {store_v_seq!r} (SpikingJelly "
                            f"0.0.0.0.14 takes backend at this position: pass backend= by keyword)")
        if v_reset is not None and not _finite_number(v_reset):
            raise ValueError(f"v_reset must be a finite number or None, got {v_reset!r}")
        if not _finite_number(v_threshold):
            raise ValueError(f"v_threshold must be a finite number, got {v_threshold!r}")
        if v_reset is not None and not v_threshold > v_reset:
            raise ValueError(f"v_threshold ({v_threshold}) must be greater than v_reset "
                             f"({v_reset})")
        self.v_reset = None if v_reset is None else float(v_reset)
        # where reset() puts v: v_reset as constructed (SpikingJelly registers the memory v
        # with it then; a later change of v_reset does not move it), set_reset_value('v', ...)
        self._v_rest = 0.0 if v_reset is None else float(v_reset)
        self._learnable_threshold = _flag(learnable_threshold, "learnable_threshold")
        if learnable_threshold or threshold_shape is not None:
            shape = _shape(threshold_shape or (), "threshold_shape")
            vth = torch.full(shape, float(v_threshold))
            self._declare_per_neuron("v_threshold", shape)
            if learnable_threshold:
                self.v_threshold = nn.Parameter(vth)
            else:
                self.register_buffer("v_threshold", vth)
        else:
            self.v_threshold = float(v_threshold)
        self.surrogate_function = Sigmoid() if surrogate_function is None else surrogate_function
        self.detach_reset = detach_reset  # __setattr__ checks and stores the flags (_flag)
        self.step_mode = step_mode
        self.store_v_seq = store_v_seq
        self.backend = backend
        self.sltt = sltt
        # at rest, as SpikingJelly's BaseNode registers v: not through reset(), which a
        # subclass may override to touch attributes its own __init__ sets after this one
        self.v = self.rest_value
        self.v_seq = None
        # SpikingJelly 2.0's BaseNode attribute that lava_exchange reads as the fixed-point scale
        # of a neuron converted to Lava (2^6); a plain attribute a user may tune, not used here
        self.lava_s_cale = 1 << 6

    # SpikingJelly 0.0.0.0.14 picks its implementation with backend= ('torch': the Python time
    # loop, 'cupy': its fused CUDA kernel). pypaper always runs its fused op, on the kernel the
    # device has (pypaper.use_backend chooses among them), so both names are accepted and kept
    # only so that models and functional.set_backend written for that release run unchanged.
    supported_backends = ("torch", "cupy")

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in self.supported_backends:
            raise ValueError(f"backend must be one of {self.supported_backends} (SpikingJelly's "
                             f"names; pypaper runs its fused kernel either way), got {value!r}")
        self._backend = value

    # ---- what subclasses define --------------------------------------------------------------

    def _decay(self) -> dict:
        """{"tau": ...} or {"k": ...} for ops.lif_multi_step, plus the name used in errors."""
        raise NotImplementedError(
            f"{type(self).__name__}: pypaper's BaseNode runs the fused LIF op and needs _decay() "
            f"(IFNode, LIFNode, ParametricLIFNode); neurons with dynamics of their own (a "
            f"neuronal_charge) subclass spikingjelly.activation_based.neuron.BaseNode, which mixes "
            f"with pypaper's")

    # ---- what SpikingJelly's MemoryModule does with the state ---------------------------------

    @property
    def store_v_seq(self) -> bool:
        return self._store_v_seq

    @store_v_seq.setter
    def store_v_seq(self, value: bool) -> None:
        self._store_v_seq = _flag(value, "store_v_seq")
        self.v_seq = None  # as SpikingJelly 2.0: a stale sequence is not kept

    def _apply(self, fn, recurse=True):
        # .to() / .half() / .cuda() move the carried membrane too (SpikingJelly's MemoryModule
        # converts its memories), instead of leaving it on the old device until the next call
        super()._apply(fn, recurse)
        # A state a torch.func.vmap left behind (_escaped_from_vmap) has no value to convert
        # (functorch raised "your tensor may have escaped", after the parameters above were
        # converted: the model was left half moved); it stays as it is, and the next forward
        # says to reset it
        if _held_tensor(self.v):
            self.v = fn(self.v)
        if _held_tensor(self.v_seq):
            self.v_seq = fn(self.v_seq)
        resets = self.__dict__.get("_memory_reset", {})
        for name, value in list(resets.items()):
            current = getattr(self, name)
            if _held_tensor(current):
                setattr(self, name, fn(current))
            # the reset values too (SpikingJelly's MemoryModule._apply moves _memories_rv): a
            # tensor reset value left behind made reset() after .double() / .to(bf16) / .cuda()
            # restore the memory in the old dtype or device, so the next step promoted a bf16
            # model's output to float32, or mixed devices
            if isinstance(value, torch.Tensor):
                resets[name] = fn(value)
        return self

    # ---- per-neuron parameters ----------------------------------------------------------------

    def _declare_per_neuron(self, name: str, shape: tuple) -> None:
        """``name`` was built with ``shape`` as its per-neuron (feature) shape: tau_shape,
        threshold_shape, a tensor tau. Only shapes of more than one element are kept: one value
        broadcasts to any input."""
        if math.prod(shape) != 1:
            self.__dict__.setdefault("_per_neuron_shapes", {})[name] = tuple(shape)

    def _check_per_neuron(self, x_seq: torch.Tensor, single: bool) -> None:
        """A parameter that still has the per-neuron shape its constructor declared must match
        the feature shape of this call (x.shape[1:] of one step, x.shape[2:] of a sequence) dim
        by dim: equal it, or have its rank with sizes of 1 where one value is shared ((C, 1, 1)
        against (C, H, W)).

        The op also takes a parameter of shape x.shape[1:] as one value per sample and neuron
        (the [N, C] threshold functional.set_threshold_margin assigns); a tensor assigned later
        with another shape still goes there. But a declared (C,) parameter is never per sample:
        taking it as one made [N, C] fed in step_mode 'm' (the time dim forgotten) run with the
        batch read as time, silently. And in step_mode 's' the op's message named the shapes of
        its internal [1, N, *] sequence, not the user's x. Other mismatches of a sequence
        are left to the op, whose message is right there."""
        declared = self.__dict__.get("_per_neuron_shapes")
        if not declared:
            return
        feat = tuple(x_seq.shape[2:])
        for name, shape in declared.items():
            p = getattr(self, name, None)
            if not isinstance(p, torch.Tensor) or tuple(p.shape) != shape:
                continue  # replaced after construction: the op checks it
            # one value per neuron: the feature shape, or one of its rank with sizes of 1 where
            # the value is shared ((C, 1, 1) for [N, C, H, W] steps: one per channel). The rank
            # must be the features': a declared (C,) taken as broadcasting over a leading dim
            # would run a sequence [T, N, C] fed in step_mode 's' (set_step_mode forgotten) as
            # one step of T samples with features (N, C), silently. (Ranks first, as
            # ops.broadcasts_to compares them: traced, sizes compared only where the ranks agree
            # guard less.)
            if len(shape) == len(feat) and ops.broadcasts_to(shape, feat):
                continue
            if not single and not (ops.broadcasts_to(shape, feat)
                                   or ops.broadcasts_to(shape, tuple(x_seq.shape[1:]))):
                continue  # the op refuses it, naming x's shapes as the user gave them
            # else the op would take it with another rank, or as one value per sample (a shape
            # that broadcasts to x.shape[1:] with the batch dim): never what a declared shape
            # means
            if single:
                x_shape, where, other = tuple(x_seq.shape[1:]), "x.shape[1:]", (
                    "step_mode 'm' takes a sequence [T, N, *] (functional.set_step_mode(net, "
                    "'m'))")
            else:
                x_shape, where, other = tuple(x_seq.shape), "x.shape[2:]", (
                    "step_mode 's' takes one step [N, *]")
            origin = {"w": "tau_shape", "v_threshold": "threshold_shape"}.get(
                name, "the tau tensor it was built with")
            raise ValueError(
                f"{type(self).__name__} in step_mode {'s' if single else 'm'!r} got x of shape "
                f"{x_shape}: its {name} has one value per neuron, of shape {shape} (from "
                f"{origin}), which must match the feature shape {where} = {feat} dim by dim "
                f"(each size equal, or 1 where one value is shared). Step mode "
                f"{'s' if single else 'm'!r} takes "
                f"{'one step [N, *]' if single else 'a sequence [T, N, *]'}; {other}")

    # ---- state -----------------------------------------------------------------------------

    def __getstate__(self):
        """copy.deepcopy / pickle / torch.save of the neuron: the carried state (v, v_seq,
        registered memories) as its values, detached where it is part of a graph. A non-leaf
        tensor cannot be deep-copied (torch raises "Only Tensors created explicitly by the user
        (graph leaves) support the deepcopy protocol"), so a model snapshot between a forward
        and the next reset failed; the graph itself cannot be copied, and a copy that continues
        from the detached values computes what the original computes. Leaves (a learnable
        initial membrane, an nn.Parameter the model owns) are kept as they are, so the copy
        maps them to the copied parameter."""
        state = self.__dict__.copy()
        names = ("v", "v_seq", *state.get("_memory_reset", {}))
        for name in names:
            value = state.get(name)
            if _escaped_from_vmap(value):
                # functorch cannot read its storage ("Cannot access storage of
                # BatchedTensorImpl"), and no single value of it is this module's state
                raise RuntimeError(self._escaped_message(name, "cannot be copied or saved"))
            if isinstance(value, torch.Tensor) and value.grad_fn is not None:
                state[name] = value.detach()
        return state

    def _escaped_message(self, name: str, what: str) -> str:
        """The error for state a call inside a torch.func transform left on the neuron."""
        which = ("membrane v" if name == "v" else "v_seq" if name == "v_seq"
                 else f"memory {name}")
        return (f"{type(self).__name__}'s {which} was left by a call inside a torch.func "
                f"transform (vmap / grad / jacrev) that has exited (inside vmap it is one value "
                f"per vmapped model or sample, none of them this module's); it {what}. Call "
                f"pypaper.snn.reset_net(model) (or neuron.reset()) first")

    def __setattr__(self, name: str, value) -> None:
        # The membrane, v_seq and registered memories are state, whatever is assigned: an
        # nn.Parameter (a learnable initial membrane the model owns, set with node.v = v0 or
        # base.load_memories) is kept as it is, as SpikingJelly's MemoryModule keeps it, instead
        # of being registered as this neuron's parameter, which made the next call's
        # self.v = v_last a TypeError
        if isinstance(value, nn.Parameter) and (
                name in ("v", "v_seq") or name in self.__dict__.get("_memory_reset", ())):
            object.__setattr__(self, name, value)
            return
        if name in _NUMBER_ATTRIBUTES:
            value = plain_number(value)
        elif name in _FLAG_ATTRIBUTES:
            value = _flag(value, name)
        elif name == "surrogate_function":
            # refused here, where the model is built, rather than at its first step
            check_surrogate_function(value)
        super().__setattr__(name, value)

    @property
    def step_mode(self) -> str:
        return self._step_mode

    @step_mode.setter
    def step_mode(self, value: str) -> None:
        if value not in _STEP_MODES:
            raise ValueError(f"step_mode must be 's' (single step) or 'm' (multi step), got "
                             f"{value!r}")
        self._step_mode = value

    @property
    def rest_value(self) -> float:
        """Where reset() puts the membrane, as in SpikingJelly: v_reset as constructed (0 for a
        soft reset), or what set_reset_value('v', value) set. Assigning v_reset later changes
        the reset after a spike, not this."""
        rest = self.__dict__.get("_v_rest")  # neurons pickled before it was kept
        return self._op_start if rest is None else rest

    @property
    def _op_start(self) -> float:
        """The membrane the op starts from when given none: v_reset, or 0 for a soft reset."""
        return 0.0 if self.v_reset is None else self.v_reset

    def reset(self) -> None:
        """Back to rest: v is the float rest value again, v_seq None, and every memory a
        subclass registered (register_memory) its reset value."""
        self.v = self.rest_value
        self.v_seq = None
        for name, value in self.__dict__.get("_memory_reset", {}).items():
            setattr(self, name, copy.deepcopy(value))

    def detach(self) -> None:
        """Cut the carried state from the graph (truncated BPTT). State a torch.func.vmap left
        behind is not in any graph of this module and cannot be computed with (functorch raised
        on its detach()): it is left for the next forward to refuse, or reset() to clear."""
        if _held_tensor(self.v):
            self.v = self.v.detach()
        if _held_tensor(self.v_seq):
            self.v_seq = self.v_seq.detach()
        for name in self.__dict__.get("_memory_reset", {}):
            value = getattr(self, name)
            if _held_tensor(value):
                setattr(self, name, value.detach())

    # ---- SpikingJelly 2.0's BaseNode reset helpers ------------------------------------------
    # Static helpers a subclass's step forward (or user code) may call on its own tensors. The
    # fused op does its own reset and never calls them, as SpikingJelly 2.0's IF / LIF / PLIF
    # do not either: overriding them changes neither library's neurons.

    @staticmethod
    def apply_hard_reset(v: torch.Tensor, spike: torch.Tensor, v_reset: float) -> torch.Tensor:
        """Hard reset: V = (1 - S) V + S V_reset (V where no spike, V_reset where one)."""
        return (1.0 - spike) * v + spike * v_reset

    @staticmethod
    def apply_soft_reset(v: torch.Tensor, spike: torch.Tensor,
                         v_threshold: float) -> torch.Tensor:
        """Soft reset: V = V - S V_threshold (the threshold subtracted where a spike fired)."""
        return v - spike * v_threshold

    # ---- SpikingJelly's MemoryModule API, for state of a subclass's own ----------------------

    def register_memory(self, name: str, value) -> None:
        """A state variable of a subclass (a trace, a spike counter) that reset() sets back to
        ``value`` (SpikingJelly's MemoryModule.register_memory). The membrane ``v`` is the
        neuron's own."""
        memories = self.__dict__.setdefault("_memory_reset", {})
        if name in ("v", "v_seq") or (name not in memories and hasattr(self, name)):
            raise MemoryExistsError(f"{name!r} is already an attribute of {type(self).__name__}")
        memories[name] = copy.deepcopy(value)
        setattr(self, name, copy.deepcopy(value))

    def set_reset_value(self, name: str, value) -> None:
        if name == "v":  # SpikingJelly's own HalfThresholdIFNode-style trick
            if not _finite_number(value):
                raise ValueError(f"the reset value of v must be a finite number, got {value!r}")
            self._v_rest = float(value)
            return
        self._memory(name)
        self._memory_reset[name] = copy.deepcopy(value)

    def get_reset_value(self, name: str):
        if name == "v":
            return self.rest_value
        self._memory(name)
        return self._memory_reset[name]

    def _memory(self, name: str) -> None:
        if name not in self.__dict__.get("_memory_reset", {}):
            raise MemoryKeyError(f"{type(self).__name__} has no memory {name!r} "
                                 f"(register_memory adds one)")

    def named_memories(self):
        """(name, value) of the membrane ``v`` and of each registered memory."""
        yield "v", self.v
        for name in self.__dict__.get("_memory_reset", {}):
            yield name, getattr(self, name)

    def memories(self):
        for _, value in self.named_memories():
            yield value

    def supported_step_mode(self) -> tuple:
        return _STEP_MODES

    def _refuse_exited_transform_state(self, v: torch.Tensor, tracing: bool) -> None:
        """Raise for a membrane that a call inside a torch.func transform left once the transform
        has exited. Outside every transform, using it failed with functorch's internal assert.
        Inside a later vmap call at the same level (the next chunk of vmap(f, chunk_size=k), the
        next vmap of a loop), functorch took the exited call's membranes, one per model or
        sample of that call, as this call's: the models of chunk 2 of an ensemble started from
        the final membranes of chunk 1's models, silently, so the result depended on chunk_size.
        A wrapper torch.func.grad alone left inside an enclosing transform still reads as the
        values it wraps (an inner grad of MAML-style code), and is taken as before.
        ``tracing``: torch.compiler.is_compiling(), which the caller has asked already."""
        if tracing:
            return
        f = torch._C._functorch
        if not f.is_functorch_wrapped_tensor(v):
            return
        if f.peek_interpreter_stack() is None:
            raise RuntimeError(self._escaped_message(
                "v", "cannot start a call outside the transform"))
        if _left_by_exited_vmap(v):
            raise RuntimeError(
                f"{type(self).__name__}'s membrane v was left by an earlier torch.func.vmap call "
                f"that has exited (the previous chunk of vmap(f, chunk_size=k), or a "
                f"previous vmap of the model): one value per vmapped model or sample of that "
                f"call, not of this one. Call pypaper.snn.reset_net(model) at the start of the "
                f"function you transform (or between the calls); to carry the membrane over time "
                f"steps, run all of them inside one vmap call (step_mode='m' on [T, N, *], or "
                f"the loop over t inside the function)")

    def _v_init(self, x_seq: torch.Tensor, tracing: bool) -> Optional[torch.Tensor]:
        """The carried membrane for this input, or None for rest. As in SpikingJelly, a state of
        another shape (a new batch size) restarts from rest."""
        v = self.v
        shape = tuple(x_seq.shape[1:])
        if isinstance(v, torch.Tensor):
            self._refuse_exited_transform_state(v, tracing)
            return v if tuple(v.shape) == shape else None
        if float(v) == self._op_start:
            return None
        return torch.full(shape, float(v), dtype=x_seq.dtype, device=x_seq.device)

    # ---- forward ---------------------------------------------------------------------------

    def _run(self, x_seq: torch.Tensor, store_v_seq: bool, single: bool = False):
        tracing = torch.compiler.is_compiling()
        v_init = self._v_init(x_seq, tracing)
        if (isinstance(v_init, torch.Tensor) and tracing and torch.is_grad_enabled()
                and self.__dict__.get("_v_maybe_inference", False)):
            # The membrane a call under torch.inference_mode left (a validation loop: Lightning's
            # default) is an inference tensor; the op saves v_init for its backward (the CPU
            # backward reruns the forward from it), and autograd refuses to save one ("Inference
            # tensors cannot be saved for backward"). Eager calls copy it in ops.lif_multi_step,
            # which asks v.is_inference(); traced code cannot ask (dynamo refuses is_inference
            # and is_inference_mode_enabled), so the copy is made here, from a flag dynamo
            # guards on: only the graph of the first grad call after such a call pays for it.
            # An op of its own, not v_init.clone(): inductor's partitioner recomputes a clone
            # in the backward and saves the inference tensor v_init instead (membrane_copy).
            v_init = _registration.membrane_copy(v_init)
        spikes, v_last, v_seq = self._step_op(x_seq, v_init, store_v_seq, single)
        # kept attached under SLTT too (as SpikingJelly's SLTTLIFNode keeps it): a loss on the
        # membrane (a readout of .v, or of the 's'-mode v_seq) backpropagates through this call
        if not tracing and torch._C._functorch.peek_interpreter_stack() is not None:
            # written inside a transform: mark which vmap calls it belongs to
            tokens = _vmap_call_tokens()
            if tokens:
                setattr(v_last, _VMAP_CALLS, tokens)
        self.v = v_last
        # whether v may be an inference tensor: eager, whether inference_mode is on; traced,
        # whether grad is off (the most dynamo can tell: inference_mode turns it off). A dict
        # entry, not an attribute: Module.__setattr__ costs a microsecond a call.
        self.__dict__["_v_maybe_inference"] = (
            not torch.is_grad_enabled() if tracing else torch.is_inference_mode_enabled())
        return spikes, v_seq

    def _step_op(self, x_seq: torch.Tensor, v_init: Optional[torch.Tensor], store_v_seq: bool,
                 single: bool = False):
        """The fused op on [T, N, *] from v_init (None: rest): (spikes, v_last, v_seq).
        ``single``: x_seq is one step [N, *] unsqueezed (for the messages)."""
        self._check_per_neuron(x_seq, single)
        decay = self._decay()
        if self.sltt and isinstance(v_init, torch.Tensor):
            # SLTT charges from V.detach() anyway: entering detached, the carried membrane holds
            # no edge to the previous call's graph, which is freed once nothing else needs it
            v_init = v_init.detach()
        spikes, v_last, v_seq = ops.lif_multi_step(
            x_seq, v_init, v_threshold=self.v_threshold, v_reset=self.v_reset,
            surrogate_function=self.surrogate_function, decay_input=self.decay_input,
            detach_reset=self.detach_reset, sltt=self.sltt, store_v_seq=store_v_seq,
            learnable_threshold=self.__dict__.get("_learnable_threshold", False), **decay)
        return spikes, v_last, v_seq

    # ---- explicit state (SpikingJelly 2.0's MemoryModule functional API) --------------------
    # states follow named_memories(): (v, *registered memories); these methods read and change
    # neither the module's state nor the states passed in, and return the updated tuple (the
    # registered memories unchanged: the fused op updates v only).

    def materialize_states(self, inputs: tuple, states: tuple, step_mode: str) -> tuple:
        """states with v as a tensor of one step's shape (x[0] in 'm' mode, x in 's'), in x's
        dtype and device: a float v fills it, a tensor of another shape restarts at v_reset (0
        for a soft reset; not the reset value, as in SpikingJelly's)."""
        x = inputs[0][0] if step_mode == "m" else inputs[0]
        v = states[0]
        if isinstance(v, torch.Tensor):
            if v.shape != x.shape:  # restarts at v_reset (0 for a soft reset), as SpikingJelly's
                v = torch.full_like(x, self._op_start)  # and the module's own forward
            elif v.dtype != x.dtype or v.device != x.device:
                v = v.to(dtype=x.dtype, device=x.device)
        else:
            v = torch.full_like(x, float(v))
        return (v, *states[1:])

    def multi_step_functional_forward(self, inputs: tuple, states: tuple, **kwargs) -> tuple:
        """((spike_seq,), (v_last, *rest)) for x_seq = inputs[0] of shape [T, N, *] (or [T]),
        from the membrane states[0] (materialized: a tensor of x_seq[0]'s shape)."""
        x_seq = _as_float(inputs[0])
        v = states[0]
        single = bool(kwargs.get("_single_step"))  # from single_step_functional_forward
        if x_seq.dim() == 1:  # [T]: one neuron
            spikes, v_last, _ = self._step_op(x_seq[:, None], v.reshape(1), False, single)
            return (spikes[:, 0],), (v_last.reshape(()), *states[1:])
        spikes, v_last, _ = self._step_op(x_seq, v, False, single)
        return (spikes,), (v_last, *states[1:])

    def single_step_functional_forward(self, inputs: tuple, states: tuple, **kwargs) -> tuple:
        """((spike,), (v, *rest)): one step of inputs[0] from the membrane states[0]."""
        x = _as_float(inputs[0])
        (spikes,), out_states = self.multi_step_functional_forward(
            (x.unsqueeze(0),), (states[0].unsqueeze(0) if x.dim() == 0 else states[0],
                                *states[1:]), _single_step=True)
        v = out_states[0]
        return (spikes.squeeze(0),), ((v.reshape(()) if x.dim() == 0 else v), *out_states[1:])

    def functional_forward(self, inputs: tuple, states: tuple, **kwargs) -> tuple:
        """SpikingJelly 2.0's MemoryModule.functional_forward: materialize_states, then the
        single- or multi-step functional forward of the module's step_mode."""
        states = self.materialize_states(inputs, tuple(states), self.step_mode)
        if self.step_mode == "s":
            return self.single_step_functional_forward(inputs, states, **kwargs)
        return self.multi_step_functional_forward(inputs, states, **kwargs)

    def _state_as_one_neuron(self) -> None:
        """Before a 0-d step (or a [T] sequence): the carried 0-d membrane as the [1] state of
        the call on one neuron; a membrane of any other shape restarts from rest, as any shape
        change does (a [1] state left by a [1] input is not a 0-d input's)."""
        if isinstance(self.v, torch.Tensor):
            self._refuse_exited_transform_state(self.v, torch.compiler.is_compiling())
            self.v = (_same_vmap_calls(self.v.reshape(1), self.v) if self.v.dim() == 0
                      else self.rest_value)

    def single_step_forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        x = _as_float(x)
        if x.dim() == 0:  # one neuron, as SpikingJelly's elementwise step takes it
            self._state_as_one_neuron()
            if isinstance(self.v_seq, torch.Tensor) and self.v_seq.dim() == 1:
                self.v_seq = self.v_seq.reshape(-1, 1)  # [steps] -> [steps, 1], extended below
            out = self.single_step_forward(x.reshape(1))
            self.v = _same_vmap_calls(self.v.reshape(()), self.v)
            if isinstance(self.v_seq, torch.Tensor):
                self.v_seq = self.v_seq.reshape(-1)
            return out.reshape(())
        spikes, _ = self._run(x.unsqueeze(0), False, single=True)
        if self.store_v_seq:
            step = self.v.unsqueeze(0)
            same = (isinstance(self.v_seq, torch.Tensor) and self.v_seq.shape[1:] == step.shape[1:]
                    and self.v_seq.dtype == step.dtype and self.v_seq.device == step.device)
            self.v_seq = torch.cat((self.v_seq, step)) if same else step.clone()
        # A view: select's backward (spikes[0]) would zero-fill a [1, N] gradient every step.
        return spikes.squeeze(0)

    def multi_step_forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        if isinstance(x_seq, torch.Tensor):
            x_seq = _as_float(x_seq)
            if x_seq.dim() == 1:  # [T]: one neuron, its state 0-d (as SpikingJelly's loop has it)
                self._state_as_one_neuron()
                spikes, v_seq = self._run(x_seq[:, None], self.store_v_seq)
                self.v = _same_vmap_calls(self.v.reshape(()), self.v)
                self.v_seq = None if v_seq is None else v_seq[:, 0]
                return spikes[:, 0]
        spikes, v_seq = self._run(x_seq, self.store_v_seq)
        self.v_seq = v_seq
        return spikes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.step_mode == "s":
            return self.single_step_forward(x)
        return self.multi_step_forward(x)

    def extra_repr(self) -> str:
        vth = self.v_threshold
        vth = f"shape {tuple(vth.shape)}" if isinstance(vth, torch.Tensor) else vth
        return (f"v_threshold={vth}, v_reset={self.v_reset}, detach_reset={self.detach_reset}, "
                f"step_mode={self.step_mode}, sltt={self.sltt}")


class IFNode(BaseNode):
    """Integrate-and-fire neuron, drop-in for SpikingJelly's IFNode: no leak,

        H = V + X;   S = Theta(H - V_threshold);   reset as LIFNode's (hard, or soft for None).

    The fused LIF op with k = 1/tau = 0 and no input decay: V - (V - V_reset) * 0 + X is V + X
    to the bit, so spikes and membrane equal SpikingJelly's in fp32 and the backward is the same
    reverse scan (dH/dV = 1, dH/dX = 1).
    """

    decay_input = False

    def __init__(self, v_threshold: float = 1.0, v_reset: Optional[float] = 0.0,
                 surrogate_function: Optional[nn.Module] = None, detach_reset: bool = False,
                 step_mode: str = "s", store_v_seq: bool = False, *, backend: str = "torch",
                 sltt: bool = False, learnable_threshold: bool = False,
                 threshold_shape: Optional[Sequence[int]] = None):
        super().__init__(v_threshold, v_reset, surrogate_function, detach_reset, step_mode,
                         store_v_seq, backend=backend, sltt=sltt,
                         learnable_threshold=learnable_threshold, threshold_shape=threshold_shape)

    def _decay(self) -> dict:
        return {"k": 0.0, "tau_name": "k"}


class LIFNode(BaseNode):
    """Leaky integrate-and-fire neuron, drop-in for SpikingJelly's LIFNode.

        H = V + (X - (V - V_reset)) / tau   (decay_input)   or   V - (V - V_reset) / tau + X
        S = Theta(H - V_threshold);  V = H (1 - S) + V_reset S  (hard)  or  H - V_threshold S (soft)

    ``tau``: a number > 1, or a tensor of time constants > 1 of the feature shape (a fixed
    heterogeneous population, kept as a buffer).
    """

    def __init__(self, tau: float = 2.0, decay_input: bool = True, v_threshold: float = 1.0,
                 v_reset: Optional[float] = 0.0, surrogate_function: Optional[nn.Module] = None,
                 detach_reset: bool = False, step_mode: str = "s", store_v_seq: bool = False, *,
                 backend: str = "torch", sltt: bool = False, learnable_threshold: bool = False,
                 threshold_shape: Optional[Sequence[int]] = None):
        super().__init__(v_threshold, v_reset, surrogate_function, detach_reset, step_mode,
                         store_v_seq, backend=backend, sltt=sltt,
                         learnable_threshold=learnable_threshold, threshold_shape=threshold_shape)
        if isinstance(tau, torch.Tensor):
            if not tau.is_floating_point():
                raise TypeError(f"tau must be a floating tensor, got {tau.dtype}")
            # a meta tau (a model built under torch.device("meta")) has no values to check
            if not tau.is_meta and not bool(torch.all(torch.isfinite(tau) & (tau > 1))):
                raise ValueError("tau must be finite and > 1 for every neuron")
            self.register_buffer("tau", tau.detach().clone())
            self._declare_per_neuron("tau", tuple(tau.shape))
        else:
            if not _finite_number(tau) or not tau > 1:
                raise ValueError(f"tau must be a finite number > 1, got {tau!r}")
            self.tau = float(tau)
        self.decay_input = decay_input  # checked by BaseNode.__setattr__ (_flag)

    def _decay(self) -> dict:
        return {"tau": self.tau, "tau_name": "tau"}

    def extra_repr(self) -> str:
        tau = f"shape {tuple(self.tau.shape)}" if isinstance(self.tau, torch.Tensor) else self.tau
        return super().extra_repr() + f", tau={tau}"


def plif_k(w: torch.Tensor) -> torch.Tensor:
    """PLIF's k = 1/tau = sigmoid(w), held at or above k_min with zero gradient below it.

    sigmoid(w) rounds to 0 at w <= -17.34 in fp16, about -88.72 in fp32 / bf16 and -709.8 in fp64,
    where SpikingJelly's neuron stops integrating (H = V + (X - V + Vr) * 0 = V) and w's gradient is
    0 (sigmoid' = 0). The fused backward forms the decay gradient as (H - V) / k from H (it keeps H,
    not X - V + Vr), which has no value at k = 0 and overflows float32 below about 2.9e-39, so the
    op refuses such a k for a caller who wants its gradient. Here w's gradient at those points is
    sigmoid'(w) * dL/dk: 0 where k is 0 and below 2^-126 |dL/dk| where k is subnormal.
    Clamping k at k_min keeps w's gradient 0 there and the op's arithmetic finite. k_min is
    float32's smallest normal number 2^-126 (w < -87.3; fp64 w too, whose k the op casts to
    float32 for float32 input), and in fp16 its smallest subnormal 2^-24, so there only an exact
    0 moves. Spikes are SpikingJelly's; the membrane differs from its by at most
    k_min * |X - V + Vr| per step."""
    k = w.sigmoid()
    return k.clamp_min(2.0 ** -24 if k.dtype == torch.float16 else 2.0 ** -126)


class ParametricLIFNode(BaseNode):
    """Parametric LIF (PLIF; Fang et al., "Incorporating Learnable Membrane Time Constant to
    Enhance Learning of Spiking Neural Networks", ICCV 2021), drop-in for SpikingJelly's.

    The LIF dynamics with a learnable 1/tau = sigmoid(w), w initialised to -log(init_tau - 1).
    ``tau_shape``: None for one w per layer, the feature shape for one w per neuron
    (heterogeneous, learnable time constants), or a shape of the features' rank with sizes of 1
    where one w is shared: (C, 1, 1) for [N, C, H, W] steps is one w per channel.
    """

    def __init__(self, init_tau: float = 2.0, decay_input: bool = True, v_threshold: float = 1.0,
                 v_reset: Optional[float] = 0.0, surrogate_function: Optional[nn.Module] = None,
                 detach_reset: bool = False, step_mode: str = "s", store_v_seq: bool = False, *,
                 tau_shape: Optional[Sequence[int]] = None, backend: str = "torch",
                 sltt: bool = False, learnable_threshold: bool = False,
                 threshold_shape: Optional[Sequence[int]] = None):
        super().__init__(v_threshold, v_reset, surrogate_function, detach_reset, step_mode,
                         store_v_seq, backend=backend, sltt=sltt,
                         learnable_threshold=learnable_threshold, threshold_shape=threshold_shape)
        if not _finite_number(init_tau) or not init_tau > 1:
            raise ValueError(f"init_tau must be a finite number > 1, got {init_tau!r}")
        shape = _shape(tau_shape, "tau_shape") if tau_shape is not None else ()
        self.w = nn.Parameter(torch.full(shape, -math.log(init_tau - 1.0)))
        self._declare_per_neuron("w", shape)
        self.decay_input = decay_input  # checked by BaseNode.__setattr__ (_flag)

    def _decay(self) -> dict:
        return {"k": plif_k(self.w), "tau_name": "w (tau_shape)"}

    def extra_repr(self) -> str:
        w = self.w
        if w.numel() == 1 and not w.is_meta and type(w) in (torch.Tensor, nn.Parameter):
            with torch.no_grad():
                tau = float(1.0 / w.sigmoid())
        else:
            # one per neuron, or a w that holds no value to read here: a model built under
            # torch.device("meta") (deferred init; print(model) raised "Tensor.item() cannot
            # be called on meta tensors"), a tensor subclass (a sharded DTensor, a fake tensor)
            tau = f"shape {tuple(w.shape)}" + (" (meta)" if w.is_meta else "")
        return super().extra_repr() + f", tau={tau}"


_OWN_NAMES = ["BaseNode", "IFNode", "LIFNode", "ParametricLIFNode"]


# Names this module lacks come from SpikingJelly (pypaper/snn/spikingjelly_fallback.py).
# __all__ too: pypaper's names, then SpikingJelly's (a star import gets both).
__getattr__ = spikingjelly_fallback.forwarder(__name__, "neuron", _OWN_NAMES)
