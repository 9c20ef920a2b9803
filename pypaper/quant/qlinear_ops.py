"""Quantized linear ops (issue #7, linear kernels): int8 dynamic, int8 and int4 weight-only.

Each wrapper checks its arguments (errors name the argument), picks a backend
(pypaper/_backend.py: PYPAPER_BACKEND / pypaper.use_backend) and calls torch.ops.pypaper.<op>
(C++ on CPU, CUDA on GPU), its Triton twin (pypaper/quant/qlinear_triton.py) or the plain-PyTorch
reference (pypaper/quant/qlinear_reference.py). Formulas and layouts:
kernels/common/qlinear_math.h. Fake kernels and autograd: pypaper/quant/qlinear_registration.py.

Default backends: CPU -> C++ (AVX-512 VNNI / AVX2 / scalar, PYPAPER_QLINEAR_ISA overrides);
CUDA -> the CUDA kernels, then Triton (no GPU timing taken yet).
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from .. import _backend
from . import qlinear_reference as reference

_DEFAULT_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}


def _triton_reason(device: torch.device) -> Optional[str]:
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter)"
    from . import qlinear_registration

    tk = qlinear_registration.load_triton()
    ok, why = tk.triton_available(device)
    return None if ok else why


_REASONS = {
    "cpu": lambda d: _backend.native_reason(d, "cpu"),
    "cuda": lambda d: _backend.native_reason(d, "cuda"),
    "triton": _triton_reason,
}


def backend_for(x: torch.Tensor) -> str:
    """The backend the quantized linear ops would use for x now."""
    return _backend.select(x.device, _DEFAULT_ORDER.get(x.device.type, ("reference",)), _REASONS)


def _op(name: str, backend: str):
    if backend == "triton":
        from . import qlinear_registration

        qlinear_registration.load_triton()
        return getattr(torch.ops.pypaper, name + "_triton")
    return getattr(torch.ops.pypaper, name)


def _check_x(x: torch.Tensor, in_features: Optional[int] = None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if x.dtype != torch.float32:
        raise TypeError(f"x must be float32 (the modules cast other dtypes), got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, in_features], got shape {tuple(x.shape)}")
    if in_features is not None and x.shape[1] != in_features:
        raise ValueError(f"x must be [M, in_features={in_features}], got {tuple(x.shape)}")


def _check_bias(bias: Optional[torch.Tensor], n: int) -> None:
    if bias is not None and (bias.dtype != torch.float32 or tuple(bias.shape) != (n,)):
        raise ValueError(f"bias must be float32 [{n}], got {bias.dtype} {tuple(bias.shape)}")


def int8_dynamic_linear(x: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor,
                        w_colsum: torch.Tensor, bias: Optional[torch.Tensor] = None,
                        act_qmax: int = 127) -> torch.Tensor:
    """Dynamic int8 linear (per-token activations, per-channel weights; the W8A8 scheme of
    LLM.int8()/SmoothQuant's baseline and torch.ao's quantize_dynamic):

        sa[m] = max_k |x[m,k]| / A,  qa = clamp(round(x / sa), -A, A)   (A = act_qmax: 127 or 63)
        acc = qa @ qw^T  (int32, exact),  y = (float(acc) * sa) * w_scale + bias

    w_packed / w_colsum come from :func:`prepare_int8_dynamic`. x: [M, K] float32.
    """
    _check_x(x)
    if act_qmax not in (127, 63):
        raise ValueError(f"act_qmax must be 127 (8-bit) or 63 (7-bit), got {act_qmax}")
    _check_bias(bias, w_scale.shape[0])
    backend = backend_for(x)
    if backend == "reference":
        return reference.int8_dynamic_linear(x, w_packed, w_scale, w_colsum, bias, act_qmax)
    return _op("int8_dynamic_linear", backend)(x, w_packed, w_scale, w_colsum, bias, act_qmax)


def int8_dynamic_linear_int32(x: torch.Tensor, w_packed: torch.Tensor, w_colsum: torch.Tensor,
                              out_features: int, act_qmax: int = 127):
    """The int32 accumulators qa @ qw^T and the activation scales sa of the dynamic linear
    (no epilogue): what the tests compare to the integer."""
    _check_x(x)
    backend = backend_for(x)
    if backend == "reference":
        return reference.int8_dynamic_linear_int32(x, w_packed, w_colsum, out_features, act_qmax)
    return _op("int8_dynamic_linear_int32", backend)(x, w_packed, w_colsum, out_features, act_qmax)


def int8_weight_only_linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor,
                            bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = x @ (w * scale)^T + bias with int8 weights [N, K] and float32 scales [N, groups]
    (per channel: groups = 1), float activations; the memory-bound small-batch case. On AVX-512
    VNNI at M <= 32 (groups of a multiple of 64, or per channel) the CPU kernel rounds x per 64
    inputs to 16-bit fixed point inside the kernel (kernels/cpu/qlinear_int8_split.h)."""
    _check_x(x, w.shape[1])
    _check_bias(bias, w.shape[0])
    backend = backend_for(x)
    if backend == "reference":
        return reference.int8_weight_only_linear(x, w, scale, bias)
    return _op("int8_weight_only_linear", backend)(x, w, scale, bias)


def int4_weight_only_linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor,
                            zero: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = x @ ((q - zero) * scale)^T + bias with 4-bit codes q (two per byte, [N, K/2] uint8),
    group-wise float32 scale / zero [N, K / group_size]; float activations (GPTQ/AWQ-style W4A16
    storage, round-to-nearest here). The CPU's AVX2 / AVX-512 kernels at M <= 128 round x per group
    to 16-bit fixed point inside the kernel (|x~ - x| <= 2^-16 max_g |x|, ~2000x below the int4
    rounding; kernels/cpu/qlinear_int4_split.h) to run on the integer units."""
    _check_x(x, 2 * w.shape[1])
    _check_bias(bias, w.shape[0])
    backend = backend_for(x)
    if backend == "reference":
        return reference.int4_weight_only_linear(x, w, scale, zero, bias)
    return _op("int4_weight_only_linear", backend)(x, w, scale, zero, bias)


# ---------------------------------------------------------------------------------------------
# Weight preparation (once per layer, plain PyTorch)


def prepare_int8_dynamic(weight: torch.Tensor):
    """(w_packed, w_scale [N], w_colsum [N] int32) of a float weight [N, K]."""
    q, s = reference.quantize_weight_int8(weight)
    return (reference.pack_int8_panels(q), s[:, 0].contiguous(),
            q.to(torch.int32).sum(dim=1, dtype=torch.int32))


def prepare_int8_weight_only(weight: torch.Tensor, group_size: Optional[int] = None):
    """(codes [N, K] int8, scale [N, groups])."""
    return reference.quantize_weight_int8(weight, group_size)


def prepare_int4_weight_only(weight: torch.Tensor, group_size: int):
    """(packed [N, K/2] uint8, scale [N, groups], zero [N, groups])."""
    q, s, z = reference.quantize_weight_int4(weight, group_size)
    return reference.pack_int4(q), s, z


def _register() -> None:
    from .. import _ext
    from . import qlinear_registration

    if _ext.LOADED:
        qlinear_registration.register_native()


_register()
