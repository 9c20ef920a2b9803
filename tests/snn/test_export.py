"""torch.export of spiking models with a dynamic number of steps T and batch N: one exported
program serves every (T, N) in its range and equals eager. The fused op is one node whatever T
(the plain-PyTorch reference unrolls its time loop over T, so it exports only for a fixed T)."""
import pytest
import torch
from torch import nn
from torch.export import Dim, export

import pypaper.snn as snn

NEURONS = {
    "LIFNode": lambda: snn.LIFNode(step_mode="m"),
    "LIFNode per-neuron tau": lambda: snn.LIFNode(step_mode="m", tau=torch.linspace(1.5, 4.0, 8)),
    "LIFNode learnable per-neuron threshold": lambda: snn.LIFNode(
        step_mode="m", learnable_threshold=True, threshold_shape=(8,)),
    "LIFNode soft reset SLTT": lambda: snn.LIFNode(step_mode="m", v_reset=None, sltt=True),
    "LIFNode store_v_seq": lambda: snn.LIFNode(step_mode="m", store_v_seq=True),
    "ParametricLIFNode": lambda: snn.ParametricLIFNode(step_mode="m"),
    "ParametricLIFNode per-neuron tau": lambda: snn.ParametricLIFNode(step_mode="m",
                                                                      tau_shape=(8,)),
    "IFNode": lambda: snn.IFNode(step_mode="m"),
    "DelayedLinear": lambda: snn.DelayedLinear(8, 8, max_delay=4),
}


@pytest.mark.parametrize("name", list(NEURONS))
def test_export_with_dynamic_steps_and_batch_equals_eager(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), NEURONS[name]())
    dims = {0: Dim("T", min=2, max=64), 1: Dim("N", min=2, max=64)}
    program = export(model, (torch.randn(4, 3, 8),), dynamic_shapes=({**dims},))
    # N = 8 equals the feature count: a per-neuron parameter (8,) must not be confused with one
    # per sample and neuron (N, 8) (it was: the program was refused for N != 8)
    for shape in ((6, 5, 8), (2, 8, 8), (17, 2, 8)):
        x = torch.randn(*shape) * 2
        snn.reset_net(model)
        got = program.module()(x)
        snn.reset_net(model)
        want = model(x)
        assert got.shape == want.shape == shape
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        if name != "DelayedLinear":
            assert 0 < want.sum() < want.numel()


def test_export_of_a_single_step_neuron_with_a_dynamic_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), snn.LIFNode(tau=torch.linspace(1.5, 4.0, 8)))
    program = export(model, (torch.randn(3, 8),),
                     dynamic_shapes=({0: Dim("N", min=2, max=64)},))
    for n in (5, 8, 33):
        x = torch.randn(n, 8) * 3
        snn.reset_net(model)
        got = program.module()(x)
        snn.reset_net(model)
        torch.testing.assert_close(got, model(x), rtol=0, atol=0)
