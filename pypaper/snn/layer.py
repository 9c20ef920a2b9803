"""Stateless layers with a step mode, drop-in for ``spikingjelly.activation_based.layer``.

A SpikingJelly model imports its layers next to its neurons,

    from spikingjelly.activation_based import neuron, layer, functional, surrogate
    net = nn.Sequential(layer.Conv2d(1, 8, 3, padding=1), layer.BatchNorm2d(8), neuron.IFNode(),
                        layer.MaxPool2d(2), layer.Flatten(), layer.Linear(8 * 14 * 14, 10),
                        neuron.LIFNode())
    functional.set_step_mode(net, "m")

and runs unchanged with ``from pypaper.snn import neuron, layer, functional, surrogate``: the same
class names, constructor arguments (positions included: ``step_mode`` follows torch's arguments,
as in SpikingJelly) and defaults, the same parameter and buffer names (a SpikingJelly state_dict
loads), the same results.

step_mode 's' runs the torch layer on one step [N, *]. step_mode 'm' takes a sequence [T, N, *]:
a stateless layer sees every step at once, flattened to [T * N, *] (one conv / pool / norm call
for the whole sequence instead of T), and the result is split back into [T, N, *]
(``functional.seq_to_ann_forward``). BatchNorm therefore normalises over time and batch together,
as in SpikingJelly. ``Dropout`` is the one layer here with state: its mask is drawn at the first
step and kept for every step until ``reset()`` (Rathi et al. 2020; SpikingJelly's semantics).

Containers: ``SeqToANNContainer`` (flatten T into the batch around its children),
``MultiStepContainer`` (run single-step children once per step), ``StepModeContainer``. Their
children stay in step mode 's'; ``functional.set_step_mode`` leaves them alone.
"""
from __future__ import annotations

import copy
import functools
import inspect
import math
import numbers
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import spikingjelly_fallback
from .functional import multi_step_forward, seq_to_ann_forward
from .neuron import MemoryExistsError, MemoryKeyError

_STEP_MODES = ("s", "m")


class StepModule:
    """A ``step_mode`` ('s' or 'm') checked on assignment, shown in the repr."""

    supported_step_modes = _STEP_MODES

    @property
    def step_mode(self) -> str:
        return self._step_mode

    @step_mode.setter
    def step_mode(self, value: str) -> None:
        supported = self.supported_step_mode()
        if value not in supported:
            raise ValueError(f"{type(self).__name__}: step_mode must be one of "
                             f"{supported}, got {value!r}")
        self._step_mode = value

    def supported_step_mode(self) -> tuple:
        """The step modes this module runs in (SpikingJelly's StepModule method; its setter
        checks against it, so a subclass that overrides it restricts its modes, as there)."""
        return tuple(self.supported_step_modes)

    def extra_repr(self) -> str:
        inner = super().extra_repr()
        return f"{inner}, step_mode={self.step_mode}" if inner else f"step_mode={self.step_mode}"


@functools.lru_cache(maxsize=None)
def _torch_positional(torch_cls: type) -> int:
    """How many of ``torch_cls``'s constructor arguments SpikingJelly's wrapper takes before its
    ``step_mode``: all but torch's factory keywords (device, dtype), which SpikingJelly lacks."""
    n = 0
    for p in list(inspect.signature(torch_cls.__init__).parameters.values())[1:]:
        if p.kind is not p.POSITIONAL_OR_KEYWORD or p.name in ("device", "dtype"):
            break
        n += 1
    return n


def _torch_layer(cls: type) -> type:
    """The torch layer ``cls`` wraps: the first torch.nn class in its MRO that is not itself a
    step-mode wrapper. torch.nn.utils.parametrize (weight_norm, spectral_norm, orthogonal)
    swaps a module's class for a subclass it builds, ``ParametrizedConv2d(layer.Conv2d)``, whose
    ``__module__`` is torch.nn.utils.parametrize: taken for the torch layer, its constructor
    signature (ours) and forward (ours again: endless recursion in BatchNorm's super_forward)
    stood in for nn.Conv2d's."""
    return next(c for c in cls.__mro__
                if c.__module__.startswith("torch.nn") and issubclass(c, nn.Module)
                and not issubclass(c, _SeqToANN))


