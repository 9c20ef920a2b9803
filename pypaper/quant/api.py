"""``quantize_(model, config)``: swap a model's ``nn.Linear`` layers for quantized ones, in place
(torchao-style API; issue #7).

    from pypaper.quant import quantize_, Int8DynamicConfig, Int4WeightOnlyConfig
    quantize_(model, Int8DynamicConfig())                                    # every nn.Linear
    quantize_(model, Int4WeightOnlyConfig(group_size=128),
              filter_fn=lambda m, fqn: fqn.startswith("decoder"))            # some of them
    quantize_(model, {"fc1": Int8WeightOnlyConfig(), "fc2": Int4WeightOnlyConfig(32)})  # per layer
    quantize_(model, {"re:.*attn.*": Int8DynamicConfig(), "head": None,                  # torchao's
                      "_default": Int4WeightOnlyConfig(128)})                            # mapping keys

A config is a frozen dataclass subclassing ``QuantConfig`` (pypaper/quant/configs.py): its
``apply(linear, fqn)`` returns the replacement module. Other methods (PowerExponentConfig, the
mapping HAWQ returns) plug in through the same protocol.
"""
from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Mapping
from typing import Callable, Optional

from torch import nn

from .._module_swap import float_stand_in, parametrized_modules, share_hooks
from .configs import QuantConfig
from .qlinear import (Int4WeightOnlyLinear, Int8DynamicLinear, Int8WeightOnlyLinear,
                      _QuantizedLinear, check_group_size)


@dataclasses.dataclass(frozen=True)
class Int8DynamicConfig(QuantConfig):
    """int8 weights per output channel + int8 activations per token, quantized on the fly
    (W8A8 dynamic; torch.ao's quantize_dynamic, torchao's Int8DynamicActivationInt8WeightConfig).
    ``act_bits``: 8 (codes [-127, 127]) or 7 ([-63, 63]: fbgemm's reduce_range, the fast mode of
    AVX2 CPUs without VNNI)."""

    act_bits: int = 8

    def __post_init__(self):
        if self.act_bits not in (7, 8):
            raise ValueError(f"act_bits must be 8 or 7, got {self.act_bits}")

    def apply(self, module: nn.Linear, fqn: str = "") -> nn.Module:
        return Int8DynamicLinear.from_float(module, self.act_bits)

    @property
    def weight_bits(self) -> float:
        return 8.0  # + one fp32 scale per output channel (32 / in_features bits per weight)


@dataclasses.dataclass(frozen=True)
class Int8WeightOnlyConfig(QuantConfig):
    """int8 weights, float activations; ``group_size`` None = one scale per output channel."""

    group_size: Optional[int] = None

    def __post_init__(self):
        if self.group_size is not None:
            check_group_size(self.group_size, self.group_size, int4=False)

    def apply(self, module: nn.Linear, fqn: str = "") -> nn.Module:
        check_group_size(self.group_size, module.in_features, int4=False, where=fqn)
        return Int8WeightOnlyLinear.from_float(module, self.group_size)

    @property
    def weight_bits(self) -> float:
        return 8.0 + (32.0 / self.group_size if self.group_size else 0.0)


@dataclasses.dataclass(frozen=True)
class Int4WeightOnlyConfig(QuantConfig):
    """4-bit asymmetric weights per group of ``group_size`` inputs (32, 64, 128 or 256), two per
    byte, fp32 scale and zero point per group; float activations (torchao's
    Int4WeightOnlyConfig)."""

    group_size: int = 128

    def __post_init__(self):
        check_group_size(self.group_size, self.group_size, int4=True)

    def apply(self, module: nn.Linear, fqn: str = "") -> nn.Module:
        check_group_size(self.group_size, module.in_features, int4=True, where=fqn)
        return Int4WeightOnlyLinear.from_float(module, self.group_size)

    @property
    def weight_bits(self) -> float:
        return 4.0 + 64.0 / self.group_size  # fp32 scale + fp32 zero point per group


# Int8DynamicActivationInt8WeightConfig is torchao's name for the same W8A8 dynamic scheme: the
# very same class (not a subclass), so configs built under either name compare equal, print as
# Int8DynamicConfig(...) and take the same argument (act_bits; torchao's layout / mapping-type
# arguments do not exist here).
Int8DynamicActivationInt8WeightConfig = Int8DynamicConfig


