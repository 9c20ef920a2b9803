"""A float attribute changed between calls of a compiled model: v_threshold / v_reset / tau set by
a schedule, a surrogate's alpha annealed. Once dynamo has seen two values of a float it passes it
as a SymFloat (torch._dynamo.config.specialize_float is False); math.isfinite refused one, so the
argument checks broke the graph (fullgraph=True failed with "torch.* op returned non-Tensor").
The compiled model must run in one graph per call and equal an eager twin given the same values."""
import pytest
import spikingjelly.activation_based.surrogate as sj_surrogate
import torch
from torch import nn

import pypaper
from pypaper.snn import neuron, surrogate


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # the recompile limit counts per code object, shared by every test's neurons
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _model(sur=surrogate.ATan):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), neuron.LIFNode(surrogate_function=sur(),
                                                         step_mode="m"))


def _set(model, attr, value):
    lif = model[1]
    if attr == "alpha":
        lif.surrogate_function.alpha = value
    else:
        setattr(lif, attr, value)


SCHEDULES = {
    "v_threshold": [1.0, 0.6, 0.8],
    "v_reset": [0.0, -0.2, None, 0.1],
    "tau": [2.0, 3.0, 1.5],
    "alpha": [2.0, 3.5, 1.0],
}


@pytest.mark.parametrize("dynamic", [None, True])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("attr", list(SCHEDULES))
def test_a_float_changed_between_compiled_calls_stays_in_one_graph(attr, backend, dynamic):
    _check_schedule(attr, SCHEDULES[attr], backend, dynamic, surrogate.ATan)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("sur", [surrogate.Sigmoid, surrogate.Erf, surrogate.PiecewiseQuadratic,
                                 lambda: surrogate.ATan(spiking=False), sj_surrogate.ATan],
                         ids=["Sigmoid", "Erf", "PiecewiseQuadratic", "ATan(spiking=False)",
                              "spikingjelly ATan"])
def test_an_annealed_alpha_of_any_surrogate_stays_in_one_graph(sur, backend):
    _check_schedule("alpha", [1.0, 2.5, 1.5], backend, True, sur)


def _check_schedule(attr, values, backend, dynamic, sur):
    eager, compiled_model = _model(sur), _model(sur)
    compiled = torch.compile(compiled_model, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    x = torch.randn(5, 3, 6) * 2
    with pypaper.use_backend(backend):
        for value in values:
            results = []
            for model, fn in ((eager, eager), (compiled_model, compiled)):
                _set(model, attr, value)
                pypaper.snn.reset_net(model)
                model.zero_grad()
                out = fn(x)
                (out * torch.linspace(-1, 1, 8)).sum().backward()
                results.append((out.detach(), model[1].v.detach(),
                                [p.grad.clone() for p in model.parameters()]))
            (out_e, v_e, g_e), (out_c, v_c, g_c) = results
            assert 0 < out_e.sum() < out_e.numel()  # some spikes, not all
            torch.testing.assert_close(out_c, out_e, rtol=0, atol=0)
            torch.testing.assert_close(v_c, v_e, rtol=1e-6, atol=1e-6)
            for gc, ge in zip(g_c, g_e):
                torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-6)
                assert ge.abs().sum() > 0
