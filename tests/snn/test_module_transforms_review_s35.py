"""Stateful neurons under PyTorch's module transformations (review s35): torch.func ensembles
and per-sample gradients followed by the module-level operations a training loop performs on
the same model (copy.deepcopy / pickle / torch.save snapshots, .to(dtype), detach_net).

Inside torch.func.vmap the neuron carries its membrane across steps as a batched tensor (one
membrane per vmapped model or sample); when the transform exits, the last one stays on the
module. It holds no value for the module outside the transform: the forward refuses it with a
message that says to reset. The module-level operations failed on it with functorch's internal
messages instead ("Cannot access storage of BatchedTensorImpl", "your tensor may have escaped
from inside a function being vmapped"), naming neither the neuron nor the fix, and .double() /
detach_net stopped halfway.
"""
import copy
import io
import pickle

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, stack_module_state, vmap

from pypaper.snn import functional, neuron


def _ensemble(kind, n=3):
    torch.manual_seed(0)
    models = []
    for _ in range(n):
        node = {"lif": neuron.LIFNode, "plif": neuron.ParametricLIFNode}[kind](
            step_mode="m", store_v_seq=True)
        models.append(nn.Sequential(nn.Linear(4, 5), node))
    return models


def _run_ensemble(models, x):
    """The model-ensembling tutorial: stacked parameters, one base module, vmap over models."""
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0])

    def f(p, b, xx):
        return functional_call(base, (p, b), (xx,))

    return base, vmap(f, in_dims=(0, 0, None))(params, buffers, x)


@pytest.mark.parametrize("kind", ["lif", "plif"])
def test_snapshot_after_an_ensemble_vmap_says_to_reset(kind):
    """copy.deepcopy / pickle / torch.save of the base module after the ensemble call raised
    NotImplementedError "Cannot access storage of BatchedTensorImpl"; now a RuntimeError that
    names the neuron and the fix, and after reset_net the snapshot works and runs as the
    original does."""
    models = _ensemble(kind)
    x = torch.randn(6, 2, 4) + 0.8
    base, out = _run_ensemble(models, x)
    ref = torch.stack([m(x) for m in models])
    assert torch.equal(out, ref)  # the ensemble itself is right

    for snapshot in (lambda: copy.deepcopy(base), lambda: pickle.dumps(base),
                     lambda: torch.save(base, io.BytesIO())):
        with pytest.raises(RuntimeError, match=r"vmap.*reset_net"):
            snapshot()

    functional.reset_net(base)
    twin = copy.deepcopy(base)
    buf = io.BytesIO()
    torch.save(base, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for _ in range(2):
        want = base(x)
        assert torch.equal(twin(x), want)
        assert torch.equal(loaded(x), want)


def _per_sample_grads(model, x, target):
    """The per-sample-gradients tutorial on the model itself: vmap(grad(loss)) over the batch
    dim of a [T, B, F] input, each sample run as a batch of one."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss(p, b, xs, t):
        functional.reset_net(model)
        y = functional_call(model, (p, b), (xs.unsqueeze(1),))[:, 0]
        return ((y.mean(0) - t) ** 2).sum()

    return vmap(grad(loss), in_dims=(None, None, 1, 0))(params, buffers, x, target)


def test_to_dtype_and_detach_net_after_per_sample_grads():
    """After vmap(grad(...)) the membrane left on the model is a batched gradient-tracking
    tensor. model.double() raised functorch's "tensor may have escaped" error after it had
    already converted the Linear (the model left half float64), and functional.detach_net raised
    the same. Now both go through (the parameters are converted, the escaped membrane is left
    for the forward to refuse), the next forward says to reset, and after reset_net the model
    runs in float64 as a fresh float64 copy does."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), neuron.LIFNode(step_mode="m", store_v_seq=True))
    fresh = copy.deepcopy(model).double()
    x = torch.randn(6, 3, 4) + 0.8
    g = _per_sample_grads(model, x, torch.rand(3, 5))
    assert g["0.weight"].shape == (3, 5, 4)

    model.double()
    assert model[0].weight.dtype == torch.float64
    functional.detach_net(model)
    with pytest.raises(RuntimeError, match="reset_net"):
        model(x.double())
    functional.reset_net(model)
    assert torch.equal(model(x.double()), fresh(x.double()))
    assert model[1].v.dtype == torch.float64 and model[1].v_seq.dtype == torch.float64


def test_registered_memory_escaped_from_vmap_is_refused_by_name():
    """The same for a memory a subclass registered (register_memory): the message names it."""

    class Counting(neuron.LIFNode):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.register_memory("count", 0.0)

        def multi_step_forward(self, x_seq):
            s = super().multi_step_forward(x_seq)
            self.count = self.count + s.sum(0)
            return s

    node = Counting(step_mode="m")
    x = torch.rand(3, 4, 2, 5)
    vmap(node)(x)
    node.v = node.rest_value  # only the registered memory is left batched
    with pytest.raises(RuntimeError, match=r"memory count.*reset_net"):
        copy.deepcopy(node)
    functional.reset_net(node)
    assert torch.equal(copy.deepcopy(node)(x[0]), node(x[0]))


def test_grad_only_escape_still_snapshots():
    """Control: a membrane left by torch.func.grad alone (no vmap) wraps the real values, and
    deepcopy / pickle / .double() keep taking them (they worked before; the refusal above is for
    vmap-batched state only)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), neuron.LIFNode(step_mode="m"))
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(6, 2, 4) + 0.8
    grad(lambda p: functional_call(model, p, (x,)).sum())(params)
    twin = copy.deepcopy(model)
    pickle.loads(pickle.dumps(model))
    assert twin(x).shape == (6, 2, 5)
    model.double()
    assert model[1].v.dtype == torch.float64


# ---- vmap(chunk_size=k): state an exited chunk left, taken as the next chunk's ----------------


def _ensemble_fn(base, mode, reset):
    def f(p, b, xx):
        if reset:
            functional.reset_net(base)
        if mode == "m":
            return functional_call(base, (p, b), (xx,))
        return torch.stack([functional_call(base, (p, b), (xt,)) for xt in xx.unbind(0)])

    return f


@pytest.mark.parametrize("mode", ["s", "m"])
@pytest.mark.parametrize("chunk_size", [1, 2])
def test_chunked_ensemble_vmap_does_not_carry_one_chunks_membranes_into_the_next(mode,
                                                                                  chunk_size):
    """vmap(f, chunk_size=k) runs f once per chunk of models, each a new vmap call at the same
    level. The membranes chunk 1's models ended with stayed on the base module and functorch
    took them as chunk 2's: models 3.. started from the final state of models 1.., and the
    ensemble's output depended on chunk_size (max error 1.0, a spike flipped; SpikingJelly's
    neurons do the same). Now that call raises and says to reset at the start of f; with the
    reset, every chunk size gives the models' own outputs (that part held before too)."""
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(4, 5), neuron.LIFNode(step_mode=mode)) for _ in range(3)]
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0])
    x = torch.randn(6, 2, 4) + 0.8
    ref = torch.stack([m(x) if mode == "m" else torch.stack([m(xt) for xt in x]) for m in models])

    got = vmap(_ensemble_fn(base, mode, True), in_dims=(0, 0, None), chunk_size=chunk_size)(
        params, buffers, x)
    assert torch.equal(got, ref)

    functional.reset_net(base)
    with pytest.raises(RuntimeError, match=r"earlier torch\.func\.vmap call(.|\n)*reset_net"):
        vmap(_ensemble_fn(base, mode, False), in_dims=(0, 0, None), chunk_size=chunk_size)(
            params, buffers, x)


