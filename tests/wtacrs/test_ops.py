"""The WTA-CRS ops on the default CPU backend against the plain-PyTorch reference."""
import pytest
import torch
import torch.nn.functional as F

import pypaper
from pypaper import wtacrs as W
from pypaper.wtacrs import reference as R

from .helpers import DTYPES, GEMM_TOL, NORM_RTOL, heavy_rows


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(0, 5), (1, 1), (7, 3), (129, 33), (300, 1024)])
def test_row_norms(shape, dtype):
    x = torch.randn(shape, dtype=torch.float64).to(dtype)
    got = W.row_norms(x)
    want = R.row_norms(x)
    assert got.dtype == R.math_dtype(dtype) and got.shape == (shape[0],)
    torch.testing.assert_close(got, want, rtol=NORM_RTOL[dtype], atol=0)


def test_row_norms_strided_rows():
    base = torch.randn(50, 80)
    x = base[::3, 10:70]  # strided rows, unit-stride features
    torch.testing.assert_close(W.row_norms(x), R.row_norms(x), rtol=1e-5, atol=0)
    xt = torch.randn(40, 30).t()  # column-major: copied
    torch.testing.assert_close(W.row_norms(xt), R.row_norms(xt), rtol=1e-5, atol=0)


@pytest.mark.parametrize("wta", [True, False])
@pytest.mark.parametrize("n,k", [(1, 1), (7, 3), (129, 40), (1000, 300), (5000, 17)])
@pytest.mark.parametrize("sdtype", [torch.float32, torch.float64])
def test_select_equals_reference(n, k, wta, sdtype):
    scores = R.row_norms(heavy_rows(n, 8)).to(sdtype)
    for seed in (0, 1, 2**40 + 3):
        idx, sc = W.select(scores, k, wta, seed)
        ridx, rsc = R.select(scores, k, wta, seed)
        assert torch.equal(idx, ridx)
        torch.testing.assert_close(sc, rsc, rtol=1e-12 if sdtype == torch.float64 else 1e-6,
                                   atol=0)
        assert idx.dtype == torch.int64 and sc.dtype == sdtype
        assert int(idx.min()) >= 0 and int(idx.max()) < n


def test_select_structure_wta():
    """The WTA set is the largest-weight rows, first, with scale 1; then draws outside it."""
    scores = torch.cat([torch.tensor([100.0, 50.0, 30.0]), torch.full((997,), 0.01)])
    idx, sc = W.select(scores, 20, True, 3)
    assert idx[:3].tolist() == [0, 1, 2] and sc[:3].tolist() == [1.0, 1.0, 1.0]
    c = int((sc == 1.0).sum())
    assert not set(idx[c:].tolist()) & set(idx[:c].tolist())
    # CRS: no deterministic part, the big rows drawn with replacement
    idx, sc = W.select(scores, 20, False, 3)
    assert (idx == 0).sum() > 1


def test_select_all_rows_and_degenerate_scores():
    s = torch.rand(10)
    idx, sc = W.select(s, 10, True, 0)
    assert idx.tolist() == list(range(10)) and bool((sc == 1).all())
    for bad in (torch.zeros(50), torch.full((50,), float("nan")), torch.full((50,), float("inf"))):
        idx, sc = W.select(bad, 10, True, 1)  # uniform weights: every draw scale N/k... finite
        ridx, rsc = R.select(bad, 10, True, 1)
        assert torch.equal(idx, ridx) and bool(torch.isfinite(sc).all())
        torch.testing.assert_close(sc, rsc)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("store", [None, torch.bfloat16, torch.float16, torch.float32])
def test_gather_scale_bit_exact(dtype, store):
    if dtype == torch.float64 and store not in (None,):
        pytest.skip("float64 x keeps float64")
    x = torch.randn(129, 37, dtype=torch.float64).to(dtype)
    idx = torch.randint(0, 129, (40,))
    sc = torch.rand(40, dtype=R.math_dtype(dtype)) * 10
    for s in (sc, None):
        got = W.gather_scale(x, idx, s, store)
        assert torch.equal(got, R.gather_scale(x, idx, s, store))
    xs = x[::2]  # strided rows
    idx2 = idx.clamp_max(xs.shape[0] - 1)
    assert torch.equal(W.gather_scale(xs, idx2, sc, store), R.gather_scale(xs, idx2, sc, store))


@pytest.mark.parametrize("dtype", DTYPES)
def test_sampled_grad_weight(dtype):
    gy = torch.randn(200, 24, dtype=torch.float64).to(dtype)
    xk = torch.randn(60, 33, dtype=torch.float64).to(dtype)
    idx = torch.randint(0, 200, (60,))
    got = W.sampled_grad_weight(gy, idx, xk)
    want = R.sampled_grad_weight(gy.double(), idx, xk.double())
    rtol, atol = GEMM_TOL[dtype]
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol * 60)


