"""Public fused local-loss ops of pypaper.local: ff_linear, ff_sf_linear, tp_linear, local_head
(and head_loss, the differentiable loss of the head).

Each layer op computes the layer's forward, its local loss and the local parameter gradient in one
call and returns the output detached: nothing is kept for a global backward. The wrappers check
their arguments (errors name the argument), pick a backend (pypaper/_backend.py) and call
torch.ops.pypaper.local_* (C++ on CPU, CUDA kernels on GPU where built), their Triton twins
(pypaper/local/triton_kernels.py) or the plain-PyTorch reference (pypaper/local/reference.py).

Default backends, by device: CPU -> the C++ kernels, then the reference; CUDA -> the CUDA kernels,
then Triton, then the reference (a build whose CUDA kernels predate ff_sf_linear's: Triton first
for that op). The
*_into variants (outputs written into given buffers, dW accumulated by the GEMM) run the C++
*_out ops on CPU and the functional op plus an add elsewhere.
"""
from __future__ import annotations

import contextlib
import importlib.util
import numbers
from typing import Optional

import torch

from .. import _backend
from .._numbers import is_finite, shown
from . import reference

_DEFAULT_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}
_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
ACTIVATIONS = reference.ACTIVATIONS


# Looked up once, at import (_backend.has_kernel).
_KERNELS = _backend.kernel_table("pypaper::local_ff_linear")
# Whether the single-forward op has a CUDA kernel in this build (else Triton, then the reference).
_SF_CUDA = _backend.has_kernel("pypaper::local_ff_sf_linear", "CUDA")
# The *_out variants (outputs written in place, gradients accumulated by the dW GEMM): C++ only.
_OUT_CPU = _backend.has_kernel("pypaper::local_ff_linear_out", "CPU")
_SF_OUT_CPU = _backend.has_kernel("pypaper::local_ff_sf_linear_out", "CPU")


def _has_kernel(dispatch_key: str) -> bool:
    return _KERNELS[dispatch_key]


def _cpu_reason(device: torch.device) -> Optional[str]:
    why = _backend.native_reason(device, "cpu")
    if why is None and not _has_kernel("CPU"):
        why = "pypaper._C has no CPU kernel for pypaper::local_ff_linear"
    return why


def _cuda_reason(device: torch.device) -> Optional[str]:
    why = _backend.native_reason(device, "cuda")
    if why is None and not _has_kernel("CUDA"):
        why = "pypaper._C has no CUDA kernel for pypaper::local_ff_linear"
    return why


def _triton_reason(device: torch.device) -> Optional[str]:
    if importlib.util.find_spec("pypaper.local.triton_kernels") is None:
        return "there is no Triton kernel for the local ops"
    from . import triton_kernels

    ok, why = triton_kernels.triton_available(device)
    return None if ok else why


_REASONS = {"cpu": _cpu_reason, "cuda": _cuda_reason, "triton": _triton_reason}


def backend_for(x: torch.Tensor) -> str:
    """The backend the local ops would use for x now."""
    return _backend.select(x.device, _DEFAULT_ORDER.get(x.device.type, ("reference",)), _REASONS)


def _ops(backend: str):
    if backend == "triton":
        from . import triton_kernels

        return triton_kernels.ops()
    return {"ff": torch.ops.pypaper.local_ff_linear, "sf": torch.ops.pypaper.local_ff_sf_linear,
            "tp": torch.ops.pypaper.local_tp_linear, "head": torch.ops.pypaper.local_head}


# ---- argument checks ------------------------------------------------------------------------

def _checking() -> bool:
    """Value checks read tensor data; torch.compile traces without them."""
    return not torch.compiler.is_compiling()


