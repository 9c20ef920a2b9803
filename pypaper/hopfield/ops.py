"""The fused modern-Hopfield retrieval op: ``hopfield_retrieve``.

Ramsauer et al., "Hopfield Networks is All You Need" (ICLR 2021). Checks its arguments (errors
name the argument), picks a backend (pypaper/_backend.py) and calls torch.ops.pypaper.
hopfield_retrieve (C++ on CPU), its Triton twin (pypaper/hopfield/triton_kernels.py) or the
plain-PyTorch loop (pypaper/hopfield/reference.py). Fake kernels and autograd: _registration.py.

Default backends, by device: CPU -> the C++ kernel, then the reference; CUDA -> a CUDA kernel
when one is registered, then Triton, then the reference.
"""
from __future__ import annotations

import importlib.util
import math
import numbers
from typing import Optional

import torch

from .. import _backend
from .._numbers import is_finite
from . import reference

_DEFAULT_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}
_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


_KERNELS = _backend.kernel_table("pypaper::hopfield_retrieve")  # probed once (_backend.has_kernel)


def _has_kernel(dispatch_key: str) -> bool:
    return _KERNELS[dispatch_key]


def _cpu_reason(device):
    why = _backend.native_reason(device, "cpu")
    if why is None and not _has_kernel("CPU"):
        why = "pypaper._C has no CPU kernel for pypaper::hopfield_retrieve"
    return why


def _cuda_reason(device):
    why = _backend.native_reason(device, "cuda")
    if why is None and not _has_kernel("CUDA"):
        why = "pypaper._C has no CUDA kernel for pypaper::hopfield_retrieve"
    return why


def _triton_reason(device):
    if importlib.util.find_spec("pypaper.hopfield.triton_kernels") is None:
        return "there is no Triton kernel for hopfield_retrieve"
    from . import _registration

    ok, why = _registration.load_triton().triton_available(device)
    return None if ok else why


_REASONS = {"cpu": _cpu_reason, "cuda": _cuda_reason, "triton": _triton_reason}


def backend_for(x: torch.Tensor) -> str:
    """The backend hopfield_retrieve would use for x now."""
    return _backend.select(x.device, _DEFAULT_ORDER.get(x.device.type, ("reference",)), _REASONS)


def _values(value, heads: int, name: str, kind):
    """A number or one value per head as a list (errors name the argument)."""
    try:
        return reference.per_head(value, heads, name, kind)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ValueError) and name in str(exc):
            raise
        raise TypeError(f"{name} must be a number or one per head, got {value!r}") from None


def _check_tensor(t, name: str, dims: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        raise TypeError(f"{name} must be a floating tensor (float32, float64, float16 or "
                        f"bfloat16), got {t.dtype}")
    if t.dim() != dims:
        raise ValueError(f"{name} must have shape [B, H, L|S, d] (4 dims), got shape "
                         f"{tuple(t.shape)}")


def normalize_masks(attn_mask, pad_mask, B, H, L, S, dtype, device):
    """attn_mask (up to 4 dims, broadcastable to [B, H, L, S]; hflayers' 3-d [B*H, L, S] too) and
    pad_mask ([B, S]) as additive float tensors (bool / uint8: True = masked -> -inf)."""
    am = pm = None
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"mask must be a tensor, got {type(attn_mask).__name__}")
        if attn_mask.dtype not in _FLOATS + (torch.bool, torch.uint8):
            raise TypeError(f"mask must be bool, uint8 or float, got {attn_mask.dtype}")
        m = attn_mask
        if m.dim() == 3 and m.shape[0] == B * H and B * H != 1:
            m = m.reshape(B, H, m.shape[1], m.shape[2])
        if m.dim() > 4:
            raise ValueError(f"mask must have at most 4 dims, got shape {tuple(m.shape)}")
        m = m.reshape((1,) * (4 - m.dim()) + tuple(m.shape))
        full = (B, H, L, S)
        if any(a not in (1, b) for a, b in zip(m.shape, full)):
            raise ValueError(f"mask has shape {tuple(attn_mask.shape)}, expected one "
                             f"broadcastable to [B, H, L, S] = {list(full)} (or [B*H, L, S])")
        if m.device != device:
            raise ValueError(f"mask is on {m.device} but q is on {device}")
        am = reference.additive_mask(m, dtype)
    if pad_mask is not None:
        if not isinstance(pad_mask, torch.Tensor):
            raise TypeError(f"pad_mask must be a tensor, got {type(pad_mask).__name__}")
        if pad_mask.dtype not in _FLOATS + (torch.bool, torch.uint8):
            raise TypeError(f"pad_mask must be bool, uint8 or float, got {pad_mask.dtype}")
        if tuple(pad_mask.shape) != (B, S):
            raise ValueError(f"pad_mask has shape {tuple(pad_mask.shape)}, expected [B, S] = "
                             f"[{B}, {S}]")
        if pad_mask.device != device:
            raise ValueError(f"pad_mask is on {pad_mask.device} but q is on {device}")
        pm = reference.additive_mask(pad_mask, dtype)
    return am, pm