def _signature(torch_cls: type) -> inspect.Signature:
    """torch's constructor arguments with ``step_mode`` after the positional ones SpikingJelly
    takes (device and dtype, torch's extras, keyword-only after it)."""
    params = list(inspect.signature(torch_cls.__init__).parameters.values())[1:]
    n = _torch_positional(torch_cls)
    step = inspect.Parameter("step_mode", inspect.Parameter.POSITIONAL_OR_KEYWORD, default="s")
    rest = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) if p.kind is p.POSITIONAL_OR_KEYWORD
            else p for p in params[n:]]
    return inspect.Signature(params[:n] + [step] + rest)


class _ClassSignature:
    """``__signature__`` for the class only: inspect.signature(Conv2d) is the constructor's,
    inspect.signature(conv) stays the call's (None here: inspect goes on to ``__call__``, as for
    any nn.Module). A plain class attribute is read through the instance too (inspect looks
    at obj.__signature__ first), so a tool that binds a module's call arguments with it
    (torch's dynamo_graph_capture_for_export: inspect.signature(mod).bind(x)) was told that
    conv(x) lacks out_channels."""

    def __init__(self, signature: Optional[inspect.Signature]):
        self.signature = signature

    def __get__(self, obj, objtype=None) -> Optional[inspect.Signature]:
        return self.signature if obj is None else None


class _SeqToANN(StepModule):
    """A torch layer with a step mode; 'm' runs it once on [T * N, *] (seq_to_ann_forward).

    ``_m_ranks``: the input ranks step mode 'm' accepts (None: any), with ``_m_shape`` naming
    them in the error, as SpikingJelly's checks do."""

    _m_ranks: Optional[tuple] = None
    _m_shape = "[T, N, *]"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if not issubclass(cls, nn.Module):  # a mixin such as _BatchNormSteps: no torch layer yet
            return
        cls._torch_cls = _torch_layer(cls)
        # for inspect, IDEs, config tools, where the constructor that runs is _SeqToANN's
        # generic one; a user's subclass with an __init__ of its own, and the subclasses of that
        # one, keep the nearest __init__'s signature
        # (None: inspect reads that __init__, not the parent's __signature__)
        own_init = next(c for c in cls.__mro__ if "__init__" in c.__dict__)
        cls.__signature__ = _ClassSignature(_signature(cls._torch_cls)
                                            if own_init is _SeqToANN else None)

    def __init__(self, *args, step_mode: str = "s", **kwargs):
        torch_cls = self._torch_cls
        n = _torch_positional(torch_cls)
        if len(args) > n:  # SpikingJelly's positional step_mode, right after torch's arguments
            if len(args) > n + 1 or "step_mode" in kwargs:
                raise TypeError(f"{type(self).__name__} takes at most {n + 1} positional "
                                f"arguments ({torch_cls.__name__}'s {n} and step_mode), got "
                                f"{len(args)}")
            step_mode = args[n]
            args = args[:n]
        super().__init__(*args, **kwargs)
        self.step_mode = step_mode

    def forward(self, x):
        if self.step_mode == "s":
            return super().forward(x)
        if self._m_ranks is not None and x.dim() not in self._m_ranks:
            raise ValueError(f"{type(self).__name__} in step_mode 'm' expects x of shape "
                             f"{self._m_shape}, got shape {tuple(x.shape)}")
        # the bound super().forward wrapped in a partial: dynamo on torch 2.11 cannot trace the
        # isinstance checks of functional._apply on a super() method object (graph break, an
        # error under fullgraph); a partial it traces on every release
        return seq_to_ann_forward(x, functools.partial(super().forward))


_1D, _2D, _3D = ((4,), "[T, N, C, L]"), ((5,), "[T, N, C, H, W]"), ((6,), "[T, N, C, D, H, W]")


