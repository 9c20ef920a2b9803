"""Triton twins of the local ops (pypaper/local/triton_kernels.py) against the plain-PyTorch
reference. Without a GPU the kernels run under TRITON_INTERPRET=1 on CPU tensors (set below,
before triton or pypaper is imported), at small sizes.

Tolerances: as tests/local/test_ops.py (float64 1e-10, float32 2e-5 of the output's scale,
bfloat16 at most 2x the plain-PyTorch bf16 error against float64 plus 2e-3; the bias gradient is
summed by atomic adds, in another order than the reference's sum).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

pytest.importorskip("triton")

import pypaper  # noqa: E402
import pypaper.local as L  # noqa: E402
from pypaper.local import reference as R  # noqa: E402

from .test_ops import _compare, _inputs, _labels, _ref64  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
tk = pytest.importorskip("pypaper.local.triton_kernels")
_OK, _WHY = tk.triton_available(DEVICE)

pytestmark = [pytest.mark.triton, pytest.mark.skipif(not _OK, reason=_WHY)]

DTYPES = [torch.float64, torch.float32, torch.bfloat16]


def _dev(*ts):
    return [None if t is None else t.to(DEVICE) for t in ts]


def _cpu(out):
    return [t.cpu() for t in out]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d,m", [(1, 5, 3), (7, 33, 20), (19, 16, 40)])
@pytest.mark.parametrize("normalize", [True, False])
def test_ff_triton(dtype, n, d, m, normalize):
    x, w, b = _inputs(n, d, m, dtype)
    p = n // 2
    with pypaper.use_backend("triton"):
        out = L.ff_linear(*_dev(x, w, b), num_pos=p, threshold=1.2, normalize=normalize)
    args = (x, w, b, p, 1.2, normalize)
    _compare(_cpu(out), R.ff_linear(*args), dtype, _ref64(R.ff_linear, args))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu"])
@pytest.mark.parametrize("sign", [False, True])
def test_tp_triton(dtype, activation, sign):
    x, w, b = _inputs(11, 17, 21, dtype)
    proj = torch.rand(4, 21, generator=torch.Generator().manual_seed(2)) * 2 - 1
    y = _labels(11, 4)
    with pypaper.use_backend("triton"):
        out = L.tp_linear(*_dev(x, w, b, proj, y), activation, sign)
    args = (x, w, b, proj, y, L.ops.activation_id(activation), sign)
    metric = "mean" if activation == "relu" else "max"
    _compare(_cpu(out), R.tp_linear(*args), dtype, _ref64(R.tp_linear, args), metric)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 3), (9, 5, 3, 3), (6, 70, 9, 9)])
def test_head_triton(dtype, shape):
    g = torch.Generator().manual_seed(5)
    feat = torch.randn(*shape, generator=g).to(dtype)
    w = (torch.randn(10, shape[1], generator=g) * 0.5).to(dtype)
    b = (torch.randn(10, generator=g) * 0.1).to(dtype)
    y = _labels(shape[0], 10)
    with pypaper.use_backend("triton"):
        out = L.local_head(*_dev(feat, w, b, y))
    args = (feat, w, b, y)
    _compare(_cpu(out), R.local_head(*args), dtype, _ref64(R.local_head, args))


def test_triton_head_loss_gradients():
    g = torch.Generator().manual_seed(6)
    feat = torch.randn(5, 4, 2, 2, generator=g, dtype=torch.float64, device=DEVICE,
                       requires_grad=True)
    w = torch.randn(3, 4, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    y = _labels(5, 3).to(DEVICE)
    with pypaper.use_backend("triton"):
        loss, _ = L.head_loss(feat, w, None, y)
        gf, gw = torch.autograd.grad(loss, (feat, w))
    ref, _, _ = R.head_loss(feat, w, None, y)
    rf, rw = torch.autograd.grad(ref, (feat, w))
    torch.testing.assert_close((gf, gw), (rf, rw), atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d,m", [(1, 5, 3), (13, 33, 20)])
@pytest.mark.parametrize("normalize", [True, False])
def test_ff_sf_triton(dtype, n, d, m, normalize):
    x, w, b = _inputs(n, d, m, dtype)
    cx = torch.randn(5, d, generator=torch.Generator().manual_seed(3)).to(dtype)
    y = _labels(n, 5)
    with pypaper.use_backend("triton"):
        out = L.ff_sf_linear(*_dev(x, cx, w, b, y), normalize=normalize, temperature=0.5)
    args = (x, cx, w, b, y, normalize, 1e-4, 0.5)
    _compare(_cpu(out), R.ff_sf_linear(*args), dtype, _ref64(R.ff_sf_linear, args))


def test_launch_heuristics():
    assert tk.block_for(1) == 16 and tk.block_for(100) == 128 and tk.block_for(10 ** 6) == 2048
    assert tk.num_warps_for(16) == 1 and tk.num_warps_for(2048) == 8
