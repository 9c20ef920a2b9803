"""Quantized replacements of ``nn.Linear`` (issue #7, linear kernels).

    Int8DynamicLinear     int8 weights per output channel, int8 activations per token quantized
                          on the fly, int32 GEMM, fused dequantize + bias (compute-bound batches)
    Int8WeightOnlyLinear  int8 weights (per channel or per group), float activations
    Int4WeightOnlyLinear  4-bit weights (asymmetric, per group of 32..256 inputs, two per byte),
                          float activations (memory-bound small batches: decoding)

Build them with ``pypaper.quant.quantize_(model, config)`` (pypaper/quant/api.py) or
``<Class>.from_float(linear, ...)``. Their weights are buffers, so ``state_dict()`` saves the
integer codes and scales and ``load_state_dict`` restores them into a module built with the same
shapes. Inputs of any float dtype and any leading shape [..., in_features]; the math runs in fp32
and the output has the input's dtype. Formulas and layouts: kernels/common/qlinear_math.h.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import _backend, _ext
from . import qlinear_ops as ops
from . import qlinear_reference as reference

# Runs ops below the Autograd dispatch key (torch's own guard, used by its autograd kernels); where
# a torch build lacks it the lean path keeps the autograd layer.
_BELOW_AUTOGRAD = getattr(torch._C, "_AutoDispatchBelowAutograd", None)

INT4_GROUP_SIZES = (32, 64, 128, 256)


def _check_features(in_features: int, out_features: int) -> None:
    if in_features < 1 or out_features < 1:
        raise ValueError(f"in_features and out_features must be positive, got {in_features}, "
                         f"{out_features}")


def check_group_size(group_size: Optional[int], in_features: int, *, int4: bool,
                     where: str = "") -> None:
    """Raises ValueError naming ``group_size`` when it is not allowed for this layer."""
    at = f" of layer {where!r}" if where else ""
    if group_size is None:
        if int4:
            raise ValueError("group_size must be one of (32, 64, 128, 256) for int4 weights, got None")
        return
    if not isinstance(group_size, int) or isinstance(group_size, bool):
        raise TypeError(f"group_size must be an int, got {type(group_size).__name__}")
    if int4 and group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"group_size must be one of {INT4_GROUP_SIZES} for int4 weights, got {group_size}")
    if group_size < 1:
        raise ValueError(f"group_size must be positive, got {group_size}")
    if in_features % group_size:
        raise ValueError(f"group_size={group_size} does not divide in_features={in_features}{at}")


def apply_keeping_dtypes(module: nn.Module, fn, recurse: bool, keep, allowed) -> nn.Module:
    """``nn.Module._apply(module, fn)`` (what ``.to``, ``.half()``, ``.cuda()`` ... run) except
    that a tensor of ``keep`` that ``fn`` would cast to a dtype outside ``allowed`` keeps its
    dtype and its values: it only follows ``fn``'s device. So ``model.to(torch.bfloat16)`` leaves
    a quantized layer's scales and bias in the float32 its kernels take (cast and cast back would
    round them), while ``model.to("cuda")`` still moves them."""
    ids = set()
    for t in keep:
        if t is not None:
            ids.add(id(t))
            if isinstance(t, nn.Parameter) and t.grad is not None:
                ids.add(id(t.grad))

    def guarded(t):
        r = fn(t)
        if (id(t) in ids and isinstance(r, torch.Tensor) and r.dtype != t.dtype
                and r.dtype not in allowed):
            return t.to(device=r.device)
        return r

    return nn.Module._apply(module, guarded, recurse)


def cast_floats_on_load(module: nn.Module, state_dict: dict, prefix: str, allowed) -> None:
    """For ``_load_from_state_dict``: the checkpoint's float entries for ``module``'s own float
    parameters and buffers, in a dtype outside ``allowed``, cast to the module's tensor's dtype
    when that is allowed (else to allowed[0]) - the dtype invariant apply_keeping_dtypes keeps
    on ``.to()``. A plain load copies into the module's tensors (copy_ casts), but
    ``load_state_dict(..., assign=True)`` (the meta-device route) installs the checkpoint's
    tensors as they are, and a bf16 checkpoint left bf16 scales behind that every forward
    refused. ``state_dict`` is the shallow copy torch hands each module: the caller's dict keeps
    its tensors."""
    own = {**module._buffers, **module._parameters}
    for name, t in own.items():
        key = prefix + name
        src = state_dict.get(key)
        if (t is None or not t.is_floating_point() or not isinstance(src, torch.Tensor)
                or not src.is_floating_point() or src.dtype in allowed):
            continue
        state_dict[key] = src.to(t.dtype if t.dtype in allowed else allowed[0])


class _QuantizedLinear(nn.Module):
    in_features: int
    out_features: int

    def _apply(self, fn, recurse=True):
        # The kernels take float32 scales, zero points and bias whatever the activations' dtype:
        # a model-wide .to(bf16) / .half() / .double() must not cast them (the forward already
        # takes any float input and returns its dtype).
        keep = [b for b in self._buffers.values() if b is not None and b.is_floating_point()]
        keep.append(self._parameters.get("bias"))
        return apply_keeping_dtypes(self, fn, recurse, keep, (torch.float32,))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # The same float32 invariant on load. A plain load copies into this module's float32
        # tensors (copy_ casts), but load_state_dict(..., assign=True), the meta-device /
        # lazy-init route, installs the checkpoint's tensors as they are: a checkpoint whose
        # floats were stored in bf16 / fp16 (or fp64) left bf16 scales and bias behind, and
        # every forward then raised "bias must be float32". Casting first makes both routes
        # give the layer a plain load gives (bf16 -> fp32 is exact; fp64 -> fp32 is copy_'s
        # own rounding). load_state_dict hands each module a shallow copy of the dict: the
        # caller's tensors are not replaced.
        cast_floats_on_load(self, state_dict, prefix, (torch.float32,))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _init_bias(self, bias: bool, device) -> None:
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.out_features, device=device))
        else:
            self.register_parameter("bias", None)

    def _copy_bias(self, linear: nn.Linear) -> None:
        if linear.bias is not None:
            with torch.no_grad():
                self.bias.copy_(linear.bias.detach().to(torch.float32))
            self.bias.requires_grad_(linear.bias.requires_grad)

    def _op_args(self) -> tuple:  # pragma: no cover - abstract
        """(op name, the arguments after x): the op of pypaper/quant/qlinear_ops.py (the general
        path, any backend) and of torch.ops.pypaper (the lean CPU path) share name and signature."""
        raise NotImplementedError

    def _linear(self, x2: torch.Tensor) -> torch.Tensor:
        name, *args = self._op_args()
        return getattr(ops, name)(x2, *args)

    def _fast_cpu(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The lean path of the common call, a float32 CPU x on the default backend outside
        torch.compile: the C++ op straight from here, without the op wrapper's argument checks
        (the module's buffers are right by construction, the op checks x again) and, when no
        input needs a gradient, below the autograd layer (its Python formula is skipped). What
        it saves is per-call Python: measured at M = 1, K = N = 4096 (int4, 2 threads), 0.274 ->
        0.222 ms with the interpreter's state in cache, 0.625 -> ~0.40 ms after 256 MB of other
        memory traffic has evicted it (then every Python object the call touches is a DRAM
        miss). None where it does not apply; forward then takes the general path."""
        if (not x.is_cpu or x.dtype != torch.float32 or x.dim() < 1
                or x.shape[-1] != self.in_features or not _ext.LOADED
                or torch.compiler.is_compiling() or _backend.requested() is not None):
            return None
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        name, *args = self._op_args()  # buffers read from _buffers: Module.__getattr__ is slow
        op = getattr(torch.ops.pypaper, name)
        bias = self._parameters["bias"]
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or (bias is not None and bias.requires_grad))
        if needs_grad or _BELOW_AUTOGRAD is None:
            y = op(x2, *args)
        else:
            with _BELOW_AUTOGRAD():
                y = op(x2, *args)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._fast_cpu(x)
        if y is not None:
            return y
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x's last dim must be in_features={self.in_features}, got "
                             f"{tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating tensor, got {x.dtype}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != torch.float32:
            x2 = x2.to(torch.float32)
        y = self._linear(x2)
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def dequantized_weight(self) -> torch.Tensor:  # pragma: no cover - abstract
        """The float weight [out_features, in_features] that the layer multiplies by."""
        raise NotImplementedError

    def weight_bytes(self) -> int:
        """Bytes of the stored weight (codes, scales, zero points; not the bias)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())


class Int8DynamicLinear(_QuantizedLinear):
    """y = x W^T + b with int8 per-channel weights and int8 per-token activations quantized in the
    call (``act_bits`` 8: codes [-127, 127]; 7: [-63, 63], fbgemm's "reduce_range", the fast mode
    of AVX2 CPUs without VNNI). int32 accumulation, fused dequantize + bias epilogue."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, act_bits: int = 8,
                 device=None):
        super().__init__()
        _check_features(in_features, out_features)
        if act_bits not in (7, 8):
            raise ValueError(f"act_bits must be 8 or 7, got {act_bits}")
        self.in_features, self.out_features, self.act_bits = in_features, out_features, act_bits
        P = (out_features + reference.PANEL - 1) // reference.PANEL
        K4 = (in_features + reference.KSTEP - 1) // reference.KSTEP
        self.register_buffer("w_packed", torch.zeros(P, K4, reference.PANEL, reference.KSTEP,
                                                     dtype=torch.int8, device=device))
        self.register_buffer("w_scale", torch.ones(out_features, device=device))
        self.register_buffer("w_colsum", torch.zeros(out_features, dtype=torch.int32, device=device))
        self._init_bias(bias, device)

    @property
    def act_qmax(self) -> int:
        return 127 if self.act_bits == 8 else 63

    @classmethod
    def from_float(cls, linear: nn.Linear, act_bits: int = 8) -> "Int8DynamicLinear":
        w = linear.weight.detach()
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, act_bits,
                device=w.device)
        packed, scale, colsum = ops.prepare_int8_dynamic(w)
        m.w_packed.copy_(packed)
        m.w_scale.copy_(scale)
        m.w_colsum.copy_(colsum)
        m._copy_bias(linear)
        return m

    def _op_args(self):
        b = self._buffers
        return ("int8_dynamic_linear", b["w_packed"], b["w_scale"], b["w_colsum"],
                self._parameters["bias"], self.act_qmax)

    def dequantized_weight(self):
        return reference.dequantize_int8_dynamic_weight(self.w_packed, self.w_scale, self.in_features)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, act_bits={self.act_bits}")


