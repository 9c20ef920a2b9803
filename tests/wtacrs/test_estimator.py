"""Statistics of the WTA-CRS estimator of grad_W = dY^T X (Liu et al., NeurIPS 2023), through the
C++ kernels: unbiased (the mean of many samples converges to the exact gradient, its error
shrinking like 1/sqrt(draws)), lower variance than plain CRS on heavy-tailed token norms, and
exact at keep_ratio = 1."""
import torch

from pypaper import wtacrs as W

from .helpers import heavy_rows


def _estimate(x, dy, k, wta, seed, use_dy=True):
    scores = W.row_norms(x)
    if use_dy:
        scores = scores * W.row_norms(dy)
    idx, sc = W.select(scores, k, wta, seed)
    xk = W.gather_scale(x, idx, sc)
    return W.sampled_grad_weight(dy, idx, xk)


def _problem(n=200, d_in=6, d_out=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = heavy_rows(n, d_in, torch.float64, generator=g)
    dy = heavy_rows(n, d_out, torch.float64, generator=g)
    return x, dy, dy.t() @ x


def test_unbiased_error_shrinks_like_inverse_sqrt_draws():
    x, dy, exact = _problem()
    for wta, use_dy in ((True, True), (False, False)):
        ests = torch.stack([_estimate(x, dy, 30, wta, s, use_dy) for s in range(1000)])
        err = lambda m: float((ests[:m].mean(0) - exact).norm() / exact.norm())  # noqa
        single = float(((ests - exact).norm(dim=(1, 2)) ** 2).mean().sqrt() / exact.norm())
        # the expected error of a mean of m independent draws is single / sqrt(m): a bias would
        # stop the shrinking at its size
        assert err(1000) < 3.0 * single / 1000 ** 0.5, (wta, use_dy)
        assert err(1000) < err(16) / 2.5, (wta, use_dy)  # expected: sqrt(1000 / 16) = 7.9x


def test_wta_has_lower_variance_than_crs_on_heavy_tails():
    x, dy, exact = _problem(n=400, seed=1)
    mse = {}
    for wta in (True, False):
        errs = [float((_estimate(x, dy, 40, wta, s) - exact).norm() ** 2) for s in range(300)]
        mse[wta] = sum(errs) / len(errs)
    assert mse[True] < 0.7 * mse[False], mse


def test_keep_ratio_one_is_exact():
    x, dy, exact = _problem(n=50)
    for wta in (True, False):
        torch.testing.assert_close(_estimate(x, dy, 50, wta, 3), exact)
    layer = W.WTACRSLinear(6, 5, keep_ratio=1.0, min_k=1).double()
    ref = torch.nn.Linear(6, 5).double()
    ref.load_state_dict(layer.state_dict())
    xi = torch.randn(3, 17, 6, dtype=torch.float64)
    gy = torch.randn(3, 17, 5, dtype=torch.float64)
    layer(xi).backward(gy)
    ref(xi).backward(gy)
    assert torch.equal(layer.weight.grad, ref.weight.grad)
