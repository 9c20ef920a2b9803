"""WTACRSLinear: nn.Linear whose backward keeps only a sample of its input rows.

Liu et al., "Winner-Take-All Column Row Sampling for Memory Efficient Adaptation of Language
Model" (NeurIPS 2023). In training, with a weight that needs a gradient, the layer keeps
k = min(N, max(ceil(keep_ratio N), min_k)) of its N input rows (all leading dims flattened) for
the backward, each multiplied by its estimator weight, instead of the whole input: the forward
output, grad_input and grad_bias are exact, grad_W is the unbiased WTA-CRS estimate
(reference.py). In eval mode, under no_grad, or with a frozen weight (the base layer of a LoRA
adapter) it is exactly nn.Linear and keeps what nn.Linear keeps.

Same parameters, state_dict keys and constructor arguments as nn.Linear (its positional order
in_features, out_features, bias, device, dtype), plus, keyword-only:
  keep_ratio   (0, 1]: the share of rows kept (1 keeps all: the exact gradient)
  min_k        >= 1: rows kept at least
  estimator    "wta-crs" (the paper) or "crs" (plain column-row sampling, the baseline)
  generator    torch.Generator the per-step seed is drawn from (reproducible sampling). None:
               the seed comes from the global CPU generator's state without advancing it (so
               dropout and every other consumer see the same draws as in the unconverted model),
               mixed with the layer's call count and its position in convert()'s order.
  store_dtype  None (the input's dtype; under autocast, but for fp64: the autocast dtype, which
               the backward reads them in), torch.bfloat16 or torch.float16: the kept rows' dtype
  grad_norm_device  where the per-sample gradient norms live (grad_norms.GradNormCache)
"""
from __future__ import annotations

import math
import numbers
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .._module_swap import copy_hooks, describe_reparam, has_computed_tensors
from . import ops
from .grad_norms import GradNormCache, check_ids, current_sample_ids
from .reference import budget

