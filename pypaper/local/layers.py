"""Layers trained by their own local loss: Forward-Forward (FFLinear, FFClassEmbeddingLinear) and
target projection (TargetProjectionLinear).

Each has ``forward(x)`` (the detached activations for the next layer; no graph is built) and
``local_step(...)``: one fused op (pypaper.local.ops) computes the output, the local loss and the
parameter gradients, which are accumulated into ``.grad``; the user's optimizer does the update.
No tensor is kept for a backward pass. A weight (bias) computed by torch's reparametrizations
(torch.nn.utils.parametrize, prune, weight_norm, spectral_norm) is no leaf: its gradient from the
op is carried to the original parameters by autograd (_LocalLinear._step_params).

Data parallel: .grad is written without autograd, so torch's DistributedDataParallel never sees
it (local_step raises inside one); average with pypaper.local.sync_grads / sync_grads_on_step.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .._module_swap import current_value, has_computed_tensors, run_reparam_hooks
from . import ops, reference
from .data_parallel import check_not_ddp_wrapped


def _check_eps(eps) -> float:
    """eps of x_hat = x / (||x|| + eps): finite and >= 0, checked when the layer is built (a
    negative eps made forward divide by ||x|| - |eps|, near zero or negative, silently, while
    local_step raised from the C++ op only at the first training step)."""
    eps = ops.check_finite(eps, "eps")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    return eps


def _accumulate(param: Optional[nn.Parameter], grad: torch.Tensor) -> None:
    if param is None:
        return
    if param.grad is None:
        param.grad = grad if grad.dtype == param.dtype else grad.to(param.dtype)
    else:
        param.grad.add_(grad)


class _LocalLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, device=None, dtype=None):
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.in_features, self.out_features = in_features, out_features
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def _params(self):
        """(weight, bias) detached, as the layer's next forward computes them: under a
        torch.nn.utils.parametrize parametrization (weight_norm, spectral_norm, orthogonal, ...)
        the property's value; under a hook-based one (torch.nn.utils.prune, the deprecated
        torch.nn.utils.weight_norm) the tensor recomputed from weight_orig * weight_mask /
        g v / ||v||, since the attribute is only refreshed by a forward through __call__ and
        goodness() / scores() call forward directly."""
        w = current_value(self, "weight")
        b = current_value(self, "bias")
        return w.detach(), (None if b is None else b.detach())

    def _step_params(self):
        """What local_step hands the fused op: (weight, bias, (grad_weight, grad_bias),
        accumulate, finish). ``finish()`` runs after the op.

        Plain Parameters: the op writes dL/dW, dL/db straight into their .grad (_grads).

        A weight (or bias) computed from other parameters - W = g v / ||v|| (weight_norm),
        W = W_orig / sigma (spectral_norm), W = W_orig * mask (prune), any
        parametrize.register_parametrization - is no leaf: a .grad written on it reaches no
        parameter, and the optimizer of parametrizations.weight.original* / weight_orig /
        weight_g, weight_v would silently never move the weight. There the op writes the
        gradient w.r.t. the effective tensors into scratch buffers and autograd carries it
        through the reparametrization: dL/d(original) = (dW/d(original))^T dL/dW, accumulated
        into the originals' .grad as a backward through a forward would. The hook-based
        reparametrizations run their pre-hooks here first, as a forward through __call__ does
        (local_step is not one): the weight is the current one, not the attribute left by the
        last forward (stale after an optimizer step), and spectral_norm does its power
        iteration of the training step."""
        if not has_computed_tensors(self):
            w, b = self.weight.detach(), (None if self.bias is None else self.bias.detach())
            (gw, gb), acc = self._grads()
            return w, b, (gw, gb), acc, lambda: None
        with torch.enable_grad():  # the effective tensors with their graph to the originals
            run_reparam_hooks(self)
            w, b = self.weight, self.bias
        tensors = [t for t in (w, b) if t is not None]
        scratch = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in tensors]

        def finish():
            live = [(t, g) for t, g in zip(tensors, scratch) if t.requires_grad]
            if live:  # a frozen original (requires_grad=False) gets no .grad, as in nn.Linear
                torch.autograd.backward([t for t, _ in live], [g for _, g in live])

        gb = scratch[1] if b is not None else None
        return (w.detach(), None if b is None else b.detach(), (scratch[0], gb), False,
                finish)

    def _grads(self):
        """The .grad tensors the fused op writes into, and whether it adds to them (they
        existed) or overwrites them (created here, uninitialised: the op fills them).

        A parameter with requires_grad=False gets no .grad (nn.Linear's semantics: an optimizer
        must not move a frozen weight); the op writes its gradient into a scratch buffer that is
        dropped."""
        params = [self.weight] + ([self.bias] if self.bias is not None else [])
        live = [p for p in params if p.requires_grad]
        have = [p.grad is not None for p in live]
        if any(have) and not all(have):  # mixed: make the missing ones zeros and accumulate
            for p in live:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        accumulate = any(have)
        out = []
        for p in params:
            if not p.requires_grad:  # frozen: scratch (zeros: the op may add into it)
                out.append(torch.zeros_like(p, memory_format=torch.contiguous_format))
                continue
            if p.grad is None:
                p.grad = torch.empty_like(p, memory_format=torch.contiguous_format)
            out.append(p.grad)
        gb = out[1] if self.bias is not None else None
        return (out[0], gb), accumulate

    def _check_x(self, x, name: str = "x", features_only: bool = False) -> None:
        """x must be a tensor [N, in_features] (features_only: [*, in_features], like
        nn.Linear); the error names the argument, not the weight."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if features_only:
            if x.dim() < 1 or x.shape[-1] != self.in_features:
                raise ValueError(f"{name} must have shape [*, {self.in_features}] (in_features "
                                 f"in the last dim), got {tuple(x.shape)}")
        elif x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"{name} must have shape [N, {self.in_features}], got "
                             f"{tuple(x.shape)}")

    def _rowwise(self, fn, x: torch.Tensor) -> torch.Tensor:
        """fn on the rows of x [*, in_features] (the last dim is the features, as nn.Linear):
        leading dims flattened into rows for fn, restored on the output."""
        self._check_x(x, features_only=True)
        lead = x.shape[:-1]
        out = fn(x.detach().reshape(-1, self.in_features))
        return out.reshape(*lead, out.shape[-1])

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


