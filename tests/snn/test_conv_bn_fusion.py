"""pypaper.snn.functional.conv_bn_fusion (pypaper/snn/conv_bn_fusion.py): SpikingJelly 2.0's
fuse_conv_bn_eval_modules / pack_conv_bn_train_modules on models with pypaper's layers and
neurons (SpikingJelly's own stop with fx's TraceError there), checked against the unfused model,
and against SpikingJelly's functions on a model SpikingJelly can trace."""
import copy
import importlib.util

import pytest
import torch
from torch import nn

from pypaper.snn import functional, layer, neuron
from pypaper.snn.conv_bn_fusion import PackedConvBN
from pypaper.snn.functional.conv_bn_fusion import (fuse_conv_bn_eval_modules,
                                                   pack_conv_bn_train_modules)

needs_sj = pytest.mark.skipif(importlib.util.find_spec("spikingjelly") is None,
                              reason="spikingjelly is not installed")


def _randomize_bn(net):
    """Running statistics and affine parameters away from the identity, so a missed or wrong
    fusion changes the output."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                if m.affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.3, 0.3)


def _count(net, cls):
    return sum(isinstance(m, cls) for m in net.modules())


class _Block(nn.Module):
    """A residual block with its own forward (SpikingJelly's model zoo style): conv1 -> bn1 ->
    sn1 -> conv2 -> bn2, plus the input, -> sn2."""

    def __init__(self, c, step_mode):
        super().__init__()
        self.conv1 = layer.Conv2d(c, c, 3, padding=1, bias=False, step_mode=step_mode)
        self.bn1 = layer.BatchNorm2d(c, step_mode=step_mode)
        self.sn1 = neuron.LIFNode(v_threshold=0.2, step_mode=step_mode)
        self.conv2 = layer.Conv2d(c, c, 3, padding=1, step_mode=step_mode)
        self.bn2 = layer.BatchNorm2d(c, step_mode=step_mode)
        self.sn2 = neuron.IFNode(v_threshold=0.5, step_mode=step_mode)

    def forward(self, x):
        return self.sn2(self.bn2(self.conv2(self.sn1(self.bn1(self.conv1(x))))) + x)


def _inputs(step_mode, *shape):
    torch.manual_seed(1)
    return torch.rand(3, *shape) * 2 if step_mode == "m" else torch.rand(*shape) * 2


@pytest.mark.parametrize("step_mode", ["s", "m"])
def test_eval_fusion_of_a_custom_forward_block(step_mode):
    torch.manual_seed(0)
    net = nn.Sequential(layer.Conv2d(2, 4, 3, padding=1, step_mode=step_mode),
                        layer.BatchNorm2d(4, step_mode=step_mode),
                        neuron.ParametricLIFNode(step_mode=step_mode), _Block(4, step_mode))
    _randomize_bn(net)
    net.eval()
    x = _inputs(step_mode, 2, 2, 5, 5)
    want = net(x)
    functional.reset_net(net)
    fused = fuse_conv_bn_eval_modules(net)
    assert _count(fused, nn.BatchNorm2d) == 0
    got = fused(x)
    torch.testing.assert_close(got, want)
    assert 0 < want.mean() < 1  # some spiked, some not: the comparison says something
    # the model passed in is unchanged: its BatchNorms are still there and run
    assert _count(net, nn.BatchNorm2d) == 3
    functional.reset_net(net)
    torch.testing.assert_close(net(x), want)


def test_neurons_are_shared_with_the_model():
    """The fused model holds the model's own neurons (their state too): reset_net on either
    resets both, as SpikingJelly's GraphModule does."""
    net = nn.Sequential(layer.Conv2d(1, 2, 3), layer.BatchNorm2d(2), neuron.LIFNode()).eval()
    fused = fuse_conv_bn_eval_modules(net)
    fused(torch.rand(1, 1, 4, 4) * 3)
    assert isinstance(net[2].v, torch.Tensor)
    functional.reset_net(fused)
    assert net[2].v == 0.0


def test_pairs_inside_a_sequence_container_are_fused():
    """SeqToANNContainer(Conv2d, BatchNorm2d) (SpikingJelly's older model style) is a leaf of
    the trace; its consecutive pairs are fused in a copy of it, nested Sequentials included."""
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    net = nn.Sequential(layer.SeqToANNContainer(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4),
                                                nn.ReLU(), inner),
                        neuron.LIFNode(step_mode="m"))
    _randomize_bn(net)
    net.eval()
    x = _inputs("m", 2, 2, 4, 4)
    want = net(x)
    functional.reset_net(net)
    fused = fuse_conv_bn_eval_modules(net)
    assert _count(fused, nn.BatchNorm2d) == 0
    torch.testing.assert_close(fused(x), want)
    # the container's own output (the neuron's input), not only the spikes
    torch.testing.assert_close(fused.get_submodule("0")(x), net[0](x))
    assert _count(net, nn.BatchNorm2d) == 2 and isinstance(net[0][1], nn.BatchNorm2d)
    assert isinstance(inner[1], nn.BatchNorm2d)


