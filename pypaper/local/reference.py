"""Plain-PyTorch references of pypaper.local's fused local-loss ops (unfused: each step a separate
torch op, the gradients by autograd on the loss).

Every ``*_loss`` function builds the unfused loss as a differentiable function of the parameters
(what the tests differentiate with autograd and what the benchmark times as "reference"); every
op-shaped function returns what the fused op returns: (output detached, loss, grad_weight,
grad_bias), computed from that loss with ``torch.autograd.grad``.

Math dtype: fp32 for fp32/bf16/fp16 inputs, fp64 for fp64 (the losses are returned in it).
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

ACTIVATIONS = {"sigmoid": 0, "tanh": 1, "relu": 2}


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _act(z: torch.Tensor, activation: int) -> torch.Tensor:
    if activation == 0:
        return torch.sigmoid(z)
    if activation == 1:
        return torch.tanh(z)
    return torch.relu(z)


def ff_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x_hat = x / (||x||_2 + eps), row by row (the norm along the last dim; Hinton's FF layer
    normalisation: it removes the goodness of the previous layer, so each layer must find new
    features)."""
    return x / (x.norm(dim=-1, keepdim=True) + eps)


def ff_forward(x, weight, bias, normalize=True, eps=1e-4):
    """h = ReLU(x_hat W^T + b), in x's dtype."""
    xin = ff_normalize(x, eps) if normalize else x
    return torch.relu(F.linear(xin, weight, bias))


def ff_loss(x, weight, bias, num_pos, threshold, normalize=True, eps=1e-4):
    """Forward-Forward (Hinton 2022): rows [0, num_pos) of x are positive data, the rest negative;
    g = sum_j h_j^2, loss = mean_pos softplus(threshold - g) + mean_neg softplus(g - threshold).
    Returns (loss, h)."""
    h = ff_forward(x, weight, bias, normalize, eps)
    g = h.to(math_dtype(x.dtype)).pow(2).sum(1)
    pos, neg = g[:num_pos], g[num_pos:]
    loss = g.new_zeros(())
    if pos.numel():
        loss = loss + F.softplus(threshold - pos).mean()
    if neg.numel():
        loss = loss + F.softplus(neg - threshold).mean()
    return loss, h


def ff_sf_loss(x, class_x, weight, bias, y, normalize=True, eps=1e-4, temperature=1.0):
    """Single-forward FF with class embeddings (Park et al., ForwardGNN, ICLR 2024, "SF"): the
    class inputs go through the same layer, E = ReLU(class_x_hat W^T + b); each row is scored by
    its similarity to every class embedding, logits = h E^T / temperature, and the loss is the
    cross-entropy with the label - no negative data. Returns (loss, h, E)."""
    h = ff_forward(x, weight, bias, normalize, eps)
    e = ff_forward(class_x, weight, bias, normalize, eps)
    mdt = math_dtype(x.dtype)
    logits = h.to(mdt) @ e.to(mdt).t() / temperature
    loss = F.cross_entropy(logits, y) if x.shape[0] else logits.new_zeros(())
    return loss, h, e


def tp_target(proj: torch.Tensor, y: torch.Tensor, sign: bool = False) -> torch.Tensor:
    """t = P onehot(y) = the label's column of P, as a row gather of proj = P^T [C, out]."""
    t = proj[y]
    return torch.sign(t) if sign else t


def tp_loss(x, weight, bias, proj, y, activation=0, sign=False):
    """Target projection (tpSGD, Lomnitz et al., "Learning with Local Gradients at the Edge",
    2022): h = act(x W^T + b), loss = 1/(2N) sum_rows ||h - P onehot(y)||^2. Returns (loss, h)."""
    mdt = math_dtype(x.dtype)
    h = _act(F.linear(x, weight, bias), activation)
    t = tp_target(proj.to(mdt), y, sign)
    n = max(x.shape[0], 1)
    loss = 0.5 * (h.to(mdt) - t).pow(2).sum() / n
    return loss, h


