"""Hopfield, HopfieldPooling, HopfieldLayer: drop-ins for hflayers' modules of the same names.

Ramsauer et al., "Hopfield Networks is All You Need" (ICLR 2021); hflayers is their reference
library (github ml-jku/hopfield-layers). Constructor arguments, defaults, parameter names
(state_dicts load both ways), forward signatures and accessors are hflayers'; the retrieval runs
in pypaper's fused op (pypaper.hopfield.ops.hopfield_retrieve), which keeps no association matrix
for the backward. Dropout on the association matrix (dropout > 0 while training) and the
accessors materialise it, through the plain-PyTorch loop. Documented behaviour replaces four
hflayers bugs (pypaper.hopfield.reference.HFLAYERS_FIXES): concat_bias_pattern works, uint8 masks
work, per-head scaling scales each head, static patterns stay with their batch item.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn import Parameter

from .._module_swap import run_reparam_hooks
from . import reference
from .ops import hopfield_retrieve

Data = Union[Tensor, Tuple[Tensor, Tensor, Tensor]]


def _size(value, name: str, optional: bool = True):
    """``value`` as a positive Python int (any integral type, numpy's included, as hflayers'
    torch calls accept them), or None where allowed."""
    if value is None and optional:
        return None
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or int(value) <= 0:
        raise ValueError(f"{name} must be a positive int{' or None' if optional else ''}, got "
                         f"{value!r}")
    return int(value)


class HopfieldCore(nn.Module):
    """The association core of hflayers (projections, Hopfield-space normalisation, bias / zero
    patterns, output projection) with hflayers' parameter names."""

    def __init__(self, embed_dim=None, num_heads=1, dropout=0.0, bias=True, add_bias_kv=False,
                 add_zero_attn=False, kdim=None, vdim=None, head_dim=None, pattern_dim=None,
                 out_dim=None, disable_out_projection=False, key_as_static=False,
                 query_as_static=False, value_as_static=False, value_as_connected=False,
                 normalize_pattern=False, normalize_pattern_affine=False,
                 normalize_pattern_eps=1e-5):
        super().__init__()
        num_heads = _size(num_heads, "num_heads", optional=False)
        embed_dim, kdim, vdim = (_size(embed_dim, "input_size"), _size(kdim, "stored_pattern_size"),
                                 _size(vdim, "pattern_projection_size"))
        head_dim, pattern_dim = _size(head_dim, "hidden_size"), _size(pattern_dim, "pattern_size")
        out_dim = _size(out_dim, "output_size")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.key_as_static, self.query_as_static = key_as_static, query_as_static
        self.value_as_static, self.value_as_connected = value_as_static, value_as_connected
        self.normalize_pattern, self.normalize_pattern_affine = normalize_pattern, normalize_pattern_affine
        self.normalize_pattern_eps = normalize_pattern_eps
        self.disable_out_projection = disable_out_projection
        num_non_static = 3 - (key_as_static + query_as_static + value_as_static)
        self.static_execution = (key_as_static and query_as_static and value_as_static and
                                 not value_as_connected and not normalize_pattern and
                                 not normalize_pattern_affine and disable_out_projection)
        if self.static_execution:
            embed_dim, kdim, vdim = None, None, None
        if embed_dim is None and not self.static_execution:
            raise ValueError("input_size is required unless every pattern is static and the "
                             "output projection is disabled")
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = (self.kdim == embed_dim and self.vdim == embed_dim and
                                    pattern_dim is None and not value_as_connected)
        if value_as_connected and self.kdim != self.vdim:
            raise ValueError("pattern_projection_as_connected needs stored_pattern_size == "
                             "pattern_projection_size")
        self.num_heads = num_heads
        self.dropout = float(dropout)
        self.head_dim = None
        self.pattern_dim = pattern_dim
        self.virtual_hopfield_dim = self.virtual_pattern_dim = None
        if not self.static_execution:
            if head_dim is None:
                if embed_dim % num_heads != 0:
                    raise ValueError(f"num_heads ({num_heads}) must divide input_size "
                                     f"({embed_dim}) when hidden_size is not given")
                self.head_dim = embed_dim // num_heads
            else:
                self.head_dim = head_dim
            if self.pattern_dim is None:
                self.pattern_dim = self.head_dim
            self.virtual_hopfield_dim = num_heads * self.head_dim
            self.virtual_pattern_dim = num_heads * self.pattern_dim
        self.out_dim = embed_dim if out_dim is None else out_dim
        if normalize_pattern_affine:
            if not normalize_pattern:
                raise ValueError("normalize_hopfield_space_affine needs normalize_hopfield_space")
            self.p_norm_weight = Parameter(torch.empty(self.head_dim))
            self.p_norm_bias = Parameter(torch.empty(self.head_dim))
        else:
            self.register_parameter("p_norm_weight", None)
            self.register_parameter("p_norm_bias", None)
        hd, pd = self.virtual_hopfield_dim, self.virtual_pattern_dim
        if not self._qkv_same_embed_dim:
            self.q_proj_weight = None if query_as_static else Parameter(torch.empty(hd, embed_dim))
            self.k_proj_weight = None if key_as_static else Parameter(torch.empty(hd, self.kdim))
            vin = hd if (value_as_connected and not key_as_static) else self.vdim
            self.v_proj_weight = None if value_as_static else Parameter(torch.empty(pd, vin))
            self.register_parameter("in_proj_weight", None)
        elif num_non_static:
            rows = ((not query_as_static) * hd + (not key_as_static) * hd +
                    (not value_as_static) * pd)
            self.in_proj_weight = Parameter(torch.empty(rows, embed_dim))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:  # every pattern static: no projection at all (hflayers' parameter-free retrieval)
            self.register_parameter("in_proj_weight", None)
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        if bias and num_non_static > 0:
            self.in_proj_bias = Parameter(torch.empty((not query_as_static) * hd +
                                                      (not key_as_static) * hd + pd))
        else:
            self.register_parameter("in_proj_bias", None)
        if disable_out_projection:
            self.register_parameter("out_proj", None)
        else:
            if not isinstance(self.out_dim, int) or self.out_dim <= 0:
                raise ValueError("output_size must be positive")
            self.out_proj = nn.Linear(pd, self.out_dim, bias=bias)
        self.bias_k = self.bias_v = None
        if add_bias_kv:
            if key_as_static or value_as_static:
                raise ValueError("concat_bias_pattern cannot add a bias to a static stored "
                                 "pattern or pattern projection")
            self.bias_k = Parameter(torch.empty(1, 1, hd))
            self.bias_v = Parameter(torch.empty(1, 1, pd))
        self.add_zero_attn = add_zero_attn
        self.reset_parameters()

    def reset_parameters(self):
        if self.p_norm_weight is not None:
            nn.init.ones_(self.p_norm_weight)
            nn.init.zeros_(self.p_norm_bias)
        for w in (self.in_proj_weight, self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
            if w is not None:
                nn.init.normal_(w, mean=0.0, std=0.02)
        if self.in_proj_bias is not None:
            nn.init.constant_(self.in_proj_bias, 0.0)
        if self.out_proj is not None:
            nn.init.normal_(self.out_proj.weight, mean=0.0, std=0.02)
            if self.out_proj.bias is not None:
                nn.init.constant_(self.out_proj.bias, 0.0)
        for b in (self.bias_k, self.bias_v):
            if b is not None:
                nn.init.normal_(b, mean=0.0, std=0.02)

    def forward(self, *args, **kwargs):
        raise NotImplementedError(
            "pypaper's HopfieldCore holds hflayers' parameters but has no forward of its own (hflayers' "
            "sequence-first functional core): call the Hopfield module that owns it, or "
            "pypaper.ops.hopfield_retrieve on projected tensors")

    # the split projection weights, whatever the storage (packed in_proj_weight or separate)
    def split_weights(self):
        if not self._qkv_same_embed_dim:
            return self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        w = self.in_proj_weight
        hd, off = self.virtual_hopfield_dim, 0
        wq = wk = wv = None
        if not self.query_as_static:
            wq, off = w[:hd], hd
        if not self.key_as_static:
            wk, off = w[off:off + hd], off + hd
        if not self.value_as_static:
            wv = w[off:]
        return wq, wk, wv

    def project(self, query: Tensor, key: Tensor, value: Tensor):
        """Batch-first [N, L|S, *] inputs -> head-split q [N, H, L, d], k [N, H, S, d],
        v [N, H, S, dv] in the Hopfield space (hflayers' projections and normalisation)."""
        H = self.num_heads
        # the core is never called (hflayers calls its core): a prune / hook weight_norm /
        # spectral_norm pre-hook on it runs here, as a call would (its weight was stale and the
        # second backward raised)
        run_reparam_hooks(self)
        wq, wk, wv = self.split_weights()
        b = self.in_proj_bias
        hd = self.virtual_hopfield_dim
        off = 0
        if self.query_as_static:
            q = query.unsqueeze(1).expand(-1, H, -1, -1)
        else:
            q = F.linear(query, wq, None if b is None else b[:hd])
            off = hd
        v_in = value
        if self.key_as_static:
            k = key.unsqueeze(1).expand(-1, H, -1, -1)
        else:
            kb = None if b is None else b[off:off + hd]
            k = F.linear(key, wk, kb)
            if self.value_as_connected:
                v_in = F.linear(value, wk, kb)
            off += hd
        if self.value_as_static:
            if self.value_as_connected and not self.key_as_static:
                v = v_in
            else:
                v = v_in.unsqueeze(1).expand(-1, H, -1, -1)
        else:
            v = F.linear(v_in, wv, None if b is None else b[off:])
        N = query.shape[0]

        def split(x, dim):
            return x.reshape(N, x.shape[1], H, dim).transpose(1, 2) if x.dim() == 3 else x

        q = split(q, q.shape[-1] // H if q.dim() == 3 else q.shape[-1])
        k = split(k, k.shape[-1] // H if k.dim() == 3 else k.shape[-1])
        v = split(v, v.shape[-1] // H if v.dim() == 3 else v.shape[-1])
        if self.normalize_pattern:
            q = F.layer_norm(q, (q.shape[-1],), self.p_norm_weight, self.p_norm_bias,
                             self.normalize_pattern_eps)
            k = F.layer_norm(k, (k.shape[-1],), self.p_norm_weight, self.p_norm_bias,
                             self.normalize_pattern_eps)
            # Under autocast layer_norm returns fp32 while the projected v stays fp16/bf16; the
            # retrieval op wants one dtype (hflayers' bmm would autocast them together).
            q, k = q.to(v.dtype), k.to(v.dtype)
        return q, k, v


class Hopfield(nn.Module):
    """Module with an underlying Hopfield association (hflayers.Hopfield's interface)."""

    def __init__(self, input_size: Optional[int] = None, hidden_size: Optional[int] = None,
                 output_size: Optional[int] = None, pattern_size: Optional[int] = None,
                 num_heads: int = 1, scaling: Optional[Union[float, Tensor]] = None,
                 update_steps_max: Optional[Union[int, Tensor]] = 0,
                 update_steps_eps: Union[float, Tensor] = 1e-4,
                 normalize_stored_pattern: bool = True,
                 normalize_stored_pattern_affine: bool = True,
                 normalize_stored_pattern_eps: float = 1e-5,
                 normalize_state_pattern: bool = True,
                 normalize_state_pattern_affine: bool = True,
                 normalize_state_pattern_eps: float = 1e-5,
                 normalize_pattern_projection: bool = True,
                 normalize_pattern_projection_affine: bool = True,
                 normalize_pattern_projection_eps: float = 1e-5,
                 normalize_hopfield_space: bool = False,
                 normalize_hopfield_space_affine: bool = False,
                 normalize_hopfield_space_eps: float = 1e-5,
                 stored_pattern_as_static: bool = False, state_pattern_as_static: bool = False,
                 pattern_projection_as_static: bool = False,
                 pattern_projection_as_connected: bool = False,
                 stored_pattern_size: Optional[int] = None,
                 pattern_projection_size: Optional[int] = None,
                 batch_first: bool = True, association_activation: Optional[str] = None,
                 dropout: float = 0.0, input_bias: bool = True, concat_bias_pattern: bool = False,
                 add_zero_association: bool = False, disable_out_projection: bool = False):
        super().__init__()
        if not isinstance(batch_first, bool):
            raise TypeError(f"batch_first must be a bool, got {type(batch_first).__name__}")
        self.association_core = HopfieldCore(
            embed_dim=input_size, num_heads=num_heads, dropout=dropout, bias=input_bias,
            add_bias_kv=concat_bias_pattern, add_zero_attn=add_zero_association,
            kdim=stored_pattern_size, vdim=pattern_projection_size, head_dim=hidden_size,
            pattern_dim=pattern_size, out_dim=output_size,
            disable_out_projection=disable_out_projection, key_as_static=stored_pattern_as_static,
            query_as_static=state_pattern_as_static, value_as_static=pattern_projection_as_static,
            value_as_connected=pattern_projection_as_connected,
            normalize_pattern=normalize_hopfield_space,
            normalize_pattern_affine=normalize_hopfield_space_affine,
            normalize_pattern_eps=normalize_hopfield_space_eps)
        self.association_activation = None
        if association_activation is not None:
            fn = getattr(torch, association_activation, None)
            if fn is None:
                raise ValueError(f"association_activation must name a torch function, got "
                                 f"{association_activation!r}")
            self.association_activation = fn

        def norm(flag, affine, size, eps, what):
            if affine and not flag:
                raise ValueError(f"normalize_{what}_affine needs normalize_{what}")
            if not flag:
                return None
            if size is None:
                raise ValueError(f"normalize_{what} needs its pattern size")
            return nn.LayerNorm(size, eps=eps, elementwise_affine=affine)

        self.norm_stored_pattern = norm(
            normalize_stored_pattern, normalize_stored_pattern_affine,
            input_size if stored_pattern_size is None else stored_pattern_size,
            normalize_stored_pattern_eps, "stored_pattern")
        self.norm_state_pattern = norm(normalize_state_pattern, normalize_state_pattern_affine,
                                       input_size, normalize_state_pattern_eps, "state_pattern")
        self.norm_pattern_projection = norm(
            normalize_pattern_projection, normalize_pattern_projection_affine,
            input_size if pattern_projection_size is None else pattern_projection_size,
            normalize_pattern_projection_eps, "pattern_projection")
        core = self.association_core
        # A static pattern projection is not projected: each head gets the whole pattern
        # projection (or, connected, the stored-pattern projection's head slice), so the output
        # projection, sized num_heads * pattern_size, needs that per-head size to be pattern_size
        # (hflayers asserts it at its forward). Without the check the mismatch surfaces later as
        # a bare matmul shape error inside out_proj. Where the size is fixed by the constructor
        # (a LayerNorm on the pattern projection, or the connected case) refuse it here; else
        # _inputs checks the input's size at forward.
        if core.value_as_static and core.out_proj is not None:
            if core.value_as_connected and not core.key_as_static:
                per_head, what = core.head_dim, "hidden_size (a connected static pattern " \
                    "projection reuses the stored-pattern projection)"
            elif self.norm_pattern_projection is not None:
                per_head, what = core.vdim, "the pattern projection size (" \
                    "pattern_projection_size, default input_size)"
            else:
                per_head = what = None
            if per_head is not None and per_head != core.pattern_dim:
                raise ValueError(
                    f"pattern_size ({core.pattern_dim}) must equal {what} = {per_head} with "
                    "pattern_projection_as_static=True: the static pattern projection enters "
                    "every head unprojected and the output projection expects num_heads * "
                    "pattern_size features (or set disable_out_projection=True)")
        # A static state (stored) pattern enters the Hopfield space as it is, so it must have
        # hidden_size features, while its LayerNorm (hflayers sizes it with input_size,
        # resp. stored_pattern_size) wants that size: with both sizes fixed here and different,
        # every forward would fail inside layer_norm with a shape error naming neither argument.
        for static, nrm, size, what in (
                (core.query_as_static, self.norm_state_pattern, core.embed_dim,
                 ("state_pattern_as_static", "normalize_state_pattern", "input_size")),
                (core.key_as_static, self.norm_stored_pattern, core.kdim,
                 ("stored_pattern_as_static", "normalize_stored_pattern",
                  "stored_pattern_size (default input_size)"))):
            if static and nrm is not None and core.head_dim is not None and size != core.head_dim:
                raise ValueError(
                    f"{what[0]}=True takes patterns of hidden_size ({core.head_dim}) features, "
                    f"but {what[1]}=True normalises {what[2]} = {size} features: make "
                    f"hidden_size equal {what[2]}, or set {what[1]}=False (and its _affine)")
        heads = core.num_heads
        if scaling is None:
            scaling = 1.0 if core.static_execution else 1.0 / math.sqrt(core.head_dim)
        if isinstance(scaling, Tensor) and scaling.requires_grad:
            # hflayers multiplies the state by a tensor scaling, so a Parameter there trains;
            # pypaper's fused op takes beta per head as a constant. Refuse rather than silently
            # never update it.
            raise ValueError("scaling must not require grad: pypaper's retrieval takes beta as a "
                             "constant per head (a learnable beta is not supported); pass a float, "
                             "a per-head list or a tensor without requires_grad")
        betas = reference.per_head(scaling, heads, "scaling")
        if any(not (math.isfinite(b) and b > 0) for b in betas):
            raise ValueError(f"scaling must be positive and finite, got {scaling}")
        if update_steps_max is not None:
            st = reference.per_head(update_steps_max, heads, "update_steps_max", int)
            if any(s < -1 for s in st):  # -1: this head unbounded (hflayers' "< 0", per head)
                raise ValueError(f"update_steps_max must be >= 0, -1 (unbounded) or None, got "
                                 f"{update_steps_max}")
        eps = reference.per_head(update_steps_eps, heads, "update_steps_eps")
        if any(not (math.isfinite(e) and e > 0) for e in eps):
            raise ValueError(f"update_steps_eps must be positive, got {update_steps_eps}")
        self.__scaling = scaling
        self.__batch_first = batch_first
        self.__update_steps_max = update_steps_max
        self.__update_steps_eps = update_steps_eps
        # The op's per-head constants as Python numbers, read once here. hflayers documents a
        # per-head tensor for scaling / update_steps_max / update_steps_eps; turning such a
        # tensor into numbers at every forward (Tensor.tolist) is a data-dependent read that
        # torch.compile(fullgraph=True) cannot trace. The values are constants of the layer
        # (a scaling that requires grad is refused above), so nothing is lost by reading them
        # here; the properties still return the arguments as given.
        self._op_beta = betas
        self._op_steps = None if update_steps_max is None else st
        self._op_eps = eps
        # hflayers resets here once more (after HopfieldCore's own reset): the same draws in the
        # same order, so that torch.manual_seed gives hflayers' initial weights.
        self.reset_parameters()

    def __setstate__(self, state):
        super().__setstate__(state)
        if "_op_beta" not in self.__dict__:  # a whole module pickled before these existed
            heads = self.association_core.num_heads
            steps = self.__update_steps_max
            self._op_beta = reference.per_head(self.__scaling, heads, "scaling")
            self._op_steps = (None if steps is None
                              else reference.per_head(steps, heads, "update_steps_max", int))
            self._op_eps = reference.per_head(self.__update_steps_eps, heads, "update_steps_eps")

    def reset_parameters(self) -> None:
        for m in (self.association_core, self.norm_stored_pattern, self.norm_state_pattern,
                  self.norm_pattern_projection):
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()

    # ---- the association ----------------------------------------------------------------------
    def _inputs(self, data: Data):
        if isinstance(data, Tensor):
            stored = state = proj = data
        elif isinstance(data, tuple) and len(data) == 3:
            stored, state, proj = data
        else:
            raise TypeError("input must be one tensor (stored pattern, state pattern and pattern "
                            "projection at once) or a tuple of three tensors")
        for name, t in (("stored pattern", stored), ("state pattern", state),
                        ("pattern projection", proj)):
            if not isinstance(t, Tensor) or t.dim() != 3:
                raise ValueError(f"the {name} must be a 3-d tensor, got "
                                 f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
        if not self.__batch_first:
            stored, state, proj = stored.transpose(0, 1), state.transpose(0, 1), proj.transpose(0, 1)
        core = self.association_core
        if stored.shape[0] != state.shape[0] or proj.shape[0] != state.shape[0]:
            raise ValueError("stored pattern, state pattern and pattern projection must share the "
                             "batch size")
        if stored.shape[1] != proj.shape[1]:
            raise ValueError(f"stored pattern ({stored.shape[1]}) and pattern projection "
                             f"({proj.shape[1]}) must hold the same number of patterns")
        exp_state = core.head_dim if core.query_as_static else core.embed_dim
        exp_stored = core.head_dim if core.key_as_static else core.kdim
        proj_name = "pattern projection (pattern_projection_size)"
        if (not core.value_as_static or self.norm_pattern_projection is not None or
                (core.value_as_connected and not core.key_as_static)):
            exp_proj = core.vdim  # projected, normalised or connected: sized by the constructor
        elif core.out_proj is not None:
            # static and unnormalised: it enters every head as it is, and the output projection
            # expects num_heads * pattern_size features (hflayers asserts this size up front)
            exp_proj = core.pattern_dim
            proj_name = ("pattern projection (pattern_size, as pattern_projection_as_static=True "
                         "feeds it to every head unprojected)")
        else:
            exp_proj = None
        for name, t, exp in (("state pattern (input_size)", state, exp_state),
                             ("stored pattern (stored_pattern_size)", stored, exp_stored),
                             (proj_name, proj, exp_proj)):
            if exp is not None and t.shape[2] != exp:
                raise ValueError(f"{name} has embedding size {t.shape[2]}, expected {exp}")
        if self.norm_stored_pattern is not None:
            stored = self.norm_stored_pattern(stored)
        if self.norm_state_pattern is not None:
            state = self.norm_state_pattern(state)
        if self.norm_pattern_projection is not None:
            proj = self.norm_pattern_projection(proj)
        return stored, state, proj

    def _prepare(self, data, stored_pattern_padding_mask, association_mask):
        core = self.association_core
        stored, state, proj = self._inputs(data)
        q, k, v = core.project(state, stored, proj)
        N, H, L = q.shape[0], q.shape[1], q.shape[2]
        S = k.shape[2]
        am, pm = association_mask, stored_pattern_padding_mask
        if am is not None:
            if not isinstance(am, Tensor):
                raise TypeError("association_mask must be a tensor")
            if am.dim() == 2:
                if tuple(am.shape) != (L, S):
                    raise ValueError(f"association_mask has shape {tuple(am.shape)}, expected "
                                     f"[L, S] = [{L}, {S}] or [N*num_heads, L, S]")
            elif am.dim() == 3:
                if tuple(am.shape) != (N * H, L, S):
                    raise ValueError(f"association_mask has shape {tuple(am.shape)}, expected "
                                     f"[N*num_heads, L, S] = [{N * H}, {L}, {S}] or [L, S]")
                am = am.reshape(N, H, L, S)
            else:
                raise ValueError(f"association_mask must have 2 or 3 dims, got {am.dim()}")
            if am.dtype not in (torch.bool, torch.uint8) and not am.is_floating_point():
                raise TypeError(f"association_mask must be bool, uint8 or float, got {am.dtype}")
            am = reference.additive_mask(am, q.dtype if q.dtype == torch.float64 else torch.float32)
        if pm is not None:
            if not isinstance(pm, Tensor):
                raise TypeError("stored_pattern_padding_mask must be a tensor")
            if tuple(pm.shape) != (N, S):
                raise ValueError(f"stored_pattern_padding_mask has shape {tuple(pm.shape)}, "
                                 f"expected [N, S] = [{N}, {S}]")
            if pm.dtype not in (torch.bool, torch.uint8) and not pm.is_floating_point():
                raise TypeError(f"stored_pattern_padding_mask must be bool, uint8 or float, got "
                                f"{pm.dtype}")
            pm = reference.additive_mask(pm, q.dtype if q.dtype == torch.float64 else torch.float32)
        extra = []
        if core.bias_k is not None:
            bk = core.bias_k.view(1, 1, H, -1).transpose(1, 2).expand(N, H, 1, -1)
            bv = core.bias_v.view(1, 1, H, -1).transpose(1, 2).expand(N, H, 1, -1)
            k = torch.cat([k, bk.to(k.dtype)], dim=2)
            v = torch.cat([v, bv.to(v.dtype)], dim=2)
            extra.append(1)
        if core.add_zero_attn:
            k = torch.cat([k, k.new_zeros(N, H, 1, k.shape[3])], dim=2)
            v = torch.cat([v, v.new_zeros(N, H, 1, v.shape[3])], dim=2)
            extra.append(1)
        if extra:
            pad = sum(extra)
            am = None if am is None else F.pad(am, [0, pad])
            pm = None if pm is None else F.pad(pm, [0, pad])
        return q, k, v, am, pm

    def _finish(self, out: Tensor) -> Tensor:
        core = self.association_core
        N, H, L, pd = out.shape
        out = out.transpose(1, 2).reshape(N, L, H * pd)
        if core.out_proj is not None:
            out = core.out_proj(out)
        if not self.__batch_first:
            out = out.transpose(0, 1)
        if self.association_activation is not None:
            out = self.association_activation(out)
        return out

    def forward(self, input: Data, stored_pattern_padding_mask: Optional[Tensor] = None,
                association_mask: Optional[Tensor] = None) -> Tensor:
        """Hopfield association of ``input``: one tensor used as stored pattern, state pattern and
        pattern projection, or the tuple (stored, state, pattern projection); [N, L|S, E] with
        batch_first (else [L|S, N, E]). stored_pattern_padding_mask: [N, S] (True / non-zero =
        padding); association_mask: [L, S] or [N*num_heads, L, S] (bool: True = masked; float:
        added)."""
        q, k, v, am, pm = self._prepare(input, stored_pattern_padding_mask, association_mask)
        core = self.association_core
        if core.dropout > 0.0 and self.training:
            out, _ = reference.retrieve(q, k, v, self._op_beta, self._op_steps,
                                        self._op_eps, am, pm, dropout_p=core.dropout,
                                        training=True)
        else:
            out = hopfield_retrieve(q, k, v, self._op_beta, self._op_steps, self._op_eps, am, pm)
        return self._finish(out)

    def get_association_matrix(self, input: Data, stored_pattern_padding_mask=None,
                               association_mask=None) -> Tensor:
        """The final association matrix softmax(beta xi K^T) per head, [N, H, L, S]
        (materialised on request only)."""
        with torch.no_grad():
            q, k, v, am, pm = self._prepare(input, stored_pattern_padding_mask, association_mask)
            return reference.retrieve(q, k, v, self._op_beta, self._op_steps, self._op_eps,
                                      am, pm,
                                      return_associations=True)[2]

    def get_projected_pattern_matrix(self, input: Data, stored_pattern_padding_mask=None,
                                     association_mask=None) -> Tensor:
        """The projected pattern matrix (values in the Hopfield space), [N, H, S, pattern_size]."""
        with torch.no_grad():
            return self._prepare(input, stored_pattern_padding_mask, association_mask)[2]

    # ---- hflayers' properties -----------------------------------------------------------------
    @property
    def batch_first(self) -> bool:
        return self.__batch_first

    @property
    def scaling(self):
        return self.__scaling.clone() if isinstance(self.__scaling, Tensor) else self.__scaling

    @property
    def stored_pattern_dim(self):
        return self.association_core.kdim

    @property
    def state_pattern_dim(self):
        return self.association_core.embed_dim

    @property
    def pattern_projection_dim(self):
        return self.association_core.vdim

    @property
    def input_size(self):
        return self.state_pattern_dim

    @property
    def hidden_size(self):
        return self.association_core.head_dim

    @property
    def output_size(self):
        return self.association_core.out_dim

    @property
    def pattern_size(self):
        return self.association_core.pattern_dim

    @property
    def update_steps_max(self):
        u = self.__update_steps_max
        return u.clone() if isinstance(u, Tensor) else u

    @property
    def update_steps_eps(self):
        u = self.__update_steps_eps
        return u.clone() if isinstance(u, Tensor) else u

    @property
    def stored_pattern_as_static(self) -> bool:
        return self.association_core.key_as_static

    @property
    def state_pattern_as_static(self) -> bool:
        return self.association_core.query_as_static

    @property
    def pattern_projection_as_static(self) -> bool:
        return self.association_core.value_as_static

    @property
    def normalize_stored_pattern(self) -> bool:
        return self.norm_stored_pattern is not None

    @property
    def normalize_stored_pattern_affine(self) -> bool:
        return self.normalize_stored_pattern and self.norm_stored_pattern.elementwise_affine

    @property
    def normalize_state_pattern(self) -> bool:
        return self.norm_state_pattern is not None

    @property
    def normalize_state_pattern_affine(self) -> bool:
        return self.normalize_state_pattern and self.norm_state_pattern.elementwise_affine

    @property
    def normalize_pattern_projection(self) -> bool:
        return self.norm_pattern_projection is not None

    @property
    def normalize_pattern_projection_affine(self) -> bool:
        return self.normalize_pattern_projection and self.norm_pattern_projection.elementwise_affine

    @property
    def normalize_hopfield_space(self) -> bool:
        return self.association_core.normalize_pattern

    @property
    def normalize_hopfield_space_affine(self) -> bool:
        return self.association_core.normalize_pattern_affine


_HOPFIELD_ARGS = ("hidden_size", "output_size", "pattern_size", "num_heads", "scaling",
                  "update_steps_max", "update_steps_eps", "normalize_stored_pattern",
                  "normalize_stored_pattern_affine", "normalize_state_pattern",
                  "normalize_state_pattern_affine", "normalize_pattern_projection",
                  "normalize_pattern_projection_affine", "normalize_hopfield_space",
                  "normalize_hopfield_space_affine", "stored_pattern_as_static",
                  "state_pattern_as_static", "pattern_projection_as_static",
                  "pattern_projection_as_connected", "stored_pattern_size",
                  "pattern_projection_size", "batch_first", "association_activation", "dropout",
                  "input_bias", "concat_bias_pattern", "add_zero_association",
                  "disable_out_projection")


class _Wrapper(nn.Module):
    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("hopfield",):
                raise
            hop = super().__getattr__("hopfield")
            if name in _HOPFIELD_PROPS:
                return getattr(hop, name)
            raise

    @property
    def quantity(self) -> int:
        return self._quantity


_HOPFIELD_PROPS = {"batch_first", "scaling", "stored_pattern_dim", "state_pattern_dim",
                   "pattern_projection_dim", "input_size", "hidden_size", "output_size",
                   "pattern_size", "update_steps_max", "update_steps_eps",
                   "stored_pattern_as_static", "state_pattern_as_static",
                   "pattern_projection_as_static", "normalize_stored_pattern",
                   "normalize_stored_pattern_affine", "normalize_state_pattern",
                   "normalize_state_pattern_affine", "normalize_pattern_projection",
                   "normalize_pattern_projection_affine", "normalize_hopfield_space",
                   "normalize_hopfield_space_affine"}


class HopfieldPooling(_Wrapper):
    """Hopfield-based pooling: ``quantity`` trainable state patterns (queries) retrieve from the
    input (hflayers.HopfieldPooling's interface). Output [N, quantity * output_size]."""

    def __init__(self, input_size: int, hidden_size: Optional[int] = None,
                 output_size: Optional[int] = None, pattern_size: Optional[int] = None,
                 num_heads: int = 1, scaling=None, update_steps_max=0, update_steps_eps=1e-4,
                 normalize_stored_pattern: bool = True, normalize_stored_pattern_affine: bool = True,
                 normalize_state_pattern: bool = True, normalize_state_pattern_affine: bool = True,
                 normalize_pattern_projection: bool = True,
                 normalize_pattern_projection_affine: bool = True,
                 normalize_hopfield_space: bool = False,
                 normalize_hopfield_space_affine: bool = False,
                 stored_pattern_as_static: bool = False, state_pattern_as_static: bool = False,
                 pattern_projection_as_static: bool = False,
                 pattern_projection_as_connected: bool = False,
                 stored_pattern_size: Optional[int] = None,
                 pattern_projection_size: Optional[int] = None, batch_first: bool = True,
                 association_activation: Optional[str] = None, dropout: float = 0.0,
                 input_bias: bool = True, concat_bias_pattern: bool = False,
                 add_zero_association: bool = False, disable_out_projection: bool = False,
                 quantity: int = 1, trainable: bool = True):
        super().__init__()
        loc = dict(locals())
        quantity = _size(quantity, "quantity", optional=False)
        self.hopfield = Hopfield(input_size=input_size, **{a: loc[a] for a in _HOPFIELD_ARGS})
        self._quantity = quantity
        size = self.hopfield.hidden_size if state_pattern_as_static else self.hopfield.input_size
        self.pooling_weights = Parameter(torch.empty(
            *((1, quantity) if batch_first else (quantity, 1)),
            input_size if size is None else size), requires_grad=trainable)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.hopfield.reset_parameters()
        nn.init.normal_(self.pooling_weights, mean=0.0, std=0.02)

    def _prepare_input(self, input):
        if isinstance(input, Tensor):
            stored, proj = input, input
        elif isinstance(input, tuple) and len(input) == 2:
            stored, proj = input
        else:
            raise TypeError("input must be one tensor (stored pattern and pattern projection) or "
                            "a tuple of two tensors")
        n = stored.shape[0 if self.batch_first else 1]
        shape = (n, self._quantity) if self.batch_first else (self._quantity, n)
        return stored, self.pooling_weights.expand(*shape, self.pooling_weights.shape[2]), proj

    def forward(self, input, stored_pattern_padding_mask=None, association_mask=None) -> Tensor:
        return self.hopfield(self._prepare_input(input), stored_pattern_padding_mask,
                             association_mask).flatten(start_dim=1)

    def get_association_matrix(self, input, stored_pattern_padding_mask=None,
                               association_mask=None) -> Tensor:
        return self.hopfield.get_association_matrix(self._prepare_input(input),
                                                    stored_pattern_padding_mask, association_mask)

    def get_projected_pattern_matrix(self, input, stored_pattern_padding_mask=None,
                                     association_mask=None) -> Tensor:
        return self.hopfield.get_projected_pattern_matrix(
            self._prepare_input(input), stored_pattern_padding_mask, association_mask)


class HopfieldLayer(_Wrapper):
    """Hopfield-based lookup: the input (state patterns) retrieves from ``quantity`` trainable
    stored patterns (and optional separate targets) (hflayers.HopfieldLayer's interface)."""

    def __init__(self, input_size: int, hidden_size: Optional[int] = None,
                 output_size: Optional[int] = None, pattern_size: Optional[int] = None,
                 num_heads: int = 1, scaling=None, update_steps_max=0, update_steps_eps=1e-4,
                 lookup_weights_as_separated: bool = False,
                 lookup_targets_as_trainable: bool = True,
                 normalize_stored_pattern: bool = True, normalize_stored_pattern_affine: bool = True,
                 normalize_state_pattern: bool = True, normalize_state_pattern_affine: bool = True,
                 normalize_pattern_projection: bool = True,
                 normalize_pattern_projection_affine: bool = True,
                 normalize_hopfield_space: bool = False,
                 normalize_hopfield_space_affine: bool = False,
                 stored_pattern_as_static: bool = False, state_pattern_as_static: bool = False,
                 pattern_projection_as_static: bool = False,
                 pattern_projection_as_connected: bool = False,
                 stored_pattern_size: Optional[int] = None,
                 pattern_projection_size: Optional[int] = None, batch_first: bool = True,
                 association_activation: Optional[str] = None, dropout: float = 0.0,
                 input_bias: bool = True, concat_bias_pattern: bool = False,
                 add_zero_association: bool = False, disable_out_projection: bool = False,
                 quantity: int = 1, trainable: bool = True):
        super().__init__()
        loc = dict(locals())
        quantity = _size(quantity, "quantity", optional=False)
        self.hopfield = Hopfield(input_size=input_size, **{a: loc[a] for a in _HOPFIELD_ARGS})
        self._quantity = quantity
        size = (self.hopfield.hidden_size if stored_pattern_as_static
                else self.hopfield.stored_pattern_dim)
        lead = (1, quantity) if batch_first else (quantity, 1)
        self.lookup_weights = Parameter(torch.empty(*lead, input_size if size is None else size),
                                        requires_grad=trainable)
        if lookup_weights_as_separated:
            tsize = (self.lookup_weights.shape[2] if pattern_projection_size is None
                     else pattern_projection_size)
            self.target_weights = Parameter(torch.empty(*lead, tsize),
                                            requires_grad=lookup_targets_as_trainable)
        else:
            self.register_parameter("target_weights", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.hopfield.reset_parameters()
        nn.init.normal_(self.lookup_weights, mean=0.0, std=0.02)
        if self.target_weights is not None:
            nn.init.normal_(self.target_weights, mean=0.0, std=0.02)

    def _prepare_input(self, input: Tensor):
        if not isinstance(input, Tensor):
            raise TypeError("input must be a tensor")
        n = input.shape[0 if self.batch_first else 1]
        shape = (n, self._quantity) if self.batch_first else (self._quantity, n)
        stored = self.lookup_weights.expand(*shape, self.lookup_weights.shape[2])
        proj = stored if self.target_weights is None else self.target_weights.expand(
            *shape, self.target_weights.shape[2])
        return stored, input, proj

    def forward(self, input, stored_pattern_padding_mask=None, association_mask=None) -> Tensor:
        return self.hopfield(self._prepare_input(input), stored_pattern_padding_mask,
                             association_mask)

    def get_association_matrix(self, input, stored_pattern_padding_mask=None,
                               association_mask=None) -> Tensor:
        return self.hopfield.get_association_matrix(self._prepare_input(input),
                                                    stored_pattern_padding_mask, association_mask)

    def get_projected_pattern_matrix(self, input, stored_pattern_padding_mask=None,
                                     association_mask=None) -> Tensor:
        return self.hopfield.get_projected_pattern_matrix(
            self._prepare_input(input), stored_pattern_padding_mask, association_mask)
