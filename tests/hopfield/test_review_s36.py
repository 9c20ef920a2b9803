"""Review s36 of pypaper.hopfield as an hflayers user: per-head tensor arguments (hflayers'
documented form of scaling / update_steps_max / update_steps_eps) under
torch.compile(fullgraph=True); torch.compile(dynamic=True); dropout while training (the
materialising loop) under torch.compile(fullgraph=True), torch.func.vmap and an empty batch;
get_association_matrix under compile and vmap. Tolerances: float64 1e-10, float32 1e-5."""
import pytest
import torch
from torch.func import functional_call, grad, vmap

from pypaper.hopfield import Hopfield, HopfieldLayer, HopfieldPooling
from pypaper.hopfield import reference as R
from pypaper.hopfield.ops import hopfield_retrieve

PER_HEAD = {
    "scaling": dict(scaling=torch.tensor([0.3, 0.5]), update_steps_max=2),
    "update_steps_max": dict(update_steps_max=torch.tensor([1, 3])),
    "update_steps_eps": dict(update_steps_eps=torch.tensor([1e-3, 1e-4]), update_steps_max=3),
}


@pytest.mark.parametrize("name", list(PER_HEAD))
def test_per_head_tensor_arguments_under_compile_fullgraph(name):
    """hflayers takes one entry per head as a 1-d tensor; the layer read it with Tensor.tolist()
    at every forward, which torch.compile(fullgraph=True) cannot trace (non-integer tolist, or
    an unbacked int guarded by the step check)."""
    torch._dynamo.reset()
    kw = PER_HEAD[name]
    m = Hopfield(input_size=8, num_heads=2, **kw)
    x = torch.randn(2, 3, 8)
    want = m(x)
    got = torch.compile(m, fullgraph=True)(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    got.sum().backward()
    assert m.association_core.in_proj_weight.grad is not None
    # the hflayers property still gives the argument back (a clone of the tensor)
    assert torch.equal(getattr(m, name), kw[name])


def test_compile_dynamic_true_layer_and_op():
    """torch.compile(dynamic=True) hands float arguments (beta, eps; also the op's eps default)
    over as symbolic floats: math.isfinite on them failed to trace."""
    torch._dynamo.reset()
    m = HopfieldPooling(input_size=8, num_heads=2, update_steps_max=2)
    c = torch.compile(m, fullgraph=True, dynamic=True)
    for shape in [(2, 3, 8), (3, 5, 8), (1, 1, 8)]:
        x = torch.randn(*shape)
        torch.testing.assert_close(c(x), m(x), rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()
    f = lambda q, k, v: hopfield_retrieve(q, k, v, 0.5, 2)  # noqa: E731
    q, k, v = torch.randn(2, 2, 3, 4), torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 3)
    torch.testing.assert_close(torch.compile(f, fullgraph=True, dynamic=True)(q, k, v),
                               f(q, k, v), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("steps", [0, 2])
def test_dropout_training_under_compile_fullgraph(steps):
    """dropout > 0 while training runs the materialising loop, whose `while bool(...)` was a
    data-dependent branch: fullgraph compilation failed. With inductor's eager RNG the compiled
    module draws the same dropout mask as eager, so the outputs must agree."""
    torch._dynamo.reset()
    m = Hopfield(input_size=8, num_heads=2, update_steps_max=steps, dropout=0.5).double().train()
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    with torch._inductor.config.patch(fallback_random=True):
        c = torch.compile(m, fullgraph=True)
        torch.manual_seed(7)
        got = c(x)
        torch.manual_seed(7)
        want = m(x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    got.sum().backward()
    assert m.association_core.in_proj_weight.grad is not None


def test_compiled_loop_with_heads_converging_early_equals_eager():
    """Under compile the loop runs to max(steps) + 1 softmaxes; heads that converged (eps) or
    reached their limit earlier must keep their P, state and step count."""
    torch._dynamo.reset()
    B, H, L, S, d = 2, 3, 4, 6, 5
    q = torch.randn(B, H, L, d, dtype=torch.float64) * 2
    k = torch.randn(B, H, S, d, dtype=torch.float64) * 2
    v = torch.randn(B, H, S, 3, dtype=torch.float64)
    mask = torch.rand(1, 1, L, S) < 0.3
    mask[..., 0] = False

    def f(q, k, v):
        return R.retrieve(q, k, v, [1.0, 0.5, 2.0], [5, 8, 2], [1e-1, 1e-9, 1e-3], mask,
                          return_associations=True)

    want = f(q, k, v)
    got = torch.compile(f, fullgraph=True)(q, k, v)
    assert want[1].tolist() != [5, 8, 2]  # some head stops before its limit
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got[2], want[2], rtol=1e-10, atol=1e-10)

    torch._dynamo.reset()
    m = Hopfield(input_size=8, num_heads=2, update_steps_max=3,
                 update_steps_eps=torch.tensor([0.5, 1e-9])).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    torch.testing.assert_close(torch.compile(m.get_association_matrix, fullgraph=True)(x),
                               m.get_association_matrix(x), rtol=1e-10, atol=1e-10)


def test_dropout_training_and_association_matrix_on_an_empty_batch():
    """An empty batch with update steps: the loop's max over the batch of ||P_n - P_{n-1}||
    raised IndexError (amax over a zero-size dim); the fused op (eval) already returned."""
    m = Hopfield(input_size=8, num_heads=2, update_steps_max=2, dropout=0.5).train()
    x = torch.randn(0, 5, 8, requires_grad=True)
    y = m(x)
    assert y.shape == (0, 5, 8)
    y.sum().backward()
    assert m.get_association_matrix(x).shape == (0, 2, 5, 5)
    m.eval()
    assert m(x).shape == (0, 5, 8)
    q = torch.randn(0, 2, 3, 4, dtype=torch.float64)
    out, nsteps = R.retrieve(q, q, q, 1.0, None, 1e-4)
    fused, fused_steps = hopfield_retrieve(q, q, q, 1.0, None, 1e-4, return_steps=True)
    assert out.shape == fused.shape == (0, 2, 3, 4)
    assert torch.equal(nsteps, fused_steps)


def test_vmap_association_matrix_converges_per_sample():
    """vmap of get_association_matrix (and of the dropout path): the loop's in-place `act &=`
    on an unbatched tensor failed under vmap; now each sample converges on its own, as when
    run alone."""
    torch.manual_seed(3)
    m = Hopfield(input_size=8, num_heads=2, update_steps_max=6, update_steps_eps=5e-2).double()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.7)
    x = torch.randn(4, 2, 5, 8, dtype=torch.float64)
    x[0] *= 0.01  # a nearly uniform association: converges after one step
    got = vmap(m.get_association_matrix)(x)
    want = torch.stack([m.get_association_matrix(xx) for xx in x])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # the samples do stop at different steps (per-sample convergence is exercised)
    counts = set()
    for xx in x:
        q, k, v, _, _ = m._prepare(xx, None, None)
        counts.add(tuple(R.retrieve(q, k, v, m.scaling, m.update_steps_max,
                                    m.update_steps_eps)[1].tolist()))
    assert len(counts) > 1, counts


def test_vmap_grad_through_the_dropout_path():
    """Per-sample gradients (DP-SGD style) of a HopfieldLayer with dropout while training."""
    torch.manual_seed(0)
    layer = HopfieldLayer(input_size=6, num_heads=2, quantity=5, update_steps_max=2,
                          dropout=0.3).double().train()
    params = {n: p.detach() for n, p in layer.named_parameters()}
    x = torch.randn(4, 3, 6, dtype=torch.float64)

    def loss(p, xi):
        return functional_call(layer, p, (xi.unsqueeze(0),)).pow(2).sum()

    g = vmap(grad(loss), in_dims=(None, 0), randomness="different")(params, x)
    assert g["lookup_weights"].shape == (4, *layer.lookup_weights.shape)
    assert all(torch.isfinite(t).all() for t in g.values())
    # with the dropout off the same transform gives the per-sample loop's gradients
    layer.hopfield.association_core.dropout = 0.0
    layer.eval()
    g0 = vmap(grad(loss), in_dims=(None, 0))(params, x)
    for i in range(4):
        gi = grad(loss)(params, x[i])
        for n in params:
            torch.testing.assert_close(g0[n][i], gi[n], rtol=1e-10, atol=1e-12)


def test_learned_float_association_mask_gets_its_gradient():
    """hflayers adds a float association_mask to the scores, so a mask that requires grad (a
    learned bias on the association) trains; the fused op took masks as constants and the mask
    silently got no gradient. Now such a call runs the differentiable loop."""
    torch.manual_seed(0)
    m = Hopfield(input_size=8, num_heads=2, update_steps_max=2).double()
    x = torch.randn(2, 4, 8, dtype=torch.float64)
    bias = (0.3 * torch.randn(4, 4, dtype=torch.float64)).requires_grad_()
    m(x, association_mask=bias).pow(2).sum().backward()
    assert bias.grad is not None and bias.grad.abs().sum() > 0
    assert torch.autograd.gradcheck(lambda b: m(x, association_mask=b), (bias.detach().requires_grad_(),))
    pad = torch.zeros(2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p: m(x, stored_pattern_padding_mask=p), (pad,))
    # the op: same gradients as the plain loop, for mask and q
    q = torch.randn(2, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 5, 4, dtype=torch.float64)
    mask = torch.randn(2, 1, 3, 5, dtype=torch.float64, requires_grad=True)
    out = hopfield_retrieve(q, k, k, 0.7, 2, 1e-4, mask=mask)
    want = R.retrieve(q, k, k, 0.7, 2, 1e-4, mask)[0]
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, mask), g), torch.autograd.grad(want, (q, mask), g)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # a bool mask or a mask without grad still runs the fused op, with its gradients
    with torch.no_grad():
        fused = hopfield_retrieve(q, k, k, 0.7, 2, 1e-4, mask=mask)
    torch.testing.assert_close(fused, want.detach(), rtol=1e-10, atol=1e-12)


