"""Benchmarks of pypaper.wtacrs: linear layers that keep a sample of their input rows for the
backward (Liu et al., "Winner-Take-All Column Row Sampling", NeurIPS 2023).

Cases:
  "wtacrs linear"  one layer y = x W^T + b, x [N, d], W [d, d], keep_ratio 0.3:
                   fwd (output and sampling), bwd (grad_x, grad_W, grad_b), fwd+bwd.
  "wtacrs bert step"  the training step (forward + backward, no optimizer) of a HuggingFace
                   BertModel built from a config (random weights), fed inputs_embeds.
Providers: "torch" (nn.Linear / the unconverted model: the baseline of the speedup column),
"pypaper wta-crs" and "pypaper crs" (WTACRSLinear, the device's default backend), "reference"
(the same estimator in plain PyTorch: pypaper's reference backend), and for the model
"pypaper wta-crs 0.1". The "saved for bwd" column is what one forward keeps for the backward
(saved-tensor hooks, parameters excluded): the memory the method exists to save.
"""
import copy
import math

from . import harness  # first: sets THP_MEM_ALLOC_ENABLE before torch loads
from .harness import Case, Provider, backward_only, forward_backward, saved_bytes, unavailable

import torch  # noqa: E402
from torch import nn  # noqa: E402

import pypaper  # noqa: E402
from pypaper import wtacrs  # noqa: E402
from pypaper.quant import fewbit  # noqa: E402

KEEP = 0.3
QUICK_SHAPES = [(1 << 14, 1024)]
FULL_SHAPES = [(n, d) for n in (1 << 12, 1 << 14, 1 << 16) for d in (768, 1024, 4096)]


def _with_backend(call, backend):
    if backend is None:
        return call

    def run():
        with pypaper.use_backend(backend):
            return call()
    return run


def _layer_provider(name, module, x, g, modes, backend=None) -> Provider:
    params = [p for p in module.parameters()]
    inputs = [x] + params
    fwd = lambda: module(x)  # noqa: E731
    calls = {}
    if "fwd" in modes:
        calls["fwd"] = fwd
    if "bwd" in modes:
        calls["bwd"] = backward_only(fwd, inputs, g)
    if "fwd+bwd" in modes:
        calls["fwd+bwd"] = forward_backward(fwd, inputs, g)
    p = Provider(name, {m: _with_backend(c, backend) for m, c in calls.items()})
    p.saved_bytes = _with_backend(lambda: saved_bytes(fwd, params), backend)()
    return p


