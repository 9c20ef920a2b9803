"""Benchmarks of pypaper.quant: fake_quantize (STE, LSQ+) and quantize+dequantize.

Providers: "pypaper" (the device's default backend), "pypaper-cuda" / "pypaper-triton" (CUDA
devices only), "reference" (the plain-PyTorch backend), "compiled-reference"
(torch.compile(fullgraph=True) of the reference functions) and "torch" (torch's own ops:
fake_quantize_per_tensor_affine / _per_channel_affine, _fake_quantize_learnable_per_tensor_affine,
quantize_per_tensor / quantize_per_channel + dequantize).

8-bit codes are symmetric, [-128, 127]; inputs are N(0, 1) and the fake-quant scale is 3/127, so
about 0.3% of the elements clip and both branches of the straight-through gradient run.
"""
import importlib.util
import math
import warnings

from . import harness  # first: sets THP_MEM_ALLOC_ENABLE before torch loads
from .harness import Case, Provider, backward_only, forward_backward, unavailable

import torch  # noqa: E402

import pypaper  # noqa: E402
from pypaper.quant import dequantize, fake_quantize, quantize, reference  # noqa: E402
from pypaper.quant import ops as _ops  # noqa: E402
from pypaper.quant.layout import param_shape, quant_range  # noqa: E402

QMIN, QMAX = quant_range(8, True)
SCALE = 3.0 / QMAX
DEFAULT_NUMEL = 1 << 24
QUICK_MODES = ("fwd", "fwd+bwd")

# torch's quantized-tensor creators warn once that they are deprecated; they are the peer here.
warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")


