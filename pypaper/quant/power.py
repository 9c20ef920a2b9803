"""Power-exponent quantization (PowerQuant / NUPES): the ops, their plain-PyTorch reference,
fake kernels and autograd.

Yvinec, Dapogny, Cord, Bailly, "PowerQuant: Automorphism Search for Non-Uniform Quantization"
(ICLR 2023) and "NUPES: Non-Uniform Post-Training Quantization via Power Exponent Search" (2023):
quantize the power transform sign(x)·|x|^a uniformly and map back with the inverse power, so the
grid is dense where bell-shaped weights are dense (a < 1) and still reaches the outliers.

With a per-channel range m = max|x|, exponent a > 0 and b bits (qmax = 2^(b-1) - 1):

    code = sign(x) · min(round(qmax · (|x| / m)^a), qmax)        int8 in [-qmax, qmax]
    y    = sign(code) · m · (|code| / qmax)^(1/a)                 dequantize

(PowerQuant's s·round(|x|^a / s) with s = m^a / qmax, written without forming m^a.) The kernels
(kernels/common/power_quant_math.h) never call pow per element: code = #{k : |x| >= t_k} over the
thresholds t_k = m·((k - ½)/qmax)^(1/a) (rounded up to x's float type, which makes the float
comparison decide exactly as the real one; ties k - ½ round up), y a lookup in the levels
l_k = m·(k/qmax)^(1/a); both tables are computed per channel in float64. This reference builds the
same tables with torch and uses searchsorted, so codes and values match the C++ op to the bit.

Gradients (``power_fake_quantize``): straight-through for x (1 where |x| <= m, 0 where clipped).
For the exponent a and the range m, with u = |x|/m and y = sign(x)·m·(r/qmax)^(1/a):

* ``exponent_grad="ste"`` (default; what the learned variant uses): LSQ's rule carried over to
  the power quantizer, the rounding r = round(qmax·u^a) passed straight through, so
  dr/da = qmax·u^a·log u (the d|x|^a/da = |x|^a log|x| term) and dr/dm = -a·qmax·u^a/m:

      dy/da = sign(x)·l_c·[-log(c/qmax)/a² + qmax·u^a·log(u)/(a·c)]
      dy/dm = sign(x)·(c/qmax)^(1/a)·[1 - qmax·u^a/c]

  Both vanish where the rounding error does. The numerical care: log u is only evaluated for
  c >= 1, where qmax·u^a >= 1/2 keeps u away from 0; x = 0 and every x rounded to 0 contribute 0
  (the limit, for a < 1), never log 0 or 0/0. Clipped |x| > m: dy/da = 0, dy/dm = sign(x).
* ``exponent_grad="fixed"``: the exact derivative of y with the codes held fixed (between two
  rounding jumps y is smooth in a and m): dy/da = -sign(x)·l_c·log(c/qmax)/a², dy/dm =
  sign(x)·(c/qmax)^(1/a). gradcheck in float64 checks this mode on the op itself; the "ste" mode
  equals autograd of the smooth surrogate y(x, m, a) with the rounding offset held constant
  (tests/quant/nupes).

Backends: ``cpu`` (C++, csrc/quant/power_cpu.cpp), ``cuda`` (kernels/cuda/power_quant_kernels.cu),
``triton`` (pypaper/quant/power_triton.py; on CPU only under TRITON_INTERPRET=1), ``reference``.
Kernels run float32 and float64; bfloat16 / float16 inputs are computed in float32 and cast back.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Union

import torch

from .. import _autograd, _backend, _ext
from . import vmap_rules

__all__ = ["bits_to_qmax", "channel_max_abs", "power_dequantize", "power_fake_quantize",
           "power_quantize", "reference_codes", "reference_dequantize",
           "reference_fake_quantize", "reference_backward", "power_tables", "backend_for"]

SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8)
_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


# ---- argument checks -----------------------------------------------------------------------------

def bits_to_qmax(bits: int) -> int:
    """qmax = 2^(bits-1) - 1 of a symmetric ``bits``-bit code (bits 2..8)."""
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be an integer in 2..8 (the power quantizer's codes are int8), "
                         f"got {bits!r}")
    return (1 << (bits - 1)) - 1


def _check_x(x: torch.Tensor, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"{name} must be a floating tensor (float32, float64, float16 or bfloat16), "
                        f"got {x.dtype}")


def _as_param(v, name: str, like: torch.Tensor) -> torch.Tensor:
    """A Python number as a float64 0-dim tensor on like's device; tensors pass through."""
    if isinstance(v, torch.Tensor):
        if not v.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {v.dtype}")
        if v.device != like.device:
            raise ValueError(f"{name} is on {v.device} but x is on {like.device}")
        return v
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a float or a tensor, got {type(v).__name__}")
    return torch.tensor(float(v), dtype=torch.float64, device=like.device)