def _layer_providers(n, d, dtype, device, modes):
    torch.manual_seed(0)
    base = nn.Linear(d, d, device=device, dtype=dtype)
    x = torch.randn(n, d, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(n, d, device=device, dtype=dtype)
    out = [_layer_provider("torch", base, x, g, modes)]
    for est in ("wta-crs", "crs"):
        layer = wtacrs.WTACRSLinear.from_linear(base, KEEP, estimator=est)
        out.append(_layer_provider(f"pypaper {est}", layer, x, g, modes))
    ref = wtacrs.WTACRSLinear.from_linear(base, KEEP)
    out.append(_layer_provider("reference", ref, x, g, modes, "reference"))
    return out


def linear_case(n, d, dtype, device, modes=harness.MODES) -> Case:
    e = torch.empty((), dtype=dtype).element_size()
    k = math.ceil(KEEP * n)
    fwd = e * (2 * n * d + d * d + k * d)  # x read, y written, W read, kept rows written
    bwd = e * (2 * n * d + 2 * d * d + 2 * k * d)  # dy read, dx written, W read, dW, kept rows
    return Case(
        f"wtacrs linear keep {KEEP}", (n, d), dtype, device,
        bytes_moved={m: v for m, v in (("fwd", fwd), ("bwd", bwd), ("fwd+bwd", fwd + bwd))
                     if m in modes},
        providers=lambda: _layer_providers(n, d, dtype, device, modes),
        bytes_note="operands of the GEMMs plus the kept rows, counted for the sampled layer "
                   "(nn.Linear moves no kept rows)",
        baseline="torch")


# ---- the training step of a transformer -----------------------------------------------------


def _bert(hidden, layers, device):
    try:
        from transformers import BertConfig, BertModel
    except ImportError as e:  # pragma: no cover - transformers is a dev dependency
        return None, f"transformers is not installed ({e})"
    cfg = BertConfig(vocab_size=2, hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=max(1, hidden // 64), intermediate_size=4 * hidden,
                     max_position_embeddings=512, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return BertModel(cfg, add_pooling_layer=False).to(device), None


def _step_providers(batch, seq, hidden, layers, dtype, device):
    model, why = _bert(hidden, layers, device)
    if model is None:
        return [unavailable(p, why) for p in ("torch", "pypaper wta-crs", "pypaper crs",
                                              "pypaper wta-crs + 2-bit GELU",
                                              "pypaper wta-crs bf16 rows",
                                              "pypaper wta-crs bf16 rows + 2-bit GELU")]
    model = model.to(dtype).train()
    emb = torch.randn(batch, seq, hidden, device=device, dtype=dtype, requires_grad=True)

    def provider(name, keep, est, fewbit_bits=None, store_dtype=None):
        m = copy.deepcopy(model)
        if keep is not None:
            wtacrs.convert(m, keep, estimator=est, store_dtype=store_dtype)
        if fewbit_bits is not None:  # few-bit backward GELU (pypaper.quant.fewbit) on top
            fewbit.convert(m, bits=fewbit_bits)
        params = list(m.parameters())

        def fwd():
            return m(inputs_embeds=emb).last_hidden_state.square().mean()

        p = Provider(name, {"fwd+bwd": lambda: torch.autograd.grad(fwd(), params, allow_unused=True)})
        p.saved_bytes = saved_bytes(fwd, params)
        return p

    return [provider("torch", None, None), provider("pypaper wta-crs", KEEP, "wta-crs"),
            provider("pypaper wta-crs 0.1", 0.1, "wta-crs"), provider("pypaper crs", KEEP, "crs"),
            provider("pypaper wta-crs + 2-bit GELU", KEEP, "wta-crs", fewbit_bits=2),
            provider("pypaper wta-crs bf16 rows", KEEP, "wta-crs", store_dtype=torch.bfloat16),
            provider("pypaper wta-crs bf16 rows + 2-bit GELU", KEEP, "wta-crs", fewbit_bits=2,
                     store_dtype=torch.bfloat16)]


def step_case(batch, seq, hidden, layers, dtype, device) -> Case:
    return Case(
        f"wtacrs bert step L{layers} h{hidden}", (batch, seq, hidden), dtype, device,
        bytes_moved={"fwd+bwd": 0},
        providers=lambda: _step_providers(batch, seq, hidden, layers, dtype, device),
        bytes_note="not counted (a whole model); see the saved-for-bwd column",
        memory=True, baseline="torch")


def cases(device: str = "cpu", quick: bool = False, numel: int = None) -> list:
    """Quick: the layer at N = 2^14, d = 1024 (fwd, fwd+bwd) and a 2-layer BERT step (hidden 256,
    8 x 128 tokens). Full: N in {2^12, 2^14, 2^16} x d in {768, 1024, 4096}, every mode, and a
    4-layer BERT step (hidden 512). ``numel`` (--numel) caps N * d, for smoke tests."""
    f32 = torch.float32
    shapes = QUICK_SHAPES if quick else FULL_SHAPES
    if numel:  # smoke tests: one small shape of ``numel`` elements, 64 features
        shapes = [(max(64, numel // 64), 64)]
    modes = ("fwd", "fwd+bwd") if quick else harness.MODES
    out = [linear_case(n, d, f32, device, modes) for n, d in dict.fromkeys(shapes)]
    if quick:
        bert = (2, 32, 64, 1) if numel else (8, 128, 256, 2)
    else:
        bert = (8, 128, 512, 4)
    out.append(step_case(*bert, f32, device))
    return out
