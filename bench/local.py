"""Benchmarks of pypaper.local: fused local-loss layers and gradient-in-forward training.

Layer cases (mode "fwd+bwd" = the layer's forward *and* its local update: output, loss, dW, db):
  "local ff linear"     Forward-Forward, x [N, d] (half positive, half negative), W [d, d]
  "local ff-sf linear"  single-forward FF with 10 class embeddings
  "local tp linear"     tpSGD (sigmoid), and "local tp-sign linear" (tanh, sign targets)
  "local head"          global pool -> linear -> CE and its gradient, feat [N, C, 8, 8]
Providers: "2 gemms" (the forward GEMM x W^T and the dW GEMM dZ^T x alone, into preallocated
outputs: the floor of any implementation and the baseline of the speedup column; for ff-sf the
GEMMs it really needs, on the N data rows and the 10 class rows [x; class_x] together, with
"2 gemms, data rows only" shown beside them), "pypaper" (the
fused op, default backend, returning fresh gradient tensors), "pypaper into .grad" (the same op
adding dW into an existing gradient buffer through the dW GEMM itself - what FFLinear /
TargetProjectionLinear.local_step do), "reference" (the unfused plain-PyTorch loss, gradients by autograd)
and "compiled-reference" (torch.compile of that loss, its backward by AOTAutograd).
The issue's figure: pypaper within 1.1x of "2 gemms" (speedup >= 0.91) at N = 256, d = 1024.

Training-step cases ("local mlp step L<depth>", "local cnn step L<depth>"): one optimizer-free
training step of a deep MLP / CNN, end-to-end "backprop" (the baseline) against local learning
("local dgl": each block with a pool -> linear head; "local man": EMA next block + bias + head).
The "saved for bwd" column is the *peak* of live saved-for-backward bytes during the step
(saved-tensor hooks; parameters excluded): backprop holds every block's activations at once,
local learning one block's. The issue's figure: >= 40% lower, independent of depth.
"""
import math

from . import harness  # noqa: F401  (first: sets THP_MEM_ALLOC_ENABLE before torch loads)
from .harness import Case, Provider

import torch  # noqa: E402
from torch import nn  # noqa: E402

import pypaper.local as L  # noqa: E402
from pypaper.local import reference as R  # noqa: E402

QUICK_LAYER = [(256, 1024)]
FULL_LAYER = [(256, 1024), (1024, 1024), (256, 4096), (4096, 512)]
NUM_CLASSES = 10


def _gemm_provider(x, w, m, name="2 gemms"):
    n = x.shape[0]
    z = torch.empty(n, m, dtype=x.dtype)
    dz = torch.randn(n, m, dtype=x.dtype)
    dw = torch.empty_like(w)

    def call():
        torch.mm(x, w.t(), out=z)
        torch.mm(dz.t(), x, out=dw)
        return dw

    return Provider(name, {"fwd+bwd": call})


def _ref_providers(loss_fn, params):
    """The unfused reference and its torch.compile: loss, then autograd for the parameters."""
    def ref():
        loss = loss_fn(*params)
        return torch.autograd.grad(loss, [p for p in params if p is not None])

    compiled = torch.compile(loss_fn)

    def comp():
        loss = compiled(*params)
        return torch.autograd.grad(loss, [p for p in params if p is not None])

    return [Provider("reference", {"fwd+bwd": ref}), Provider("compiled-reference", {"fwd+bwd": comp})]