def _check_exponent(exponent: torch.Tensor, channels: int) -> None:
    if exponent.numel() not in (1, channels):
        raise ValueError(f"exponent must hold 1 or {channels} values (one per range), got "
                         f"{exponent.numel()}")
    if not torch.compiler.is_compiling():
        e = _autograd.values_of(exponent.detach())  # every sample's under vmap
        if not bool(torch.isfinite(e).all()) or not bool((e > 0).all()):
            raise ValueError(f"exponent must be finite and > 0, got {e.reshape(-1)[:4].tolist()}")


def _check_max_abs(max_abs: torch.Tensor, numel: int) -> None:
    c = max_abs.numel()
    if c < 1 or numel % c:
        raise ValueError(f"max_abs has {c} values, which does not divide the {numel} elements of "
                         f"x (one range per leading channel: per tensor, or x.shape[0] values)")
    if not torch.compiler.is_compiling() and not bool(torch.isfinite(
            _autograd.values_of(max_abs.detach())).all()):
        raise ValueError("max_abs must be finite (x contains inf or NaN?)")


def channel_max_abs(x: torch.Tensor, per_channel: bool = True) -> torch.Tensor:
    """m = max|x| per leading row (``per_channel``) or over the whole tensor, in x's math dtype."""
    _check_x(x)
    mt = torch.float64 if x.dtype == torch.float64 else torch.float32
    if x.numel() == 0:
        rows = per_channel and x.dim() and x.shape[0] > 0
        return torch.zeros((x.shape[0],) if rows else (), dtype=mt, device=x.device)
    if per_channel and x.dim() >= 1:
        return x.detach().reshape(x.shape[0], -1).abs().amax(dim=1).to(mt)
    return x.detach().abs().amax().to(mt)


# ---- plain-PyTorch reference ---------------------------------------------------------------------

