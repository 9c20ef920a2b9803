"""The C++ qlinear kernels (csrc/quant/qlinear_cpu.cpp, kernels/cpu/qlinear_cpu.h) against the
plain-PyTorch reference (pypaper/quant/qlinear_reference.py), on every compiled instruction path
(scalar, AVX2, AVX-512 VNNI).

Tolerances:
  int8 dynamic: activation scales and int32 accumulators exact (integers); y exact (the same fp32
      epilogue (float(acc) * sa) * sw + b, one rounding per operation, in every path);
  int8 / int4 weight-only: fp32 sums in another order than the fp64 reference:
      |y - ref| <= 2e-6 * sum_k |x_k w_k| + 1e-7 (helpers.sum_bound), and the paths agree with each
      other within the same bound;
  int4 weight-only on the SIMD paths at M <= 8 (activations split into 16-bit fixed point per
      group, kernels/cpu/qlinear_int4_split.h): plus sum_k |w_k| 0.51 max_g|x| / 32639
      (helpers.split_act_bound), about 1e-5 of sum_k |x_k w_k|.
"""
import pytest
import torch

from pypaper.quant import qlinear_ops as ops
from pypaper.quant import qlinear_reference as ref

from .helpers import (compiled_isas, heavy_tailed, int4_bound, int8_wo_bound, isa, split_act_bound,
                      sum_bound)

ISAS = compiled_isas()
SHAPES = [(1, 7, 5), (7, 33, 17), (13, 129, 40), (129, 64, 33), (0, 8, 16), (3, 1, 1),
          (20, 256, 31)]


