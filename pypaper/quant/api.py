"""``quantize_(model, config)``: swap a model's ``nn.Linear`` layers for quantized ones, in place
(torchao-style API; issue #7).

    from pypaper.quant import quantize_, Int8DynamicConfig, Int4WeightOnlyConfig
    quantize_(model, Int8DynamicConfig())                                    # every nn.Linear
    quantize_(model, Int4WeightOnlyConfig(group_size=128),
              filter_fn=lambda m, fqn: fqn.startswith("decoder"))            # some of them
    quantize_(model, {"fc1": Int8WeightOnlyConfig(), "fc2": Int4WeightOnlyConfig(32)})  # per layer

A config is a frozen dataclass subclassing ``QuantConfig`` (pypaper/quant/configs.py): its
``apply(linear, fqn)`` returns the replacement module. Other methods (PowerExponentConfig, the
mapping HAWQ returns) plug in through the same protocol.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Callable, Optional, Union

from torch import nn

from .configs import QuantConfig
from .qlinear import (Int4WeightOnlyLinear, Int8DynamicLinear, Int8WeightOnlyLinear,
                      check_group_size)


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


def _default_filter(module: nn.Module, fqn: str) -> bool:
    # nn.MultiheadAttention reads out_proj.weight directly (NonDynamicallyQuantizableLinear):
    # swapping that module would break it, as in torch.ao's quantize_dynamic.
    return (isinstance(module, nn.Linear)
            and not isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear))


def quantize_(model: nn.Module, config: Union[QuantConfig, Mapping],
              filter_fn: Optional[Callable[[nn.Module, str], bool]] = None) -> nn.Module:
    """Replace, in place, the ``nn.Linear`` layers of ``model`` by quantized ones.

    Args:
        model: any nn.Module containing nn.Linear layers (not an nn.Linear itself: the swap
            happens in its parent).
        config: one QuantConfig for every selected layer, or a mapping fully-qualified name ->
            QuantConfig (e.g. HAWQ's result.mapping); every name must be an nn.Linear of model.
        filter_fn: ``filter_fn(module, fqn) -> bool`` selects layers (default: every nn.Linear
            except nn.MultiheadAttention's out_proj); with a mapping it filters the mapping.

    Returns ``model`` (changed in place). Raises ValueError when no layer matches, KeyError for a
    mapping name that is not in the model, TypeError for a name that is not an nn.Linear.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    mapping = None
    if isinstance(config, Mapping):
        mapping = dict(config)
        for name, cfg in mapping.items():
            if not isinstance(name, str) or not isinstance(cfg, QuantConfig):
                raise TypeError("config mapping must map fully-qualified names (str) to QuantConfig "
                                f"instances, got {name!r}: {type(cfg).__name__}")
    elif not isinstance(config, QuantConfig):
        raise TypeError("config must be a QuantConfig (Int8DynamicConfig(), ...) or a mapping "
                        f"name -> QuantConfig, got {type(config).__name__}")
    modules = dict(model.named_modules())
    targets = []
    if mapping is not None:
        missing = sorted(set(mapping) - set(modules))
        if missing:
            raise KeyError(f"config mapping names layers that are not in the model: {missing}")
        for fqn, cfg in mapping.items():
            mod = modules[fqn]
            if not isinstance(mod, nn.Linear):
                raise TypeError(f"config mapping names {fqn!r}, a {type(mod).__name__}, not an nn.Linear")
            if filter_fn is None or filter_fn(mod, fqn):
                targets.append((fqn, mod, cfg))
    else:
        select = filter_fn or _default_filter
        for fqn, mod in modules.items():
            if isinstance(mod, nn.Linear) and select(mod, fqn):
                targets.append((fqn, mod, config))
    if not targets:
        n_linear = sum(isinstance(m, nn.Linear) for m in modules.values())
        raise ValueError(f"quantize_: no layer of model matched config/filter_fn (the model has "
                         f"{n_linear} nn.Linear layers)")
    if any(fqn == "" for fqn, _, _ in targets):
        raise ValueError("model is itself an nn.Linear: quantize_ swaps layers inside their parent; "
                         "wrap it (nn.Sequential(linear)) or use <QuantizedLinear>.from_float")
    # Build every replacement first, so a config that rejects one layer leaves the model untouched.
    new = [(fqn, cfg.apply(mod, fqn)) for fqn, mod, cfg in targets]
    for fqn, mod in new:
        parent_name, _, child = fqn.rpartition(".")
        setattr(modules[parent_name], child, mod)
    return model


def model_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers of ``model`` (each storage counted once)."""
    seen = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())
