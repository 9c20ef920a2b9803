"""Triton quant ops (pypaper/quant/triton_kernels.py) against pypaper/quant/reference.py.

Without a GPU the kernels run under TRITON_INTERPRET=1 on CPU tensors (set below, before triton
or pypaper is imported; sizes stay small for the interpreter); with one, compiled on CUDA.

Tolerances:
  fake-quantize values, codes, packed bytes, dequantized values, grad_x: bit-exact, every dtype
  (same fp32 / fp64 operations in the same order as the reference, then one cast);
  grad_scale, grad_zero_point: |got - ref| <= 1e-6 + 1e-5 * sum_e |term_e| per channel (fp32
  sums in another order; the bound follows the terms' size since the sum itself may cancel).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import math  # noqa: E402

import pytest  # noqa: E402

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from pypaper.quant import reference, triton_kernels  # noqa: E402
from pypaper.quant.layout import layout_of, param_shape  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_OK, _WHY = triton_kernels.triton_available(DEVICE)

pytestmark = [pytest.mark.triton, pytest.mark.skipif(not _OK, reason=_WHY)]

ops = torch.ops.pypaper

# (shape, axis, group_size): both tilings (row view: long inner; column view: per-channel on
# the last axes), odd sizes and 0-d.
CASES = [
    ((33, 65), None, None),
    ((1,), None, None),
    ((7,), None, None),
    ((129,), None, None),
    ((), None, None),
    ((6, 5, 7), 0, None),
    ((7, 129), 0, None),
    ((9, 20), -1, None),
    ((129, 7), 1, None),
    ((4, 6, 3), 1, None),
    ((6, 32), None, 8),
    ((3, 5, 48), None, 16),
    ((5, 7), None, 1),
]
CASE_IDS = [f"{s}-a{a}-g{g}" for s, a, g in CASES]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
RANGES = [(-128, 127), (0, 255), (-8, 7), (0, 15), (-4, 3), (0, 7), (-2, 1)]
SEEDS = [0, 1, -1, 2**40 + 12345, -(2**62) + 7]


def _norm_axis(shape, axis):
    return None if axis is None else axis % len(shape)


def _inputs(shape, axis, group_size, dtype, qmin, qmax, int_zp=False, scale=2.0):
    """x with values inside and outside the range; one (s, zp) per channel; zp with .5 ties and
    values beyond [qmin, qmax] (clamped after rounding)."""
    pshape = param_shape(shape, _norm_axis(shape, axis), group_size)
    x = (torch.randn(shape) * scale).to(dtype)
    s = torch.rand(pshape) * 0.3 + 0.05
    zp = torch.round((torch.rand(pshape) * (qmax - qmin + 4) + qmin - 2) * 2) / 2
    if int_zp:
        zp = zp.round().to(torch.int32)
    return x.to(DEVICE), s.to(DEVICE), zp.to(DEVICE)


def ref_fq(x, s, zp, qmin, qmax, axis=None, group_size=None, seed=None):
    return reference.fake_quantize(x, s, zp, qmin, qmax, _norm_axis(x.shape, axis), group_size,
                                   seed)


def ref_bwd(g, x, s, zp, qmin, qmax, axis=None, group_size=None, seed=None, grad_factor=1.0):
    return reference.fake_quantize_backward(g, x, s, zp, qmin, qmax, _norm_axis(x.shape, axis),
                                            group_size, seed, grad_factor)


def ref_codes(x, s, zp, qmin, qmax, axis=None, group_size=None):
    return reference.quantize_codes(x, s, zp, qmin, qmax, _norm_axis(x.shape, axis), group_size)


def _seed(seed):
    return None if seed is None else torch.tensor([seed], dtype=torch.int64, device=DEVICE)


def _assert_same(got, want):
    """Bit-exact up to the sign of zero and NaN payloads."""
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, want.dtype,
                                                                  got.shape, want.shape)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


def _term_magnitude(grad, x, s, zp, qmin, qmax, axis, group_size, seed):
    """Per-channel sum of |dscale_e| and |dzp_e|: the reference with every element its own
    channel (group_size=1 on per-element copies of s and zp) gives the per-element terms."""
    shape = tuple(x.shape)
    outer, channels, inner = layout_of(shape, _norm_axis(shape, axis), group_size)
    ch = (torch.arange(x.numel(), device=x.device) // max(inner, 1)) % max(channels, 1)
    s_e = s.reshape(-1)[ch].reshape(shape)
    z_e = zp.reshape(-1)[ch].reshape(shape)
    _, ds, dz = ref_bwd(grad, x, s_e, z_e, qmin, qmax, None, 1, seed)
    ms = torch.zeros(channels, dtype=torch.float64, device=x.device)
    mz = torch.zeros(channels, dtype=torch.float64, device=x.device)
    ms.index_add_(0, ch, ds.reshape(-1).double().abs())
    mz.index_add_(0, ch, dz.reshape(-1).double().abs())
    return ms.reshape(s.shape), mz.reshape(s.shape)


def _assert_sum_close(got, want, magnitude):
    assert got.dtype == want.dtype and got.shape == want.shape
    err = (got.double() - want.double()).abs()
    bound = 1e-6 + 1e-5 * magnitude
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item()}"


# ---- fake_quantize -------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,axis,group_size", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("qmin,qmax", [(-128, 127), (0, 15)])
@pytest.mark.parametrize("seed", [None, 2**40 + 12345])
def test_fake_quantize_matches_reference(shape, axis, group_size, dtype, qmin, qmax, seed):
    x, s, zp = _inputs(shape, axis, group_size, dtype, qmin, qmax)
    y = ops.fake_quantize_triton(x, s, zp, qmin, qmax, axis, group_size, _seed(seed))
    _assert_same(y, ref_fq(x, s, zp, qmin, qmax, axis, group_size, seed))


@pytest.mark.parametrize("qmin,qmax", RANGES)
@pytest.mark.parametrize("int_zp", [False, True])
def test_fake_quantize_ranges_and_zero_points(qmin, qmax, int_zp):
    x, s, zp = _inputs((17, 24), 1, None, torch.float32, qmin, qmax, int_zp=int_zp)
    y = ops.fake_quantize_triton(x, s, zp, qmin, qmax, 1)
    _assert_same(y, ref_fq(x, s, zp, qmin, qmax, 1))


@pytest.mark.parametrize("seed", SEEDS)
def test_stochastic_rounding_is_the_reference_draw(seed):
    x, s, zp = _inputs((37, 41), None, None, torch.float32, -128, 127, scale=0.5)
    s = torch.full((), 0.0173, device=DEVICE)
    y = ops.fake_quantize_triton(x, s, zp, -128, 127, seed=_seed(seed))
    _assert_same(y, ref_fq(x, s, zp, -128, 127, seed=seed))
    # A different seed draws different noise (the check above is not vacuous).
    y2 = ops.fake_quantize_triton(x, s, zp, -128, 127, seed=_seed(seed + 1))
    assert not torch.equal(y, y2)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the interpreter, on inf/NaN
def test_round_half_to_even_ties_and_special_values():
    # x * (1/s) = k + 0.5 exactly (s = 1/4): ties go to the even integer, as torch.round.
    k = torch.arange(-40, 40, dtype=torch.float32)
    special = torch.tensor([0.0, -0.0, 0.1, -0.1, 2.0**22 + 0.5, 2.0**24 + 2, -2.0**30,
                            float("inf"), float("-inf"), float("nan"), 1e-38, -1e-45])
    x = torch.cat([(k + 0.5) * 0.25, k * 0.25, special]).to(DEVICE)
    s, zp = torch.tensor(0.25, device=DEVICE), torch.tensor(0.0, device=DEVICE)
    for qmin, qmax in [(-128, 127), (0, 255)]:
        y = ops.fake_quantize_triton(x, s, zp, qmin, qmax)
        _assert_same(y, ref_fq(x, s, zp, qmin, qmax))
        q = ops.quantize_triton(x, s, zp, qmin, qmax)
        _assert_same(q, ref_codes(x, s, zp, qmin, qmax).to(q.dtype))
    big = torch.tensor([2.0**60 + 2.0**8, -(2.0**52) - 0.5, 4503599627370497.5],
                       dtype=torch.float64, device=DEVICE)
    y = ops.fake_quantize_triton(big, torch.tensor(1.0, device=DEVICE), zp, -128, 127)
    _assert_same(y, ref_fq(big, torch.tensor(1.0, device=DEVICE), zp, -128, 127))


@triton.jit
def _noise_kernel(seed_ptr, out_ptr, base, n, IDX64: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(out_ptr + i, triton_kernels._uniform(seed_ptr, base + i, IDX64), mask=i < n)


def test_uniform_noise_bits():
    """The in-kernel hash against reference.uniform_noise, including the high index word."""
    n = 1000
    for seed in SEEDS:
        out = torch.empty(n, device=DEVICE)
        _noise_kernel[(1,)](_seed(seed), out, 0, n, IDX64=False, BLOCK=1024)
        _assert_same(out, reference.uniform_noise(seed, n, DEVICE))
        # Indices past 2^32 use the high word: the reference's formula on those indices.
        base = 3 * 2**32 + 17
        _noise_kernel[(1,)](_seed(seed), out, base, n, IDX64=True, BLOCK=1024)
        a, b = reference._key(seed)
        idx = torch.arange(base, base + n, dtype=torch.int64)
        h = reference._pcg_hash(reference._pcg_hash((idx & 0xFFFFFFFF) ^ a)
                                ^ (((idx >> 32) + b) & 0xFFFFFFFF))
        _assert_same(out.cpu(), (h >> 8).to(torch.float32) * (1.0 / 16777216.0))


def test_non_contiguous_inputs():
    base = torch.randn(24, 40, device=DEVICE) * 2
    s_all = torch.rand(80, device=DEVICE) * 0.2 + 0.05
    zp = torch.full((40,), 3.0, device=DEVICE)
    for x in (base.t(), base[:, ::2], base[::3, 1:]):
        for axis in (0, 1, None):
            ch = x.shape[axis] if axis is not None else 1
            s = s_all[: 2 * ch : 2] if axis is not None else s_all[0]  # a strided scale too
            z = zp[:ch] if axis is not None else zp[0]
            y = ops.fake_quantize_triton(x, s, z, -8, 7, axis)
            assert y.is_contiguous()
            _assert_same(y, ref_fq(x, s, z, -8, 7, axis))
            q = ops.quantize_triton(x, s, z, -8, 7, axis, None, True)
            want = reference.pack_nibbles(ref_codes(x, s, z, -8, 7, axis))
            _assert_same(q, want)


def test_outputs_are_fresh():
    x = torch.randn(8, 8, device=DEVICE)
    s, zp = torch.tensor(0.1, device=DEVICE), torch.tensor(0, device=DEVICE)
    y = ops.fake_quantize_triton(x, s, zp, -128, 127)
    gx, gs, gz = ops.fake_quantize_backward_triton(x, x, s, zp, -128, 127, None, None, None, 1.0,
                                                   True, False)
    for t in (y, gx, gs, gz):
        assert t.data_ptr() != x.data_ptr()
    assert gx.data_ptr() != y.data_ptr()


@pytest.mark.parametrize("shape,axis,group_size", [((33, 65), None, None), ((9, 20), -1, None),
                                                    ((7, 129), 0, None), ((5, 9), None, 3)])
def test_int64_indexing_path(monkeypatch, shape, axis, group_size):
    """The kernels' int64 index path (taken past 2^31 elements), forced on a small tensor."""
    monkeypatch.setattr(triton_kernels, "_needs_int64", lambda plan, row_len=None: True)
    x, s, zp = _inputs(shape, axis, group_size, torch.bfloat16, -8, 7)
    g = torch.randn(shape, device=DEVICE).to(torch.bfloat16)
    y = ops.fake_quantize_triton(x, s, zp, -8, 7, axis, group_size, _seed(-5))
    _assert_same(y, ref_fq(x, s, zp, -8, 7, axis, group_size, -5))
    gx, gs, gz = ops.fake_quantize_backward_triton(g, x, s, zp, -8, 7, axis, group_size,
                                                   _seed(-5), 1.0, True, True)
    rx, rs, rz = ref_bwd(g, x, s, zp, -8, 7, axis, group_size, -5)
    ms, mz = _term_magnitude(g, x, s, zp, -8, 7, axis, group_size, -5)
    _assert_same(gx, rx)
    _assert_sum_close(gs, rs, ms)
    _assert_sum_close(gz, rz, mz)
    codes = ref_codes(x, s, zp, -8, 7, axis, group_size)
    q = ops.quantize_triton(x, s, zp, -8, 7, axis, group_size)
    _assert_same(q, codes.to(torch.int8))
    p = ops.quantize_triton(x, s, zp, -8, 7, axis, group_size, True)
    _assert_same(p, reference.pack_nibbles(codes))
    want = reference.dequantize_codes(codes, s, zp, -8, 7, _norm_axis(shape, axis), group_size,
                                      torch.float32)
    _assert_same(ops.dequantize_triton(q, s, zp, -8, 7, axis, group_size, False, shape[-1],
                                       torch.float32), want)
    _assert_same(ops.dequantize_triton(p, s, zp, -8, 7, axis, group_size, True, shape[-1],
                                       torch.float32), want)