def _math(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _ceil_to(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The smallest value of ``dtype`` >= v (v float64)."""
    if dtype == torch.float64:
        return v
    f = v.to(dtype)
    up = torch.nextafter(f, torch.full_like(f, math.inf))
    return torch.where(f.to(torch.float64) < v, up, f)


def _unit_tables_host(exponent: torch.Tensor, qmax: int):
    """The unit tables with the C library's pow and log (math.pow / math.log), which the C++
    kernels call too: bit-identical tables (torch's vectorized pow may differ by an ulp)."""
    thr, lvl, lda = [], [], []
    for a in exponent.detach().reshape(-1).to(torch.float64).tolist():
        inv_a = 1.0 / a
        thr.append([math.pow((k - 0.5) / qmax, inv_a) for k in range(1, qmax + 1)])
        lv = [math.pow(k / qmax, inv_a) for k in range(qmax + 1)]
        lvl.append(lv)
        lda.append([0.0] + [-lv[k] * math.log(k / qmax) * inv_a * inv_a for k in range(1, qmax + 1)])
    dev = exponent.device
    return tuple(torch.tensor(t, dtype=torch.float64, device=dev) for t in (thr, lvl, lda))


def _unit_tables(exponent: torch.Tensor, qmax: int):
    """m = 1 thresholds [E, qmax] (k = 1..qmax), levels and dlevel/da [E, qmax + 1], float64."""
    if not torch.compiler.is_compiling() and exponent.numel() <= 4096:
        return _unit_tables_host(exponent, qmax)
    inv_a = 1.0 / exponent.detach().reshape(-1, 1).to(torch.float64)
    dev = exponent.device
    k = torch.arange(1, qmax + 1, dtype=torch.float64, device=dev)
    thr = torch.pow((k - 0.5) / qmax, inv_a)
    r = torch.arange(0, qmax + 1, dtype=torch.float64, device=dev) / qmax
    lvl = torch.pow(r, inv_a)
    lda = torch.where(r > 0, -lvl * torch.log(r.clamp_min(1.0 / qmax)) * inv_a * inv_a,
                      torch.zeros_like(lvl))
    return thr, lvl, lda


def power_tables(max_abs: torch.Tensor, exponent: torch.Tensor, qmax: int, dtype: torch.dtype):
    """Per-channel tables in ``dtype`` (fp32 or fp64): thresholds [C, qmax] (rounded up; +inf
    where m <= 0), levels [C, qmax + 1]; and float64 [C, qmax + 1] tables of dl/da and dl/dm."""
    m = max_abs.detach().reshape(-1).to(dtype).to(torch.float64)
    C = m.numel()
    thr_u, lvl_u, lda_u = _unit_tables(exponent, qmax)
    ok = (m > 0).reshape(C, 1)
    md = torch.where(ok, m.reshape(C, 1), torch.zeros_like(m.reshape(C, 1)))
    thr = torch.where(ok, _ceil_to(m.reshape(C, 1) * thr_u, dtype),
                      torch.full((C, qmax), math.inf, dtype=dtype, device=m.device))
    lvl = (md * lvl_u).to(dtype)
    return thr.expand(C, qmax), lvl.expand(C, qmax + 1), (md * lda_u).expand(C, qmax + 1), \
        lvl_u.expand(C, qmax + 1)


def _ref_codes_abs(x2: torch.Tensor, thr: torch.Tensor) -> torch.Tensor:
    """c = #{k : |x| >= t_k} per row of x2 [C, inner]; NaN -> 0."""
    c = torch.searchsorted(thr.contiguous(), x2.abs().contiguous(), right=True)
    return torch.where(torch.isnan(x2), torch.zeros_like(c), c)


def reference_codes(x: torch.Tensor, max_abs: torch.Tensor, exponent: torch.Tensor,
                    qmax: int) -> torch.Tensor:
    """int8 codes sign(x)·c of the power quantizer (x float32 or float64)."""
    C = max(max_abs.numel(), 1)
    x2 = x.reshape(C, -1)
    thr, _, _, _ = power_tables(max_abs, exponent, qmax, x.dtype)
    c = _ref_codes_abs(x2, thr)
    return torch.where(x2 < 0, -c, c).to(torch.int8).reshape(x.shape)


def reference_dequantize(codes: torch.Tensor, max_abs: torch.Tensor, exponent: torch.Tensor,
                         qmax: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    C = max(max_abs.numel(), 1)
    q2 = codes.reshape(C, -1).to(torch.int64)
    _, lvl, _, _ = power_tables(max_abs, exponent, qmax, dtype)
    c = q2.abs().clamp_max(qmax)
    l = torch.gather(lvl, 1, c)
    return torch.where(q2 < 0, -l, l).reshape(codes.shape)


def reference_fake_quantize(x: torch.Tensor, max_abs: torch.Tensor, exponent: torch.Tensor,
                            qmax: int) -> torch.Tensor:
    C = max(max_abs.numel(), 1)
    x2 = x.reshape(C, -1)
    thr, lvl, _, _ = power_tables(max_abs, exponent, qmax, x.dtype)
    c = _ref_codes_abs(x2, thr)
    l = torch.gather(lvl, 1, c)
    y = torch.where(x2 < 0, -l, l)
    return torch.where(torch.isnan(x2), x2, y).reshape(x.shape)


def reference_backward(grad: torch.Tensor, x: torch.Tensor, max_abs: torch.Tensor,
                       exponent: torch.Tensor, qmax: int, ste: bool = True):
    """(grad_x, grad_max_abs, grad_exponent) of power_fake_quantize (sums in float64)."""
    C = max(max_abs.numel(), 1)
    x2, g2 = x.reshape(C, -1), grad.reshape(C, -1)
    m = max_abs.detach().reshape(C, 1).to(x.dtype)
    dx = torch.where(x2.abs() <= m, g2, torch.zeros_like(g2)).reshape(x.shape)
    sta, stm = _reference_terms(x, max_abs, exponent, qmax, ste)
    g64 = g2.to(torch.float64)
    ga_ch = (g64 * sta).sum(dim=1)
    gm = (g64 * stm).sum(dim=1)
    ga = ga_ch if exponent.numel() == C and C > 1 else ga_ch.sum().reshape(1)
    return (dx, gm.to(max_abs.dtype).reshape(max_abs.shape),
            ga.to(exponent.dtype).reshape(exponent.shape))


def _reference_terms(x, max_abs, exponent, qmax: int, ste: bool = True):
    """Per-element dy/da and dy/dm of power_fake_quantize ([C, numel / C], float64)."""
    C = max(max_abs.numel(), 1)
    x2 = x.reshape(C, -1)
    thr, _, lda, dlm = power_tables(max_abs, exponent, qmax, x.dtype)
    m = max_abs.detach().reshape(C, 1).to(x.dtype)
    c = _ref_codes_abs(x2, thr)
    ta, tm = torch.gather(lda, 1, c), torch.gather(dlm, 1, c)
    if ste:
        md = m.to(torch.float64)
        a = exponent.detach().to(torch.float64).reshape(-1, 1).expand(C, 1)
        ax = x2.abs().to(torch.float64)
        inside = (c >= 1) & (ax <= md) & (md > 0)
        lu = torch.log(torch.where(inside, ax / md, torch.ones_like(ax)))
        ratio = qmax * torch.exp(a * lu) / c.clamp_min(1).to(torch.float64)
        unit_lvl = tm
        ta = torch.where(inside, ta + md * unit_lvl * ratio * lu / a, torch.zeros_like(ta))
        clipped = (c >= 1) & (ax > md) & (md > 0)
        tm = torch.where(inside, unit_lvl * (1 - ratio),
                         torch.where(clipped, torch.ones_like(tm), torch.zeros_like(tm)))
    sign = torch.where(x2 < 0, -torch.ones_like(ta), torch.ones_like(ta))
    return sign * ta, sign * tm


class _ReferenceFakeQuantize(torch.autograd.Function):
    # setup_context + generate_vmap_rule: the form torch.func transforms accept
    generate_vmap_rule = True

    @staticmethod
    def forward(x, max_abs, exponent, qmax, ste):
        return reference_fake_quantize(x, max_abs, exponent, qmax)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, max_abs, exponent, qmax, ste = inputs
        ctx.save_for_backward(x, max_abs, exponent)
        ctx.qmax, ctx.ste = qmax, ste

    @staticmethod
    def backward(ctx, grad):
        x, max_abs, exponent = ctx.saved_tensors
        dx, dm, da = reference_backward(grad, x, max_abs, exponent, ctx.qmax, ctx.ste)
        n = ctx.needs_input_grad
        return dx if n[0] else None, dm if n[1] else None, da if n[2] else None, None, None


# ---- fake kernels and autograd of the native ops -------------------------------------------------

def _fake_quantize_codes(x, max_abs, exponent, qmax):
    torch._check(x.dtype in (torch.float32, torch.float64), lambda: f"x must be fp32/fp64, got {x.dtype}")
    torch._check(1 <= qmax <= 127, lambda: f"qmax must be in [1, 127], got {qmax}")
    return x.new_empty(x.shape, dtype=torch.int8)


def _fake_dequantize(codes, max_abs, exponent, qmax, dtype):
    torch._check(codes.dtype == torch.int8, lambda: f"codes must be int8, got {codes.dtype}")
    return codes.new_empty(codes.shape, dtype=dtype)


def _fake_fake_quantize(x, max_abs, exponent, qmax, ste=True):
    torch._check(x.dtype in (torch.float32, torch.float64), lambda: f"x must be fp32/fp64, got {x.dtype}")
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _fake_backward(grad, x, max_abs, exponent, qmax, need_max_grad, need_exponent_grad, ste):
    torch._check(grad.shape == x.shape, lambda: "grad and x must have one shape")
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            max_abs.new_empty(max_abs.shape), exponent.new_empty(exponent.shape))


def _fq_setup(ctx, inputs, output):
    x, max_abs, exponent, qmax, ste = inputs
    ctx.save_for_backward(x, max_abs, exponent)
    ctx.qmax, ctx.ste = qmax, ste


def _make_fq_backward(backward_op):
    def backward(ctx, grad):
        x, max_abs, exponent = ctx.saved_tensors
        n = ctx.needs_input_grad
        dx, dm, da = backward_op(grad.contiguous(), x, max_abs, exponent, ctx.qmax, n[1], n[2],
                                 ctx.ste)
        return dx if n[0] else None, dm if n[1] else None, da if n[2] else None, None, None

    return backward


def _dbl_setup(ctx, inputs, output):
    grad, x, max_abs, exponent, qmax, need_max_grad, need_exponent_grad, ste = inputs
    ctx.save_for_backward(x, max_abs, exponent)
    ctx.qmax, ctx.ste = qmax, ste


def _double_backward(ctx, gg_dx, gg_dm, gg_da):
    """Gradient of (grad_x, grad_max_abs, grad_exponent) with respect to ``grad`` (all three are
    linear in it): what a Hessian-vector product through the quantizer needs (HAWQ on a model
    with fake-quantized weights, the straight-through Hessian mask·H·mask). The per-element
    exponent / range terms come from the reference's formulas. The derivatives with respect to
    x, max_abs and exponent of the backward itself (piecewise constant in x) are not given."""
    x, max_abs, exponent = ctx.saved_tensors
    C = max(max_abs.numel(), 1)
    x2 = x.reshape(C, -1)
    m = max_abs.detach().reshape(C, 1).to(x.dtype)
    out = torch.zeros_like(x2)
    if gg_dx is not None:
        out = out + torch.where(x2.abs() <= m, gg_dx.reshape(C, -1), torch.zeros_like(x2))
    if gg_dm is not None or gg_da is not None:
        ta, tm = _reference_terms(x, max_abs, exponent, ctx.qmax, ctx.ste)
        extra = torch.zeros_like(ta)
        if gg_dm is not None:
            extra = extra + tm * gg_dm.detach().reshape(C, 1).to(torch.float64)
        if gg_da is not None:
            ga = gg_da.detach().reshape(-1, 1).to(torch.float64)
            extra = extra + ta * (ga if ga.numel() == C and C > 1 else ga.reshape(1, 1))
        out = out + extra.to(x.dtype)
    return out.reshape(x.shape), None, None, None, None, None, None, None


def _register_native() -> None:
    if not (_ext.LOADED and hasattr(torch.ops.pypaper, "power_quantize")):
        return
    ops = torch.ops.pypaper
    torch.library.register_fake("pypaper::power_quantize")(_fake_quantize_codes)
    torch.library.register_fake("pypaper::power_dequantize")(_fake_dequantize)
    torch.library.register_fake("pypaper::power_fake_quantize")(_fake_fake_quantize)
    torch.library.register_fake("pypaper::power_fake_quantize_backward")(_fake_backward)
    _autograd.register_autograd("pypaper::power_fake_quantize",
                                _make_fq_backward(ops.power_fake_quantize_backward),
                                setup_context=_fq_setup)
    _autograd.register_autograd("pypaper::power_fake_quantize_backward", _double_backward,
                                setup_context=_dbl_setup)
    _register_codecs("")


def _register_codecs(suffix: str) -> None:
    """quantize / dequantize, which have no backward (suffix "" or "_triton")."""
    _autograd.register_constant(f"pypaper::power_quantize{suffix}")  # int8 codes
    _autograd.register_no_backward(
        f"pypaper::power_dequantize{suffix}", "it decodes frozen int8 codes; to learn max_abs or "
        "the exponent differentiate power_fake_quantize")
    vmap_rules.register_power(suffix)  # all four power ops (their autograd is registered by now)


_register_native()

_triton_module = None


def load_triton():
    """Imports pypaper/quant/power_triton.py once and registers the autograd of its ops."""
    global _triton_module
    if _triton_module is None:
        from . import power_triton

        if power_triton.HAVE_TRITON:
            ops = torch.ops.pypaper
            _autograd.register_autograd(
                "pypaper::power_fake_quantize_triton",
                _make_fq_backward(ops.power_fake_quantize_backward_triton),
                setup_context=_fq_setup)
            _autograd.register_autograd("pypaper::power_fake_quantize_backward_triton",
                                        _double_backward, setup_context=_dbl_setup)
            _register_codecs("_triton")
        _triton_module = power_triton
    return _triton_module


# ---- backend selection ---------------------------------------------------------------------------

_DEFAULT_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}


def _native_reason(device, name):
    why = _backend.native_reason(device, name)
    if why is None and not hasattr(torch.ops.pypaper, "power_quantize"):
        return "pypaper._C was built without the power-quantizer ops (rebuild it)"
    return why


def _triton_reason(device: torch.device) -> Optional[str]:
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter)"
    ok, why = load_triton().triton_available(device)
    return None if ok else why


_REASONS = {"cpu": lambda d: _native_reason(d, "cpu"), "cuda": lambda d: _native_reason(d, "cuda"),
            "triton": _triton_reason}


def backend_for(x: torch.Tensor) -> str:
    """The backend the power-quantizer ops would use for x now."""
    return _backend.select(x.device, _DEFAULT_ORDER.get(x.device.type, ("reference",)), _REASONS)


def _op(name: str, backend: str):
    return getattr(torch.ops.pypaper, name + ("_triton" if backend == "triton" else ""))


# ---- public ops ----------------------------------------------------------------------------------

Number = Union[float, torch.Tensor]


def _prepare(x, max_abs, exponent, bits):
    _check_x(x)
    qmax = bits_to_qmax(bits)
    if max_abs is None:
        max_abs = channel_max_abs(x, per_channel=False)
    max_abs = _as_param(max_abs, "max_abs", x)
    exponent = _as_param(exponent, "exponent", x)
    _check_max_abs(max_abs, x.numel() if x.numel() else max_abs.numel())
    _check_exponent(exponent, max_abs.numel())
    return max_abs, exponent, qmax


def power_quantize(x: torch.Tensor, exponent: Number, bits: int = 4,
                   max_abs: Optional[Number] = None) -> torch.Tensor:
    """int8 codes sign(x)·min(round(qmax·(|x|/m)^a), qmax) of the power quantizer.

    Args:
        x: float tensor (float32/float64 natively; bfloat16/float16 are quantized in float32).
        exponent: a (> 0, finite): a float, or a tensor of 1 or C values.
        bits: 2..8 (qmax = 2^(bits-1) - 1).
        max_abs: the range m, one value (per tensor) or C values, one per leading row of x
            (``channel_max_abs(x)``); default max|x| over the tensor.
    """
    max_abs, exponent, qmax = _prepare(x, max_abs, exponent, bits)
    xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
    backend = backend_for(x)
    if backend == "reference":
        return reference_codes(xf, max_abs, exponent, qmax)
    return _op("power_quantize", backend)(xf, max_abs, exponent, qmax)


def power_dequantize(codes: torch.Tensor, exponent: Number, bits: int, max_abs: Number,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """y = sign(code)·m·(|code|/qmax)^(1/a) in ``dtype`` (the inverse power)."""
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.int8:
        raise TypeError(f"codes must be an int8 tensor (from power_quantize), got "
                        f"{getattr(codes, 'dtype', type(codes).__name__)}")
    if dtype not in _FLOATS:
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    qmax = bits_to_qmax(bits)
    max_abs = _as_param(max_abs, "max_abs", codes)
    exponent = _as_param(exponent, "exponent", codes)
    _check_max_abs(max_abs, codes.numel() if codes.numel() else max_abs.numel())
    _check_exponent(exponent, max_abs.numel())
    kd = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    backend = backend_for(codes)
    if backend == "reference":
        y = reference_dequantize(codes, max_abs, exponent, qmax, kd)
    else:
        y = _op("power_dequantize", backend)(codes, max_abs, exponent, qmax, kd)
    return y.to(dtype)


def power_fake_quantize(x: torch.Tensor, exponent: Number, bits: int = 4,
                        max_abs: Optional[Number] = None, *,
                        exponent_grad: str = "ste") -> torch.Tensor:
    """Quantize-dequantize x with the power quantizer, differentiable.

    Gradients: straight-through for x (masked where |x| > m); for ``exponent`` and ``max_abs``
    (when they require grad), summed per range: ``exponent_grad="ste"`` (LSQ-style, through the
    rounding) or ``"fixed"`` (codes held fixed); formulas in the module docstring. Arguments as
    :func:`power_quantize`.
    """
    if exponent_grad not in ("ste", "fixed"):
        raise ValueError(f"exponent_grad must be 'ste' or 'fixed', got {exponent_grad!r}")
    ste = exponent_grad == "ste"
    max_abs, exponent, qmax = _prepare(x, max_abs, exponent, bits)
    xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
    backend = backend_for(x)
    if backend == "reference":
        y = _ReferenceFakeQuantize.apply(xf, max_abs, exponent, qmax, ste)
    else:
        y = _op("power_fake_quantize", backend)(xf, max_abs, exponent, qmax, ste)
    return y if y.dtype == x.dtype else y.to(x.dtype)
