"""The CUDA kernels against the CPU ops and the reference (skipped without a GPU)."""
import pytest
import torch

from pypaper import wtacrs as W
from pypaper.wtacrs import reference as R

from .helpers import DTYPES, GEMM_TOL, NORM_RTOL, heavy_rows

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(0, 3), (1, 1), (7, 33), (1000, 1024)])
def test_row_norms(shape, dtype):
    x = torch.randn(shape, dtype=torch.float64).to(dtype)
    got = W.row_norms(x.cuda()).cpu()
    torch.testing.assert_close(got, R.row_norms(x), rtol=NORM_RTOL[dtype], atol=0)


@pytest.mark.parametrize("wta", [True, False])
@pytest.mark.parametrize("n,k", [(1, 1), (7, 3), (5000, 1500)])
def test_select_matches_cpu(n, k, wta):
    scores = R.row_norms(heavy_rows(n, 8))
    for seed in (0, 9):
        idx, sc = W.select(scores.cuda(), k, wta, seed)
        cidx, csc = W.select(scores, k, wta, seed)
        assert torch.equal(idx.cpu(), cidx)
        torch.testing.assert_close(sc.cpu(), csc, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_and_grad_weight(dtype):
    x = torch.randn(300, 70, dtype=torch.float64).to(dtype)
    idx = torch.randint(0, 300, (90,))
    sc = torch.rand(90, dtype=R.math_dtype(dtype))
    assert torch.equal(W.gather_scale(x.cuda(), idx.cuda(), sc.cuda()).cpu(),
                       R.gather_scale(x, idx, sc))
    gy = torch.randn(300, 130, dtype=torch.float64).to(dtype)
    xk = R.gather_scale(x, idx, sc)
    got = W.sampled_grad_weight(gy.cuda(), idx.cuda(), xk.cuda()).cpu().double()
    rtol, atol = GEMM_TOL[dtype]
    torch.testing.assert_close(got, R.sampled_grad_weight(gy.double(), idx, xk.double()),
                               rtol=rtol, atol=atol * 90)


def test_layer_on_cuda_trains_and_keeps_fewer_bytes():
    torch.manual_seed(0)
    base = torch.nn.Linear(256, 128).cuda()
    layer = W.WTACRSLinear.from_linear(base, keep_ratio=0.3)
    x = torch.randn(8, 512, 256, device="cuda", requires_grad=True)
    y = layer(x)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, base.weight, base.bias))
    y.square().mean().backward()
    assert torch.isfinite(base.weight.grad).all()
    torch.library.opcheck(torch.ops.pypaper.wtacrs_sample,
                          (x.detach(), None, 100, True, torch.tensor([1], device="cuda"), None))