class FFLinear(_LocalLinear):
    """A Forward-Forward layer (Hinton, "The Forward-Forward Algorithm: Some Preliminary
    Investigations", 2022): h = ReLU(W x_hat + b) with x_hat = x / (||x|| + eps); its goodness
    g = sum_j h_j^2 should exceed ``threshold`` on positive data and stay below it on negative
    data. The length normalisation hides the previous layer's goodness from this one.

    ``local_step(x_pos, x_neg)`` runs the fused op on [x_pos; x_neg] and accumulates into .grad the
    gradient of loss = mean_pos softplus(threshold - g) + mean_neg softplus(g - threshold);
    returns (loss, h_pos, h_neg), h detached.
    """

    def __init__(self, in_features: int, out_features: int, threshold: float = 2.0,
                 bias: bool = True, normalize: bool = True, eps: float = 1e-4, device=None,
                 dtype=None):
        self.threshold = ops.check_finite(threshold, "threshold")
        self.normalize = bool(normalize)
        self.eps = _check_eps(eps)
        super().__init__(in_features, out_features, bias, device, dtype)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """h = ReLU(W x_hat + b) for x [*, in_features] (x_hat: each row, along the last dim,
        divided by its length); returns [*, out_features], detached."""
        w, b = self._params()
        return self._rowwise(lambda r: reference.ff_forward(r, w, b, self.normalize, self.eps), x)

    @torch.no_grad()
    def goodness(self, x: torch.Tensor) -> torch.Tensor:
        """g = sum_j h_j^2 for each row of x [*, in_features] -> [*] (fp32; fp64 for fp64)."""
        h = self.forward(x)
        return h.to(reference.math_dtype(h.dtype)).pow(2).sum(-1)

    def local_step(self, x_pos: torch.Tensor, x_neg: torch.Tensor):
        check_not_ddp_wrapped(self, "FFLinear.local_step")
        for name, t in (("x_pos", x_pos), ("x_neg", x_neg)):
            if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[1] != self.in_features:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name} must have shape [N, {self.in_features}], got {got}")
        w, b, (gw, gb), acc, finish = self._step_params()
        x = torch.cat([x_pos.detach(), x_neg.detach()]).to(w.dtype)
        p = x_pos.shape[0]
        h, loss = ops.ff_linear_into(x, w, b, gw, gb, num_pos=p, threshold=self.threshold,
                                     normalize=self.normalize, eps=self.eps, accumulate=acc)
        finish()
        return loss, h[:p], h[p:]

    def extra_repr(self) -> str:
        return super().extra_repr() + f", threshold={self.threshold}"