@dataclasses.dataclass
class ModuleFqnToConfig:
    """torchao's wrapper of a per-module mapping: ``quantize_(model, ModuleFqnToConfig({...}))``
    is ``quantize_(model, {...})``. Keys: fully qualified module names, ``"re:<regex>"``
    (``re.fullmatch`` on the name) or ``"_default"``; values: a QuantConfig, or None to leave the
    module in float."""

    module_fqn_to_config: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class FqnToConfig:
    """torchao's newer name for :class:`ModuleFqnToConfig` (the dict is ``fqn_to_config``). Its
    keys name modules here: torchao's parameter names (``"layer.weight"``) are not supported."""

    fqn_to_config: dict = dataclasses.field(default_factory=dict)


_EXCLUDE_HINT = "exclude it with filter_fn or a per-module mapping"
_NO_DEFAULT = object()


def _overrides_forward(module: nn.Module) -> bool:
    return type(module).forward is not nn.Linear.forward


def _is_mha_out_proj(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear)


def swappable(module: nn.Module) -> bool:
    """Whether quantize_ can put a quantized module in place of this nn.Linear: its class keeps
    nn.Linear's forward (a custom forward would be lost) and it is not nn.MultiheadAttention's
    out_proj (the attention reads that module's weight directly)."""
    return (isinstance(module, nn.Linear) and not _overrides_forward(module)
            and not _is_mha_out_proj(module))


def _is_quantized(module: nn.Module) -> bool:
    """A layer that quantize_ (or a QuantConfig) put in place of an nn.Linear."""
    from .nupes import PowerQuantLinear

    return isinstance(module, (_QuantizedLinear, PowerQuantLinear))


