"""The power-exponent quantizer ops (pypaper/quant/power.py) against their plain-PyTorch reference
and against the defining formula.

Tolerance table (against the reference in the same dtype):
  codes (int8), all dtypes:                 exact (same float64 tables, same comparisons)
  fake-quantized / dequantized values:      exact in float32 and float64 (a lookup of the same
                                            float64-computed levels); bfloat16 / float16: the
                                            float32 result cast (exact against that)
  against the formula round(qmax (|x|/m)^a) evaluated with pow in float64: codes exact (ties
                                            have measure zero), values within 2 ulp of float32
  grad_x:                                   exact (straight-through mask)
  grad_max_abs / grad_exponent (float64 sums): rtol 1e-10 (summation order differs)
"""
import math

import pytest
import torch

import pypaper
from pypaper.quant import power as P

OPS = torch.ops.pypaper
HAVE_OPS = hasattr(OPS, "power_quantize")
needs_ops = pytest.mark.skipif(not HAVE_OPS, reason="pypaper._C without the power ops")


def heavy(shape, dtype=torch.float32, df=3.0):
    return torch.distributions.StudentT(df).sample(shape).to(dtype)


SHAPES = [(64, 33), (1,), (7,), (129,), (3, 129), (5, 6, 7), (0,), (4, 0)]


@needs_ops
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("per_channel", [False, True])
def test_codes_and_values_equal_reference(bits, dtype, shape, per_channel):
    x = heavy(shape, dtype)
    m = P.channel_max_abs(x, per_channel)
    a = torch.tensor(0.55, dtype=torch.float64)
    qmax = P.bits_to_qmax(bits)
    q = P.power_quantize(x, a, bits, m)
    assert q.dtype == torch.int8 and q.shape == x.shape
    assert torch.equal(q, P.reference_codes(x, m, a, qmax))
    y = P.power_fake_quantize(x, a, bits, m)
    assert y.dtype == dtype and torch.equal(y, P.reference_fake_quantize(x, m, a, qmax))
    d = P.power_dequantize(q, a, bits, m, dtype)
    assert torch.equal(d, y)
    assert torch.equal(d, P.reference_dequantize(q, m, a, qmax, dtype))


@needs_ops
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("a", [0.3, 0.7, 1.0, 1.6])
def test_matches_defining_formula(bits, a):
    x = heavy((32, 200), torch.float32)
    m = P.channel_max_abs(x)
    qmax = P.bits_to_qmax(bits)
    q = P.power_quantize(x, a, bits, m)
    u = x.abs().double() / m.double()[:, None]
    c = torch.clamp(torch.round(qmax * u ** a), max=qmax)
    assert torch.equal(q.double(), torch.sign(x).double() * c)
    y = P.power_fake_quantize(x, a, bits, m)
    want = torch.sign(x).double() * m.double()[:, None] * (c / qmax) ** (1.0 / a)
    assert torch.allclose(y.double(), want, rtol=2.5e-7, atol=0)
    # a = 1 is symmetric uniform quantization with scale m / qmax
    if a == 1.0:
        uni = torch.clamp(torch.round(x.double() / (m.double()[:, None] / qmax)), -qmax, qmax)
        assert (q.double() != uni).sum() <= 2  # ties: the threshold rounds half up


@needs_ops
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_dtypes_compute_in_float32(dtype):
    x = heavy((16, 40), dtype)
    m = P.channel_max_abs(x)
    y = P.power_fake_quantize(x, 0.6, 4, m)
    assert y.dtype == dtype
    assert torch.equal(y, P.reference_fake_quantize(x.float(), m, torch.tensor(0.6, dtype=torch.float64), 7).to(dtype))
    assert torch.equal(P.power_quantize(x, 0.6, 4, m), P.reference_codes(x.float(), m,
                                                                          torch.tensor(0.6, dtype=torch.float64), 7))


