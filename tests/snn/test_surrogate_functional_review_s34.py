"""Review s34 of the surrogates and functional helpers against the installed SpikingJelly 2.0.

A model built under ``torch.device('meta')`` (deferred initialisation: build on meta, infer
shapes, then ``to_empty`` + ``load_state_dict``) with a tensor alpha, e.g. a learnable
``nn.Parameter`` one: the alpha is then a meta tensor, which holds no value. SpikingJelly builds
and runs such a model (its spiking function reads alpha only in the backward, as tensor
arithmetic, which meta tensors do). pypaper read alpha's value when constructed and at each call
(``float(alpha)``), so the construction failed with "Tensor.item() cannot be called on meta
tensors", as did a SpikingJelly surrogate with a meta alpha inside a pypaper neuron.
"""
import pytest
import torch
from spikingjelly.activation_based import neuron as sj_neuron
from spikingjelly.activation_based import surrogate as sj_surrogate
from torch import nn

from pypaper.snn import functional, neuron, surrogate

from .helpers import SURROGATES

# SpikingJelly's SoftSign asserts alpha > 0 when constructed, which a meta alpha cannot answer:
# SpikingJelly itself cannot build that one on meta
SJ_ON_META = [n for n in SURROGATES if n != "SoftSign"]


def _net(sg_module, name, neuron_cls=neuron.LIFNode):
    sg = getattr(sg_module, name)(alpha=nn.Parameter(torch.tensor(1.7)))
    return nn.Sequential(nn.Linear(3, 5), neuron_cls(step_mode="m", surrogate_function=sg))


@pytest.mark.parametrize(
    "sg_module,name",
    [(surrogate, n) for n in SURROGATES] + [(sj_surrogate, n) for n in SJ_ON_META],
    ids=[f"pypaper-{n}" for n in SURROGATES] + [f"sj-{n}" for n in SJ_ON_META])
def test_a_neuron_with_a_parameter_alpha_builds_and_runs_on_meta(sg_module, name):
    """Built on meta: shapes of outputs and gradients, as SpikingJelly's own neuron gives them;
    then materialised and loaded, the same numbers as the model built on the CPU."""
    with torch.device("meta"):
        model = _net(sg_module, name)
        x = torch.randn(4, 2, 3, requires_grad=True)
    assert model[1].surrogate_function.alpha.is_meta
    y = model(x)
    assert y.is_meta and y.shape == (4, 2, 5)
    y.sum().backward()
    assert x.grad.is_meta and x.grad.shape == x.shape
    alpha = model[1].surrogate_function.alpha
    assert alpha.grad is None  # the spiking function gives alpha no gradient, as SpikingJelly's

    torch.manual_seed(0)
    want = _net(sg_module, name)
    with torch.no_grad():
        want[1].surrogate_function.alpha.fill_(2.5)
    model = model.to_empty(device="cpu")
    model.load_state_dict(want.state_dict())
    functional.reset_net(model)  # the membrane the meta run left is a meta tensor
    x = torch.randn(4, 2, 3) * 2
    grads = []
    for m in (model, want):
        xx = x.clone().requires_grad_()
        (m(xx) * torch.arange(5.0)).sum().backward()
        grads.append(xx.grad)
    assert torch.equal(grads[0], grads[1]) and grads[0].abs().sum() > 0


@pytest.mark.parametrize("name", SURROGATES)
def test_a_pypaper_surrogate_with_a_meta_alpha_in_a_spikingjelly_neuron(name):
    with torch.device("meta"):
        model = _net(surrogate, name, sj_neuron.LIFNode)
        x = torch.randn(4, 2, 3, requires_grad=True)
    y = model(x)
    y.sum().backward()
    assert y.is_meta and y.shape == (4, 2, 5) and x.grad.shape == x.shape


@pytest.mark.parametrize("name", SURROGATES)
@pytest.mark.parametrize("spiking", [True, False])
def test_the_surrogate_called_on_meta_gives_what_spikingjelly_gives(name, spiking):
    if name == "SuperSpike" and not spiking:
        pytest.skip("SuperSpike has no primitive")
    out = []
    # SpikingJelly's SoftSign cannot be built on meta: the same shapes from its Sigmoid
    theirs = getattr(sj_surrogate, name if name in SJ_ON_META else "Sigmoid")
    for make in (getattr(surrogate, name), theirs):
        with torch.device("meta"):
            alpha = nn.Parameter(torch.tensor(1.5))
            sg = make(alpha=alpha, spiking=spiking)
            x = torch.randn(2, 7, dtype=torch.float16, requires_grad=True)
        y = sg(x)
        y.sum().backward()
        out.append((y.shape, y.dtype, y.device, x.grad.shape, x.grad.dtype,
                    None if alpha.grad is None else (alpha.grad.shape, alpha.grad.dtype)))
    assert out[0] == out[1]
    # the static helpers SpikingJelly's classes have, on meta tensors too
    cls = getattr(surrogate, name)
    with torch.device("meta"):
        x, g, a = torch.randn(3), torch.randn(3), torch.tensor(2.0)
    assert cls.backward(g, x, a).shape == (3,) and cls(alpha=a).derivative(x).is_meta


@pytest.mark.parametrize("name", SURROGATES)
def test_a_meta_alpha_on_real_inputs_is_refused_with_the_reason(name):
    """Not materialised (to_empty moves Parameters, not a plain tensor attribute; or forgotten):
    there is no alpha to compute the gradient with, and the error says so."""
    with torch.device("meta"):
        sg = getattr(surrogate, name)(alpha=torch.tensor(2.0))
    x = torch.randn(5, requires_grad=True)
    with pytest.raises(ValueError, match="meta device"):
        sg(x)
    with pytest.raises(ValueError, match="meta device"):
        neuron.LIFNode(step_mode="m", surrogate_function=sg)(torch.randn(3, 2, 4))
    with pytest.raises(ValueError, match="meta device"):
        type(sg).backward(torch.ones(5), x.detach(), sg.alpha)


def test_the_value_checks_still_run_off_meta():
    """The construction check skips meta tensors only."""
    with pytest.raises(ValueError, match="alpha must be a positive finite number"):
        surrogate.ATan(alpha=torch.tensor(-1.0))
    with pytest.raises(ValueError, match="one-element floating tensor"):
        with torch.device("meta"):
            surrogate.ATan(alpha=torch.ones(2))
