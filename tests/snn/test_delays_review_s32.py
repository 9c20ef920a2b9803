"""pypaper.snn.DelayedLinear: regressions found in review s32 (a user's life cycle of the layer:
building it under a device context, the sigma schedule's arguments, ...)."""
import pytest
import torch
from torch import nn

import pypaper
from pypaper.snn import DelayedLinear
from pypaper.snn import delays as D
from pypaper.snn import delays_reference as R

HAVE_OP = pypaper._ext.LOADED and hasattr(torch.ops.pypaper, "delay_linear")
needs_op = pytest.mark.skipif(not HAVE_OP, reason="pypaper._C without the delay ops")


@needs_op
@pytest.mark.parametrize("path", ["gather", "dense"])
def test_layer_built_under_a_meta_device_context_computes_on_the_cpu(path, monkeypatch):
    """The deferred-initialisation pattern: build under ``with torch.device('meta')`` (no memory
    for the parameters), ``to_empty(device='cpu')``, initialise the parameters by hand. The
    layer's sigma tensor, made by torch.tensor under the context, was a meta tensor that
    to_empty does not move (a plain attribute, not a buffer); the C++ op, given the CPU x,
    weight, position and that meta sigma, was dispatched to its Meta (fake) kernel, which
    returned an uninitialised CPU tensor: a silent garbage output (values ~1e31). The sigma
    tensor is a CPU tensor whatever the default device, and the fake kernel refuses to stand in
    for a real tensor of another device."""
    monkeypatch.setenv("PYPAPER_DELAY_PATH", path)
    torch.manual_seed(0)
    with torch.device("meta"):
        layer = DelayedLinear(3, 4, 5, sigma_init=1.3)
    layer.to_empty(device="cpu")
    with torch.no_grad():
        torch.nn.init.normal_(layer.weight)
        layer.position.uniform_(0, 4)
        layer.bias.normal_()
    x = torch.randn(6, 2, 3)
    want = R.delayed_linear(x, layer.weight, layer.position, layer.bias, 5, 1.3)
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    with torch.device("meta"):  # a sigma set under the context (a schedule step) too
        layer.set_sigma(0.6)
    want = R.delayed_linear(x, layer.weight, layer.position, layer.bias, 5, 0.6)
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)


@needs_op
def test_op_with_a_meta_tensor_among_cpu_inputs_raises():
    """The op called directly with CPU x and a meta sigma (or weight): the dispatcher picks the
    Meta kernel for the mixed inputs; it must raise naming the argument, not return an
    uninitialised CPU tensor."""
    x, w, p = torch.randn(4, 2, 3), torch.randn(2, 3), torch.rand(2, 3) * 3
    sigma = torch.tensor(0.5, dtype=torch.float64)
    with pytest.raises((RuntimeError, ValueError), match="sigma"):
        torch.ops.pypaper.delay_linear(x, w, p, None, 4, sigma.to("meta"))
    with pytest.raises((RuntimeError, ValueError), match="weight"):
        torch.ops.pypaper.delay_linear(x, w.to("meta"), p, None, 4, sigma)
    gy = torch.randn(4, 2, 2)
    with pytest.raises((RuntimeError, ValueError), match="sigma"):
        torch.ops.pypaper.delay_linear_backward(gy, x, w, p, 4, sigma.to("meta"), True, True,
                                                True, True)
    # a whole meta call (shape inference, .to('meta') models) still works
    y = torch.ops.pypaper.delay_linear(x.to("meta"), w.to("meta"), p.to("meta"), None, 4, sigma)
    assert y.device.type == "meta" and y.shape == (4, 2, 2)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_sigma_attribute_cannot_undo_round_delays(backend):
    """A schedule loop written with the attribute (``layer.sigma = sigma_schedule(...)``) that
    goes on after round_delays() (fine-tuning the weights on the rounded delays, as SNN-delays'
    fine_tune does): set_sigma refused it, the attribute took it silently and the layer spread
    each frozen integer delay over a Gaussian again (output off the integer shift by O(1)),
    while ``finalized`` and the saved state still said rounded. The attribute now refuses any
    sigma but 0 on a rounded layer; reset_parameters() and loading a training state, which
    unround the layer, still set their sigma."""
    if backend == "cpu" and not HAVE_OP:
        pytest.skip("pypaper._C without the delay ops")
    torch.manual_seed(0)
    layer = DelayedLinear(3, 4, 6, dtype=torch.float64)
    training_state = DelayedLinear(3, 4, 6, sigma_init=0.8, dtype=torch.float64).state_dict()
    layer.round_delays()
    x = torch.randn(9, 2, 3, dtype=torch.float64)
    with pypaper.use_backend(backend):
        want = layer(x)
        # the integer shift: one tap per synapse at its rounded delay
        torch.testing.assert_close(
            want, R.delayed_linear(x, layer.weight, layer.position, layer.bias, 6, 0.0),
            rtol=0, atol=1e-12)
        with pytest.raises(RuntimeError, match="rounded.*sigma is fixed at 0"):
            layer.sigma = 0.5
        assert layer.sigma == 0.0 and layer.finalized
        assert torch.equal(layer(x), want)
        layer.sigma = 0.0  # the value it has: allowed
        layer.load_state_dict(training_state)  # a training state unrounds it
        assert not layer.finalized and layer.sigma == 0.8 and layer.position.requires_grad
        layer.round_delays()
        layer.reset_parameters()  # so does reset_parameters
        assert not layer.finalized and layer.sigma == layer.sigma_init
        layer.sigma = 0.5
        assert layer.sigma == 0.5