def _check_float_2d(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        raise TypeError(f"{name} must be a floating tensor (float32, float64, float16 or "
                        f"bfloat16), got {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{name} must have shape [N, in_features], got {tuple(t.shape)}")


def _check_params(x, weight, bias, xname="x") -> None:
    _check_float_2d(x, xname)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight must have shape [out_features, {x.shape[1]}] (in_features of "
                         f"{xname}), got {got}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match {xname} dtype {x.dtype}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but {xname} is on {x.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],):
            got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(f"bias must have shape [{weight.shape[0]}] (out_features), got {got}")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias dtype {bias.dtype} must match {xname} dtype {x.dtype}")


def check_labels(y, n: int, num_classes: int, device, name: str = "y") -> None:
    """Labels: an int64 tensor of shape [n] with values in [0, num_classes)."""
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of int64 class labels, got "
                        f"{type(y).__name__}")
    if y.dtype != torch.int64:
        raise TypeError(f"{name} must be an int64 tensor of class labels, got {y.dtype}")
    if tuple(y.shape) != (n,):
        raise ValueError(f"{name} must have shape [{n}] (one label per row), got "
                         f"{tuple(y.shape)}")
    if y.device != torch.device(device):
        raise ValueError(f"{name} is on {y.device} but the input is on {device}")
    if _checking() and n:
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"{name} must hold class labels in [0, {num_classes}), got values in "
                             f"[{lo}, {hi}]")


def check_finite(v, name: str) -> float:
    """v as a finite float (a SymFloat stays one), else a ValueError naming the argument.

    Under torch.compile a float argument that has taken two values (a threshold or temperature
    varied between calls: ``torch._dynamo.config.specialize_float`` is False), and every float
    under ``dynamic=True``, arrives as a SymFloat; ``math.isfinite`` refuses it (a graph break:
    ``fullgraph=True`` failed with "torch.* op returned non-Tensor"). Finiteness is therefore
    checked by comparisons (pypaper._numbers.is_finite), which dynamo traces as guards; the C++
    ops check the value again when they run."""
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        v = float(v)
    if not isinstance(v, (numbers.Real, torch.SymFloat, torch.SymInt)) or isinstance(v, bool):
        raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
    if not is_finite(v):  # an int beyond float range (10**400) included
        raise ValueError(f"{name} must be finite, got {shown(v)}")
    # an int or numpy scalar as the float the op takes
    return v if isinstance(v, (float, torch.SymFloat)) else float(v)


def _is_count(v) -> bool:
    """An int (or, under torch.compile, a SymInt such as x.shape[0] // 2), not a bool."""
    return isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool)


# ---- ops ------------------------------------------------------------------------------------

def ff_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
              num_pos: Optional[int] = None, threshold: float = 2.0, normalize: bool = True,
              eps: float = 1e-4):
    """Forward-Forward linear layer (Hinton, "The Forward-Forward Algorithm", 2022), fused.

        x_hat = x / (||x||_2 + eps)           (row by row; normalize=False: x_hat = x)
        h = ReLU(x_hat W^T + b),  g = sum_j h_j^2
        loss = mean_{r < num_pos} softplus(threshold - g_r) + mean_{r >= num_pos} softplus(g_r - threshold)

    Rows [0, num_pos) of x are positive data, the rest negative (num_pos=None: all positive).
    One call: the forward GEMM, one fused pass over its rows (scale, bias, ReLU, goodness, loss,
    dZ), the dW GEMM. Returns (h detached [N, out] in x's dtype, loss (fp32; fp64 for fp64),
    grad_weight, grad_bias ([0] without bias)). Differentiating the loss gives grad_weight /
    grad_bias again (x gets no gradient: the layer learns from its local loss only).
    """
    _check_params(x, weight, bias)
    n = x.shape[0]
    num_pos = n if num_pos is None else num_pos
    if not _is_count(num_pos) or not 0 <= num_pos <= n:
        raise ValueError(f"num_pos must be an int in [0, {n}] (rows of x), got {num_pos!r}")
    threshold = check_finite(threshold, "threshold")
    eps = check_finite(eps, "eps")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    backend = backend_for(x)
    if backend == "reference":
        return reference.ff_linear(x, weight, bias, num_pos, threshold, normalize, eps)
    return _ops(backend)["ff"](x, weight, bias, num_pos, threshold, bool(normalize), eps)


def _check_sf(x, class_x, weight, bias, y, eps, temperature):
    """The single-forward FF op's argument checks; returns (eps, temperature) as floats."""
    _check_params(x, weight, bias)
    _check_params(class_x, weight, bias, "class_x")
    k = class_x.shape[0]
    if k < 1:
        raise ValueError("class_x must hold one row per class (at least 1), got 0 rows")
    check_labels(y, x.shape[0], k, x.device)
    temperature = check_finite(temperature, "temperature")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    eps = check_finite(eps, "eps")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    return eps, temperature


