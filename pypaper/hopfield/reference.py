"""Plain-PyTorch references of the modern Hopfield layers: the semantics every kernel reproduces.

Ramsauer et al., "Hopfield Networks is All You Need" (ICLR 2021). The retrieval update of a
modern continuous Hopfield network with stored patterns K (rows), state xi and inverse temperature
beta is xi <- softmax(beta xi K^T) K; hflayers (github ml-jku/hopfield-layers) runs it per head:

    P_0 = softmax(beta q K^T + M)
    while the head is active:   xi_{n+1} = P_n K,   P_{n+1} = softmax(beta xi_{n+1} K^T + M)
    out = dropout(P_N) V

A head is active after step n while n < update_steps_max (or the limit is None / -1) and, from
the second softmax on, max over the batch of ||P_n - P_{n-1}||_F (Frobenius over the L x S
association matrix) > update_steps_eps. ``update_steps_max = 0`` is one softmax (attention).

Two references live here:
  * ``retrieve``: the loop above on head-split tensors, materialising every P_n as hflayers
    does (it is the benchmark's "plain loop" provider and the op's test reference);
  * ``hopfield_core_forward``: hflayers' whole functional (projections, statics, Hopfield-space
    normalisation, bias / zero patterns, masks, loop, output projection) written independently
    of pypaper's layers, in hflayers' sequence-first layout, for the layer tests.
Where hflayers has bugs the documented behaviour is implemented (see ``HFLAYERS_FIXES``).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

# Documented behaviour where hflayers' code deviates (pypaper follows the documentation):
HFLAYERS_FIXES = {
    "concat_bias_pattern": "hflayers creates bias_k / bias_v but its test `key_as_static is None` "
                           "is never true for a bool, so the bias patterns are silently never "
                           "concatenated; pypaper appends them to the stored patterns and pattern "
                           "projections (and pads the masks), as the parameter is documented",
    "uint8 masks": "hflayers warns via an unimported `warnings` module (NameError) for uint8 masks; "
                   "pypaper treats them as bool masks (non-zero = masked), as documented",
    "per-head scaling": "hflayers multiplies the hidden vector by scaling.repeat(D / H), i.e. "
                        "element j by scaling[j % H] (interleaved, not per head); pypaper scales "
                        "head h by scaling[h] as documented ('one entry per head')",
    "static patterns": "hflayers repeats a static pattern along the batch axis "
                       "(x.repeat(1, num_heads, 1) on [L, N, d]), so with num_heads > 1 and a "
                       "batch > 1 head h of item n meets another item's patterns; pypaper repeats "
                       "it per head within its own batch item",
    "hopfield-space affine": "hflayers sizes p_norm_weight with the hidden_size argument (None "
                             "by default: a crash); pypaper uses the head dimension",
}


def per_head(value, heads: int, name: str, kind=float) -> list:
    """A scalar or one value per head (list, tuple or 1-d tensor) as a list of length heads."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            return [kind(value.item())] * heads
        if value.dim() != 1 or value.numel() != heads:
            raise ValueError(f"{name} must be a number or hold one entry per head ({heads}), "
                             f"got shape {tuple(value.shape)}")
        return [kind(x) for x in value.tolist()]
    if isinstance(value, (list, tuple)):
        if len(value) != heads:
            raise ValueError(f"{name} must be a number or hold one entry per head ({heads}), got "
                             f"{len(value)} entries")
        return [kind(x) for x in value]
    return [kind(value)] * heads


def additive_mask(mask: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """bool / uint8 (True or non-zero = masked) -> 0 / -inf; float masks are added as they are."""
    if mask is None:
        return None
    if mask.dtype in (torch.bool, torch.uint8):
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            mask.bool(), float("-inf"))
    return mask.to(dtype)


