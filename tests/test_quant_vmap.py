"""The quant family's batching rules (pypaper/quant/vmap_rules.py) against the ops run sample by
sample: forward to the bit, per-sample gradients as autograd gives them, and the cases a rule
leaves to the per-sample loop (batched parameters, parameter gradients) still right.
"""
import pytest
import torch
import torch.func as func

import pypaper
from pypaper import _ext
from pypaper.quant import Int4WeightOnlyLinear, Int8DynamicLinear, Int8WeightOnlyLinear

pytestmark = pytest.mark.skipif(not _ext.LOADED, reason="pypaper._C not built")

B = 3


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _loop(fn, args, in_dims):
    outs = [fn(*[a if d is None else a.select(d, s) for a, d in zip(args, in_dims)])
            for s in range(B)]
    return torch.stack(outs)


def _fq_per_tensor(x):
    return pypaper.ops.fake_quantize(x, 0.05, 0, 8)


def _fq_axis0(x):
    return pypaper.ops.fake_quantize(x, torch.tensor([0.03, 0.05, 0.08, 0.1]), 0, 4, axis=0)


def _fq_axis_last(x):
    return pypaper.ops.fake_quantize(x, torch.linspace(0.02, 0.1, 6), 1, 4, axis=-1,
                                     symmetric=False)


def _power_per_tensor(x):
    return pypaper.ops.power_fake_quantize(x, 2.0, 4, 3.0)


def _power_per_channel(x):  # one range per leading row of x
    return pypaper.ops.power_fake_quantize(x, 1.5, 4, torch.tensor([1.0, 2.0, 2.5, 3.0]))


ELEMENTWISE = {
    "fake_quantize": (_fq_per_tensor, "pypaper::fake_quantize"),
    "fake_quantize_axis0": (_fq_axis0, "pypaper::fake_quantize"),
    "fake_quantize_axis_last": (_fq_axis_last, "pypaper::fake_quantize"),
    "power_fake_quantize": (_power_per_tensor, "pypaper::power_fake_quantize"),
    "power_fake_quantize_per_channel": (_power_per_channel, "pypaper::power_fake_quantize"),
}


@pytest.mark.parametrize("name", sorted(ELEMENTWISE))
@pytest.mark.parametrize("in_dim", [0, 2])
def test_elementwise_forward_and_grad(name, in_dim, vmap_calls):
    fn, op = ELEMENTWISE[name]
    x = _rand(4, 6, seed=1).unsqueeze(in_dim).repeat(*[B if i == in_dim else 1 for i in range(3)])
    x = x + 0.2 * _rand(*x.shape, seed=2)
    got = func.vmap(fn, in_dims=in_dim)(x)
    assert torch.equal(got, _loop(fn, (x,), (in_dim,)))
    assert vmap_calls == {op: 1}
    w = _rand(4, 6, seed=3)
    g = func.vmap(func.grad(lambda xs: (fn(xs) * w).sum()), in_dims=in_dim)(x)
    for s in range(B):
        xs = x.select(in_dim, s).clone().requires_grad_()
        (want,) = torch.autograd.grad((fn(xs) * w).sum(), xs)
        assert torch.equal(g[s], want)
    assert vmap_calls == {op: 2, op.replace("quantize", "quantize_backward"): 1}


def test_fake_quantize_scale_gradient_per_sample(vmap_calls):
    """LSQ's scale gradient wanted per sample: the backward rule leaves it to the loop."""
    x = _rand(B, 4, 6, seed=4)
    scale = torch.tensor(0.05)

    def loss(xs, s):
        return (pypaper.ops.fake_quantize(xs, s, 0, 4) * torch.arange(24.0).reshape(4, 6)).sum()

    gx, gs = func.vmap(func.grad(loss, argnums=(0, 1)), in_dims=(0, None))(x, scale)
    for s in range(B):
        xs, ss = x[s].clone().requires_grad_(), scale.clone().requires_grad_()
        wx, ws = torch.autograd.grad(loss(xs, ss), (xs, ss))
        torch.testing.assert_close(gx[s], wx)
        torch.testing.assert_close(gs[s], ws)
    assert "pypaper::fake_quantize_backward" not in vmap_calls


