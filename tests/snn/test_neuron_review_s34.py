"""Review s34: pypaper.snn's neurons inside real training setups (torch.compile, inference_mode,
autocast, torch.func, state across calls). Each test failed before its fix."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from pypaper.snn import functional, neuron


def _net(kind: str) -> nn.Sequential:
    torch.manual_seed(1)
    if kind == "plif":
        node = neuron.ParametricLIFNode(step_mode="m", tau_shape=(6,), learnable_threshold=True,
                                        threshold_shape=(6,))
    elif kind == "sltt":
        node = neuron.LIFNode(step_mode="m", sltt=True, detach_reset=True)
    else:
        node = neuron.LIFNode(step_mode="m")
    return nn.Sequential(nn.Linear(4, 6), node, nn.Linear(6, 2), neuron.IFNode(step_mode="m"))


@pytest.mark.parametrize("kind", ["lif", "plif", "sltt"])
@pytest.mark.parametrize("eval_compiled", [True, False])
def test_compiled_training_after_inference_mode_call_keeps_membrane(kind, eval_compiled):
    """A validation call under torch.inference_mode (Lightning's default) left the membrane as an
    inference tensor; the next compiled training call (no reset in between, same batch size)
    failed with "Inference tensors cannot be saved for backward" (the CPU op saves v_init for
    its recomputing backward). Eager calls copied it already; SpikingJelly runs both."""
    torch._dynamo.reset()
    net, ref = _net(kind), _net(kind)
    compiled = torch.compile(net, backend="aot_eager", fullgraph=True)
    x = torch.randn(5, 3, 4)
    for _ in range(2):
        with torch.inference_mode():
            out = compiled(x) if eval_compiled else net(x)
            assert torch.equal(out, ref(x))
        xr, xr_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
        y, y_ref = compiled(xr), ref(xr_ref)
        (y.pow(2).sum() + net[1].v.sum()).backward()
        (y_ref.pow(2).sum() + ref[1].v.sum()).backward()
        torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
        torch.testing.assert_close(xr.grad, xr_ref.grad)
        for p, q in zip(net.parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad)
        functional.detach_net(net)
        functional.detach_net(ref)
    torch._dynamo.reset()


@pytest.mark.parametrize("mode", ["m", "s"])
@pytest.mark.parametrize("make", [
    lambda mode: neuron.ParametricLIFNode(step_mode=mode),
    lambda mode: neuron.LIFNode(step_mode=mode, learnable_threshold=True, threshold_shape=(3,)),
    lambda mode: neuron.IFNode(step_mode=mode, v_reset=None, learnable_threshold=True),
])
def test_inference_tensor_input_to_neuron_with_trained_parameters(make, mode):
    """Features made under torch.inference_mode (a frozen backbone) fed straight into a neuron
    whose tau or threshold trains: the CPU op saved x itself for its recomputing backward and
    autograd refused the inference tensor; SpikingJelly (and the GPU kernels, which keep H) ran.
    Gradients equal those of the same input as a normal tensor."""
    torch.manual_seed(0)
    with torch.inference_mode():
        x_inf = torch.randn(4, 2, 3) * 2
    x = x_inf.clone()
    grads = []
    for inp in (x_inf, x):
        node = make(mode)
        y = node(inp) if mode == "m" else torch.stack([node(inp[t]) for t in range(4)])
        (y * torch.arange(1.0, 4.0)).sum().backward()
        grads.append([p.grad for p in node.parameters()])
    for g_inf, g in zip(*grads):
        torch.testing.assert_close(g_inf, g, rtol=0, atol=0)


def test_repr_of_plif_built_on_meta_device():
    """print(model) of a model built under torch.device("meta") (deferred init) raised in
    ParametricLIFNode.extra_repr ("Tensor.item() cannot be called on meta tensors"); other
    neurons and SpikingJelly's PLIF print. A materialized node still shows its tau."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(3, 4), neuron.ParametricLIFNode(init_tau=3.0),
                              neuron.LIFNode(tau=torch.full((4,), 2.0)),
                              neuron.IFNode(learnable_threshold=True))
    text = repr(model)
    assert "ParametricLIFNode" in text and "tau=shape () (meta)" in text
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        model[1].w.fill_(-torch.log(torch.tensor(2.0)).item())  # tau = 3
    assert "tau=3.0" in repr(model[1])
