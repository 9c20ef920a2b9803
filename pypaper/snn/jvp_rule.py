"""Forward-mode AD of the fused LIF op (torch.autograd.forward_ad, torch.func.jvp, jacfwd).

The tangent of the T-step recurrence of kernels/common/snn_math.h, carried forward in time next
to the primal values (math in fp32, fp64 for fp64 inputs, as the kernels compute). With k the
decay as a rate (k = 1/tau where the op divides by tau: dk = -dtau / tau^2), Vr the reset
potential (0 in the charge of a soft reset), dr = 0 under detach_reset (S leaves the reset term)
else 1, sg = sigma'(H - Vth) the surrogate derivative the backward uses, and dV[-1] the tangent of
v_init (0 when there is none):

    charge   decay_input:  dH = (1 - k) dV[t-1] + k dX + (X - (V[t-1] - Vr)) dk
             otherwise:    dH = (1 - k) dV[t-1] + dX - (V[t-1] - Vr) dk
             SLTT (Meng et al., ICCV 2023): V[t-1] enters the charge detached, no (1 - k) dV term
    fire     dS = sg (dH - dVth)
    reset    hard:         dV = (1 - S) dH + dr (Vr - H) dS
             soft:         dV = dH - S dVth - dr Vth dS

This is the Jacobian whose transpose the backward op applies (lif_backward), so a jvp and a vjp
of the same call satisfy <J v, u> = <v, J^T u>: tests/snn/test_lif_jvp.py checks that and
jacfwd against jacrev. The tangents come from one fused pass: on CPU tensors the C++ loop
(pypaper::lif_forward_jvp, kernels/cpu/snn_jvp_cpu.h), on GPU tensors and for the Triton twin the
Triton kernel (pypaper::lif_forward_jvp_triton, pypaper/snn/triton_kernels.py); where neither runs,
and under jacfwd's vmap, from `composite`, T steps of torch ops (the reference's speed). The
primal outputs come from the op's own kernel either way.
"""
from __future__ import annotations

import torch
from torch._functorch import pyfunctorch as _pyfunctorch

from .. import _autograd, _ext
from . import op_flags, reference


def _fusable(tensors) -> bool:
    """Whether a fused tangent kernel may take the call: no graph to build over the tangents
    (``tensors``: the inputs and tangents; the kernels have no backward, the composite has) and
    no vmap active (under jacfwd's vmap the composite runs all tangents in one batched pass,
    where a kernel would run once per tangent)."""
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad
                                       for t in tensors):
        return False
    interpreters = _pyfunctorch.retrieve_all_functorch_interpreters()
    if any(i.key() == _pyfunctorch.TransformType.Vmap for i in interpreters):
        return False
    # Reverse mode over the jvp as a torch.func transform (grad / jacrev / vjp of a function that
    # calls torch.func.jvp: reverse-over-forward): the tensors are wrapped for the grad level,
    # where requires_grad above does not show, and a kernel's tangents would reach that level's
    # backward as lif_forward_jvp's, which has none (NotImplementedError, naming the very
    # jacrev the caller used). The composite's torch ops are differentiable there.
    grads = {i.level() for i in interpreters if i.key() == _pyfunctorch.TransformType.Grad}
    return not (grads and any(isinstance(t, torch.Tensor) and _autograd.wrapped_at(t, grads)
                              for t in tensors))


_TRITON_OK: dict = {}


def _triton_jvp(device: torch.device) -> bool:
    """Whether the Triton tangent kernel (pypaper::lif_forward_jvp_triton) runs on ``device``
    (the C++ CUDA op has no tangent kernel of its own); asked once per device."""
    ok = _TRITON_OK.get(device)
    if ok is None:
        from . import ops

        ok = _TRITON_OK[device] = ops._triton_reason(device) is None
    return ok


def _fused_op(x, tensors, triton_rule: bool):
    """The fused tangent op for this call, or None (the composite): the Triton kernel for the
    Triton twin's rule and for GPU tensors where Triton runs, the C++ loop for CPU tensors."""
    if not _fusable(tensors):
        return None
    if triton_rule or x.device.type == "cuda":
        return torch.ops.pypaper.lif_forward_jvp_triton if _triton_jvp(x.device) else None
    if x.device.type == "cpu" and _ext.LOADED:
        return torch.ops.pypaper.lif_forward_jvp
    return None


def _rule(triton_rule: bool):
    def lif_forward_jvp(inputs, tangents):
        """register_jvp rule of lif_forward (and its Triton twin): tangents of (spikes, v_last,
        h_seq, v_seq); h_seq is non-differentiable (None), v_seq empty unless stored."""
        x, v_init, decay, vth, v_reset, sid, alpha, flags = inputs
        dx, dv0, ddecay, dvth = tangents[:4]
        op = _fused_op(x, (x, v_init, decay, vth) + tuple(tangents[:4]), triton_rule)
        if op is not None:
            ds, dv_last, dv_seq = op(x, dx, v_init, dv0, decay, ddecay, vth, dvth, v_reset, sid,
                                     alpha, flags & ~op_flags.KEEP_H)
            return ds, dv_last, None, dv_seq
        return composite(inputs, tangents)

    return lif_forward_jvp


