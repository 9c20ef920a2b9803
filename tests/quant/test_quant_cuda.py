"""CUDA kernels of the quant ops against the C++ CPU kernels and the plain-PyTorch reference.

Both devices run the per-element math of kernels/common/quant_math.h, so fake-quantized values,
codes, dequantized values and dx agree to the bit in every dtype (NaN payloads aside: compared
with equal_nan). grad_scale / grad_zero_point are per-channel sums whose order differs (warp
shuffles, atomics): bounded like the CPU tests, |got - want| <= 2 * tol * sum |operands|
(helpers.GRAD_SUM_TOL). Stochastic rounding draws the same uniform per (seed, element) on both.

Calls torch.ops.pypaper.* directly (pypaper is imported inside the fixture, which loads
pypaper._C), so collection works on machines without a GPU; every test is skipped there.
"""
import pytest
import torch

from .helpers import DTYPES, GRAD_SUM_TOL, operand_sum

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]

# (shape, axis, group_size): per-tensor, per-channel (first / last / middle axis), group-wise;
# odd sizes 1, 7, 129 and empty tensors.
CASES = [
    ((), None, None),
    ((1,), None, None),
    ((7,), None, None),
    ((129,), None, None),
    ((0,), None, None),
    ((3, 129), None, None),
    ((7, 129), 0, None),
    ((7, 129), -1, None),
    ((129, 7), 0, None),
    ((129, 7), -1, None),
    ((1, 1), 0, None),
    ((3, 5, 7), 1, None),
    ((0, 7), 0, None),
    ((7, 0), -1, None),
    ((7, 128), None, 32),
    ((3, 129), None, 43),
    ((5, 16), None, 16),
    ((2, 3, 8), None, 4),
    ((4, 6), None, 3),
    ((1,), None, 1),
    ((0, 8), None, 4),
]

# Sizes that take the other paths of the kernels on a GPU with ~100-150 SMs (one wave is about
# 2048 threads per SM): several units per thread with one channel each ("fixed" plan), warps
# spanning channels, sums staged in shared memory or sent to global atomics, 16-byte vector or
# scalar accesses.
BIG_CASES = [
    ((1_000_003,), None, None),  # per-tensor, odd numel: scalar accesses
    ((1 << 20,), None, None),  # per-tensor, vector accesses
    ((300_000, 3), -1, None),  # inner 1, 3 channels: one channel per thread, shared memory
    ((3, 400_000), -1, None),  # inner 1, many channels: a channel per lane, global atomics
    ((2048, 1024), 0, None),  # long rows, 2048 channels: warp-uniform sums, global atomics
    ((600, 1000), 0, None),  # long rows, 600 channels: warp-uniform sums, shared memory
    ((5, 300, 333), 1, None),  # middle axis, odd inner: fixed channel per thread, scalar
    ((512, 2048), None, 64),  # groups of 64: vector accesses, warps span two groups
    ((1000, 1026), None, 18),  # groups of 18: many groups per warp
]

RANGES = [(-128, 127), (0, 255), (-8, 7), (0, 15), (-2, 1)]
PACKABLE = [r for r in RANGES if r[1] - r[0] <= 15]


@pytest.fixture(scope="module")
def ops():
    import pypaper  # loads pypaper._C: registers torch.ops.pypaper.*

    info = pypaper.build_info()
    assert info.get("extension_loaded"), f"pypaper._C did not load: {info.get('error')}"
    assert info.get("cuda_kernels"), "a GPU is present but pypaper._C was built without CUDA kernels"
    return torch.ops.pypaper


@pytest.fixture(scope="module")
def ref():
    from pypaper.quant import reference

    return reference


# ---- helpers -------------------------------------------------------------------------------------

def _norm_axis(axis, ndim):
    return None if axis is None else axis % ndim


def _bits(qmin, qmax):
    return (qmax - qmin).bit_length()


def _pshape(shape, axis, group_size):
    from pypaper.quant.layout import param_shape

    return param_shape(shape, _norm_axis(axis, len(shape)), group_size)


