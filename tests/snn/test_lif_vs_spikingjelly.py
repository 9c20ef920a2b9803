"""The neurons against SpikingJelly's own LIFNode / ParametricLIFNode (installed), for every
surrogate x hard/soft reset x decay_input x detach_reset: spikes and membrane to the bit in fp32,
gradients of x and w to the fp32 tolerance."""
import pytest
import torch
from spikingjelly.activation_based import neuron as sj_neuron
from spikingjelly.activation_based import surrogate as sj_surrogate

from pypaper.snn import neuron

from .helpers import CONFIGS, assert_close, config_id, inputs, surrogate_of


def _pair(kind, cfg, **extra):
    common = dict(decay_input=cfg["decay_input"], v_threshold=1.0, v_reset=cfg["v_reset"],
                  detach_reset=cfg["detach_reset"], step_mode="m", **extra)
    sur = cfg["surrogate"]
    if kind == "lif":  # tau = 1.7: "/ tau" is not exact, so the operation order is checked
        ours = neuron.LIFNode(tau=1.7, surrogate_function=surrogate_of(sur), **common)
        theirs = sj_neuron.LIFNode(tau=1.7, surrogate_function=getattr(sj_surrogate, sur)(),
                                   **common)
    else:
        ours = neuron.ParametricLIFNode(init_tau=1.7, surrogate_function=surrogate_of(sur),
                                        **common)
        theirs = sj_neuron.ParametricLIFNode(init_tau=1.7,
                                             surrogate_function=getattr(sj_surrogate, sur)(),
                                             **common)
    return ours, theirs


@pytest.mark.parametrize("kind", ["lif", "plif"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=config_id)
def test_matches_spikingjelly(kind, cfg):
    ours, theirs = _pair(kind, cfg)
    x = inputs()
    g = torch.randn_like(x)
    gv = torch.randn(x.shape[1:])
    results = []
    for m in (ours, theirs):
        xx = x.clone().requires_grad_()
        # two calls: the second starts from the carried membrane
        s1 = m(xx[:4])
        s2 = m(xx[4:])
        s = torch.cat([s1, s2])
        ((s * g).sum() + (m.v * gv).sum()).backward()
        results.append((s.detach(), m.v.detach(), xx.grad,
                        m.w.grad if kind == "plif" else None))
    (s, v, gx, gw), (s_sj, v_sj, gx_sj, gw_sj) = results
    assert torch.equal(s, s_sj), "spikes differ from SpikingJelly"
    assert torch.equal(v, v_sj), "membrane differs from SpikingJelly"
    assert 0.02 < float(s.mean()) < 0.98  # the case exercises both branches
    assert_close(gx, gx_sj, torch.float32, "grad x")
    if kind == "plif":
        assert_close(gw, gw_sj, torch.float32, "grad w")


@pytest.mark.parametrize("step_mode", ["s", "m"])
def test_store_v_seq_and_single_step_match_spikingjelly(step_mode):
    cfg = dict(surrogate="ATan", v_reset=None, decay_input=False, detach_reset=False)
    ours, theirs = _pair("plif", cfg, store_v_seq=True)
    x = inputs((5, 3, 7))
    for m in (ours, theirs):
        m.step_mode = step_mode
    outs = []
    for m in (ours, theirs):
        xx = x.clone().requires_grad_()
        s = m(xx) if step_mode == "m" else torch.stack([m(xt) for xt in xx])
        (s.sum() + (m.v_seq * torch.linspace(-1, 1, 7)).sum()).backward()
        outs.append((s.detach(), m.v_seq.detach(), xx.grad, m.w.grad))
    assert torch.equal(outs[0][0], outs[1][0])
    assert outs[0][1].shape == (5, 3, 7) and torch.equal(outs[0][1], outs[1][1])
    for a, b in zip(outs[0][2:], outs[1][2:]):
        assert_close(a, b, torch.float32)


def test_reset_and_state_semantics_match_spikingjelly():
    ours, theirs = _pair("lif", CONFIGS[0])
    assert ours.v == theirs.v == 0.0 and isinstance(ours.v, float)
    x = inputs((3, 2, 5))
    ours(x), theirs(x)
    assert isinstance(ours.v, torch.Tensor) and torch.equal(ours.v, theirs.v)
    ours.reset(), theirs.reset()
    assert ours.v == theirs.v == 0.0
    soft = neuron.LIFNode(v_reset=None)
    assert soft.v == 0.0 and soft.rest_value == 0.0
    hard = neuron.LIFNode(v_reset=-0.5, v_threshold=0.5)
    assert hard.v == -0.5
    # a state of another shape (new batch size) restarts from rest, as in SpikingJelly
    ours.step_mode = theirs.step_mode = "m"
    ours(x), theirs(x)
    y = inputs((3, 4, 5))
    assert torch.equal(ours(y), theirs(y))


SURROGATES = ["Sigmoid", "ATan", "PiecewiseQuadratic", "PiecewiseExp", "SoftSign", "SuperSpike",
              "Erf", "Rect"]


@pytest.mark.parametrize("alpha", [0.7, 3.0])
@pytest.mark.parametrize("name", SURROGATES)
def test_a_non_default_alpha_matches_spikingjelly(name, alpha):
    """Each surrogate with an alpha of its own (the tests above use the defaults): the kernels
    read the surrogate's alpha, gradients equal SpikingJelly's with the same alpha (a default
    alpha passed instead differs by far more than the tolerance, e.g. 0.7 for ATan(5))."""
    common = dict(tau=1.7, v_threshold=1.0, step_mode="m")
    ours = neuron.LIFNode(surrogate_function=surrogate_of(name, alpha), **common)
    theirs = sj_neuron.LIFNode(surrogate_function=getattr(sj_surrogate, name)(alpha=alpha),
                               **common)
    default = neuron.LIFNode(surrogate_function=surrogate_of(name), **common)
    x = inputs()
    g = torch.randn_like(x)
    grads = []
    for m in (ours, theirs, default):
        xx = x.clone().requires_grad_()
        (m(xx) * g).sum().backward()
        grads.append(xx.grad)
    assert_close(grads[0], grads[1], torch.float32, f"{name}(alpha={alpha}) grad x")
    assert float((grads[0] - grads[2]).abs().max()) > 1e-3  # alpha matters in this case
