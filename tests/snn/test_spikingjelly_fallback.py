"""What pypaper.snn does not implement comes from SpikingJelly
(pypaper/snn/spikingjelly_fallback.py):
a model that uses SpikingJelly's rarer neurons, layers, surrogates or functions still runs after
the import swap, mixed with pypaper's fused ones, and gives SpikingJelly's results."""
import pytest
import torch
from torch import nn

import pypaper.snn.spikingjelly_fallback as fallback
from pypaper.snn import functional, layer, neuron, surrogate

from .helpers import inputs

pytest.importorskip("spikingjelly.activation_based")
from spikingjelly.activation_based import functional as sj_functional  # noqa: E402
from spikingjelly.activation_based import layer as sj_layer  # noqa: E402
from spikingjelly.activation_based import neuron as sj_neuron  # noqa: E402
from spikingjelly.activation_based import surrogate as sj_surrogate  # noqa: E402


class sj:  # noqa: N801  (SpikingJelly's modules under the names a model imports)
    neuron, layer, surrogate, functional = sj_neuron, sj_layer, sj_surrogate, sj_functional


@pytest.mark.parametrize("module,name", [(neuron, "QIFNode"), (neuron, "IzhikevichNode"),
                                         (layer, "SynapseFilter"),
                                         (layer, "LinearRecurrentContainer"),
                                         (surrogate, "S2NN"), (functional, "first_spike_index")])
def test_names_pypaper_lacks_are_spikingjellys(module, name):
    sj_module = getattr(sj, module.__name__.rsplit(".", 1)[1])
    assert getattr(module, name) is getattr(sj_module, name)


def test_pypaper_names_stay_pypapers():
    assert neuron.LIFNode.__module__ == "pypaper.snn.neuron"
    assert layer.Linear.__module__ == "pypaper.snn.layer"
    assert surrogate.ATan.__module__ == "pypaper.snn.surrogate"
    assert functional.reset_net.__module__ == "pypaper.snn.functional"


def _net(lib):
    """Linear -> LIF -> Linear -> QIF (SpikingJelly's only) -> SynapseFilter, multi-step."""
    net = nn.Sequential(lib.layer.Linear(6, 12), lib.neuron.LIFNode(tau=2.0),
                        lib.layer.Linear(12, 5), lib.neuron.QIFNode(tau=2.0),
                        lib.layer.SynapseFilter(tau=3.0, learnable=True))
    lib.functional.set_step_mode(net, "m")
    return net


class _Pypaper:
    neuron, layer, functional = neuron, layer, functional


def test_mixed_model_matches_spikingjelly():
    torch.manual_seed(0)
    ref = _net(sj)
    net = _net(_Pypaper)
    net.load_state_dict(ref.state_dict())
    assert type(net[1]).__module__ == "pypaper.snn.neuron"
    assert type(net[3]) is sj.neuron.QIFNode
    assert net[3].step_mode == "m" and net[4].step_mode == "m"
    x = inputs((7, 3, 6), scale=2.0)
    for _ in range(2):  # the second pass checks reset_net reaches both libraries' state
        sj.functional.reset_net(ref)
        functional.reset_net(net)
        xr, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_r, out_p = ref(xr), net(xp)
        torch.testing.assert_close(out_p, out_r, rtol=1e-6, atol=1e-6)
        g = torch.randn_like(out_r)
        out_r.backward(g)
        out_p.backward(g)
        torch.testing.assert_close(xp.grad, xr.grad, rtol=1e-5, atol=1e-6)
    for (name, p), (_, q) in zip(net.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_spikingjelly_surrogate_on_a_pypaper_neuron():
    """A surrogate pypaper does not compile in (S2NN) runs through pypaper's plain-PyTorch loop,
    with SpikingJelly's LIFNode's spikes and gradients."""
    x = inputs((6, 4, 5), scale=2.0)
    ours = neuron.LIFNode(surrogate_function=surrogate.S2NN(), step_mode="m")
    theirs = sj.neuron.LIFNode(surrogate_function=sj.surrogate.S2NN(), step_mode="m")
    xp, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    sp, sr = ours(xp), theirs(xr)
    assert torch.equal(sp, sr)
    g = torch.randn_like(sp)
    sp.backward(g)
    sr.backward(g)
    torch.testing.assert_close(xp.grad, xr.grad, rtol=1e-5, atol=1e-6)


def test_private_and_unknown_names():
    with pytest.raises(AttributeError, match="has no attribute '__wrapped__'"):
        neuron.__wrapped__
    with pytest.raises(AttributeError, match="and neither has spikingjelly.activation_based.layer"):
        layer.NoSuchLayer


def test_without_spikingjelly_the_error_says_so(monkeypatch):
    def broken(name):
        raise ModuleNotFoundError(f"No module named {name!r}")

    monkeypatch.setattr(fallback.importlib, "import_module", broken)
    with pytest.raises(AttributeError, match="QIFNode.* pypaper does not implement it, and "
                                             "spikingjelly.activation_based.neuron .*failed to "
                                             "import .*ModuleNotFoundError"):
        neuron.QIFNode


def test_the_names_the_agreement_tests_compare_are_pypapers_own():
    """The agreement tests (test_layer.py, test_surrogate.py, ...) look layers and surrogates up
    by name; a name pypaper lost would now resolve to SpikingJelly's class and compare it with
    itself. Each such name, and each module's own names (the head of its __all__), must be
    defined by pypaper."""
    from . import helpers, test_layer

    names = {(layer, c[0]) for c in test_layer.CASES} | {(layer, "Dropout"), (layer, "Dropout2d")}
    names |= {(surrogate, s) for s in helpers.SURROGATES}
    names |= {(m, n) for m in (neuron, layer, surrogate, functional) for n in m._OWN_NAMES}
    for module, name in names:
        assert name in vars(module), f"{module.__name__}.{name} is not pypaper's"


def test_star_import_brings_spikingjellys_names_too():
    """``from pypaper.snn.neuron import *`` binds pypaper's names and every name SpikingJelly's
    module would star-import (its __all__, else its public names): a model that star-imported
    from SpikingJelly keeps working after the import line changes (only pypaper's own names
    were bound: QIFNode, S2NN, ... raised NameError). Without SpikingJelly: pypaper's alone."""
    sj_neuron = pytest.importorskip("spikingjelly.activation_based.neuron")
    import importlib

    for m in (neuron, layer, surrogate, functional):
        sj = importlib.import_module(f"spikingjelly.activation_based.{m.__name__.rsplit('.', 1)[1]}")
        names = m.__all__
        assert names[:len(m._OWN_NAMES)] == m._OWN_NAMES and len(set(names)) == len(names)
        star = getattr(sj, "__all__", None) or [n for n in vars(sj) if not n.startswith("_")]
        assert set(star) <= set(names), m.__name__
    scope = {}
    exec("from pypaper.snn.neuron import *", scope)
    assert scope["LIFNode"] is neuron.LIFNode and scope["QIFNode"] is sj_neuron.QIFNode


def test_star_import_without_spikingjelly_binds_pypapers_names(monkeypatch):
    def broken(name):
        raise ModuleNotFoundError(f"No module named {name!r}")

    monkeypatch.setattr(fallback.importlib, "import_module", broken)
    for m in (neuron, layer, surrogate, functional):
        assert m.__all__ == m._OWN_NAMES
