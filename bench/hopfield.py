"""Benchmarks of pypaper.hopfield: the fused multi-step Hopfield retrieval and the layers.

Providers (every one in the same run):
  "pypaper"            pypaper.ops.hopfield_retrieve (C++ on CPU): all steps + the final
                       projection in one op, online softmax, nothing L x S kept for backward;
  "reference"          the plain-PyTorch loop that materialises each step's association matrix
                       and keeps every step for autograd, as hflayers does (the speedup baseline);
  "sdpa-chain"         the same fixed number of steps chained through
                       torch.nn.functional.scaled_dot_product_attention (torch's fused CPU
                       attention; no convergence check);
  "compiled-reference" torch.compile of the reference loop;
  "pypaper-layer" / "reference-layer" / "compiled-reference-layer": the Hopfield layer
                       (projections, norms, retrieval, output projection) on the fused op, on the
                       plain loop (PYPAPER_BACKEND=reference) and compiled.
The fp32 matmul throughput (1024^3) is measured in the same run (header line): the notes give
each case's GFLOP per call, so GFLOP/s = GFLOP / median s can be set against it.
"""
from . import harness  # first: sets THP_MEM_ALLOC_ENABLE before torch loads
from .harness import Case, Provider, backward_only, forward_backward, saved_bytes

import torch  # noqa: E402

import pypaper  # noqa: E402
from pypaper.hopfield import Hopfield, hopfield_retrieve  # noqa: E402
from pypaper.hopfield import reference as ref  # noqa: E402

EPS = 1e-4


def _calls(fn, inputs, grad_inputs, g, modes, backend=None):
    calls = {}
    if "fwd" in modes:
        def fwd():
            with torch.no_grad():
                return fn(*inputs)
        calls["fwd"] = fwd
    if "bwd" in modes:
        calls["bwd"] = backward_only(lambda: fn(*grad_inputs), grad_inputs, g)
    if "fwd+bwd" in modes:
        calls["fwd+bwd"] = forward_backward(lambda: fn(*grad_inputs), grad_inputs, g)
    calls = harness.on_backend(calls, backend)
    return calls


def _provider(name, fn, inputs, grad_inputs, g, modes, backend=None, exclude=()):
    p = Provider(name, _calls(fn, inputs, grad_inputs, g, modes, backend))
    if "bwd" in modes or "fwd+bwd" in modes:
        def fwd():
            return fn(*grad_inputs)
        if backend is not None:
            with pypaper.use_backend(backend):
                p.saved_bytes = saved_bytes(fwd, exclude=list(grad_inputs) + list(exclude))
        else:
            p.saved_bytes = saved_bytes(fwd, exclude=list(grad_inputs) + list(exclude))
    return p


def _retrieval_providers(B, H, L, S, d, steps, dtype, device, modes):
    torch.manual_seed(0)
    q = torch.randn(B, H, L, d, device=device, dtype=dtype)
    k = torch.randn(B, H, S, d, device=device, dtype=dtype)
    v = torch.randn(B, H, S, d, device=device, dtype=dtype)
    qkv_g = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    g = torch.randn(B, H, L, d, device=device, dtype=dtype)
    beta = d ** -0.5

    def fused(q, k, v):
        return hopfield_retrieve(q, k, v, beta, steps, EPS)

    def plain(q, k, v):
        return ref.retrieve(q, k, v, beta, steps, EPS)[0]

    def chain(q, k, v):
        return ref.sdpa_chain(q, k, v, beta, steps)

    compiled = torch.compile(plain)
    return [
        _provider("pypaper", fused, (q, k, v), qkv_g, g, modes),
        _provider("sdpa-chain", chain, (q, k, v), qkv_g, g, modes),
        _provider("reference", plain, (q, k, v), qkv_g, g, modes),
        _provider("compiled-reference", compiled, (q, k, v), qkv_g, g, modes),
    ]


