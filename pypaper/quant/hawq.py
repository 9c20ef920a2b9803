"""HAWQ: Hessian-aware mixed-precision bit allocation.

Dong et al., "HAWQ" (ICCV 2019: top Hessian eigenvalue per layer), "HAWQ-V2" (NeurIPS 2020:
Hutchinson's trace), Yao et al. "HAWQ-V3" (ICML 2021: integer program under a size budget).

* :func:`hutchinson_trace`: tr(H_i) ≈ mean over Rademacher probes v of v_iᵀ (H v)_i for every
  layer i at once; H v comes from one double backward (the gradient of gᵀv).
* :func:`top_eigenvalue`: the largest eigenvalue of a layer's Hessian block by power iteration on
  H-vector products.
* :func:`allocate_bits`: the bit widths b_i in ``bits_options`` minimising
  Σ_i trace_i · ‖Q_{b_i}(W_i) − W_i‖² subject to Σ_i b_i · numel(W_i) <= budget: a
  multiple-choice knapsack solved exactly by dynamic programming over the Pareto front of
  (size, cost) pairs, layer by layer (no greedy step; optimal, checked against brute force).
* :func:`hawq`: the three together; the result's ``mapping`` ({fully qualified name: config}) is
  what ``pypaper.quant.quantize_(model, mapping)`` takes.

Any model whose loss is twice differentiable works (pypaper ops used in it need a double
backward). The default quantizer of a bit width is PowerExponentConfig(bits, exponent=1.0):
symmetric per-row uniform quantization, which every width 2..8 supports; pass ``config_for_bits``
(for example ``lambda b: PowerExponentConfig(b)`` for NUPES' power quantizer) to change it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from .._module_swap import float_stand_in, has_computed_tensors, parametrized_modules
from .configs import QuantConfig
from .power import SUPPORTED_BITS

__all__ = ["HAWQResult", "allocate_bits", "hawq", "hutchinson_trace", "quantization_error",
           "top_eigenvalue", "default_config_for_bits", "select_layers"]


def default_config_for_bits(bits: int) -> QuantConfig:
    from .nupes import PowerExponentConfig

    return PowerExponentConfig(bits=bits, exponent=1.0)


def select_layers(model: nn.Module, filter_fn: Optional[Callable] = None) -> dict[str, nn.Linear]:
    """The nn.Linear layers of ``model`` that ``filter_fn(module, fqn)`` accepts (all if None),
    among those ``quantize_`` can swap: the allocation's mapping names its layers explicitly, and
    quantize_ refuses an nn.MultiheadAttention's out_proj (the attention reads its weight
    directly), a subclass with its own forward (which the swap would drop) and a Linear inside
    a parametrization (it transforms a weight). Those stay in float and take no share of the
    budget."""
    from .api import swappable
    inside = parametrized_modules(model)  # a Linear transforming a weight: quantize_ skips it
    layers = {n: m for n, m in model.named_modules()
              if swappable(m) and id(m) not in inside and (filter_fn is None or filter_fn(m, n))}
    if not layers:
        raise ValueError("model has no nn.Linear layer matching filter_fn that quantize_ can "
                         "swap: nothing to allocate bits to")
    return layers


def _batches(data) -> list:
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        return [tuple(data)]
    out = list(data)
    if not out:
        raise ValueError("data is empty: the Hessian needs at least one (input, target) batch")
    return out


def _grads_of_loss(model, loss_fn, x, y, params):
    """dL/dp with a graph, None for a tensor the loss does not depend on (an unused layer: an
    auxiliary head, a branch this data never takes) or whose gradient does not depend on the
    parameters (L linear in it): their Hessian rows are zero, not an error."""
    loss = loss_fn(model(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    return [g if g is not None and g.requires_grad else None for g in grads]


def _hvp(model, loss_fn, batches, params: list[torch.Tensor], vs: list[torch.Tensor]):
    """(H v) for the loss averaged over ``batches``, by double backward, per parameter."""
    out = [torch.zeros_like(p) for p in params]
    for x, y in batches:
        grads = _grads_of_loss(model, loss_fn, x, y, params)
        used = [(g, v) for g, v in zip(grads, vs) if g is not None]
        if not used:
            continue
        dot = sum((g * v).sum() for g, v in used)
        hv = torch.autograd.grad(dot, params, allow_unused=True)
        for o, h in zip(out, hv):
            if h is not None:
                o.add_(h.detach(), alpha=1.0 / len(batches))
    return out


def _hvp_batched(model, loss_fn, batches, params: list[torch.Tensor], vs: list[torch.Tensor]):
    """H v for a batch of probes at once: vs[i] is [B, *params[i].shape]. One double backward
    per data batch, vectorized over the probes by autograd.grad(is_grads_batched=True)."""
    out = [torch.zeros_like(v) for v in vs]
    for x, y in batches:
        grads = _grads_of_loss(model, loss_fn, x, y, params)
        used = [(g, v) for g, v in zip(grads, vs) if g is not None]
        if not used:
            continue
        hv = torch.autograd.grad([g for g, _ in used], params, grad_outputs=[v for _, v in used],
                                 is_grads_batched=True, allow_unused=True)
        for o, h in zip(out, hv):
            if h is not None:
                o.add_(h.detach(), alpha=1.0 / len(batches))
    return out


@contextlib.contextmanager
def _probing(model: nn.Module, params: list[torch.Tensor]):
    """The model set up for Hessian probes, everything restored after.

    * Eval mode, as PyHessian / HAWQ do: the Hessian of the deterministic loss (dropout off,
      BatchNorm on its running statistics). In train mode every probe's forward would draw new
      dropout masks (H changes from probe to probe) and move BatchNorm's running statistics
      toward the probe data (momentum 0.1 per forward): an analysis must not change the model
      it analyses.
    * Gradients on for the probed tensors: a model prepared for post-training quantization is
      often frozen (``model.requires_grad_(False)``, or under ``torch.no_grad()``), and the
      Hessian of L with respect to W does not depend on those flags."""
    flags = [(m, m.training) for m in model.modules()]
    frozen = [p for p in params if p.is_leaf and not p.requires_grad]
    model.eval()
    try:
        for p in frozen:
            p.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for p in frozen:
            p.requires_grad_(False)
        for m, t in flags:
            m.training = t


@contextlib.contextmanager
def _plain_weights(model: nn.Module, layers: dict):
    """{name: the weight tensor each layer's forward multiplies by}, for the Hessian probes.

    A plain layer's weight is its Parameter. A parametrized weight (weight_norm, spectral_norm,
    orthogonal, ...) is recomputed at every access and a pruned / hook weight_norm one in every
    forward's pre-hook: the tensor read before the forward is not in the loss's graph, so its
    gradient came back "unused" and the layer got a trace of 0 (the least sensitive layer:
    the allocation gave it the fewest bits). Such a layer is replaced, while probing, by a
    stand-in nn.Linear holding the current value W as a Parameter (float_stand_in, as quantize_:
    the same forward and hooks, no parametrization): the trace is that of ∂²L/∂W², the Hessian
    of the weight quantize_ quantizes. The model gets its own modules back afterwards."""
    stands = {id(m): float_stand_in(m) for m in layers.values() if has_computed_tensors(m)}
    swapped = []
    try:
        for parent in list(model.modules()):
            for attr, child in list(parent._modules.items()):
                if child is not None and id(child) in stands:
                    swapped.append((parent, attr, child))
                    parent._modules[attr] = stands[id(child)]
        yield {n: stands[id(m)].weight if id(m) in stands else m.weight
               for n, m in layers.items()}
    finally:
        for parent, attr, child in reversed(swapped):
            parent._modules[attr] = child


def _rademacher(p: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    r = torch.randint(0, 2, p.shape, generator=gen, dtype=torch.int64)
    return (r * 2 - 1).to(p.dtype).to(p.device)


def hutchinson_trace(model: nn.Module, loss_fn: Callable, data, params: dict[str, torch.Tensor],
                     n_probes: int = 100, seed: int = 0, joint: bool = True,
                     probe_batch: int = 32) -> dict[str, float]:
    """Hutchinson estimate of tr(∂²L/∂W_i²) for each tensor W_i of ``params`` ({name: tensor}).

    ``data``: one (input, target) pair or an iterable of them; L is the mean of
    ``loss_fn(model(x), y)`` over the batches. ``joint`` (HAWQ-V2 / PyHessian): one probe over
    all tensors at once, v_iᵀ(Hv)_i per tensor; the cross-layer blocks H_ij add zero-mean noise.
    ``joint=False`` probes each tensor alone (no cross-layer noise, len(params) times the cost).
    H v is a double backward; ``probe_batch`` probes share one (vectorized with
    ``is_grads_batched``); a model whose ops cannot be vectorized falls back to one probe per
    double backward (``probe_batch=1`` forces that). The probes, hence the estimate, depend on
    ``seed`` only, not on ``probe_batch``. The model runs in eval mode (dropout off,
    BatchNorm on its running statistics; its modules' train/eval flags are restored after), with
    gradients on for ``params`` whatever their ``requires_grad`` (restored after), and a tensor
    the loss does not depend on has trace 0.
    """
    if n_probes < 1:
        raise ValueError(f"n_probes must be >= 1, got {n_probes}")
    if probe_batch < 1:
        raise ValueError(f"probe_batch must be >= 1, got {probe_batch}")
    batches = _batches(data)
    names, ps = list(params), list(params.values())
    if not ps:
        raise ValueError("params is empty: no tensor to estimate a trace for")
    gen = torch.Generator().manual_seed(seed)
    groups = [list(range(len(ps)))] if joint else [[i] for i in range(len(ps))]
    acc = [0.0] * len(ps)
    with _probing(model, ps):
        _probe_loop(model, loss_fn, batches, ps, groups, gen, n_probes, probe_batch, acc)
    return {n: a / n_probes for n, a in zip(names, acc)}


def _probe_loop(model, loss_fn, batches, ps, groups, gen, n_probes, probe_batch, acc) -> None:
    """Adds Σ_probes v_iᵀ(H v)_i to acc[i] for every tensor i (Rademacher v, ``groups`` of
    tensors probed together)."""
    done = 0
    while done < n_probes:
        b = min(probe_batch, n_probes - done)
        for grp in groups:
            gps = [ps[i] for i in grp]
            # drawn probe by probe, so the estimate does not depend on probe_batch
            draws = [[_rademacher(p, gen) for p in gps] for _ in range(b)]
            vs = [torch.stack([d[k] for d in draws]) for k in range(len(gps))]
            hv = None
            if b > 1:
                try:
                    hv = _hvp_batched(model, loss_fn, batches, gps, vs)
                except RuntimeError:
                    hv = None  # an op without a batching rule: one probe at a time
            if hv is None:
                hv = [torch.stack(t) for t in zip(*[
                    _hvp(model, loss_fn, batches, gps, [v[j] for v in vs]) for j in range(b)])]
            for i, v, h in zip(grp, vs, hv):
                acc[i] += float((v.double() * h.double()).sum())
        done += b


def top_eigenvalue(model: nn.Module, loss_fn: Callable, data, param: torch.Tensor,
                   iters: int = 100, tol: float = 1e-6, seed: int = 0) -> float:
    """Largest-magnitude eigenvalue of ∂²L/∂W² for one tensor W by power iteration (HAWQ-V1).
    The model runs in eval mode, W with gradients on (both restored after), as in
    :func:`hutchinson_trace`."""
    batches = _batches(data)
    with _probing(model, [param]):
        return _power_iteration(model, loss_fn, batches, param, iters, tol, seed)


def _power_iteration(model, loss_fn, batches, param, iters, tol, seed) -> float:
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(param.shape, generator=gen, dtype=param.dtype).to(param.device)
    v = v / v.norm()
    lam = 0.0
    for _ in range(iters):
        (hv,) = _hvp(model, loss_fn, batches, [param], [v])
        new = float((hv * v).sum())
        norm = hv.norm()
        if float(norm) == 0.0:
            return 0.0
        v = hv / norm
        if abs(new - lam) <= tol * max(abs(new), 1e-30):
            lam = new
            break
        lam = new
    return lam


@torch.no_grad()
def quantization_error(layer: nn.Linear, config: QuantConfig, fqn: str = "") -> float:
    """‖Q(W) − W‖² of a layer under ``config``: the quantized layer's weight read back by running
    it on the identity (works for any config whose module is linear in its input)."""
    # a parametrized / pruned layer: the weight its forward computes now (what quantize_ takes)
    layer = float_stand_in(layer)
    q = config.apply(layer, fqn)
    eye = torch.eye(layer.in_features, dtype=torch.float32, device=layer.weight.device)
    out = q(eye)
    if layer.bias is not None:
        out = out - layer.bias.detach().to(out.dtype)
    wq = out.t().double()
    return float((wq - layer.weight.detach().double()).pow(2).sum())


@dataclasses.dataclass
class HAWQResult:
    """The allocation: ``bits`` and ``mapping`` ({fqn: config} for quantize_) per layer, the
    objective Σ trace·‖Q(W) − W‖² (``cost``), the stored bits Σ weight_bits·numel
    (``size_bits``), the budget and the per-layer traces / errors it was computed from."""

    bits: dict[str, int]
    mapping: dict[str, QuantConfig]
    cost: float
    size_bits: float
    budget_bits: float
    traces: dict[str, float]
    errors: dict[str, dict[int, float]]

    @property
    def average_bits(self) -> float:
        n = sum(self.numels.values())
        return self.size_bits / n if n else 0.0

    numels: dict[str, int] = dataclasses.field(default_factory=dict)


def _check_bits_options(bits_options: Sequence[int]) -> tuple[int, ...]:
    opts = tuple(bits_options)
    if not opts:
        raise ValueError("bits_options is empty")
    for b in opts:
        if isinstance(b, bool) or not isinstance(b, int) or b not in SUPPORTED_BITS:
            raise ValueError(f"bits_options must hold bit widths from {SUPPORTED_BITS}, got {b!r}")
    return tuple(sorted(set(opts)))


def allocate_bits(traces: dict[str, float], errors: dict[str, dict[int, float]],
                  numels: dict[str, int], *, budget_bits: Optional[float] = None,
                  avg_bits: Optional[float] = None,
                  bits_per_weight: Optional[dict[int, float]] = None
                  ) -> tuple[dict[str, int], float, float]:
    """Exact minimum of Σ_i traces[i]·errors[i][b_i] s.t. Σ_i w(b_i)·numels[i] <= budget.

    ``errors[name][b]``: ‖Q_b(W) − W‖² for every allowed b. w(b) = ``bits_per_weight[b]`` (a
    config's ``weight_bits``, scales included where the config counts them), default b. The
    budget is ``budget_bits`` (total) or ``avg_bits`` · Σ numel. Dynamic program over layers
    keeping the Pareto front of (size, cost) partial assignments: a partial assignment that is
    both larger and costlier than another can never be completed into a better one, so dropping
    it keeps optimality. Returns (bits per layer, cost, size in bits).
    """
    names = list(traces)
    if not names:
        raise ValueError("traces is empty: no layer to allocate bits to")
    total = sum(numels[n] for n in names)
    if (budget_bits is None) == (avg_bits is None):
        raise ValueError("pass exactly one of budget_bits and avg_bits")
    if budget_bits is None:
        if not (isinstance(avg_bits, (int, float)) and math.isfinite(avg_bits)):
            raise ValueError(f"avg_bits must be a finite number, got {avg_bits!r}")
        budget, arg = float(avg_bits) * total, "avg_bits"
    else:
        if not (isinstance(budget_bits, (int, float)) and math.isfinite(budget_bits)):
            raise ValueError(f"budget_bits must be a finite number, got {budget_bits!r}")
        budget, arg = float(budget_bits), "budget_bits"
    bpw = {b: float(b) for n in names for b in errors[n]}
    if bits_per_weight is not None:
        bpw.update({b: float(v) for b, v in bits_per_weight.items()})
    smallest = sum(min(bpw[b] for b in errors[n]) * numels[n] for n in names)
    if smallest > budget + 1e-9:
        value = avg_bits if arg == "avg_bits" else budget_bits
        raise ValueError(f"{arg}={value} is below the smallest possible model: "
                         f"{smallest} bits ({smallest / total:.4g} bits per weight with the "
                         f"smallest of bits_options everywhere)")
    # front: list of (size, cost, choices) sorted by size, cost strictly decreasing.
    front = [(0, 0.0, ())]
    for n in names:
        cand = []
        for size, cost, ch in front:
            for b, err in errors[n].items():
                s = size + bpw[b] * numels[n]
                if s <= budget + 1e-9:
                    cand.append((s, cost + traces[n] * err, ch + (b,)))
        cand.sort(key=lambda t: (t[0], t[1]))
        front = []
        for t in cand:
            if not front or t[1] < front[-1][1]:
                front.append(t)
    size, cost, choice = min(front, key=lambda t: (t[1], t[0]))
    return dict(zip(names, choice)), cost, size


def hawq(model: nn.Module, loss_fn: Callable, data, *, avg_bits: Optional[float] = None,
         budget_bits: Optional[float] = None, bits_options: Sequence[int] = (2, 3, 4, 8),
         filter_fn: Optional[Callable] = None, n_probes: int = 50, seed: int = 0,
         config_for_bits: Callable[[int], QuantConfig] = default_config_for_bits) -> HAWQResult:
    """HAWQ-V2/V3 allocation for the nn.Linear layers of ``model``.

    Hutchinson traces of each layer's weight Hessian on ``data`` (one (x, y) batch or a list of
    them), the quantization error of every allowed width (``config_for_bits(b)``), then the exact
    allocation under the budget (``avg_bits`` per weight or ``budget_bits`` in total).
    ``quantize_(model, result.mapping)`` applies it.
    """
    opts = _check_bits_options(bits_options)
    layers = select_layers(model, filter_fn)
    if (budget_bits is None) == (avg_bits is None):
        raise ValueError("pass exactly one of budget_bits and avg_bits")
    # checked before the Hessian probes (minutes on a large model), not only by allocate_bits
    for arg, value in (("avg_bits", avg_bits), ("budget_bits", budget_bits)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value)):
            raise ValueError(f"{arg} must be a finite number, got {value!r}")
    numels = {n: m.weight.numel() for n, m in layers.items()}
    total = sum(numels.values())
    smallest = min(opts) * total
    budget = budget_bits if budget_bits is not None else avg_bits * total
    if isinstance(budget, (int, float)) and math.isfinite(budget) and budget < smallest:
        arg, value = ("avg_bits", avg_bits) if avg_bits is not None else ("budget_bits", budget_bits)
        raise ValueError(f"{arg}={value} is below the smallest possible model ({smallest} bits: "
                         f"{min(opts)} bits per weight)")
    configs = {b: config_for_bits(b) for b in opts}
    bpw = {b: float(c.weight_bits) for b, c in configs.items()}
    smallest = min(bpw.values()) * total
    if isinstance(budget, (int, float)) and math.isfinite(budget) and budget < smallest:
        arg, value = ("avg_bits", avg_bits) if avg_bits is not None else ("budget_bits", budget_bits)
        raise ValueError(f"{arg}={value} is below the smallest possible model ({smallest} bits: "
                         f"{min(bpw.values())} bits per weight)")
    errors = {n: {b: quantization_error(m, configs[b], n) for b in opts} for n, m in layers.items()}
    with _plain_weights(model, layers) as weights:
        traces = hutchinson_trace(model, loss_fn, data, weights, n_probes=n_probes, seed=seed)
    # a negative Hutchinson estimate (a non-convex direction, or noise) counts as 0 sensitivity
    clamped = {n: max(t, 0.0) for n, t in traces.items()}
    bits, cost, size = allocate_bits(clamped, errors, numels, budget_bits=budget_bits,
                                     avg_bits=avg_bits, bits_per_weight=bpw)
    return HAWQResult(bits=bits, mapping={n: configs[b] for n, b in bits.items()}, cost=cost,
                      size_bits=size, budget_bits=float(budget), traces=traces, errors=errors,
                      numels=numels)