def test_sigma_schedule_names_an_infinite_end_point():
    """sigma_schedule(e, epochs, inf) returned inf at epoch 0 and inf * 0 = nan after it; the
    error came later from set_sigma, naming "sigma" with the value nan, not the schedule's
    argument."""
    for e in (0, 3):
        with pytest.raises(ValueError, match="sigma_init must be finite and > 0, got inf"):
            D.sigma_schedule(e, 10, float("inf"))
        with pytest.raises(ValueError, match="sigma_final must be finite and > 0, got inf"):
            D.sigma_schedule(e, 10, 2.0, float("inf"))
    with pytest.raises(ValueError, match="sigma_init must be finite and > 0, got nan"):
        D.sigma_schedule(1, 10, float("nan"))
    with pytest.raises(ValueError, match="sigma_final must be finite and > 0, got -0.5"):
        D.sigma_schedule(1, 10, 2.0, -0.5)
    assert D.sigma_schedule(5, 10, 2.0) == pytest.approx(0.5)  # decayed over epochs // 2


def test_functional_non_tensor_parameters_are_named():
    """delayed_linear with a list (or a number) for weight, position or bias raised an
    AttributeError ('list' object has no attribute 'dim') naming nothing."""
    x = torch.randn(4, 2, 3)
    w, p, b = torch.randn(2, 3), torch.rand(2, 3) * 3, torch.randn(2)
    for name, args in (("weight", (w.tolist(), p, b)), ("position", (w, p.tolist(), b)),
                       ("bias", (w, p, 0.5))):
        with pytest.raises(TypeError, match=f"{name} must be a torch.Tensor, got"):
            D.delayed_linear(x, *args, max_delay=4, sigma=0.5)


def test_state_dict_saves_with_safetensors_and_loads_rounded(tmp_path):
    """safetensors stores tensors only: the layer's extra state (sigma, finalized, max_delay) is
    one float64 tensor, so a model saves as Hugging Face's save_pretrained does, and a rounded
    layer loads rounded (dropping the entry to save it loaded sigma_init and learnable delays)."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    torch.manual_seed(0)
    src = nn.Sequential(DelayedLinear(4, 3, 6), DelayedLinear(3, 2, 5))
    src[0].round_delays()
    src[1].set_sigma(0.7)
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file(src.state_dict(), str(path))
    dst = nn.Sequential(DelayedLinear(4, 3, 6), DelayedLinear(3, 2, 5))
    dst.load_state_dict(safetensors_torch.load_file(str(path)))
    assert dst[0].finalized and dst[0].sigma == 0 and not dst[0].position.requires_grad
    assert not dst[1].finalized and dst[1].sigma == 0.7
    x = torch.randn(7, 2, 4)
    assert torch.equal(dst(x), src(x))
    bad = src.state_dict()
    bad["0._extra_state"] = torch.zeros(2, dtype=torch.float64)
    with pytest.raises(ValueError, match="sigma, finalized, max_delay"):
        dst.load_state_dict(bad)
