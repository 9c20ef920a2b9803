"""The CUDA kernels of the local ops (kernels/cuda/local_kernels.cu via csrc/local/local_cuda.cpp)
against the plain-PyTorch reference run on CPU copies; skipped without a GPU. Tolerances as
tests/local/test_ops.py (float32 / bfloat16 rows; the bias gradient is summed by atomics)."""
import pytest
import torch

import pypaper
import pypaper.local as L
from pypaper import _ext
from pypaper.local import reference as R

from .test_ops import _compare, _inputs, _labels, _ref64

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not _ext.CUDA_KERNELS, reason="pypaper._C was built without CUDA kernels"),
]

DTYPES = [torch.float64, torch.float32, torch.bfloat16]


def _cuda(*ts):
    return [None if t is None else t.cuda() for t in ts]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d,m", [(1, 5, 3), (129, 65, 300), (256, 1024, 1024)])
def test_ff_cuda(dtype, n, d, m):
    x, w, b = _inputs(n, d, m, dtype)
    with pypaper.use_backend("cuda"):
        out = L.ff_linear(*_cuda(x, w, b), num_pos=n // 2, threshold=1.5)
    args = (x, w, b, n // 2, 1.5)
    _compare([t.cpu() for t in out], R.ff_linear(*args), dtype, _ref64(R.ff_linear, args))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu"])
@pytest.mark.parametrize("sign", [False, True])
def test_tp_cuda(dtype, activation, sign):
    x, w, b = _inputs(77, 40, 130, dtype)
    proj = torch.rand(10, 130) * 2 - 1
    y = _labels(77, 10)
    with pypaper.use_backend("cuda"):
        out = L.tp_linear(*_cuda(x, w, b, proj, y), activation, sign)
    args = (x, w, b, proj, y, L.ops.activation_id(activation), sign)
    _compare([t.cpu() for t in out], R.tp_linear(*args), dtype, _ref64(R.tp_linear, args),
             "mean" if activation == "relu" else "max")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d,m,k", [(1, 5, 3, 1), (77, 40, 300, 10), (256, 1024, 1024, 10)])
@pytest.mark.parametrize("normalize", [True, False])
def test_ff_sf_cuda(dtype, n, d, m, k, normalize):
    x, w, b = _inputs(n, d, m, dtype)
    cx = torch.randn(k, d, generator=torch.Generator().manual_seed(3)).to(dtype)
    y = _labels(n, k)
    assert L.ops._SF_CUDA
    with pypaper.use_backend("cuda"):
        out = L.ff_sf_linear(*_cuda(x, cx, w, b, y), normalize=normalize, temperature=0.5)
    args = (x, cx, w, b, y, normalize, 1e-4, 0.5)
    _compare([t.cpu() for t in out], R.ff_sf_linear(*args), dtype, _ref64(R.ff_sf_linear, args))


@pytest.mark.parametrize("dtype", DTYPES)
def test_head_cuda(dtype):
    feat = torch.randn(33, 20, 5, 5).to(dtype)
    w, b = (torch.randn(10, 20) * 0.5).to(dtype), (torch.randn(10) * 0.1).to(dtype)
    y = _labels(33, 10)
    with pypaper.use_backend("cuda"):
        out = L.local_head(*_cuda(feat, w, b, y))
    args = (feat, w, b, y)
    _compare([t.cpu() for t in out], R.local_head(*args), dtype, _ref64(R.local_head, args))


def test_cuda_bad_labels():
    x, w, b = _cuda(*_inputs(4, 5, 3, torch.float32))
    with pytest.raises(ValueError, match="y must hold class labels"):
        L.tp_linear(x, w, b, torch.rand(2, 3).cuda(), torch.tensor([0, 1, 2, 0]).cuda())


def test_local_sequential_cuda_autocast_fp16_with_grad_scaler():
    # fp16 features from the blocks, fp32 head weights cast for the op; GradScaler unscales
    # (not yet run: no GPU was lent when it was written)
    torch.manual_seed(0)
    from torch import nn
    blocks = [nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
              nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())]
    x, y = torch.randn(8, 3, 8, 8).cuda(), torch.randint(0, 5, (8,)).cuda()
    net = L.LocalSequential([b.cuda() for b in blocks], "dgl", num_classes=5,
                            example_input=x[:2]).cuda()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        losses = net.train_step(x, y)
    assert torch.isfinite(losses).all()
    assert all(p.grad.dtype == torch.float32 for p in net.parameters() if p.requires_grad)
    net.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.float16):
        losses = net.train_step(x, y, opt, scaler=scaler)
    assert torch.isfinite(losses).all()