def test_direct_op_call_refuses_a_mask_gradient():
    """torch.ops.pypaper.hopfield_retrieve itself has no dM: its backward says so instead of
    returning None for the mask."""
    q = torch.randn(1, 2, 3, 2, dtype=torch.float64)
    mask = torch.zeros(1, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    out = torch.ops.pypaper.hopfield_retrieve(q, q, q, [1.0], [1], [1e-4], mask, None)[0]
    with pytest.raises(RuntimeError, match="no gradient for attn_mask"):
        out.sum().backward()


def test_learned_mask_under_compile_fullgraph():
    torch._dynamo.reset()
    m = Hopfield(input_size=8, num_heads=2, update_steps_max=2).double()
    x = torch.randn(2, 4, 8, dtype=torch.float64)
    bias = torch.nn.Parameter(0.3 * torch.randn(4, 4, dtype=torch.float64))
    torch.compile(lambda: m(x, association_mask=bias).pow(2).sum(), fullgraph=True)().backward()
    got = bias.grad.clone()
    bias.grad = None
    m(x, association_mask=bias).pow(2).sum().backward()
    torch.testing.assert_close(got, bias.grad, rtol=1e-10, atol=1e-12)


def test_op_refuses_a_beta_that_requires_grad():
    """beta is read as numbers: a learnable beta tensor passed to the op silently got no
    gradient (the layer already refuses such a scaling)."""
    q = torch.randn(1, 2, 3, 4, requires_grad=True)
    beta = torch.tensor([0.5, 1.0], requires_grad=True)
    with pytest.raises(ValueError, match="beta must not require grad"):
        hopfield_retrieve(q, q, q, beta, 1)
    with torch.no_grad():  # inference: nothing to lose
        assert hopfield_retrieve(q, q, q, beta, 1).shape == (1, 2, 3, 4)
    assert hopfield_retrieve(q, q, q, beta.detach(), 1).shape == (1, 2, 3, 4)


def test_whole_module_pickled_without_the_cached_constants_still_runs():
    """The per-head constants are cached at construction; a Hopfield pickled whole before they
    existed rebuilds them on load."""
    m = Hopfield(input_size=8, num_heads=2, update_steps_max=torch.tensor([1, 2]),
                 scaling=torch.tensor([0.5, 1.0]))
    x = torch.randn(2, 3, 8)
    state = {k: v for k, v in m.__dict__.items() if not k.startswith("_op_")}
    old = Hopfield.__new__(Hopfield)
    old.__setstate__(state)
    assert torch.equal(old(x), m(x))


@pytest.mark.parametrize("steps", [3, None])
@pytest.mark.parametrize("how", ["pad", "mask"])
def test_a_fully_masked_row_stops_the_head_like_hflayers(steps, how):
    """A row whose stored patterns are all masked has P = NaN (softmax of all -inf); hflayers'
    max over the batch of ||P_n - P_{n-1}|| is then NaN and `NaN > eps` is false, so the head
    stops for the whole batch after one update. The C++ op dropped the NaN (std::max) and kept
    updating the other items: different outputs than hflayers, than the reference loop and than
    the same layer while training with dropout."""
    torch.manual_seed(0)
    B, H, L, S, d = 2, 2, 3, 5, 4
    q = torch.randn(B, H, L, d, dtype=torch.float64)
    k = torch.randn(B, H, S, d, dtype=torch.float64)
    kw = {}
    if how == "pad":
        pad = torch.zeros(B, S, dtype=torch.bool)
        pad[0] = True  # item 0 is all padding
        kw["pad_mask"] = pad
    else:
        mask = torch.zeros(B, 1, L, S, dtype=torch.bool)
        mask[0, 0, 1] = True  # one row of item 0
        kw["mask"] = mask
    got, n_got = hopfield_retrieve(q, k, k, 1.0, steps, 1e-6, return_steps=True, **kw)
    want, n_want = R.retrieve(q, k, k, 1.0, steps, 1e-6, kw.get("mask"), kw.get("pad_mask"))
    assert n_want.tolist() == [1, 1]
    assert torch.equal(n_got, n_want)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, equal_nan=True)
    assert torch.isfinite(got[1]).all()