# ---- fake_quantize_backward ----------------------------------------------------------------------


@pytest.mark.parametrize("shape,axis,group_size", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seed", [None, -1])
def test_backward_matches_reference(shape, axis, group_size, dtype, seed):
    qmin, qmax = -8, 7
    x, s, zp = _inputs(shape, axis, group_size, dtype, qmin, qmax)
    g = torch.randn(shape, device=DEVICE).to(dtype)
    gx, gs, gz = ops.fake_quantize_backward_triton(g, x, s, zp, qmin, qmax, axis, group_size,
                                                   _seed(seed), 0.5, True, True)
    rx, rs, rz = ref_bwd(g, x, s, zp, qmin, qmax, axis, group_size,
                                                  seed, 0.5)
    _assert_same(gx, rx)
    ms, mz = _term_magnitude(g, x, s, zp, qmin, qmax, axis, group_size, seed)
    _assert_sum_close(gs, rs, 0.5 * ms)
    _assert_sum_close(gz, rz, 0.5 * mz)


@pytest.mark.parametrize("need_s,need_z", [(False, False), (True, False), (False, True)])
def test_backward_returns_zeros_for_grads_not_requested(need_s, need_z):
    x, s, zp = _inputs((9, 20), -1, None, torch.float32, 0, 255)
    g = torch.randn(9, 20, device=DEVICE)
    gx, gs, gz = ops.fake_quantize_backward_triton(g, x, s, zp, 0, 255, -1, None, None, 1.0,
                                                   need_s, need_z)
    rx, rs, rz = ref_bwd(g, x, s, zp, 0, 255, -1)
    _assert_same(gx, rx)
    ms, mz = _term_magnitude(g, x, s, zp, 0, 255, -1, None, None)
    _assert_sum_close(gs, rs if need_s else torch.zeros_like(rs), ms)
    _assert_sum_close(gz, rz if need_z else torch.zeros_like(rz), mz)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the interpreter, on NaN
def test_backward_nan_and_inf_inputs():
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.3, 100.0, -100.0],
                     device=DEVICE)
    s, zp = torch.tensor(0.1, device=DEVICE), torch.tensor(1.0, device=DEVICE)
    g = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], device=DEVICE)
    got = ops.fake_quantize_backward_triton(g, x, s, zp, -8, 7, None, None, None, 1.0, True, True)
    want = ref_bwd(g, x, s, zp, -8, 7)
    for a, b in zip(got, want):
        _assert_same(a, b)
    assert got[0][0] == 0  # a NaN code counts as above the range
    y = ops.fake_quantize_triton(x, s, zp, -8, 7)
    finite = ~torch.isinf(x)
    _assert_same(y[finite], ref_fq(x[finite], s, zp, -8, 7))
    # +-inf clamp to the range ends, (qmax - z) * s and (qmin - z) * s (kernels/common/quant_math.h)
    _assert_same(y[1:3], ((torch.tensor([7.0, -8.0], device=DEVICE) - 1.0) * 0.1))


