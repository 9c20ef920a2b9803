"""Benchmarks of the power-exponent quantizer (PowerQuant / NUPES, pypaper/quant/power.py).

Cases: the fake-quantizer y = sign(x)·m·(round(qmax·(|x|/m)^a)/qmax)^(1/a) with one range per row
(forward, forward+backward with the learnable exponent's gradient), and quantize -> int8 codes.

Providers: "pypaper" (the device's default backend: the C++ kernel on CPU, a threshold count and
a level lookup per element, no pow), "pypaper-cuda" / "pypaper-triton" on GPUs, "reference" (the
plain-PyTorch backend, searchsorted over the same tables), "compiled-formula" (torch.compile of
the direct formula with pow, what a user would write), and "uniform (pypaper)" /
"uniform (torch)" (per-channel uniform fake-quantize at the same bits: pypaper's fake_quantize
and torch.fake_quantize_per_channel_affine), the cost of the power grid over a uniform one.
Inputs: Student-t(3) weights (heavy tails), a = 0.6.
"""
from . import harness  # first: sets THP_MEM_ALLOC_ENABLE before torch loads
from .harness import Case, Provider, backward_only, forward_backward, unavailable

import torch  # noqa: E402

import pypaper  # noqa: E402
from pypaper.quant import fake_quantize  # noqa: E402
from pypaper.quant import power as P  # noqa: E402

DEFAULT_NUMEL = 1 << 24
A = 0.6


def shape_for(numel: int) -> tuple:
    cols = 4096 if numel >= 4096 * 16 else 256
    return (max(1, numel // cols), cols)


def _formula(x, m, a, qmax):
    """The power quantizer written directly with pow (the compiled-formula provider)."""
    md = m.reshape(-1, 1)
    u = x.abs() / md
    c = torch.clamp(torch.round(qmax * u ** a), max=qmax)
    return torch.sign(x) * md * (c / qmax) ** (1.0 / a)


def _in_backend(backend, call):
    def run():
        with pypaper.use_backend(backend):
            return call()
    return run


def _backend_reason(backend, x):
    try:
        with pypaper.use_backend(backend):
            P.backend_for(x)
    except pypaper.BackendUnavailable as e:
        return str(e)
    return None


def _provider(name, fn, x, xg, g, modes, backend=None):
    calls = {}
    if "fwd" in modes:
        calls["fwd"] = lambda: fn(x)
    if "fwd+bwd" in modes:
        calls["fwd+bwd"] = forward_backward(lambda: fn(xg), [xg], g)
    if "bwd" in modes:
        calls["bwd"] = backward_only(lambda: fn(xg), [xg], g)
    if backend is not None:
        calls = {k: _in_backend(backend, c) for k, c in calls.items()}
    return Provider(name, calls)


def fake_quantize_case(shape, bits, device, modes=("fwd", "fwd+bwd")) -> Case:
    n = shape[0] * shape[1]
    qmax = P.bits_to_qmax(bits)

    def providers():
        x = torch.distributions.StudentT(3.0).sample(shape).to(device)
        m = P.channel_max_abs(x)
        a = torch.tensor(A, device=device, requires_grad=True)
        xg = x.clone().requires_grad_()
        g = torch.randn_like(x)
        ours = lambda t: P.power_fake_quantize(t, a, bits, m)  # noqa: E731
        out = [_provider("pypaper", ours, x, xg, g, modes)]
        if x.device.type == "cuda":
            for b in ("cuda", "triton"):
                why = _backend_reason(b, x)
                out.append(unavailable(f"pypaper-{b}", why) if why else
                           _provider(f"pypaper-{b}", ours, x, xg, g, modes, b))
        compiled = torch.compile(lambda t: _formula(t, m, a, qmax))
        scale = (m / qmax).clamp_min(1e-12)
        zp = torch.zeros(shape[0], dtype=torch.int32, device=device)
        out += [
            _provider("reference", ours, x, xg, g, modes, "reference"),
            _provider("compiled-formula", compiled, x, xg, g, modes),
            _provider("uniform (pypaper)",
                      lambda t: fake_quantize(t, scale, zp, bits, axis=0), x, xg, g, modes),
            _provider("uniform (torch)",
                      lambda t: torch.fake_quantize_per_channel_affine(t, scale, zp, 0, -qmax,
                                                                       qmax), x, xg, g, modes),
        ]
        return out

    return Case(f"power fake-quant {bits}-bit", shape, torch.float32, device,
                bytes_moved={k: v for k, v in (("fwd", 8 * n), ("bwd", 12 * n),
                                               ("fwd+bwd", 20 * n)) if k in modes},
                providers=providers,
                bytes_note="fwd: x read + y written (fp32); bwd: grad_y and x read + grad_x "
                           "written (the exponent / range sums are per row)")


def quantize_case(shape, bits, device) -> Case:
    n = shape[0] * shape[1]

    def providers():
        x = torch.distributions.StudentT(3.0).sample(shape).to(device)
        m = P.channel_max_abs(x)
        ours = lambda: P.power_quantize(x, A, bits, m)  # noqa: E731
        out = [Provider("pypaper", {"fwd": ours})]
        out.append(Provider("reference", {"fwd": _in_backend("reference", ours)}))
        qmax = P.bits_to_qmax(bits)
        comp = torch.compile(lambda t: (torch.sign(t) * torch.clamp(torch.round(
            qmax * (t.abs() / m.reshape(-1, 1)) ** A), max=qmax)).to(torch.int8))
        out.append(Provider("compiled-formula", {"fwd": lambda: comp(x)}))
        return out

    return Case(f"power quantize {bits}-bit -> int8", shape, torch.float32, device,
                bytes_moved={"fwd": 5 * n}, providers=providers,
                bytes_note="x read (fp32) + int8 codes written")


def cases(device: str = "cpu", quick: bool = False, numel: int = DEFAULT_NUMEL) -> list:
    """Quick: 4-bit fake-quant (fwd, fwd+bwd) and 4-bit quantize. Full: 2, 4 and 8 bits, the
    backward alone."""
    shape = shape_for(numel)
    if quick:
        return [fake_quantize_case(shape, 4, device), quantize_case(shape, 4, device)]
    out = [fake_quantize_case(shape, b, device, ("fwd", "bwd", "fwd+bwd")) for b in (2, 4, 8)]
    out += [quantize_case(shape, b, device) for b in (4, 8)]
    return out
