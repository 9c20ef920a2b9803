"""Triton twin of the fused Hopfield retrieval, as ``torch.library.triton_op`` ops.

Ops (the signatures of csrc/schemas.cpp's hopfield_retrieve / hopfield_retrieve_backward, so
ops.py can pick either; autograd is registered by _registration.load_triton):

    pypaper::hopfield_retrieve_triton(q, k, v, beta, steps, eps, attn_mask, pad_mask)
        -> (out, states, lse, nsteps)
    pypaper::hopfield_retrieve_backward_triton(grad_out, q, k, v, out, states, lse, nsteps, beta,
                                               attn_mask, pad_mask) -> (grad_q, grad_k, grad_v)

Math: kernels/common/hopfield_math.h (Ramsauer et al., ICLR 2021): P_n = softmax(beta xi_n K^T
+ M) online over tiles of S, xi_{n+1} = P_n K, out = P_N V; the flash-attention-style backward per
step recomputes P from the saved states and row log-sum-exps.

Kernels:
  _pass_kernel      one program per (head-batch, tile of BLOCK_L rows): the online softmax over
                    all S (tl.dot per tile) and acc = P W for W = K (an update) or V (the output);
                    a per-head flag in device memory says whether the head takes part, so the
                    host launches every pass without reading anything back;
  _diff_kernel      the exact convergence norm sum (P_n - P_{n-1})^2 per program (rows x S);
  _bwd_dq_kernel    per (head-batch, row tile): g_xi = beta dS K over all S tiles;
  _bwd_dkv_kernel   per (head-batch, tile of S): dK += beta dS^T xi (+ P^T g for W = K),
                    dV += P^T g, over all row tiles (each program owns its tile: no atomics).
The per-head step logic (limits, the max-over-batch convergence rule of hflayers) runs as torch
ops on device tensors between launches: with finite step limits nothing is synchronised with the
host; an unbounded head (steps = -1) needs one host read per step to know when to stop.
Math in fp32 (fp64 for fp64 inputs); dots in IEEE fp32 (no TF32).
"""
from typing import List, Optional, Tuple

import torch

from .._triton import HAVE_TRITON, tl, triton, triton_available  # noqa: F401

__all__ = ["HAVE_TRITON", "triton_available", "blocks_for"]


def blocks_for(L: int, S: int, d: int, dv: int, interpret: bool) -> tuple:
    """(BLOCK_L, BLOCK_S, BLOCK_D, BLOCK_DV): tiles of rows / stored patterns and the padded
    pattern sizes (powers of two >= 16 for tl.dot). Small tiles under the CPU interpreter."""
    def p2(x):
        return max(16, triton.next_power_of_2(max(int(x), 1)))
    if interpret:
        return 16, 32, p2(d), p2(dv)
    bd = p2(max(d, dv))
    bl = 64 if bd <= 64 else 32
    bs = 64 if bd <= 128 else 32
    return bl, bs, p2(d), p2(dv)


def num_warps_for(block_d: int) -> int:
    return 4 if block_d <= 64 else 8


