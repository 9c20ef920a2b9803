"""A user who swapped SpikingJelly's neurons for pypaper's, in a training loop (review s32):
serialization of a model mid-sequence, inference-mode passes followed by training, and the
errors a misused step mode gives. Each test failed before its fix."""
import copy
import io
import pickle

import pytest
import torch
from torch import nn

from pypaper import _ext
from pypaper.snn import functional, layer, neuron

pytestmark = pytest.mark.skipif(not _ext.LOADED, reason="pypaper._C not built")


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 6),
        neuron.ParametricLIFNode(step_mode="m", tau_shape=(6,), learnable_threshold=True,
                                 threshold_shape=(6,)),
        nn.Linear(6, 3), neuron.LIFNode(step_mode="m", store_v_seq=True))


def test_deepcopy_of_a_model_mid_sequence():
    """copy.deepcopy(model) between a forward and the next reset (a "best model" snapshot, an
    AveragedModel / EMA copy) raised "Only Tensors created explicitly by the user (graph leaves)
    support the deepcopy protocol": the carried membrane v (and v_seq) is a non-leaf of the
    call's graph. The copy now holds the state's values detached (a graph cannot be copied),
    continues exactly as the original, and the original still backpropagates."""
    model = _model()
    x = torch.randn(2, 5, 2, 4)
    model(x[0])
    twin = copy.deepcopy(model)
    for a, b in zip(model.modules(), twin.modules()):
        if isinstance(a, neuron.BaseNode):
            assert torch.equal(a.v, b.v) and not b.v.requires_grad
            assert b.v.data_ptr() != a.v.data_ptr()  # a copy, not a view of the original
    assert torch.equal(model[3].v_seq, twin[3].v_seq) and not twin[3].v_seq.requires_grad
    y, y_twin = model(x[1]), twin(x[1])
    assert torch.equal(y, y_twin)
    y.sum().backward()  # through both calls of the original
    assert model[1].w.grad is not None
    # pickling (torch.save of a whole model) stores the same detached values
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert torch.equal(loaded[1].v, model[1].v) and not loaded[1].v.requires_grad
    again = pickle.loads(pickle.dumps(model))
    assert torch.equal(again[3].v, model[3].v) and not again[3].v.requires_grad
    # a leaf state the user owns (a learnable initial membrane) is copied as a leaf
    lif = neuron.LIFNode()
    lif.v = nn.Parameter(torch.zeros(2, 3))
    assert isinstance(copy.deepcopy(lif).v, nn.Parameter)


def test_dropout_mask_drawn_under_inference_mode_then_training():
    """A train-mode pass under torch.inference_mode (a quick metric) drew Dropout's mask as an
    inference tensor; the next training pass without reset multiplied by it and failed with
    "Inference tensors cannot be saved for backward" (y = x * mask keeps mask for dL/dx),
    while the neurons beside it continue from their inference-mode membrane. The mask now
    continues too, as a normal tensor with the same values."""
    torch.manual_seed(0)
    net = nn.Sequential(layer.Linear(4, 6, step_mode="m"), layer.Dropout(0.5, step_mode="m"),
                        neuron.LIFNode(step_mode="m"))
    x = torch.randn(3, 2, 4)
    with torch.inference_mode():
        net(x)
    mask = net[1].mask.clone()
    net(x).sum().backward()
    assert torch.equal(net[1].mask, mask)  # the same mask held over the sequence
    assert net[0].weight.grad is not None
    # single-step mode as well
    functional.reset_net(net)
    functional.set_step_mode(net, "s")
    with torch.inference_mode():
        net(x[0])
    net(x[1]).sum().backward()


def test_sequence_fed_to_a_single_step_neuron_names_the_step_mode():
    """A sequence [T, N, C] fed to a per-neuron PLIF left in step_mode 's' (set_step_mode
    forgotten) raised an error about x.shape[2:] = (N, C): the shapes of the op's internal
    [1, T, N, C] tensor, not of the user's x (whose x.shape[2:] is (C,)). It now names the step
    mode, the user's x and what each mode expects."""
    node = neuron.ParametricLIFNode(tau_shape=(6,))
    with pytest.raises(ValueError) as info:
        node(torch.randn(3, 2, 6))
    msg = str(info.value)
    assert "x.shape[2:] = (2, 6)" not in msg
    assert "step_mode 's'" in msg and "(3, 2, 6)" in msg and "[T, N, *]" in msg


