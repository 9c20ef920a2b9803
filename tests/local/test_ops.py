"""The fused local-loss ops (C++ CPU backend) against the unfused plain-PyTorch reference.

Tolerances (max abs error, against the reference in the same dtype; all outputs):
  float64: 1e-10 (the same math, the GEMMs summed in another order)
  float32: 2e-5 relative to the output's scale (1 + max |ref|)
  bfloat16: the fused op's error against the float64 reference (on the same bf16 inputs) is at
            most 2x the plain-PyTorch bf16 version's error plus one bf16 ulp of the output's scale
            (2^-7 (1 + max |ref|): the fused ops round the GEMM output to bf16 before adding
            the bias in fp32, F.linear rounds once);
            for tpSGD with ReLU (a derivative that jumps at z = 0, where bf16 rounding of z flips
            single mask entries, each worth a whole row's |e x| / N) the mean error is compared
            instead of the max.
The gradients are those of autograd on the unfused loss (reference.*_loss); gradcheck checks that
the op's own gradient outputs are the derivatives of its own loss output, in float64.
"""
import math

import pytest
import torch

import pypaper
import pypaper.local as L
from pypaper.local import reference as R

pytestmark = pytest.mark.skipif(L.backend_for(torch.zeros(1)) != "cpu",
                                reason="the C++ local ops (pypaper._C) are not built")

F64_TOL = 1e-10
F32_TOL = 2e-5


def _inputs(n, d, m, dtype, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(m, d, generator=g, dtype=torch.float64) / math.sqrt(d) * 2
    b = torch.randn(m, generator=g, dtype=torch.float64) * 0.1 if bias else None
    return x.to(dtype), w.to(dtype), None if b is None else b.to(dtype)


def _labels(n, k, seed=1):
    return torch.randint(0, k, (n,), generator=torch.Generator().manual_seed(seed))


def _compare(fused, ref, dtype, ref64=None, metric="max"):
    for i, (a, r) in enumerate(zip(fused, ref)):
        assert a.shape == r.shape, (i, a.shape, r.shape)
        assert a.dtype == r.dtype, (i, a.dtype, r.dtype)
        if a.numel() == 0:
            continue
        if dtype == torch.float64:
            torch.testing.assert_close(a, r, atol=F64_TOL, rtol=0)
        elif dtype == torch.float32:
            scale = 1 + float(r.abs().max())
            assert float((a - r).abs().max()) <= F32_TOL * scale, i
        else:
            r64 = ref64[i].double()
            red = (lambda t: t.abs().max()) if metric == "max" else (lambda t: t.abs().mean())
            err_fused = float(red(a.double() - r64))
            err_plain = float(red(r.double() - r64))
            assert err_fused <= 2 * err_plain + 2 ** -7 * (1 + float(r64.abs().max())), \
                (i, err_fused, err_plain)


def _ref64(fn, args):
    return fn(*[a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                for a in args])


DTYPES = [torch.float64, torch.float32, torch.bfloat16]
SHAPES = [(1, 5, 3), (7, 9, 7), (129, 33, 129), (37, 64, 16)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d,m", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_ff_linear_matches_reference(dtype, n, d, m, bias):
    x, w, b = _inputs(n, d, m, dtype, bias=bias)
    p = n // 2
    fused = L.ff_linear(x, w, b, num_pos=p, threshold=1.5)
    args = (x, w, b, p, 1.5)
    _compare(fused, R.ff_linear(*args), dtype, _ref64(R.ff_linear, args))


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("num_pos", [0, 3, 7])
def test_ff_linear_all_positive_or_negative(normalize, num_pos):
    x, w, b = _inputs(7, 6, 5, torch.float64)
    fused = L.ff_linear(x, w, b, num_pos=num_pos, threshold=0.7, normalize=normalize)
    _compare(fused, R.ff_linear(x, w, b, num_pos, 0.7, normalize), torch.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d,m", SHAPES + [(70, 24, 300)])  # 300: two 128-wide vector tiles + a tail
def test_ff_sf_linear_matches_reference(dtype, n, d, m):
    x, w, b = _inputs(n, d, m, dtype)
    cx = torch.randn(5, d, generator=torch.Generator().manual_seed(3)).to(dtype)
    y = _labels(n, 5)
    fused = L.ff_sf_linear(x, cx, w, b, y, temperature=0.5)
    args = (x, cx, w, b, y, True, 1e-4, 0.5)
    _compare(fused, R.ff_sf_linear(*args), dtype, _ref64(R.ff_sf_linear, args))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d,m", SHAPES)
@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu"])
@pytest.mark.parametrize("sign", [False, True])
def test_tp_linear_matches_reference(dtype, n, d, m, activation, sign):
    x, w, b = _inputs(n, d, m, dtype)
    proj = torch.rand(10, m, generator=torch.Generator().manual_seed(4)) * 2 - 1
    y = _labels(n, 10)
    fused = L.tp_linear(x, w, b, proj, y, activation, sign)
    args = (x, w, b, proj, y, L.ops.activation_id(activation), sign)
    metric = "mean" if activation == "relu" else "max"
    _compare(fused, R.tp_linear(*args), dtype, _ref64(R.tp_linear, args), metric)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 3), (7, 5, 3, 3), (129, 16, 2, 5), (4, 6, 7)])
