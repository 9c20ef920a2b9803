"""WTACRSLinear as a drop-in nn.Linear: parameters, exactness where promised, bytes kept for the
backward (measured with saved-tensor hooks), sample ids and reproducibility."""
import pytest
import torch
import torch.nn.functional as F

from pypaper import wtacrs as W

from .helpers import saved_storage_bytes


def _pair(bias=True, **kw):
    ref = torch.nn.Linear(48, 20, bias=bias)
    return ref, W.WTACRSLinear.from_linear(ref, **kw)


def test_drop_in_parameters_and_state_dict():
    ref, ours = _pair()
    assert isinstance(ours, torch.nn.Linear)
    assert ours.weight is ref.weight and ours.bias is ref.bias
    assert list(ours.state_dict()) == list(ref.state_dict()) == ["weight", "bias"]
    fresh = W.WTACRSLinear(48, 20, keep_ratio=0.1)
    fresh.load_state_dict(ref.state_dict())
    assert torch.equal(fresh.weight, ref.weight)
    ref2 = torch.nn.Linear(48, 20)
    ref2.load_state_dict(fresh.state_dict())
    assert "keep_ratio=0.1" in repr(fresh)
    nb = W.WTACRSLinear(48, 20, bias=False)
    assert nb.bias is None and list(nb.state_dict()) == ["weight"]


@pytest.mark.parametrize("mode", ["eval", "no_grad", "frozen"])
def test_exact_where_no_weight_gradient_is_estimated(mode):
    ref, ours = _pair(keep_ratio=0.1, min_k=1)
    x = torch.randn(6, 50, 48, requires_grad=True)
    if mode == "eval":
        ours.eval()
        ref.eval()
    if mode == "frozen":
        ref.weight.requires_grad_(False)
    if mode == "no_grad":
        with torch.no_grad():
            assert torch.equal(ours(x), ref(x))
        return
    gy = torch.randn(6, 50, 20)
    inputs = [x, ref.bias] + ([ref.weight] if ref.weight.requires_grad else [])
    got = torch.autograd.grad(ours(x), inputs, gy)
    want = torch.autograd.grad(ref(x), inputs, gy)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_training_output_and_exact_gradients():
    ref, ours = _pair(keep_ratio=0.3, min_k=1)
    x = torch.randn(4, 100, 48, requires_grad=True)
    gy = torch.randn(4, 100, 20)
    y = ours(x)
    assert torch.equal(y, ref(x))
    gx, gw, gb = torch.autograd.grad(y, [x, ours.weight, ours.bias], gy)
    rx, rw, rb = torch.autograd.grad(ref(x), [x, ref.weight, ref.bias], gy)
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gb, rb)
    assert gw.shape == rw.shape and not torch.equal(gw, rw)  # an estimate
    rel = float((gw - rw).norm() / rw.norm())
    assert rel < 3.0  # the right scale: unbiased, k = 120 of 400 rows


@pytest.mark.parametrize("store,limit", [(None, 0.35), (torch.bfloat16, 0.18)])
def test_bytes_kept_for_backward(store, limit):
    ref, ours = _pair(keep_ratio=0.3, min_k=1, store_dtype=store)
    x = torch.randn(8, 128, 48, requires_grad=True)
    params = [ref.weight, ref.bias]
    full, _ = saved_storage_bytes(lambda: ref(x), params)
    kept, y = saved_storage_bytes(lambda: ours(x), params)
    assert full == x.numel() * 4
    assert kept <= limit * full, (kept, full)
    assert kept >= 0.3 * full * (0.5 if store else 1.0)  # the k rows are really there
    y.sum().backward()


def test_generator_makes_sampling_reproducible():
    grads = []
    x = torch.randn(300, 48)
    for _ in range(2):
        ref, ours = _pair(keep_ratio=0.2, min_k=1, generator=torch.Generator().manual_seed(7))
        ours(x).sum().backward()
        grads.append(ours.weight.grad)
    assert torch.equal(grads[0], grads[1])
    ref, ours = _pair(keep_ratio=0.2, min_k=1, generator=torch.Generator().manual_seed(8))
    ours(x).sum().backward()
    assert not torch.equal(grads[0], ours.weight.grad)


