"""pypaper.snn.DelayedLinear: regressions found in the 2026-12-05 review (the layer's life cycle:
sigma set under inference mode, a rounded state loaded into a layer that was training)."""
import copy

import pytest
import torch

import pypaper
from pypaper.snn import DelayedLinear

HAVE_OP = pypaper._ext.LOADED and hasattr(torch.ops.pypaper, "delay_linear")


@pytest.mark.skipif(not HAVE_OP, reason="pypaper._C without the delay ops")
@pytest.mark.parametrize("action", ["set_sigma", "round_delays", "load_state_dict",
                                    "reset_parameters"])
def test_sigma_set_under_inference_mode_still_trains(action, monkeypatch):
    """Every way the layer's sigma changes (set_sigma, round_delays, load_state_dict,
    reset_parameters) made its sigma tensor anew; done inside torch.inference_mode() (an
    evaluation loop, a hook that runs in it) that tensor was an inference tensor, and every
    later training step on the C++ op, which saves sigma for its backward, raised "Inference
    tensors cannot be saved for backward". The layer's parameters are ordinary tensors there,
    so training must go on as if the call had been made outside."""
    monkeypatch.setenv("PYPAPER_DELAY_PATH", "gather")
    torch.manual_seed(0)
    layer = DelayedLinear(3, 4, 6, dtype=torch.float64)
    layer.set_sigma(1.3)  # off every value an action sets (reset_parameters: sigma_init 2)
    twin = copy.deepcopy(layer)
    state = DelayedLinear(3, 4, 6, sigma_init=0.7, dtype=torch.float64).state_dict()
    x = torch.randn(7, 2, 3, dtype=torch.float64)

    def act(m):
        if action == "set_sigma":
            m.set_sigma(0.9)
        elif action == "round_delays":
            m.round_delays()
        elif action == "load_state_dict":
            m.load_state_dict(state)
        else:
            m.reset_parameters()

    torch.manual_seed(1)
    with torch.inference_mode():
        act(layer)
    torch.manual_seed(1)
    act(twin)  # the same call outside inference mode
    # the call did change sigma (in either mode), so a new sigma tensor was made in both
    want_sigma = {"set_sigma": 0.9, "round_delays": 0.0, "load_state_dict": 0.7,
                  "reset_parameters": 2.0}[action]
    assert layer.sigma == twin.sigma == want_sigma
    params = [p for p in layer.parameters() if p.requires_grad]
    twin_params = [p for p in twin.parameters() if p.requires_grad]
    assert len(params) == len(twin_params) == (2 if action == "round_delays" else 3)
    grads = torch.autograd.grad(layer(x).square().sum(), params)
    want = torch.autograd.grad(twin(x).square().sum(), twin_params)
    for g, w in zip(grads, want):
        assert torch.equal(g, w)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_loading_a_rounded_state_into_a_training_layer_freezes_its_delays(backend, monkeypatch):
    """Resuming from a rounded checkpoint (the best model after round_delays()) into the layer
    that was training: set_extra_state froze the positions (requires_grad False) but kept their
    .grad, so an optimizer whose zero_grad zeroes rather than clears (set_to_none=False) still
    stepped them, and Adam's momentum moved them off the integers (the delays changed), the
    bug round_delays() fixed by clearing .grad. Loading now clears it as round_delays() does."""
    if backend == "cpu" and not HAVE_OP:
        pytest.skip("pypaper._C without the delay ops")
    monkeypatch.delenv("PYPAPER_DELAY_PATH", raising=False)
    torch.manual_seed(0)
    layer = DelayedLinear(8, 4, max_delay=6)
    opt = torch.optim.Adam(layer.parameters(), lr=0.15)
    x = torch.randn(12, 3, 8)
    with pypaper.use_backend(backend):
        for _ in range(5):
            opt.zero_grad(set_to_none=False)
            layer(x).square().mean().backward()
            opt.step()
        rounded = copy.deepcopy(layer).round_delays()
        layer.load_state_dict(rounded.state_dict())
        assert layer.finalized and not layer.position.requires_grad
        positions = layer.position.detach().clone()
        weight = layer.weight.detach().clone()
        for _ in range(10):
            opt.zero_grad(set_to_none=False)
            layer(x).square().mean().backward()
            opt.step()
    assert torch.equal(layer.position, positions)  # the rounded delays stay where they were
    assert layer.position.grad is None
    assert not torch.equal(layer.weight, weight)  # the weights did train