@pytest.mark.parametrize("make", [
    lambda: neuron.ParametricLIFNode(step_mode="m", tau_shape=(6,)),
    lambda: neuron.LIFNode(step_mode="m", tau=torch.full((6,), 3.0)),
    lambda: neuron.IFNode(step_mode="m", learnable_threshold=True, threshold_shape=(6,)),
], ids=["plif_tau_shape", "lif_tensor_tau", "if_threshold_shape"])
def test_per_neuron_parameters_refuse_a_batch_without_time_dim(make):
    """[N, C] fed to a step_mode 'm' neuron whose per-neuron parameters have the feature shape
    (C,) ran silently: x was read as [T = N, N' = C] and the (C,) parameter as one value per
    sample (the per-sample form set_threshold_margin assigns), so the samples of the batch
    became time steps of one another. A parameter of the per-neuron shape the constructor
    declared is one per neuron: it must equal the feature shape x.shape[2:]."""
    node = make()
    with pytest.raises(ValueError,
                       match=r"step_mode 'm' got x of shape \(2, 6\).*\[T, N, \*\]"):
        node(torch.randn(2, 6))
    assert node(torch.randn(3, 2, 6)).shape == (3, 2, 6)  # a sequence is fine


def test_set_threshold_margin_still_per_sample():
    """The per-sample form stays for a tensor assigned after construction
    (functional.set_threshold_margin's [N, C] threshold), also on a threshold_shape buffer."""
    lab = torch.nn.functional.one_hot(torch.tensor([1, 0]), 3).float()
    for node in (neuron.LIFNode(step_mode="m", tau=torch.full((3,), 2.0)),
                 neuron.LIFNode(step_mode="m", threshold_shape=(3,))):
        functional.set_threshold_margin(node, lab)
        assert node(torch.rand(4, 2, 3)).shape == (4, 2, 3)


class _AdaptiveLIF(neuron.LIFNode):
    """A neuron with a state of its own (an adaptive threshold offset, register_memory), as a
    SpikingJelly user subclasses a node."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.register_memory("a", torch.zeros(3))

    def single_step_forward(self, x):
        y = super().single_step_forward(x - self.a)
        self.a = 0.9 * self.a + y.mean(0)  # a += spikes, decaying
        return y


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_dtype_move_converts_registered_memory_reset_values(dtype):
    """model.to(dtype) converted a registered memory's current value but not its reset value,
    so reset_net() after the move put it back in float32 (on another device after .cuda()):
    the next step computed x - a in float32, and a bfloat16 model returned float32 spikes.
    SpikingJelly's MemoryModule._apply converts the reset values too."""
    node = _AdaptiveLIF()
    node(torch.rand(2, 3) * 3)
    node.to(dtype)
    functional.reset_net(node)
    assert node.a.dtype == dtype and torch.equal(node.a, torch.zeros(3, dtype=dtype))
    assert node(torch.rand(2, 3, dtype=dtype) * 3).dtype == dtype
    assert node.a.dtype == dtype


@pytest.mark.parametrize("step_mode", ["m", "s"])
def test_forgetting_reset_net_between_batches_names_the_membrane(step_mode):
    """Batch 2 of the same size without reset_net: its forward starts from batch 1's membrane,
    whose graph batch 1's backward freed. torch's 'backward through the graph a second time'
    named neither the state nor the fix; the message now ends with reset_net / detach_net."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), neuron.LIFNode(tau=2.0, step_mode=step_mode))

    def run(x):
        if step_mode == "m":
            return model(x)
        return torch.stack([model(x[t]) for t in range(x.shape[0])])

    run(torch.rand(3, 2, 5) * 2).sum().backward()
    with pytest.raises(RuntimeError, match=r"second time(.|\n)*reset_net(.|\n)*detach_net"):
        run(torch.rand(3, 2, 5) * 2).sum().backward()
    functional.reset_net(model)  # the fixes the message names: reset_net ...
    run(torch.rand(3, 2, 5) * 2).sum().backward()
    functional.detach_net(model)  # ... or detach_net: the state kept without its graph
    run(torch.rand(3, 2, 5) * 2).sum().backward()