def _layer_providers(kind, n, d, dtype, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g).to(dtype)
    w = (torch.randn(d, d, generator=g) / math.sqrt(d)).to(dtype)
    b = torch.zeros(d, dtype=dtype)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    wl, bl = w.clone().requires_grad_(), b.clone().requires_grad_()
    out = [_gemm_provider(x, w, d)]
    if kind == "ff":
        p = n // 2
        fused = lambda: L.ff_linear(x, w, b, num_pos=p, threshold=2.0)  # noqa: E731
        loss_fn = lambda w, b: R.ff_loss(x, w, b, p, 2.0)[0]  # noqa: E731
    elif kind == "ff-sf":
        cx = torch.randn(NUM_CLASSES, d, generator=g).to(dtype)
        # The variant runs the class rows through the same layer: its GEMMs are [x; class_x] W^T
        # and [dZ; dZ_c]^T [x; class_x] (N + 10 rows). Those are its floor ("2 gemms"); the
        # GEMMs of the N data rows alone are kept as "2 gemms, data rows only".
        out = [_gemm_provider(torch.cat([x, cx]), w, d),
               _gemm_provider(x, w, d, "2 gemms, data rows only")]
        fused = lambda: L.ff_sf_linear(x, cx, w, b, y)  # noqa: E731
        loss_fn = lambda w, b: R.ff_sf_loss(x, cx, w, b, y)[0]  # noqa: E731
    else:
        act, sign = ("sigmoid", False) if kind == "tp" else ("tanh", True)
        proj = torch.rand(NUM_CLASSES, d, generator=g) * 2 - 1
        fused = lambda: L.tp_linear(x, w, b, proj, y, act, sign)  # noqa: E731
        aid = L.ops.activation_id(act)
        loss_fn = lambda w, b: R.tp_loss(x, w, b, proj, y, aid, sign)[0]  # noqa: E731
    out.append(Provider("pypaper", {"fwd+bwd": fused}))
    if kind in ("ff", "ff-sf", "tp", "tp-sign"):
        gw, gb = torch.empty_like(w), torch.empty_like(b)
        if kind == "ff-sf":
            into = lambda: L.ops.ff_sf_linear_into(x, cx, w, b, y, gw, gb,  # noqa: E731
                                                   accumulate=True)
        elif kind == "ff":
            into = lambda: L.ops.ff_linear_into(x, w, b, gw, gb, num_pos=n // 2,  # noqa: E731
                                                threshold=2.0, accumulate=True)
        else:
            into = lambda: L.ops.tp_linear_into(x, w, b, proj, y, gw, gb, act, sign,  # noqa: E731
                                                accumulate=True)
        out.append(Provider("pypaper into .grad", {"fwd+bwd": into}))
    out += _ref_providers(loss_fn, (wl, bl))
    return out


def layer_case(kind, n, d, dtype, device) -> Case:
    e = torch.empty((), dtype=dtype).element_size()
    moved = e * (2 * n * d + 2 * d * d + 2 * d)  # x read, h written, W read, dW written, b, db
    return Case(f"local {kind} linear", (n, d, d), dtype, device,
                bytes_moved={"fwd+bwd": moved},
                providers=lambda: _layer_providers(kind, n, d, dtype, device),
                bytes_note="x, h, W, dW, b, db once each (the ops are GEMM-bound: see the "
                           "speedup against 2 gemms"
                           + ("; ff-sf's 2 gemms run its N data rows and 10 class rows "
                              "[x; class_x] together, the GEMMs the variant needs)"
                              if kind == "ff-sf" else ")"),
                baseline="2 gemms")


def _head_providers(n, c, s, dtype, device):
    g = torch.Generator().manual_seed(0)
    feat = torch.randn(n, c, s, s, generator=g).to(dtype)
    w = (torch.randn(NUM_CLASSES, c, generator=g) / math.sqrt(c)).to(dtype)
    b = torch.zeros(NUM_CLASSES, dtype=dtype)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    fl = feat.clone().requires_grad_()
    wl, bl = w.clone().requires_grad_(), b.clone().requires_grad_()

    def fused():
        loss, _ = L.head_loss(fl, wl, bl, y)
        return torch.autograd.grad(loss, (fl, wl, bl))

    loss_fn = lambda f, w, b: R.head_loss(f, w, b, y)[0]  # noqa: E731
    provs = [Provider("pypaper", {"fwd+bwd": fused})]
    provs += _ref_providers(loss_fn, (fl, wl, bl))
    return provs


def head_case(n, c, s, dtype, device) -> Case:
    e = torch.empty((), dtype=dtype).element_size()
    return Case("local head", (n, c, s, s), dtype, device,
                bytes_moved={"fwd+bwd": e * 2 * n * c * s * s},
                providers=lambda: _head_providers(n, c, s, dtype, device),
                bytes_note="feat read, grad_feat written")


