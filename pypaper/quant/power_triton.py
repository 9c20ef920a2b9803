"""Triton kernels of the power-exponent quantizer (PowerQuant / NUPES), as ``torch.library.triton_op``
ops with the C++ schemas' signatures: ``pypaper::power_quantize_triton``,
``pypaper::power_dequantize_triton``, ``pypaper::power_fake_quantize_triton`` and
``pypaper::power_fake_quantize_backward_triton``.

Math (kernels/common/power_quant_math.h; the reference is pypaper/quant/power.py): per range
(row c of x seen as [C, numel / C]) the host builds, with the reference's own function
(power.power_tables), the thresholds t_k = ceil_T(m·((k − ½)/qmax)^(1/a)) and the levels
l_k = m·(k/qmax)^(1/a) in x's float type; the kernel counts c = #{k : |x| >= t_k} (a static loop of
qmax compares against broadcast scalars, no pow per element) and looks y = ±l_c up. Codes and values
therefore equal the C++ op's and the reference's to the bit. The backward writes, per program, the
partial sums of grad·dy/da and grad·dy/dm in float64 (the "ste" terms need one log and one exp per
element, the "fixed" ones a table lookup), which torch adds up after: deterministic, no atomics.

Launch heuristics: one program per (row, block of BLOCK elements); BLOCK from the row length.
"""

import torch

from .._autograd import fresh_output
from .._triton import HAVE_TRITON, tl, triton, triton_available  # noqa: F401

__all__ = ["HAVE_TRITON", "triton_available", "block_for"]


def block_for(inner: int) -> int:
    """Elements per program: the row length rounded up to a power of two, 64 .. 2048 (one row of
    a weight matrix per program or a few, enough bytes in flight for a memory-bound kernel)."""
    return max(64, min(2048, 1 << max(0, (max(inner, 1) - 1).bit_length())))


def num_warps_for(block: int) -> int:
    return 4 if block <= 1024 else 8