# The most classes the GPU single-forward kernels take (a row's logits live in one shared-memory
# buffer / one Triton tile): kernels/cuda/local_kernels.cuh kSfMaxClasses, triton_kernels.
_SF_MAX_CLASSES = {"cuda": 4096, "triton": 2048}


def _sf_reason(backend: str, device: torch.device, k: int) -> Optional[str]:
    """Why ``backend`` cannot run the single-forward op with k classes (None if it can)."""
    if backend == "cuda" and not _SF_CUDA:
        return "ff_sf_linear has no CUDA kernel"
    if backend == "triton" and _triton_reason(device) is not None:
        return _triton_reason(device)
    limit = _SF_MAX_CLASSES.get(backend)
    if limit is not None and k > limit:
        return f"its single-forward kernel takes up to {limit} classes, class_x has {k}"
    return None


def _sf_backend(x: torch.Tensor, k: int) -> str:
    """backend_for(x), then, chosen automatically, the next that can serve k classes (CUDA ->
    Triton -> reference); an explicit request that cannot raises and says why."""
    backend = backend_for(x)
    why = _sf_reason(backend, x.device, k)
    if why is None:
        return backend
    if _backend.requested() == backend:
        raise _backend.BackendUnavailable(
            f"backend {backend!r} was requested but cannot run: {why}")
    for nxt in ("triton", "reference"):
        if nxt != backend and (nxt == "reference" or _sf_reason(nxt, x.device, k) is None):
            return nxt
    return "reference"


def ff_sf_linear(x: torch.Tensor, class_x: torch.Tensor, weight: torch.Tensor,
                 bias: Optional[torch.Tensor], y: torch.Tensor, normalize: bool = True,
                 eps: float = 1e-4, temperature: float = 1.0):
    """Single-forward Forward-Forward layer with class embeddings (Park et al., "Forward Learning
    of Graph Neural Networks" (ForwardGNN), ICLR 2024, SF: no negative data), fused.

        h = ReLU(x_hat W^T + b),  E = ReLU(class_x_hat W^T + b)   (one class input per class)
        logits = h E^T / temperature,  loss = mean_r CE(logits_r, y_r)

    The gradient flows through both h and E. Returns (h, E, loss, grad_weight, grad_bias).
    """
    eps, temperature = _check_sf(x, class_x, weight, bias, y, eps, temperature)
    backend = _sf_backend(x, class_x.shape[0])
    if backend == "reference":
        return reference.ff_sf_linear(x, class_x, weight, bias, y, normalize, eps, temperature)
    return _ops(backend)["sf"](x, class_x, weight, bias, y, bool(normalize), eps, temperature)


def activation_id(activation) -> int:
    if isinstance(activation, str) and activation in ACTIVATIONS:
        return ACTIVATIONS[activation]
    raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")


def tp_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
              proj: torch.Tensor, y: torch.Tensor, activation: str = "sigmoid",
              sign: bool = False):
    """Target-projection layer (tpSGD: Lomnitz et al., "Learning with Local Gradients at the
    Edge", 2022), fused: layer-wise SGD toward a fixed random projection of the label.

        h = act(x W^T + b),  t_r = P onehot(y_r) = proj[y_r]  (proj = P^T [num_classes, out]:
        a row gather, not a matmul; sign=True: t = sign(P onehot(y)))
        loss = 1/(2N) sum_r ||h_r - t_r||^2,  delta = (h - t) act'(z) / N,  dW = delta^T x

    Returns (h detached, loss, grad_weight, grad_bias).
    """
    _check_params(x, weight, bias)
    act = activation_id(activation)
    if not isinstance(proj, torch.Tensor) or proj.dim() != 2 or proj.shape[1] != weight.shape[0]:
        got = tuple(proj.shape) if isinstance(proj, torch.Tensor) else type(proj).__name__
        raise ValueError(f"proj must have shape [num_classes, {weight.shape[0]}] (P^T), got {got}")
    if not proj.is_floating_point():
        raise TypeError(f"proj must be a floating tensor, got {proj.dtype}")
    check_labels(y, x.shape[0], proj.shape[0], x.device)
    backend = backend_for(x)
    if backend == "reference":
        return reference.tp_linear(x, weight, bias, proj, y, act, bool(sign))
    return _ops(backend)["tp"](x, weight, bias, proj, y, act, bool(sign))