def _inputs(shape, axis, group_size, qmin, qmax, dtype, seed=0, specials=True):
    """x (with NaN, +-inf and zeros when specials), scale and a float zero point with halves
    and out-of-range values (exercises round-half-even and the clamp of z). CPU tensors."""
    g = torch.Generator().manual_seed(seed)
    pshape = _pshape(shape, axis, group_size)
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    scale = (torch.rand(pshape, generator=g, dtype=torch.float64) * 0.05 + 0.02).to(pdtype)
    zp = (torch.randint(2 * qmin - 4, 2 * qmax + 5, pshape, generator=g) / 2).to(pdtype)
    spread = 0.035 * (qmax - qmin) / 3  # a few percent of the values clip
    x = torch.randn(shape, generator=g, dtype=torch.float64) * spread
    if specials and x.numel() >= 8:
        flat = x.view(-1)
        flat[:5] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0],
                                dtype=torch.float64)
    return x.to(dtype), scale, zp


def _cuda(*ts):
    return tuple(None if t is None else t.cuda() for t in ts)


def _exact(got, want):
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, want.shape,
                                                                 got.dtype, want.dtype)
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=0, atol=0, equal_nan=True)


def _sums_close(got, want, terms, dtype):
    """Per-channel sums agree up to summation order: 2 * tol * sum |operands| (helpers.py)."""
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, want.shape,
                                                                 got.dtype, want.dtype)
    bound = 2 * GRAD_SUM_TOL[dtype] * terms.double() + 1e-30
    err = (got.cpu().double() - want.cpu().double()).abs()
    assert bool((err <= bound).all()), f"max error {err.max().item()} above bound"


def _grads_close(got, want, g, x, s, axis, group_size, qmin, qmax, dtype):
    """dx to the bit; grad_scale / grad_zero_point up to summation order."""
    _exact(got[0], want[0])
    if s.numel() == 0:  # no channels: nothing to sum
        _exact(got[1], want[1])
        _exact(got[2], want[2])
        return
    terms = operand_sum(g, x.contiguous(), s, _norm_axis(axis, x.dim()), group_size,
                        _bits(qmin, qmax))
    _sums_close(got[1], want[1], terms, dtype)
    _sums_close(got[2], want[2], terms * s.double(), dtype)


# ---- fake_quantize -------------------------------------------------------------------------------

