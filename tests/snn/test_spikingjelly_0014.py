"""SpikingJelly 0.0.0.0.14 (its PyPI release) compatibility of the neurons' constructor and
functional helpers, beyond what SpikingJelly 2.0's signature has."""
import pytest
import torch
from torch import nn

from pypaper.snn import functional, neuron


def test_spikingjelly_0014_backend_argument_is_accepted():
    """SpikingJelly's PyPI release (0.0.0.0.14) passes backend='torch' | 'cupy' to its neurons
    and switches it with functional.set_backend; a model written that way runs unchanged and
    computes what the default does (pypaper runs its fused kernel either way)."""
    x = torch.randn(6, 4, 5) + 0.8
    ref = neuron.LIFNode(tau=2.0, step_mode="m")(x)
    lif = neuron.LIFNode(tau=2.0, step_mode="m", backend="cupy")
    plif = neuron.ParametricLIFNode(step_mode="m", backend="cupy")
    assert lif.backend == "cupy" and plif.backend == "cupy"
    assert torch.equal(lif(x), ref)
    model = nn.Sequential(nn.Linear(5, 5), neuron.LIFNode(step_mode="m"), nn.Linear(5, 5),
                          neuron.ParametricLIFNode(step_mode="m"))
    functional.set_backend(model, "cupy", instance=neuron.LIFNode)
    assert model[1].backend == "cupy" and model[3].backend == "torch"
    functional.set_backend(model, "cupy")
    assert model[3].backend == "cupy"
    with pytest.warns(UserWarning, match="does not support backend='lava'"):
        functional.set_backend(model, "lava")
    assert model[1].backend == "cupy"
    with pytest.raises(ValueError, match="backend must be one of"):
        neuron.LIFNode(backend="cuda")
    with pytest.raises(TypeError, match="pass backend= by keyword"):
        neuron.LIFNode(2.0, True, 1.0, 0.0, None, False, "m", "cupy")
