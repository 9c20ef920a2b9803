"""``isinstance(m, neuron.BaseNode)`` after the import swap (session 36).

``from pypaper.snn import neuron`` gives pypaper's BaseNode / IFNode / LIFNode / ParametricLIFNode
and, through the same module, SpikingJelly's classes for every neuron pypaper does not implement
(QIFNode, IzhikevichNode, EIFNode, KLIFNode, ...: pypaper/snn/spikingjelly_fallback.py). Code
written for SpikingJelly finds a model's neurons by class (``monitor.OutputMonitor(net,
neuron.BaseNode)``, a firing-rate counter over ``isinstance(m, neuron.BaseNode)``); those
neurons were skipped silently, since they are not subclasses of pypaper's BaseNode. BaseNode
now answers for SpikingJelly's BaseNodes as SpikingJelly's own BaseNode does (ABCMeta
``__subclasshook__``, on the base class only), while pypaper's code that means its own neurons
(SLTT's online step, base's memory walk) asks ``neuron._is_own``.
"""
import copy
import pickle

import pytest
import torch
from torch import nn

import pypaper.snn as ps
from pypaper.snn import base, functional, neuron, sltt

pytest.importorskip("spikingjelly.activation_based")
from spikingjelly.activation_based import monitor  # noqa: E402
from spikingjelly.activation_based import neuron as sjn  # noqa: E402

# SpikingJelly neurons pypaper does not implement, served through pypaper.snn.neuron
SERVED = ["QIFNode", "IzhikevichNode", "EIFNode", "KLIFNode", "ILIFNode", "AdaptBaseNode"]


def _neuron_classes() -> list:
    """Every class pypaper.snn.neuron hands out that SpikingJelly's neuron module has too."""
    names = []
    for name in dir(sjn):
        cls = getattr(sjn, name)
        if isinstance(cls, type) and issubclass(cls, nn.Module) and not name.startswith("_"):
            names.append(name)
    return sorted(names)


@pytest.mark.parametrize("name", SERVED)
def test_spikingjelly_neurons_served_through_the_module_are_basenodes(name):
    cls = getattr(neuron, name)
    assert cls is getattr(sjn, name)  # served, not pypaper's
    assert issubclass(cls, neuron.BaseNode)
    if name != "AdaptBaseNode":  # abstract-ish: its neuronal_charge is left to subclasses
        assert isinstance(cls(), neuron.BaseNode)


def test_basenode_answers_as_spikingjellys_basenode_for_every_name_of_the_module():
    """issubclass(neuron.X, neuron.BaseNode) after the swap is SpikingJelly's answer for
    issubclass(sjn.X, sjn.BaseNode) before it, name by name: pypaper's IF / LIF / PLIF stand in
    for SpikingJelly's (BaseNodes there), its other BaseNodes are BaseNodes, and what is not a
    BaseNode there (SimpleLIFNode, PSN, the DSR, NonSpiking and FewSpike nodes) is not one here."""
    names = _neuron_classes()
    assert len(names) > 20
    wrong = [n for n in names
             if issubclass(getattr(neuron, n), neuron.BaseNode) != issubclass(getattr(sjn, n),
                                                                             sjn.BaseNode)]
    assert wrong == []
    assert not issubclass(neuron.SimpleLIFNode, neuron.BaseNode)
    assert not issubclass(neuron.PSN, neuron.BaseNode)


def test_only_the_base_class_answers_for_spikingjellys_neurons():
    """SpikingJelly's LIFNode is not a pypaper LIFNode (its own dynamics and state), nor a QIFNode
    one; pypaper's code tells them apart with _is_own."""
    sj_lif, qif, lif = sjn.LIFNode(), neuron.QIFNode(), neuron.LIFNode()
    assert isinstance(sj_lif, neuron.BaseNode) and isinstance(qif, neuron.BaseNode)
    assert not isinstance(sj_lif, neuron.LIFNode) and not isinstance(qif, neuron.LIFNode)
    assert not isinstance(qif, neuron.IFNode) and not isinstance(sj_lif, neuron.ParametricLIFNode)
    assert neuron._is_own(lif) and not neuron._is_own(qif) and not neuron._is_own(sj_lif)
    assert not isinstance(nn.Linear(2, 2), neuron.BaseNode)
    assert not isinstance(object(), neuron.BaseNode)


def _mixed(step_mode="s"):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), neuron.LIFNode(step_mode=step_mode), nn.Linear(6, 3),
                         neuron.QIFNode(step_mode=step_mode))


