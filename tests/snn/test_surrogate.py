"""Surrogate spike functions: Heaviside forward, SpikingJelly's derivatives and defaults."""
import pytest
import torch
from spikingjelly.activation_based import surrogate as sj_surrogate

from pypaper.snn import reference, surrogate

from .helpers import SURROGATES

DEFAULT_ALPHA = {"Sigmoid": 4.0, "ATan": 2.0, "PiecewiseQuadratic": 1.0, "Rect": 1.0,
                 "PiecewiseExp": 1.0, "SoftSign": 2.0, "SuperSpike": 1.0, "Erf": 2.0}


@pytest.mark.parametrize("name", SURROGATES)
def test_default_alpha_and_ids_match_spikingjelly(name):
    ours, theirs = getattr(surrogate, name)(), getattr(sj_surrogate, name)()
    assert ours.alpha == DEFAULT_ALPHA[name] == theirs.alpha
    assert ours.spiking and surrogate.surrogate_spec(ours) == surrogate.surrogate_spec(theirs)


@pytest.mark.parametrize("name", SURROGATES)
@pytest.mark.parametrize("alpha", [0.7, 3.0])
def test_forward_is_heaviside_and_backward_matches_spikingjelly(name, alpha):
    x = torch.cat([torch.linspace(-3, 3, 601, dtype=torch.float64), torch.zeros(1).double()])
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = getattr(surrogate, name)(alpha=alpha)(xa)
    yb = getattr(sj_surrogate, name)(alpha=alpha)(xb)
    assert torch.equal(ya, (x >= 0).double()) and torch.equal(ya, yb)
    g = torch.rand_like(x)
    ya.backward(g)
    yb.backward(g)
    assert torch.allclose(xa.grad, xb.grad, rtol=1e-12, atol=1e-14)
    assert float(xa.grad.abs().max()) > 0


@pytest.mark.parametrize("name", [n for n in SURROGATES if n != "SuperSpike"])
def test_derivative_is_the_derivative_of_the_primitive(name):
    f = getattr(surrogate, name)(alpha=1.3, spiking=False)
    # away from the kinks of the piecewise derivatives
    x = torch.linspace(-2.5, 2.5, 400, dtype=torch.float64)
    x = x[((x.abs() - 1 / 1.3).abs() > 1e-2) & ((x.abs() - 0.5 / 1.3).abs() > 1e-2)]
    x.requires_grad_()
    (g,) = torch.autograd.grad(f(x).sum(), x)
    assert torch.allclose(g, f.derivative(x.detach()), rtol=1e-9, atol=1e-12)
    # the primitive matches SpikingJelly's spiking=False forward
    theirs = getattr(sj_surrogate, name)(alpha=1.3, spiking=False)(x.detach())
    assert torch.allclose(f(x.detach()), theirs, rtol=1e-12, atol=1e-12)


def test_superspike_has_no_primitive():
    with pytest.raises(NotImplementedError, match="SuperSpike has no primitive"):
        surrogate.SuperSpike(spiking=False)(torch.zeros(3))


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan"), float("inf"), True])
def test_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha must be a positive finite number"):
        surrogate.ATan(alpha=alpha)


def test_spec_of_foreign_and_custom_surrogates():
    assert surrogate.surrogate_spec(None) == (0, 4.0)
    assert surrogate.surrogate_spec(sj_surrogate.Rect(alpha=0.5)) == (7, 0.5)
    assert surrogate.surrogate_spec(surrogate.Erf(spiking=False)) is None
    assert surrogate.surrogate_spec(lambda x: (x >= 0).float()) is None
    assert surrogate.surrogate_spec(sj_surrogate.S2NN()) is None


def test_reference_ids_cover_every_class():
    for name in SURROGATES:
        assert getattr(surrogate, name).surrogate_id == reference.SURROGATE_IDS[name]
    with pytest.raises(ValueError, match="surrogate id must be in 0..7"):
        reference.surrogate_grad(torch.zeros(2), 9, 1.0)
