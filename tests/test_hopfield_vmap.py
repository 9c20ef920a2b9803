"""The hopfield retrieval ops' batching rule (pypaper/hopfield/vmap_rule.py) against the op run
sample by sample: outputs, per-sample gradients of q, k and v, masks, and the update-step case
the rule leaves to the per-sample loop (convergence is judged over the op's whole batch)."""
import pytest
import torch
import torch.func as func

import pypaper
from pypaper import _ext
from pypaper.hopfield import HopfieldLayer

pytestmark = pytest.mark.skipif(not _ext.LOADED, reason="pypaper._C not built")

V, B, H, L, S, D = 3, 2, 2, 4, 5, 8


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _retrieve(q, k, v, attn_mask=None, pad_mask=None, steps=0):
    return pypaper.ops.hopfield_retrieve(q, k, v, beta=0.4, steps=steps, mask=attn_mask,
                                         pad_mask=pad_mask)


def _stack(fn, args, in_dims):
    return torch.stack([fn(*[a if d is None else a.select(d, s) for a, d in zip(args, in_dims)])
                        for s in range(V)])


@pytest.mark.parametrize("in_dims", [(0, 0, 0), (0, None, None), (None, 0, None), (2, 1, 0)])
def test_forward_and_grads(in_dims, vmap_calls):
    shapes = {0: (L, D), 1: (S, D), 2: (S, D)}
    args = []
    for i, d in enumerate(in_dims):
        t = _rand(B, H, *shapes[i], seed=i)
        if d is not None:
            t = torch.stack([t + 0.3 * _rand(*t.shape, seed=10 + 3 * s + i) for s in range(V)], d)
        args.append(t)
    got = func.vmap(_retrieve, in_dims=in_dims)(*args)
    torch.testing.assert_close(got, _stack(_retrieve, args, in_dims), rtol=1e-5, atol=1e-6)
    assert vmap_calls == {"pypaper::hopfield_retrieve": 1}
    w = _rand(B, H, L, D, seed=20)
    loss = lambda q, k, v: (_retrieve(q, k, v) * w).sum()  # noqa: E731
    grads = func.vmap(func.grad(loss, argnums=(0, 1, 2)), in_dims=in_dims)(*args)
    for s in range(V):
        sample = [(a if d is None else a.select(d, s)).clone().requires_grad_()
                  for a, d in zip(args, in_dims)]
        want = torch.autograd.grad(loss(*sample), sample)
        for g, wnt in zip(grads, want):
            torch.testing.assert_close(g[s], wnt, rtol=1e-5, atol=1e-6)
    assert vmap_calls["pypaper::hopfield_retrieve_backward"] == 1


@pytest.mark.parametrize("mask_batched", [False, True])
def test_masks(mask_batched, vmap_calls):
    q, k, v = _rand(V, B, H, L, D, seed=1), _rand(B, H, S, D, seed=2), _rand(B, H, S, D, seed=3)
    attn = _rand(1, H, L, S, seed=4)
    pad = torch.zeros(B, S, dtype=torch.bool)
    pad[0, -2:] = True
    if mask_batched:
        attn = torch.stack([attn + 0.5 * s for s in range(V)])
        pad = torch.stack([pad, pad.roll(1, 1), pad])
    in_dims = (0, None, None, 0 if mask_batched else None, 0 if mask_batched else None)
    got = func.vmap(_retrieve, in_dims=in_dims)(q, k, v, attn, pad)
    torch.testing.assert_close(got, _stack(_retrieve, (q, k, v, attn, pad), in_dims),
                               rtol=1e-5, atol=1e-6)
    assert vmap_calls == {"pypaper::hopfield_retrieve": 1}


def test_update_steps_run_per_sample(vmap_calls):
    """steps != 0: a head stops when the largest change over the op's batch is below eps, so the
    rule runs the samples one by one (padding the unbounded heads' states to the longest);
    outputs and per-sample gradients equal the samples run alone."""
    q = torch.stack([_rand(B, H, L, D, seed=30), 5 * _rand(B, H, L, D, seed=31),
                     _rand(B, H, L, D, seed=32) * 0.1])
    k, v = _rand(B, H, S, D, seed=33), _rand(B, H, S, D, seed=34)
    for steps in (None, 3):  # unbounded: the samples keep different numbers of states
        f = lambda qq: _retrieve(qq, k, v, steps=steps)  # noqa: E731
        torch.testing.assert_close(func.vmap(f)(q), _stack(f, (q,), (0,)), rtol=1e-5, atol=1e-6)
        loss = lambda qq: (f(qq) * torch.arange(B * H * L * D.__index__()).reshape(  # noqa: E731
            B, H, L, D).float()).sum()
        got = func.vmap(func.grad(loss))(q)
        for s in range(V):
            qs = q[s].clone().requires_grad_()
            (want,) = torch.autograd.grad(loss(qs), qs)
            torch.testing.assert_close(got[s], want, rtol=1e-5, atol=1e-5)
    assert "pypaper::hopfield_retrieve_backward" not in vmap_calls


