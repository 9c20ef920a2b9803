"""quantize / dequantize: codes, packing, round trip, dtypes, opcheck, compile, odd shapes."""
import pytest
import torch

import pypaper
from pypaper.quant import QuantizedTensor, dequantize, quantize, reference
from pypaper.quant.layout import quant_range

from .helpers import DTYPES, GRANULARITIES


def _expected_codes(x, q: QuantizedTensor):
    return reference.quantize_codes(x, q.scale, q.zero_point, q.quant_min, q.quant_max, q.axis,
                                    q.group_size)


def _unpacked(q: QuantizedTensor):
    if not q.packed:
        return q.data.to(torch.int32)
    last = q.shape[-1] if len(q.shape) else 1
    flat = q.data.reshape(-1, q.data.shape[-1] if q.data.dim() else 1)
    return reference.unpack_nibbles(flat, last, q.symmetric).reshape(q.shape)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis,group_size", GRANULARITIES)
@pytest.mark.parametrize("bits", [8, 6, 4, 3, 2])
@pytest.mark.parametrize("symmetric", [True, False])
def test_codes_and_round_trip(dtype, shape, axis, group_size, bits, symmetric):
    x = (torch.randn(shape) * 2 + (0 if symmetric else 1)).to(dtype)
    q = quantize(x, bits, axis=axis, group_size=group_size, symmetric=symmetric)
    want_dtype = torch.uint8 if (bits <= 4 or not symmetric) else torch.int8
    assert q.data.dtype == want_dtype
    if bits <= 4:
        assert q.data.shape[-1] == (shape[-1] + 1) // 2
    codes = _unpacked(q)
    assert torch.equal(codes, _expected_codes(x, q))
    qmin, qmax = quant_range(bits, symmetric)
    assert int(codes.min()) >= qmin and int(codes.max()) <= qmax
    y = dequantize(q)
    assert y.dtype == dtype and y.shape == x.shape
    want = reference.dequantize_codes(codes, q.scale, q.zero_point, qmin, qmax, q.axis,
                                      q.group_size, dtype)
    assert torch.equal(y, want)
    # min/max scales cover the range: the error is at most half a step (+ rounding of the dtype)
    from pypaper.quant.layout import layout_of

    lay = layout_of(x.shape, q.axis, q.group_size)
    step = q.scale.reshape(1, -1, 1).double()
    err = (y.double() - x.double()).abs().reshape(lay)
    assert bool((err <= step / 2 + 1e-6 + x.double().abs().reshape(lay) * torch.finfo(dtype).eps * 2).all())


def test_packing_layout_is_low_nibble_first():
    x = torch.tensor([[1.0, -2.0, 3.0]])
    q = quantize(x, 4)  # scale 3/7, codes [2, -5, 7]
    assert q.data.shape == (1, 2)
    c = [int(v) for v in _unpacked(q).reshape(-1)]
    assert c == [2, -5, 7]
    b0, b1 = (int(v) for v in q.data.reshape(-1))
    assert b0 == ((2 & 0xF) | ((-5 & 0xF) << 4)) and b1 == 7


def test_per_channel_scales_follow_the_channel_range():
    x = torch.stack([torch.linspace(-1, 1, 50), torch.linspace(-10, 10, 50)])
    q = quantize(x, 8, axis=0)
    assert torch.allclose(q.scale, torch.tensor([1 / 127, 10 / 127]))
    q = quantize(x, 8, axis=0, symmetric=False)
    assert q.zero_point.dtype == torch.int32 and q.zero_point.shape == (2,)


def test_matches_torch_quantize_per_tensor():
    x = torch.randn(1000) * 4
    q = quantize(x, 8)
    tq = torch.quantize_per_tensor(x, float(q.scale), 0, torch.qint8)
    assert torch.equal(q.data, tq.int_repr())
    assert torch.equal(dequantize(q), tq.dequantize())


