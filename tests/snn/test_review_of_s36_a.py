"""Review of today's (s36) snn / local changes: regressions they introduced.

snn (5da6a9d, lava_s_cale): BaseNode set ``lava_s_cale`` in __init__ only, so a neuron pickled or
torch.save'd before that commit had none: reading it raised AttributeError, and
``convert.revert`` of such a converted model (it copies the attribute to SpikingJelly's neuron)
crashed. The class carries the default now.

local (3483e9d, second derivatives refused): the fused ops' parameter gradients are computed in the
forward without a graph; 3483e9d tied them to the weight so that a second derivative raises
instead of coming out as zero. Tied to the weight alone, a second derivative with respect to the
bias (a penalty on the bias's gradient, a frozen weight with a trainable bias) still came out as
zero, silently: the bias was not in the gradient's graph. The bias is an anchor too now.
"""
import importlib
import io

import pytest
import torch
from torch import nn

from pypaper.local import ops
from pypaper.snn import neuron

pytest.importorskip("spikingjelly")
from spikingjelly.activation_based import neuron as sj_neuron  # noqa: E402

convert = importlib.import_module("pypaper.snn.convert")


# ---- snn: lava_s_cale on neurons saved before it existed ----------------------------------------

def _saved_before_lava(module: nn.Module) -> nn.Module:
    """module through torch.save / torch.load as a checkpoint written before 5da6a9d: its
    neurons' __dict__ has no lava_s_cale."""
    for m in module.modules():
        m.__dict__.pop("lava_s_cale", None)
    buf = io.BytesIO()
    torch.save(module, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def test_neuron_saved_before_lava_s_cale_reads_the_default():
    node = _saved_before_lava(neuron.LIFNode())
    assert node.lava_s_cale == 64
    node.lava_s_cale = 32  # still an attribute a user tunes, per neuron
    assert node.lava_s_cale == 32 and neuron.LIFNode().lava_s_cale == 64


def test_revert_of_a_model_converted_and_saved_before_lava_s_cale():
    net = convert.convert(nn.Sequential(nn.Linear(3, 3), sj_neuron.LIFNode()))
    old = _saved_before_lava(net)
    back = convert.revert(old)
    assert isinstance(back[1], sj_neuron.LIFNode)
    assert back[1].lava_s_cale == 64


# ---- local: a second derivative through the bias's gradient ------------------------------------

torch.manual_seed(0)
_X = torch.randn(6, 5, dtype=torch.float64)
_Y = torch.tensor([0, 1, 2, 0, 1, 2])
_PROJ = torch.randn(3, 4, dtype=torch.float64)
_CX = torch.randn(3, 5, dtype=torch.float64)
_FEAT = torch.randn(6, 5, 2, 2, dtype=torch.float64)

_CASES = {
    "local_ff_linear": (lambda w, b: ops.ff_linear(_X, w, b, 3)[1], (4, 5)),
    "local_tp_linear": (lambda w, b: ops.tp_linear(_X, w, b, _PROJ, _Y)[1], (4, 5)),
    "local_ff_sf_linear": (lambda w, b: ops.ff_sf_linear(_X, _CX, w, b, _Y)[2], (4, 5)),
    "local_head": (lambda w, b: ops.head_loss(_FEAT, w, b, _Y)[0], (3, 5)),
}


def _params(shape, weight_grad):
    w = torch.randn(shape, dtype=torch.float64, requires_grad=weight_grad)
    b = torch.randn(shape[0], dtype=torch.float64, requires_grad=True)
    return w, b


@pytest.mark.parametrize("weight_grad", [True, False], ids=["trainable_weight", "frozen_weight"])
@pytest.mark.parametrize("op", list(_CASES))
def test_second_derivative_through_the_bias_gradient_is_refused(op, weight_grad):
    loss_fn, shape = _CASES[op]
    w, b = _params(shape, weight_grad)
    g_b, = torch.autograd.grad(loss_fn(w, b), b, create_graph=True)
    # d/db of ||dL/db||^2 + ||b||^2: the first term's curvature is the fused op's, which it
    # cannot give. Before, the result was 2 b (that term silently zero), with no error.
    penalty = (g_b ** 2).sum() + (b ** 2).sum()
    with pytest.raises(NotImplementedError, match=op):
        torch.autograd.grad(penalty, b)


@pytest.mark.parametrize("op", list(_CASES))
def test_first_order_unchanged_with_create_graph_and_a_trainable_bias(op):
    loss_fn, shape = _CASES[op]
    w, b = _params(shape, True)
    plain = torch.autograd.grad(loss_fn(w, b), (w, b))
    tied = torch.autograd.grad(loss_fn(w, b), (w, b), create_graph=True)
    for p, t in zip(plain, tied):
        torch.testing.assert_close(t.detach(), p)


def test_per_sample_gradients_with_a_bias_still_pass():
    # vmap over torch.func.grad runs the backward with grad mode on (the anchors are applied);
    # the tie must keep the values and the vmap rule
    loss_fn, shape = _CASES["local_ff_linear"]
    w, b = _params(shape, False)
    xs = torch.randn(3, 6, 5, dtype=torch.float64)

    def f(w, b, x):
        return ops.ff_linear(x, w, b, 3)[1]

    gw, gb = torch.func.vmap(torch.func.grad(f, argnums=(0, 1)), in_dims=(None, None, 0))(
        w.detach(), b.detach(), xs)
    for i in range(3):
        wi, bi = w.detach().requires_grad_(), b.detach().requires_grad_()
        ew, eb = torch.autograd.grad(f(wi, bi, xs[i]), (wi, bi))
        torch.testing.assert_close(gw[i], ew)
        torch.testing.assert_close(gb[i], eb)
