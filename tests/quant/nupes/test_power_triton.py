"""Triton twins of the power-quantizer ops (pypaper/quant/power_triton.py) against the
plain-PyTorch reference, under TRITON_INTERPRET=1 on CPU tensors (small sizes) or compiled on
CUDA.

Tolerances: codes and values exact (the kernel compares against and looks up the reference's own
tables); grad_x exact; grad_max_abs / grad_exponent: rtol 1e-10 in float64, 1e-5 in float32
(per-program partial sums in float64, another summation order; "ste" terms use numpy's / libdevice's
log and exp).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

pytest.importorskip("triton")

import pypaper  # noqa: E402
from pypaper.quant import power as P  # noqa: E402

tk = P.load_triton()
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_OK, _WHY = tk.triton_available(DEVICE)
pytestmark = [pytest.mark.triton, pytest.mark.skipif(not _OK, reason=_WHY)]
OPS = torch.ops.pypaper


def heavy(shape, dtype):
    return torch.distributions.StudentT(3.0).sample(shape).to(dtype).to(DEVICE)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(6, 33), (1,), (7,), (129,), (3, 129), (0,)])
def test_forward_ops_equal_reference(bits, dtype, shape):
    x = heavy(shape, dtype)
    m = P.channel_max_abs(x, per_channel=len(shape) > 1)
    a = torch.tensor(0.6, dtype=torch.float64, device=DEVICE)
    qmax = P.bits_to_qmax(bits)
    q = OPS.power_quantize_triton(x, m, a, qmax)
    assert torch.equal(q.cpu(), P.reference_codes(x.cpu(), m.cpu(), a.cpu(), qmax))
    y = OPS.power_fake_quantize_triton(x, m, a, qmax, True)
    assert torch.equal(y.cpu(), P.reference_fake_quantize(x.cpu(), m.cpu(), a.cpu(), qmax))
    d = OPS.power_dequantize_triton(q, m, a, qmax, dtype)
    assert torch.equal(d.cpu(), y.cpu())


def test_nan_and_per_channel_exponent():
    x = heavy((4, 40), torch.float32)
    x[1, 3] = float("nan")
    m = torch.nan_to_num(x, 0.0).abs().amax(1)
    a = torch.tensor([0.4, 0.7, 1.0, 1.3], dtype=torch.float64, device=DEVICE)
    y = OPS.power_fake_quantize_triton(x, m, a, 7, True).cpu()
    want = P.reference_fake_quantize(x.cpu(), m.cpu(), a.cpu(), 7)
    assert torch.isnan(y[1, 3]) and torch.allclose(y, want, equal_nan=True, rtol=0, atol=0)
    for i in range(4):  # row i uses exponent a[i]
        assert torch.equal(OPS.power_quantize_triton(x[i:i + 1], m[i:i + 1], a[i], 7).cpu(),
                           P.reference_codes(x[i:i + 1].cpu(), m[i:i + 1].cpu(), a[i].cpu(), 7))


@pytest.mark.parametrize("ste", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backward_equals_reference(ste, dtype):
    x = heavy((5, 70), dtype)
    m = P.channel_max_abs(x) * 0.8
    a = torch.tensor(0.6, dtype=torch.float64, device=DEVICE)
    g = torch.randn_like(x)
    dx, dm, da = OPS.power_fake_quantize_backward_triton(g, x, m, a, 7, True, True, ste)
    assert not any(t._is_view() for t in (dx, dm, da))  # an op returns no views
    rx, rm, ra = P.reference_backward(g.cpu(), x.cpu(), m.cpu(), a.cpu(), 7, ste)
    rtol = 1e-10 if dtype == torch.float64 else 1e-5
    assert torch.equal(dx.cpu(), rx)
    assert torch.allclose(dm.cpu(), rm, rtol=rtol, atol=1e-9)
    assert torch.allclose(da.cpu(), ra, rtol=rtol, atol=1e-9)


def test_autograd_through_the_triton_backend():
    x = heavy((3, 20), torch.float32)
    m = P.channel_max_abs(x)
    a = torch.tensor(0.7, requires_grad=True, device=DEVICE)
    xg = x.clone().requires_grad_()
    with pypaper.use_backend("triton"):
        assert P.backend_for(x) == "triton"
        y = P.power_fake_quantize(xg, a, 4, m)
    y.sum().backward()
    a2 = torch.tensor(0.7, requires_grad=True, device=DEVICE)
    with pypaper.use_backend("reference"):
        P.power_fake_quantize(x, a2, 4, m).sum().backward()
    assert torch.equal(y.detach().cpu(), P.reference_fake_quantize(x.cpu(), m.cpu(),
                                                                   a.detach().cpu(), 7))
    assert torch.allclose(a.grad, a2.grad, rtol=1e-5)
    assert torch.equal(xg.grad, torch.ones_like(x))


def test_bad_inputs():
    x = heavy((4, 5), torch.float32)
    with pytest.raises(ValueError, match="qmax"):
        OPS.power_quantize_triton(x, torch.ones(4, device=DEVICE),
                                  torch.tensor(0.5, device=DEVICE), 300)
    with pytest.raises(ValueError, match="max_abs"):
        OPS.power_quantize_triton(x, torch.ones(3, device=DEVICE),
                                  torch.tensor(0.5, device=DEVICE), 7)
    with pytest.raises(TypeError, match="x must be"):
        OPS.power_quantize_triton(x.half(), torch.ones(4, device=DEVICE),
                                  torch.tensor(0.5, device=DEVICE), 7)