class Int8WeightOnlyLinear(_QuantizedLinear):
    """y = x (q * s)^T + b, int8 codes per output channel (``group_size`` None) or per group of
    ``group_size`` inputs, float activations."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 group_size: Optional[int] = None, device=None):
        super().__init__()
        _check_features(in_features, out_features)
        check_group_size(group_size, in_features, int4=False)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = 1 if group_size is None else in_features // group_size
        self.register_buffer("weight_codes", torch.zeros(out_features, in_features, dtype=torch.int8,
                                                         device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, groups, device=device))
        self._init_bias(bias, device)

    @classmethod
    def from_float(cls, linear: nn.Linear, group_size: Optional[int] = None) -> "Int8WeightOnlyLinear":
        w = linear.weight.detach()
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size,
                device=w.device)
        codes, scale = ops.prepare_int8_weight_only(w, group_size)
        m.weight_codes.copy_(codes)
        m.weight_scale.copy_(scale)
        m._copy_bias(linear)
        return m

    def _op_args(self):
        b = self._buffers
        return ("int8_weight_only_linear", b["weight_codes"], b["weight_scale"], self._parameters["bias"])

    def dequantized_weight(self):
        return reference.dequantize_int8_weight(self.weight_codes, self.weight_scale)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, group_size={self.group_size}")


class Int4WeightOnlyLinear(_QuantizedLinear):
    """y = x ((q - z) * s)^T + b, 4-bit codes q in [0, 15] (two per byte), scale s and integer
    zero point z per group of ``group_size`` (32, 64, 128 or 256) inputs, float activations."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 group_size: int = 128, device=None):
        super().__init__()
        _check_features(in_features, out_features)
        check_group_size(group_size, in_features, int4=True)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer("weight_packed", torch.zeros(out_features, in_features // 2,
                                                          dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, groups, device=device))
        self.register_buffer("weight_zero", torch.zeros(out_features, groups, device=device))
        self._init_bias(bias, device)

    @classmethod
    def from_float(cls, linear: nn.Linear, group_size: int = 128) -> "Int4WeightOnlyLinear":
        w = linear.weight.detach()
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size,
                device=w.device)
        packed, scale, zero = ops.prepare_int4_weight_only(w, group_size)
        m.weight_packed.copy_(packed)
        m.weight_scale.copy_(scale)
        m.weight_zero.copy_(zero)
        m._copy_bias(linear)
        return m

    def _op_args(self):
        b = self._buffers
        return ("int4_weight_only_linear", b["weight_packed"], b["weight_scale"], b["weight_zero"],
                self._parameters["bias"])

    def dequantized_weight(self):
        return reference.dequantize_int4_weight(self.weight_packed, self.weight_scale, self.weight_zero)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, group_size={self.group_size}")
