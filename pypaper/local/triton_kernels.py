"""Triton twins of pypaper.local's fused ops, as ``torch.library.triton_op`` ops:

    pypaper::local_ff_linear_triton   (the signature of local_ff_linear)
    pypaper::local_tp_linear_triton   (the signature of local_tp_linear)
    pypaper::local_ff_sf_linear_triton (the signature of local_ff_sf_linear)
    pypaper::local_head_triton        (the signature of local_head)

The two GEMMs of a layer stay torch's (cuBLAS on GPUs); everything between them is one Triton
kernel per layer, one program per output row: the 1/||x|| scale of the row (FF), bias,
activation, the row's local loss and dZ, written in two passes over the row's tiles (the first
sums the goodness for FF / the squared error for tpSGD; FF's dZ needs the row's goodness), with
the bias gradient accumulated by atomic adds (fp32; the order of the row sums may differ from the
C++ op's, so db agrees to rounding). The head: a pooling kernel ([N, C, S] -> [N, C], fp32
accumulation) and a softmax-cross-entropy kernel over the logits rows.

Math (kernels/common/local_math.h, written again here): softplus(a) = max(a, 0) + log(1 + e^-|a|),
FF dloss/dz = 2 w h (-s sigmoid(s (theta - g))), tpSGD delta = (h - t) act'(z) / N. Math in fp32
(fp64 for fp64 storage); 16-bit storage is widened on load and rounded on store.

On CPU tensors the kernels run only under TRITON_INTERPRET=1 (set before importing pypaper), for
tests at small sizes; interpreted kernels cannot be traced by torch.compile.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._triton import HAVE_TRITON, tl, triton, triton_available  # noqa: F401


# ---- launch heuristics (pure functions) ------------------------------------------------------

def block_for(width: int) -> int:
    """Columns per tile of a row: the power of two covering ``width``, in [16, 2048]."""
    b = 16
    while b < width and b < 2048:
        b *= 2
    return b


def num_warps_for(block: int) -> int:
    """4 elements per thread up to 8 warps."""
    return max(1, min(8, block // 128))


# The most classes the single-forward kernel takes: a row's logits are one tile of
# block_for(k) lanes, and block_for stops at 2048.
SF_MAX_CLASSES = 2048


def ops() -> dict:
    """The Triton ops by kind, for pypaper.local.ops."""
    return {"ff": torch.ops.pypaper.local_ff_linear_triton,
            "sf": torch.ops.pypaper.local_ff_sf_linear_triton,
            "tp": torch.ops.pypaper.local_tp_linear_triton,
            "head": torch.ops.pypaper.local_head_triton}


if HAVE_TRITON:
    from .._triton import wrap_triton  # torch.library's; an interpreted kernel as it is

    from .._triton import triton_op  # torch.library's, plus its torch.func kernel

    from .._triton import _launches

    @triton.jit
    def _softplus(a):
        return tl.maximum(a, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(a)))

    @triton.jit
    def _sigmoid(a):
        e = tl.exp(-tl.abs(a))
        return tl.where(a >= 0, 1.0 / (1.0 + e), e / (1.0 + e))

    @triton.jit
    def _ff_rows_kernel(z_ptr, x_ptr, b_ptr, dz_ptr, loss_ptr, db_ptr, prm_ptr, m, d, num_pos,
                        HAS_B: tl.constexpr, NORM: tl.constexpr, F64: tl.constexpr,
                        BLOCK: tl.constexpr):
        # prm: [threshold, eps, w_pos, w_neg] in the math dtype (a Python float would be fp32)
        r = tl.program_id(0).to(tl.int64)
        mt = tl.float64 if F64 else tl.float32
        theta = tl.load(prm_ptr)
        eps = tl.load(prm_ptr + 1)
        w_pos = tl.load(prm_ptr + 2)
        w_neg = tl.load(prm_ptr + 3)
        inv = tl.full([1], 1.0, mt)
        if NORM:
            acc = tl.zeros([BLOCK], mt)
            for j0 in range(0, d, BLOCK):
                offs = j0 + tl.arange(0, BLOCK)
                v = tl.load(x_ptr + r * d + offs, mask=offs < d, other=0.0).to(mt)
                acc += v * v
            inv = inv / (tl.sqrt(tl.sum(acc, 0)) + eps)
        gacc = tl.zeros([BLOCK], mt)
        for j0 in range(0, m, BLOCK):
            offs = j0 + tl.arange(0, BLOCK)
            msk = offs < m
            v = tl.load(z_ptr + r * m + offs, mask=msk, other=0.0).to(mt) * inv
            if HAS_B:
                v += tl.load(b_ptr + offs, mask=msk, other=0.0).to(mt)
            h = tl.where(msk, tl.maximum(v, 0.0), 0.0)
            gacc += h * h
        g = tl.sum(gacc, 0)
        pos = r < num_pos
        s = tl.where(pos, 1.0, -1.0).to(mt)
        w = tl.where(pos, w_pos, w_neg).to(mt)
        a = s * (theta - g)
        tl.store(loss_ptr + r, w * _softplus(a))
        c = 2.0 * w * (-s * _sigmoid(a))
        for j0 in range(0, m, BLOCK):
            offs = j0 + tl.arange(0, BLOCK)
            msk = offs < m
            v = tl.load(z_ptr + r * m + offs, mask=msk, other=0.0).to(mt) * inv
            if HAS_B:
                v += tl.load(b_ptr + offs, mask=msk, other=0.0).to(mt)
            h = tl.maximum(v, 0.0)
            dd = c * h
            tl.store(z_ptr + r * m + offs, h.to(z_ptr.dtype.element_ty), mask=msk)
            tl.store(dz_ptr + r * m + offs, (dd * inv).to(dz_ptr.dtype.element_ty), mask=msk)
            if HAS_B:
                tl.atomic_add(db_ptr + offs, dd.to(db_ptr.dtype.element_ty), mask=msk)

    @triton.jit
    def _sf_rows_kernel(z_ptr, x_ptr, b_ptr, e_ptr, y_ptr, dz_ptr, dl_ptr, loss_ptr, db_ptr,
                        prm_ptr, m, d, k, HAS_B: tl.constexpr, NORM: tl.constexpr,
                        F64: tl.constexpr, BLOCK: tl.constexpr, BK: tl.constexpr):
        # prm: [eps, 1/temperature, 1/N] in the math dtype; e: the class embeddings E [k, m]
        r = tl.program_id(0).to(tl.int64)
        mt = tl.float64 if F64 else tl.float32
        eps = tl.load(prm_ptr)
        inv_t = tl.load(prm_ptr + 1)
        scale = tl.load(prm_ptr + 2)
        inv = tl.full([1], 1.0, mt)
        if NORM:
            acc = tl.zeros([BLOCK], mt)
            for j0 in range(0, d, BLOCK):
                offs = j0 + tl.arange(0, BLOCK)
                v = tl.load(x_ptr + r * d + offs, mask=offs < d, other=0.0).to(mt)
                acc += v * v
            inv = inv / (tl.sqrt(tl.sum(acc, 0)) + eps)
        oc = tl.arange(0, BK)
        cm = oc < k
        lg = tl.zeros([BK], mt)
        for j0 in range(0, m, BLOCK):
            offs = j0 + tl.arange(0, BLOCK)
            msk = offs < m
            v = tl.load(z_ptr + r * m + offs, mask=msk, other=0.0).to(mt) * inv
            if HAS_B:
                v += tl.load(b_ptr + offs, mask=msk, other=0.0).to(mt)
            h = tl.where(msk, tl.maximum(v, 0.0), 0.0)
            tl.store(z_ptr + r * m + offs, h.to(z_ptr.dtype.element_ty), mask=msk)
            e = tl.load(e_ptr + oc[:, None] * m + offs[None, :], mask=cm[:, None] & msk[None, :],
                        other=0.0).to(mt)
            lg += tl.sum(e * h[None, :], 1)
        lg = tl.where(cm, lg * inv_t, -float("inf"))
        mx = tl.max(lg, 0)
        ex = tl.where(cm, tl.exp(lg - mx), 0.0)
        se = tl.sum(ex, 0)
        lab = tl.load(y_ptr + r)
        ly = tl.sum(tl.where(oc == lab, lg, 0.0), 0)
        tl.store(loss_ptr + r, scale * (mx + tl.log(se) - ly))
        dl = scale * inv_t * (ex / se - tl.where(oc == lab, 1.0, 0.0))
        dl = tl.where(cm, dl, 0.0)
        tl.store(dl_ptr + r * k + oc, dl, mask=cm)
        for j0 in range(0, m, BLOCK):
            offs = j0 + tl.arange(0, BLOCK)
            msk = offs < m
            h = tl.load(z_ptr + r * m + offs, mask=msk, other=0.0).to(mt)
            e = tl.load(e_ptr + oc[:, None] * m + offs[None, :], mask=cm[:, None] & msk[None, :],
                        other=0.0).to(mt)
            g = tl.where(h > 0, tl.sum(dl[:, None] * e, 0), 0.0)
            tl.store(dz_ptr + r * m + offs, (g * inv).to(dz_ptr.dtype.element_ty), mask=msk)
            if HAS_B:
                tl.atomic_add(db_ptr + offs, g.to(db_ptr.dtype.element_ty), mask=msk)

    @triton.jit
    def _act(v, ACT: tl.constexpr):
        if ACT == 0:
            return _sigmoid(v)
        elif ACT == 1:
            e = tl.exp(-2.0 * tl.abs(v))
            t = (1.0 - e) / (1.0 + e)
            return tl.where(v >= 0, t, -t)
        else:
            return tl.maximum(v, 0.0)

    @triton.jit
    def _act_grad(v, h, ACT: tl.constexpr):
        if ACT == 0:
            return h * (1.0 - h)
        elif ACT == 1:
            return 1.0 - h * h
        else:
            return tl.where(v > 0, 1.0, 0.0)

    @triton.jit
    def _tp_rows_kernel(z_ptr, b_ptr, proj_ptr, y_ptr, dz_ptr, loss_ptr, db_ptr, prm_ptr, m,
                        HAS_B: tl.constexpr, ACT: tl.constexpr, SIGN: tl.constexpr,
                        F64: tl.constexpr, BLOCK: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        mt = tl.float64 if F64 else tl.float32
        scale = tl.load(prm_ptr)  # 1/N in the math dtype
        lab = tl.load(y_ptr + r)
        lacc = tl.zeros([BLOCK], mt)
        for j0 in range(0, m, BLOCK):
            offs = j0 + tl.arange(0, BLOCK)
            msk = offs < m
            v = tl.load(z_ptr + r * m + offs, mask=msk, other=0.0).to(mt)
            if HAS_B:
                v += tl.load(b_ptr + offs, mask=msk, other=0.0).to(mt)
            h = _act(v, ACT).to(mt)
            t = tl.load(proj_ptr + lab * m + offs, mask=msk, other=0.0).to(mt)
            if SIGN:
                t = tl.where(t > 0, 1.0, tl.where(t < 0, -1.0, 0.0)).to(mt)
            e = tl.where(msk, h - t, 0.0)
            lacc += e * e
            dd = scale * e * _act_grad(v, h, ACT)
            tl.store(z_ptr + r * m + offs, h.to(z_ptr.dtype.element_ty), mask=msk)
            tl.store(dz_ptr + r * m + offs, dd.to(dz_ptr.dtype.element_ty), mask=msk)
            if HAS_B:
                tl.atomic_add(db_ptr + offs, dd.to(db_ptr.dtype.element_ty), mask=msk)
        tl.store(loss_ptr + r, 0.5 * scale * tl.sum(lacc, 0))

    @triton.jit
    def _pool_kernel(f_ptr, out_ptr, prm_ptr, c, s, F64: tl.constexpr, BC: tl.constexpr,
                     BS: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        mt = tl.float64 if F64 else tl.float32
        inv_s = tl.load(prm_ptr)  # 1/S in the math dtype
        for c0 in range(0, c, BC):
            oc = c0 + tl.arange(0, BC)
            acc = tl.zeros([BC], mt)
            for s0 in range(0, s, BS):
                os_ = s0 + tl.arange(0, BS)
                msk = (oc[:, None] < c) & (os_[None, :] < s)
                tile = tl.load(f_ptr + (r * c + oc[:, None]) * s + os_[None, :], mask=msk,
                               other=0.0).to(mt)
                acc += tl.sum(tile, 1)
            tl.store(out_ptr + r * c + oc, acc * inv_s, mask=oc < c)

    @triton.jit
    def _ce_rows_kernel(l_ptr, y_ptr, dl_ptr, loss_ptr, prm_ptr, k, BLOCK: tl.constexpr):
        # loss_r = (logsumexp(l_r) - l_r[y_r]) / N, dl_r = (softmax(l_r) - onehot(y_r)) / N, over
        # the row's tiles of BLOCK classes (block_for caps BLOCK at 2048: a head with more
        # classes than one tile - an ImageNet-21k or a word-level head - needs every tile):
        # the row max, then sum_j exp(l_j - max), then dl, three passes over the row.
        r = tl.program_id(0).to(tl.int64)
        scale = tl.load(prm_ptr)  # 1/N in the math dtype
        row = l_ptr + r * k
        offs = tl.arange(0, BLOCK)
        mx = tl.max(tl.load(row + offs, mask=offs < k, other=-float("inf")), 0)
        for j0 in range(BLOCK, k, BLOCK):
            o = j0 + offs
            mx = tl.maximum(mx, tl.max(tl.load(row + o, mask=o < k, other=-float("inf")), 0))
        v = tl.load(row + offs, mask=offs < k, other=-float("inf"))
        se = tl.sum(tl.where(offs < k, tl.exp(v - mx), 0.0), 0)
        for j0 in range(BLOCK, k, BLOCK):
            o = j0 + offs
            v = tl.load(row + o, mask=o < k, other=-float("inf"))
            se += tl.sum(tl.where(o < k, tl.exp(v - mx), 0.0), 0)
        lab = tl.load(y_ptr + r)
        vy = tl.load(row + lab)
        tl.store(loss_ptr + r, scale * (mx + tl.log(se) - vy))
        for j0 in range(0, k, BLOCK):
            o = j0 + offs
            msk = o < k
            v = tl.load(row + o, mask=msk, other=-float("inf"))
            e = tl.where(msk, tl.exp(v - mx), 0.0)
            dl = scale * (e / se - tl.where(o == lab, 1.0, 0.0))
            tl.store(dl_ptr + r * k + o, dl, mask=msk)

    def _mt(dtype):
        return torch.float64 if dtype == torch.float64 else torch.float32

    def _labels_ok(y, k):
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= k):
            raise IndexError(f"y must hold class labels in [0, {k})")

    @triton_op("pypaper::local_ff_linear_triton", mutates_args=())
    def local_ff_linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                               num_pos: int, threshold: float, normalize: bool, eps: float
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(h, loss, grad_weight, grad_bias) of the Forward-Forward layer (see local_ff_linear)."""
        x, w = x.contiguous(), weight.contiguous()
        n, d, m = x.shape[0], x.shape[1], w.shape[0]
        mt = _mt(x.dtype)
        h = torch.mm(x, w.t())
        dz = torch.empty_like(h)
        rows = torch.zeros(n, dtype=mt, device=x.device)
        db = torch.zeros(m if bias is not None else 0, dtype=mt, device=x.device)
        if n and m and _launches(x):
            block = block_for(max(m, d))
            wrap_triton(_ff_rows_kernel)[(n,)](
                h, x, bias.contiguous() if bias is not None else h, dz, rows,
                db if bias is not None else rows,
                torch.tensor([threshold, eps, 1.0 / num_pos if num_pos else 0.0,
                              1.0 / (n - num_pos) if n > num_pos else 0.0], dtype=mt,
                             device=x.device), m, d, num_pos, HAS_B=bias is not None, NORM=normalize, F64=mt == torch.float64, BLOCK=block,
                num_warps=num_warps_for(block))
        gw = torch.mm(dz.t(), x) if n else torch.zeros_like(w)
        return h, rows.sum(), gw, db.to(w.dtype)

    @triton_op("pypaper::local_tp_linear_triton", mutates_args=())
    def local_tp_linear_triton(x: torch.Tensor, weight: torch.Tensor,
                               bias: Optional[torch.Tensor], proj: torch.Tensor, y: torch.Tensor,
                               activation: int, sign: bool
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(h, loss, grad_weight, grad_bias) of the target-projection layer (local_tp_linear)."""
        x, w = x.contiguous(), weight.contiguous()
        n, m = x.shape[0], w.shape[0]
        mt = _mt(x.dtype)
        h = torch.mm(x, w.t())
        dz = torch.empty_like(h)
        rows = torch.zeros(n, dtype=mt, device=x.device)
        db = torch.zeros(m if bias is not None else 0, dtype=mt, device=x.device)
        if n and m and _launches(x):
            _labels_ok(y, proj.shape[0])
            block = block_for(m)
            wrap_triton(_tp_rows_kernel)[(n,)](
                h, bias.contiguous() if bias is not None else h, proj.to(mt).contiguous(),
                y.contiguous(), dz, rows, db if bias is not None else rows,
                torch.tensor([1.0 / n], dtype=mt, device=x.device), m,
                HAS_B=bias is not None, ACT=activation, SIGN=sign, F64=mt == torch.float64,
                BLOCK=block, num_warps=num_warps_for(block))
        gw = torch.mm(dz.t(), x) if n else torch.zeros_like(w)
        return h, rows.sum(), gw, db.to(w.dtype)

    @triton_op("pypaper::local_head_triton", mutates_args=())
    def local_head_triton(feat: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                          y: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                     torch.Tensor]:
        """(loss, logits, grad_pooled, grad_weight, grad_bias) of the local head (local_head)."""
        mt = _mt(feat.dtype)
        n, c, k = feat.shape[0], feat.shape[1], weight.shape[0]
        s = 1
        for v in feat.shape[2:]:
            s *= v
        f = feat.contiguous()
        pooled = torch.empty(n, c, dtype=mt, device=feat.device)
        wt = weight.to(mt)
        if n and _launches(feat):
            _labels_ok(y, k)
            bc, bs = min(64, block_for(c)), min(64, block_for(s))
            wrap_triton(_pool_kernel)[(n,)](f, pooled,
                                            torch.tensor([1.0 / max(s, 1)], dtype=mt,
                                                         device=feat.device), c, s, F64=mt == torch.float64, BC=bc, BS=bs)
        logits = (torch.addmm(bias.to(mt), pooled, wt.t()) if bias is not None
                  else torch.mm(pooled, wt.t()))
        dl = torch.empty_like(logits)
        rows = torch.zeros(n, dtype=mt, device=feat.device)
        if n and _launches(feat):
            wrap_triton(_ce_rows_kernel)[(n,)](logits, y.contiguous(), dl, rows,
                                               torch.tensor([1.0 / n], dtype=mt,
                                                            device=feat.device), k, BLOCK=block_for(k))
        gb = dl.sum(0).to(weight.dtype) if bias is not None else weight.new_empty((0,))
        return rows.sum(), logits, dl @ wt, (dl.t() @ pooled).to(weight.dtype), gb

    @triton_op("pypaper::local_ff_sf_linear_triton", mutates_args=())
    def local_ff_sf_linear_triton(x: torch.Tensor, class_x: torch.Tensor, weight: torch.Tensor,
                                  bias: Optional[torch.Tensor], y: torch.Tensor, normalize: bool,
                                  eps: float, temperature: float
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                             torch.Tensor, torch.Tensor]:
        """(h, E, loss, grad_weight, grad_bias) of the single-forward FF layer
        (local_ff_sf_linear): one GEMM for [x; class_x], the class rows' E in torch (k rows),
        one Triton program per data row (h, the k similarities, CE, dh -> dZ, db), then
        dE = dlogits^T H and the single dW GEMM [dZ; dZ_c]^T [x; class_x]."""
        x, cx, w = x.contiguous(), class_x.contiguous(), weight.contiguous()
        n, d, m, k = x.shape[0], x.shape[1], w.shape[0], cx.shape[0]
        if k > SF_MAX_CLASSES:
            # A program holds a row's k logits in one tile of block_for(k) <= 2048 lanes: the
            # classes past it were left out of the softmax (a wrong loss and gradient).
            raise ValueError(f"class_x: the Triton single-forward kernel takes up to "
                             f"{SF_MAX_CLASSES} classes (one tile per row), got {k}")
        mt = _mt(x.dtype)
        xa = torch.cat([x, cx])
        za = torch.mm(xa, w.t())
        zc = za[n:].to(mt)
        if normalize:
            zc = zc / (cx.to(mt).norm(dim=1, keepdim=True) + eps)
        if bias is not None:
            zc = zc + bias.to(mt)
        emb = torch.relu(zc)
        h = za[:n]
        dz = torch.empty_like(h)
        dl = torch.zeros(n, k, dtype=mt, device=x.device)
        rows = torch.zeros(n, dtype=mt, device=x.device)
        db = torch.zeros(m if bias is not None else 0, dtype=mt, device=x.device)
        if n and m and _launches(x):
            _labels_ok(y, k)
            block = block_for(max(m, d))
            wrap_triton(_sf_rows_kernel)[(n,)](
                h, x, bias.contiguous() if bias is not None else h, emb.contiguous(),
                y.contiguous(), dz, dl, rows, db if bias is not None else rows,
                torch.tensor([eps, 1.0 / temperature, 1.0 / max(n, 1)], dtype=mt,
                             device=x.device), m, d, k, HAS_B=bias is not None, NORM=normalize,
                F64=mt == torch.float64, BLOCK=min(block, 256), BK=block_for(k),
                num_warps=num_warps_for(min(block, 256)))
        de = dl.t() @ h.to(mt)
        gc = torch.where(emb > 0, de, torch.zeros_like(de))
        if bias is not None:
            db = db + gc.sum(0)
        if normalize:
            gc = gc / (cx.to(mt).norm(dim=1, keepdim=True) + eps)
        gw = torch.mm(torch.cat([dz, gc.to(x.dtype)]).t(), xa)
        gb = db.to(w.dtype) if bias is not None else w.new_empty((0,))
        return h.clone(), emb.to(x.dtype), rows.sum(), gw, gb

    from ._registration import register_autograd as _register_autograd

    _register_autograd("_triton")
