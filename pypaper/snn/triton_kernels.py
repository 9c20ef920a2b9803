"""Triton twins of the fused multi-step LIF ops, as ``torch.library.triton_op`` ops.

Ops (the signatures of csrc/schemas.cpp's lif_forward / lif_backward, so backend selection in
ops.py can pick either; autograd is registered by _registration.load_triton; flags: the bools as
bits, pypaper/snn/op_flags.py):

    pypaper::lif_forward_triton(x, v_init, decay, v_threshold, v_reset, surrogate, alpha, flags)
        -> (spikes, v_last, h_seq, v_seq)
    pypaper::lif_backward_triton(grad_spikes, grad_v_last, grad_v_seq, h_seq, v_init, decay,
                                 v_threshold, v_reset, surrogate, alpha, flags)
        -> (grad_x, grad_v_init, grad_decay, grad_v_threshold)
    pypaper::lif_forward_jvp_triton(x, x_tangent, v_init, v_init_tangent, decay, decay_tangent,
                                    v_threshold, v_threshold_tangent, v_reset, surrogate, alpha,
                                    flags) -> (spikes_tangent, v_last_tangent, v_seq_tangent)
        (forward-mode tangents, csrc/schemas.cpp's lif_forward_jvp; the jvp rule of
        pypaper/snn/jvp_rule.py calls it for GPU tensors)

The backward reads a kept H: the recompute flag (rerun the forward from x) is the C++ op's only.

Math: kernels/common/snn_math.h, written again here in the same operation order (SpikingJelly's
LIFNode / ParametricLIFNode; PLIF: Fang et al., ICCV 2021; SLTT: Meng et al., ICCV 2023):

    H[t] = V + (X - (V - Vr)) / tau   (decay_input; "* k" when decay_is_tau is False)
         = V - (V - Vr) / tau + X     (otherwise)
    S[t] = Theta(H - Vth)             V[t] = S Vr + (1 - S) H  (hard)  or  H - S Vth  (soft)

and the reverse scan gH = gS sg + gV dV/dH, gX = gH dH/dX, gV[t-1] = gH dH/dV (0 under SLTT),
gVth += -gS sg + gV dV/dVth, gk += gH dH/dk with V[t-1] recomputed from the stored H[t-1].

Kernels: a program owns BLOCK consecutive neurons (of the N = numel(x.shape[1:]) of a step) and
runs the whole time loop over them (a dynamic loop over T), the membrane / carried gradient in
registers; every step loads and stores one contiguous BLOCK-row of the [T, N] tensors. A
per-neuron parameter (shape x.shape[2:]) is loaded once per neuron at index n % F.

Exactness (spikes, H, V bit for bit with the C++ op): math in fp32 (fp64 for fp64 storage);
on NVIDIA every product and quotient is one PTX instruction (mul.rn / div.rn via inline asm:
Triton would contract a*b+c into an FMA, and its fp32 `/` is the approximate div.full); the sums
cannot be contracted once no product is visible to LLVM. 16-bit tensors travel as int16 bit
patterns: widened exactly, rounded to nearest even by integer arithmetic (bf16, as the CPU's
store_val: NaN -> 0x7FC0) or by the fp16 conversion, and a stored 16-bit H that would cross the
threshold takes the neighbour on the spike's side (kernels/cpu/snn_cpu.h's store_h). Scalars
(v_reset, alpha) are passed as their float bits, so fp64 math gets them unrounded (Triton passes
a Python float as fp32). The backward's surrogate exp is Triton's (interpreter: numpy's), so the
gradients of the Sigmoid, PiecewiseExp and Erf surrogates differ from the C++ op's (a polynomial
exp) by a few ulp; the others match it to the bit (parameter sums up to summation order).
"""
import math
import struct
from typing import Optional

import torch

from .._autograd import fresh_output
from .._triton import HAVE_TRITON, tl, triton, triton_available  # noqa: F401
from . import op_flags

__all__ = ["HAVE_TRITON", "triton_available", "block_for", "num_warps_for"]

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_NUM_SURROGATES = 8


# ---- launch heuristics (pure functions) ----------------------------------------------------------

