"""The LIF ops' batching rule (pypaper/snn/vmap_rule.py): vmap folds the batch into the feature
dims and calls each op once; results equal the op run sample by sample.

- forward under vmap: spikes, v_last and v_seq equal a loop over the samples, to the bit, for
  every in_dims layout, batched and unbatched states and parameters;
- vmap(grad): per-sample gradients of x, v, tau / k and v_threshold equal autograd run on each
  sample, over the neuron's dynamics flags, with unbatched parameters (one gradient per sample
  all the same) and batched ones (models stacked for an ensemble);
- jacrev (a vmap over the backward with unbatched saved tensors);
- each op is called once per vmap, not once per sample;
- the Triton twins take the same rule (interpreter, small sizes).
"""
import pytest
import torch
import torch.func as func

import pypaper
from pypaper import _ext
from pypaper.snn import lif_multi_step, surrogate

pytestmark = pytest.mark.skipif(not _ext.LOADED, reason="pypaper._C not built")

B, T, N, F = 3, 5, 2, 4


def _rand(*shape, seed=0, scale=1.5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def _per_sample(fn, batched_args, in_dims):
    """fn over each sample (the args selected along their in_dims), outputs stacked along 0."""
    outs = []
    for s in range(B):
        args = [a if d is None else a.select(d, s) for a, d in zip(batched_args, in_dims)]
        outs.append(fn(*args))
    return [None if o[0] is None else torch.stack(o) for o in zip(*outs)]


@pytest.mark.parametrize("x_dim", [0, 1, 3])
@pytest.mark.parametrize("v_dim", ["none", None, 0])
def test_forward_equals_per_sample_loop(x_dim, v_dim):
    x = _rand(T, N, F, seed=1).unsqueeze(x_dim).expand(*[B if i == x_dim else -1
                                                          for i in range(4)]).clone()
    x = x + _rand(*x.shape, seed=2, scale=0.3)  # samples differ
    v = None if v_dim == "none" else (_rand(N, F, seed=3) if v_dim is None
                                      else _rand(B, N, F, seed=3))

    def fn(xs, vs):
        s, vl, vseq = lif_multi_step(xs, vs, tau=2.0, surrogate_function=surrogate.ATan(),
                                     store_v_seq=True)
        return s, vl, vseq

    in_dims = (x_dim, None if v_dim in ("none", None) else 0)
    got = func.vmap(fn, in_dims=in_dims)(x, v)
    want = _per_sample(fn, (x, v), in_dims)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@pytest.mark.parametrize("param", ["tau", "tau_per_neuron", "k", "v_threshold",
                                   "v_threshold_per_neuron"])
@pytest.mark.parametrize("batched", [False, True])
def test_forward_with_parameters(param, batched):
    x = _rand(B, T, N, F, seed=4)
    per_neuron = param.endswith("per_neuron")
    name = param.replace("_per_neuron", "")
    lo, hi = {"tau": (1.5, 4.0), "k": (0.2, 0.9), "v_threshold": (0.5, 1.5)}[name]
    shape = (F,) if per_neuron else ()
    value = lo + (hi - lo) * torch.rand((B, *shape) if batched else shape,
                                        generator=torch.Generator().manual_seed(5))

    def fn(xs, p):
        return lif_multi_step(xs, **{name: p}, surrogate_function=surrogate.Sigmoid())[:2]

    in_dims = (0, 0 if batched else None)
    got = func.vmap(fn, in_dims=in_dims)(x, value)
    want = _per_sample(fn, (x, value), in_dims)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


_DYNAMICS = [
    dict(),
    dict(v_reset=None),
    dict(decay_input=False),
    dict(detach_reset=True),
    dict(sltt=True),
    dict(v_reset=None, detach_reset=True, decay_input=False),
]


def _check_grads(loss, args, in_dims, argnums, rtol=1e-5, atol=1e-6):
    got = func.vmap(func.grad(loss, argnums=argnums), in_dims=in_dims)(*args)
    for s in range(B):
        sample = [a if d is None else a.select(d, s) for a, d in zip(args, in_dims)]
        sample = [a.detach().clone().requires_grad_(i in argnums) for i, a in enumerate(sample)]
        want = torch.autograd.grad(loss(*sample), [sample[i] for i in argnums])
        for g, w in zip(got, want):
            torch.testing.assert_close(g[s], w, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dyn", _DYNAMICS, ids=lambda d: ",".join(d) or "default")
@pytest.mark.parametrize("surr", [surrogate.ATan(), surrogate.Sigmoid(), surrogate.Rect()],
                         ids=lambda s: type(s).__name__)
def test_per_sample_grads_unbatched_parameters(dyn, surr):
    """vmap(grad) over x and v with the parameters shared by every sample: the parameters'
    gradients are per sample (the rule expands them, where folding into N would sum them)."""
    x, v = _rand(B, T, N, F, seed=6), _rand(B, N, F, seed=7, scale=0.5)
    tau = torch.tensor(2.5)
    vth = 0.8 + 0.4 * torch.rand(F, generator=torch.Generator().manual_seed(8))
    w_out = _rand(T, N, F, seed=9)

    def loss(xs, vs, t, th):
        s, vl, _ = lif_multi_step(xs, vs, tau=t, v_threshold=th, surrogate_function=surr, **dyn)
        return (s * w_out).sum() + (vl * 0.3).sum()

    _check_grads(loss, (x, v, tau, vth), (0, 0, None, None), (0, 1, 2, 3))


def test_per_sample_grads_batched_parameters():
    """An ensemble: every sample has its own k (PLIF) and per-neuron threshold."""
    x = _rand(B, T, N, F, seed=10)
    k = 0.3 + 0.5 * torch.rand(B, generator=torch.Generator().manual_seed(11))
    vth = 0.8 + 0.4 * torch.rand(B, F, generator=torch.Generator().manual_seed(12))
    w_out = _rand(T, N, F, seed=13)

    def loss(xs, kk, th):
        s, _, _ = lif_multi_step(xs, k=kk, v_threshold=th, surrogate_function=surrogate.ATan())
        return (s * w_out).sum()

    _check_grads(loss, (x, k, vth), (0, 0, 0), (0, 1, 2))


def test_jacrev_equals_autograd_rows():
    x = _rand(T, 2, seed=14)

    def f(xs):
        return lif_multi_step(xs, tau=2.0, surrogate_function=surrogate.ATan())[0]

    jac = func.jacrev(f)(x)  # [T, 2, T, 2]: a vmap over the backward, x unbatched
    xr = x.clone().requires_grad_()
    y = f(xr)
    for i in range(T):
        for j in range(2):
            (row,) = torch.autograd.grad(y[i, j], xr, retain_graph=True)
            torch.testing.assert_close(jac[i, j], row)


def test_ensemble_of_plif_models():
    """torch.func.stack_module_state + functional_call over stacked ParametricLIFNode models:
    each model's output and parameter gradients equal the model run alone."""
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(F, 6),
                                  pypaper.snn.ParametricLIFNode(init_tau=2.0 + i, step_mode="m"))
              for i in range(B)]
    params, buffers = func.stack_module_state(models)
    base = models[0]
    x = _rand(T, N, F, seed=15)

    def loss(p, b, xs):
        pypaper.snn.reset_net(base)
        y = func.functional_call(base, (p, b), (xs,))
        return (y * torch.linspace(-1, 2, y.numel()).reshape(y.shape)).sum()

    got = func.vmap(func.grad(loss), in_dims=(0, 0, None))(params, buffers, x)
    for i, m in enumerate(models):
        pypaper.snn.reset_net(m)
        m.zero_grad()
        loss(dict(m.named_parameters()), dict(m.named_buffers()), x).backward()
        for k, p in m.named_parameters():
            torch.testing.assert_close(got[k][i], p.grad, rtol=1e-5, atol=1e-6)
    assert got["1.w"].abs().sum() > 0