@pytest.mark.parametrize("bias", [True, False])
def test_local_head_matches_reference(dtype, shape, bias):
    g = torch.Generator().manual_seed(5)
    feat = torch.randn(*shape, generator=g).to(dtype)
    w = (torch.randn(10, shape[1], generator=g) * 0.5).to(dtype)
    b = (torch.randn(10, generator=g) * 0.1).to(dtype) if bias else None
    y = _labels(shape[0], 10)
    fused = L.local_head(feat, w, b, y)
    args = (feat, w, b, y)
    _compare(fused, R.local_head(*args), dtype, _ref64(R.local_head, args))


def test_tp_target_is_a_column_of_P():
    # proj = P^T: the target of label c is column c of P, i.e. P @ onehot(c).
    P = torch.randn(6, 4, dtype=torch.float64)  # [out, classes]
    y = torch.tensor([3, 0, 2])
    onehot = torch.nn.functional.one_hot(y, 4).double()
    torch.testing.assert_close(R.tp_target(P.t().contiguous(), y), onehot @ P.t())


# ---- gradients: autograd on the unfused loss, and gradcheck of the op's own loss -------------

def test_gradients_equal_autograd_on_unfused_losses():
    x, w, b = _inputs(11, 8, 6, torch.float64)
    wl, bl = w.clone().requires_grad_(), b.clone().requires_grad_()
    loss, _ = R.ff_loss(x, wl, bl, 5, 1.0)
    gw, gb = torch.autograd.grad(loss, (wl, bl))
    _, lf, gwf, gbf = L.ff_linear(x, w, b, num_pos=5, threshold=1.0)
    torch.testing.assert_close((lf, gwf, gbf), (loss.detach(), gw, gb), atol=1e-12, rtol=0)
    proj, y = torch.randn(3, 6, dtype=torch.float64), _labels(11, 3)
    loss, _ = R.tp_loss(x, wl, bl, proj, y, 0)
    gw, gb = torch.autograd.grad(loss, (wl, bl))
    _, lf, gwf, gbf = L.tp_linear(x, w, b, proj, y, "sigmoid")
    torch.testing.assert_close((lf, gwf, gbf), (loss.detach(), gw, gb), atol=1e-12, rtol=0)


@pytest.mark.parametrize("which", ["ff", "ff_raw", "sf", "tp", "tp_sign"])
def test_gradcheck_layer_ops(which):
    x, w, b = _inputs(6, 5, 4, torch.float64, seed=7)
    w.requires_grad_()
    b.requires_grad_()
    cx = torch.randn(3, 5, dtype=torch.float64)
    y = _labels(6, 3)
    proj = torch.randn(3, 4, dtype=torch.float64)
    if which == "ff":
        f = lambda w, b: L.ff_linear(x, w, b, num_pos=3, threshold=0.8)[1]  # noqa: E731
    elif which == "ff_raw":
        f = lambda w, b: L.ff_linear(x, w, b, num_pos=2, threshold=0.8, normalize=False)[1]  # noqa: E731
    elif which == "sf":
        f = lambda w, b: L.ff_sf_linear(x, cx, w, b, y, temperature=0.7)[2]  # noqa: E731
    elif which == "tp":
        f = lambda w, b: L.tp_linear(x, w, b, proj, y, "tanh")[1]  # noqa: E731
    else:
        f = lambda w, b: L.tp_linear(x, w, b, proj, y, "sigmoid", sign=True)[1]  # noqa: E731
    assert torch.autograd.gradcheck(f, (w, b))