def test_chunked_per_sample_grads_need_the_reset_inside():
    """Per-sample gradients with vmap(grad(loss), chunk_size=k) and no reset inside loss: the
    samples of chunk 2 started from chunk 1's final membranes, so their gradients differed from
    the unchunked ones. Now refused; with the reset inside they equal the unchunked gradients."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), neuron.LIFNode(step_mode="m"))
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(6, 4, 4) + 0.8
    target = torch.rand(4, 5)

    def loss(p, xs, t, reset):
        if reset:
            functional.reset_net(model)
        y = functional_call(model, p, (xs.unsqueeze(1),))[:, 0]
        return ((y.mean(0) - t) ** 2).sum()

    def per_sample(reset, chunk_size):
        functional.reset_net(model)
        return vmap(grad(lambda p, xs, t: loss(p, xs, t, reset)), in_dims=(None, 1, 0),
                    chunk_size=chunk_size)(params, x, target)

    want = per_sample(True, None)
    got = per_sample(True, 2)
    for k in want:
        torch.testing.assert_close(got[k], want[k])
    with pytest.raises(RuntimeError, match=r"earlier torch\.func\.vmap call"):
        per_sample(False, 2)
    # one unchunked call from rest needs no reset inside
    no_reset = per_sample(False, None)
    for k in want:
        torch.testing.assert_close(no_reset[k], want[k])


def test_state_carried_within_one_vmap_call_is_not_refused():
    """Control: inside one vmap call the membrane carries from step to step (single-step mode,
    a Python loop over T inside f) and from call to call of the neuron; only state an exited
    call left is refused. The result equals each model run alone."""
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(4, 5), neuron.ParametricLIFNode(step_mode="s"))
              for _ in range(3)]
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0])
    x = torch.randn(8, 2, 4) + 0.8

    def f(p, b, xx):
        functional.reset_net(base)
        first = torch.stack([functional_call(base, (p, b), (xt,)) for xt in xx[:4]])
        second = torch.stack([functional_call(base, (p, b), (xt,)) for xt in xx[4:]])
        return torch.cat([first, second])

    got = vmap(f, in_dims=(0, 0, None))(params, buffers, x)
    ref = torch.stack([torch.stack([m(xt) for xt in x]) for m in models])
    assert torch.equal(got, ref)


def test_zero_dim_steps_inside_chunked_vmap():
    """The one-neuron paths (a 0-d step, a [T] sequence) reshape the membrane; the mark of the
    vmap call that wrote it goes with it, so chunk 2 is refused there too."""
    node = neuron.LIFNode()
    x = torch.rand(4, 5) * 1.5  # 4 samples, 5 steps of one neuron

    def f(xs, reset):
        if reset:
            functional.reset_net(node)
        return torch.stack([node(xt) for xt in xs.unbind(0)])

    want = vmap(lambda xs: f(xs, True))(x)
    assert torch.equal(vmap(lambda xs: f(xs, True), chunk_size=1)(x), want)
    functional.reset_net(node)
    with pytest.raises(RuntimeError, match=r"earlier torch\.func\.vmap call"):
        vmap(lambda xs: f(xs, False), chunk_size=2)(x)
    node.reset()
    node.step_mode = "m"
    with pytest.raises(RuntimeError, match=r"earlier torch\.func\.vmap call"):
        vmap(lambda xs: node(xs), chunk_size=2)(x)