if triton is not None:
    from .._triton import wrap_triton  # torch.library's; an interpreted kernel as it is

    from .._triton import triton_op  # torch.library's, plus its torch.func kernel

    from .._triton import _launches
    from .power import power_tables

    @triton.jit
    def _count(ax, thr_row, QMAX: tl.constexpr):
        c = tl.zeros(ax.shape, dtype=tl.int32)
        for k in tl.static_range(QMAX):
            t = tl.load(thr_row + k)
            c += (ax >= t).to(tl.int32)
        return c

    @triton.jit
    def _quant_kernel(x_ptr, q_ptr, thr_ptr, inner, n_blocks, QMAX: tl.constexpr,
                      BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        row = pid // n_blocks
        j = (pid % n_blocks) * BLOCK + tl.arange(0, BLOCK)
        mask = j < inner
        off = row.to(tl.int64) * inner + j
        x = tl.load(x_ptr + off, mask=mask, other=0.0)
        c = _count(tl.abs(x), thr_ptr + row * QMAX, QMAX)
        code = tl.where(x < 0, -c, c)
        tl.store(q_ptr + off, code.to(tl.int8), mask=mask)

    @triton.jit
    def _fake_kernel(x_ptr, y_ptr, thr_ptr, lvl_ptr, inner, n_blocks, QMAX: tl.constexpr,
                     BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        row = pid // n_blocks
        j = (pid % n_blocks) * BLOCK + tl.arange(0, BLOCK)
        mask = j < inner
        off = row.to(tl.int64) * inner + j
        x = tl.load(x_ptr + off, mask=mask, other=0.0)
        c = _count(tl.abs(x), thr_ptr + row * QMAX, QMAX)
        lv = tl.load(lvl_ptr + row * (QMAX + 1) + c, mask=mask, other=0.0)
        y = tl.where(x < 0, -lv, lv)
        y = tl.where(x != x, x, y)
        tl.store(y_ptr + off, y, mask=mask)

    @triton.jit
    def _dequant_kernel(q_ptr, y_ptr, lvl_ptr, inner, n_blocks, QMAX: tl.constexpr,
                        BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        row = pid // n_blocks
        j = (pid % n_blocks) * BLOCK + tl.arange(0, BLOCK)
        mask = j < inner
        off = row.to(tl.int64) * inner + j
        q = tl.load(q_ptr + off, mask=mask, other=0).to(tl.int32)
        c = tl.minimum(tl.abs(q), QMAX)
        lv = tl.load(lvl_ptr + row * (QMAX + 1) + c, mask=mask, other=0.0)
        tl.store(y_ptr + off, tl.where(q < 0, -lv, lv), mask=mask)

    @triton.jit
    def _bwd_kernel(g_ptr, x_ptr, dx_ptr, m_ptr, a_ptr, thr_ptr, ulvl_ptr, ulda_ptr, pa_ptr,
                    pm_ptr, inner, n_blocks, QMAX: tl.constexpr, NEED: tl.constexpr,
                    STE: tl.constexpr, PER_CH_EXP: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        row = pid // n_blocks
        j = (pid % n_blocks) * BLOCK + tl.arange(0, BLOCK)
        mask = j < inner
        off = row.to(tl.int64) * inner + j
        x = tl.load(x_ptr + off, mask=mask, other=0.0)
        g = tl.load(g_ptr + off, mask=mask, other=0.0)
        m = tl.load(m_ptr + row)
        ax = tl.abs(x)
        tl.store(dx_ptr + off, tl.where(ax <= m, g, tl.zeros_like(g)), mask=mask)
        if NEED:
            c = _count(ax, thr_ptr + row * QMAX, QMAX)
            erow = row if PER_CH_EXP else 0
            ulvl = tl.load(ulvl_ptr + erow * (QMAX + 1) + c, mask=mask, other=0.0)
            ulda = tl.load(ulda_ptr + erow * (QMAX + 1) + c, mask=mask, other=0.0)
            md = tl.maximum(m.to(tl.float64), 0.0)
            gs = tl.where(x < 0, -g, g).to(tl.float64)
            ta = md * ulda
            tm = ulvl
            if STE:
                a = tl.load(a_ptr + erow).to(tl.float64)
                axd = ax.to(tl.float64)
                # m <= 0 has every threshold +inf, so c = 0 there and both masks are False
                inside = (c >= 1) & (axd <= md)
                clipped = (c >= 1) & (axd > md)
                lu = tl.log(tl.where(inside, axd / tl.maximum(md, 1e-300), 1.0))
                cf = tl.maximum(c, 1).to(tl.float64)
                ratio = QMAX * tl.exp(a * lu) / cf
                ta = tl.where(inside, ta + md * ulvl * ratio * lu / a, 0.0)
                tm = tl.where(inside, ulvl * (1.0 - ratio), tl.where(clipped, 1.0, 0.0))
            va = tl.where(mask, gs * ta, 0.0)
            vm = tl.where(mask, gs * tm, 0.0)
            tl.store(pa_ptr + pid, tl.sum(va, axis=0))
            tl.store(pm_ptr + pid, tl.sum(vm, axis=0))

    def _check(name, x, max_abs, exponent, qmax):
        if x.device.type not in ("cuda", "cpu"):
            raise RuntimeError(f"{name}: unsupported device {x.device}")
        if not 1 <= qmax <= 127:
            raise ValueError(f"qmax must be in [1, 127], got {qmax}")
        C = max_abs.numel()
        if C < 1 or x.numel() % C:
            raise ValueError(f"max_abs has {C} values, which does not divide x's {x.numel()}")
        if exponent.numel() not in (1, C):
            raise ValueError(f"exponent must hold 1 or {C} values, got {exponent.numel()}")
        return C, (x.numel() // C)

    def _launch(kernel, C, inner, *args, **meta):
        block = block_for(inner)
        nb = triton.cdiv(inner, block)
        wrap_triton(kernel)[(C * nb,)](*args, inner, nb, BLOCK=block,
                                       num_warps=num_warps_for(block), **meta)
        return nb

    def _tables(max_abs, exponent, qmax, dtype, device):
        thr, lvl, lda, ulvl = power_tables(max_abs, exponent, qmax, dtype)
        return thr.contiguous().to(device), lvl.contiguous().to(device)

    @triton_op("pypaper::power_quantize_triton", mutates_args=())
    def power_quantize_triton(x: torch.Tensor, max_abs: torch.Tensor, exponent: torch.Tensor,
                              qmax: int) -> torch.Tensor:
        """int8 codes sign(x)·#{k : |x| >= t_k} (see the module docstring)."""
        if x.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"x must be float32 or float64, got {x.dtype}")
        C, inner = _check("power_quantize_triton", x, max_abs, exponent, qmax)
        x = x.contiguous()
        q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
        if x.numel() and _launches(x):
            thr, _ = _tables(max_abs, exponent, qmax, x.dtype, x.device)
            _launch(_quant_kernel, C, inner, x, q, thr, QMAX=qmax)
        return q

    @triton_op("pypaper::power_dequantize_triton", mutates_args=())
    def power_dequantize_triton(codes: torch.Tensor, max_abs: torch.Tensor,
                                exponent: torch.Tensor, qmax: int,
                                dtype: torch.dtype) -> torch.Tensor:
        """y = ±l_|code| in dtype (float32 or float64)."""
        if codes.dtype != torch.int8:
            raise TypeError(f"codes must be int8, got {codes.dtype}")
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be float32 or float64, got {dtype}")
        C, inner = _check("power_dequantize_triton", codes, max_abs, exponent, qmax)
        codes = codes.contiguous()
        y = torch.empty(codes.shape, dtype=dtype, device=codes.device)
        if codes.numel() and _launches(codes):
            _, lvl = _tables(max_abs, exponent, qmax, dtype, codes.device)
            _launch(_dequant_kernel, C, inner, codes, y, lvl, QMAX=qmax)
        return y

    @triton_op("pypaper::power_fake_quantize_triton", mutates_args=())
    def power_fake_quantize_triton(x: torch.Tensor, max_abs: torch.Tensor,
                                   exponent: torch.Tensor, qmax: int,
                                   ste: bool = True) -> torch.Tensor:
        """y = ±l_c, c = #{k : |x| >= t_k}; NaN stays NaN."""
        if x.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"x must be float32 or float64, got {x.dtype}")
        C, inner = _check("power_fake_quantize_triton", x, max_abs, exponent, qmax)
        x = x.contiguous()
        y = torch.empty_like(x)
        if x.numel() and _launches(x):
            thr, lvl = _tables(max_abs, exponent, qmax, x.dtype, x.device)
            _launch(_fake_kernel, C, inner, x, y, thr, lvl, QMAX=qmax)
        return y

    @triton_op("pypaper::power_fake_quantize_backward_triton", mutates_args=())
    def power_fake_quantize_backward_triton(
            grad: torch.Tensor, x: torch.Tensor, max_abs: torch.Tensor, exponent: torch.Tensor,
            qmax: int, need_max_grad: bool, need_exponent_grad: bool,
            ste: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(grad_x, grad_max_abs, grad_exponent), the C++ op's formulas."""
        if x.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"x must be float32 or float64, got {x.dtype}")
        if grad.shape != x.shape or grad.dtype != x.dtype:
            raise ValueError("grad must have x's shape and dtype")
        C, inner = _check("power_fake_quantize_backward_triton", x, max_abs, exponent, qmax)
        x, grad = x.contiguous(), grad.contiguous()
        dx = torch.empty_like(x)
        need = need_max_grad or need_exponent_grad
        ga = torch.zeros(C, dtype=torch.float64, device=x.device)
        gm = torch.zeros(C, dtype=torch.float64, device=x.device)
        if x.numel() and _launches(x):
            thr, _, _, _ = power_tables(max_abs, exponent, qmax, x.dtype)
            from .power import _unit_tables

            _, ulvl, ulda = _unit_tables(exponent, qmax)
            m = max_abs.detach().reshape(-1).to(x.dtype).contiguous()
            a = exponent.detach().reshape(-1).to(torch.float64).contiguous()
            block = block_for(inner)
            nb = triton.cdiv(inner, block)
            pa = torch.zeros(C * nb, dtype=torch.float64, device=x.device)
            pm = torch.zeros(C * nb, dtype=torch.float64, device=x.device)
            wrap_triton(_bwd_kernel)[(C * nb,)](
                grad, x, dx, m, a, thr.contiguous().to(x.device), ulvl.contiguous().to(x.device),
                ulda.contiguous().to(x.device), pa, pm, inner, nb, QMAX=qmax, NEED=need,
                STE=ste, PER_CH_EXP=exponent.numel() == C and C > 1, BLOCK=block,
                num_warps=num_warps_for(block))
            if need:
                ga = pa.view(C, nb).sum(dim=1)
                gm = pm.view(C, nb).sum(dim=1)
        per_ch = exponent.numel() == C and C > 1
        gexp = ga if per_ch else ga.sum().reshape(1)
        return (dx,
                fresh_output(gm, max_abs.shape, max_abs.dtype) if need_max_grad
                else torch.zeros_like(max_abs),
                fresh_output(gexp, exponent.shape, exponent.dtype) if need_exponent_grad
                else torch.zeros_like(exponent))

    __all__ += ["power_quantize_triton", "power_dequantize_triton", "power_fake_quantize_triton",
                "power_fake_quantize_backward_triton"]