def test_batched_scale_runs_per_sample(vmap_calls):
    """An ensemble of quantizers (one scale per sample): not folded, still right."""
    x, scale = _rand(B, 4, 6, seed=5), torch.tensor([0.03, 0.05, 0.1])
    fn = lambda xs, s: pypaper.ops.fake_quantize(xs, s, 0, 8)  # noqa: E731
    assert torch.equal(func.vmap(fn)(x, scale), _loop(fn, (x, scale), (0, 0)))
    assert vmap_calls == {}


def _linears():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 8)
    return {
        "int8_dynamic": (Int8DynamicLinear.from_float(lin), "pypaper::int8_dynamic_linear"),
        "int8_weight_only": (Int8WeightOnlyLinear.from_float(lin),
                             "pypaper::int8_weight_only_linear"),
        "int4_weight_only": (Int4WeightOnlyLinear.from_float(lin, group_size=32),
                             "pypaper::int4_weight_only_linear"),
    }


def _path_switch_atol(name, layer, x):
    """How far vmap's one call may be from the loop's per-sample calls for the int8 weight-only
    linear: its CPU kernel picks a path by the number of rows M, and vmap folds the batch into
    B times more rows. On AVX2 without VNNI, M <= 8 rows round x to 16-bit fixed point per chunk
    of 64 inputs (kernels/cpu/qlinear_int8_madd.h: |x~ - x| <= 0.51 max|x_chunk| / 32639) and
    more rows take the fp32 path, so one side may carry that rounding and the other not:
    |dy_n| <= sum_k |W_nk| * 0.51 * max|x| / 32639. The other linears quantize per row either
    way (or on every path alike), so their one call matches the loop to float rounding."""
    if name != "int8_weight_only":
        return 1e-6
    w = layer.dequantized_weight().abs().sum(dim=1).max()
    return float(w * 0.51 * x.abs().max() / 32639) + 1e-6


@pytest.mark.parametrize("name", ["int8_dynamic", "int8_weight_only", "int4_weight_only"])
def test_quantized_linear(name, vmap_calls):
    layer, op = _linears()[name]
    x = _rand(B, 5, 64, seed=6)
    got = func.vmap(layer)(x)
    torch.testing.assert_close(got, _loop(layer, (x,), (0,)), rtol=1e-6,
                               atol=_path_switch_atol(name, layer, x))
    # The batching rule itself (the fold into rows and back) adds nothing: the same one call.
    one = layer(x.reshape(-1, 64)).reshape(B, 5, -1)
    assert torch.equal(got, one)
    assert vmap_calls == {op: 1}
    w = _rand(5, 8, seed=7)
    g = func.vmap(func.grad(lambda xs: (layer(xs) * w).sum()))(x)
    for s in range(B):
        xs = x[s].clone().requires_grad_()
        (want,) = torch.autograd.grad((layer(xs) * w).sum(), xs)
        torch.testing.assert_close(g[s], want, rtol=1e-5, atol=1e-6)


def test_int8_dynamic_int32_rows():
    layer, _ = _linears()["int8_dynamic"]
    x = _rand(B, 5, 64, seed=8)
    fn = lambda xs: pypaper.ops.int8_dynamic_linear_int32(  # noqa: E731
        xs, layer.w_packed, layer.w_colsum, layer.out_features, 127)
    acc, scales = func.vmap(fn)(x)
    for s in range(B):
        a, sc = fn(x[s])
        assert torch.equal(acc[s], a) and torch.equal(scales[s], sc)


