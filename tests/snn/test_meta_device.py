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


# devices with values to read (CUDA where there is one): the skip must not widen to them
OFF_META = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# (argument, a value it refuses, the error, whether the tensor requires grad); a threshold that
# requires grad is a learnable one, which may reach v_reset (not refused then)
BAD = [(name, value, error, grad)
       for name, value, error, grads in [
           ("tau", 0.5, "tau must be finite and > 1", (False, True)),
           ("k", 1.5, "k = 1/tau must lie", (False, True)),
           ("v_threshold", float("nan"), "v_threshold must be finite", (False, True)),
           ("v_threshold", -1.0, "greater than v_reset", (False,))]
       for grad in grads]


@pytest.mark.parametrize("device", OFF_META)
@pytest.mark.parametrize("name,value,error,requires_grad", BAD,
                         ids=[f"{n}={v}{'-grad' if g else ''}" for n, v, _, g in BAD])
def test_values_are_still_checked_off_meta(device, name, value, error, requires_grad):
    """The skip is for meta tensors only: the same calls on a device with values still refuse
    tau <= 1, k > 1 and a threshold that is not finite or not above v_reset, whether the tensor
    requires grad or not; on meta they run."""
    def call(dev):
        p = torch.full((4,), value, device=dev).requires_grad_(requires_grad)
        return lif_multi_step(torch.randn(3, 2, 4, device=dev), **{name: p})

    with pytest.raises(ValueError, match=error):
        call(device)
    assert call("meta")[0].is_meta


def test_lif_node_with_a_tensor_tau_on_meta():
    """LIFNode(tau=<tensor>) built under torch.device("meta"): the constructor's value check
    read the meta tensor ("Tensor.item() cannot be called on meta tensors"; found by the
    mutation audit, 2026-12-05)."""
    with torch.device("meta"):
        node = neuron.LIFNode(tau=torch.full((5,), 2.0), step_mode="m")
        x = torch.randn(4, 2, 5, requires_grad=True)
    assert node.tau.is_meta
    y = node(x)
    assert y.is_meta and y.shape == (4, 2, 5)
    y.sum().backward()
    assert x.grad.is_meta and x.grad.shape == x.shape