def _check_head(feat, weight, bias, y, name="feat"):
    if not isinstance(feat, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(feat).__name__}")
    if feat.dtype not in _FLOATS:
        raise TypeError(f"{name} must be a floating tensor, got {feat.dtype}")
    if feat.dim() < 2:
        raise ValueError(f"{name} must have shape [N, C, *spatial], got {tuple(feat.shape)}")
    if weight.dim() != 2 or weight.shape[1] != feat.shape[1]:
        raise ValueError(f"the block output {name} has {feat.shape[1]} channels (shape "
                         f"{tuple(feat.shape)}) but the head's weight expects {weight.shape[1]} "
                         f"(weight shape {tuple(weight.shape)})")
    if weight.dtype != feat.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match {name} dtype {feat.dtype}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape [{weight.shape[0]}], got {tuple(bias.shape)}")
    check_labels(y, feat.shape[0], weight.shape[0], feat.device)


def _autocast_off(feat: torch.Tensor):
    """The head op computes in its own math dtype (fp32 for fp32 / bf16 / fp16): autocast must
    not recast the torch ops it runs inside (the CPU op's matmul in bf16 under autocast failed
    with "expected scalar type Float but found BFloat16"); a no-op context outside autocast."""
    dev = feat.device.type
    if torch.is_autocast_enabled(dev):
        return torch.autocast(dev, enabled=False)
    return contextlib.nullcontext()


def local_head(feat: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
               y: torch.Tensor):
    """The local head of a block, fused: global average pool -> linear -> cross-entropy
    (DGL, Belilovsky et al. 2020; the last stage of InfoPro / AugLocal / MAN auxiliary nets).

        pooled = mean over feat's spatial dims ([N, C, *] -> [N, C]; a 2-D feat is used as is)
        logits = pooled W^T + b,  loss = mean_r CE(logits_r, y_r)

    Returns (loss, logits, grad_pooled = dloss/dpooled [N, C], grad_weight, grad_bias), math dtype
    but the parameter gradients. The loss is differentiable (w.r.t. feat, weight, bias) from the
    saved gradients alone: autograd keeps [N, C], never the [N, C, H, W] feature map.
    """
    _check_head(feat, weight, bias, y)
    backend = backend_for(feat)
    if backend == "reference":
        return reference.local_head(feat, weight, bias, y)
    with _autocast_off(feat):
        return _ops(backend)["head"](feat, weight, bias, y)


def head_loss(feat: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
              y: torch.Tensor):
    """The differentiable loss of local_head: returns (loss, logits detached). Its backward is
    the broadcast of the fused grad_pooled over feat's spatial positions (and the fused
    grad_weight / grad_bias): autograd keeps [N, C], not feat.

    Mixed precision: under torch.autocast on feat's device, a weight / bias of another dtype than
    feat (fp32 master weights, bf16 / fp16 features) is cast to feat's dtype for the op, as
    autocast casts nn.Linear's; the cast is differentiable, so the gradients reach the fp32
    parameters in fp32. Outside autocast the dtypes must match."""
    if (isinstance(feat, torch.Tensor) and isinstance(weight, torch.Tensor)
            and weight.dtype != feat.dtype and feat.dtype in _FLOATS
            and torch.is_autocast_enabled(feat.device.type)):
        weight = weight.to(feat.dtype)
        bias = None if bias is None else bias.to(feat.dtype)
    _check_head(feat, weight, bias, y)
    backend = backend_for(feat)
    with _autocast_off(feat):
        if backend == "reference":
            loss, logits, _ = reference.head_loss(feat, weight, bias, y)
            return loss, logits.detach()
        out = _ops(backend)["head"](feat, weight, bias, y)
    return out[0], out[1]


# ---- into given outputs (what the modules use) ------------------------------------------------

def _into(backend, grad_weight):
    return backend == "cpu" and _OUT_CPU and grad_weight is not None


