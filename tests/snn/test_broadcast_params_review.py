"""Review of the per-neuron parameters that broadcast against a step (932201c).

Each test here failed before the fix it names."""
import copy

import pytest
import torch
from torch import nn

from pypaper import _ext
from pypaper.snn import neuron

pytestmark = pytest.mark.skipif(not _ext.LOADED, reason="pypaper._C not built")

C, H, W = 3, 4, 5


def _x(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) + 0.7


@pytest.mark.parametrize("step_mode", ["m", "s"])
@pytest.mark.parametrize("w_shape,th_shape,x_shape", [
    ((C, 1, 1), (1, C, 1, 1), (5, 2, C, H, W)),   # a batch dim of 1 on the threshold
    ((1, C, 1, 1), (1, C, 1, 1), (5, 2, C, H, W)),
    ((W,), (W,), (5, 2, H, W)),                    # [N, L, C] tokens, one per channel
    ((C, 1, 1), (2, C, 1, 1), (5, 2, C, H, W)),   # one threshold per sample and channel
], ids=str)
def test_convert_takes_a_learnable_threshold_of_any_broadcast_shape(step_mode, w_shape, th_shape,
                                                                    x_shape):
    """convert says a PLIF's w or threshold of any shape converts, as SpikingJelly's charge
    broadcasts both against each step. A w of (1, C, 1, 1) or (C,) against [N, L, C] did, but a
    learnable threshold of such a shape was declared as the neuron's threshold_shape, which must
    have the features' rank: the converted neuron raised "must match the feature shape ... dim by
    dim" at its first call, where SpikingJelly's ran. Now it gives SpikingJelly's spikes and
    gradients."""
    pytest.importorskip("spikingjelly.activation_based")
    from spikingjelly.activation_based import neuron as sn
    from spikingjelly.activation_based import surrogate as ss

    from pypaper.snn import convert, revert

    torch.manual_seed(0)
    sj = sn.ParametricLIFNode(surrogate_function=ss.ATan(), step_mode=step_mode)
    sj.w = nn.Parameter(torch.randn(w_shape))
    sj.v_threshold = nn.Parameter(torch.rand(th_shape) * 0.5 + 0.7)
    ref = copy.deepcopy(sj)
    model = convert(nn.Sequential(sj))
    node = model[0]
    assert neuron._is_own(node) and node.w is sj.w and node.v_threshold is sj.v_threshold
    x = _x(*x_shape)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    if step_mode == "m":
        want, got = ref(xa), model(xb)
    else:
        want = torch.stack([ref(t) for t in xa])
        got = torch.stack([model(t) for t in xb])
    assert 0 < want.mean() < 1
    gy = _x(*x_shape, seed=4)
    (want * gy).sum().backward()
    (got * gy).sum().backward()
    assert torch.equal(got, want)
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(node.w.grad, ref.w.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(node.v_threshold.grad, ref.v_threshold.grad, rtol=1e-5, atol=1e-6)
    back = revert(model)[0]
    assert type(back) is sn.ParametricLIFNode
    assert back.w is sj.w and back.v_threshold is sj.v_threshold


@pytest.mark.parametrize("th_shape", [(1, C, 1, 1), (C, 1, 1)], ids=str)
def test_convert_takes_a_simple_lif_threshold_of_a_broadcast_shape(th_shape):
    """The same for SpikingJelly's plain-PyTorch SimpleLIFNode, whose threshold made a Parameter
    of shape (1, C, 1, 1) ran there and, converted, raised at the first call."""
    pytest.importorskip("spikingjelly.activation_based")
    from spikingjelly.activation_based import neuron as sn
    from spikingjelly.activation_based import surrogate as ss

    from pypaper.snn import convert

    torch.manual_seed(1)
    sj = sn.SimpleLIFNode(tau=2.0, decay_input=True, surrogate_function=ss.ATan(), step_mode="m")
    sj.v_threshold = nn.Parameter(torch.rand(th_shape) * 0.5 + 0.7)
    ref = copy.deepcopy(sj)
    model = convert(nn.Sequential(sj))
    assert isinstance(model[0], neuron.LIFNode) and model[0].v_threshold is sj.v_threshold
    x = _x(5, 2, C, H, W)
    want, got = ref(x), model(x)
    (want * x).sum().backward()
    (got * x).sum().backward()
    assert torch.equal(got, want)
    torch.testing.assert_close(model[0].v_threshold.grad, ref.v_threshold.grad, rtol=1e-5,
                               atol=1e-6)