def test_backward_int_zero_point_grad_dtype():
    x, s, zp = _inputs((6, 5, 7), 0, None, torch.float32, -128, 127, int_zp=True)
    s = s.double()
    g = torch.randn(6, 5, 7, device=DEVICE)
    gx, gs, gz = ops.fake_quantize_backward_triton(g, x, s, zp, -128, 127, 0, None, None, 1.0,
                                                   True, True)
    rx, rs, rz = ref_bwd(g, x, s, zp, -128, 127, 0)
    assert gs.dtype == torch.float64 and gz.dtype == torch.float64
    ms, mz = _term_magnitude(g, x, s, zp, -128, 127, 0, None, None)
    _assert_same(gx, rx)
    _assert_sum_close(gs, rs, ms)
    _assert_sum_close(gz, rz, mz)


# ---- quantize / dequantize -----------------------------------------------------------------------


@pytest.mark.parametrize("shape,axis,group_size", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("qmin,qmax", [(-128, 127), (0, 255), (-8, 7), (0, 7)])
def test_quantize_and_dequantize_match_reference(shape, axis, group_size, dtype, qmin, qmax):
    x, s, zp = _inputs(shape, axis, group_size, dtype, qmin, qmax)
    codes = ref_codes(x, s, zp, qmin, qmax, axis, group_size)
    q = ops.quantize_triton(x, s, zp, qmin, qmax, axis, group_size)
    _assert_same(q, codes.to(torch.int8 if qmin < 0 else torch.uint8))
    y = ops.dequantize_triton(q, s, zp, qmin, qmax, axis, group_size, False,
                              shape[-1] if shape else 1, dtype)
    _assert_same(y, reference.dequantize_codes(codes, s, zp, qmin, qmax,
                                               _norm_axis(shape, axis), group_size, dtype))
    if qmax - qmin > 15:
        return
    p = ops.quantize_triton(x, s, zp, qmin, qmax, axis, group_size, True)
    if not shape:  # 0-d: one byte, viewed as 0-d
        _assert_same(p, reference.pack_nibbles(codes.reshape(1)).reshape(()))
        return
    _assert_same(p, reference.pack_nibbles(codes))
    y = ops.dequantize_triton(p, s, zp, qmin, qmax, axis, group_size, True, shape[-1], dtype)
    _assert_same(y, reference.dequantize_codes(codes, s, zp, qmin, qmax,
                                               _norm_axis(shape, axis), group_size, dtype))


@pytest.mark.parametrize("qmin,qmax", [(-8, 7), (0, 15), (-4, 3), (0, 7)])
@pytest.mark.parametrize("last", [1, 2, 7, 129])
def test_pack_unpack_every_code(qmin, qmax, last):
    """Every code value, odd and even last dims: nibble order, sign extension, high nibble 0."""
    codes = torch.randint(qmin, qmax + 1, (3, last), dtype=torch.int32, device=DEVICE)
    codes.view(-1)[: qmax - qmin + 1] = torch.arange(qmin, qmax + 1)[: codes.numel()].to(DEVICE)
    s, zp = torch.tensor(1.0, device=DEVICE), torch.tensor(0.0, device=DEVICE)
    if qmin >= 0:
        zp = torch.tensor(float(qmin), device=DEVICE)
    x = (codes.float() - zp)  # s = 1: quantize(x) = codes
    p = ops.quantize_triton(x, s, zp, qmin, qmax, None, None, True)
    assert p.shape == (3, (last + 1) // 2)
    _assert_same(p, reference.pack_nibbles(codes))
    if last % 2:
        assert bool((p[:, -1] >> 4 == 0).all())
    y = ops.dequantize_triton(p, s, zp, qmin, qmax, None, None, True, last, torch.float32)
    _assert_same(y, x)
    unpacked = reference.unpack_nibbles(p, last, qmin < 0)
    _assert_same(unpacked.to(torch.int32), codes)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_quantize_nan_gives_zero_point():
    x = torch.tensor([float("nan"), 1.0, float("inf"), -float("inf")], device=DEVICE)
    s, zp = torch.tensor(0.5, device=DEVICE), torch.tensor(5, device=DEVICE)
    q = ops.quantize_triton(x, s, zp, 0, 15)
    assert q.tolist() == [5, 7, 15, 0]
    _assert_same(q, ref_codes(x, s, zp, 0, 15).to(torch.uint8))


def test_dequantize_fp16_bf16_outputs():
    codes = torch.randint(-128, 128, (7, 129), dtype=torch.int8, device=DEVICE)
    s = torch.rand(129, device=DEVICE) * 0.3 + 0.01
    zp = torch.randint(-3, 3, (129,), device=DEVICE)
    for dtype in DTYPES:
        y = ops.dequantize_triton(codes, s, zp, -128, 127, 1, None, False, 129, dtype)
        _assert_same(y, reference.dequantize_codes(codes, s, zp, -128, 127, 1, None, dtype))


# ---- empty tensors -------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,axis,group_size",
                         [((0,), None, None), ((3, 0), 0, None), ((3, 0), 1, None),
                          ((0, 8), None, 4)])
def test_empty_tensors(shape, axis, group_size):
    x, s, zp = _inputs(shape, axis, group_size, torch.float32, -8, 7)
    y = ops.fake_quantize_triton(x, s, zp, -8, 7, axis, group_size)
    _assert_same(y, ref_fq(x, s, zp, -8, 7, axis, group_size))
    gx, gs, gz = ops.fake_quantize_backward_triton(x, x, s, zp, -8, 7, axis, group_size, None,
                                                   1.0, True, True)
    rx, rs, rz = ref_bwd(x, x, s, zp, -8, 7, axis, group_size)
    for a, b in ((gx, rx), (gs, rs), (gz, rz)):
        _assert_same(a, b)
    q = ops.quantize_triton(x, s, zp, -8, 7, axis, group_size)
    assert q.shape == x.shape and q.dtype == torch.int8
    p = ops.quantize_triton(x, s, zp, -8, 7, axis, group_size, True)
    assert p.shape == (*shape[:-1], (shape[-1] + 1) // 2)
    y = ops.dequantize_triton(p, s, zp, -8, 7, axis, group_size, True, shape[-1], torch.float32)
    assert y.shape == x.shape


# ---- errors, availability, heuristics, opcheck ---------------------------------------------------


def test_bad_inputs_raise():
    x = torch.randn(4, 6, device=DEVICE)
    s, zp = torch.tensor(0.1, device=DEVICE), torch.tensor(0.0, device=DEVICE)
    with pytest.raises(TypeError, match="x must be float32"):
        ops.fake_quantize_triton(x.int(), s, zp, -8, 7)
    with pytest.raises(ValueError, match="quant_min"):
        ops.fake_quantize_triton(x, s, zp, 7, -8)
    with pytest.raises(ValueError, match="scale has 1 elements, expected 6"):
        ops.fake_quantize_triton(x, s, zp, -8, 7, 1)
    with pytest.raises(ValueError, match="does not divide"):
        ops.fake_quantize_triton(x, s, zp, -8, 7, None, 4)
    with pytest.raises(ValueError, match="axis 2 is out of range"):
        ops.quantize_triton(x, s, zp, -8, 7, 2)
    with pytest.raises(ValueError, match="seed must be an int64"):
        ops.fake_quantize_triton(x, s, zp, -8, 7, seed=torch.tensor([1.0], device=DEVICE))
    with pytest.raises(ValueError, match="pack=True needs a 4-bit code range"):
        ops.quantize_triton(x, s, zp, -128, 127, None, None, True)
    with pytest.raises(TypeError, match="data must be torch.int8"):
        ops.dequantize_triton(x, s, zp, -8, 7, None, None, False, 6, torch.float32)
    with pytest.raises(ValueError, match="grad has shape"):
        ops.fake_quantize_backward_triton(x[:2], x, s, zp, -8, 7, None, None, None, 1.0, True,
                                          True)


def test_triton_available():
    ok, why = triton_kernels.triton_available(DEVICE)
    assert ok and why == ""
    ok, why = triton_kernels.triton_available(torch.device("meta"))
    assert not ok and "CUDA" in why


def test_tile_plan_views_and_blocks():
    plan = triton_kernels.tile_plan(1, 1, 10**6)  # per-tensor: row view, reduce along inner
    assert plan.row_channel and plan.block_r * plan.block_c == 4096
    plan = triton_kernels.tile_plan(4096, 512, 1)  # per-channel, last axis: column view
    assert not plan.row_channel and plan.block_r == 32 and plan.partials == 128 * 512
    plan = triton_kernels.tile_plan(10**6, 4, 1)  # few channels: tall tiles, still 4096 elements
    assert not plan.row_channel and (plan.block_r, plan.block_c) == (1024, 4)
    plan = triton_kernels.tile_plan(1, 1000, 128)  # group-wise: one partial per group
    assert plan.row_channel and plan.partials == 1000
    for o, c, i in [(1, 1, 1), (3, 5, 7), (129, 1, 2), (2, 7, 3000)]:
        p = triton_kernels.tile_plan(o, c, i)
        for b in (p.block_r, p.block_c):
            assert b & (b - 1) == 0
        assert p.block_r * p.block_c <= 4096 and p.rows * p.cols == o * c * i
    assert triton_kernels.num_warps_for(1024) == 4 and triton_kernels.num_warps_for(4096) == 8
    # Both tilings appear in CASES.
    views = {triton_kernels.tile_plan(*layout_of(sh, _norm_axis(sh, a), g)).row_channel
             for sh, a, g in CASES if math.prod(sh)}
    assert views == {True, False}


def test_opcheck_schema_and_fake():
    x, s, zp = _inputs((6, 10), 1, None, torch.float32, -8, 7)
    g = torch.randn(6, 10, device=DEVICE)
    seed = _seed(5)
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(ops.fake_quantize_triton.default, (x, s, zp, -8, 7, 1, None, seed),
                          test_utils=utils)
    torch.library.opcheck(ops.fake_quantize_backward_triton.default,
                          (g, x, s, zp, -8, 7, 1, None, seed, 1.0, True, True), test_utils=utils)
    torch.library.opcheck(ops.quantize_triton.default, (x, s, zp, -8, 7, 1, None, True),
                          test_utils=utils)
    p = ops.quantize_triton(x, s, zp, -8, 7, 1, None, True)
    torch.library.opcheck(ops.dequantize_triton.default,
                          (p, s, zp, -8, 7, 1, None, True, 10, torch.bfloat16), test_utils=utils)


def test_schemas_match_the_cpp_ops():
    """Same argument names, types, defaults and returns as csrc/schemas.cpp (when built).
    triton_op infers its schema from annotations and writes Python int as SymInt (it ignores an
    explicit schema in torch 2.13); a SymInt argument takes the same Python ints."""
    for name in ("fake_quantize", "fake_quantize_backward", "quantize", "dequantize"):
        if not hasattr(ops, name):
            pytest.skip("pypaper._C is not built")
        native = str(getattr(ops, name).default._schema)
        twin = str(getattr(ops, name + "_triton").default._schema)
        twin = twin.replace(f"pypaper::{name}_triton(", f"pypaper::{name}(")
        assert twin.replace("SymInt", "int") == native
