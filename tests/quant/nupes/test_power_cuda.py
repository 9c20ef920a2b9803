"""CUDA kernels of the power quantizer (kernels/cuda/power_quant_kernels.cu) against the C++ CPU
op on CPU copies of the same inputs. Skipped without a GPU.

Tolerances: codes exact (thresholds rounded up to the data type from float64 tables: the GPU's
and glibc's pow agree to an ulp of float64, which moves a float32 threshold only when it lands
within that ulp of a float boundary); float32 values exact, float64 values within 2 ulp (the
level m·(k/qmax)^(1/a) in float64 with the device's pow); grad_x exact; grad_max_abs /
grad_exponent rtol 1e-9 (float64 block sums in another order).
"""
import pytest
import torch

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]


@pytest.fixture(scope="module")
def P():
    import pypaper  # noqa: F401  (loads pypaper._C)
    from pypaper.quant import power

    return power


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(64, 4097), (1,), (7,), (129,), (3, 129), (0,)])
def test_forward_matches_cpu(P, bits, dtype, shape):
    ops = torch.ops.pypaper
    x = torch.distributions.StudentT(3.0).sample(shape).to(dtype)
    m = P.channel_max_abs(x, per_channel=len(shape) > 1)
    a = torch.tensor(0.6, dtype=torch.float64)
    qmax = P.bits_to_qmax(bits)
    q = ops.power_quantize(x, m, a, qmax)
    qc = ops.power_quantize(x.cuda(), m.cuda(), a.cuda(), qmax)
    assert torch.equal(qc.cpu(), q)
    y = ops.power_fake_quantize(x, m, a, qmax, True)
    yc = ops.power_fake_quantize(x.cuda(), m.cuda(), a.cuda(), qmax, True).cpu()
    d = ops.power_dequantize(qc, m.cuda(), a.cuda(), qmax, dtype).cpu()
    if dtype == torch.float32:
        assert torch.equal(yc, y) and torch.equal(d, y)
    else:
        assert torch.allclose(yc, y, rtol=5e-16, atol=0) and torch.allclose(d, y, rtol=5e-16,
                                                                            atol=0)


@pytest.mark.parametrize("ste", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backward_matches_cpu(P, ste, dtype):
    ops = torch.ops.pypaper
    x = torch.distributions.StudentT(3.0).sample((33, 5000)).to(dtype)
    m = P.channel_max_abs(x) * 0.8
    a = torch.linspace(0.4, 1.2, 33, dtype=torch.float64)
    g = torch.randn_like(x)
    want = ops.power_fake_quantize_backward(g, x, m, a, 7, True, True, ste)
    got = ops.power_fake_quantize_backward(g.cuda(), x.cuda(), m.cuda(), a.cuda(), 7, True, True,
                                           ste)
    assert torch.equal(got[0].cpu(), want[0])
    for w, o in zip(want[1:], got[1:]):
        assert torch.allclose(o.cpu(), w, rtol=1e-9 if dtype == torch.float64 else 1e-5,
                              atol=1e-9)


def test_module_on_cuda(P):
    from pypaper.quant.nupes import PowerExponentConfig

    lin = torch.nn.Linear(64, 32)
    q = PowerExponentConfig(4).apply(lin, "lin")
    qc = PowerExponentConfig(4, exponent=float(q.exponent)).apply(lin.cuda(), "lin")
    x = torch.randn(8, 64)
    assert torch.allclose(qc(x.cuda()).cpu(), q(x), rtol=1e-5, atol=1e-6)