def head_loss(feat, weight, bias, y):
    """Local head of a block: global average pool over feat's spatial dims, linear, cross-entropy.
    Returns (loss, logits, pooled)."""
    mdt = math_dtype(feat.dtype)
    pooled = feat.to(mdt).flatten(2).mean(2) if feat.dim() > 2 else feat.to(mdt)
    logits = F.linear(pooled, weight.to(mdt), None if bias is None else bias.to(mdt))
    loss = F.cross_entropy(logits, y) if feat.shape[0] else logits.new_zeros(())
    return loss, logits, pooled


# ---- op-shaped references (what the fused ops return) -----------------------------------------

def _param_grads(loss, weight, bias):
    params = [weight] + ([bias] if bias is not None else [])
    if not loss.requires_grad:  # no rows: the loss is a constant 0
        grads = [None] * len(params)
    else:
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    gw = grads[0] if grads[0] is not None else torch.zeros_like(weight)
    if bias is None:
        gb = weight.new_empty((0,))
    else:
        gb = grads[1] if grads[1] is not None else torch.zeros_like(bias)
    return gw, gb


def _leaf(t):
    return None if t is None else t.detach().requires_grad_(True)


def ff_linear(x, weight, bias, num_pos, threshold, normalize=True, eps=1e-4):
    """Reference of local_ff_linear: (h, loss, grad_weight, grad_bias)."""
    w, b = _leaf(weight), _leaf(bias)
    with torch.enable_grad():
        loss, h = ff_loss(x.detach(), w, b, num_pos, threshold, normalize, eps)
        gw, gb = _param_grads(loss, w, b)
    return h.detach(), loss.detach(), gw, gb


def ff_sf_linear(x, class_x, weight, bias, y, normalize=True, eps=1e-4, temperature=1.0):
    """Reference of local_ff_sf_linear: (h, E, loss, grad_weight, grad_bias)."""
    w, b = _leaf(weight), _leaf(bias)
    with torch.enable_grad():
        loss, h, e = ff_sf_loss(x.detach(), class_x.detach(), w, b, y, normalize, eps,
                                temperature)
        gw, gb = _param_grads(loss, w, b)
    return h.detach(), e.detach(), loss.detach(), gw, gb


def tp_linear(x, weight, bias, proj, y, activation=0, sign=False):
    """Reference of local_tp_linear: (h, loss, grad_weight, grad_bias)."""
    w, b = _leaf(weight), _leaf(bias)
    with torch.enable_grad():
        loss, h = tp_loss(x.detach(), w, b, proj, y, activation, sign)
        gw, gb = _param_grads(loss, w, b)
    return h.detach(), loss.detach(), gw, gb


def local_head(feat, weight, bias, y):
    """Reference of local_head: (loss, logits, grad_pooled, grad_weight, grad_bias)."""
    w, b = _leaf(weight), _leaf(bias)
    mdt = math_dtype(feat.dtype)
    pooled_leaf = None
    with torch.enable_grad():
        pooled = (feat.detach().to(mdt).flatten(2).mean(2) if feat.dim() > 2
                  else feat.detach().to(mdt))
        pooled_leaf = pooled.detach().requires_grad_(True)
        logits = F.linear(pooled_leaf, w.to(mdt), None if b is None else b.to(mdt))
        loss = (F.cross_entropy(logits, y) if feat.shape[0]
                else logits.sum() * 0)
        params = [pooled_leaf, w] + ([b] if b is not None else [])
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    gp = grads[0] if grads[0] is not None else torch.zeros_like(pooled_leaf)
    gw = grads[1] if grads[1] is not None else torch.zeros_like(weight)
    gb = (weight.new_empty((0,)) if b is None
          else (grads[2] if grads[2] is not None else torch.zeros_like(bias)))
    return loss.detach(), logits.detach(), gp, gw, gb
