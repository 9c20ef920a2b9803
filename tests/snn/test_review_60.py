"""Review of the 2026-12-05 snn changes (helper-60): each test fails without its fix.

- layer.Dropout in eval mode passes an empty sequence (T = 0) through, as before the explicit-
  state API and as SpikingJelly's: the new code indexed x_seq[0] before looking at training.
- functional.conv_bn_fusion fuses / packs only convolutions and batch norms that compute what
  torch's layers compute: a conv with a weight of its own (SpikingJelly's WSConv2d, a subclass
  overriding _conv_forward) or a batch norm overriding super_forward / forward came out with
  other outputs, silently.
- functional.conv_bn_fusion traces models with pypaper's DelayedLinear and surrogate modules:
  both are leaves (they have no step_mode, and fx traced into them: TypeError / AssertionError).
"""
import copy
import importlib.util

import pytest
import torch
from torch import nn

from pypaper.snn import functional, layer, neuron, surrogate
from pypaper.snn.conv_bn_fusion import PackedConvBN
from pypaper.snn.delays import DelayedLinear
from pypaper.snn.functional.conv_bn_fusion import (fuse_conv_bn_eval_modules,
                                                   pack_conv_bn_train_modules)

from .test_conv_bn_fusion import _count, _randomize_bn


# ---- Dropout ----------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [layer.Dropout, layer.Dropout2d])
def test_dropout_eval_passes_an_empty_sequence_through(cls):
    d = cls(0.5, step_mode="m").eval()
    x = torch.rand(0, 2, 3, 4, 4)
    assert d(x) is x
    (y,), (mask,) = d.functional_forward((x,), (None,))
    assert y is x and mask is None
    assert d.mask is None


# ---- conv_bn_fusion: layers that are not torch's arithmetic -----------------------------------

class _ScaledBN(layer.BatchNorm2d):
    """A batch norm of its own through SpikingJelly's super_forward hook (both step modes)."""

    def super_forward(self, x):
        return 2.0 * super().super_forward(x) - 0.25


class _NormedConv(layer.Conv2d):
    """Weight of unit norm per output channel in _conv_forward (weight-normalization style: the
    per-channel scale a fusion folds into the weight is normalized away)."""

    def _conv_forward(self, x, weight, bias):
        return super()._conv_forward(x, weight / weight.square().sum((1, 2, 3), keepdim=True).sqrt(), bias)


class _StepScaledBN(layer.BatchNorm2d):
    """A forward whose 'm' result is not its 's' result on [T * N, *] (packing runs 's')."""

    def forward(self, x):
        y = super().forward(x)
        return y * 2.0 if self.step_mode == "m" else y


def _custom_pairs():
    pairs = [(lambda: _NormedConv(2, 4, 3, step_mode="m"),
              lambda: layer.BatchNorm2d(4, step_mode="m")),
             (lambda: layer.Conv2d(2, 4, 3, step_mode="m"), lambda: _ScaledBN(4, step_mode="m"))]
    if importlib.util.find_spec("spikingjelly") is not None:
        from spikingjelly.activation_based import layer as sj_layer
        pairs.append((lambda: sj_layer.WSConv2d(2, 4, 3, step_mode="m"),
                      lambda: sj_layer.BatchNorm2d(4, step_mode="m")))
    return pairs


@pytest.mark.parametrize("pair", range(3))
@pytest.mark.parametrize("container", [False, True])
def test_eval_fusion_leaves_nonstandard_layers_alone(pair, container):
    pairs = _custom_pairs()
    if pair >= len(pairs):
        pytest.skip("spikingjelly is not installed")
    torch.manual_seed(0)
    conv, bn = pairs[pair][0](), pairs[pair][1]()
    if container:  # the same pair inside a leaf container (children in step mode 's')
        conv.step_mode = bn.step_mode = "s"
        net = nn.Sequential(layer.SeqToANNContainer(conv, bn))
    else:
        net = nn.Sequential(conv, bn)
    _randomize_bn(net)
    net.eval()
    x = torch.rand(3, 2, 2, 6, 6) * 2
    fused = fuse_conv_bn_eval_modules(net)
    torch.testing.assert_close(fused(x), net(x))
    assert _count(fused, nn.BatchNorm2d) == 1


def test_train_packing_leaves_a_custom_forward_alone():
    torch.manual_seed(0)
    net = nn.Sequential(layer.Conv2d(2, 4, 3, step_mode="m"), _StepScaledBN(4, step_mode="m"),
                        layer.Conv2d(4, 4, 1, step_mode="m"), layer.BatchNorm2d(4, step_mode="m"))
    ref = copy.deepcopy(net)
    packed = pack_conv_bn_train_modules(net)
    x = torch.rand(3, 2, 2, 6, 6)
    torch.testing.assert_close(packed(x), ref(x))
    assert _count(packed, PackedConvBN) == 1  # the standard pair is still packed


# ---- conv_bn_fusion: pypaper's modules without a step mode -------------------------------------

class _SurrogateReadout(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = layer.Conv1d(2, 4, 3, padding=1, step_mode="m")
        self.bn = layer.BatchNorm1d(4, step_mode="m")
        self.sg = surrogate.ATan()

    def forward(self, x):
        return self.sg(self.bn(self.conv(x)) - 0.5)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_fusion_traces_models_with_delayed_linear_and_surrogates(mode):
    torch.manual_seed(0)
    net = nn.Sequential(layer.Conv1d(2, 4, 3, padding=1, step_mode="m"),
                        layer.BatchNorm1d(4, step_mode="m"), neuron.LIFNode(step_mode="m"),
                        layer.Flatten(step_mode="m"), DelayedLinear(24, 3, max_delay=3))
    _randomize_bn(net)
    x = torch.rand(5, 2, 2, 6) * 2
    if mode == "eval":
        net.eval()
        want = net(x)
        functional.reset_net(net)
        fused = fuse_conv_bn_eval_modules(net)
        assert _count(fused, nn.BatchNorm1d) == 0
    else:
        ref = copy.deepcopy(net)
        want = ref(x)
        fused = pack_conv_bn_train_modules(net)
        assert _count(fused, PackedConvBN) == 1
    torch.testing.assert_close(fused(x), want)
    readout = _SurrogateReadout()
    _randomize_bn(readout)
    readout.eval()
    fused = fuse_conv_bn_eval_modules(readout)
    assert _count(fused, nn.BatchNorm1d) == 0
    torch.testing.assert_close(fused(x), readout(x))


def test_a_hook_on_a_fused_container_leaves_the_original_alone():
    """The fused copy of a container has its own hook tables (a shallow copy shared them: a hook
    registered on the fused model's container also fired on the model passed in)."""
    from pypaper.snn import layer, neuron
    from pypaper.snn.functional.conv_bn_fusion import fuse_conv_bn_eval_modules

    net = torch.nn.Sequential(layer.SeqToANNContainer(torch.nn.Conv2d(1, 2, 3),
                                                      torch.nn.BatchNorm2d(2)),
                              neuron.LIFNode(step_mode="m")).eval()
    fused = fuse_conv_bn_eval_modules(net)
    assert fused.get_submodule("0") is not net[0]
    calls = []
    fused.get_submodule("0").register_forward_hook(lambda *a: calls.append(1))
    net(torch.rand(2, 1, 1, 4, 4))
    assert calls == []
    fused(torch.rand(2, 1, 1, 4, 4))
    assert calls == [1]