def test_gradcheck_head():
    g = torch.Generator().manual_seed(8)
    feat = torch.randn(5, 4, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    y = _labels(5, 3)
    assert torch.autograd.gradcheck(lambda f, w, b: L.head_loss(f, w, b, y)[0], (feat, w, b))


def test_layer_op_keeps_no_activation_for_backward():
    # What autograd saves for the loss's backward: the op's parameter gradients only.
    x, w, b = _inputs(64, 32, 48, torch.float32)
    w.requires_grad_()
    b.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t,
                                                  lambda t: t):
        L.ff_linear(x, w, b, num_pos=32)
    assert sorted(saved) == sorted([torch.Size([48, 32]), torch.Size([48])])
    feat = torch.randn(16, 8, 5, 5, requires_grad=True)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t,
                                                  lambda t: t):
        L.head_loss(feat, torch.randn(10, 8), None, _labels(16, 10))
    assert torch.Size([16, 8, 5, 5]) not in saved  # the feature map is not kept


# ---- opcheck, compile, layouts ---------------------------------------------------------------

def _samples(requires_grad):
    x, w, b = _inputs(9, 7, 5, torch.float32)
    w.requires_grad_(requires_grad)
    b.requires_grad_(requires_grad)
    cx = torch.randn(4, 7)
    y = _labels(9, 4)
    proj = torch.randn(4, 5)
    feat = torch.randn(9, 5, 3, 2, requires_grad=requires_grad)
    hw = torch.randn(4, 5, requires_grad=requires_grad)
    ops = torch.ops.pypaper
    return [
        (ops.local_ff_linear.default, (x, w, b, 4, 2.0, True, 1e-4)),
        (ops.local_ff_linear.default, (x, w, None, 0, 1.0, False, 0.0)),
        (ops.local_ff_sf_linear.default, (x, cx, w, b, y, True, 1e-4, 0.5)),
        (ops.local_tp_linear.default, (x, w, b, proj, y, 0, False)),
        (ops.local_tp_linear.default, (x, w, None, proj, y, 1, True)),
        (ops.local_head.default, (feat, hw, None, y)),
        (ops.local_head.default, (feat.detach().flatten(1)[:, :5].contiguous(), hw, None, y)),
    ]


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(requires_grad):
    for op, args in _samples(requires_grad):
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph():
    x, w, b = _inputs(16, 12, 8, torch.float32)
    proj, y = torch.rand(3, 8), _labels(16, 3)

    def step(x, w, b):
        h, l1, gw, gb = L.ff_linear(x, w, b, num_pos=8)
        h2, l2, gw2, gb2 = L.tp_linear(h, w[:, :8].contiguous(), b, proj, y, "sigmoid")
        loss, logits = L.head_loss(h2.unsqueeze(-1), w[:3, :8].contiguous(), None, y)
        return l1 + l2 + loss, gw, gw2, logits

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, w, b), step(x, w, b))


def test_non_contiguous_inputs():
    x, w, b = _inputs(10, 12, 6, torch.float64)
    xt = torch.randn(12, 20, dtype=torch.float64).t()[::2]  # strided rows and columns
    wt = w.t().contiguous().t()
    for xx in (xt, x[:, ::1]):
        _compare(L.ff_linear(xx, wt, b, num_pos=3), R.ff_linear(xx, w, b, 3, 2.0),
                 torch.float64)
    feat = torch.randn(6, 4, 5, 3, dtype=torch.float64).transpose(2, 3)
    hw = torch.randn(3, 4, dtype=torch.float64)
    y = _labels(6, 3)
    _compare(L.local_head(feat, hw, None, y), R.local_head(feat, hw, None, y), torch.float64)