def composite(inputs, tangents):
    """The rule in torch ops (any device, and under vmap): T steps of [N] tensors."""
    x, v_init, decay, vth, v_reset, sid, alpha, flags = inputs
    dx, dv0, ddecay, dvth = tangents[:4]
    decay_input = bool(flags & op_flags.DECAY_INPUT)
    div = bool(flags & op_flags.DECAY_IS_TAU)
    dr = 0.0 if flags & op_flags.DETACH_RESET else 1.0
    sltt = bool(flags & op_flags.SLTT)
    store_v_seq = bool(flags & op_flags.STORE_V_SEQ)
    hard = v_reset is not None
    vr = float(v_reset) if hard else 0.0
    mdt = reference.default_math_dtype(x.dtype)
    xm = x.to(mdt)
    # one value in any shape of numel 1 (as the kernels take it) as shape (): its dims would
    # broadcast into the state's
    one = reference.one_value
    decay = one(decay).to(mdt)
    vth = one(vth).to(mdt)
    k = 1.0 / decay if div else decay
    dk = None
    if ddecay is not None:
        dk = -one(ddecay).to(mdt) / (decay * decay) if div else one(ddecay).to(mdt)
    dvth = None if dvth is None else one(dvth).to(mdt)
    shape = x.shape[1:]
    v = v_init.to(mdt) if v_init is not None else torch.full(shape, vr, dtype=mdt, device=x.device)
    dv = dv0.to(mdt) if dv0 is not None else torch.zeros(shape, dtype=mdt, device=x.device)
    ds_seq, dv_seq = [], []
    steps = x.shape[0]
    xs = xm.unbind(0)  # not xm[t]: see reference.lif_multi_step
    dxs = dx.to(mdt).unbind(0) if dx is not None else (None,) * steps
    for xt, dxt in zip(xs, dxs):
        # the primal step, in the kernels' operation order (the same S to the bit)
        # (reverse mode over these tangents, jacrev(jacfwd), differentiates the primal too: it
        # is the reference's, with the surrogate at the spike, SLTT's detached V[t-1] and
        # detach_reset's detached S, so that derivative is the reference's second one)
        vp = v.detach() if sltt else v
        if decay_input:
            d = xt - (vp - vr)
            h = vp + (d / decay if div else d * decay)
            dh = k * dxt if dxt is not None else torch.zeros_like(h)
        else:
            d = vp - vr
            h = vp - (d / decay if div else d * decay) + xt
            dh = dxt if dxt is not None else torch.zeros_like(h)
            d = -d
        if not sltt:
            dh = dh + (1.0 - k) * dv
        if dk is not None:
            dh = dh + d * dk
        z = h - vth
        s = reference.spike(z, sid, alpha)
        sr = s.detach() if dr == 0.0 else s
        sg = reference.surrogate_grad(z, sid, alpha)
        ds = sg * (dh if dvth is None else dh - dvth)
        if hard:
            v = sr * vr + (1.0 - sr) * h
            dv = (1.0 - sr) * dh
            if dr != 0.0:  # absent when the reset is detached (inf * 0 = NaN otherwise)
                dv = dv + (vr - h) * ds
        else:
            v = h - sr * vth
            dv = dh - dr * vth * ds
            if dvth is not None:
                dv = dv - sr * dvth
        ds_seq.append(ds)
        if store_v_seq:
            dv_seq.append(dv)
    out = x.dtype
    d_spikes = torch.stack(ds_seq).to(out) if ds_seq else torch.zeros_like(x)
    d_v_seq = x.new_zeros((0,))  # the op's empty v_seq
    if store_v_seq:
        d_v_seq = torch.stack(dv_seq).to(out) if dv_seq else torch.zeros_like(x)
    return d_spikes, dv.to(out), None, d_v_seq


def _fake_lif_forward_jvp(x, x_tangent, v_init, v_init_tangent, decay, decay_tangent,
                          v_threshold, v_threshold_tangent, v_reset, surrogate, alpha, flags):
    torch._check(x.dim() >= 2, lambda: "x must have shape [T, N, *]")
    v_seq = (torch.empty_like(x, memory_format=torch.contiguous_format)
             if flags & op_flags.STORE_V_SEQ else x.new_empty((0,)))
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(x.shape[1:]), v_seq


_NO_BACKWARD = ("it computes forward-mode tangents of lif_forward; reverse mode over them is not "
                "supported (differentiate the LIF op with torch.func.jacrev / backward instead)")


def register_native() -> None:
    """Fake kernel and autograd of the C++ tangent op (its outputs are tangents: differentiate
    the LIF op itself, not them)."""
    torch.library.register_fake("pypaper::lif_forward_jvp")(_fake_lif_forward_jvp)
    _autograd.register_no_backward("pypaper::lif_forward_jvp", _NO_BACKWARD)


def register_triton() -> None:
    """Autograd of the Triton tangent op (its fake kernel is triton_op's)."""
    _autograd.register_no_backward("pypaper::lif_forward_jvp_triton", _NO_BACKWARD)


def register(suffix: str = "") -> None:
    """The jvp rule of pypaper::lif_forward{suffix} (after its register_autograd)."""
    _autograd.register_jvp(f"pypaper::lif_forward{suffix}", _rule(suffix == "_triton"))