@pytest.mark.parametrize("shape", [(1,), (7,), (129,), (0,), (4, 0), (), (3, 1)])
@pytest.mark.parametrize("bits", [8, 4])
def test_odd_and_empty_shapes(shape, bits):
    x = torch.randn(shape)
    for backend in ("cpu", "reference"):
        with pypaper.use_backend(backend):
            q = quantize(x, bits)
            y = dequantize(q)
        want = list(shape)
        if bits <= 4 and want:
            want[-1] = (want[-1] + 1) // 2
        assert tuple(q.data.shape) == tuple(want), backend
        assert y.shape == x.shape
    if x.numel():
        assert (y - x).abs().max() <= q.scale / 2 + 1e-6


def test_non_contiguous_input():
    x = torch.randn(64, 48).t()
    q = quantize(x, 4, group_size=16)
    assert torch.equal(_unpacked(q), _expected_codes(x.contiguous(), q))


def test_zero_tensor_and_constant_channels():
    q = quantize(torch.zeros(8, 8), 8, axis=0)
    assert torch.equal(dequantize(q), torch.zeros(8, 8))
    x = torch.full((4, 16), 2.5)
    assert torch.allclose(dequantize(quantize(x, 8, axis=0, symmetric=False)), x, atol=0.02)


def test_backends_agree():
    x = torch.randn(33, 64)
    outs = []
    for b in ("cpu", "reference"):
        with pypaper.use_backend(b):
            q = quantize(x, 4, group_size=16, symmetric=False)
            outs.append((q.data, dequantize(q)))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_dequantize_gradient_wrt_scale_gradcheck():
    x = torch.randn(6, 5, dtype=torch.float64)
    q = quantize(x, 4, axis=1, symmetric=False)
    s = q.scale.clone().requires_grad_()
    zp = q.zero_point.to(torch.float64)

    def f(s):
        return torch.ops.pypaper.dequantize(q.data, s, zp, q.quant_min, q.quant_max, 1, None,
                                            True, 5, torch.float64)

    assert torch.autograd.gradcheck(f, (s,))


def _quant_samples():
    x = torch.randn(12, 10)
    for (qmin, qmax, pack) in ((-128, 127, False), (0, 255, False), (-8, 7, True), (0, 7, True)):
        s = torch.rand(10) * 0.1 + 0.01
        z = torch.zeros(10) if qmin < 0 else torch.full((10,), float(qmax // 2))
        yield (x, s, z, qmin, qmax, 1, None, pack)
    yield (torch.randn(4, 32), torch.rand(4, 2) + 0.1, torch.zeros(4, 2), -8, 7, None, 16, True)
    for pack in (False, True):  # 0-dim x
        yield (torch.tensor(-0.7), torch.tensor(0.1), torch.tensor(0), -8, 7, None, None, pack)


@pytest.mark.parametrize("args", list(_quant_samples()))
def test_opcheck_quantize_and_dequantize(args):
    torch.library.opcheck(torch.ops.pypaper.quantize.default, args)
    x, s, z, qmin, qmax, axis, gs, pack = args
    data = torch.ops.pypaper.quantize(*args)
    if x.dim() == 0:
        data = data.reshape(1)  # dequantize takes codes with a last dim (dequantize() reshapes)
    last = x.shape[-1] if x.dim() else 1
    for rg in (False, True):
        sd = s.clone().double().requires_grad_(rg)
        torch.library.opcheck(torch.ops.pypaper.dequantize.default,
                              (data, sd, z, qmin, qmax, axis, gs, pack, last, torch.float64))


@pytest.mark.parametrize("shape,kw", [((16, 32), dict(group_size=8)), ((), {}),
                                      ((5, 7), dict(axis=0, symmetric=False))])
def test_torch_compile_fullgraph_round_trip(shape, kw):
    def f(x):
        return dequantize(quantize(x, 4, **kw))

    x = torch.randn(shape)
    assert torch.equal(torch.compile(f, fullgraph=True)(x), f(x))