def test_hopfield_layer_per_sample_grads(vmap_calls):
    """functional_call + vmap(grad) over a HopfieldLayer (stored patterns as parameters)."""
    torch.manual_seed(0)
    layer = HopfieldLayer(6, quantity=4)
    params = {k: p.detach() for k, p in layer.named_parameters()}
    xs = _rand(V, 1, 3, 6, seed=40)

    def loss(p, x):
        y = func.functional_call(layer, p, (x,))
        return (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum()

    got = func.vmap(func.grad(loss), in_dims=(None, 0))(params, xs)
    for s in range(V):
        layer.zero_grad()
        loss(dict(layer.named_parameters()), xs[s]).backward()
        for name, p in layer.named_parameters():
            torch.testing.assert_close(got[name][s], p.grad, rtol=1e-5, atol=1e-6)
    assert vmap_calls.get("pypaper::hopfield_retrieve_backward") == 1


def test_triton_twin_takes_the_rule(vmap_calls):
    pytest.importorskip("triton")
    q, k, v = _rand(V, B, H, L, D, seed=50), _rand(B, H, S, D, seed=51), _rand(B, H, S, D, seed=52)
    with pypaper.use_backend("triton"):
        got = func.vmap(_retrieve, in_dims=(0, None, None))(q, k, v)
        want = _stack(_retrieve, (q, k, v), (0, None, None))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert vmap_calls == {"pypaper::hopfield_retrieve_triton": 1}


# Found in review: each failed or gave a wrong shape before its fix.

def test_zero_samples():
    q, k, v = _rand(0, B, H, L, D), _rand(B, H, S, D, seed=1), _rand(B, H, S, D, seed=2)
    assert func.vmap(lambda qq: _retrieve(qq, k, v))(q).shape == (0, B, H, L, D)
    g = func.vmap(func.grad(lambda qq: _retrieve(qq, k, v).sum()))(q)
    assert g.shape == (0, B, H, L, D)


@pytest.mark.parametrize("steps", [0, 2, None])
def test_vjp_and_jacrev_inside_vmap(steps):
    """Per-sample vjp / jacrev: the tensors the inner grad level saved reach the op's vmap
    kernel still wrapped by that (exited) level."""
    dt = torch.float64
    q = _rand(3, 1, H, 2, 3).to(dt)
    k, v = _rand(1, H, 5, 3, seed=1).to(dt), _rand(1, H, 5, 2, seed=2).to(dt)
    f = lambda x: pypaper.ops.hopfield_retrieve(x, k, v, beta=0.4, steps=steps,  # noqa: E731
                                                eps=1e-6)

    def per(x):
        out, fn = func.vjp(f, x)
        return fn(torch.ones_like(out))[0]

    got = func.vmap(per)(q)
    jac = func.vmap(func.jacrev(f))(q)
    for s in range(3):
        x = q[s].clone().requires_grad_()
        (want,) = torch.autograd.grad(f(x).sum(), x)
        torch.testing.assert_close(got[s], want)
        torch.testing.assert_close(jac[s], torch.autograd.functional.jacobian(f, q[s]))


def test_broadcast_pad_mask_of_the_op():
    """The op takes a pad_mask of [1, S] (broadcast over its batch), folded or not."""
    op = torch.ops.pypaper.hopfield_retrieve.default
    q, k = _rand(V, B, H, L, D), _rand(B, H, S, D, seed=1)
    pad = _rand(1, S, seed=2)
    f = lambda qq, p: op(qq, k, k, [0.5], [0], [1e-4], None, p)[0]  # noqa: E731
    got = func.vmap(f, in_dims=(0, None))(q, pad)
    torch.testing.assert_close(got, torch.stack([f(q[s], pad) for s in range(V)]))
    pads = _rand(V, 1, S, seed=3)
    got = func.vmap(f)(q, pads)
    torch.testing.assert_close(got, torch.stack([f(q[s], pads[s]) for s in range(V)]))
