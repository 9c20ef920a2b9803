"""SpikingJelly's monitor module (OutputMonitor, InputMonitor, AttributeMonitor, GradOutputMonitor,
GradInputMonitor: forward hooks, backward hooks and attribute reads on every instance of a neuron
class) on a network of pypaper's neurons: the same records as on the same network of
SpikingJelly's, in both step modes. Monitors are how SpikingJelly's tutorials read firing rates
and membranes, so a model that swapped its neuron import keeps them. The module imports
tensorboard (requirements/dev.txt)."""
import pytest
import torch

from pypaper import _ext
from pypaper.snn import functional as pf, layer as pl, neuron as pn

pytest.importorskip("tensorboard")
pytest.importorskip("spikingjelly.activation_based")
from spikingjelly.activation_based import (functional as sf, layer as sl, monitor,  # noqa: E402
                                           neuron as sn)

pytestmark = pytest.mark.skipif(not _ext.LOADED, reason="pypaper._C not built")


def _records(neurons, functional, layers, step_mode):
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        layers.Linear(6, 5, step_mode=step_mode), neurons.LIFNode(step_mode=step_mode),
        layers.Linear(5, 4, step_mode=step_mode), neurons.ParametricLIFNode(step_mode=step_mode))
    lif = neurons.LIFNode
    monitors = {
        "output": monitor.OutputMonitor(net, lif),
        "input": monitor.InputMonitor(net, lif),
        "v after": monitor.AttributeMonitor("v", pre_forward=False, net=net, instance=lif),
        "v before": monitor.AttributeMonitor("v", pre_forward=True, net=net, instance=lif),
        "grad output": monitor.GradOutputMonitor(net, lif),
        "grad input": monitor.GradInputMonitor(net, lif),
        "firing rate": monitor.OutputMonitor(net, (lif, neurons.ParametricLIFNode),
                                             lambda s: s.mean().item()),
    }
    x = (torch.randn(4, 3, 6) * 2).requires_grad_()
    functional.reset_net(net)
    y = net(x) if step_mode == "m" else torch.stack([net(a) for a in x])
    y.sum().backward()
    return {name: (list(m.monitored_layers), list(m.records)) for name, m in monitors.items()}


def _same(a, b, name):
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), name
        if name.startswith("grad"):  # the kernels' Sigmoid derivative (PLIF's) is within ulps
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)
        else:
            assert torch.equal(a, b), name
    elif isinstance(a, tuple):
        assert isinstance(b, tuple) and len(a) == len(b), name
        for p, q in zip(a, b):
            _same(p, q, name)
    else:
        assert a == b, name


@pytest.mark.parametrize("step_mode", ["s", "m"])
def test_monitors_record_what_they_record_on_spikingjelly(step_mode):
    want = _records(sn, sf, sl, step_mode)
    got = _records(pn, pf, pl, step_mode)
    for name, (layers, records) in want.items():
        got_layers, got_records = got[name]
        assert got_layers == layers and len(got_records) == len(records) > 0, name
        for a, b in zip(records, got_records):
            _same(a, b, name)
    assert 0 < sum(got["firing rate"][1]) < len(got["firing rate"][1])  # spikes, not all