def _accumulate(grad, g, accumulate):
    if accumulate:
        grad.add_(g)
    else:
        grad.copy_(g)


def ff_linear_into(x, weight, bias, grad_weight, grad_bias, num_pos=None, threshold=2.0,
                   normalize=True, eps=1e-4, accumulate=True):
    """ff_linear whose parameter gradients go into ``grad_weight`` / ``grad_bias`` (added to them
    when ``accumulate``, else overwriting): on the C++ backend the dW GEMM writes (or adds) into
    grad_weight directly - no gradient tensor is allocated and no extra pass adds it to .grad.
    Returns (h, loss)."""
    _check_params(x, weight, bias)
    n = x.shape[0]
    num_pos = n if num_pos is None else num_pos
    if not _is_count(num_pos) or not 0 <= num_pos <= n:
        raise ValueError(f"num_pos must be an int in [0, {n}] (rows of x), got {num_pos!r}")
    threshold = check_finite(threshold, "threshold")
    eps = check_finite(eps, "eps")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    backend = backend_for(x)
    if _into(backend, grad_weight):
        h = x.new_empty((n, weight.shape[0]))
        loss = torch.ops.pypaper.local_ff_linear_out(x, weight, bias, num_pos, threshold,
                                                     bool(normalize), eps, bool(accumulate), h,
                                                     grad_weight, grad_bias)
        return h, loss
    h, loss, gw, gb = ff_linear(x, weight, bias, num_pos, threshold, normalize, eps)
    _accumulate(grad_weight, gw, accumulate)
    if grad_bias is not None:
        _accumulate(grad_bias, gb, accumulate)
    return h, loss


def ff_sf_linear_into(x, class_x, weight, bias, y, grad_weight, grad_bias, normalize=True,
                      eps=1e-4, temperature=1.0, accumulate=True):
    """ff_sf_linear with its parameter gradients into ``grad_weight`` / ``grad_bias`` (see
    ff_linear_into). Returns (h, E, loss)."""
    eps, temperature = _check_sf(x, class_x, weight, bias, y, eps, temperature)
    if backend_for(x) == "cpu" and _SF_OUT_CPU and grad_weight is not None:
        h = x.new_empty((x.shape[0], weight.shape[0]))
        e, loss = torch.ops.pypaper.local_ff_sf_linear_out(x, class_x, weight, bias, y,
                                                           bool(normalize), eps, temperature,
                                                           bool(accumulate), h, grad_weight,
                                                           grad_bias)
        return h, e, loss
    h, e, loss, gw, gb = ff_sf_linear(x, class_x, weight, bias, y, normalize, eps, temperature)
    _accumulate(grad_weight, gw, accumulate)
    if grad_bias is not None:
        _accumulate(grad_bias, gb, accumulate)
    return h, e, loss


def tp_linear_into(x, weight, bias, proj, y, grad_weight, grad_bias, activation="sigmoid",
                   sign=False, accumulate=True):
    """tp_linear with its parameter gradients into ``grad_weight`` / ``grad_bias`` (see
    ff_linear_into). Returns (h, loss)."""
    _check_params(x, weight, bias)
    act = activation_id(activation)
    if not isinstance(proj, torch.Tensor) or proj.dim() != 2 or proj.shape[1] != weight.shape[0]:
        got = tuple(proj.shape) if isinstance(proj, torch.Tensor) else type(proj).__name__
        raise ValueError(f"proj must have shape [num_classes, {weight.shape[0]}] (P^T), got {got}")
    check_labels(y, x.shape[0], proj.shape[0], x.device)
    backend = backend_for(x)
    if _into(backend, grad_weight):
        h = x.new_empty((x.shape[0], weight.shape[0]))
        loss = torch.ops.pypaper.local_tp_linear_out(x, weight, bias, proj, y, act, bool(sign),
                                                     bool(accumulate), h, grad_weight, grad_bias)
        return h, loss
    h, loss, gw, gb = tp_linear(x, weight, bias, proj, y, activation, sign)
    _accumulate(grad_weight, gw, accumulate)
    if grad_bias is not None:
        _accumulate(grad_bias, gb, accumulate)
    return h, loss