def _class_name(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def _unwrap_mapping(config) -> Optional[dict]:
    if isinstance(config, ModuleFqnToConfig):
        config = config.module_fqn_to_config
    elif isinstance(config, FqnToConfig):
        config = config.fqn_to_config
    if isinstance(config, Mapping):
        return dict(config)
    if not isinstance(config, QuantConfig):
        raise TypeError("config must be a QuantConfig (Int8DynamicConfig(), ...) or a mapping "
                        "name -> QuantConfig (a dict, ModuleFqnToConfig or FqnToConfig), got "
                        f"{type(config).__name__}")
    return None


def _parse_mapping(mapping: dict):
    """(plain names -> config, [(key, compiled regex, config)] in insertion order, _default or
    _NO_DEFAULT)."""
    names, patterns, default = {}, [], _NO_DEFAULT
    for key, cfg in mapping.items():
        if not isinstance(key, str) or not (cfg is None or isinstance(cfg, QuantConfig)):
            raise TypeError("config mapping must map fully-qualified names (str) to QuantConfig "
                            f"instances or None, got {key!r}: {type(cfg).__name__}")
        if key == "_default":
            default = cfg
        elif key.startswith("re:"):
            try:
                patterns.append((key, re.compile(key[3:]), cfg))
            except re.error as e:
                raise ValueError(f"config mapping key {key!r} is not a valid regular expression: "
                                 f"{e}") from None
        else:
            names[key] = cfg
    return names, patterns, default


def quantize_(model: nn.Module, config, filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
              device=None) -> nn.Module:
    """Replace, in place, the ``nn.Linear`` layers of ``model`` by quantized ones.

    Args:
        model: any nn.Module containing nn.Linear layers (not an nn.Linear itself: the swap
            happens in its parent).
        config: one QuantConfig for every selected layer, or a mapping (a dict,
            ``ModuleFqnToConfig`` or ``FqnToConfig``) from fully-qualified names to a QuantConfig
            or None (leave that layer in float), e.g. HAWQ's result.mapping. Keys: a module name
            (must be in the model, an nn.Linear unless its value is None), ``"re:<regex>"``
            (``re.fullmatch`` against each nn.Linear's name; the first matching pattern in the
            mapping's order wins) or ``"_default"`` (every other selected nn.Linear). A name beats
            a pattern, a pattern beats ``_default``.
        filter_fn: ``filter_fn(module, fqn) -> bool`` selects layers among the nn.Linear modules;
            with a mapping it filters the mapping. Without it the selection is every nn.Linear
            whose class keeps nn.Linear's forward, except nn.MultiheadAttention's out_proj; a
            subclass that overrides forward is skipped with a warning (quantizing it would drop
            that forward). Layers selected explicitly (by filter_fn, or by name in a mapping)
            that override forward, or that are an nn.MultiheadAttention's out_proj (the
            attention reads its weight directly), raise ValueError instead.
        device: when given, each selected layer is moved to ``device`` (a copy: the original
            module is not changed) before it is quantized, as in torchao.

    A module reachable under several names (a Linear shared by two parents) becomes one quantized
    module placed under every name; its names must not ask for different configs.

    Returns ``model`` (changed in place). Raises ValueError when no layer matches or a layer
    cannot take its config (the model is then left untouched), KeyError for a mapping name that
    is not in the model, TypeError for a name that is not an nn.Linear.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    mapping = _unwrap_mapping(config)
    # remove_duplicate=False: a module shared by two parents is listed under both names.
    modules = dict(model.named_modules(remove_duplicate=False))
    # a Linear inside a parametrization (layer.parametrizations.weight[0].proj) transforms a
    # weight, not the model's activations: it is no layer of the model to quantize
    inside = parametrized_modules(model)
    if mapping is not None:
        names, patterns, default = _parse_mapping(mapping)
        missing = sorted(set(names) - set(modules))
        if missing:
            raise KeyError(f"config mapping names layers that are not in the model: {missing}")
        for fqn, cfg in names.items():
            mod = modules[fqn]
            if cfg is not None and not isinstance(mod, nn.Linear):
                hint = " (already quantized: quantize_ swaps float layers only)" \
                    if _is_quantized(mod) else ""
                raise TypeError(f"config mapping names {fqn!r}, a {type(mod).__name__}, not an "
                                f"nn.Linear{hint}")
            if cfg is not None and id(mod) in inside:
                raise ValueError(f"config mapping names {fqn!r}, a module inside a "
                                 f"parametrization (torch.nn.utils.parametrize): it computes a "
                                 f"weight, it is not a layer of the model to quantize")
    # per distinct module: its names, and the choices (a config, or None = keep float) made for it
    names_of: dict[int, list] = {}
    choices: dict[int, dict] = {}
    first: dict[int, tuple] = {}
    warned = set()
    for fqn, mod in modules.items():
        if not isinstance(mod, nn.Linear) or id(mod) in inside:
            continue
        key = id(mod)
        names_of.setdefault(key, []).append(fqn)
        first.setdefault(key, (fqn, mod))
        explicit = filter_fn is not None
        if mapping is None:
            cfg = config
        elif fqn in names:
            cfg, explicit = names[fqn], True
        else:
            cfg = next((c for _, rx, c in patterns if rx.fullmatch(fqn)), _NO_DEFAULT)
            if cfg is _NO_DEFAULT:
                cfg = default
            if cfg is _NO_DEFAULT:
                continue
        if cfg is None:
            choices.setdefault(key, {})[fqn] = None
            continue
        if filter_fn is not None and not filter_fn(mod, fqn):
            continue
        if _overrides_forward(mod):
            if explicit:
                raise ValueError(
                    f"layer {fqn!r} ({_class_name(mod)}) subclasses nn.Linear and overrides forward: "
                    f"its custom forward would be lost by quantize_; do not select it (filter_fn or "
                    f"the config mapping), or quantize its inner nn.Linear instead")
            if key not in warned:
                warned.add(key)
                warnings.warn(f"quantize_ skips layer {fqn!r} ({_class_name(mod)}): it subclasses "
                              f"nn.Linear and overrides forward, which a quantized layer would "
                              f"drop; select it explicitly to get an error instead", stacklevel=2)
            continue
        if _is_mha_out_proj(mod):
            # nn.MultiheadAttention reads out_proj.weight / .bias directly (it never calls
            # out_proj's forward): a quantized module there, which has no .weight, breaks the
            # attention's next call. Skipped as in torch.ao's quantize_dynamic; selected
            # explicitly (filter_fn, a name) it is refused before anything is changed.
            if explicit:
                raise ValueError(
                    f"layer {fqn!r} is nn.MultiheadAttention's out_proj, whose weight the "
                    f"attention reads directly: a quantized module there would break it; leave it "
                    f"out of filter_fn / the config mapping (e.g. filter_fn=lambda m, fqn: not "
                    f"isinstance(m, nn.modules.linear.NonDynamicallyQuantizableLinear))")
            continue
        choices.setdefault(key, {})[fqn] = cfg
    targets = []
    for key, chosen in choices.items():
        distinct = []
        for c in chosen.values():
            if c not in distinct:
                distinct.append(c)
        if len(distinct) > 1:
            raise ValueError(f"layer {first[key][0]!r} is shared under the names {names_of[key]}, "
                             f"which ask for different configs: {chosen}")
        if distinct[0] is not None:
            fqn, mod = first[key]
            targets.append((fqn, mod, distinct[0], names_of[key]))
    if not targets:
        if choices:  # every selected layer was asked to stay in float
            return model
        n_linear = len(names_of)
        n_quantized = sum(1 for m in model.modules() if _is_quantized(m))
        again = (f", and {n_quantized} layers already quantized: quantize_ swaps float nn.Linear "
                 f"layers only, a quantized model cannot be quantized again") if n_quantized else ""
        raise ValueError(f"quantize_: no layer of model matched config/filter_fn (the model has "
                         f"{n_linear} nn.Linear layers{again})")
    if any("" in all_names for _, _, _, all_names in targets):
        raise ValueError("model is itself an nn.Linear: quantize_ swaps layers inside their parent; "
                         "wrap it (nn.Sequential(linear)) or use <QuantizedLinear>.from_float")
    # Build every replacement first, so a config that rejects one layer leaves the model untouched.
    new = []
    for fqn, mod, cfg, all_names in targets:
        src = float_stand_in(mod, device)
        try:
            q = cfg.apply(src, fqn)
        except ValueError as e:
            msg = str(e)
            at = "" if repr(fqn) in msg else f" (layer {fqn!r})"
            raise ValueError(f"{msg}{at}; {_EXCLUDE_HINT}") from e
        # the replacement keeps the layer's train / eval mode, as torchao's in-place weight swap
        # does (a fresh module starts in training mode whatever the model was in)
        q.train(mod.training)
        new.append((all_names, q, mod))
    for all_names, q, mod in new:
        # hooks registered on the float layer (activation statistics, profilers, a framework's
        # state_dict hooks) keep firing on the layer that now runs in its place, and their
        # handles keep removing them, as with torchao's in-place weight swap. Not the hooks of
        # prune / weight_norm / spectral_norm, which rebuild the float layer's own weight from
        # its weight_orig (...): the quantized layer holds their current value (float_stand_in)
        share_hooks(mod, q)
        for fqn in all_names:
            parent_name, _, child = fqn.rpartition(".")
            setattr(modules[parent_name], child, q)
    _disable_fused_transformer_paths(model, {id(q) for _, q, _ in new})
    return model


def _disable_fused_transformer_paths(model: nn.Module, swapped: set) -> None:
    """Send the nn.TransformerEncoderLayer whose linear1 / linear2 were swapped (and their
    nn.TransformerEncoder) down torch's standard path.

    In eval mode torch's encoder layer runs one fused kernel, torch._transformer_encoder_layer_fwd,
    on the tensors linear1.weight / linear2.weight it reads itself, never calling those modules:
    with a quantized module there it raised AttributeError (no .weight), and with one that keeps
    a float latent .weight (PowerQuantLinear(learnable=True)) it would silently multiply by the
    unquantized weight. activation_relu_or_gelu = 0 is the layer's own "custom activation" flag:
    it only turns that fused path off (the standard path applies self.activation either way).
    The encoder's use_nested_tensor (its enable_nested_tensor) likewise reads the first layer's
    weights, then feeds nested tensors that the swapped layers cannot take: turned off too."""
    slowed = set()
    for mod in model.modules():
        if isinstance(mod, nn.TransformerEncoderLayer) and (
                id(getattr(mod, "linear1", None)) in swapped
                or id(getattr(mod, "linear2", None)) in swapped):
            mod.activation_relu_or_gelu = 0
            slowed.add(id(mod))
    for mod in model.modules():
        if isinstance(mod, nn.TransformerEncoder) and any(id(l) in slowed for l in mod.layers):
            mod.use_nested_tensor = False


def model_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers of ``model`` (each storage counted once)."""
    seen = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())