@needs_ops
def test_per_channel_exponent_and_noncontiguous():
    x = heavy((40, 6)).t()  # non-contiguous [6, 40]
    assert not x.is_contiguous()
    m = P.channel_max_abs(x)
    a = torch.linspace(0.3, 1.5, 6, dtype=torch.float64)
    q = P.power_quantize(x, a, 4, m)
    assert torch.equal(q, P.reference_codes(x.contiguous(), m, a, 7))
    for i in range(6):  # row i uses exponent a[i]
        assert torch.equal(q[i], P.power_quantize(x[i].contiguous(), float(a[i]), 4, m[i]))


@needs_ops
def test_nan_zero_and_clipping():
    x = torch.tensor([0.0, -0.0, float("nan"), 5.0, -5.0, 0.5, -1.0])
    q = P.power_quantize(x, 0.5, 4, torch.tensor(1.0))
    assert q.tolist() == [0, 0, 0, 7, -7, int(round(7 * 0.5 ** 0.5)), -7]
    y = P.power_fake_quantize(x, 0.5, 4, torch.tensor(1.0))
    assert math.isnan(y[2]) and y[3] == 1.0 and y[4] == -1.0 and y[0] == 0.0
    # a zero range gives code 0 and value 0 everywhere
    z = torch.zeros(5)
    assert torch.equal(P.power_quantize(z, 0.5, 4, torch.tensor(0.0)), torch.zeros(5, dtype=torch.int8))