def test_output_monitor_by_basenode_records_spikingjellys_neurons_too():
    net = _mixed("m")
    mon = monitor.OutputMonitor(net, neuron.BaseNode)
    assert mon.monitored_layers == ["1", "3"]
    x = torch.randn(5, 2, 4) * 3
    net(x)
    assert len(mon.records) == 2 and mon["3"][0].shape == (5, 2, 3)
    mon.remove_hooks()


def test_firing_rate_counter_by_isinstance_sees_every_neuron():
    """A SpikingJelly-style counter: the firing rate of every neuron layer."""
    net = _mixed("m")
    rates = {}
    for name, m in net.named_modules():
        if isinstance(m, neuron.BaseNode):
            m.register_forward_hook(lambda mod, i, o, n=name: rates.__setitem__(n, float(o.detach().mean())))
    net(torch.randn(5, 2, 4) * 3)
    assert sorted(rates) == ["1", "3"]


def test_a_compiled_walk_by_isinstance_counts_spikingjellys_neurons():
    net = _mixed("m")

    def count(x):
        n = 0
        for m in net.modules():
            if isinstance(m, neuron.BaseNode):
                n += 1
        return x * n

    out = torch.compile(count, fullgraph=True, backend="eager")(torch.ones(1))
    assert float(out) == 2.0


def test_online_sltt_still_drives_only_pypapers_neurons():
    """train_step_online sets step_mode and sltt on pypaper's neurons only (_is_own): a
    SpikingJelly QIFNode in the model stays a foreign memory, reset and detached per step (as
    isinstance-found, it was read for an sltt flag it has not: AttributeError)."""
    net = _mixed("s")
    qif = net[3]
    x, y = torch.randn(4, 2, 4) * 3, torch.tensor([0, 2])
    res = sltt.train_step_online(net, x, y, nn.functional.cross_entropy)
    assert res.output.shape == (2, 3) and "sltt" not in qif.__dict__
    assert net[1].step_mode == "s" and not net[1].sltt
    assert net[0].weight.grad is not None

    only_sj = nn.Sequential(nn.Linear(4, 3), neuron.QIFNode())
    with pytest.raises(ValueError, match="no pypaper.snn neurons"):
        sltt.train_step_online(only_sj, x, y, nn.functional.cross_entropy)


def test_memory_walk_counts_each_neuron_once():
    net = _mixed("s")
    net(torch.randn(2, 4))
    assert [n for n, _ in base.named_memories(net)] == ["1.v", "3.v"]
    functional.reset_net(net)
    assert net[1].v == 0.0 and net[3].v == -0.1  # QIFNode's v_reset


class _UserNode(neuron.BaseNode):
    """A user's neuron on pypaper's BaseNode: a fixed decay, a trace of its own."""

    decay_input = True

    def __init__(self, **kw):
        super().__init__(**kw)
        self.register_memory("trace", 0.0)

    def _decay(self):
        return {"tau": 2.0, "tau_name": "tau"}


class _UserLIF(neuron.LIFNode):
    pass


@pytest.mark.parametrize("cls", [_UserNode, _UserLIF])
def test_user_subclasses_of_pypapers_nodes_keep_working(cls):
    node = cls(step_mode="m")
    assert isinstance(node, neuron.BaseNode) and neuron._is_own(node)
    x = torch.randn(4, 3, 5) * 3
    out = node(x)
    want = neuron.LIFNode(step_mode="m")(x)
    assert torch.equal(out, want)
    for twin in (copy.deepcopy(node), pickle.loads(pickle.dumps(node))):
        assert type(twin) is cls and torch.equal(twin.v, node.v)
    net = nn.Sequential(nn.Linear(5, 5), cls(step_mode="m"))
    assert sltt.train_step_online(net, x, None, lambda o, t: o.sum()).output.shape == (3, 5)


def test_dynamics_hooks_on_a_subclass_are_still_refused():
    with pytest.raises(TypeError, match="never calls SpikingJelly's dynamics hooks"):
        class _Charged(neuron.LIFNode):
            def neuronal_charge(self, x):
                return x


def test_compiled_model_with_pypapers_neurons_is_unchanged():
    net = nn.Sequential(nn.Linear(4, 4), neuron.LIFNode(step_mode="m"),
                        neuron.ParametricLIFNode(step_mode="m"))
    x = torch.randn(5, 2, 4) * 3

    def step(x):
        for m in net.modules():
            if isinstance(m, neuron.BaseNode):
                m.reset()
        return net(x).sum(0)

    want = step(x)
    got = torch.compile(step, fullgraph=True, backend="eager")(x)
    assert torch.equal(want, got)
    assert ps.LIFNode is neuron.LIFNode