class Linear(_SeqToANN, nn.Linear):
    """nn.Linear with a step mode. nn.Linear maps the last dim of any rank, so 'm' needs no
    flattening: [T, N, in] -> [T, N, out] in one matmul either way."""

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class Flatten(_SeqToANN, nn.Flatten):
    """nn.Flatten with a step mode: in 'm' start_dim counts from [T * N, ...], so the default
    flattens [T, N, C, H, W] to [T, N, C * H * W]."""

    def forward(self, x):
        if self.step_mode == "m" and isinstance(x, torch.Tensor) and x.dim() >= 3:
            # dims d >= 1 of the [T * N, *] view are dims d + 1 of [T, N, *] (negative ones
            # count from the end in both), so flattening [T * N, *] and splitting it back is
            # x.flatten(start + 1, end + 1): the same values and shape in one view. The
            # round trip flatten(0, 1) -> flatten -> unflatten(0, (T, N)) chains three views,
            # and with a symbolic batch torch's view of a view guards
            # N * min(F, F * N) == F * N (F: the flattened features), which torch.export
            # cannot prove over a Dim's range: a CSNN ending in Flatten -> Linear exported
            # with a dynamic batch was refused ("Constraints violated"). A start or end at the
            # merged T * N dim itself, or an invalid pair, takes the round trip (and its
            # errors, numbered as the user gave them).
            rank = x.dim() - 1
            start = self.start_dim + rank if self.start_dim < 0 else self.start_dim
            end = self.end_dim + rank if self.end_dim < 0 else self.end_dim
            if 1 <= start <= end < rank:
                return x.flatten(start + 1, end + 1)
        return super().forward(x)


class Conv1d(_SeqToANN, nn.Conv1d):
    _m_ranks, _m_shape = _1D


class Conv2d(_SeqToANN, nn.Conv2d):
    _m_ranks, _m_shape = _2D


class Conv3d(_SeqToANN, nn.Conv3d):
    _m_ranks, _m_shape = _3D


class ConvTranspose1d(_SeqToANN, nn.ConvTranspose1d):
    _m_ranks, _m_shape = _1D


class ConvTranspose2d(_SeqToANN, nn.ConvTranspose2d):
    _m_ranks, _m_shape = _2D


class ConvTranspose3d(_SeqToANN, nn.ConvTranspose3d):
    _m_ranks, _m_shape = _3D


class _BatchNormSteps(_SeqToANN):
    """SpikingJelly's BatchNorm layers run both step modes through ``super_forward`` (torch's
    forward on one [N, *] or [T * N, *] batch): a subclass that overrides it changes both."""

    def super_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._torch_cls.forward(self, x)

    def forward(self, x):
        if self.step_mode == "s":
            return self.super_forward(x)
        if x.dim() not in self._m_ranks:
            raise ValueError(f"{type(self).__name__} in step_mode 'm' expects x of shape "
                             f"{self._m_shape}, got shape {tuple(x.shape)}")
        return seq_to_ann_forward(x, self.super_forward)


class BatchNorm1d(_BatchNormSteps, nn.BatchNorm1d):
    """Statistics over T * N (and L) together in step mode 'm'."""
    _m_ranks, _m_shape = (3, 4), "[T, N, C] or [T, N, C, L]"


class BatchNorm2d(_BatchNormSteps, nn.BatchNorm2d):
    """Statistics over T * N * H * W together in step mode 'm'."""
    _m_ranks, _m_shape = _2D


class BatchNorm3d(_BatchNormSteps, nn.BatchNorm3d):
    _m_ranks, _m_shape = _3D


class GroupNorm(_SeqToANN, nn.GroupNorm):
    pass


class MaxPool1d(_SeqToANN, nn.MaxPool1d):
    _m_ranks, _m_shape = _1D


class MaxPool2d(_SeqToANN, nn.MaxPool2d):
    _m_ranks, _m_shape = _2D


class MaxPool3d(_SeqToANN, nn.MaxPool3d):
    _m_ranks, _m_shape = _3D


class AvgPool1d(_SeqToANN, nn.AvgPool1d):
    _m_ranks, _m_shape = _1D


class AvgPool2d(_SeqToANN, nn.AvgPool2d):
    _m_ranks, _m_shape = _2D


class AvgPool3d(_SeqToANN, nn.AvgPool3d):
    _m_ranks, _m_shape = _3D


class AdaptiveAvgPool1d(_SeqToANN, nn.AdaptiveAvgPool1d):
    _m_ranks, _m_shape = _1D


class AdaptiveAvgPool2d(_SeqToANN, nn.AdaptiveAvgPool2d):
    _m_ranks, _m_shape = _2D


class AdaptiveAvgPool3d(_SeqToANN, nn.AdaptiveAvgPool3d):
    _m_ranks, _m_shape = _3D


class Upsample(_SeqToANN, nn.Upsample):
    pass


