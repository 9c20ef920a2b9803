"""Benchmarks of pypaper.quant.fewbit: activations that keep b bits per element for backward.

Providers: "pypaper" (the device's default backend; "pypaper-cuda" / "pypaper-triton" on GPUs),
"torch" (torch's own activation, which keeps the float input for its backward: the baseline of
the speedup column), "uint8-codes" (plain PyTorch keeping one uint8 code per element, what the
reference implementation fewbit does on the CPU), "reference" (pypaper's plain-PyTorch backend,
bit-packed) and "compiled-reference" (torch.compile of the uint8 version: the packed reference
scatters bits and does not compile to anything useful).

Inputs are N(0, 1), the density the default tables are fitted for.
"""
import math

from . import harness  # first: sets THP_MEM_ALLOC_ENABLE before torch loads
from .harness import Case, Provider, backward_only, forward_backward, saved_bytes, unavailable

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import pypaper  # noqa: E402
import pypaper.quant.fewbit as fb  # noqa: E402
from pypaper.quant.fewbit import reference  # noqa: E402

DEFAULT_NUMEL = 1 << 24
QUICK_MODES = ("fwd", "fwd+bwd")


class _Uint8Codes(torch.autograd.Function):
    """y = f(x); saves one uint8 code per element (torch.bucketize), backward levels[code] * g."""

    @staticmethod
    def forward(ctx, x, name, params, borders, levels):
        ctx.save_for_backward(torch.bucketize(x, borders, right=False).to(torch.uint8), levels)
        return reference.activation(x, name, params)

    @staticmethod
    def backward(ctx, g):
        codes, levels = ctx.saved_tensors
        return (g * levels[codes.long()]).to(g.dtype), None, None, None, None


def _uint8_activation(x, approx):
    # bucketize(right=False) counts borders strictly below x: the same piece as the kernels
    borders, levels = approx.tensors(x.dtype, x.device)
    return _Uint8Codes.apply(x, approx.name, approx.params, borders.to(x.dtype), levels)


def _provider(name, fn, x, xg, g, modes, backend=None) -> Provider:
    calls = {}
    if "fwd" in modes:
        # the training forward (x requires grad): without a gradient to come the few-bit ops
        # run torch's activation alone and pack nothing
        calls["fwd"] = lambda: fn(xg)
    if "bwd" in modes:
        calls["bwd"] = backward_only(lambda: fn(xg), [xg], g)
    if "fwd+bwd" in modes:
        calls["fwd+bwd"] = forward_backward(lambda: fn(xg), [xg], g)
    calls = harness.on_backend(calls, backend)
    p = Provider(name, calls)
    if backend is not None:
        with pypaper.use_backend(backend):
            p.saved_bytes = saved_bytes(lambda: fn(xg))
    else:
        p.saved_bytes = saved_bytes(lambda: fn(xg))
    return p


def _backend_reason(backend, x):
    try:
        with pypaper.use_backend(backend):
            fb.backend_for(x)
    except pypaper.BackendUnavailable as e:
        return str(e)
    return None


def _providers(numel, dtype, device, modes, torch_fn, approx) -> list:
    x = torch.randn(numel, device=device).to(dtype)
    xg = x.detach().clone().requires_grad_()
    g = torch.randn_like(x)
    ours = lambda t: fb.apply(t, approx)  # noqa: E731
    out = [_provider("pypaper", ours, x, xg, g, modes)]
    if x.device.type == "cuda":
        for b in ("cuda", "triton"):
            why = _backend_reason(b, x)
            out.append(unavailable(f"pypaper-{b}", why) if why else
                       _provider(f"pypaper-{b}", ours, x, xg, g, modes, b))
    compiled = torch.compile(lambda t: _uint8_activation(t, approx))
    out += [
        _provider("torch", torch_fn, x, xg, g, modes),
        _provider("uint8-codes", lambda t: _uint8_activation(t, approx), x, xg, g, modes),
        _provider("compiled-reference", compiled, x, xg, g, modes),
        _provider("reference", ours, x, xg, g, modes, "reference"),
    ]
    return out


_TORCH = {"gelu": F.gelu, "silu": F.silu, "relu": F.relu, "tanh": torch.tanh}


def activation_case(name, bits, numel, dtype, device, modes=harness.MODES) -> Case:
    approx = fb.approximation(name, bits)  # the DP runs here, not in the timed calls
    t = numel * torch.empty((), dtype=dtype).element_size()
    c = math.ceil(approx.bits * numel / 8)
    label = f"fewbit {name} {approx.bits}-bit{' (exact)' if approx.exact else ''}"
    return Case(
        label, (numel,), dtype, device,
        bytes_moved={m: v for m, v in (("fwd", 2 * t + c), ("bwd", 2 * t + c),
                                       ("fwd+bwd", 4 * t + 2 * c)) if m in modes},
        providers=lambda: _providers(numel, dtype, device, modes, _TORCH[name], approx),
        bytes_note="fwd (x requires grad): x read + y and the packed codes written; bwd: grad_y and codes read + "
                   "grad_x written (torch's own backward reads x instead of the codes)",
        baseline="torch",
    )


def cases(device: str = "cpu", quick: bool = False, numel: int = DEFAULT_NUMEL) -> list:
    """Quick: GELU at 2 bits, fp32, fwd and fwd+bwd. Full: GELU at 1..4 bits, the backward
    alone, bf16, SiLU, and ReLU (exact at 1 bit)."""
    f32 = torch.float32
    if quick:
        return [activation_case("gelu", 2, numel, f32, device, QUICK_MODES)]
    out = [activation_case("gelu", b, numel, f32, device) for b in (1, 2, 3, 4)]
    out += [activation_case("gelu", 2, numel, torch.bfloat16, device),
            activation_case("silu", 2, numel, f32, device),
            activation_case("relu", 1, numel, f32, device)]
    return out