ESTIMATORS = ("wta-crs", "crs")
_STORE_DTYPES = (None, torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_config(keep_ratio, min_k, estimator, store_dtype=None) -> tuple[float, int]:
    """Validates the options; returns (keep_ratio, min_k) as a Python float and int. Any real /
    integral scalar is accepted (numpy's from a sweep or a config file included: they register
    with the numbers ABCs; numpy's bool does not), bools are not."""
    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, numbers.Real) or \
            not (0.0 < float(keep_ratio) <= 1.0) or math.isnan(float(keep_ratio)):
        raise ValueError(f"keep_ratio must be a number in (0, 1], got {keep_ratio!r}")
    if isinstance(min_k, bool) or not isinstance(min_k, numbers.Integral) or \
            min_k < 1:
        raise ValueError(f"min_k must be an int >= 1, got {min_k!r}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if store_dtype not in _STORE_DTYPES:
        raise ValueError(f"store_dtype must be None, torch.float32, torch.bfloat16 or "
                         f"torch.float16, got {store_dtype!r}")
    return float(keep_ratio), int(min_k)


class SampleGroup:
    """Layers fed by the same tensor (Q, K and V of an attention block) share one sample of it:
    the first to run draws (x_kept, indices), the others reuse them while the input is the same
    tensor at the same version, so autograd keeps one buffer instead of one per layer. Only weak
    references are held: the buffer lives exactly as long as some layer's backward needs it."""

    def __init__(self, grad_norm_device=None):
        self.grad_norms = GradNormCache(grad_norm_device)
        self._last = None

    # The last sample is held through weak references, which neither pickle nor deepcopy: a
    # copy starts without one (it only ever saved a redraw within one forward).
    def __getstate__(self):
        state = dict(self.__dict__)
        state["_last"] = None
        return state

    def sample(self, layer: "WTACRSLinear", inp: torch.Tensor, x: torch.Tensor, k: int, ids,
               store: Optional[torch.dtype]):
        # Under torch.compile the version counter is not traceable (dynamo makes it an unbacked
        # symbol, and comparing two of them fails the trace): the identity of the input alone
        # decides. An in-place change of that input between two siblings would go unseen there,
        # but the unconverted model cannot do it either: nn.Linear saves the same tensor for its
        # grad_W, and autograd refuses the backward after such a change.
        compiling = torch.compiler.is_compiling()
        last = self._last
        if last is not None:
            inp_ref, version, kept_ref, idx_ref, step, kk, key = last
            same = inp_ref() is inp and kk == k and (compiling or inp._version == version)
            if same and key == layer._sampling_key(store):
                kept, idx = kept_ref(), idx_ref()
                if kept is not None and idx is not None:
                    return kept, idx, step
        kept, idx, step = layer._draw(x, k, ids, self.grad_norms, store)
        self._last = (weakref.ref(inp), None if compiling else inp._version, weakref.ref(kept),
                      weakref.ref(idx), step, k, layer._sampling_key(store))
        return kept, idx, step


class WTACRSLinear(nn.Linear):
    """Drop-in nn.Linear with a WTA-CRS estimate of grad_W (see the module docstring)."""

    # nn.Linear's positional order (in_features, out_features, bias, device, dtype), so that
    # ``WTACRSLinear`` can stand in for ``nn.Linear`` wherever the latter is constructed, even
    # positionally (``nn.Linear(d, d, False, device, dtype)``, ``functools.partial`` factories);
    # the WTA-CRS options come after, keyword-only.
    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype=None, *, keep_ratio: float = 0.3, min_k: int = 32,
                 estimator: str = "wta-crs", generator: Optional[torch.Generator] = None,
                 store_dtype: Optional[torch.dtype] = None, grad_norm_device=None):
        if isinstance(device, float) or isinstance(dtype, float):
            raise TypeError(
                f"WTACRSLinear takes nn.Linear's positional arguments (in_features, out_features, "
                f"bias, device, dtype); keep_ratio, min_k, estimator and generator are "
                f"keyword-only, got device={device!r}, dtype={dtype!r}")
        keep_ratio, min_k = check_config(keep_ratio, min_k, estimator, store_dtype)
        super().__init__(in_features, out_features, bias, device, dtype)
        self.keep_ratio = keep_ratio
        self.min_k = min_k
        self.estimator = estimator
        self.generator = generator
        self.store_dtype = store_dtype
        self.grad_norms = GradNormCache(grad_norm_device)
        self.sample_group: Optional[SampleGroup] = None
        self._stream = 0  # convert() numbers its layers, so that their seeds differ
        self._calls = 0

    @classmethod
    def from_linear(cls, linear: nn.Linear, keep_ratio: float = 0.3, min_k: int = 32,
                    estimator: str = "wta-crs", generator: Optional[torch.Generator] = None, *,
                    store_dtype=None, grad_norm_device=None) -> "WTACRSLinear":
        """A WTACRSLinear sharing ``linear``'s Parameter objects (optimizers, tied weights and
        the original module all see the same tensors). A Linear whose weight or bias is
        computed (torch.nn.utils.parametrize, prune, weight_norm, spectral_norm) has no such
        Parameter to share: ValueError naming the parametrization."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        if has_computed_tensors(linear):
            # its weight (bias) is recomputed from other tensors at every access or forward:
            # the new layer would hold one value of it (a tensor that is not a Parameter: torch
            # refused it with "cannot assign 'torch.FloatTensor' as parameter 'weight'")
            raise ValueError(
                f"WTACRSLinear.from_linear: linear's tensors are computed, not Parameters "
                f"({describe_reparam(linear)}); make them plain first "
                f"(torch.nn.utils.parametrize.remove_parametrizations, prune.remove, "
                f"remove_weight_norm) or keep the layer as it is")
        new = cls(linear.in_features, linear.out_features, linear.bias is not None,
                  device="meta", dtype=linear.weight.dtype, keep_ratio=keep_ratio, min_k=min_k,
                  estimator=estimator, generator=generator, store_dtype=store_dtype,
                  grad_norm_device=grad_norm_device)
        new.weight = linear.weight
        new.bias = linear.bias
        new.train(linear.training)
        copy_hooks(linear, new)
        return new

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", keep_ratio={self.keep_ratio}, min_k={self.min_k}, "
                f"estimator={self.estimator}"
                + (f", store_dtype={self.store_dtype}" if self.store_dtype else ""))

    def _sampling_key(self, store: Optional[torch.dtype]):
        return (self.keep_ratio, self.min_k, self.estimator, store)

    def _store_dtype(self, x: torch.Tensor) -> Optional[torch.dtype]:
        """The dtype the kept rows are stored in: store_dtype if set; else, under autocast with
        an input autocast casts (any float but fp64), the autocast dtype; else x's (None).

        Autocast runs the forward GEMM in its 16-bit dtype, so dY comes back in that dtype and
        the sampled GEMM casts the kept rows to it (sampled_grad_weight): rounding scale * x_t
        to 16 bits when it is stored instead of when it is read is the same single rounding, so
        for an fp32 input grad_W is bit for bit the same, in half the bytes (an fp16 input
        under bf16 autocast is rounded once instead of twice). fp32 rows would keep 2x what
        they need, and more than the keep_ratio share of nn.Linear's footprint (which saves
        the 16-bit copy of x under autocast)."""
        if self.store_dtype is not None or x.dtype == torch.float64:  # autocast leaves fp64
            return self.store_dtype
        dev = x.device.type
        if torch.is_autocast_enabled(dev):
            low = torch.get_autocast_dtype(dev)
            if low in (torch.bfloat16, torch.float16):
                return low
        return None

    def _seed(self, device) -> torch.Tensor:
        g = self.generator
        if g is not None or torch.compiler.is_compiling():
            gdev = g.device if g is not None else "cpu"
            seed = torch.randint(0, 2 ** 62, (1,), dtype=torch.int64, generator=g, device=gdev)
            return seed.to(device)
        # No generator: read a draw of the global CPU generator and put its state back, so the
        # model's other random draws (dropout) are the unconverted model's; the call count and
        # the layer's stream make every call's seed fresh although the state may not have moved.
        state = torch.get_rng_state()
        base = int(torch.randint(0, 2 ** 62, (1,), dtype=torch.int64))
        torch.set_rng_state(state)
        self._calls += 1
        mixed = base ^ (self._stream * 0x9E3779B97F4A7C15) ^ (self._calls * 0xBF58476D1CE4E5B9)
        return torch.tensor([mixed & (2 ** 62 - 1)], dtype=torch.int64, device=device)

    def _draw(self, x: torch.Tensor, k: int, ids, cache: GradNormCache,
              store: Optional[torch.dtype]):
        g = cache.lookup(ids, x.shape[0], x.device) if ids is not None else None
        step = cache.begin_step()
        kept, idx = ops.sample(x.detach(), g, k, self.estimator == "wta-crs",
                               self._seed(x.device), store)
        return kept, idx, step

    def forward(self, input: torch.Tensor, sample_ids: Optional[torch.Tensor] = None):
        if input.shape[-1:] != (self.in_features,):
            raise ValueError(f"input must have in_features = {self.in_features} features in its "
                             f"last dim, got shape {tuple(input.shape)}")
        # read once: under a parametrization every read recomputes the weight (spectral_norm's
        # power iteration ran twice per step where nn.Linear runs it once)
        weight = self.weight
        if not (self.training and weight.requires_grad and torch.is_grad_enabled()):
            return F.linear(input, weight, self.bias)
        # rows = every leading dim flattened; math.prod, not reshape(-1, d): with d = 0
        # (in_features = 0, which nn.Linear accepts) the -1 is ambiguous and reshape refuses
        n = math.prod(input.shape[:-1])
        x = input.reshape(n, self.in_features)
        k = budget(n, self.keep_ratio, self.min_k)
        if k >= n:  # every row kept: nothing to save over nn.Linear, and it is exact
            return F.linear(input, weight, self.bias)
        ids = sample_ids
        if ids is None and not torch.compiler.is_compiling():  # the context is eager-only
            ids = current_sample_ids()
        if ids is not None:
            if input.dim() < 2:
                raise ValueError("sample_ids need an input with a batch dim (at least 2-D), got "
                                 f"shape {tuple(input.shape)}")
            check_ids(ids, input.shape[0])
        store = self._store_dtype(x)
        group = self.sample_group
        cache = group.grad_norms if group is not None else self.grad_norms
        if group is not None:
            kept, idx, step = group.sample(self, input, x, k, ids, store)
        else:
            kept, idx, step = self._draw(x, k, ids, cache, store)
        y = ops.linear(x, weight, self.bias, kept, idx)
        if ids is not None and y.requires_grad:
            y.register_hook(_StoreNorms(cache, ids.detach(), step))
        return y.reshape(*input.shape[:-1], self.out_features)


class _StoreNorms:
    """Tensor hook on a layer's output: adds ||dy_t||^2 to the cache (the gradient passes
    through unchanged)."""

    def __init__(self, cache: GradNormCache, ids: torch.Tensor, step: int):
        self.cache, self.ids, self.step = cache, ids, step

    def __call__(self, grad: torch.Tensor) -> None:
        g = grad.detach().reshape(-1, grad.shape[-1])
        norms = ops.row_norms(g).float()
        self.cache.store(self.ids, norms * norms, self.step)