def _dyn(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = heavy_tailed((n, k), g)
    return w, ops.prepare_int8_dynamic(w)


@pytest.mark.parametrize("isa_name", ISAS)
@pytest.mark.parametrize("act_qmax", [127, 63])
@pytest.mark.parametrize("M,K,N", SHAPES)
def test_int8_dynamic_exact(isa_name, act_qmax, M, K, N):
    x = torch.randn(M, K) * 3
    _, (wp, sw, cs) = _dyn(N, K)
    b = torch.randn(N)
    acc_r, sa_r = ref.int8_dynamic_linear_int32(x, wp, cs, N, act_qmax)
    y_r = ref.int8_dynamic_linear(x, wp, sw, cs, b, act_qmax)
    with isa(isa_name):
        acc, sa = torch.ops.pypaper.int8_dynamic_linear_int32(x, wp, cs, N, act_qmax)
        y = torch.ops.pypaper.int8_dynamic_linear(x, wp, sw, cs, b, act_qmax)
        y_nb = torch.ops.pypaper.int8_dynamic_linear(x, wp, sw, cs, None, act_qmax)
    assert acc.dtype == torch.int32 and torch.equal(acc, acc_r)
    assert torch.equal(sa, sa_r)
    assert torch.equal(y, y_r)
    assert torch.equal(y_nb, ref.int8_dynamic_linear(x, wp, sw, cs, None, act_qmax))


@pytest.mark.parametrize("isa_name", ISAS)
@pytest.mark.parametrize("act_qmax", [127, 63])
def test_int8_dynamic_saturation_extremes(isa_name, act_qmax):
    """Every product at its largest: activations at +-A (all rows one value), weights +-127 with
    the sign pattern that makes the AVX2 pair sums u0*w0 + u1*w1 largest; plus K large enough
    that the int32 sum is large. vpmaddubsw would saturate at 32767 with 8-bit unsigned
    activations; the chosen encodings cannot."""
    K, N = 4100, 20
    x = torch.full((3, K), 1.0)
    x[1] = -1.0
    x[2, ::2] = -1.0
    w = torch.ones(N, K)
    w[1] = -1.0
    w[2, 1::2] = -1.0
    w[3, ::3] = -1.0
    wp, sw, cs = ops.prepare_int8_dynamic(w)
    assert int(ref.unpack_int8_panels(wp, N, K).abs().min()) == 127
    with isa(isa_name):
        acc, sa = torch.ops.pypaper.int8_dynamic_linear_int32(x, wp, cs, N, act_qmax)
    acc_r, _ = ref.int8_dynamic_linear_int32(x, wp, cs, N, act_qmax)
    assert torch.equal(acc, acc_r)
    assert int(acc[0, 0]) == K * act_qmax * 127


@pytest.mark.parametrize("isa_name", ISAS)
def test_int8_dynamic_noncontiguous_and_zero_rows(isa_name):
    x_big = torch.randn(9, 80)
    x = x_big[::2, 3:70]  # strided rows, unit stride along k
    x[1] = 0.0  # a zero row: scale FLT_MIN, codes 0
    _, (wp, sw, cs) = _dyn(19, 67, 1)
    with isa(isa_name):
        y = torch.ops.pypaper.int8_dynamic_linear(x, wp, sw, cs, None, 127)
        yt = torch.ops.pypaper.int8_dynamic_linear(x.t().contiguous().t(), wp, sw, cs, None, 127)
    y_r = ref.int8_dynamic_linear(x.contiguous(), wp, sw, cs, None, 127)
    assert torch.equal(y, y_r) and torch.equal(yt, y_r)
    assert torch.all(y[1] == 0)


def _wo_cases():
    # (M, K, N, group_size): direct kernels (int8: M <= 8; int4: M <= 128 on AVX2 / AVX-512) and
    # the dequantize + GEMM path above.
    return [(1, 64, 7, 32), (3, 128, 17, 64), (5, 256, 33, 256), (8, 96, 16, 32),
            (9, 128, 20, 32), (40, 256, 70, 128), (0, 64, 5, 32), (2, 32, 1, 32),
            (128, 160, 9, 32), (130, 64, 9, 64),
            # G = 128 / 256 (the whole-group VNNI kernel) past one block of 64 groups' scales
            (1, 8448, 5, 128), (6, 17408, 3, 256)]


@pytest.mark.parametrize("isa_name", ISAS)
@pytest.mark.parametrize("M,K,N,G", _wo_cases())
def test_int4_weight_only(isa_name, M, K, N, G):
    x = torch.randn(M, K)
    w = heavy_tailed((N, K))
    b = torch.randn(N)
    wq, s, z = ops.prepare_int4_weight_only(w, G)
    r = ref.int4_weight_only_linear(x, wq, s, z, b)
    with isa(isa_name):
        y = torch.ops.pypaper.int4_weight_only_linear(x, wq, s, z, b)
    w_hat = ref.dequantize_int4_weight(wq, s, z)
    assert y.shape == (M, N)
    assert torch.all((y - r).abs() <= int4_bound(isa_name, x, w_hat, G))


@pytest.mark.parametrize("isa_name", ISAS)
def test_int4_split_activations_precision(isa_name):
    """Outlier activations (one input 300x the rest, as in LLM hidden states): the error stays
    within its bound and the split's part of it (which grows only in the outlier's group) stays
    under 2% of the int4 weights' own error. The fp32 part is bounded with the magnitudes the
    kernels actually sum, s (q + z) x (the zero-point form cancels: sum q x - z sum x)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 1024, generator=g)
    x[:, 77] = 300.0
    w = heavy_tailed((40, 1024), g)
    wq, s, z = ops.prepare_int4_weight_only(w, 128)
    w_hat = ref.dequantize_int4_weight(wq, s, z)
    q = ref.unpack_int4(wq).float().reshape(40, 8, 128)
    w_mag = ((q + z[..., None].abs()) * s[..., None]).reshape(40, 1024)
    with isa(isa_name):
        y = torch.ops.pypaper.int4_weight_only_linear(x, wq, s, z, None)
    err = (y - (x.double() @ w_hat.double().t()).float()).abs()
    split = split_act_bound(x, w_hat, 128) if isa_name != "scalar" else 0
    assert torch.all(err <= sum_bound(x, w_mag) + split)
    int4_err = (x @ (w - w_hat).t()).abs().mean()
    assert split_act_bound(x, w_hat, 128).mean() <= 0.02 * int4_err


@pytest.mark.parametrize("isa_name", ISAS)
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize("G", [64, 128, 256])
def test_int4_nonfinite_activations(isa_name, bad, G):
    """A non-finite input makes its row's outputs non-finite on every path; other rows unaffected."""
    x = torch.randn(3, 256)
    x[1, 100] = bad
    wq, s, z = ops.prepare_int4_weight_only(torch.randn(9, 256), G)
    with isa(isa_name):
        y = torch.ops.pypaper.int4_weight_only_linear(x, wq, s, z, None)
    assert not torch.isfinite(y[1]).any()
    keep = torch.tensor([0, 2])
    w_hat = ref.dequantize_int4_weight(wq, s, z)
    assert torch.all((y[keep] - x[keep] @ w_hat.t()).abs() <= int4_bound(isa_name, x[keep], w_hat, G))


@pytest.mark.parametrize("isa_name", ISAS)
@pytest.mark.parametrize("M,K,N,G", _wo_cases() + [(3, 37, 9, None), (12, 129, 7, None),
                                                   (1, 4096, 3, None), (32, 200, 5, None),
                                                   (33, 128, 6, 64)])
def test_int8_weight_only(isa_name, M, K, N, G):
    x = torch.randn(M, K)
    w = heavy_tailed((N, K))
    b = torch.randn(N)
    wq, s = ops.prepare_int8_weight_only(w, G)
    r = ref.int8_weight_only_linear(x, wq, s, b)
    with isa(isa_name):
        y = torch.ops.pypaper.int8_weight_only_linear(x, wq, s, b)
        y_nb = torch.ops.pypaper.int8_weight_only_linear(x, wq, s, None)
    w_hat = ref.dequantize_int8_weight(wq, s)
    bound = int8_wo_bound(isa_name, x, w_hat, G)
    assert torch.all((y - r).abs() <= bound)
    assert torch.all((y_nb - ref.int8_weight_only_linear(x, wq, s, None)).abs() <= bound)


@pytest.mark.parametrize("isa_name", ISAS)
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize("G", [None, 64])
def test_int8_weight_only_nonfinite_activations(isa_name, bad, G):
    """A non-finite input makes its row's outputs non-finite on every int8 weight-only path (the
    fixed-point kernels give its chunk a NaN scale); the other rows keep their bound. Per channel
    K = 200 (a partial last chunk), in groups of 64 K = 192."""
    K = 200 if G is None else 192
    x = torch.randn(3, K)
    x[1, 150] = bad
    wq, s = ops.prepare_int8_weight_only(heavy_tailed((9, K)), G)
    with isa(isa_name):
        y = torch.ops.pypaper.int8_weight_only_linear(x, wq, s, None)
    assert not torch.isfinite(y[1]).any()
    keep = torch.tensor([0, 2])
    w_hat = ref.dequantize_int8_weight(wq, s)
    err = (y[keep] - x[keep] @ w_hat.t()).abs()
    assert torch.all(err <= int8_wo_bound(isa_name, x[keep], w_hat, G))


def test_paths_agree_on_weight_only():
    if len(ISAS) < 2:
        pytest.skip("one instruction path compiled")
    x = torch.randn(3, 512)
    wq, s, z = ops.prepare_int4_weight_only(torch.randn(64, 512), 128)
    outs = []
    for name in ISAS:
        with isa(name):
            outs.append(torch.ops.pypaper.int4_weight_only_linear(x, wq, s, z, None))
    w_hat = ref.dequantize_int4_weight(wq, s, z)
    bound = sum_bound(x, w_hat) + split_act_bound(x, w_hat, 128)
    for o in outs[1:]:
        assert torch.all((o - outs[0]).abs() <= 2 * bound)


def test_packing_roundtrip():
    q = torch.randint(-127, 128, (37, 29), dtype=torch.int8)
    p = ref.pack_int8_panels(q)
    assert p.shape == (3, 8, 16, 4)
    assert torch.equal(ref.unpack_int8_panels(p, 37, 29), q)
    # (n, k) lands where kernels/common/qlinear_math.h's int8_packed_index says
    flat = p.reshape(-1)
    for n, k in [(0, 0), (5, 3), (17, 28), (36, 4)]:
        idx = ((n // 16) * 8 + k // 4) * 64 + (n % 16) * 4 + k % 4
        assert flat[idx] == q[n, k]
    c = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    pc = ref.pack_int4(c)
    assert pc.shape == (5, 32) and torch.equal(ref.unpack_int4(pc), c)
    assert int(pc[2, 3]) == int(c[2, 3]) | (int(c[2, 19]) << 4)  # block layout: k and k + 16


def test_weight_quantization_error_bounds():
    w = heavy_tailed((64, 256))
    q, s = ref.quantize_weight_int8(w)
    assert q.abs().max() <= 127
    err = (ref.dequantize_int8_weight(q, s) - w).abs()
    assert torch.all(err <= s / 2 + 1e-7)
    p4, s4, z4 = ops.prepare_int4_weight_only(w, 32)
    err4 = (ref.dequantize_int4_weight(p4, s4, z4) - w).abs().reshape(64, 8, 32)
    assert torch.all(err4 <= s4[..., None] / 2 * (1 + 1e-5) + 1e-7)


def test_opcheck():
    x = torch.randn(5, 40)
    wp, sw, cs = ops.prepare_int8_dynamic(torch.randn(18, 40))
    b = torch.randn(18)
    wq, s = ops.prepare_int8_weight_only(torch.randn(18, 40))
    w4, s4, z4 = ops.prepare_int4_weight_only(torch.randn(18, 64), 32)
    x64 = torch.randn(5, 64)
    for xx in (x, x.clone().requires_grad_()):
        torch.library.opcheck(torch.ops.pypaper.int8_dynamic_linear, (xx, wp, sw, cs, b, 127))
        torch.library.opcheck(torch.ops.pypaper.int8_weight_only_linear, (xx, wq, s, b))
    torch.library.opcheck(torch.ops.pypaper.int8_dynamic_linear_int32, (x, wp, cs, 18, 63))
    for xx in (x64, x64.clone().requires_grad_()):
        torch.library.opcheck(torch.ops.pypaper.int4_weight_only_linear, (xx, w4, s4, z4, b))
        torch.library.opcheck(torch.ops.pypaper.int4_weight_only_linear, (xx, w4, s4, z4, None))


@pytest.mark.filterwarnings("ignore:Input #:UserWarning")
def test_gradients():
    """grad_x = grad_y @ W_hat (exact derivative of the weight-only ops, straight-through for
    the dynamic op's activation rounding), grad_bias = sum grad_y; gradcheck on the weight-only
    ops (linear in x, so fp32 central differences are accurate)."""
    x = torch.randn(4, 64, requires_grad=True)
    b = torch.randn(10, requires_grad=True)
    g = torch.randn(4, 10)
    w4, s4, z4 = ops.prepare_int4_weight_only(torch.randn(10, 64), 32)
    wq, s = ops.prepare_int8_weight_only(torch.randn(10, 64), 32)
    wp, sw, cs = ops.prepare_int8_dynamic(torch.randn(10, 64))
    cases = [
        (lambda t, bb: ops.int4_weight_only_linear(t, w4, s4, z4, bb), ref.dequantize_int4_weight(w4, s4, z4)),
        (lambda t, bb: ops.int8_weight_only_linear(t, wq, s, bb), ref.dequantize_int8_weight(wq, s)),
        (lambda t, bb: ops.int8_dynamic_linear(t, wp, sw, cs, bb), ref.dequantize_int8_dynamic_weight(wp, sw, 64)),
    ]
    for f, w_hat in cases:
        gx, gb = torch.autograd.grad(f(x, b), (x, b), g)
        torch.testing.assert_close(gx, g @ w_hat)
        torch.testing.assert_close(gb, g.sum(0))
    for f, _ in cases[:2]:
        assert torch.autograd.gradcheck(f, (x[:2].detach().clone().requires_grad_(), b.detach().clone().requires_grad_()),
                                        eps=1e-2, atol=2e-2, rtol=1e-2)