# ---- training steps ------------------------------------------------------------------------------

def _mlp_blocks(depth, width, d_in):
    sizes = [d_in] + [width] * depth
    return [nn.Sequential(nn.Linear(a, b), nn.ReLU()) for a, b in zip(sizes[:-1], sizes[1:])]


def _cnn_blocks(depth, ch):
    blocks, c_in = [], 3
    for _ in range(depth):
        blocks.append(nn.Sequential(nn.Conv2d(c_in, ch, 3, padding=1), nn.BatchNorm2d(ch),
                                    nn.ReLU()))
        c_in = ch
    return blocks


def _step_providers(arch, depth, batch, width, device):
    torch.manual_seed(0)
    if arch == "mlp":
        x = torch.randn(batch, width)
        make = lambda: _mlp_blocks(depth, width, width)  # noqa: E731
    else:
        x = torch.randn(batch, 3, 16, 16)
        make = lambda: _cnn_blocks(depth, width)  # noqa: E731
    y = torch.randint(0, NUM_CLASSES, (batch,))
    provs = []
    model = nn.Sequential(*make(), L.LinearHead(width, NUM_CLASSES))
    params = list(model.parameters())
    bp = lambda: L.backprop_step(model, x, y)  # noqa: E731
    p = Provider("backprop", {"fwd+bwd": bp})
    p.saved_bytes = L.peak_saved_bytes(bp, params)
    model.zero_grad(set_to_none=True)
    provs.append(p)
    kinds = ("dgl", "man") if arch == "mlp" else ("dgl",)
    for kind in kinds:
        net = L.LocalSequential(make(), kind, num_classes=NUM_CLASSES, example_input=x[:2],
                                # MAN: its heads' own default (what was measured: before
                                # 2026-12-07 LocalSequential ignored aux_depth for MAN)
                                aux_depth=0 if kind == "dgl" else None)
        call = (lambda net: lambda: net.train_step(x, y))(net)
        p = Provider(f"local {kind}", {"fwd+bwd": call})
        p.saved_bytes = L.peak_saved_bytes(call, list(net.parameters()))
        net.zero_grad(set_to_none=True)
        provs.append(p)
    return provs


def step_case(arch, depth, batch, width, device) -> Case:
    shape = (batch, width) if arch == "mlp" else (batch, width, 16, 16)
    return Case(f"local {arch} step L{depth}", shape, torch.float32, device,
                bytes_moved={"fwd+bwd": 0},
                providers=lambda: _step_providers(arch, depth, batch, width, device),
                bytes_note="not counted (a whole model); see the saved-for-bwd column (peak "
                           "live saved-for-backward bytes during the step)",
                memory=True, baseline="backprop")


def cases(device: str = "cpu", quick: bool = False, numel: int = None) -> list:
    """Quick: the four layer ops at N = 256, d = 1024 and the head at 256 x 256 x 8 x 8, fp32;
    MLP steps (batch 256, width 512) and CNN steps (batch 32, 32 channels, 16 x 16) at depth 8
    and 16. Full: more layer shapes, bf16, depths 4..16. ``numel`` shrinks everything (smoke)."""
    f32 = torch.float32
    if device != "cpu":
        return [layer_case("ff", 256, 1024, f32, device)] if quick else []
    shapes = QUICK_LAYER if quick else FULL_LAYER
    if numel:
        shapes = [(max(8, numel // 256), 64)]
    kinds = ("ff", "ff-sf", "tp", "tp-sign")
    out = [layer_case(k, n, d, f32, device) for n, d in shapes for k in kinds]
    if not quick:
        out += [layer_case(k, 256, 1024, torch.bfloat16, device) for k in kinds]
    out.append(head_case(16 if numel else 256, 32 if numel else 256, 8, f32, device))
    depths = (2, 4) if numel else ((8, 16) if quick else (4, 8, 12, 16))
    mlp = (16, 32) if numel else (256, 512)
    cnn = (4, 8) if numel else (32, 32)
    out += [step_case("mlp", dp, *mlp, device) for dp in depths]
    out += [step_case("cnn", dp, *cnn, device) for dp in depths]
    return out