class FFClassEmbeddingLinear(_LocalLinear):
    """Single-forward Forward-Forward layer with class embeddings (ForwardGNN's SF, Park et al.,
    ICLR 2024): instead of negative data, every class has an input row (``class_x``: fixed random
    features for the first layer, the previous layer's class embeddings after it) that goes
    through the same layer, E = ReLU(W class_x_hat + b); a sample is scored by its similarity to
    each class embedding, logits = h E^T / temperature, with a cross-entropy loss.

    ``local_step(x, y, class_x=None)`` -> (loss, h, E), .grad accumulated; class_x=None uses this
    layer's own fixed random class inputs (buffer ``class_inputs``, drawn from ``seed``).
    """

    def __init__(self, in_features: int, out_features: int, num_classes: int,
                 temperature: float = 1.0, bias: bool = True, normalize: bool = True,
                 eps: float = 1e-4, seed: int = 0, device=None, dtype=None):
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.num_classes = num_classes
        self.temperature = ops.check_finite(temperature, "temperature")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.normalize, self.eps = bool(normalize), _check_eps(eps)
        super().__init__(in_features, out_features, bias, device, dtype)
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("class_inputs", torch.randn(num_classes, in_features, generator=g)
                             .to(device=device, dtype=self.weight.dtype))

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """h = ReLU(W x_hat + b) for x [*, in_features] -> [*, out_features], detached."""
        w, b = self._params()
        return self._rowwise(lambda r: reference.ff_forward(r, w, b, self.normalize, self.eps), x)

    @torch.no_grad()
    def scores(self, x: torch.Tensor, class_x: Optional[torch.Tensor] = None):
        """(logits = h E^T / temperature, h, E) without training."""
        cx = self.class_inputs if class_x is None else class_x
        h, e = self.forward(x), self.forward(cx)
        mdt = reference.math_dtype(h.dtype)
        return h.to(mdt) @ e.to(mdt).t() / self.temperature, h, e

    def local_step(self, x: torch.Tensor, y: torch.Tensor, class_x: Optional[torch.Tensor] = None):
        check_not_ddp_wrapped(self, "FFClassEmbeddingLinear.local_step")
        self._check_x(x)
        if class_x is not None:
            self._check_x(class_x, "class_x")
        cx = self.class_inputs if class_x is None else class_x.detach()
        w, b, (gw, gb), acc, finish = self._step_params()
        h, e, loss = ops.ff_sf_linear_into(x.detach(), cx, w, b, y, gw, gb, self.normalize,
                                           self.eps, self.temperature, accumulate=acc)
        finish()
        return loss, h, e


class TargetProjectionLinear(_LocalLinear):
    """A target-projection layer (tpSGD: Lomnitz et al., "Learning with Local Gradients at the
    Edge", 2022): trained by layer-wise SGD toward a fixed random projection of the one-hot label,
    t = P onehot(y), with loss 1/(2N) sum ||act(W x + b) - t||^2.

    P [out_features, num_classes] is drawn once from ``seed``, in the range of the activation
    (entries uniform in [-1, 1] for tanh, in [0, 1] for sigmoid and relu), and stored transposed
    as the buffer ``proj`` [num_classes, out_features], so that P onehot(y) is a row gather.
    ``sign=True``: binary targets, sign(P onehot(y)) in {-1, 1} for tanh (the op's sign variant),
    {0, 1} (P thresholded at 1/2) for sigmoid and relu.
    ``local_step(x, y)`` -> (loss, h), .grad accumulated, h detached.
    """

    def __init__(self, in_features: int, out_features: int, num_classes: int,
                 activation: str = "sigmoid", seed: int = 0, bias: bool = True,
                 sign: bool = False, device=None, dtype=None):
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.activation_id = ops.activation_id(activation)
        self.activation = activation
        self.num_classes = num_classes
        self.sign = bool(sign)
        super().__init__(in_features, out_features, bias, device, dtype)
        g = torch.Generator().manual_seed(seed)
        p = torch.rand(num_classes, out_features, generator=g)
        # the op's sign variant for tanh; binary {0, 1} targets for the non-negative activations
        self._op_sign = self.sign and activation == "tanh"
        if activation == "tanh":
            p = 2 * p - 1
        elif self.sign:
            p = (p > 0.5).to(p.dtype)
        self.register_buffer("proj", p.to(device=device, dtype=torch.float32))

    def _apply(self, fn, recurse=True):
        # The fixed projection stays float32 (float64 under .double()): a model built with
        # dtype=torch.bfloat16 keeps it in float32, and .to(torch.bfloat16) rounded it for good,
        # so the same layer trained toward other targets (a sigmoid loss of 0.24358 instead of
        # 0.24331 on the same step). Device moves apply.
        from ..quant.qlinear import apply_keeping_dtypes

        return apply_keeping_dtypes(self, fn, recurse, [self._buffers.get("proj")],
                                    (torch.float32, torch.float64))

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """h = act(W x + b) for x [*, in_features] -> [*, out_features], detached."""
        self._check_x(x, features_only=True)
        w, b = self._params()
        return reference._act(F.linear(x.detach(), w, b), self.activation_id)

    def local_step(self, x: torch.Tensor, y: torch.Tensor):
        check_not_ddp_wrapped(self, "TargetProjectionLinear.local_step")
        self._check_x(x)  # before the op: a wrong width is x's fault, not the weight's
        w, b, (gw, gb), acc, finish = self._step_params()
        h, loss = ops.tp_linear_into(x.detach().to(w.dtype), w, b, self.proj, y, gw, gb,
                                     self.activation, self._op_sign, accumulate=acc)
        finish()
        return loss, h

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", num_classes={self.num_classes}, "
                f"activation={self.activation!r}, sign={self.sign}")
