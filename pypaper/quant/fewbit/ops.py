"""Few-bit activation ops: the forward keeps b bits per element for the backward.

    activation(x, name, bits=2, *, params=(), density=None) -> Tensor
    apply(x, approximation) -> Tensor

y = f(x) exactly (torch's own kernel); the backward multiplies the incoming gradient by the level
of the piece each x fell in, read from ceil(b*n/8) saved bytes instead of the float input
(Novikov et al., "Few-Bit Backward", ICML 2023). Backends (pypaper/_backend.py): the C++ kernel on
CPU, the CUDA kernel then Triton on GPU, the plain-PyTorch reference anywhere. When no gradient
can flow to x (grad mode off, or x does not require grad) the ops are torch's activation on the
contiguous x and nothing is packed or saved.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ... import _backend
from . import reference, tables
from .tables import Approximation

_DEFAULT_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}
_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _load_triton():
    from . import _registration

    return _registration.load_triton()


_REASONS = _backend.standard_reasons(_load_triton)


def backend_for(x: torch.Tensor) -> str:
    """The backend the few-bit ops would use for x now."""
    return _backend.select(x.device, _DEFAULT_ORDER.get(x.device.type, ("reference",)), _REASONS)


def _op(name: str, backend: str):
    return getattr(torch.ops.pypaper, name + "_triton" if backend == "triton" else name)


def check_input(x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"x must be float32, float64, float16 or bfloat16, got {x.dtype}")


def _needs_codes(x: torch.Tensor) -> bool:
    """Whether a backward can reach x: otherwise the forward alone is wanted."""
    return torch.is_grad_enabled() and x.requires_grad


def _plain(x: torch.Tensor, name: str, params) -> torch.Tensor:
    """torch's activation on the contiguous x: the y of the few-bit op, without the codes."""
    return reference.activation(x.contiguous(), name, params)


def _run(x, name, params, borders, levels, bits, fold) -> torch.Tensor:
    backend = backend_for(x)
    if backend == "reference":
        return reference.fewbit_activation(x, name, params, borders, levels, bits, fold)
    y, _ = _op("fewbit_forward", backend)(x, name, list(params), borders, levels, bits, fold)
    return y


# Autocast. torch's autocast registers kernels for some activations on some device types, all on
# its float32 list: aten::softplus under CUDA (and XPU, MPS, ...) autocast casts a float16 /
# bfloat16 input to float32 and returns float32. The few-bit ops have no autocast kernel of
# their own, so without this they would run in the input's dtype there: another dtype and other
# values than nn.Softplus, and than their own no-grad path (torch's F.softplus, cast by
# autocast). So the input is cast as autocast casts it for torch's op: the cast is an autograd
# node (the gradient comes back in the input's dtype, as with torch's), and only the codes are
# saved, so the float32 copy is not kept. The kernels are looked up in the dispatcher, not
# listed here, so the rule follows the installed torch.
_ATEN_OP = {
    "gelu": "aten::gelu", "gelu_tanh": "aten::gelu", "silu": "aten::silu", "mish": "aten::mish",
    "elu": "aten::elu", "selu": "aten::selu", "softplus": "aten::softplus",
    "sigmoid": "aten::sigmoid", "tanh": "aten::tanh", "logsigmoid": "aten::log_sigmoid",
    "hardswish": "aten::hardswish", "relu": "aten::relu", "leaky_relu": "aten::leaky_relu",
    "hardtanh": "aten::hardtanh", "hardsigmoid": "aten::hardsigmoid",
}
_AUTOCAST_KEY = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA", "xpu": "AutocastXPU",
                 "mps": "AutocastMPS", "hpu": "AutocastHPU", "privateuseone": "AutocastPrivateUse1"}


def _autocast_runs_fp32(name: str, device_type: str) -> bool:
    """Whether torch's autocast on ``device_type`` has a kernel for the activation (float32)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(_ATEN_OP[name],
                                                          _AUTOCAST_KEY[device_type])


# a dispatcher query dynamo cannot trace: run once while tracing (torch.compiler's
# assume_constant_result only sets this attribute; see tables.table_constants)
_autocast_runs_fp32._dynamo_marked_constant = True


def _autocast_input(x: torch.Tensor, name: str) -> torch.Tensor:
    """x as torch's autocast hands it to the activation ``name`` (float32 where autocast casts)."""
    dt = x.device.type
    if (x.dtype in (torch.float16, torch.bfloat16) and dt in _AUTOCAST_KEY
            and torch.is_autocast_enabled(dt) and _autocast_runs_fp32(name, dt)):
        return x.float()
    return x


def apply(x: torch.Tensor, approx: Approximation) -> torch.Tensor:
    """y = f(x), with ``approx.levels[code(x)]`` as f'(x) in the backward (see ``activation``)."""
    check_input(x)
    x = _autocast_input(x, approx.name)
    if not _needs_codes(x):
        return _plain(x, approx.name, approx.params)
    borders, levels = approx.tensors(x.dtype, x.device)
    return _run(x, approx.name, approx.params, borders, levels, approx.bits, approx.fold)


# bits -> bits: indexing a tuple turns a dynamic int (SymInt) under torch.compile into a constant
_SPECIALIZE = (0, 1, 2, 3, 4)


def activation(x: torch.Tensor, name: str, bits: Optional[int] = tables.DEFAULT_BITS, *,
               params: Sequence[float] = (), density=None) -> torch.Tensor:
    """A pointwise activation whose backward keeps ``bits`` bits per element.

    Forward: y = f(x), computed by torch's own kernel: identical to torch's call on the
    contiguous input. Backward: grad_x = q(x) * grad_y, with q the piecewise-constant
    approximation of f' with 2^bits levels that minimises E[(f'(x) - q(x))^2] for x drawn from
    ``density`` (standard normal by default), found by an exact dynamic program (tables.py).
    Saved for backward: ceil(bits * numel / 8) bytes, not the float input.

    Args:
        x: float32, bfloat16, float16 or float64 tensor (math in fp32; fp64 for fp64).
        name: gelu, gelu_tanh, silu, mish, elu (params: alpha), selu, softplus (beta, threshold),
            sigmoid, tanh, logsigmoid, hardswish; and the exact 1-bit ones relu, leaky_relu
            (negative_slope), hardtanh (min_val, max_val; relu6 is hardtanh(0, 6)), hardsigmoid,
            whose backward equals torch's bit for bit whatever ``bits`` says.
        bits: 1..4 (None: the default, 2).
        density: None (standard normal), a callable on numpy arrays, or observed input samples
            (fitted by tables.fit_density).

    Under torch.compile (fullgraph too) the table of the default density is looked up once
    while tracing (tables.table_constants) and enters the graph as constants.
    """
    if torch.compiler.is_compiling() and density is None:
        check_input(x)
        params = tables.check_name(name, params)
        bits = _SPECIALIZE[tables.check_bits(bits)]
        x = _autocast_input(x, name)
        if not _needs_codes(x):
            return _plain(x, name, params)
        b, fold, borders, levels = tables.table_constants(name, bits, params,
                                                          x.dtype == torch.float64)
        mdt = torch.float64 if x.dtype == torch.float64 else torch.float32
        return _run(x, name, params, torch.tensor(borders, dtype=mdt, device=x.device),
                    torch.tensor(levels, dtype=mdt, device=x.device), b, fold)
    return apply(x, tables.approximation(name, bits, params, density))
