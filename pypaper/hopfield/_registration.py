"""Fake kernels and autograd of the hopfield retrieval op, registered once at import.

The fake kernel gives shapes without computing, so the op traces under
torch.compile(fullgraph=True): with finite step limits the saved states have max(steps) slots
(a head that converges early leaves its later slots unused); an unbounded head (steps = -1)
makes that size data-dependent. The autograd backward is itself an op
(hopfield_retrieve_backward). What autograd keeps: q, k, v (the inputs), out, the states
xi_1..xi_n ([n, B, H, L, d], math dtype) and the row log-sum-exps ([n + 1, B, H, L]): O(steps L d)
per head, never O(L S).
"""
from __future__ import annotations

import torch

from .. import _autograd
from . import vmap_rule


def _math(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake_retrieve(q, k, v, beta, steps, eps, attn_mask=None, pad_mask=None):
    torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4,
                 lambda: "q, k, v must have shape [B, H, L|S, d]")
    torch._check(k.shape[3] == q.shape[3], lambda: "k's pattern size must equal q's")
    torch._check(v.shape[2] == k.shape[2], lambda: "v must have one row per stored pattern")
    B, H, L, d = q.shape
    if all(s >= 0 for s in steps):
        n = max(steps)
    else:
        n = torch.library.get_ctx().new_dynamic_size()
    mdt = _math(q.dtype)
    out = q.new_empty((B, H, L, v.shape[3]))
    states = q.new_empty((n, B, H, L, d), dtype=mdt)
    lse = q.new_empty((n + 1, B, H, L), dtype=mdt)
    nsteps = q.new_empty((H,), dtype=torch.long)
    return out, states, lse, nsteps


def _fake_retrieve_backward(grad_out, q, k, v, out, states, lse, nsteps, beta, attn_mask,
                            pad_mask):
    c = torch.contiguous_format
    return (torch.empty_like(q, memory_format=c), torch.empty_like(k, memory_format=c),
            torch.empty_like(v, memory_format=c))


def _setup(ctx, inputs, output):
    q, k, v, beta, steps, eps, attn_mask, pad_mask = inputs
    out, states, lse, nsteps = output
    ctx.mark_non_differentiable(states, lse, nsteps)
    # The non-differentiable outputs reach the backward as None, not as zero tensors (the per-step
    # states are [steps, B, H, L, d]: a zero fill of their size per backward for nothing).
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, k, v, out, states, lse, nsteps, attn_mask, pad_mask)
    ctx.beta = beta


def _make_backward(backward_op):
    def backward(ctx, g_out, g_states, g_lse, g_nsteps):
        q, k, v, out, states, lse, nsteps, attn_mask, pad_mask = ctx.saved_tensors
        if any(ctx.needs_input_grad[6:8]):  # (trailing None masks may be left off the call)
            # the kernels' backward has no dM: refuse rather than leave a mask without gradient
            raise RuntimeError(
                "pypaper::hopfield_retrieve has no gradient for attn_mask / pad_mask; call "
                "pypaper.ops.hopfield_retrieve (a mask that requires grad runs the reference "
                "loop there) or detach the mask")
        if g_out is None:
            g_out = torch.zeros_like(out)
        gq, gk, gv = backward_op(g_out.contiguous(), q, k, v, out, states, lse, nsteps, ctx.beta,
                                 attn_mask, pad_mask)
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        return (gq if need_q else None, gk if need_k else None, gv if need_v else None,
                None, None, None, None, None)

    return backward


def _no_double_backward(ctx, *grads):
    raise RuntimeError("pypaper's hopfield_retrieve has no double backward (create_graph=True); "
                       "use the reference backend for higher-order gradients")


def _setup_nothing(ctx, inputs, output):
    pass


def register_native() -> None:
    torch.library.register_fake("pypaper::hopfield_retrieve")(_fake_retrieve)
    torch.library.register_fake("pypaper::hopfield_retrieve_backward")(_fake_retrieve_backward)
    _autograd.register_autograd("pypaper::hopfield_retrieve",
                                _make_backward(torch.ops.pypaper.hopfield_retrieve_backward),
                                setup_context=_setup)
    _autograd.register_autograd("pypaper::hopfield_retrieve_backward", _no_double_backward,
                                setup_context=_setup_nothing)
    vmap_rule.register()


_triton_module = None


def load_triton():
    """Imports pypaper/hopfield/triton_kernels.py once (its triton_ops register themselves) and
    registers their autograd with the same backward; returns the module."""
    global _triton_module
    if _triton_module is None:
        from . import triton_kernels

        if getattr(triton_kernels, "HAVE_TRITON", False):
            # the ops build small device constants from their list arguments: explicit fake
            # kernels (the same as the C++ op's) instead of tracing them under fake tensors
            triton_kernels.hopfield_retrieve_triton.register_fake(_fake_retrieve)
            triton_kernels.hopfield_retrieve_backward_triton.register_fake(
                _fake_retrieve_backward)
            _autograd.register_autograd(
                "pypaper::hopfield_retrieve_triton",
                _make_backward(torch.ops.pypaper.hopfield_retrieve_backward_triton),
                setup_context=_setup)
            _autograd.register_autograd("pypaper::hopfield_retrieve_backward_triton",
                                        _no_double_backward, setup_context=_setup_nothing)
            vmap_rule.register("_triton")
        _triton_module = triton_kernels
    return _triton_module
