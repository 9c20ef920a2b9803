"""The Triton twins under TRITON_INTERPRET=1 on CPU tensors (set by tests/conftest.py when no GPU
is present), small sizes, against the reference and the C++ ops."""
import os

import pytest
import torch

import pypaper
from pypaper import wtacrs as W
from pypaper.wtacrs import reference as R

from .helpers import NORM_RTOL, heavy_rows

tk = W._registration.load_triton()
pytestmark = pytest.mark.skipif(
    not tk.triton_available(torch.device("cuda" if torch.cuda.is_available() else "cpu"))[0],
    reason="triton unavailable here")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _t(x):
    return x.to(DEV)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (129, 70)])
def test_row_norms(shape, dtype):
    x = _t(torch.randn(shape, dtype=torch.float64).to(dtype))
    got = torch.ops.pypaper.wtacrs_row_norms_triton(x)
    torch.testing.assert_close(got.cpu(), R.row_norms(x.cpu()), rtol=NORM_RTOL[dtype], atol=0)


@pytest.mark.parametrize("wta", [True, False])
@pytest.mark.parametrize("n,k", [(1, 1), (7, 3), (300, 90)])
def test_select_equals_reference(n, k, wta):
    scores = R.row_norms(heavy_rows(n, 8))
    for seed in (0, 5):
        idx, sc = torch.ops.pypaper.wtacrs_select_triton(_t(scores), k, wta,
                                                         _t(torch.tensor([seed])))
        ridx, rsc = R.select(scores, k, wta, seed)
        assert torch.equal(idx.cpu(), ridx)
        torch.testing.assert_close(sc.cpu(), rsc, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype,store", [(torch.float32, None), (torch.float32, torch.bfloat16),
                                         (torch.bfloat16, None), (torch.float16, torch.float32),
                                         (torch.float64, None)])
def test_gather_scale_bit_exact(dtype, store):
    x = torch.randn(60, 37, dtype=torch.float64).to(dtype)
    idx = torch.randint(0, 60, (20,))
    sc = torch.rand(20, dtype=R.math_dtype(dtype))
    for s in (sc, None):
        got = torch.ops.pypaper.wtacrs_gather_scale_triton(_t(x), _t(idx),
                                                           None if s is None else _t(s), store)
        assert torch.equal(got.cpu(), R.gather_scale(x, idx, s, store))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dims", [(1, 1, 1), (50, 7, 33), (130, 70, 65)])
def test_sampled_grad_weight(dims, dtype):
    n, d_out, d_in = dims
    gy = torch.randn(n, d_out, dtype=dtype)
    k = max(1, n // 3)
    idx = torch.randint(0, n, (k,))
    xk = torch.randn(k, d_in, dtype=dtype)
    got = torch.ops.pypaper.wtacrs_sampled_grad_weight_triton(_t(gy), _t(idx), _t(xk))
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got.cpu(), R.sampled_grad_weight(gy, idx, xk), rtol=tol,
                               atol=tol * k)


def test_layer_on_the_triton_backend_matches_cpu():
    torch.manual_seed(0)
    base = torch.nn.Linear(24, 10)
    x = torch.randn(3, 40, 24)
    grads = {}
    for backend in ("triton", "cpu" if DEV == "cpu" else "cuda"):
        layer = W.WTACRSLinear.from_linear(base, keep_ratio=0.3, min_k=1,
                                           generator=torch.Generator().manual_seed(3)).to(DEV)
        base.zero_grad()
        with pypaper.use_backend(backend):
            layer(_t(x)).square().sum().backward()
        grads[backend] = base.weight.grad.cpu().clone()
    a, b = grads.values()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_opcheck_triton_ops():
    """Schema and fake-tensor checks everywhere; the tracing checks need compiled kernels (GPU):
    interpreted kernels cannot be traced."""
    x = _t(torch.randn(20, 6))
    seed = _t(torch.tensor([2]))
    ops = torch.ops.pypaper
    utils = None if DEV == "cuda" else ("test_schema", "test_faketensor")
    xk, idx = ops.wtacrs_sample_triton(x, None, 7, True, seed, None)
    scores = ops.wtacrs_row_norms_triton(x)
    gy = _t(torch.randn(20, 4))
    w = _t(torch.randn(4, 6))
    for op, args in ((ops.wtacrs_row_norms_triton, (x,)),
                     (ops.wtacrs_select_triton, (scores, 7, True, seed)),
                     (ops.wtacrs_gather_scale_triton, (x, idx, None, None)),
                     (ops.wtacrs_sample_triton, (x, None, 7, False, seed, None)),
                     (ops.wtacrs_sampled_grad_weight_triton, (gy, idx, xk)),
                     (ops.wtacrs_linear_backward_triton, (gy, w, xk, idx, True, True, True)),
                     (ops.wtacrs_linear_triton, (x, w.requires_grad_(), None, xk, idx))):
        kw = {} if utils is None else {"test_utils": utils}
        torch.library.opcheck(op, args, **kw)


def test_bad_arguments_name_them():
    x = _t(torch.randn(10, 4))
    with pytest.raises(ValueError, match="k must be in"):
        torch.ops.pypaper.wtacrs_select_triton(_t(torch.rand(10)), 11, True, _t(torch.tensor([0])))
    with pytest.raises(TypeError, match="dtype must be"):
        torch.ops.pypaper.wtacrs_gather_scale_triton(x, _t(torch.tensor([1])), None, torch.int8)
    with pytest.raises(ValueError, match="must be a 2-D"):
        torch.ops.pypaper.wtacrs_row_norms_triton(_t(torch.randn(2, 2, 2)))