def test_a_model_that_is_itself_a_step_module():
    """The model passed in is itself a step module fx cannot trace (it raised TraceError /
    ValueError before 2026-12-05): a container comes back as a fused copy of its class; a
    layer or neuron, and any module in training mode, as itself."""
    torch.manual_seed(0)
    net = layer.SeqToANNContainer(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                  nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)))
    _randomize_bn(net)
    x = _inputs("m", 2, 2, 4, 4)
    want = net.eval()(x)
    fused = fuse_conv_bn_eval_modules(net)
    assert type(fused) is layer.SeqToANNContainer and fused is not net
    assert _count(fused, nn.BatchNorm2d) == 0 and _count(net, nn.BatchNorm2d) == 2
    torch.testing.assert_close(fused(x), want)
    assert pack_conv_bn_train_modules(net.train()) is net
    for leaf in (layer.Conv2d(2, 4, 3, step_mode="m"), neuron.LIFNode(step_mode="m")):
        assert fuse_conv_bn_eval_modules(leaf.eval()) is leaf
        assert pack_conv_bn_train_modules(leaf.train()) is leaf


def test_a_conv_whose_output_is_used_elsewhere_is_not_fused():
    class TwoUses(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = layer.Conv2d(2, 2, 1)
            self.bn = layer.BatchNorm2d(2)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    torch.manual_seed(0)
    net = TwoUses()
    _randomize_bn(net)
    net.eval()
    x = torch.rand(2, 2, 3, 3)
    fused = fuse_conv_bn_eval_modules(net)
    assert _count(fused, nn.BatchNorm2d) == 1
    torch.testing.assert_close(fused(x), net(x))


def test_bad_models_raise():
    net = nn.Sequential(layer.Conv2d(1, 2, 3), layer.BatchNorm2d(2), neuron.IFNode())
    with pytest.raises(ValueError, match="eval"):
        fuse_conv_bn_eval_modules(net.train())
    with pytest.raises(ValueError, match="train"):
        pack_conv_bn_train_modules(net.eval())
    no_stats = nn.Sequential(layer.Conv2d(1, 2, 3), layer.BatchNorm2d(2,
                                                                      track_running_stats=False))
    with pytest.raises(ValueError, match="running statistics"):
        fuse_conv_bn_eval_modules(no_stats.eval())


@pytest.mark.parametrize("step_mode", ["s", "m"])
def test_train_packing_gives_the_same_training_step(step_mode):
    """Packed pairs: the same outputs, gradients and running statistics as the model, with the
    model's own parameters (an optimizer built on either trains both)."""
    torch.manual_seed(0)
    net = nn.Sequential(layer.Conv1d(2, 3, 3, padding=1, step_mode=step_mode),
                        layer.BatchNorm1d(3, step_mode=step_mode),
                        neuron.LIFNode(step_mode=step_mode), _Block1d(3, step_mode))
    ref = copy.deepcopy(net)
    packed = pack_conv_bn_train_modules(net)
    assert _count(packed, PackedConvBN) == 2
    assert {id(p) for p in packed.parameters()} == {id(p) for p in net.parameters()}
    x = _inputs(step_mode, 4, 2, 6)
    out, want = packed(x), ref(x)
    torch.testing.assert_close(out, want)
    out.sum().backward()
    want.sum().backward()
    for (name, p), q in zip(net.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    for a, b in zip(net.buffers(), ref.buffers()):
        torch.testing.assert_close(a, b)
    assert net[0].step_mode == step_mode  # the packed call puts the step modes back


class _Block1d(nn.Module):
    def __init__(self, c, step_mode):
        super().__init__()
        self.conv = layer.Conv1d(c, c, 3, padding=1, step_mode=step_mode)
        self.bn = layer.BatchNorm1d(c, step_mode=step_mode)
        self.sn = neuron.IFNode(step_mode=step_mode)

    def forward(self, x):
        return self.sn(self.bn(self.conv(x)) + x)


@needs_sj
@pytest.mark.parametrize("step_mode", ["s", "m"])
def test_same_result_as_spikingjellys_fusion_on_its_own_model(step_mode):
    """On a model of SpikingJelly's layers and neurons (which its fusion can trace) both
    functions give the same model outputs."""
    from spikingjelly.activation_based import functional as sj_functional
    from spikingjelly.activation_based import layer as sj_layer
    from spikingjelly.activation_based import neuron as sj_neuron
    from spikingjelly.activation_based.functional import conv_bn_fusion as sj_fusion

    torch.manual_seed(0)
    net = nn.Sequential(sj_layer.Conv2d(2, 4, 3, padding=1), sj_layer.BatchNorm2d(4),
                        sj_neuron.LIFNode(), sj_layer.Conv2d(4, 4, 1), sj_layer.BatchNorm2d(4),
                        sj_neuron.IFNode())
    sj_functional.set_step_mode(net, step_mode)
    _randomize_bn(net)
    net.eval()
    x = _inputs(step_mode, 2, 2, 4, 4)
    theirs = sj_fusion.fuse_conv_bn_eval_modules(net)
    ours = fuse_conv_bn_eval_modules(net)
    assert _count(ours, nn.BatchNorm2d) == 0 and _count(theirs, nn.BatchNorm2d) == 0
    want = theirs(x)
    sj_functional.reset_net(net)
    torch.testing.assert_close(ours(x), want)


class _SharedConv(nn.Module):
    """One convolution called twice (weights shared, e.g. over two inputs): ``second`` picks what
    its second call feeds, another batch norm ("bn") or nothing (None)."""

    def __init__(self, second):
        super().__init__()
        self.conv = layer.Conv2d(2, 2, 1)
        self.bn1 = layer.BatchNorm2d(2)
        self.bn2 = layer.BatchNorm2d(2) if second == "bn" else None

    def forward(self, x):
        y = self.conv(x * 0.5)
        return self.bn1(self.conv(x)) + (self.bn2(y) if self.bn2 is not None else y)


@pytest.mark.parametrize("second", ["bn", None])
def test_a_conv_called_twice_is_fused_only_when_every_call_feeds_the_same_bn(second):
    """The convolution is one module: folding one batch norm into it changes all its calls, so a
    conv whose calls feed two different batch norms, or one call none, stays unfused."""
    torch.manual_seed(0)
    net = _SharedConv(second)
    _randomize_bn(net)
    net.eval()
    x = torch.rand(2, 2, 3, 3)
    fused = fuse_conv_bn_eval_modules(net)
    assert _count(fused, nn.BatchNorm2d) == _count(net, nn.BatchNorm2d)
    torch.testing.assert_close(fused(x), net(x))


@pytest.mark.parametrize("which", ["conv", "bn"])
def test_a_forward_set_on_the_instance_is_not_fused(which):
    """A forward assigned to the module object (not its class: a patch, a wrapper) computes
    something else than the layer's own: the pair is left as it is."""
    torch.manual_seed(0)
    net = nn.Sequential(layer.Conv2d(2, 3, 3, padding=1), layer.BatchNorm2d(3))
    _randomize_bn(net)
    net.eval()
    m = net[0] if which == "conv" else net[1]
    plain = m.forward
    m.forward = lambda x: plain(x) * 2.0 + 0.25
    x = torch.rand(2, 2, 4, 4)
    fused = fuse_conv_bn_eval_modules(net)
    assert _count(fused, nn.BatchNorm2d) == 1
    torch.testing.assert_close(fused(x), net(x))