if HAVE_TRITON:
    import os

    from .._triton import wrap_triton  # torch.library's; an interpreted kernel as it is

    from .._triton import triton_op  # torch.library's, plus its torch.func kernel

    _INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

    @triton.jit
    def _scores(xi_ptr, k_ptr, bh, b, h, rows, cols, L, S, D, beta, am_ptr, a_b, a_h, a_l, a_s,
                pm_ptr, p_b, p_s, HAS_AM: tl.constexpr, HAS_PM: tl.constexpr,
                BLOCK_D: tl.constexpr, MT: tl.constexpr):
        """beta xi[rows] K[cols]^T + masks, -inf outside [L, S]."""
        dd = tl.arange(0, BLOCK_D)
        x = tl.load(xi_ptr + (bh * L + rows[:, None]) * D + dd[None, :],
                    mask=(rows[:, None] < L) & (dd[None, :] < D), other=0.0).to(MT)
        kk = tl.load(k_ptr + (bh * S + cols[:, None]) * D + dd[None, :],
                     mask=(cols[:, None] < S) & (dd[None, :] < D), other=0.0).to(MT)
        s = tl.dot(x, tl.trans(kk), input_precision="ieee") * beta
        if HAS_AM:
            s += tl.load(am_ptr + b * a_b + h * a_h + rows[:, None] * a_l + cols[None, :] * a_s,
                         mask=(rows[:, None] < L) & (cols[None, :] < S), other=0.0).to(MT)
        if HAS_PM:
            s += tl.load(pm_ptr + b * p_b + cols * p_s, mask=cols < S, other=0.0).to(MT)[None, :]
        return tl.where(cols[None, :] < S, s, float("-inf"))

    @triton.jit
    def _pass_kernel(xs_ptr, src_ptr, slab, k_ptr, w_ptr, beta_ptr, flag_ptr, dst_ptr, lse_ptr,
                     lse_slot_ptr, lslab, am_ptr, a_b, a_h, a_l, a_s, pm_ptr, p_b, p_s,
                     H, L, S, D, DW, HAS_AM: tl.constexpr, HAS_PM: tl.constexpr,
                     BLOCK_L: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_W: tl.constexpr, MT: tl.constexpr):
        bh = tl.program_id(0)
        h = bh % H
        b = bh // H
        if tl.load(flag_ptr + h) != 0:
            xi_ptr = xs_ptr + tl.load(src_ptr + h) * slab
            beta = tl.load(beta_ptr + h).to(MT)
            rows = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
            ww = tl.arange(0, BLOCK_W)
            m = tl.full([BLOCK_L], float("-inf"), MT)
            l = tl.zeros([BLOCK_L], MT)
            acc = tl.zeros([BLOCK_L, BLOCK_W], MT)
            for s0 in range(0, S, BLOCK_S):
                cols = s0 + tl.arange(0, BLOCK_S)
                s = _scores(xi_ptr, k_ptr, bh, b, h, rows, cols, L, S, D, beta, am_ptr, a_b, a_h,
                            a_l, a_s, pm_ptr, p_b, p_s, HAS_AM, HAS_PM, BLOCK_D, MT)
                mx = tl.maximum(m, tl.max(s, 1))
                corr = tl.where(mx == m, 1.0, tl.exp(m - mx))
                e = tl.where(mx[:, None] == float("-inf"), 0.0, tl.exp(s - mx[:, None]))
                l = l * corr + tl.sum(e, 1)
                w = tl.load(w_ptr + (bh * S + cols[:, None]) * DW + ww[None, :],
                            mask=(cols[:, None] < S) & (ww[None, :] < DW), other=0.0).to(MT)
                acc = acc * corr[:, None] + tl.dot(e.to(MT), w, input_precision="ieee")
                m = mx
            inv = tl.where(S == 0, 0.0, 1.0 / l)
            out = acc * inv[:, None]
            tl.store(dst_ptr + (bh * L + rows[:, None]) * DW + ww[None, :],
                     out.to(dst_ptr.dtype.element_ty), mask=(rows[:, None] < L) & (ww[None, :] < DW))
            lse_base = lse_ptr + tl.load(lse_slot_ptr + h) * lslab
            tl.store(lse_base + bh * L + rows, m + tl.log(l), mask=rows < L)

    @triton.jit
    def _diff_kernel(xa_ptr, la_ptr, xb_ptr, lb_ptr, k_ptr, beta_ptr, flag_ptr, part_ptr,
                     am_ptr, a_b, a_h, a_l, a_s, pm_ptr, p_b, p_s, H, L, S, D,
                     HAS_AM: tl.constexpr, HAS_PM: tl.constexpr, BLOCK_L: tl.constexpr,
                     BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, MT: tl.constexpr):
        bh = tl.program_id(0)
        h = bh % H
        b = bh // H
        tiles = tl.num_programs(1)
        s_end = tl.where(tl.load(flag_ptr + h) != 0, S, 0)  # a head not checked: no work, 0
        beta = tl.load(beta_ptr + h).to(MT)
        rows = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
        la = tl.load(la_ptr + bh * L + rows, mask=rows < L, other=0.0)
        lb = tl.load(lb_ptr + bh * L + rows, mask=rows < L, other=0.0)
        acc = tl.zeros([BLOCK_L], MT)
        for s0 in range(0, s_end, BLOCK_S):
            cols = s0 + tl.arange(0, BLOCK_S)
            sa = _scores(xa_ptr, k_ptr, bh, b, h, rows, cols, L, S, D, beta, am_ptr, a_b, a_h,
                         a_l, a_s, pm_ptr, p_b, p_s, HAS_AM, HAS_PM, BLOCK_D, MT)
            sb = _scores(xb_ptr, k_ptr, bh, b, h, rows, cols, L, S, D, beta, am_ptr, a_b, a_h,
                         a_l, a_s, pm_ptr, p_b, p_s, HAS_AM, HAS_PM, BLOCK_D, MT)
            dp = tl.exp(sa - la[:, None]) - tl.exp(sb - lb[:, None])
            dp = tl.where((rows[:, None] < L) & (cols[None, :] < S), dp, 0.0)
            acc += tl.sum(dp * dp, 1)
        tl.store(part_ptr + bh * tiles + tl.program_id(1), tl.sum(acc, 0))

    @triton.jit
    def _bwd_dq_kernel(xi_ptr, lse_ptr, k_ptr, w_ptr, g_ptr, delta_ptr, beta_ptr, flag_ptr,
                       gx_ptr, am_ptr, a_b, a_h, a_l, a_s, pm_ptr, p_b, p_s, H, L, S, D, DW,
                       HAS_AM: tl.constexpr, HAS_PM: tl.constexpr, BLOCK_L: tl.constexpr,
                       BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr,
                       MT: tl.constexpr):
        bh = tl.program_id(0)
        h = bh % H
        b = bh // H
        if tl.load(flag_ptr + h) != 0:
            beta = tl.load(beta_ptr + h).to(MT)
            rows = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
            dd = tl.arange(0, BLOCK_D)
            ww = tl.arange(0, BLOCK_W)
            lse = tl.load(lse_ptr + bh * L + rows, mask=rows < L, other=0.0)
            de = tl.load(delta_ptr + bh * L + rows, mask=rows < L, other=0.0)
            g = tl.load(g_ptr + (bh * L + rows[:, None]) * DW + ww[None, :],
                        mask=(rows[:, None] < L) & (ww[None, :] < DW), other=0.0).to(MT)
            gx = tl.zeros([BLOCK_L, BLOCK_D], MT)
            for s0 in range(0, S, BLOCK_S):
                cols = s0 + tl.arange(0, BLOCK_S)
                s = _scores(xi_ptr, k_ptr, bh, b, h, rows, cols, L, S, D, beta, am_ptr, a_b, a_h,
                            a_l, a_s, pm_ptr, p_b, p_s, HAS_AM, HAS_PM, BLOCK_D, MT)
                p = tl.exp(s - lse[:, None])
                p = tl.where(rows[:, None] < L, p, 0.0)
                w = tl.load(w_ptr + (bh * S + cols[:, None]) * DW + ww[None, :],
                            mask=(cols[:, None] < S) & (ww[None, :] < DW), other=0.0).to(MT)
                dp = tl.dot(g, tl.trans(w), input_precision="ieee")
                ds = p * (dp - de[:, None])
                kk = tl.load(k_ptr + (bh * S + cols[:, None]) * D + dd[None, :],
                             mask=(cols[:, None] < S) & (dd[None, :] < D), other=0.0).to(MT)
                gx += tl.dot(ds.to(MT), kk, input_precision="ieee") * beta
            tl.store(gx_ptr + (bh * L + rows[:, None]) * D + dd[None, :], gx,
                     mask=(rows[:, None] < L) & (dd[None, :] < D))

    @triton.jit
    def _bwd_dkv_kernel(xi_ptr, lse_ptr, k_ptr, w_ptr, g_ptr, delta_ptr, beta_ptr, flag_ptr,
                        dk_ptr, dw_ptr, am_ptr, a_b, a_h, a_l, a_s, pm_ptr, p_b, p_s,
                        H, L, S, D, DW, W_IS_K: tl.constexpr, HAS_AM: tl.constexpr,
                        HAS_PM: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_S: tl.constexpr,
                        BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr, MT: tl.constexpr):
        bh = tl.program_id(0)
        h = bh % H
        b = bh // H
        if tl.load(flag_ptr + h) != 0:
            beta = tl.load(beta_ptr + h).to(MT)
            cols = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
            dd = tl.arange(0, BLOCK_D)
            ww = tl.arange(0, BLOCK_W)
            w = tl.load(w_ptr + (bh * S + cols[:, None]) * DW + ww[None, :],
                        mask=(cols[:, None] < S) & (ww[None, :] < DW), other=0.0).to(MT)
            dk = tl.zeros([BLOCK_S, BLOCK_D], MT)
            dw = tl.zeros([BLOCK_S, BLOCK_W], MT)
            for r0 in range(0, L, BLOCK_L):
                rows = r0 + tl.arange(0, BLOCK_L)
                s = _scores(xi_ptr, k_ptr, bh, b, h, rows, cols, L, S, D, beta, am_ptr, a_b, a_h,
                            a_l, a_s, pm_ptr, p_b, p_s, HAS_AM, HAS_PM, BLOCK_D, MT)
                lse = tl.load(lse_ptr + bh * L + rows, mask=rows < L, other=0.0)
                de = tl.load(delta_ptr + bh * L + rows, mask=rows < L, other=0.0)
                p = tl.exp(s - lse[:, None])
                p = tl.where(rows[:, None] < L, p, 0.0)
                g = tl.load(g_ptr + (bh * L + rows[:, None]) * DW + ww[None, :],
                            mask=(rows[:, None] < L) & (ww[None, :] < DW), other=0.0).to(MT)
                dp = tl.dot(g, tl.trans(w), input_precision="ieee")
                ds = p * (dp - de[:, None])
                x = tl.load(xi_ptr + (bh * L + rows[:, None]) * D + dd[None, :],
                            mask=(rows[:, None] < L) & (dd[None, :] < D), other=0.0).to(MT)
                dk += tl.dot(tl.trans(ds.to(MT)), x, input_precision="ieee") * beta
                dw += tl.dot(tl.trans(p.to(MT)), g, input_precision="ieee")
            kmask = (cols[:, None] < S) & (dd[None, :] < D)
            kp = dk_ptr + (bh * S + cols[:, None]) * D + dd[None, :]
            if W_IS_K:
                dk += dw
            tl.store(kp, tl.load(kp, mask=kmask, other=0.0) + dk, mask=kmask)
            if not W_IS_K:
                wmask = (cols[:, None] < S) & (ww[None, :] < DW)
                wp = dw_ptr + (bh * S + cols[:, None]) * DW + ww[None, :]
                tl.store(wp, tl.load(wp, mask=wmask, other=0.0) + dw, mask=wmask)

    def _math(dtype):
        return torch.float64 if dtype == torch.float64 else torch.float32

    def _tl_math(dtype):
        return tl.float64 if dtype == torch.float64 else tl.float32

    def _per_head(vals, H):
        return list(vals) * H if len(vals) == 1 else list(vals)

    def _mask_args(attn_mask, pad_mask, mt, dummy):
        if attn_mask is not None:
            am = attn_mask.to(mt)
            a = [0 if am.shape[i] == 1 else am.stride(i) for i in range(4)]
        else:
            am, a = dummy, [0, 0, 0, 0]
        if pad_mask is not None:
            pm = pad_mask.to(mt)
            p = [0 if pm.shape[0] == 1 else pm.stride(0), pm.stride(1)]
        else:
            pm, p = dummy, [0, 0]
        return am, a, pm, p

    @triton_op("pypaper::hopfield_retrieve_triton", mutates_args=())
    def hopfield_retrieve_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 beta: List[float], steps: List[int], eps: List[float],
                                 attn_mask: Optional[torch.Tensor] = None,
                                 pad_mask: Optional[torch.Tensor] = None
                                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        B, H, L, D = q.shape
        S, DV = k.shape[2], v.shape[3]
        BH = B * H
        mt = _math(q.dtype)
        dev = q.device
        steps_h = _per_head(steps, H)
        unbounded = any(s < 0 for s in steps_h)
        nmax = max(steps_h) if not unbounded else 0
        qc = q.to(mt).contiguous()
        kc = k.to(mt).contiguous()
        vc = v.to(mt).contiguous()
        betas = torch.tensor(_per_head(beta, H), dtype=mt, device=dev)
        epss = torch.tensor(_per_head(eps, H), dtype=torch.float64, device=dev)
        limit = torch.tensor([s if s >= 0 else 2 ** 62 for s in steps_h], device=dev)
        am, a, pm, p = _mask_args(attn_mask, pad_mask, mt, qc)
        bl, bs, bd, bw = blocks_for(L, S, D, DV, _INTERPRET)
        tiles = triton.cdiv(L, bl)
        slab = BH * L * D
        cap = nmax + 1 if not unbounded else 8
        xs = torch.zeros((cap, B, H, L, D), dtype=mt, device=dev)
        xs[0] = qc
        lse = torch.full((cap, B, H, L), float("-inf"), dtype=mt, device=dev)
        out = torch.zeros((B, H, L, DV), dtype=mt, device=dev)
        status = torch.zeros(H, dtype=torch.long, device=dev)  # 0 running, 1 converged, 2 done
        final = torch.zeros(H, dtype=torch.long, device=dev)
        parts = torch.zeros((BH, max(tiles, 1)), dtype=mt, device=dev)
        common = dict(HAS_AM=attn_mask is not None, HAS_PM=pad_mask is not None, BLOCK_L=bl,
                      BLOCK_S=bs, BLOCK_D=bd, MT=_tl_math(q.dtype), num_warps=num_warps_for(bd))
        n = 0
        used = 0  # update passes run (unbounded mode)
        while True:
            if unbounded:
                if not bool((status != 2).any()):
                    break
                if n + 1 >= xs.shape[0]:  # grow the state buffers (host-synchronised mode)
                    xs = torch.cat([xs, torch.zeros_like(xs)])
                    lse = torch.cat([lse, torch.full_like(lse, float("-inf"))])
            elif n > nmax:
                break
            run = status == 0
            upd = run & (n < limit)
            out_now = (run & (n >= limit)) | (status == 1)
            src = torch.where(status == 1, final, torch.full_like(final, n))
            nn_ = torch.full_like(final, n)
            if unbounded and bool(upd.any()):
                used = n + 1
            if tiles and BH:
                # updates: xi_{n+1} = P_n K into slot n + 1, lse_n into slot n
                wrap_triton(_pass_kernel)[(BH, tiles)](
                    xs, nn_, slab, kc, kc, betas, upd.to(torch.int32),
                    xs[min(n + 1, xs.shape[0] - 1)], lse, nn_,
                    BH * L, am, *a, pm, *p, H, L, S, D, D, BLOCK_W=bd, **common)
                # outputs: out = P V from each finishing head's last state
                wrap_triton(_pass_kernel)[(BH, tiles)](
                    xs, src, slab, kc, vc, betas, out_now.to(torch.int32), out, lse, src,
                    BH * L, am, *a, pm, *p, H, L, S, D, DV, BLOCK_W=bw, **common)
            final = torch.where(run & (n >= limit), nn_, final)
            status = torch.where(out_now, torch.full_like(status, 2), status)
            if n >= 1 and tiles and BH:
                wrap_triton(_diff_kernel)[(BH, tiles)](
                    xs[n], lse[n], xs[n - 1], lse[n - 1], kc, betas, upd.to(torch.int32), parts,
                    am, *a, pm, *p, H, L, S, D, **common)
                norm = parts.sum(1).clamp_min(0).sqrt().view(B, H).amax(0).double()
                conv = upd & ~(norm > epss)
                status = torch.where(conv, torch.ones_like(status), status)
                final = torch.where(conv, nn_, final)
            n += 1
        if not unbounded:
            used = nmax
        states = xs[1:used + 1].clone()
        lse_out = lse[:used + 1].clone()
        return out.to(q.dtype), states, lse_out, final

    @triton_op("pypaper::hopfield_retrieve_backward_triton", mutates_args=())
    def hopfield_retrieve_backward_triton(grad_out: torch.Tensor, q: torch.Tensor,
                                          k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                                          states: torch.Tensor, lse: torch.Tensor,
                                          nsteps: torch.Tensor, beta: List[float],
                                          attn_mask: Optional[torch.Tensor],
                                          pad_mask: Optional[torch.Tensor]
                                          ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, H, L, D = q.shape
        S, DV = k.shape[2], v.shape[3]
        BH = B * H
        mt = _math(q.dtype)
        dev = q.device
        qc, kc, vc = q.to(mt).contiguous(), k.to(mt).contiguous(), v.to(mt).contiguous()
        go = grad_out.to(mt).contiguous()
        outc = out.to(mt).contiguous()
        st = states.to(mt).contiguous()
        ls = lse.to(mt).contiguous()
        betas = torch.tensor(_per_head(beta, H), dtype=mt, device=dev)
        am, a, pm, p = _mask_args(attn_mask, pad_mask, mt, qc)
        bl, bs, bd, bw = blocks_for(L, S, D, DV, _INTERPRET)
        common = dict(HAS_AM=attn_mask is not None, HAS_PM=pad_mask is not None, BLOCK_L=bl,
                      BLOCK_S=bs, BLOCK_D=bd, MT=_tl_math(q.dtype), num_warps=num_warps_for(bd))
        dk = torch.zeros((B, H, S, D), dtype=mt, device=dev)
        dv = torch.zeros((B, H, S, DV), dtype=mt, device=dev)
        g = torch.zeros((B, H, L, D), dtype=mt, device=dev)
        nmax = states.shape[0]
        ns = nsteps.to(dev)
        delta_last = (go * outc).sum(-1).contiguous()
        lt, stl = triton.cdiv(L, bl), triton.cdiv(S, bs)

        def xi(n):
            return qc if n == 0 else st[n - 1]

        for n in range(nmax, -1, -1):
            last = (ns == n).to(torch.int32)
            mid = (ns > n).to(torch.int32)
            g_new = torch.zeros_like(g)
            delta_mid = (g * st[n]).sum(-1).contiguous() if n < nmax else delta_last
            if lt and stl and BH:
                for flag, w, gg, de, bw_, is_k in ((last, vc, go, delta_last, bw, False),
                                                   (mid, kc, g, delta_mid, bd, True)):
                    if is_k and n == nmax:
                        continue
                    dw_arg = dk if is_k else dv
                    wrap_triton(_bwd_dq_kernel)[(BH, lt)](
                        xi(n), ls[n], kc, w, gg, de, betas, flag, g_new, am, *a, pm, *p, H, L, S,
                        D, w.shape[3], BLOCK_W=bw_, **common)
                    wrap_triton(_bwd_dkv_kernel)[(BH, stl)](
                        xi(n), ls[n], kc, w, gg, de, betas, flag, dk, dw_arg, am, *a, pm, *p,
                        H, L, S, D, w.shape[3], W_IS_K=is_k, BLOCK_W=bw_, **common)
            g = g_new
        return g.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype)