def test_empty_batch():
    x, w, b = _inputs(0, 6, 4, torch.float32)
    h, loss, gw, gb = L.ff_linear(x, w, b, num_pos=0)
    assert h.shape == (0, 4) and float(loss) == 0 and not gw.any() and not gb.any()
    h, loss, gw, gb = L.tp_linear(x, w, b, torch.rand(3, 4), torch.zeros(0, dtype=torch.long))
    assert h.shape == (0, 4) and float(loss) == 0 and not gw.any()


def test_reference_backend_override():
    x, w, b = _inputs(8, 6, 4, torch.float64)
    with pypaper.use_backend("reference"):
        assert L.backend_for(x) == "reference"
        ref = L.ff_linear(x, w, b, num_pos=4)
    _compare(L.ff_linear(x, w, b, num_pos=4), ref, torch.float64)


# ---- bad inputs ---------------------------------------------------------------------------------

def test_bad_inputs_name_the_argument():
    x, w, b = _inputs(6, 5, 4, torch.float32)
    y = _labels(6, 3)
    proj = torch.rand(3, 4)
    with pytest.raises(ValueError, match="threshold must be finite"):
        L.ff_linear(x, w, b, num_pos=3, threshold=float("nan"))
    with pytest.raises(ValueError, match="threshold must be finite"):
        L.ff_linear(x, w, b, num_pos=3, threshold=float("inf"))
    with pytest.raises(ValueError, match="num_pos"):
        L.ff_linear(x, w, b, num_pos=7)
    with pytest.raises(ValueError, match="weight must have shape"):
        L.ff_linear(x, w[:, :3], b, num_pos=3)
    with pytest.raises(TypeError, match="x must be a floating tensor"):
        L.ff_linear(x.long(), w, b, num_pos=3)
    with pytest.raises(ValueError, match="bias must have shape"):
        L.ff_linear(x, w, b[:2], num_pos=3)
    with pytest.raises(TypeError, match="y must be an int64 tensor"):
        L.tp_linear(x, w, b, proj, y.int())
    with pytest.raises(TypeError, match="y must be an int64 tensor"):
        L.tp_linear(x, w, b, proj, y.float())
    with pytest.raises(ValueError, match=r"y must hold class labels in \[0, 3\)"):
        L.tp_linear(x, w, b, proj, y + 3)
    with pytest.raises(ValueError, match=r"y must hold class labels"):
        L.tp_linear(x, w, b, proj, y - 1)
    with pytest.raises(ValueError, match="y must have shape"):
        L.tp_linear(x, w, b, proj, y[:4])
    with pytest.raises(ValueError, match="activation must be one of"):
        L.tp_linear(x, w, b, proj, y, "gelu")
    with pytest.raises(ValueError, match="proj must have shape"):
        L.tp_linear(x, w, b, proj[:, :2], y)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        L.ff_sf_linear(x, torch.randn(3, 5), w, b, y, temperature=0.0)
    with pytest.raises(ValueError, match=r"y must hold class labels in \[0, 3\)"):
        L.ff_sf_linear(x, torch.randn(3, 5), w, b, y + 1)
    feat = torch.randn(6, 8, 2, 2)
    with pytest.raises(ValueError, match="block output feat has 8 channels"):
        L.local_head(feat, torch.randn(3, 5), None, y)
    with pytest.raises(ValueError, match=r"y must hold class labels in \[0, 3\)"):
        L.local_head(feat, torch.randn(3, 8), None, y + 3)