class VotingLayer(StepModule, nn.Module):
    """Population voting: the mean of each group of ``voting_size`` consecutive outputs,
    [..., C * voting_size] -> [..., C] (SpikingJelly's VotingLayer)."""

    def __init__(self, voting_size: int = 10, step_mode: str = "s"):
        super().__init__()
        if (isinstance(voting_size, bool) or not isinstance(voting_size, numbers.Integral)
                or voting_size < 1):
            raise ValueError(f"voting_size must be a positive int, got {voting_size!r}")
        self.voting_size = int(voting_size)
        self.step_mode = step_mode

    def single_step_forward(self, x: torch.Tensor) -> torch.Tensor:
        # a mean over the last dim's groups is the same in 's' and 'm': no flattening needed.
        # Leftover features (the last dim not a multiple of voting_size) are dropped, as
        # avg_pool1d drops them in SpikingJelly's.
        # The leading dims are named, not inferred (-1): an empty batch or sequence ([0, C * v],
        # [T, 0, C * v]) has 0 elements, which reshape cannot divide into a -1, and SpikingJelly's
        # gives [0, C] / [T, 0, C] there.
        v = self.voting_size
        lead = x.shape[:-1]
        y = F.avg_pool1d(x.reshape(math.prod(lead), 1, x.shape[-1]), v, v)
        return y.reshape(*lead, y.shape[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.step_mode == "m"
                and type(self).single_step_forward is not VotingLayer.single_step_forward):
            # a subclass's own step (SpikingJelly runs 'm' as its step on [T * N, *])
            return seq_to_ann_forward(x, self.single_step_forward)
        return self.single_step_forward(x)

    def extra_repr(self) -> str:
        return f"voting_size={self.voting_size}, " + super().extra_repr()


class Dropout(StepModule, nn.Module):
    """Dropout whose mask is drawn once per sample sequence: at the first step after
    ``reset()``, then kept for every step (in 'm' mode one [N, *] mask for all T steps) until the
    next ``reset()`` (``functional.reset_net``). Per-step masks would average dropout out over
    the sequence (Rathi et al., "Enabling Spike-based Backpropagation for Training Deep Neural
    Network Architectures", 2020). The mask holds 0 or 1 / (1 - p), drawn as
    F.dropout(ones) draws it, so a seeded run draws what SpikingJelly's does; eval: identity.
    An input of another shape (a new batch size without reset()) draws a new mask, where
    SpikingJelly's raises a broadcast error.

    The mask is state, not a buffer (as SpikingJelly's memories): it appears after the first
    step, and a buffer list that grows would break tools that pair two copies' buffers
    (AveragedModel(use_buffers=True), DDP's buffer broadcast) and state_dict round trips. It
    follows .to() / .half() like the neurons' membrane."""

    def __init__(self, p: float = 0.5, step_mode: str = "s"):
        super().__init__()
        if isinstance(p, torch.Tensor) and p.numel() == 1:
            p = p.item()
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 <= p < 1:
            raise ValueError(f"p must be a number in [0, 1), got {p!r}")
        self.p = float(p)
        self.step_mode = step_mode
        self.mask = None
        # SpikingJelly's MemoryModule state: each memory's reset value, the mask's first (None:
        # drawn again at the next step); a subclass adds its own with register_memory
        self._memory_reset = {"mask": None}

    def _reset_values(self) -> dict:
        # a Dropout pickled before the reset values were kept had the mask alone, reset to None
        return self.__dict__.setdefault("_memory_reset", {"mask": None})

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        resets = self._reset_values()
        for name, rest in list(resets.items()):
            value = getattr(self, name)
            if isinstance(value, torch.Tensor):
                setattr(self, name, fn(value))
            if isinstance(rest, torch.Tensor):  # a fixed mask / tensor reset value moves too
                resets[name] = fn(rest)
        return self

    def create_mask(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(torch.ones_like(x), self.p, training=True)

    def reset(self) -> None:
        """Every memory back to its reset value: the mask to None (a new one is drawn at the
        next step), a subclass's registered memories to theirs."""
        for name, value in self._reset_values().items():
            setattr(self, name, copy.deepcopy(value))

    def detach(self) -> None:
        """Cut the mask (and registered memories) from any graph (SpikingJelly's
        MemoryModule.detach; a drawn mask has none, one loaded with ``base.load_memories``
        may)."""
        for name in self._reset_values():
            value = getattr(self, name)
            if isinstance(value, torch.Tensor):
                setattr(self, name, value.detach())

    # SpikingJelly's MemoryModule API (its Dropout is one): a subclass's own state, which
    # reset() / reset_net, detach_net, base.extract_memories and functional.checkpoint handle
    # with the mask

    def register_memory(self, name: str, value) -> None:
        """A state variable that reset() sets back to ``value``."""
        memories = self._reset_values()
        if name in memories or hasattr(self, name):
            raise MemoryExistsError(f"{name!r} is already an attribute of "
                                    f"{type(self).__name__}")
        memories[name] = copy.deepcopy(value)
        setattr(self, name, copy.deepcopy(value))

    def set_reset_value(self, name: str, value) -> None:
        """What reset() puts in the memory ``name`` (for the mask: a fixed mask instead of a
        new draw per sequence)."""
        self._memory(name)
        self._reset_values()[name] = copy.deepcopy(value)

    def get_reset_value(self, name: str):
        self._memory(name)
        return self._reset_values()[name]

    def _memory(self, name: str) -> None:
        if name not in self._reset_values():
            raise MemoryKeyError(f"{type(self).__name__} has no memory {name!r} "
                                 f"(register_memory adds one)")

    def named_memories(self):
        """The mask, as SpikingJelly's Dropout registers it (a memory; see pypaper.snn.base),
        then the memories a subclass registered."""
        for name in self._reset_values():
            yield name, getattr(self, name)

    def memories(self):
        for _, value in self.named_memories():
            yield value

    # ---- explicit state (SpikingJelly 2.0's MemoryModule functional API) --------------------
    # states: (mask,), as named_memories() yields it; these methods leave the module's mask
    # alone and return the mask the step used (drawn when the state is None or of another
    # shape than one step of the input, as the module's forward draws it).

    def _apply_mask(self, x: torch.Tensor, multi_step: bool, mask):
        if not self.training:  # before x[0]: an empty sequence (T = 0) passes through in eval
            return x, mask
        step = x[0] if multi_step else x
        if mask is None or mask.shape != step.shape:  # new sequence or batch size
            mask = self.create_mask(step.detach())
        elif (not torch.compiler.is_compiling() and mask.is_inference()
              and not torch.is_inference_mode_enabled()):
            # drawn by a pass under torch.inference_mode: y = x * mask keeps mask for dL/dx,
            # and autograd refuses to save an inference tensor. A normal copy of the same mask
            # continues the sequence, as the neurons continue from their inference-mode v
            mask = mask.clone()
        return x * mask, mask

    def materialize_states(self, inputs: tuple, states: tuple, step_mode: str) -> tuple:
        return tuple(states)

    # states: the mask, then a subclass's registered memories, which pass through unchanged
    # (SpikingJelly's Dropout returns the mask alone, and its forward then fails on a
    # subclass's memory with "zip() argument 2 is shorter"; a subclass that overrides these
    # to update its memories gets them written back, as there)

    def single_step_functional_forward(self, inputs: tuple, states: tuple, **kwargs) -> tuple:
        y, mask = self._apply_mask(inputs[0], False, states[0])
        return (y,), (mask, *states[1:])

    def multi_step_functional_forward(self, inputs: tuple, states: tuple, **kwargs) -> tuple:
        y, mask = self._apply_mask(inputs[0], True, states[0])
        return (y,), (mask, *states[1:])

    def functional_forward(self, inputs: tuple, states: tuple, **kwargs) -> tuple:
        states = self.materialize_states(inputs, tuple(states), self.step_mode)
        if self.step_mode == "s":
            return self.single_step_functional_forward(inputs, states, **kwargs)
        return self.multi_step_functional_forward(inputs, states, **kwargs)

    def _stateful_forward(self, x: torch.Tensor, step_mode: str):
        """SpikingJelly's MemoryModule step: every memory as the state of the functional
        forward, the states it returns written back, its one output unpacked."""
        resets = self._reset_values()
        cls = type(self)
        if (len(resets) == 1 and cls.materialize_states is Dropout.materialize_states
                and cls.single_step_functional_forward is Dropout.single_step_functional_forward
                and cls.multi_step_functional_forward is Dropout.multi_step_functional_forward):
            # the mask alone, through Dropout's own steps: the same result without the generic
            # state plumbing (a third of a step's cost)
            y, self.mask = self._apply_mask(x, step_mode == "m", self.mask)
            return y
        names = list(resets)
        states = self.materialize_states((x,), tuple(getattr(self, n) for n in names), step_mode)
        step = (self.single_step_functional_forward if step_mode == "s"
                else self.multi_step_functional_forward)
        outputs, states = step((x,), states)
        if len(states) != len(names):
            raise ValueError(f"{type(self).__name__}'s {step.__name__} returned {len(states)} "
                             f"states for its {len(names)} memories {names}")
        for name, value in zip(names, states):
            setattr(self, name, value)
        return outputs[0] if len(outputs) == 1 else outputs

    def single_step_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._stateful_forward(x, "s")

    def multi_step_forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        return self._stateful_forward(x_seq, "m")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.step_mode == "s":
            return self.single_step_forward(x)
        return self.multi_step_forward(x)

    def extra_repr(self) -> str:
        return f"p={self.p}, " + super().extra_repr()


class Dropout2d(Dropout):
    """Dropout of whole channels ([N, C, H, W]: one draw per (n, c)), kept over time like
    Dropout's mask."""

    def __init__(self, p: float = 0.2, step_mode: str = "s"):
        super().__init__(p, step_mode)

    def create_mask(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout2d(torch.ones_like(x), self.p, training=True)


# ---- containers ------------------------------------------------------------------------------

def _check_single_step_children(container: nn.Sequential) -> None:
    for m in container:
        if getattr(m, "step_mode", "s") != "s":
            raise ValueError(f"{type(m).__name__} inside {type(container).__name__} must have "
                             f"step_mode 's' (the container handles the time dim), got "
                             f"{m.step_mode!r}")


class _Container(StepModule, nn.Sequential):
    """A Sequential whose children are written for one step: set_step_mode leaves them alone."""

    keeps_children_step_mode = True

    def __init__(self, *args):
        super().__init__(*args)
        _check_single_step_children(self)


class _MultiStepOnly(_Container):
    supported_step_modes = ("m",)  # functional.set_step_mode(net, 's') leaves it in 'm'

    @property
    def step_mode(self) -> str:
        return "m"

    @step_mode.setter
    def step_mode(self, value: str) -> None:
        if value != "m":
            raise ValueError(f"{type(self).__name__} runs a sequence [T, N, *] only: step_mode "
                             f"must be 'm', got {value!r}")


class SeqToANNContainer(_MultiStepOnly):
    """Stateless children run once on [T * N, *]: x_seq [T, N, *] -> [T, N, *']."""

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        return seq_to_ann_forward(x_seq, functools.partial(super().forward))


class MultiStepContainer(_MultiStepOnly):
    """Single-step children run once per time step: y[t] = children(x_seq[t])."""

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        return multi_step_forward(x_seq, functools.partial(super().forward))


class StepModeContainer(_Container):
    """Children written for one step, run in this container's step mode: 's' as they are; 'm'
    once per step if ``stateful`` (their state carries over t), else once on [T * N, *]."""

    def __init__(self, stateful: bool, step_mode: str = "s", *args):
        super().__init__(*args)
        self.stateful = bool(stateful)
        self.step_mode = step_mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.step_mode == "s":
            return super().forward(x)
        if self.stateful:
            return multi_step_forward(x, functools.partial(super().forward))
        return seq_to_ann_forward(x, functools.partial(super().forward))


_OWN_NAMES = ["AdaptiveAvgPool1d", "AdaptiveAvgPool2d", "AdaptiveAvgPool3d", "AvgPool1d",
              "AvgPool2d", "AvgPool3d", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "Conv1d",
              "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d", "Dropout",
              "Dropout2d", "Flatten", "GroupNorm", "Linear", "MaxPool1d", "MaxPool2d", "MaxPool3d",
              "MultiStepContainer", "SeqToANNContainer", "StepModeContainer", "StepModule",
              "Upsample", "VotingLayer"]


# Names this module lacks come from SpikingJelly (pypaper/snn/spikingjelly_fallback.py).
# __all__ too: pypaper's names, then SpikingJelly's (a star import gets both).
__getattr__ = spikingjelly_fallback.forwarder(__name__, "layer", _OWN_NAMES)