def shape_for(numel: int) -> tuple:
    """A 2-D shape of about ``numel`` elements, square-ish, last dim a multiple of 128 (groups)."""
    cols = max(128, 1 << int(math.log2(max(1, numel)) / 2))
    return (max(1, numel // cols), cols)


def _nbytes(numel: int, dtype: torch.dtype) -> int:
    return numel * torch.empty((), dtype=dtype).element_size()


# ---------------------------------------------------------------------------------------------
# Providers


def _in_backend(backend: str, call):
    def run():
        with pypaper.use_backend(backend):
            return call()

    return run


def _backend_reason(backend: str, x: torch.Tensor):
    """Why pypaper's ``backend`` cannot serve x (None if it can)."""
    try:
        with pypaper.use_backend(backend):
            pypaper.quant.backend_for(x)
    except pypaper.BackendUnavailable as e:
        return str(e)
    return None


def _autograd_provider(name: str, forward, x, xg, params, grad, modes, backend=None) -> Provider:
    """Calls per mode of y = forward(t): "fwd" on x; "bwd" / "fwd+bwd" differentiate wrt
    [xg, *params] with incoming gradient ``grad``."""
    calls = {}
    inputs = [xg, *params]
    if "fwd" in modes:
        calls["fwd"] = lambda: forward(x)
    if "bwd" in modes:
        calls["bwd"] = backward_only(lambda: forward(xg), inputs, grad)
    if "fwd+bwd" in modes:
        calls["fwd+bwd"] = forward_backward(lambda: forward(xg), inputs, grad)
    if backend is not None:
        calls = {m: _in_backend(backend, c) for m, c in calls.items()}
    return Provider(name, calls)


def _pypaper_backends(x: torch.Tensor, make) -> list:
    """"pypaper" with the default backend, plus the explicit CUDA and Triton backends on GPUs.
    ``make(name, backend)`` builds the provider."""
    out = [make("pypaper", None)]
    if x.device.type == "cuda":
        for backend in ("cuda", "triton"):
            why = _backend_reason(backend, x)
            out.append(unavailable(f"pypaper-{backend}", why) if why else
                       make(f"pypaper-{backend}", backend))
    return out


def _compile(fn):
    return torch.compile(fn, fullgraph=True)


# ---------------------------------------------------------------------------------------------
# fake_quantize


def _fq_params(x, axis, learnable):
    """scale / zero point of pypaper's call: per-tensor 0-d or per-channel [C]; for LSQ+ both
    are learnable (float zero point), which is what torch's learnable op always computes."""
    n = 1 if axis is None else x.shape[axis]
    shape = () if axis is None else (n,)
    s = torch.full(shape, SCALE, device=x.device)
    if learnable:
        return s.requires_grad_(), torch.zeros(shape, device=x.device).requires_grad_()
    return s, torch.zeros(shape, dtype=torch.int32, device=x.device)


def _torch_fq(x, axis, learnable):
    """torch's own fake-quant op of the same granularity, and its learnable parameters."""
    if learnable:
        s = torch.full((1,), SCALE, device=x.device, requires_grad=True)
        z = torch.zeros(1, device=x.device, requires_grad=True)
        return (lambda t: torch._fake_quantize_learnable_per_tensor_affine(t, s, z, QMIN, QMAX, 1.0),
                [s, z])
    if axis is None:
        return lambda t: torch.fake_quantize_per_tensor_affine(t, SCALE, 0, QMIN, QMAX), []
    s = torch.full((x.shape[axis],), SCALE, device=x.device)
    z = torch.zeros(x.shape[axis], dtype=torch.int32, device=x.device)
    return lambda t: torch.fake_quantize_per_channel_affine(t, s, z, axis, QMIN, QMAX), []


def _fq_providers(shape, dtype, device, modes, axis, learnable) -> list:
    x = torch.randn(shape, device=device).to(dtype)
    xg = x.detach().clone().requires_grad_()
    g = torch.randn_like(x)
    s, z = _fq_params(x, axis, learnable)
    params = [s, z] if learnable else []

    def pp(t):
        return fake_quantize(t, s, z, 8, axis=axis)

    def ref(t, s_, z_):
        return reference.fake_quantize(t, s_, z_, QMIN, QMAX, axis)

    compiled = _compile(ref)
    torch_fq, torch_params = _torch_fq(x, axis, learnable)
    out = _pypaper_backends(x, lambda name, b: _autograd_provider(name, pp, x, xg, params, g,
                                                                  modes, b))
    out += [
        _autograd_provider("reference", pp, x, xg, params, g, modes, "reference"),
        _autograd_provider("compiled-reference", lambda t: compiled(t, s, z), x, xg, params, g,
                           modes),
        _autograd_provider("torch", torch_fq, x, xg, torch_params, g, modes),
    ]
    return out


def fake_quantize_case(shape, dtype, device, modes=harness.MODES, axis=None,
                       learnable=False) -> Case:
    """y = fake_quantize(x) int8; backward STE for x (plus LSQ+ scale/zero-point gradients)."""
    n = math.prod(shape)
    t = _nbytes(n, dtype)
    gran = "per-tensor" if axis is None else f"per-channel axis {axis}"
    kernel = f"fake_quantize int8 {'LSQ+ ' if learnable else ''}{gran}"
    return Case(
        kernel, tuple(shape), dtype, device,
        bytes_moved={m: b for m, b in (("fwd", 2 * t), ("bwd", 3 * t), ("fwd+bwd", 5 * t))
                     if m in modes},
        providers=lambda: _fq_providers(shape, dtype, device, modes, axis, learnable),
        bytes_note="fwd: x read + y written; bwd: grad_y and x read + grad_x written "
                   "(scale/zero-point gradients are scalars); fwd+bwd: both",
    )


# ---------------------------------------------------------------------------------------------
# quantize + dequantize


def _reference_qdq(x, bits, axis, group_size):
    """What quantize + dequantize do on the reference backend, as one traceable function."""
    qmin, qmax = quant_range(bits, True)
    scale, zp = _ops._params_from_range(x, bits, axis, group_size, True)
    codes = reference.quantize_codes(x, scale, zp, qmin, qmax, axis, group_size)
    if bits <= 4:
        codes = reference.unpack_nibbles(reference.pack_nibbles(codes), x.shape[-1], True)
    else:
        codes = codes.to(torch.int8)
    return reference.dequantize_codes(codes, scale, zp, qmin, qmax, axis, group_size, x.dtype)


def _torch_qdq(x, bits, axis, group_size):
    """torch.quantize_per_tensor / _per_channel + dequantize, scales from the same abs-max."""
    if bits != 8 or group_size is not None:
        ao = "installed but not wired here" if importlib.util.find_spec("torchao") else "not installed"
        return None, (f"torch has no {bits}-bit group-wise quantize "
                      f"(torchao would be the peer: {ao})")
    if axis is None:
        def run():
            s = float(x.abs().amax()) / QMAX
            return torch.quantize_per_tensor(x, s, 0, torch.qint8).dequantize()
    else:
        zp = torch.zeros(x.shape[axis], dtype=torch.int64, device=x.device)
        dims = tuple(d for d in range(x.dim()) if d != axis)

        def run():
            s = x.abs().amax(dim=dims) / QMAX
            return torch.quantize_per_channel(x, s, zp, axis, torch.qint8).dequantize()
    return run, None


def _qdq_providers(shape, dtype, device, bits, axis, group_size) -> list:
    x = torch.randn(shape, device=device).to(dtype)

    def pp():
        return dequantize(quantize(x, bits, axis=axis, group_size=group_size))

    compiled = _compile(_reference_qdq)
    peer, why = _torch_qdq(x, bits, axis, group_size)
    out = _pypaper_backends(x, lambda name, b: Provider(
        name, {"fwd": pp if b is None else _in_backend(b, pp)}))
    out += [
        Provider("reference", {"fwd": _in_backend("reference", pp)}),
        Provider("compiled-reference", {"fwd": lambda: compiled(x, bits, axis, group_size)}),
        Provider("torch", {"fwd": peer}) if peer else unavailable("torch", why),
    ]
    return out


def qdq_case(shape, dtype, device, bits=8, axis=None, group_size=None) -> Case:
    """dequantize(quantize(x)): scales from the abs-max, codes, then floats back."""
    n = math.prod(shape)
    codes = n if bits > 4 else n // 2
    pshape = param_shape(shape, axis, group_size)
    params = math.prod(pshape) * 8  # fp32 scale + int32 zero point
    t = _nbytes(n, dtype)
    gran = ("per-tensor" if axis is None and group_size is None else
            f"per-channel axis {axis}" if axis is not None else f"group {group_size}")
    return Case(
        f"quantize+dequantize int{bits} {gran}", tuple(shape), dtype, device,
        bytes_moved={"fwd": 2 * t + 2 * (codes + params)},
        providers=lambda: _qdq_providers(shape, dtype, device, bits, axis, group_size),
        bytes_note="x read + codes and scales written (quantize) + codes and scales read + "
                   "y written (dequantize); the abs-max pass over x is not counted",
    )


# ---------------------------------------------------------------------------------------------
# The family


def cases(device: str = "cpu", quick: bool = False, numel: int = DEFAULT_NUMEL) -> list:
    """Quick: per-tensor fake_quantize (fwd, fwd+bwd) and int8 quantize+dequantize, fp32.
    Full: also the backward alone, LSQ+, per-channel, int4 group-wise, and bf16."""
    shape = shape_for(numel)
    f32 = torch.float32
    if quick:
        return [fake_quantize_case(shape, f32, device, QUICK_MODES), qdq_case(shape, f32, device)]
    out = [
        fake_quantize_case(shape, f32, device),
        fake_quantize_case(shape, f32, device, learnable=True),
        fake_quantize_case(shape, f32, device, axis=0),
        qdq_case(shape, f32, device),
        qdq_case(shape, f32, device, axis=0),
        qdq_case(shape, f32, device, bits=4, group_size=128),
    ]
    bf16 = torch.bfloat16
    out += [fake_quantize_case(shape, bf16, device), qdq_case(shape, bf16, device)]
    return out
