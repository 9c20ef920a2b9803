"""Benchmarks of pypaper.snn.DelayedLinear: learnable synaptic delays (Hammouamri et al., ICLR 2024).

The layer of SNN-delays' SHD model (their config.py: 256 hidden neurons, time step 10 ms, so
T = 100 steps per sample, batch 128, max_delay 200 ms / 10 ms made odd: K = 21 taps; DCLS's SIG
starts at K // 3 = 7 and decays to 0.23 over the first half of training; positions rounded at the
end).

sigma: DCLS's 'gauss' kernel is a Gaussian of width |SIG| + 0.27 for its parameter SIG
(DCLS/construct/modules.py: SIG = SIG.abs() + 0.27); pypaper's sigma is the width itself. Each case
sets DCLS's SIG and gives pypaper sigma = SIG + 0.27, the same Gaussian (SIG 7 -> sigma 7.27,
SIG 0.23 -> sigma 0.5); the labels say both.

Providers:
  pypaper     delayed_linear, the device's default backend (CPU: the gather kernel, the 2R taps of
              each synapse's window, R = ceil(3 sigma); one tap once rounded);
  dcls        DCLS's Dcls1d(version='gauss') as SNN-delays runs it: the [C_out, C_in, K] kernel
              built from the Gaussians, then conv1d over the time-padded input (the `dcls` package,
              pip install dcls; its cost does not depend on sigma). The baseline of the "vs" column;
  reference   pypaper's plain-PyTorch dense convolution (the same truncated Gaussian as the kernel);
  linear      nn.Linear on the same tensors, no delays: what the layer costs without them.

Causal padding (K - 1 steps before, none after) for dcls, so that every provider computes
[T, N, C_in] -> [T, N, C_out]; SNN-delays also pads (K - 1) // 2 steps after, 10% more output.
"""
import contextlib
import importlib.util

from . import harness  # first: sets THP_MEM_ALLOC_ENABLE before torch loads
from .harness import Case, Provider, forward_backward, saved_bytes, unavailable

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import pypaper  # noqa: E402
from pypaper.snn import delays  # noqa: E402

QUICK_MODES = ("fwd", "fwd+bwd")
T, HIDDEN, K = 100, 256, 21
SIG_INIT, SIG_FINAL = K // 3, 0.23  # SNN-delays' DCLS SIG at the start and the end of training
DCLS_GAUSS_OFFSET = 0.27  # DCLS 'gauss': Gaussian width = |SIG| + 0.27
SPIKE_RATE = 0.1  # inputs are spikes (0 / 1), as a hidden layer's are


def width(sig: float) -> float:
    """pypaper's sigma for DCLS's 'gauss' SIG: the width of the Gaussian DCLS builds."""
    return abs(sig) + DCLS_GAUSS_OFFSET


def _dcls_layer(c_in, c_out, sig, device):
    """SNN-delays' Dcls1d with its SIG fixed (SIG.requires_grad = False, as they train; None:
    rounded, SIG at its final 0.23 and only the weights trained), or the reason it is
    missing."""
    if importlib.util.find_spec("DCLS") is None:
        return None, "dcls is not installed (pip install dcls)"
    from DCLS.construct.modules import Dcls1d

    layer = Dcls1d(c_in, c_out, kernel_count=1, dilated_kernel_size=K, bias=False,
                   version="gauss").to(device)
    with torch.no_grad():  # rounded: SNN-delays rounds P and keeps SIG at its final 0.23
        layer.SIG.fill_(SIG_FINAL if sig is None else sig)
    layer.SIG.requires_grad_(False)

    def run(x):  # [T, N, C] -> [N, C, T], causal padding, conv, back to [T, N, C]
        y = layer(F.pad(x.permute(1, 2, 0), (K - 1, 0)))
        return y.permute(2, 0, 1)

    return (run, [layer.weight] if sig is None else [layer.weight, layer.P]), None