def test_sample_ids_feed_last_steps_gradient_norms():
    ref, ours = _pair(keep_ratio=0.2, min_k=1)
    x = torch.randn(5, 30, 48)
    ids = torch.tensor([3, 0, 9, 4, 1])
    gy = torch.randn(5, 30, 20)
    ours(x, sample_ids=ids).backward(gy)
    cache = ours.grad_norms
    got = cache.lookup(ids, 150, "cpu")
    torch.testing.assert_close(got, gy.reshape(150, 20).norm(dim=1))
    # a second batch with new and known samples: unknown rows take the mean of the known ones
    ids2 = torch.tensor([9, 100])
    g2 = cache.lookup(ids2, 60, "cpu")
    known = gy[2].norm(dim=1)
    torch.testing.assert_close(g2[:30], known)
    torch.testing.assert_close(g2[30:], known.mean().expand(30))
    # the context manager reaches layers inside a model; the next step uses the norms
    with W.sample_ids(ids):
        ours(x).backward(gy * 2)
    torch.testing.assert_close(cache.lookup(ids, 150, "cpu"), 2 * got)


def test_shared_sample_for_siblings_keeps_one_buffer():
    class QKV(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = (torch.nn.Linear(32, 32) for _ in range(3))

        def forward(self, x):
            return self.q(x) * self.k(x) + self.v(x)

    torch.manual_seed(0)
    m = QKV()
    x = torch.randn(4, 64, 32, requires_grad=True)
    params = list(m.parameters())
    full, _ = saved_storage_bytes(lambda: m(x), params)
    W.convert(m, keep_ratio=0.3, min_k=1)
    assert m.q.sample_group is m.k.sample_group is m.v.sample_group is not None
    shared, y = saved_storage_bytes(lambda: m(x), params)
    # the product q*k saves q and k (2 x 4*64*32 floats) either way; x itself is not kept
    products = 2 * x.numel() * 4
    assert full == products + x.numel() * 4
    assert shared - products <= 0.35 * x.numel() * 4
    y.sum().backward()
    unshared = QKV()
    W.convert(unshared, keep_ratio=0.3, min_k=1, share_inputs=False)
    separate, _ = saved_storage_bytes(lambda: unshared(x), list(unshared.parameters()))
    assert separate - products >= 3 * 0.3 * x.numel() * 4


def test_functional_linear_of_the_layer_matches_f_linear():
    ours = W.WTACRSLinear(48, 20, keep_ratio=0.5, min_k=1)
    x = torch.randn(7, 48)  # 2-D input, N = 7 rows
    assert torch.equal(ours(x), F.linear(x, ours.weight, ours.bias))
    x1 = torch.randn(48)  # 1-D input: one row, always exact
    assert torch.equal(ours(x1), F.linear(x1, ours.weight, ours.bias))
    empty = torch.randn(0, 48, requires_grad=True)
    ours(empty).sum().backward()


def test_gradient_penalty_double_backward():
    """create_graph=True (a gradient penalty): the backward runs in differentiable torch ops, so
    the double backward is autograd's own - no fallback warning; grad_input stays exact and the
    penalty's weight gradient is finite (it goes through the sampled grad_W, so it is an
    estimate)."""
    import warnings

    torch.manual_seed(0)
    lin = W.WTACRSLinear(6, 5, keep_ratio=0.5, min_k=1, generator=torch.Generator().manual_seed(1))
    ref = torch.nn.Linear(6, 5)
    ref.load_state_dict(lin.state_dict())
    x = torch.randn(40, 6, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gx, = torch.autograd.grad(lin(x).pow(2).sum(), x, create_graph=True)
        gw, = torch.autograd.grad(gx.pow(2).sum(), lin.weight)
    gx_ref, = torch.autograd.grad(ref(x).pow(2).sum(), x, create_graph=True)
    torch.testing.assert_close(gx, gx_ref)
    assert gw.shape == (5, 6) and bool(torch.isfinite(gw).all()) and float(gw.abs().sum()) > 0
