"""Review of WTACRSLinear as a drop-in nn.Linear (session 36): torch.compile(fullgraph=True) of a
converted attention block (siblings sharing one sample), nn.Linear's positional constructor,
in_features = 0, numpy scalars as options, torch.autocast (the kept rows' dtype, compiled vs
eager), and the estimator's unbiasedness through the layer itself (the shared sample of Q/K/V
with last step's gradient norms)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pypaper import wtacrs as W

from .helpers import heavy_rows, saved_storage_bytes


class _QKV(nn.Module):
    """Three siblings reading one tensor (one SampleGroup after convert) and an output layer."""

    def __init__(self, d=8):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out = nn.Linear(d, 4)

    def forward(self, x):
        return self.out(self.q(x) * self.k(x) + self.v(x))


def test_compile_fullgraph_of_siblings_sharing_one_sample():
    """The shared sample compared the input's version counter, which dynamo cannot trace (an
    unbacked symbol): every converted transformer block failed torch.compile(fullgraph=True)
    with 'Could not guard on data-dependent expression'. Compiled, the siblings still share one
    buffer (as many bytes kept as in eager) and the forward is exact."""
    torch.manual_seed(0)
    m = W.convert(_QKV(), keep_ratio=0.25, min_k=1)
    assert m.q.sample_group is m.k.sample_group is m.v.sample_group is not None
    x = torch.randn(4, 64, 8, requires_grad=True)
    params = list(m.parameters())
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    kept_compiled, y = saved_storage_bytes(lambda: compiled(x), params)
    y.sum().backward()
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in params)
    torch.testing.assert_close(y, m(x), rtol=0, atol=0)
    kept_eager, _ = saved_storage_bytes(lambda: m(x), params)
    assert kept_compiled == kept_eager
    unshared = W.convert(_QKV(), keep_ratio=0.25, min_k=1, share_inputs=False)
    separate, _ = saved_storage_bytes(lambda: unshared(x), list(unshared.parameters()))
    assert kept_compiled < separate  # one buffer for three layers, not three


def test_eager_siblings_redraw_after_an_in_place_change():
    """Eager mode still compares the version: a sibling called after the shared input changed in
    place samples the new values instead of reusing the old sample."""
    m = W.convert(_QKV(), keep_ratio=0.25, min_k=1)
    group = m.q.sample_group
    x = torch.randn(64, 8)
    outs = [m.q(x)]  # the outputs' graphs keep the sample alive
    first = group._last[2]()
    outs.append(m.k(x))
    assert group._last[2]() is first  # same tensor, same version: shared
    x.mul_(2)
    outs.append(m.v(x))
    assert group._last[2]() is not first


@pytest.mark.parametrize("bias", [True, False])
def test_positional_constructor_of_nn_linear(bias):
    """nn.Linear(in, out, bias, device, dtype) positionally: WTACRSLinear took keep_ratio as the
    4th positional argument and refused the device ('keep_ratio must be a number ..., got
    'cpu''), so it could not stand in where nn.Linear is built positionally."""
    ref = nn.Linear(6, 3, bias, "cpu", torch.float64)
    ours = W.WTACRSLinear(6, 3, bias, "cpu", torch.float64)
    assert ours.weight.dtype == torch.float64 and (ours.bias is None) == (not bias)
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert W.WTACRSLinear(6, 3, bias, "meta").weight.is_meta
    ours = W.WTACRSLinear(6, 3, bias, None, torch.float16, keep_ratio=0.2, min_k=3)
    assert (ours.weight.dtype, ours.keep_ratio, ours.min_k) == (torch.float16, 0.2, 3)
    # the old positional keep_ratio is refused with a message saying the options are keywords
    with pytest.raises(TypeError, match="keep_ratio, min_k, estimator and generator are keyword"):
        W.WTACRSLinear(6, 3, bias, 0.3)


def test_zero_in_features_like_nn_linear():
    """nn.Linear(0, out) is y = bias; the layer flattened rows with reshape(-1, 0), which torch
    refuses (the -1 is ambiguous for 0 elements), so its training forward raised."""
    torch.manual_seed(0)
    ours = W.WTACRSLinear(0, 5, keep_ratio=0.3, min_k=1)
    ref = nn.Linear(0, 5)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(3, 40, 0, requires_grad=True)
    y = ours(x)
    assert torch.equal(y, ref(x))
    y.square().sum().backward()
    ref(x).square().sum().backward()
    assert torch.equal(ours.bias.grad, ref.bias.grad) and ours.weight.grad.shape == (5, 0)
    assert x.grad.shape == x.shape


def test_numpy_scalars_as_options():
    """keep_ratio / min_k from numpy (a sweep, a config file) were refused as 'keep_ratio must be
    a number in (0, 1], got np.float32(0.3)' / 'min_k must be an int >= 1, got np.int64(4)'; they
    are stored as Python numbers (k = max(ceil(r N), min_k) must be an int for the ops)."""
    layer = W.WTACRSLinear(8, 4, keep_ratio=np.float32(0.25), min_k=np.int64(4))
    assert type(layer.keep_ratio) is float and type(layer.min_k) is int and layer.min_k == 4
    layer(torch.randn(100, 8)).sum().backward()
    m = W.convert(_QKV(), keep_ratio=np.float64(0.5), min_k=np.int32(2))
    assert type(m.q.min_k) is int and m.q.keep_ratio == 0.5
    W.convert(m, keep_ratio=np.float16(0.25), min_k=np.uint8(3))  # converting again
    assert type(m.out.min_k) is int and (m.out.keep_ratio, m.out.min_k) == (0.25, 3)
    for bad in (np.bool_(True), np.float64(1.5)):
        with pytest.raises(ValueError, match="keep_ratio"):
            W.WTACRSLinear(8, 4, keep_ratio=bad)
    with pytest.raises(ValueError, match="min_k"):
        W.WTACRSLinear(8, 4, min_k=np.float64(3.0))


def test_shared_sample_with_grad_norms_is_unbiased_through_the_layers():
    """The whole layer path (seed, shared sample of Q and K, scores ||x_t|| times last step's
    summed gradient norms, the linear op's backward): the mean of many steps' grad_W converges to
    the exact dY^T X of each sibling, its error shrinking like 1/sqrt(steps)."""
    torch.manual_seed(0)
    m = _QKV(d=6).double()
    W.convert(m, keep_ratio=0.4, min_k=1, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(1)
    x = heavy_rows(60, 6, torch.float64, generator=g).reshape(3, 20, 6)
    ids = torch.tensor([0, 1, 2])
    # output gradients correlated with x (as in training), so that dY^T X is not a sum of
    # cancelling terms and a few-percent bias stands out of the noise
    gq = x @ torch.randn(6, 6, dtype=torch.float64, generator=g) + torch.randn(
        3, 20, 6, dtype=torch.float64, generator=g)
    gk = x.abs() @ torch.randn(6, 6, dtype=torch.float64, generator=g)
    exact_q = gq.reshape(60, 6).t() @ x.reshape(60, 6)
    exact_k = gk.reshape(60, 6).t() @ x.reshape(60, 6)
    steps = 2000
    ests = {"q": [], "k": []}
    for _ in range(steps):
        m.zero_grad()
        with W.sample_ids(ids):  # from the 2nd step on, the probabilities use ||dy|| too
            q, k = m.q(x), m.k(x)
        torch.autograd.backward([q, k], [gq, gk])
        ests["q"].append(m.q.weight.grad.clone())
        ests["k"].append(m.k.weight.grad.clone())
    assert m.q.sample_group.grad_norms.table is not None
    for name, exact in (("q", exact_q), ("k", exact_k)):
        e = torch.stack(ests[name])
        single = float(((e - exact).norm(dim=(1, 2)) ** 2).mean().sqrt() / exact.norm())
        assert single > 0.01  # a real estimate, not the exact gradient
        err = float((e.mean(0) - exact).norm() / exact.norm())
        assert err < 3.0 * single / steps ** 0.5, (name, err, single)
    # grad_input stays exact through the shared sample
    xr = x.clone().requires_grad_()
    ref = _QKV(d=6).double()
    ref.load_state_dict(m.state_dict())
    xg = x.clone().requires_grad_()
    torch.autograd.backward([m.q(xg), m.k(xg)], [gq, gk])
    torch.autograd.backward([ref.q(xr), ref.k(xr)], [gq, gk])
    torch.testing.assert_close(xg.grad, xr.grad, rtol=1e-12, atol=1e-12)
    assert torch.equal(F.linear(x, m.q.weight, m.q.bias), m.q(x))


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_autocast_keeps_rows_in_the_autocast_dtype(low):
    """Under autocast an fp32 input's kept rows were stored in fp32, although dY comes back in
    the autocast dtype and the sampled GEMM casts the rows to it: twice the bytes needed, 0.6 of
    nn.Linear's autocast footprint at keep_ratio 0.3 instead of 0.3. Stored in the autocast
    dtype, grad_W is bit for bit the one of fp32 rows (one rounding of scale * x either way)."""
    def run(store):
        torch.manual_seed(0)
        ours = W.WTACRSLinear(64, 32, keep_ratio=0.3, min_k=1, store_dtype=store,
                              generator=torch.Generator().manual_seed(5))
        x = torch.randn(8, 64, 64, requires_grad=True)
        with torch.autocast("cpu", dtype=low):
            kept, y = saved_storage_bytes(lambda: ours(x), [ours.weight, ours.bias])
        assert y.dtype == low
        y.float().square().sum().backward()
        return kept, ours.weight.grad, x.grad

    kept, gw, gx = run(None)
    kept32, gw32, gx32 = run(torch.float32)
    assert torch.equal(gw, gw32) and torch.equal(gx, gx32)
    assert gw.dtype == torch.float32
    ref = nn.Linear(64, 32)
    x = torch.randn(8, 64, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=low):
        full, _ = saved_storage_bytes(lambda: ref(x), [ref.weight, ref.bias])
    n, k, w16 = 8 * 64, math.ceil(0.3 * 8 * 64), 32 * 64 * 2
    assert full == n * 64 * 2 + w16  # nn.Linear keeps 16-bit copies of x and of its weight
    # k rows in 16 bits, their int64 indices, and the weight's 16-bit copy as nn.Linear
    assert kept == k * 64 * 2 + k * 8 + w16
    assert kept32 == k * 64 * 4 + k * 8 + w16
    assert kept - k * 8 - w16 <= 0.31 * (full - w16)
    # outside autocast nothing changes: fp32 rows for an fp32 input (and no weight copy)
    layer = W.WTACRSLinear(64, 32, keep_ratio=0.3, min_k=1)
    outside, _ = saved_storage_bytes(lambda: layer(x), [layer.weight, layer.bias])
    assert outside == kept32 - w16


def test_autocast_compiled_equals_eager():
    """The linear op has no autocast kernel: in eager mode it computed in bf16 only because the
    at::linear inside it was autocast, while its fake kernel (what torch.compile traces) said
    fp32, so the compiled layer returned fp32 and a compiled converted model computed other
    numbers than the eager one. The wrapper now casts like autocast casts nn.Linear."""
    torch.manual_seed(0)
    ours = W.WTACRSLinear(16, 8, keep_ratio=0.3, min_k=1)
    ref = nn.Linear(16, 8)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(4, 30, 16, requires_grad=True)

    def step(layer, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return layer(x)

    eager = step(ours, x)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(ours, x)
    assert eager.dtype == compiled.dtype == torch.bfloat16
    assert torch.equal(compiled, eager) and torch.equal(eager, step(ref, x))
    gy = torch.randn_like(eager)
    got = torch.autograd.grad(compiled, [x, ours.bias, ours.weight], gy)
    want = torch.autograd.grad(step(ref, x), [x, ref.bias, ref.weight], gy)
    assert [g.dtype for g in got] == [torch.float32] * 3
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    # the op itself, called directly
    xk, idx = W.sample(x.detach().reshape(-1, 16), None, 40, True, 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = W.linear(x.reshape(-1, 16), ours.weight, ours.bias, xk, idx)
    assert y.dtype == torch.bfloat16