def _flop_note(B, H, L, S, d, steps):
    passes = steps + 1
    fwd = passes * 4 * B * H * L * S * d / 1e9
    return f"{fwd:.2f} GFLOP fwd ({passes} x (QK^T + PV)), {2.5 * fwd:.2f} GFLOP bwd (5 GEMMs/step)"


def retrieval_case(B, H, L, S, d, steps, dtype, device, modes, kernel="retrieve") -> Case:
    e = torch.empty((), dtype=dtype).element_size()
    io = (B * H * (L * d + 2 * S * d) + B * H * L * d) * e  # q, k, v read + out written
    return Case(
        f"{kernel} L={L} steps={steps}" if kernel == "pooling" else f"{kernel} steps={steps}",
        (B, H, L, S, d), dtype, device,
        bytes_moved={m: v for m, v in (("fwd", io), ("bwd", 2 * io), ("fwd+bwd", 3 * io))
                     if m in modes},
        providers=lambda: _retrieval_providers(B, H, L, S, d, steps, dtype, device, modes),
        bytes_note="q, k, v read + out written (bwd: + grad_out read, grads written); "
                   + _flop_note(B, H, L, S, d, steps),
    )


def _layer_providers(B, L, E, H, steps, device, modes):
    torch.manual_seed(0)
    layer = Hopfield(input_size=E, num_heads=H, update_steps_max=steps).to(device)
    x = torch.randn(B, L, E, device=device)
    xg = x.detach().clone().requires_grad_()
    g = torch.randn(B, L, E, device=device)
    params = list(layer.parameters())
    compiled = torch.compile(layer)
    out = [_provider("pypaper-layer", layer, (x,), (xg,), g, modes, exclude=params),
           _provider("reference-layer", layer, (x,), (xg,), g, modes, backend="reference",
                     exclude=params)]
    p = _provider("compiled-reference-layer", compiled, (x,), (xg,), g, modes,
                  backend="reference", exclude=params)
    return out + [p]


def layer_case(B, L, E, H, steps, device, modes) -> Case:
    io = 2 * B * L * E * 4
    d = E // H
    return Case(
        f"Hopfield layer steps={steps}", (B, L, E, H), torch.float32, device,
        bytes_moved={m: v for m, v in (("fwd", io), ("bwd", 2 * io), ("fwd+bwd", 3 * io))
                     if m in modes},
        providers=lambda: _layer_providers(B, L, E, H, steps, device, modes),
        bytes_note="x read + out written; retrieval " + _flop_note(B, H, L, L, d, steps),
        baseline="reference-layer",
    )


def cases(device: str = "cpu", quick: bool = False, numel: int = None) -> list:
    """Quick: self-association B=32, L=S=256, 4 heads x 64, steps 0 and 3 (fwd, fwd+bwd); pooling
    of 1 and 8 queries over S=2^16; the layer at steps 3. Full: steps {0, 1, 3}, every mode,
    pooling S in {2^12, 2^14, 2^16}. ``numel`` shrinks everything for smoke tests."""
    f32 = torch.float32
    modes = ("fwd", "fwd+bwd") if quick else harness.MODES
    if numel:
        return [retrieval_case(2, 2, 16, 16, 8, 1, f32, device, modes),
                retrieval_case(2, 2, 1, 64, 8, 1, f32, device, modes, "pooling"),
                layer_case(2, 16, 16, 2, 1, device, modes)]
    out = []
    for steps in ((0, 3) if quick else (0, 1, 3)):
        out.append(retrieval_case(32, 4, 256, 256, 64, steps, f32, device, modes))
    pool_s = (1 << 16,) if quick else (1 << 12, 1 << 14, 1 << 16)
    for S in pool_s:
        for L in ((1, 8) if quick else (1, 2, 4, 8)):
            out.append(retrieval_case(4, 4, L, S, 64, 3, f32, device, modes, "pooling"))
    out.append(layer_case(32, 256, 256, 4, 3, device, modes))
    return out