def test_direct_op_calls_check_too():
    # The C++ checks guard torch.ops.pypaper.* called without the Python wrapper.
    x, w, b = _inputs(6, 5, 4, torch.float32)
    ops = torch.ops.pypaper
    with pytest.raises(ValueError, match="threshold must be finite"):
        ops.local_ff_linear(x, w, b, 3, float("nan"), True, 1e-4)
    with pytest.raises(IndexError, match="y must hold class labels"):
        ops.local_tp_linear(x, w, b, torch.rand(3, 4), torch.full((6,), 5), 0, False)
    with pytest.raises(RuntimeError, match="y must be an int64 tensor"):
        ops.local_head(torch.randn(6, 4), torch.randn(3, 4), None, torch.zeros(6, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="weight has 5 input features but x has 4"):
        ops.local_ff_linear(x[:, :4], w, b, 3, 1.0, True, 1e-4)


# ---- the *_out ops: outputs in place, gradients accumulated by the dW GEMM ----------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("accumulate", [False, True])
def test_into_ops_match_the_functional_ops(dtype, accumulate):
    x, w, b = _inputs(37, 20, 24, dtype)
    y, proj = _labels(37, 5), torch.rand(5, 24)
    cx = torch.randn(5, 20, generator=torch.Generator().manual_seed(4)).to(dtype)
    for kind in ("ff", "sf", "tp"):
        gw0, gb0 = torch.randn_like(w), torch.randn_like(b)
        gw, gb = gw0.clone(), gb0.clone()
        if kind == "sf":
            h, e, loss = L.ops.ff_sf_linear_into(x, cx, w, b, y, gw, gb, temperature=0.7,
                                                 accumulate=accumulate)
            full = L.ff_sf_linear(x, cx, w, b, y, temperature=0.7)
            torch.testing.assert_close(e, full[1], atol=0, rtol=0)
            ref = (full[0], full[2], full[3], full[4])
        elif kind == "ff":
            h, loss = L.ops.ff_linear_into(x, w, b, gw, gb, num_pos=20, threshold=1.5,
                                           accumulate=accumulate)
            ref = L.ff_linear(x, w, b, num_pos=20, threshold=1.5)
        else:
            h, loss = L.ops.tp_linear_into(x, w, b, proj, y, gw, gb, "tanh", sign=True,
                                           accumulate=accumulate)
            ref = L.tp_linear(x, w, b, proj, y, "tanh", sign=True)
        base = (gw0, gb0) if accumulate else (0, 0)
        tol = dict(atol=1e-10, rtol=0) if dtype == torch.float64 else dict(atol=1e-5, rtol=1e-5)
        torch.testing.assert_close((h, loss), (ref[0], ref[1]), **tol)
        torch.testing.assert_close((gw, gb), (base[0] + ref[2], base[1] + ref[3]), **tol)


def test_opcheck_out_ops():
    x, w, b = _inputs(9, 7, 5, torch.float32)
    ops = torch.ops.pypaper
    y, proj = _labels(9, 3), torch.rand(3, 5)
    for acc in (False, True):
        torch.library.opcheck(ops.local_ff_linear_out.default,
                              (x, w, b, 4, 2.0, True, 1e-4, acc, torch.empty(9, 5),
                               torch.zeros(5, 7), torch.zeros(5)))
        torch.library.opcheck(ops.local_tp_linear_out.default,
                              (x, w, None, proj, y, 0, False, acc, torch.empty(9, 5),
                               torch.zeros(5, 7), None))
        torch.library.opcheck(ops.local_ff_sf_linear_out.default,
                              (x, torch.randn(3, 7), w, b, y, True, 1e-4, 0.5, acc,
                               torch.empty(9, 5), torch.zeros(5, 7), torch.zeros(5)))
    with pytest.raises(RuntimeError, match="grad_weight must be a contiguous tensor"):
        ops.local_ff_linear_out(x, w, b, 4, 2.0, True, 1e-4, True, torch.empty(9, 5),
                                torch.zeros(7, 5).t(), torch.zeros(5))


def test_into_ops_on_the_reference_backend():
    x, w, b = _inputs(12, 9, 7, torch.float64)
    gw, gb = torch.ones_like(w), torch.ones_like(b)
    with pypaper.use_backend("reference"):
        h, loss = L.ops.ff_linear_into(x, w, b, gw, gb, num_pos=6, accumulate=True)
    ref = L.ff_linear(x, w, b, num_pos=6)
    torch.testing.assert_close((h, loss, gw, gb), (ref[0], ref[1], 1 + ref[2], 1 + ref[3]),
                               atol=1e-10, rtol=0)


def test_ff_sf_outputs_survive_the_next_call():
    """The C++ op keeps per-thread scratch buffers between calls: nothing it returns may alias
    them (a second call with the same shapes must leave the first call's outputs intact)."""
    x, w, b = _inputs(40, 24, 30, torch.float32)
    cx = torch.randn(4, 24)
    first = L.ff_sf_linear(x, cx, w, b, _labels(40, 4))
    kept = [t.clone() for t in first]
    L.ff_sf_linear(torch.randn(40, 24), torch.randn(4, 24), w, b, _labels(40, 4))
    for a, k in zip(first, kept):
        assert torch.equal(a, k)