@pytest.mark.parametrize("axis", [None, 0, -1])
def test_quantize_dequantize_ops_fold(axis, vmap_calls):
    """The codec ops with given parameters (torch.ops.pypaper.quantize / dequantize), 4-bit
    codes packed two per byte along the last dim."""
    ops = torch.ops.pypaper
    x = _rand(B, 4, 6, seed=9)
    shape = () if axis is None else (x.shape[1:][axis],)
    scale = torch.full(shape, 0.2) + (0 if axis is None else torch.linspace(0, 0.1, shape[0]))
    zero = torch.zeros(shape, dtype=torch.int32)

    def codec(xs):
        q = ops.quantize(xs, scale, zero, -8, 7, axis, None, True)
        return q, ops.dequantize(q, scale, zero, -8, 7, axis, None, True, 6, torch.float32)

    q, y = func.vmap(codec)(x)
    for s in range(B):
        qs, ys = codec(x[s])
        assert torch.equal(q[s], qs) and torch.equal(y[s], ys)
    assert vmap_calls == {"pypaper::quantize": 1, "pypaper::dequantize": 1}


def test_power_codec_fold(vmap_calls):
    x = _rand(B, 4, 6, seed=10)

    def codec(xs):
        codes = pypaper.ops.power_quantize(xs, 2.0, 4, torch.tensor([1.0, 2.0, 2.5, 3.0]))
        return codes, pypaper.ops.power_dequantize(codes, 2.0, 4,
                                                   torch.tensor([1.0, 2.0, 2.5, 3.0]))

    c, y = func.vmap(codec)(x)
    for s in range(B):
        cs, ys = codec(x[s])
        assert torch.equal(c[s], cs) and torch.equal(y[s], ys)
    assert vmap_calls == {"pypaper::power_quantize": 1, "pypaper::power_dequantize": 1}


# Found in review: each gave a result other than the per-sample loop's before its fix.

@pytest.mark.parametrize("shape", [(4, 4, 64), (5, 3, 64)])
def test_quantized_linear_batch_not_first(shape, vmap_calls):
    """vmap(in_dims=1) over x [M, B, K]: the rule moves the batch first before folding rows."""
    layer, op = _linears()["int8_dynamic"]
    x = _rand(*shape, seed=11)
    got = func.vmap(layer, in_dims=1)(x)
    want = torch.stack([layer(x[:, b]) for b in range(shape[1])])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert vmap_calls == {op: 1}


@pytest.mark.parametrize("sample_shape,channels", [((2, 3), 3), ((6, 2), 4), ((4, 3), 2)])
def test_power_channels_across_rows(sample_shape, channels, vmap_calls):
    """C ranges over a sample whose leading dim C does not divide: each range spans parts of
    rows, which the folded layout would break; the rule leaves those to the loop."""
    m = torch.linspace(1.0, 3.0, channels)
    f = lambda xs: pypaper.ops.power_fake_quantize(xs, 1.5, 4, m)  # noqa: E731
    x = _rand(B, *sample_shape, seed=12) * 2
    assert torch.equal(func.vmap(f)(x), _loop(f, (x,), (0,)))
    g = func.vmap(func.grad(lambda xs: f(xs).sum()))(x)
    assert torch.equal(g, _loop(func.grad(lambda xs: f(xs).sum()), (x,), (0,)))
    folds = sample_shape[0] % channels == 0
    assert vmap_calls.get("pypaper::power_fake_quantize", 0) == (2 if folds else 0)


def test_packed_codes_of_scalar_samples():
    """4-bit codes of 0-d samples: one code per sample, as the op alone gives it (packing
    pairs along the batch dim was wrong)."""
    ops = torch.ops.pypaper
    s, z = torch.tensor(0.2), torch.tensor(0, dtype=torch.int32)
    f = lambda xs: ops.quantize(xs, s, z, -8, 7, None, None, True)  # noqa: E731
    x = _rand(5, seed=13)
    assert torch.equal(func.vmap(f)(x), torch.stack([f(v) for v in x]))
    d = torch.tensor([3], dtype=torch.uint8)
    dq = lambda c: ops.dequantize(c, s, z, -8, 7, None, None, True, 1, torch.float32)  # noqa: E731
    with pytest.raises(RuntimeError):
        dq(d[0])
    with pytest.raises(RuntimeError):
        func.vmap(dq)(d)