@needs_ops
@pytest.mark.parametrize("ste", [True, False])
@pytest.mark.parametrize("per_channel_exp", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backward_equals_reference(ste, per_channel_exp, dtype):
    x = heavy((8, 300), dtype)
    m = (P.channel_max_abs(x) * 0.7).requires_grad_()  # some elements clipped
    a = (torch.linspace(0.4, 1.2, 8, dtype=torch.float64) if per_channel_exp
         else torch.tensor(0.6, dtype=torch.float64)).requires_grad_()
    xg = x.clone().requires_grad_()
    g = torch.randn_like(x)
    y = P.power_fake_quantize(xg, a, 4, m, exponent_grad="ste" if ste else "fixed")
    (y * g).sum().backward()
    dx, dm, da = P.reference_backward(g, x, m.detach(), a.detach(), 7, ste)
    assert torch.equal(xg.grad, dx)
    assert torch.allclose(m.grad, dm, rtol=1e-5 if dtype == torch.float32 else 1e-10, atol=1e-9)
    assert torch.allclose(a.grad, da, rtol=1e-5 if dtype == torch.float32 else 1e-10, atol=1e-9)
    assert bool((xg.grad[x.abs() > m.detach()[:, None]] == 0).all())


def _surrogate(x, m, a, qmax, codes, m0, a0):
    """y(x, m, a) with the rounding offset delta = c - qmax (|x|/m0)^a0 of the point (m0, a0)
    held constant: r = qmax (|x|/m)^a + delta, smooth in m and a; its autograd at (m0, a0) is the
    "ste" gradient of the op."""
    C = m.numel()
    x2, md, md0 = x.reshape(C, -1), m.reshape(C, 1), m0.reshape(C, 1)
    c = codes.reshape(C, -1).abs().double()
    ax = x2.abs()
    inside = (c >= 1) & (ax <= md0)
    u = torch.where(inside, ax / md, torch.ones_like(ax))
    u0 = torch.where(inside, ax / md0, torch.ones_like(ax))
    rho = qmax * u ** a
    r = rho + torch.where(inside, c - qmax * u0 ** a0, torch.zeros_like(c))
    y = torch.where(inside, md * (r / qmax) ** (1 / a),
                    torch.where(ax > md, md.expand_as(ax), torch.zeros_like(ax)))
    return (torch.sign(x2) * y).reshape(x.shape)


@needs_ops
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_ste_gradient_is_autograd_of_the_smooth_surrogate(bits):
    qmax = P.bits_to_qmax(bits)
    x = heavy((5, 60), torch.float64)
    m0 = P.channel_max_abs(x) * 0.8
    a0 = torch.tensor(0.65, dtype=torch.float64)
    codes = P.power_quantize(x, a0, bits, m0)
    m, a = m0.clone().requires_grad_(), a0.clone().requires_grad_()
    g = torch.randn_like(x)
    (P.power_fake_quantize(x, a, bits, m) * g).sum().backward()
    m2, a2 = m0.clone().requires_grad_(), a0.clone().requires_grad_()
    ys = _surrogate(x, m2, a2, qmax, codes, m0, a0)
    assert torch.allclose(ys.detach(), P.power_fake_quantize(x, a0, bits, m0), rtol=1e-14, atol=0)
    (ys * g).sum().backward()
    assert torch.allclose(a.grad, a2.grad, rtol=1e-10, atol=1e-12)
    assert torch.allclose(m.grad, m2.grad, rtol=1e-10, atol=1e-12)
    # and the surrogate's own derivatives are right: gradcheck in float64 (its smooth part)
    assert torch.autograd.gradcheck(lambda mm, aa: _surrogate(x, mm, aa, qmax, codes, m0, a0),
                                    (m0.clone().requires_grad_(), a0.clone().requires_grad_()))


@needs_ops
def test_gradcheck_fixed_mode_float64():
    """With the codes held fixed, y is smooth in (max_abs, exponent) between rounding jumps:
    gradcheck checks the op's gradient itself (x away from the thresholds; eps 1e-7)."""
    torch.manual_seed(3)
    x = heavy((3, 9), torch.float64)
    m = (P.channel_max_abs(x) * 0.9).requires_grad_()
    a = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    # keep every element at least 1e-4 (relative) from its threshold
    thr, _, _, _ = P.power_tables(m.detach(), a.detach(), 7, torch.float64)
    dist = (x.abs().unsqueeze(-1) - thr.unsqueeze(1)).abs() / m.detach()[:, None, None]
    assert float(dist.min()) > 1e-5

    def f(mm, aa):
        return P.power_fake_quantize(x, aa, 4, mm, exponent_grad="fixed")

    assert torch.autograd.gradcheck(f, (m, a), eps=1e-8, atol=1e-6)


@needs_ops
def test_gradient_guard_at_zero():
    """x = 0 and values rounded to 0 give finite (zero) exponent gradients."""
    x = torch.tensor([0.0, 1e-30, -1e-20, 0.9, -0.3], dtype=torch.float64)
    a = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    m = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    P.power_fake_quantize(x, a, 4, m).sum().backward()
    assert math.isfinite(float(a.grad)) and math.isfinite(float(m.grad))
    a2 = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    P.power_fake_quantize(x[:3], a2, 4, m.detach()).sum().backward()
    assert float(a2.grad) == 0.0


@needs_ops
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(requires_grad):
    x = heavy((6, 10), torch.float32)
    m = P.channel_max_abs(x).requires_grad_(requires_grad)
    a = torch.tensor(0.6, requires_grad=requires_grad)
    xr = x.clone().requires_grad_(requires_grad)
    torch.library.opcheck(OPS.power_fake_quantize.default, (xr, m, a, 7, True))
    torch.library.opcheck(OPS.power_fake_quantize.default, (xr, m, a, 7, False))
    torch.library.opcheck(OPS.power_quantize.default, (x, m.detach(), a.detach(), 7))
    q = P.power_quantize(x, 0.6, 4, m.detach())
    torch.library.opcheck(OPS.power_dequantize.default, (q, m.detach(), a.detach(), 7,
                                                         torch.float32))
    g = torch.randn_like(x)
    torch.library.opcheck(OPS.power_fake_quantize_backward.default,
                          (g, x, m.detach(), a.detach(), 7, True, True, True))


@needs_ops
def test_compile_fullgraph():
    lin = torch.nn.Linear(16, 8)
    a = torch.nn.Parameter(torch.tensor(0.7))
    m = P.channel_max_abs(lin.weight)

    def f(x):
        w = P.power_fake_quantize(lin.weight, a, 4, m)
        return torch.nn.functional.linear(x, w, lin.bias)

    x = torch.randn(5, 16)
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    y, yc = f(x), cf(x)
    assert torch.equal(y, yc)
    yc.sum().backward()
    ga = a.grad.clone()
    a.grad = None
    y.sum().backward()
    assert torch.allclose(ga, a.grad, rtol=1e-6)


def test_reference_backend_runs_without_kernels():
    x = heavy((4, 20))
    m = P.channel_max_abs(x)
    with pypaper.use_backend("reference"):
        assert P.backend_for(x) == "reference"
        q = P.power_quantize(x, 0.6, 4, m)
        y = P.power_fake_quantize(x, 0.6, 4, m)
    assert torch.equal(q, P.reference_codes(x, m, torch.tensor(0.6, dtype=torch.float64), 7))
    assert torch.equal(y, P.reference_fake_quantize(x, m, torch.tensor(0.6, dtype=torch.float64), 7))


@pytest.mark.parametrize("bad, match", [
    (dict(bits=1), "bits"), (dict(bits=9), "bits"), (dict(bits=4.0), "bits"),
    (dict(exponent=float("nan")), "exponent"), (dict(exponent=float("inf")), "exponent"),
    (dict(exponent=0.0), "exponent"), (dict(exponent=-1.0), "exponent"),
    (dict(max_abs=torch.ones(3)), "max_abs"), (dict(max_abs=torch.tensor(float("inf"))), "max_abs"),
    (dict(exponent=torch.ones(3)), "exponent"),
])
def test_bad_inputs_name_the_argument(bad, match):
    kw = dict(exponent=0.5, bits=4, max_abs=torch.ones(4))
    kw.update(bad)
    x = torch.randn(4, 5)
    with pytest.raises(ValueError, match=match):
        P.power_fake_quantize(x, kw["exponent"], kw["bits"], kw["max_abs"])
    with pytest.raises(ValueError, match=match):
        P.power_quantize(x, kw["exponent"], kw["bits"], kw["max_abs"])


def test_bad_types():
    with pytest.raises(TypeError, match="x must be"):
        P.power_quantize(torch.ones(3, dtype=torch.int32), 0.5, 4)
    with pytest.raises(TypeError, match="codes must be"):
        P.power_dequantize(torch.ones(3), 0.5, 4, torch.tensor(1.0))
    with pytest.raises(ValueError, match="exponent_grad"):
        P.power_fake_quantize(torch.ones(3), 0.5, 4, exponent_grad="lsq")


@needs_ops
def test_native_op_checks():
    x = torch.randn(4, 5)
    with pytest.raises(RuntimeError, match="qmax"):
        OPS.power_quantize(x, torch.ones(4), torch.tensor(0.5), 200)
    with pytest.raises(RuntimeError, match="exponent"):
        OPS.power_quantize(x, torch.ones(4), torch.tensor(-0.5), 7)
    with pytest.raises(RuntimeError, match="max_abs"):
        OPS.power_quantize(x, torch.ones(3), torch.tensor(0.5), 7)
    with pytest.raises(RuntimeError, match="x must be"):
        OPS.power_quantize(x.half(), torch.ones(4), torch.tensor(0.5), 7)


@needs_ops
@pytest.mark.parametrize("ste", [True, False])
@pytest.mark.parametrize("per_channel_exp", [False, True])
def test_double_backward_wrt_grad_gradcheck(ste, per_channel_exp):
    """The backward is linear in grad; its own gradient with respect to grad (what a
    Hessian-vector product through the quantizer uses) passes gradcheck in float64."""
    x = heavy((3, 8), torch.float64)
    m = P.channel_max_abs(x) * 0.8
    a = (torch.tensor([0.5, 0.8, 1.1], dtype=torch.float64) if per_channel_exp
         else torch.tensor(0.7, dtype=torch.float64))
    g = torch.randn_like(x).requires_grad_()

    def f(gg):
        return OPS.power_fake_quantize_backward(gg, x, m, a, 7, True, True, ste)

    assert torch.autograd.gradcheck(f, (g,))