def retrieve(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta, steps, eps,
             attn_mask: Optional[torch.Tensor] = None, pad_mask: Optional[torch.Tensor] = None,
             dropout_p: float = 0.0, training: bool = False, return_associations: bool = False,
             math_dtype: Optional[torch.dtype] = None):
    """The materialising update loop on head-split tensors.

    q [B, H, L, d], k [B, H, S, d], v [B, H, S, dv]; beta, steps (None / -1: unbounded), eps: a
    number or one per head; attn_mask broadcastable to [B, H, L, S] and pad_mask [B, S] (bool
    or uint8: True = masked; float: added). Math in ``math_dtype`` (default: q's dtype).
    Returns (out [B, H, L, dv], nsteps [H] int64) and, with return_associations, the final
    association matrix P [B, H, L, S].
    """
    B, H, L, _ = q.shape
    in_dtype = q.dtype
    mdt = math_dtype or in_dtype
    q, k, v = q.to(mdt), k.to(mdt), v.to(mdt)
    betas = torch.tensor(per_head(beta, H, "beta"), dtype=mdt, device=q.device).view(1, H, 1, 1)
    st = per_head(-1 if steps is None else steps, H, "steps", int)
    limit = torch.tensor(st, device=q.device)
    epss = torch.tensor(per_head(eps, H, "eps"), dtype=torch.float64, device=q.device)
    am = additive_mask(attn_mask, mdt)
    pm = additive_mask(pad_mask, mdt)
    mask = None
    if am is not None:
        mask = am
    if pm is not None:
        pm = pm.view(pm.shape[0], 1, 1, pm.shape[1])
        mask = pm if mask is None else mask + pm
    # The loop runs until no head is active. With finite limits it never runs more than
    # max(limits) + 1 softmaxes, and every per-head decision is a tensor (torch.where), so under
    # torch.compile and torch.func transforms (vmap: each sample converges on its own) the loop
    # runs to that bound with no data-dependent branch: the layers' dropout path and
    # get_association_matrix trace with fullgraph=True and vmap. Plain eager mode still stops
    # as soon as every head has converged (the same result: a stopped head's P and xi are kept).
    finite = all(s_ >= 0 for s_ in st)
    unroll = finite and (torch.compiler.is_compiling() or
                         torch._C._functorch.maybe_current_level() is not None)
    xi, p_old = q, None
    nsteps = torch.zeros(H, dtype=torch.long, device=q.device)
    active = torch.ones(H, dtype=torch.bool, device=q.device)
    n = 0
    while True:
        s = torch.matmul(xi * betas, k.transpose(-1, -2))
        if mask is not None:
            s = s + mask
        p_new = torch.softmax(s, dim=-1)
        p = p_new if p_old is None else torch.where(active.view(1, H, 1, 1), p_new, p_old)
        nsteps = torch.where(active, torch.full_like(nsteps, n), nsteps)
        with torch.no_grad():
            act = active & ((n < limit) | (limit < 0))
            if p_old is not None and B > 0:
                # hflayers: max over the batch of ||P_n - P_{n-1}||_F > eps
                change = (p_old - p).double().flatten(2).norm(dim=-1).amax(dim=0)
                act = act & (change > epss)  # out of place: under vmap change is per sample
            elif p_old is not None:  # an empty batch changes nothing: its heads stop (fused op)
                act = torch.zeros_like(act)
        n += 1
        if finite and n > max(st, default=0):
            break  # every limit reached: act is all False
        if not unroll and not bool(act.any()):
            break
        xi = torch.where(act.view(1, H, 1, 1), torch.matmul(p, k), xi)
        p_old, active = p, act
    out = torch.matmul(F.dropout(p, p=dropout_p, training=training), v).to(in_dtype)
    if return_associations:
        return out, nsteps, p.to(in_dtype)
    return out, nsteps


def _layer_norm(x, dim, weight, bias, eps):
    return F.layer_norm(x.reshape(-1, dim), (dim,), weight, bias, eps).reshape(x.shape)