def hopfield_retrieve(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta=None, steps=0,
                      eps=1e-4, mask: Optional[torch.Tensor] = None,
                      pad_mask: Optional[torch.Tensor] = None, *, return_steps: bool = False):
    """Modern Hopfield retrieval, all update steps and the final projection in one op.

    Ramsauer et al., "Hopfield Networks is All You Need" (ICLR 2021), per head h::

        P_0 = softmax(beta_h q K^T + M),   xi_{n+1} = P_n K,   P_{n+1} = softmax(beta_h xi_{n+1} K^T + M)
        out = P_N V

    A head updates while n < steps_h (None / -1: no limit) and, from its second softmax on,
    max over the batch of ||P_n - P_{n-1}||_F > eps_h (hflayers' rule; steps = 0 is one softmax,
    i.e. attention); a NaN change (a fully masked row anywhere in the batch) stops the head, as
    in hflayers. The check runs inside the op. Softmaxes are online over tiles of S (fp32
    math for fp32 / bf16 / fp16 inputs, fp64 for fp64); the backward recomputes every P_n from
    the saved states, so autograd keeps O(steps L d) per head, never the L x S matrix.

    Args:
        q: [B, H, L, d] state patterns; k: [B, H, S, d] stored patterns; v: [B, H, S, dv].
        beta: scaling, a number or one per head (default 1/sqrt(d)); > 0; a constant (a tensor
            that requires grad is refused: no gradient reaches it).
        steps: update_steps_max, an int >= 0, None / -1 (until converged), or one per head.
        eps: update_steps_eps >= 0, a number or one per head.
        mask: association mask broadcastable to [B, H, L, S] (or hflayers' [B*H, L, S]): bool /
            uint8 (True = masked) or float (added to the scores).
        pad_mask: stored-pattern padding mask [B, S] (bool: True = padding, or float).
            A float mask or pad_mask that requires grad (a learned additive term) runs the
            materialising plain loop, which gives it its gradient; the kernels take masks as
            constants.
        return_steps: also return the number of updates each head ran ([H] int64).

    Returns out [B, H, L, dv] in q's dtype (and nsteps).
    """
    _check_tensor(q, "q", 4)
    _check_tensor(k, "k", 4)
    _check_tensor(v, "v", 4)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"k and v must have q's dtype {q.dtype}, got {k.dtype} and {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError("q, k and v must be on one device")
    B, H, L, d = q.shape
    if tuple(k.shape[:2]) != (B, H) or tuple(v.shape[:2]) != (B, H):
        raise ValueError(f"q, k and v must share [B, H], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[3] != d:
        raise ValueError(f"k has pattern size {k.shape[3]} but q has {d} (embedding sizes must "
                         "match)")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"v has {v.shape[2]} rows but k has {k.shape[2]} stored patterns")
    S = k.shape[2]
    if beta is None:
        beta = 1.0 / math.sqrt(d) if d > 0 else 1.0
    if isinstance(beta, torch.Tensor) and beta.requires_grad and torch.is_grad_enabled():
        # beta reaches the kernels as numbers: a learnable beta would silently never get a
        # gradient (the layers refuse a scaling that requires grad for the same reason)
        raise ValueError("beta must not require grad: hopfield_retrieve takes beta per head as "
                         "a constant (no gradient for it); pass a number, a list or a detached "
                         "tensor")
    betas = _values(beta, H, "beta", float)
    if any(not (is_finite(b) and b > 0) for b in betas):
        raise ValueError(f"beta must be positive and finite, got {betas}")
    if steps is None:
        steps = -1
    elif isinstance(steps, (list, tuple)):  # None for a head: until converged, as for all heads
        steps = [-1 if s is None else s for s in steps]
    if isinstance(steps, bool) or (isinstance(steps, numbers.Real) and
                                   not isinstance(steps, numbers.Integral)):
        raise TypeError(f"steps must be an int, None or one int per head, got {steps!r}")
    stepl = _values(steps, H, "steps", int)
    if any(s < -1 for s in stepl):
        raise ValueError(f"steps must be >= 0 (None or -1: until converged), got {stepl}")
    epsl = _values(eps, H, "eps", float)
    if any(not (is_finite(e) and e >= 0) for e in epsl):
        raise ValueError(f"eps must be finite and >= 0, got {epsl}")
    mdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    am, pm = normalize_masks(mask, pad_mask, B, H, L, S, mdt, q.device)
    if torch.is_grad_enabled() and any(m is not None and m.requires_grad for m in (am, pm)):
        # A float mask that requires grad is a learned additive term of the scores (hflayers
        # adds it to beta xi K^T, and nn.MultiheadAttention likewise, so both train it:
        # dL/dM = sum over the steps n of dL/dS_n). The fused kernels take the masks as
        # constants, so such a call runs the differentiable plain loop instead of dropping
        # the mask's gradient.
        want = _backend.requested()
        if want not in (None, "reference"):
            raise _backend.BackendUnavailable(
                f"backend {want!r} was requested but cannot run: its kernels take mask / "
                "pad_mask as constants, and a mask here requires grad (use the reference "
                "backend, or detach the mask)")
        backend = "reference"
    else:
        backend = backend_for(q)
    if backend == "reference":
        out, nsteps = reference.retrieve(q, k, v, betas, stepl, epsl, am, pm, math_dtype=mdt)
    else:
        op = (torch.ops.pypaper.hopfield_retrieve_triton if backend == "triton"
              else torch.ops.pypaper.hopfield_retrieve)
        out, _, _, nsteps = op(q, k, v, betas, stepl, epsl, am, pm)
    return (out, nsteps) if return_steps else out
