"""Conv -> BatchNorm fusion of pairs whose weight is parametrized or that carry hooks
(pypaper/snn/conv_bn_fusion.py; 2026-12-07).

Before: a convolution under torch.nn.utils.parametrizations.weight_norm / spectral_norm raised
KeyError "attribute 'weight' already exists" in fuse_conv_bn_eval_modules; the older hook-based
torch.nn.utils.weight_norm raised deepcopy's "Only Tensors created explicitly by the user"
RuntimeError, and spectral_norm's fused model failed at its first forward (TypeError: its
pre-hook assigns the weight); a forward hook on the convolution (a feature monitor, a scaling
hook) was folded along, so it ran on BN(W x) instead of W x and the fused model's output changed
silently; packing made the hooks see [T * N, ...] instead of [T, N, ...]. Now parametrized
pairs fold with the weight's current value (the model keeps its parametrization), and pairs
with hooks are left as they are."""
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

from pypaper.snn import functional, layer, neuron
from pypaper.snn.functional.conv_bn_fusion import (fuse_conv_bn_eval_modules,
                                                   pack_conv_bn_train_modules)


def _net():
    torch.manual_seed(0)
    net = nn.Sequential(layer.Conv2d(1, 4, 3), layer.BatchNorm2d(4), neuron.LIFNode(),
                        layer.Conv2d(4, 4, 3), layer.BatchNorm2d(4), neuron.LIFNode())
    functional.set_step_mode(net, "m")
    with torch.no_grad():
        for bn in (net[1], net[4]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.3, 0.3)
    return net


def _x():
    return torch.rand(3, 2, 1, 10, 10, generator=torch.Generator().manual_seed(1)) * 3


def _run(model, net, x):
    functional.reset_net(net)  # the fused model shares the neurons
    out = model(x)
    functional.reset_net(net)
    return out


def _bns(model):
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm"])
def test_a_parametrized_conv_folds_with_its_current_weight(kind):
    net = _net()
    getattr(parametrizations, kind)(net[0])
    if kind == "spectral_norm":  # a few power iterations, so sigma is not the initial guess
        for _ in range(3):
            net[0](torch.rand(2, 3, 1, 10, 10))
    net.eval()
    x = _x()
    want = _run(net, net, x)
    want_conv = net[1](net[0](x))
    fused = fuse_conv_bn_eval_modules(net)
    assert _bns(fused) == 0  # both pairs folded
    got_conv = fused.get_submodule("0")(x)
    torch.testing.assert_close(got_conv, want_conv, rtol=1e-5, atol=1e-5)
    assert torch.equal(_run(fused, net, x), want)
    # the model itself keeps its parametrization and still runs (removing it on a copy that
    # shares parametrize's class deleted the weight property of the original)
    assert hasattr(net[0], "parametrizations")
    assert torch.equal(_run(net, net, x), want)


@pytest.mark.parametrize("kind", ["old_weight_norm", "old_spectral_norm", "forward_hook",
                                  "bn_forward_hook", "forward_pre_hook"])
def test_a_pair_with_hooks_is_left_as_it_is(kind):
    net = _net()
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the hook-based ones are deprecated
        if kind == "old_weight_norm":
            torch.nn.utils.weight_norm(net[0])
        elif kind == "old_spectral_norm":
            torch.nn.utils.spectral_norm(net[0])
    if kind == "forward_hook":
        net[0].register_forward_hook(lambda m, i, o: seen.append(o.shape) or o * 2)
    elif kind == "bn_forward_hook":
        net[1].register_forward_hook(lambda m, i, o: seen.append(o.shape) or o - 0.1)
    elif kind == "forward_pre_hook":
        net[0].register_forward_pre_hook(lambda m, i: (seen.append(i[0].shape) or i[0] * 0.5,))
    net.eval()
    x = _x()
    want = _run(net, net, x)
    fused = fuse_conv_bn_eval_modules(net)
    assert _bns(fused) == 1  # the hooked pair stays, the other folds
    torch.testing.assert_close(_run(fused, net, x), want, rtol=0, atol=0)
    if seen:
        assert seen[-1][:2] == (3, 2)  # the hook still runs, on the [T, N, ...] tensors


def test_packing_leaves_a_hooked_pair_as_it_is():
    """Packed, a monitor hook on the convolution saw [T * N, C, H, W]; it sees [T, N, C, H, W]."""
    net = _net()
    seen = []
    net[0].register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    net.train()
    x = _x()
    packed = pack_conv_bn_train_modules(net)
    _run(packed, net, x)
    assert seen == [(3, 2, 4, 8, 8)]