def test_each_op_runs_once_per_vmap(vmap_calls):
    x = _rand(B, T, N, F, seed=16)

    def loss(xs):
        return lif_multi_step(xs, tau=2.0, surrogate_function=surrogate.ATan())[0].sum()

    func.vmap(func.grad(loss))(x)
    assert vmap_calls == {"pypaper::lif_forward": 1, "pypaper::lif_backward": 1}


def test_op_under_vmap_rejects_one_dim_samples():
    op = torch.ops.pypaper.lif_forward.default
    x = _rand(B, T)

    def f(xs):
        return op(xs, None, torch.tensor(2.0), torch.tensor(1.0), 0.0, 1, 2.0, 3)[0]

    with pytest.raises(ValueError, match=r"\[T, N, \*\]"):
        func.vmap(f)(x)


def test_triton_twin_takes_the_rule():
    pytest.importorskip("triton")
    x, v = _rand(B, T, N, 2, seed=17), _rand(B, N, 2, seed=18, scale=0.5)
    tau = torch.tensor(3.0)
    w_out = _rand(T, N, 2, seed=19)

    def loss(xs, vs, t):
        s, _, _ = lif_multi_step(xs, vs, tau=t, surrogate_function=surrogate.ATan())
        return (s * w_out).sum()

    with pypaper.use_backend("triton"):
        _check_grads(loss, (x, v, tau), (0, 0, None), (0, 1, 2))