@pytest.mark.parametrize("qmin,qmax", RANGES)
@pytest.mark.parametrize("shape,axis,group_size", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fake_quantize_matches_cpu_and_reference(ops, ref, dtype, shape, axis, group_size, qmin,
                                                 qmax):
    x, s, z = _inputs(shape, axis, group_size, qmin, qmax, dtype)
    y = ops.fake_quantize(*_cuda(x, s, z), qmin, qmax, axis, group_size)
    assert y.device.type == "cuda"
    _exact(y, ops.fake_quantize(x, s, z, qmin, qmax, axis, group_size))
    if x.numel():
        # the reference's straight-through rounding trick turns +-inf into NaN (the kernels clamp
        # them to the range ends, like torch.fake_quantize_*): compare it on finite x only
        want = ref.fake_quantize(x, s, z, qmin, qmax, _norm_axis(axis, x.dim()), group_size)
        fin = torch.isfinite(x)
        _exact(y.cpu()[fin], want[fin])


def test_round_half_to_even_on_exact_ties(ops):
    # s = 1/4: x / s = k + 1/2 exactly, ties go to the even neighbour (as torch.round)
    k = torch.arange(-10, 10, dtype=torch.float32)
    x = (k + 0.5) * 0.25
    s, z = torch.tensor(0.25), torch.tensor(0.0)
    y = ops.fake_quantize(*_cuda(x, s, z), -128, 127)
    _exact(y, torch.round(k + 0.5) * 0.25)
    _exact(y, ops.fake_quantize(x, s, z, -128, 127))
    # a zero point of k + 1/2 rounds to even too
    zc = torch.tensor([0.5, 1.5, 2.5, -0.5])
    for zv in zc:
        y = ops.fake_quantize(*_cuda(x, torch.tensor(0.25), zv), -128, 127)
        _exact(y, ops.fake_quantize(x, torch.tensor(0.25), zv, -128, 127))


@pytest.mark.parametrize("seed", [0, 12345, -7, 2**62 + 3])
@pytest.mark.parametrize("shape,axis,group_size", [
    ((1,), None, None), ((129,), None, None), ((0,), None, None), ((7, 129), 0, None),
    ((7, 129), -1, None), ((5, 16), None, 4), ((3, 5, 7), 1, None)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_stochastic_rounding_matches_cpu_and_reference(ops, ref, dtype, shape, axis, group_size,
                                                       seed):
    qmin, qmax = -8, 7
    x, s, z = _inputs(shape, axis, group_size, qmin, qmax, dtype, specials=False)
    sd = torch.tensor([seed], dtype=torch.int64)
    y = ops.fake_quantize(*_cuda(x, s, z), qmin, qmax, axis, group_size, sd.cuda())
    _exact(y, ops.fake_quantize(x, s, z, qmin, qmax, axis, group_size, sd))
    if x.numel():
        _exact(y, ref.fake_quantize(x, s, z, qmin, qmax, _norm_axis(axis, x.dim()), group_size,
                                    seed))
        # the seed matters and is read on the device (a 0-dim seed works too)
        y0 = ops.fake_quantize(*_cuda(x, s, z), qmin, qmax, axis, group_size,
                               torch.tensor(seed, device="cuda"))
        _exact(y0, y)
    # backward recomputes the same codes
    g = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    args = (qmin, qmax, axis, group_size)
    got = ops.fake_quantize_backward(*_cuda(g, x, s, z), *args, sd.cuda(), 1.0, True, True)
    cpu = ops.fake_quantize_backward(g, x, s, z, *args, sd, 1.0, True, True)
    _grads_close(got, cpu, g, x, s, axis, group_size, qmin, qmax, dtype)


# ---- fake_quantize_backward ----------------------------------------------------------------------

@pytest.mark.parametrize("qmin,qmax", [(-128, 127), (0, 15), (-2, 1)])
@pytest.mark.parametrize("shape,axis,group_size", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_matches_cpu_and_reference(ops, ref, dtype, shape, axis, group_size, qmin, qmax):
    x, s, z = _inputs(shape, axis, group_size, qmin, qmax, dtype, specials=False)
    g = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    args = (qmin, qmax, axis, group_size, None, 0.5, True, True)
    got = ops.fake_quantize_backward(*_cuda(g, x, s, z), *args)
    cpu = ops.fake_quantize_backward(g, x, s, z, *args)
    _grads_close(got, cpu, g, x, s, axis, group_size, qmin, qmax, dtype)
    if x.numel():
        nax = _norm_axis(axis, x.dim())
        want = ref.fake_quantize_backward(g, x, s, z, qmin, qmax, nax, group_size, None, 0.5)
        _grads_close(got, want, g, x, s, axis, group_size, qmin, qmax, dtype)


def test_backward_dx_with_nan_and_inf_inputs(ops):
    x, s, z = _inputs((7, 129), 0, None, 0, 255, torch.float32)
    g = torch.randn(7, 129)
    args = (0, 255, 0, None, None, 1.0, False, False)
    _exact(ops.fake_quantize_backward(*_cuda(g, x, s, z), *args)[0],
           ops.fake_quantize_backward(g, x, s, z, *args)[0])


@pytest.mark.parametrize("need_s,need_z", [(True, True), (True, False), (False, True),
                                           (False, False)])
def test_backward_only_requested_sums(ops, need_s, need_z):
    x, s, z = _inputs((7, 129), -1, None, 0, 255, torch.float32, specials=False)
    g = torch.randn(7, 129)
    args = (0, 255, -1, None, None, 1.0, need_s, need_z)
    got = ops.fake_quantize_backward(*_cuda(g, x, s, z), *args)
    cpu = ops.fake_quantize_backward(g, x, s, z, *args)
    _exact(got[0], cpu[0])
    terms = operand_sum(g, x, s, 1, None, 8)
    for i, need in ((1, need_s), (2, need_z)):
        if need:
            _sums_close(got[i], cpu[i], terms * (s.double() if i == 2 else 1), torch.float32)
        else:
            _exact(got[i], torch.zeros_like(cpu[i]))
            _exact(cpu[i], torch.zeros_like(cpu[i]))


def test_backward_integer_zero_point_and_fp16_scale(ops):
    x = torch.randn(33, 65)
    s = (torch.rand(65) * 0.05 + 0.02).half()
    z = torch.randint(-3, 4, (65,), dtype=torch.int32)
    g = torch.randn(33, 65)
    args = (-128, 127, 1, None, None, 0.25, True, False)
    got = ops.fake_quantize_backward(*_cuda(g, x, s, z), *args)
    cpu = ops.fake_quantize_backward(g, x, s, z, *args)
    _exact(got[0], cpu[0])
    assert got[1].dtype == torch.float16 and got[2].dtype == torch.float16
    torch.testing.assert_close(got[1].cpu(), cpu[1], rtol=2e-3, atol=1e-3)  # 1 fp16 ulp


# ---- large tensors: grid-stride loops, channel walks, reductions ----------------------------------

@pytest.mark.parametrize("shape,axis,group_size", BIG_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_large_tensors_match_cpu(ops, dtype, shape, axis, group_size):
    qmin, qmax = 0, 255
    x, s, z = _inputs(shape, axis, group_size, qmin, qmax, dtype, specials=False)
    xc, sc, zc = _cuda(x, s, z)
    _exact(ops.fake_quantize(xc, sc, zc, qmin, qmax, axis, group_size),
           ops.fake_quantize(x, s, z, qmin, qmax, axis, group_size))
    sd = torch.tensor([99], dtype=torch.int64)
    _exact(ops.fake_quantize(xc, sc, zc, qmin, qmax, axis, group_size, sd.cuda()),
           ops.fake_quantize(x, s, z, qmin, qmax, axis, group_size, sd))
    g = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    args = (qmin, qmax, axis, group_size, None, 1.0, True, True)
    got = ops.fake_quantize_backward(g.cuda(), xc, sc, zc, *args)
    cpu = ops.fake_quantize_backward(g, x, s, z, *args)
    _grads_close(got, cpu, g, x, s, axis, group_size, qmin, qmax, dtype)
    q = ops.quantize(xc, sc, zc, qmin, qmax, axis, group_size)
    _exact(q, ops.quantize(x, s, z, qmin, qmax, axis, group_size))
    _exact(ops.dequantize(q, sc, zc, qmin, qmax, axis, group_size, False, shape[-1], dtype),
           ops.dequantize(q.cpu(), s, z, qmin, qmax, axis, group_size, False, shape[-1], dtype))
    qp = ops.quantize(xc, sc, zc, 0, 15, axis, group_size, True)
    _exact(qp, ops.quantize(x, s, z, 0, 15, axis, group_size, True))
    _exact(ops.dequantize(qp, sc, zc, 0, 15, axis, group_size, True, shape[-1], dtype),
           ops.dequantize(qp.cpu(), s, z, 0, 15, axis, group_size, True, shape[-1], dtype))


# ---- quantize / dequantize -----------------------------------------------------------------------

@pytest.mark.parametrize("qmin,qmax", RANGES)
@pytest.mark.parametrize("shape,axis,group_size", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_matches_cpu_and_reference(ops, ref, dtype, shape, axis, group_size, qmin, qmax):
    x, s, z = _inputs(shape, axis, group_size, qmin, qmax, dtype)
    q = ops.quantize(*_cuda(x, s, z), qmin, qmax, axis, group_size)
    assert q.dtype == (torch.int8 if qmin < 0 else torch.uint8)
    _exact(q, ops.quantize(x, s, z, qmin, qmax, axis, group_size))
    nax = _norm_axis(axis, x.dim())
    codes = ref.quantize_codes(x, s, z, qmin, qmax, nax, group_size) if x.numel() else None
    if codes is not None:
        _exact(q.to(torch.int32), codes)  # NaN -> effective zero point
    if qmax - qmin <= 15:
        qp = ops.quantize(*_cuda(x, s, z), qmin, qmax, axis, group_size, True)
        _exact(qp, ops.quantize(x, s, z, qmin, qmax, axis, group_size, True))
        if codes is not None and x.dim():
            _exact(qp, ref.pack_nibbles(codes))


@pytest.mark.parametrize("qmin,qmax", RANGES)
@pytest.mark.parametrize("shape,axis,group_size", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_matches_cpu_and_reference(ops, ref, dtype, shape, axis, group_size, qmin,
                                              qmax):
    _, s, z = _inputs(shape, axis, group_size, qmin, qmax, dtype)
    g = torch.Generator().manual_seed(3)
    # every byte value, in range or not: the kernels dequantize whatever code they are given
    lo, hi = (-128, 128) if qmin < 0 else (0, 256)
    codes = torch.randint(lo, hi, shape, generator=g).to(torch.int8 if qmin < 0 else torch.uint8)
    last = shape[-1] if shape else 1
    nax = _norm_axis(axis, len(shape))
    y = ops.dequantize(*_cuda(codes, s, z), qmin, qmax, axis, group_size, False, last, dtype)
    assert y.dtype == dtype and y.device.type == "cuda"
    _exact(y, ops.dequantize(codes, s, z, qmin, qmax, axis, group_size, False, last, dtype))
    if codes.numel():
        _exact(y, ref.dequantize_codes(codes.to(torch.int32), s, z, qmin, qmax, nax, group_size,
                                       dtype))
    if qmax - qmin <= 15 and shape:
        packed = torch.randint(0, 256, (*shape[:-1], (last + 1) // 2), generator=g,
                               dtype=torch.int64).to(torch.uint8)
        y = ops.dequantize(*_cuda(packed, s, z), qmin, qmax, axis, group_size, True, last, dtype)
        _exact(y, ops.dequantize(packed, s, z, qmin, qmax, axis, group_size, True, last, dtype))
        if packed.numel():
            unpacked = ref.unpack_nibbles(packed, last, qmin < 0)
            _exact(y, ref.dequantize_codes(unpacked, s, z, qmin, qmax, nax, group_size, dtype))


@pytest.mark.parametrize("shape,axis,group_size", [((7, 129), 0, None), ((4, 6), None, 3),
                                                   ((129,), None, None), ((3, 5, 7), 1, None)])
@pytest.mark.parametrize("qmin,qmax", PACKABLE)
def test_packed_round_trip(ops, shape, axis, group_size, qmin, qmax):
    x, s, z = _inputs(shape, axis, group_size, qmin, qmax, torch.float32)
    xc, sc, zc = _cuda(x, s, z)
    q = ops.quantize(xc, sc, zc, qmin, qmax, axis, group_size, False)
    qp = ops.quantize(xc, sc, zc, qmin, qmax, axis, group_size, True)
    a = ops.dequantize(q, sc, zc, qmin, qmax, axis, group_size, False, shape[-1], torch.float32)
    b = ops.dequantize(qp, sc, zc, qmin, qmax, axis, group_size, True, shape[-1], torch.float32)
    _exact(a, b)
    if shape[-1] % 2:  # the unused high nibble of an odd row is 0
        assert bool((qp[..., -1].cpu() >> 4 == 0).all())


# ---- layouts: non-contiguous, misaligned (scalar path), other devices ----------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_and_misaligned_inputs(ops, dtype):
    base, s, z = _inputs((64, 130), 0, None, 0, 255, dtype, specials=False)
    sc, zc = _cuda(s, z)
    bc = base.cuda()
    views = {
        "transposed": (lambda t: t.t(), 1),
        "strided": (lambda t: t[:, ::2], 0),
        # contiguous, but one element past a 16-byte boundary: the kernels' scalar accesses
        "offset": (lambda t: t.reshape(-1)[1:1 + 64 * 129].view(64, 129), 0),
    }
    for name, (view, axis) in views.items():
        x, xc = view(base), view(bc)
        n = x.shape[axis]
        sv, zv, svc, zvc = s[:n], z[:n], sc[:n], zc[:n]
        _exact(ops.fake_quantize(xc, svc, zvc, 0, 255, axis), ops.fake_quantize(x, sv, zv, 0, 255, axis))
        _exact(ops.quantize(xc, svc, zvc, 0, 255, axis), ops.quantize(x, sv, zv, 0, 255, axis))
        g = torch.randn(x.shape).to(dtype)
        got = ops.fake_quantize_backward(g.cuda(), xc, svc, zvc, 0, 255, axis, None, None, 1.0,
                                         True, True)
        cpu = ops.fake_quantize_backward(g, x, sv, zv, 0, 255, axis, None, None, 1.0, True, True)
        _grads_close(got, cpu, g, x, sv, axis, None, 0, 255, dtype)
    # a 1-D tensor starting one element past an aligned address
    flat = torch.randn(1 + 4096).to(dtype)
    x, xc = flat[1:], flat.cuda()[1:]
    s1, z1 = torch.tensor(0.03), torch.tensor(3.0)
    _exact(ops.fake_quantize(xc, s1.cuda(), z1.cuda(), 0, 255), ops.fake_quantize(x, s1, z1, 0, 255))
    q = ops.quantize(xc, s1.cuda(), z1.cuda(), 0, 255)
    _exact(q, ops.quantize(x, s1, z1, 0, 255))
    _exact(ops.dequantize(q[1:], s1.cuda(), z1.cuda(), 0, 255, None, None, False, 1, dtype),
           ops.dequantize(q.cpu()[1:], s1, z1, 0, 255, None, None, False, 1, dtype))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_runs_on_the_tensors_device(ops):
    x, s, z = _inputs((7, 129), 0, None, 0, 255, torch.float32)
    dev = torch.device("cuda", 1)
    with torch.cuda.device(0):
        y = ops.fake_quantize(x.to(dev), s.to(dev), z.to(dev), 0, 255, 0, None,
                              torch.tensor([5], device=dev))
    assert y.device == dev
    _exact(y, ops.fake_quantize(x, s, z, 0, 255, 0, None, torch.tensor([5])))


# ---- errors name the argument --------------------------------------------------------------------

def test_bad_arguments_raise(ops):
    x = torch.randn(8, 4, device="cuda")
    s, z = torch.tensor(0.1, device="cuda"), torch.tensor(0.0, device="cuda")
    with pytest.raises(RuntimeError, match="seed is on"):
        ops.fake_quantize(x, s, z, -128, 127, None, None, torch.tensor([1]))
    with pytest.raises(RuntimeError, match="seed must be an int64"):
        ops.fake_quantize(x, s, z, -128, 127, None, None, torch.tensor([1.0], device="cuda"))
    with pytest.raises(RuntimeError, match="scale is on"):
        ops.fake_quantize(x, s.cpu(), z, -128, 127)
    with pytest.raises(RuntimeError, match="zero_point is on"):
        ops.quantize(x, s, z.cpu(), -128, 127)
    with pytest.raises(RuntimeError, match="scale has"):
        ops.fake_quantize(x, torch.ones(3, device="cuda"), torch.zeros(3, device="cuda"), -128,
                          127, 1)
    with pytest.raises(RuntimeError, match="x must be float32"):
        ops.fake_quantize(x.int(), s, z, -128, 127)
    with pytest.raises(RuntimeError, match="quant_min"):
        ops.fake_quantize(x, s, z, 5, 5)
    with pytest.raises(RuntimeError, match="pack=True"):
        ops.quantize(x, s, z, -128, 127, None, None, True)
    with pytest.raises(RuntimeError, match="grad has shape"):
        ops.fake_quantize_backward(x[:4], x, s, z, -128, 127, None, None, None, 1.0, True, True)
    with pytest.raises(RuntimeError, match="grad is on"):
        ops.fake_quantize_backward(x.cpu(), x, s, z, -128, 127, None, None, None, 1.0, True, True)
    with pytest.raises(RuntimeError, match="data must be"):
        ops.dequantize(torch.zeros(8, dtype=torch.int32, device="cuda"), s, z, -128, 127, None,
                       None, False, 8, torch.float32)
    with pytest.raises(RuntimeError, match="dtype must be"):
        ops.dequantize(torch.zeros(8, dtype=torch.int8, device="cuda"), s, z, -128, 127, None,
                       None, False, 8, torch.int32)


# ---- the dispatcher contract on CUDA tensors ----------------------------------------------------

OPCHECK_SAMPLES = ["fq", "fq_seed", "fq_grad", "fq_seed_grad", "fq_backward", "quantize_packed",
                   "quantize", "dequantize_packed"]


def _opcheck_samples():
    """Built inside the test (CUDA tensors), in the order of OPCHECK_SAMPLES."""
    for rg in (False, True):
        x = torch.randn(9, 8, device="cuda", requires_grad=rg)
        s = (torch.rand(8, device="cuda") * 0.05 + 0.02).requires_grad_(rg)
        z = torch.full((8,), 3.0, device="cuda").requires_grad_(rg)
        yield ("fake_quantize", (x, s, z, 0, 255, 1, None, None))
        yield ("fake_quantize", (x, s, z, 0, 255, 1, None, torch.tensor([7], device="cuda")))
    x = torch.randn(9, 8, device="cuda")
    s, z = torch.rand(9, 2, device="cuda") * 0.05 + 0.02, torch.zeros(9, 2, device="cuda")
    yield ("fake_quantize_backward", (torch.randn(9, 8, device="cuda"), x, s, z, -8, 7, None, 4,
                                      None, 1.0, True, True))
    yield ("quantize", (x, s, z, -8, 7, None, 4, True))
    yield ("quantize", (x, s, z, -8, 7, None, 4, False))
    yield ("dequantize", (torch.randint(0, 255, (9, 4), device="cuda").to(torch.uint8), s, z, -8,
                          7, None, 4, True, 8, torch.float32))


@pytest.mark.parametrize("sample", OPCHECK_SAMPLES)
def test_opcheck_on_cuda(ops, sample):
    samples = list(_opcheck_samples())
    assert len(samples) == len(OPCHECK_SAMPLES)
    name, args = samples[OPCHECK_SAMPLES.index(sample)]
    torch.library.opcheck(getattr(ops, name).default, args)