def _providers(batch, c_in, c_out, sig, device, modes) -> list:
    sigma = 0.0 if sig is None else width(sig)  # pypaper's: DCLS's Gaussian, or rounded
    torch.manual_seed(0)
    x = (torch.rand(T, batch, c_in, device=device) < SPIKE_RATE).float()
    xg = x.detach().clone().requires_grad_()
    g = torch.randn(T, batch, c_out, device=device)
    weight = nn.Parameter(torch.randn(c_out, c_in, device=device) * c_in ** -0.5)
    position = nn.Parameter(torch.rand(c_out, c_in, device=device) * (K - 1))
    if sigma == 0:
        with torch.no_grad():
            position.round_()

    # after round_delays() the positions are fixed: only the weights learn
    trained = [weight] if sigma == 0 else [weight, position]

    def op(t):
        return delays.delayed_linear(t, weight, position, None, max_delay=K, sigma=sigma)

    def make(name, fn, params, backend=None):
        calls = {}
        if "fwd" in modes:
            calls["fwd"] = lambda: fn(x)
        if "fwd+bwd" in modes:
            calls["fwd+bwd"] = forward_backward(lambda: fn(xg), [xg, *params], g)
        p = Provider(name, harness.on_backend(calls, backend))
        if "fwd+bwd" in modes:
            with pypaper.use_backend(backend) if backend else contextlib.nullcontext():
                p.saved_bytes = saved_bytes(lambda: fn(xg), exclude=params)
        return p

    out = [make("pypaper", op, trained)]
    dcls, why = _dcls_layer(c_in, c_out, sig, device)
    out.append(make("dcls", *dcls) if dcls else unavailable("dcls", why))
    out.append(make("reference", op, trained, backend="reference"))
    lin = nn.Linear(c_in, c_out, bias=False).to(device)
    out.append(make("linear", lin, list(lin.parameters())))
    return out


def delay_case(batch, c_in, c_out, sig, device, modes=harness.MODES) -> Case:
    """DelayedLinear(c_in, c_out, max_delay=K) on spikes [T, batch, c_in] against Dcls1d at DCLS's
    SIG = sig, pypaper at sigma = width(sig) (None: rounded)."""
    modes = tuple(m for m in modes if m != "bwd")
    e = 4
    xs, ys, ws = T * batch * c_in * e, T * batch * c_out * e, c_out * c_in * e
    moved = {"fwd": xs + ys + 2 * ws, "fwd+bwd": 2 * (xs + ys + 2 * ws) + xs + ys + 2 * ws}
    label = "rounded" if sig is None else f"sigma {width(sig):g} (DCLS SIG {sig:g})"
    return Case(
        f"DelayedLinear K={K} {label}", (T, batch, c_in, c_out), torch.float32, device,
        bytes_moved={m: v for m, v in moved.items() if m in modes},
        providers=lambda: _providers(batch, c_in, c_out, sig, device, modes),
        bytes_note="x read, y written, weight and position read (fwd); fwd+bwd adds gy read, "
                   "x read again, grad_x written, grad_w and grad_position written. The layer is "
                   "bound by its multiply-adds, not by these bytes: compare times",
        baseline="dcls",
    )


def cases(device: str = "cpu", quick: bool = False, numel: int = 1 << 23) -> list:
    """Quick: the SHD hidden layer (256 -> 256, batch 128) at DCLS SIG 7 (the start of training,
    pypaper sigma 7.27) and 0.23 (its end, sigma 0.5). Full: also SIG 3 and 1, the rounded delays,
    and the input layer (140 -> 256, SHD's 700 channels binned by 5). ``numel`` (input elements,
    T * batch * 256) scales the batch for smoke tests: the default keeps SNN-delays' 128."""
    batch = max(1, min(128, numel // (T * HIDDEN)))
    if quick:
        return [delay_case(batch, HIDDEN, HIDDEN, s, device, QUICK_MODES)
                for s in (SIG_INIT, SIG_FINAL)]
    out = [delay_case(batch, HIDDEN, HIDDEN, s, device)
           for s in (SIG_INIT, 3, 1, SIG_FINAL, None)]
    out += [delay_case(batch, 140, HIDDEN, s, device) for s in (SIG_INIT, SIG_FINAL)]
    return out