# A program's neurons: up to 1024 (4 per thread with 8 warps: 16-byte fp32 accesses), so a large
# layer runs few, long programs; the CPU interpreter then also runs few, large numpy steps.
_MAX_BLOCK = 1024
_MIN_BLOCK = 16
# Below this the block is not shrunk further to spread a small layer over the SMs.
_SPREAD_MIN_BLOCK = 128


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def block_for(neurons: int, sms: int = 0) -> int:
    """Neurons per program: the power of two covering ``neurons``, in [16, 1024]. The scan is T
    dependent steps per neuron, so a GPU needs every SM busy: with ``sms`` > 0 the block halves
    (down to 128) until there are at least two programs per SM."""
    b = max(_MIN_BLOCK, min(_pow2(neurons), _MAX_BLOCK))
    while sms > 0 and b > _SPREAD_MIN_BLOCK and -(-neurons // b) < 2 * sms:
        b //= 2
    return b


def num_warps_for(block: int) -> int:
    """One neuron per thread up to 256 neurons (2-4 warps), then 8 warps with 2-4 neurons each."""
    return max(1, min(8, block // 64))


def _needs_int64(steps: int, neurons: int, block: int) -> bool:
    """int64 offsets when t * N + n of a (masked) lane of the padded grid could pass int32."""
    padded = -(-neurons // block) * block
    return max(steps, 1) * padded + padded >= 2**31


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    return torch.cuda.get_device_properties(device).multi_processor_count


# ---- host-side checks (the messages of csrc/snn/snn_args.h) --------------------------------------

def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_x(x: torch.Tensor, name: str = "x") -> None:
    if x.dtype not in _FLOATS:
        raise TypeError(f"{name} must be a float32, float64, float16 or bfloat16 tensor, got "
                        f"{x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"{name} must have shape [T, N, *] (at least 2 dims), got {x.dim()} dims")


def _check_state(v, x: torch.Tensor, name: str) -> None:
    if v is None:
        return
    if v.device != x.device:
        raise ValueError(f"{name} is on {v.device} but x is on {x.device}")
    if v.dtype != x.dtype:
        raise TypeError(f"{name} has dtype {v.dtype} but x has dtype {x.dtype}")
    if tuple(v.shape) != tuple(x.shape[1:]):
        raise ValueError(f"{name} has shape {tuple(v.shape)}, expected x.shape[1:] = "
                         f"{tuple(x.shape[1:])}")


def _check_like(g: torch.Tensor, h: torch.Tensor, name: str) -> None:
    if g.shape != h.shape or g.dtype != h.dtype or g.device != h.device:
        raise ValueError(f"{name} must match h_seq in shape, dtype and device")


def _check_scalars(surrogate: int, alpha: float, v_reset) -> None:
    if not 0 <= surrogate < _NUM_SURROGATES:
        raise ValueError(f"surrogate must be an id in [0, {_NUM_SURROGATES}), got {surrogate}")
    if not (alpha > 0 and alpha != float("inf")):
        raise ValueError(f"alpha must be positive and finite, got {alpha}")
    if v_reset is not None and not abs(v_reset) < float("inf"):
        raise ValueError(f"v_reset must be finite or None, got {v_reset}")


def _param(p: torch.Tensor, x: torch.Tensor, name: str) -> tuple[torch.Tensor, int]:
    """(values in the math type, contiguous; period 1 or the feature count F)."""
    if p.device != x.device:
        raise ValueError(f"{name} is on {p.device} but x is on {x.device}")
    if not p.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {p.dtype}")
    feat = tuple(x.shape[2:])
    if p.numel() != 1 and tuple(p.shape) != feat:
        raise ValueError(f"{name} has shape {tuple(p.shape)}, expected one element or the "
                         f"feature shape x.shape[2:] = {feat}")
    period = 1
    if p.numel() != 1:
        for d in feat:
            period *= d
    return p.to(_math_dtype(x.dtype)).contiguous(), period


def _check_device(op: str, t: torch.Tensor) -> None:
    if t.device.type == "meta":
        return
    ok, why = triton_available(t.device)
    if not ok:
        raise RuntimeError(f"pypaper::{op}: {why} (got tensors on {t.device})")


def _scalar_bits(v: float, math_dtype: torch.dtype) -> int:
    """The bits of v rounded to the math type, as a signed integer kernel argument. A double
    beyond fp32's range rounds to +-inf, as the C++ and CUDA ops' float(v) does (struct raises
    OverflowError there; values that round to FLT_MAX pack as they are)."""
    if math_dtype == torch.float64:
        return struct.unpack("<q", struct.pack("<d", v))[0]
    try:
        packed = struct.pack("<f", v)
    except OverflowError:
        packed = struct.pack("<f", math.copysign(math.inf, v))
    return struct.unpack("<i", packed)[0]


def _storage_code(dtype: torch.dtype) -> int:
    """0: fp32 / fp64 stored as is; 1: fp16, 2: bf16 (both as int16 bit patterns)."""
    return {torch.float16: 1, torch.bfloat16: 2}.get(dtype, 0)


def _as_storage(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.dtype in (torch.float16, torch.bfloat16) else t


def _neurons(x: torch.Tensor) -> int:
    n = 1
    for d in x.shape[1:]:
        n *= d
    return n


def _finish_param_grad(param, period, neurons, mt, per_n, partial) -> torch.Tensor:
    """Per-neuron sums summed over the batch ([B, F] -> [F]), or the per-program fp64 partials
    added (then rounded to the math type, as the C++ op does); in the parameter's shape / dtype."""
    if neurons == 0:
        return torch.zeros(param.shape, dtype=param.dtype, device=param.device)
    if period > 1:
        g = per_n.view(neurons // period, period).sum(0)
    else:
        g = partial.sum().to(mt)
    return fresh_output(g, param.shape, param.dtype)  # not a view of g


if triton is not None:
    from .._triton import wrap_triton  # torch.library's; an interpreted kernel as it is

    from .._triton import triton_op  # torch.library's, plus its torch.func kernel

    # mul.rn / div.rn in inline PTX (one IEEE rounding, never contracted, no FTZ) and the
    # interpreter's tracing guard: shared with the quant kernels, one place for those tricks.
    from .._triton import _USE_RN, _launches, _mul, _ptx2

    # ---- device math -----------------------------------------------------------------------------

    @triton.jit
    def _div(a, b, USE_RN: tl.constexpr):
        if USE_RN:
            return _ptx2(a, b, "div")
        else:
            return a / b

    @triton.jit
    def _from_bits(bits, F64: tl.constexpr):
        """A scalar argument passed as the bits of its math-type value."""
        if F64:
            return bits.to(tl.int64).to(tl.float64, bitcast=True)
        else:
            return bits.to(tl.int32).to(tl.float32, bitcast=True)

    @triton.jit
    def _widen16(b, STORE: tl.constexpr):
        """fp32 value of 16-bit patterns b (uint32, low 16 bits): exact."""
        if STORE == 1:
            return b.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        else:
            return (b << 16).to(tl.float32, bitcast=True)

    @triton.jit
    def _round16(v, STORE: tl.constexpr):
        """16-bit pattern (uint32) of fp32 v rounded to nearest even; bf16 NaN -> 0x7FC0."""
        if STORE == 1:
            return v.to(tl.float16).to(tl.uint16, bitcast=True).to(tl.uint32)
        else:
            u = v.to(tl.uint32, bitcast=True)
            r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
            return tl.where((u & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, r).to(tl.uint32)

    @triton.jit
    def _load(ptrs, mask, MT: tl.constexpr, STORE: tl.constexpr):
        if STORE == 0:
            return tl.load(ptrs, mask=mask, other=0.0).to(MT)
        else:
            b = tl.load(ptrs, mask=mask, other=0).to(tl.uint16, bitcast=True).to(tl.uint32)
            return _widen16(b, STORE)

    @triton.jit
    def _store(ptrs, v, mask, STORE: tl.constexpr):
        if STORE == 0:
            tl.store(ptrs, v.to(ptrs.dtype.element_ty), mask=mask)
        else:
            tl.store(ptrs, _round16(v, STORE).to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)

    @triton.jit
    def _store_h(ptrs, h, s, th, mask, STORE: tl.constexpr):
        """H for the backward, which recomputes S = Theta(H - Vth) from it. 16 bits: rounded to
        nearest unless that crosses the threshold; then the neighbour on the spike's side (one
        more in magnitude away from zero, one less towards it, +-0 -> the smallest subnormal of
        the other sign)."""
        if STORE == 0:
            tl.store(ptrs, h, mask=mask)
        else:
            b = _round16(h, STORE)
            fired = (_widen16(b, STORE) - th) >= 0
            up = s > 0
            neg = (b & 0x8000) != 0
            zero = (b & 0x7FFF) == 0
            toward_zero = tl.where(zero, tl.where(up, 0x0001, 0x8001).to(tl.uint32), b - 1)
            nb = tl.where(up != neg, b + 1, toward_zero)
            out = tl.where(fired == up, b, nb)
            tl.store(ptrs, out.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)

    @triton.jit
    def _charge(v, x, k, vr, DI: tl.constexpr, DIV: tl.constexpr, USE_RN: tl.constexpr):
        """H from V[t-1] and X[t] (snn::charge): DIV divides by tau, else multiplies by k."""
        if DI:
            d = x - (v - vr)
            if DIV:
                return v + _div(d, k, USE_RN)
            else:
                return v + _mul(d, k, USE_RN)
        else:
            d = v - vr
            if DIV:
                return v - _div(d, k, USE_RN) + x
            else:  # k = 0: the IF neuron's V + X (an infinite V stays infinite, not inf * 0)
                return tl.where(k == 0, v + x, v - _mul(d, k, USE_RN) + x)

    @triton.jit
    def _fire(h, th):
        """Theta(H - Vth) as 0 / 1 in H's type (the test SpikingJelly makes: H - Vth >= 0)."""
        return tl.where((h - th) >= 0, 1.0, 0.0).to(h.dtype)

    @triton.jit
    def _reset(h, s, th, vr, HARD: tl.constexpr, USE_RN: tl.constexpr):
        """V[t] (snn::reset): hard S Vr + (1 - S) H, soft H - S Vth."""
        if HARD:
            return _mul(s, vr, USE_RN) + _mul(1.0 - s, h, USE_RN)
        else:
            return h - _mul(s, th, USE_RN)

    @triton.jit
    def _surrogate_grad(x, a, SURR: tl.constexpr, USE_RN: tl.constexpr):
        """sigma'(x) of surrogate SURR (snn::surrogate_grad, the same operation order). a / 2 is
        written a * 0.5 (the same value; Triton's fp32 `/` is not IEEE-rounded)."""
        one = tl.full(x.shape, 1.0, x.dtype)
        # Every _mul / _div gets a block operand (one * c): the PTX helpers need typed tensor
        # operands, and 1 * c is exact.
        if SURR == 0:  # Sigmoid: a s (1 - s) = a e / (1 + e)^2, e = exp(-a |x|) <= 1
            e = tl.exp(_mul(-a, tl.abs(x), USE_RN))
            d = 1.0 + e
            return _div(_mul(one * a, e, USE_RN), _mul(d, d, USE_RN), USE_RN)
        elif SURR == 1:  # ATan: (a/2) / (1 + (pi/2 a x)^2)
            z = _mul(_mul(one * 3.141592653589793, a * 0.5, USE_RN), x, USE_RN)
            return _div(one * (a * 0.5), 1.0 + _mul(z, z, USE_RN), USE_RN)
        elif SURR == 2:  # PiecewiseQuadratic: a - a^2 |x| for |x| <= 1/a
            ax = tl.abs(x)
            q = a - _mul(_mul(one * a, a, USE_RN), ax, USE_RN)
            return tl.where(ax > _div(one, a, USE_RN), 0.0, q).to(x.dtype)
        elif SURR == 3:  # PiecewiseExp: (a/2) exp(-a |x|)
            return _mul(one * (a * 0.5), tl.exp(_mul(-a, tl.abs(x), USE_RN)), USE_RN)
        elif SURR == 4:  # SoftSign: 1 / (2 a (1/a + |x|)^2)
            z = _div(one, a, USE_RN) + tl.abs(x)
            return _div(one, _mul(_mul(one * 2.0, a, USE_RN), _mul(z, z, USE_RN), USE_RN),
                        USE_RN)
        elif SURR == 5:  # SuperSpike: a / (1 + |x|)^2
            z = tl.abs(x) + 1.0
            return _div(one * a, _mul(z, z, USE_RN), USE_RN)
        elif SURR == 6:  # Erf: a / sqrt(pi) exp(-(a x)^2)
            z = _mul(x, a, USE_RN)
            return _mul(tl.exp(-_mul(z, z, USE_RN)),
                        _mul(one * a, one * 0.5641895835477563, USE_RN), USE_RN)
        else:  # Rect: a [|x| < 1/(2a)]
            return tl.where(tl.abs(x) < _div(one * 0.5, a, USE_RN), a, 0.0).to(x.dtype)

    # ---- kernels ---------------------------------------------------------------------------------
    # Not specialized: steps (a new T must not recompile; T == 1 would turn into a constexpr) and
    # the scalar bit patterns (values, not shapes). neurons is: N % 16 == 0 lets the row accesses
    # vectorize.

    @triton.jit
    def _neuron_block(neurons, IDX64: tl.constexpr, BLOCK: tl.constexpr):
        """This program's index, its BLOCK neurons (int64 where [T, N] offsets need it) and
        which of them exist."""
        pid = tl.program_id(0)
        if IDX64:
            pid = pid.to(tl.int64)
        n = pid * BLOCK + tl.arange(0, BLOCK)
        return pid, n, n < neurons

    @triton.jit(do_not_specialize=["steps", "vr_bits"])
    def _lif_forward_kernel(x_ptr, v0_ptr, decay_ptr, vth_ptr, s_ptr, h_ptr, vs_ptr, vl_ptr,
                            steps, neurons, decay_period, vth_period, vr_bits,
                            HAS_V0: tl.constexpr, STORE_V: tl.constexpr, KEEP_H: tl.constexpr,
                            DI: tl.constexpr, DIV: tl.constexpr, HARD: tl.constexpr,
                            STORE: tl.constexpr, F64: tl.constexpr, IDX64: tl.constexpr,
                            USE_RN: tl.constexpr, BLOCK: tl.constexpr):
        pid, n, mask = _neuron_block(neurons, IDX64, BLOCK)
        mt = decay_ptr.dtype.element_ty
        vr = _from_bits(vr_bits, F64)
        k = tl.load(decay_ptr + n % decay_period, mask=mask, other=1.0)
        th = tl.load(vth_ptr + n % vth_period, mask=mask, other=1.0)
        if HAS_V0:
            v = _load(v0_ptr + n, mask, mt, STORE)
        else:
            v = tl.zeros([BLOCK], dtype=mt) + vr
        off = n
        for _ in range(steps):
            h = _charge(v, _load(x_ptr + off, mask, mt, STORE), k, vr, DI, DIV, USE_RN)
            s = _fire(h, th)
            _store(s_ptr + off, s, mask, STORE)
            if KEEP_H:
                _store_h(h_ptr + off, h, s, th, mask, STORE)
            v = _reset(h, s, th, vr, HARD, USE_RN)
            if STORE_V:
                _store(vs_ptr + off, v, mask, STORE)
            off += neurons
        _store(vl_ptr + n, v, mask, STORE)

    @triton.jit(do_not_specialize=["steps", "vr_bits", "alpha_bits"])
    def _lif_backward_kernel(gs_ptr, gvl_ptr, gvs_ptr, h_ptr, v0_ptr, decay_ptr, vth_ptr, gx_ptr,
                             gv0_ptr, gk_ptr, gth_ptr, steps, neurons, decay_period, vth_period,
                             vr_bits, alpha_bits,
                             HAS_GVL: tl.constexpr, HAS_GVS: tl.constexpr, HAS_V0: tl.constexpr,
                             K_MODE: tl.constexpr, TH_MODE: tl.constexpr, DI: tl.constexpr,
                             DIV: tl.constexpr, HARD: tl.constexpr, DETACH: tl.constexpr,
                             SLTT: tl.constexpr, SURR: tl.constexpr, STORE: tl.constexpr,
                             F64: tl.constexpr, IDX64: tl.constexpr, USE_RN: tl.constexpr,
                             BLOCK: tl.constexpr):
        # K_MODE / TH_MODE: 0 gradient not needed, 1 one value per neuron into gk/gth_ptr[n],
        # 2 one fp64 partial sum per program into gk/gth_ptr[pid].
        pid, n, mask = _neuron_block(neurons, IDX64, BLOCK)
        mt = decay_ptr.dtype.element_ty
        vr = _from_bits(vr_bits, F64)
        alpha = _from_bits(alpha_bits, F64)
        dec = tl.load(decay_ptr + n % decay_period, mask=mask, other=1.0)
        th = tl.load(vth_ptr + n % vth_period, mask=mask, other=1.0)
        # snn::decay_coef: dH/dX = cx, dH/dV[t-1] = cv, dH/d(decay) = (H - V) ch + (V - Vr) cr.
        one = tl.full([BLOCK], 1.0, mt)
        if DIV:
            kk = _div(one, dec, USE_RN)
        else:
            kk = dec
        if DI:
            cx = kk
        else:
            cx = tl.full([BLOCK], 1.0, mt)
        if SLTT:
            cv = tl.zeros([BLOCK], dtype=mt)
        else:
            cv = 1.0 - kk
        if DI:
            if DIV:
                ch = _div(-one, dec, USE_RN)
            else:
                ch = _div(one, dec, USE_RN)
            cr = tl.zeros([BLOCK], dtype=mt)
        else:
            ch = tl.zeros([BLOCK], dtype=mt)
            if DIV:
                cr = _div(one, _mul(dec, dec, USE_RN), USE_RN)
            else:
                cr = tl.full([BLOCK], -1.0, mt)
        if DETACH:
            dr = tl.zeros([BLOCK], dtype=mt)
        else:
            dr = one
        if HAS_V0:
            vinit = _load(v0_ptr + n, mask, mt, STORE)
        else:
            vinit = tl.zeros([BLOCK], dtype=mt) + vr
        if HAS_GVL:
            carry = _load(gvl_ptr + n, mask, mt, STORE)  # dL/dV[T-1]
        else:
            carry = tl.zeros([BLOCK], dtype=mt)
        gk = tl.zeros([BLOCK], dtype=mt)
        gth = tl.zeros([BLOCK], dtype=mt)
        last = steps - 1
        if IDX64:
            last = last.to(tl.int64)
        off = last * neurons + n
        zero_i = tl.zeros([BLOCK], dtype=tl.int32)  # scalar conditions as block masks
        h = _load(h_ptr + off, mask & ((zero_i + steps) > 0), mt, STORE)
        for i in range(steps):
            t = steps - 1 - i
            first = (zero_i + t) == 0
            hp = _load(h_ptr + off - neurons, mask & (~first), mt, STORE)  # H[t-1], carried
            if HAS_GVS:
                carry += _load(gvs_ptr + off, mask, mt, STORE)
            xj = h - th
            s = tl.where(xj >= 0, 1.0, 0.0).to(mt)
            sg = _surrogate_grad(xj, alpha, SURR, USE_RN)
            gs_sg = _mul(_load(gs_ptr + off, mask, mt, STORE), sg, USE_RN)
            # snn::step_grad: gH and this step's dL/dVth.
            if HARD:
                # snn::step_grad: the detached reset's and a zero gV's terms are absent (no
                # inf * 0 = NaN from an infinite membrane)
                if DETACH:
                    rs = dr  # zeros
                else:
                    rs = _mul(vr - h, sg, USE_RN)  # (Vr - H) dS/dx
                has_gv = carry != 0
                gh = gs_sg + tl.where(has_gv, _mul(carry, (1.0 - s) + rs, USE_RN), 0.0)
                gth += -gs_sg - tl.where(has_gv, _mul(carry, rs, USE_RN), 0.0)
            else:
                ts = _mul(_mul(dr, th, USE_RN), sg, USE_RN)
                gh = gs_sg + _mul(carry, 1.0 - ts, USE_RN)
                gth += -gs_sg + _mul(carry, ts - s, USE_RN)
            _store(gx_ptr + off, _mul(gh, cx, USE_RN), mask, STORE)
            if K_MODE != 0:
                vp = tl.where(first, vinit, _reset(hp, _fire(hp, th), th, vr, HARD, USE_RN))
                gk += _mul(gh, _mul(h - vp, ch, USE_RN) + _mul(vp - vr, cr, USE_RN), USE_RN)
            carry = _mul(gh, cv, USE_RN)
            h = hp
            off -= neurons
        _store(gv0_ptr + n, carry, mask, STORE)
        if K_MODE == 1:
            tl.store(gk_ptr + n, gk, mask=mask)
        elif K_MODE == 2:
            tl.store(gk_ptr + pid, tl.sum(tl.where(mask, gk, 0.0).to(tl.float64), axis=0))
        if TH_MODE == 1:
            tl.store(gth_ptr + n, gth, mask=mask)
        elif TH_MODE == 2:
            tl.store(gth_ptr + pid, tl.sum(tl.where(mask, gth, 0.0).to(tl.float64), axis=0))

    @triton.jit(do_not_specialize=["steps", "vr_bits", "alpha_bits"])
    def _lif_jvp_kernel(x_ptr, dx_ptr, v0_ptr, dv0_ptr, decay_ptr, ddecay_ptr, vth_ptr, dvth_ptr,
                        ds_ptr, dvs_ptr, dvl_ptr, steps, neurons, decay_period, vth_period,
                        vr_bits, alpha_bits,
                        HAS_DX: tl.constexpr, HAS_V0: tl.constexpr, HAS_DV0: tl.constexpr,
                        HAS_DK: tl.constexpr, HAS_DTH: tl.constexpr, STORE_V: tl.constexpr,
                        DI: tl.constexpr, DIV: tl.constexpr, HARD: tl.constexpr,
                        DETACH: tl.constexpr, SLTT: tl.constexpr, SURR: tl.constexpr,
                        STORE: tl.constexpr, F64: tl.constexpr, IDX64: tl.constexpr,
                        USE_RN: tl.constexpr, BLOCK: tl.constexpr):
        # Forward-mode tangents next to the primal recurrence (kernels/cpu/snn_jvp_cpu.h's loop,
        # the same operations in the same order; the math in pypaper/snn/jvp_rule.py):
        #   dH = cx dX + cv dV[t-1] + ck dk,  dS = sg (dH - dVth),
        #   dV = (1 - S) dH + dr (Vr - H) dS (hard)  or  dH - S dVth - dr Vth dS (soft),
        # with k the rate (1/tau where the op divides), dk its tangent (-dtau / tau^2).
        pid, n, mask = _neuron_block(neurons, IDX64, BLOCK)
        mt = decay_ptr.dtype.element_ty
        vr = _from_bits(vr_bits, F64)
        alpha = _from_bits(alpha_bits, F64)
        dec = tl.load(decay_ptr + n % decay_period, mask=mask, other=1.0)
        th = tl.load(vth_ptr + n % vth_period, mask=mask, other=1.0)
        one = tl.full([BLOCK], 1.0, mt)
        zero = tl.zeros([BLOCK], dtype=mt)
        if DIV:
            rate = _div(one, dec, USE_RN)
        else:
            rate = dec
        if DI:
            cx = rate
        else:
            cx = one
        if SLTT:
            cv = zero
        else:
            cv = 1.0 - rate
        if HAS_DK:
            dk = tl.load(ddecay_ptr + n % decay_period, mask=mask, other=0.0)
            if DIV:
                dk = _div(-dk, _mul(dec, dec, USE_RN), USE_RN)
        else:
            dk = zero
        if HAS_DTH:
            dth = tl.load(dvth_ptr + n % vth_period, mask=mask, other=0.0)
        else:
            dth = zero
        if DETACH:
            dr = zero
        else:
            dr = one
        if HAS_V0:
            v = _load(v0_ptr + n, mask, mt, STORE)
        else:
            v = zero + vr
        if HAS_DV0:
            dv = _load(dv0_ptr + n, mask, mt, STORE)
        else:
            dv = zero
        off = n
        for _ in range(steps):
            xj = _load(x_ptr + off, mask, mt, STORE)
            h = _charge(v, xj, dec, vr, DI, DIV, USE_RN)
            s = _fire(h, th)
            if DI:
                ck = xj - (v - vr)
            else:
                ck = -(v - vr)
            if HAS_DX:
                dxj = _load(dx_ptr + off, mask, mt, STORE)
            else:
                dxj = zero
            # a zero tangent's term is absent (ck is inf for an infinite membrane)
            dh = (_mul(cx, dxj, USE_RN) + _mul(cv, dv, USE_RN)
                  + tl.where(dk != 0, _mul(ck, dk, USE_RN), 0.0))
            sg = _surrogate_grad(h - th, alpha, SURR, USE_RN)
            ds = _mul(sg, dh - dth, USE_RN)
            _store(ds_ptr + off, ds, mask, STORE)
            v = _reset(h, s, th, vr, HARD, USE_RN)
            if HARD:
                if DETACH:
                    dv = _mul(1.0 - s, dh, USE_RN)  # the detached reset's term is absent
                else:
                    dv = _mul(1.0 - s, dh, USE_RN) + _mul(vr - h, ds, USE_RN)
            else:
                dv = dh - _mul(s, dth, USE_RN) - _mul(_mul(dr, th, USE_RN), ds, USE_RN)
            if STORE_V:
                _store(dvs_ptr + off, dv, mask, STORE)
            off += neurons
        _store(dvl_ptr + n, dv, mask, STORE)

    # Interpreted (TRITON_INTERPRET=1 at import) or compiled.

    def _plan(x: torch.Tensor, steps: int, neurons: int):
        block = block_for(neurons, _sm_count(x.device))
        programs = -(-neurons // block)
        return block, programs, _needs_int64(steps, neurons, block)

    # ---- ops -------------------------------------------------------------------------------------

    @triton_op("pypaper::lif_forward_triton", mutates_args=())
    def lif_forward_triton(x: torch.Tensor, v_init: Optional[torch.Tensor], decay: torch.Tensor,
                           v_threshold: torch.Tensor, v_reset: Optional[float], surrogate: int,
                           alpha: float, flags: int
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(spikes, v_last, h_seq, v_seq) of the LIF scan over x [T, N, *] (see the module doc);
        h_seq is H[t], what the backward keeps (keep_h; else shape [0]); v_seq is V[t] when
        store_v_seq, else shape [0].
        The parameter values (tau > 1, 0 < k <= 1, v_threshold > v_reset) are the Python
        wrapper's checks: reading them here would synchronize with the GPU."""
        _check_device("lif_forward_triton", x)
        op_flags.check(flags, op_flags.FORWARD, "lif_forward_triton")
        decay_input = bool(flags & op_flags.DECAY_INPUT)
        decay_is_tau = bool(flags & op_flags.DECAY_IS_TAU)
        store_v_seq, keep_h = bool(flags & op_flags.STORE_V_SEQ), bool(flags & op_flags.KEEP_H)
        _check_x(x)
        _check_state(v_init, x, "v_init")
        _check_scalars(surrogate, alpha, v_reset)
        x = x.contiguous()
        dec, dperiod = _param(decay, x, "tau" if decay_is_tau else "k")
        vth, tperiod = _param(v_threshold, x, "v_threshold")
        mt = dec.dtype
        steps, neurons = x.shape[0], _neurons(x)
        spikes = torch.empty_like(x)
        h_seq = torch.empty_like(x) if keep_h else x.new_empty((0,))
        v_last = x.new_empty(x.shape[1:])
        v_seq = torch.empty_like(x) if store_v_seq else x.new_empty((0,))
        if neurons == 0 or not _launches(x):
            return spikes, v_last, h_seq, v_seq
        v0 = v_init.contiguous() if v_init is not None else None
        block, programs, idx64 = _plan(x, steps, neurons)
        xs = _as_storage(x)
        wrap_triton(_lif_forward_kernel)[(programs,)](
            xs, _as_storage(v0) if v0 is not None else xs, dec, vth, _as_storage(spikes),
            _as_storage(h_seq) if keep_h else xs, _as_storage(v_seq) if store_v_seq else xs,
            _as_storage(v_last), steps, neurons, dperiod, tperiod,
            _scalar_bits(v_reset or 0.0, mt), HAS_V0=v0 is not None, STORE_V=store_v_seq,
            KEEP_H=keep_h, DI=decay_input, DIV=decay_is_tau,
            HARD=v_reset is not None, STORE=_storage_code(x.dtype), F64=mt == torch.float64,
            IDX64=idx64, USE_RN=_USE_RN, BLOCK=block, num_warps=num_warps_for(block))
        return spikes, v_last, h_seq, v_seq

    @triton_op("pypaper::lif_backward_triton", mutates_args=())
    def lif_backward_triton(grad_spikes: torch.Tensor, grad_v_last: Optional[torch.Tensor],
                            grad_v_seq: Optional[torch.Tensor], h_seq: torch.Tensor,
                            v_init: Optional[torch.Tensor], decay: torch.Tensor,
                            v_threshold: torch.Tensor, v_reset: Optional[float], surrogate: int,
                            alpha: float, flags: int
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(grad_x, grad_v_init, grad_decay, grad_v_threshold): the reverse scan over the stored
        H (see the module doc); the parameter gradients are summed over time and batch (zeros
        when not asked for)."""
        _check_device("lif_backward_triton", h_seq)
        op_flags.check(flags, op_flags.BACKWARD, "lif_backward_triton")
        if flags & op_flags.RECOMPUTE:
            raise ValueError("lif_backward_triton with the recompute flag (rerunning the forward "
                             "from x instead of reading a kept H) has no Triton kernel: run the "
                             "forward with the keep_h flag")
        decay_input = bool(flags & op_flags.DECAY_INPUT)
        decay_is_tau = bool(flags & op_flags.DECAY_IS_TAU)
        detach_reset, sltt = bool(flags & op_flags.DETACH_RESET), bool(flags & op_flags.SLTT)
        need_decay_grad = bool(flags & op_flags.NEED_DECAY_GRAD)
        need_threshold_grad = bool(flags & op_flags.NEED_THRESHOLD_GRAD)
        _check_x(h_seq, "h_seq")
        _check_state(v_init, h_seq, "v_init")
        _check_scalars(surrogate, alpha, v_reset)
        _check_like(grad_spikes, h_seq, "grad_spikes")
        _check_state(grad_v_last, h_seq, "grad_v_last")
        if grad_v_seq is not None:
            _check_like(grad_v_seq, h_seq, "grad_v_seq")
        h = h_seq.contiguous()
        gs = grad_spikes.contiguous()
        dec, dperiod = _param(decay, h, "tau" if decay_is_tau else "k")
        vth, tperiod = _param(v_threshold, h, "v_threshold")
        mt = dec.dtype
        steps, neurons = h.shape[0], _neurons(h)
        block, programs, idx64 = _plan(h, steps, neurons)
        gx = torch.empty_like(h)
        gv0 = h.new_empty(h.shape[1:])
        # Per-neuron sums [N] (math type) or per-program fp64 partials, per parameter.
        k_mode = 0 if not need_decay_grad else (1 if dperiod > 1 else 2)
        t_mode = 0 if not need_threshold_grad else (1 if tperiod > 1 else 2)
        gk = (h.new_empty((neurons,), dtype=mt) if k_mode == 1 else
              h.new_empty((programs,), dtype=torch.float64) if k_mode == 2 else None)
        gt = (h.new_empty((neurons,), dtype=mt) if t_mode == 1 else
              h.new_empty((programs,), dtype=torch.float64) if t_mode == 2 else None)
        if neurons > 0 and _launches(h):
            gvl = grad_v_last.contiguous() if grad_v_last is not None else None
            gvs = grad_v_seq.contiguous() if grad_v_seq is not None else None
            v0 = v_init.contiguous() if (v_init is not None and k_mode != 0) else None
            hs, gss = _as_storage(h), _as_storage(gs)
            wrap_triton(_lif_backward_kernel)[(programs,)](
                gss, _as_storage(gvl) if gvl is not None else gss,
                _as_storage(gvs) if gvs is not None else gss, hs,
                _as_storage(v0) if v0 is not None else hs, dec, vth, _as_storage(gx),
                _as_storage(gv0), gk if gk is not None else dec, gt if gt is not None else vth,
                steps, neurons, dperiod, tperiod, _scalar_bits(v_reset or 0.0, mt),
                _scalar_bits(alpha, mt), HAS_GVL=gvl is not None, HAS_GVS=gvs is not None,
                HAS_V0=v0 is not None, K_MODE=k_mode, TH_MODE=t_mode, DI=decay_input,
                DIV=decay_is_tau, HARD=v_reset is not None, DETACH=detach_reset, SLTT=sltt,
                SURR=surrogate, STORE=_storage_code(h.dtype), F64=mt == torch.float64,
                IDX64=idx64, USE_RN=_USE_RN, BLOCK=block, num_warps=num_warps_for(block))
        g_decay = (_finish_param_grad(decay, dperiod, neurons, mt, gk, gk) if need_decay_grad
                   else torch.zeros(decay.shape, dtype=decay.dtype, device=decay.device))
        g_vth = (_finish_param_grad(v_threshold, tperiod, neurons, mt, gt, gt)
                 if need_threshold_grad else
                 torch.zeros(v_threshold.shape, dtype=v_threshold.dtype,
                             device=v_threshold.device))
        return gx, gv0, g_decay, g_vth

    def _tangent_param(t: Optional[torch.Tensor], param: torch.Tensor, x: torch.Tensor,
                       name: str) -> Optional[torch.Tensor]:
        """A parameter's tangent as the kernel reads it (the parameter's shape, math type,
        contiguous), or None (zero)."""
        if t is None:
            return None
        if tuple(t.shape) != tuple(param.shape):
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(param.shape)}")
        return _param(t, x, name)[0]

    @triton_op("pypaper::lif_forward_jvp_triton", mutates_args=())
    def lif_forward_jvp_triton(x: torch.Tensor, x_tangent: Optional[torch.Tensor],
                               v_init: Optional[torch.Tensor],
                               v_init_tangent: Optional[torch.Tensor], decay: torch.Tensor,
                               decay_tangent: Optional[torch.Tensor], v_threshold: torch.Tensor,
                               v_threshold_tangent: Optional[torch.Tensor],
                               v_reset: Optional[float], surrogate: int, alpha: float, flags: int
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(spikes_tangent, v_last_tangent, v_seq_tangent): forward-mode tangents of
        lif_forward_triton's outputs (pypaper::lif_forward_jvp's schema and results; v_seq's
        tangent has shape [0] unless store_v_seq). A tangent that is None is zero."""
        _check_device("lif_forward_jvp_triton", x)
        op_flags.check(flags, op_flags.FORWARD & ~op_flags.KEEP_H, "lif_forward_jvp_triton")
        decay_input = bool(flags & op_flags.DECAY_INPUT)
        decay_is_tau = bool(flags & op_flags.DECAY_IS_TAU)
        detach_reset, sltt = bool(flags & op_flags.DETACH_RESET), bool(flags & op_flags.SLTT)
        store_v_seq = bool(flags & op_flags.STORE_V_SEQ)
        _check_x(x)
        _check_state(v_init, x, "v_init")
        _check_state(v_init_tangent, x, "v_init_tangent")
        _check_scalars(surrogate, alpha, v_reset)
        if x_tangent is not None:
            if (x_tangent.shape != x.shape or x_tangent.dtype != x.dtype
                    or x_tangent.device != x.device):
                raise ValueError("x_tangent must match x in shape, dtype and device")
        x = x.contiguous()
        name = "tau" if decay_is_tau else "k"
        dec, dperiod = _param(decay, x, name)
        vth, tperiod = _param(v_threshold, x, "v_threshold")
        ddec = _tangent_param(decay_tangent, decay, x, "decay_tangent")
        dvth = _tangent_param(v_threshold_tangent, v_threshold, x, "v_threshold_tangent")
        mt = dec.dtype
        steps, neurons = x.shape[0], _neurons(x)
        ds = torch.empty_like(x)
        dv_last = x.new_empty(x.shape[1:])
        dv_seq = torch.empty_like(x) if store_v_seq else x.new_empty((0,))
        if neurons == 0 or not _launches(x):
            return ds, dv_last, dv_seq
        dx = x_tangent.contiguous() if x_tangent is not None else None
        v0 = v_init.contiguous() if v_init is not None else None
        dv0 = v_init_tangent.contiguous() if v_init_tangent is not None else None
        block, programs, idx64 = _plan(x, steps, neurons)
        xs = _as_storage(x)
        wrap_triton(_lif_jvp_kernel)[(programs,)](
            xs, _as_storage(dx) if dx is not None else xs,
            _as_storage(v0) if v0 is not None else xs,
            _as_storage(dv0) if dv0 is not None else xs, dec,
            ddec if ddec is not None else dec, vth, dvth if dvth is not None else vth,
            _as_storage(ds), _as_storage(dv_seq) if store_v_seq else xs, _as_storage(dv_last),
            steps, neurons, dperiod, tperiod, _scalar_bits(v_reset or 0.0, mt),
            _scalar_bits(alpha, mt), HAS_DX=dx is not None, HAS_V0=v0 is not None,
            HAS_DV0=dv0 is not None, HAS_DK=ddec is not None, HAS_DTH=dvth is not None,
            STORE_V=store_v_seq, DI=decay_input, DIV=decay_is_tau, HARD=v_reset is not None,
            DETACH=detach_reset, SLTT=sltt, SURR=surrogate, STORE=_storage_code(x.dtype),
            F64=mt == torch.float64, IDX64=idx64, USE_RN=_USE_RN, BLOCK=block,
            num_warps=num_warps_for(block))
        return ds, dv_last, dv_seq

    __all__ += ["lif_forward_triton", "lif_backward_triton", "lif_forward_jvp_triton"]