@pytest.mark.parametrize("wta", [True, False])
def test_sample_equals_reference(wta):
    x = heavy_rows(1000, 64)
    g = torch.rand(1000)
    for gn in (None, g):
        xk, idx = W.sample(x, gn, 300, wta, 11)
        rxk, ridx = R.sample(x, gn, 300, wta, 11)
        assert torch.equal(idx, ridx)
        torch.testing.assert_close(xk, rxk, rtol=2e-6, atol=0)
    xk, idx = W.sample(x, None, 300, wta, 11, torch.bfloat16)
    assert xk.dtype == torch.bfloat16 and xk.shape == (300, 64)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_forward_exact_and_backward_formula(bias):
    x = torch.randn(150, 40, requires_grad=True)
    w = torch.randn(24, 40, requires_grad=True)
    b = torch.randn(24, requires_grad=True) if bias else None
    xk, idx = W.sample(x.detach(), None, 45, True, 4)
    y = W.linear(x, w, b, xk, idx)
    assert torch.equal(y, F.linear(x, w, b))
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, w] + ([b] if bias else []), gy)
    torch.testing.assert_close(grads[0], gy @ w)
    torch.testing.assert_close(grads[1], gy[idx].t() @ xk)
    if bias:
        torch.testing.assert_close(grads[2], gy.sum(0))


def test_keep_all_rows_is_exact_and_gradcheck():
    """With k = N every row is kept with scale 1: the estimator is dY^T X and gradcheck holds for
    every input; with k < N gradcheck holds for x and b (exact), not W (an estimate)."""
    x = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    xk, idx = W.sample(x.detach(), None, 9, True, 0)
    assert torch.equal(xk, x.detach())
    torch.autograd.gradcheck(lambda x, w, b: W.linear(x, w, b, xk, idx), (x, w, b))
    xk, idx = W.sample(x.detach(), None, 3, True, 0)
    wd = w.detach()
    torch.autograd.gradcheck(lambda x, b: W.linear(x, wd, b, xk, idx), (x, b))


def _samples():
    x = torch.randn(33, 12)
    w = torch.randn(7, 12)
    b = torch.randn(7)
    xk, idx = W.sample(x, None, 10, True, 1)
    return x, w, b, xk, idx


def test_opcheck():
    x, w, b, xk, idx = _samples()
    ops = torch.ops.pypaper
    seed = torch.tensor([5])
    s = W.row_norms(x)
    torch.library.opcheck(ops.wtacrs_row_norms, (x,))
    torch.library.opcheck(ops.wtacrs_select, (s, 10, True, seed))
    torch.library.opcheck(ops.wtacrs_select, (s, 10, False, seed))
    torch.library.opcheck(ops.wtacrs_gather_scale, (x, idx, None, torch.bfloat16))
    torch.library.opcheck(ops.wtacrs_gather_scale, (x, idx, torch.rand(10), None))
    torch.library.opcheck(ops.wtacrs_sample, (x, torch.rand(33), 10, True, seed, None))
    torch.library.opcheck(ops.wtacrs_sampled_grad_weight, (torch.randn(33, 7), idx, xk))
    torch.library.opcheck(ops.wtacrs_linear_backward,
                          (torch.randn(33, 7), w, xk, idx, True, True, True))
    for rg in (False, True):
        args = (x.clone().requires_grad_(rg), w.clone().requires_grad_(rg),
                b.clone().requires_grad_(rg), xk, idx)
        # the W gradient is an estimate: opcheck's autograd test compares against the op's own
        # backward, not finite differences
        torch.library.opcheck(ops.wtacrs_linear, args)


def test_compile_fullgraph_layer():
    torch.manual_seed(0)
    layer = W.WTACRSLinear(16, 8, keep_ratio=0.5, min_k=1)
    x = torch.randn(4, 10, 16)

    def step(x):
        return layer(x).square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(x)
    loss.backward()
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()
    torch.testing.assert_close(loss, layer(x).square().sum())


def test_reference_backend_matches_cpu_backend():
    x, w, b, xk, idx = _samples()
    with pypaper.use_backend("reference"):
        rxk, ridx = W.sample(x, None, 10, True, 1)
        wr = w.clone().requires_grad_()
        W.linear(x, wr, b, rxk, ridx).sum().backward()
    assert torch.equal(ridx, idx)
    wc = w.clone().requires_grad_()
    W.linear(x, wc, b, xk, idx).sum().backward()
    torch.testing.assert_close(wr.grad, wc.grad)
