"""Modules and ops on the meta device (shape inference, deferred initialisation: a model built
under ``torch.device('meta')`` and run once to find its shapes). Meta tensors hold no values, so
the range checks of tensor parameters (tau > 1, finite thresholds) cannot read them and are
skipped, as while tracing; before 2026-12-05 they called .item() and ParametricLIFNode, or any
tensor tau or threshold, failed on meta with "Tensor.item() cannot be called on meta tensors"."""
import pytest
import torch

from pypaper.snn import neuron
from pypaper.snn.ops import lif_multi_step


@pytest.mark.parametrize("make", [
    lambda: neuron.LIFNode(step_mode="m"),
    lambda: neuron.LIFNode(step_mode="m", v_reset=None, detach_reset=True),
    lambda: neuron.IFNode(step_mode="m"),
    lambda: neuron.ParametricLIFNode(step_mode="m"),
    lambda: neuron.ParametricLIFNode(step_mode="m", decay_input=False, v_reset=None),
], ids=["lif", "lif-soft", "if", "plif", "plif-soft"])
def test_modules_on_meta_give_shapes_and_gradient_shapes(make):
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(3, 5), make())
        x = torch.randn(4, 2, 3, requires_grad=True)
    y = model(x)
    assert y.is_meta and y.shape == (4, 2, 5) and y.dtype == torch.float32
    y.sum().backward()
    assert x.grad.is_meta and x.grad.shape == x.shape
    for p in model.parameters():
        assert p.grad is not None and p.grad.shape == p.shape


def test_tensor_parameters_on_meta():
    x = torch.empty(6, 2, 4, device="meta")
    tau = torch.empty(4, device="meta").requires_grad_()
    vth = torch.empty(4, device="meta").requires_grad_()
    s, v = lif_multi_step(x, tau=tau, v_threshold=vth)[:2]
    assert s.shape == (6, 2, 4) and v.shape == (2, 4) and s.is_meta
    s.sum().backward()
    assert tau.grad.shape == (4,) and vth.grad.shape == (4,)


def test_values_are_still_checked_off_meta():
    """The skip is for meta tensors only: the same call on the CPU still refuses tau <= 1."""
    with pytest.raises(ValueError, match="tau"):
        lif_multi_step(torch.randn(3, 2, 4), tau=torch.full((4,), 0.5))