def hopfield_core_forward(query, key, value, *, num_heads: int, head_dim: int, pattern_dim: int,
                          q_proj_weight=None, k_proj_weight=None, v_proj_weight=None,
                          in_proj_bias=None, bias_k=None, bias_v=None, add_zero_attn=False,
                          out_proj_weight=None, out_proj_bias=None,
                          key_as_static=False, query_as_static=False, value_as_static=False,
                          value_as_connected=False, normalize_pattern=False,
                          normalize_pattern_eps=1e-5, p_norm_weight=None, p_norm_bias=None,
                          scaling: Union[float, Sequence[float], torch.Tensor] = 1.0,
                          update_steps_max=0, update_steps_eps=1e-4,
                          key_padding_mask=None, attn_mask=None, dropout_p=0.0, training=False):
    """hflayers' hopfield_core_forward (sequence-first: query [L, N, E], key/value [S, N, *]).

    The in-projection weights are given split (q/k/v_proj_weight; None for a static pattern);
    in_proj_bias holds the q, k, v parts in that order, the q/k parts only for non-static
    patterns. Returns (output [L, N, out], raw associations [N, H, L, S], projected values
    [N, H, S, pattern_dim]). The loop materialises every association matrix.
    """
    tgt_len, bsz = query.shape[0], query.shape[1]
    hd = num_heads * head_dim
    off = 0
    if query_as_static:
        q = query.repeat(1, 1, num_heads)
    else:
        q = F.linear(query, q_proj_weight, None if in_proj_bias is None else in_proj_bias[:hd])
        off = hd
    v_in = value
    if key_as_static:
        k = key.repeat(1, 1, num_heads)
        kb = None
    else:
        kb = None if in_proj_bias is None else in_proj_bias[off:off + hd]
        k = F.linear(key, k_proj_weight, kb)
        if value_as_connected:
            v_in = F.linear(value, k_proj_weight, kb)
        off += hd
    if value_as_static:
        v = v_in if (value_as_connected and not key_as_static) else v_in.repeat(1, 1, num_heads)
    else:
        v = F.linear(v_in, v_proj_weight, None if in_proj_bias is None else in_proj_bias[off:])
    if normalize_pattern:
        q = _layer_norm(q.reshape(tgt_len, bsz * num_heads, head_dim), head_dim, p_norm_weight,
                        p_norm_bias, normalize_pattern_eps).reshape(q.shape)
        k = _layer_norm(k.reshape(k.shape[0], bsz * num_heads, head_dim), head_dim,
                        p_norm_weight, p_norm_bias, normalize_pattern_eps).reshape(k.shape)
    am = additive_mask(attn_mask, q.dtype)
    pm = additive_mask(key_padding_mask, q.dtype)
    if bias_k is not None:
        k = torch.cat([k, bias_k.repeat(1, bsz, 1)])
        v = torch.cat([v, bias_v.repeat(1, bsz, 1)])
        am = None if am is None else F.pad(am, [0, 1])
        pm = None if pm is None else F.pad(pm, [0, 1])
    # head split: [L, N, H*d] -> [N*H, L, d] (index n*H + h, hflayers' order)
    q = q.contiguous().view(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
    k = k.contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)
    v = v.contiguous().view(v.shape[0], bsz * num_heads, -1).transpose(0, 1)
    if add_zero_attn:
        k = torch.cat([k, k.new_zeros(k.shape[0], 1, k.shape[2])], dim=1)
        v = torch.cat([v, v.new_zeros(v.shape[0], 1, v.shape[2])], dim=1)
        am = None if am is None else F.pad(am, [0, 1])
        pm = None if pm is None else F.pad(pm, [0, 1])
    src_len = k.shape[1]
    if am is not None and am.dim() == 3:
        am = am.view(bsz, num_heads, tgt_len, src_len)
    out, _, p = retrieve(q.view(bsz, num_heads, tgt_len, head_dim),
                         k.view(bsz, num_heads, src_len, head_dim),
                         v.view(bsz, num_heads, src_len, v.shape[-1]),
                         scaling, update_steps_max, update_steps_eps, am, pm,
                         dropout_p=dropout_p, training=training, return_associations=True)
    out = out.view(bsz * num_heads, tgt_len, -1).transpose(0, 1).reshape(tgt_len, bsz, -1)
    if out_proj_weight is not None:
        out = F.linear(out, out_proj_weight, out_proj_bias)
    return out, p, v.view(bsz, num_heads, src_len, -1)


def sdpa_chain(q, k, v, beta: float, steps: int):
    """The same fixed number of update steps chained through torch's fused attention
    (scaled_dot_product_attention): the benchmark's SDPA provider (no convergence check)."""
    xi = q
    for _ in range(steps):
        xi = F.scaled_dot_product_attention(xi, k, k, scale=beta)
    return F.scaled_dot_product_attention(xi, k, v, scale=beta)


def default_beta(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
