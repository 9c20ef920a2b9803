"""Review of SLTT and online training (session 35): pypaper.snn.convert on SpikingJelly 2.0's own
SLTT neuron, and what sltt.train_step_online says to a user who passes something wrong. Each test
was failing before its fix; the expectation comes from SpikingJelly's SLTTLIFNode driven by the
SLTT authors' per-step loop, or from the argument rules of train_step_online's docstring."""
import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import pypaper.snn as ps
from pypaper import _ext
from pypaper.snn import functional, neuron, sltt

pytestmark = pytest.mark.skipif(not _ext.LOADED, reason="pypaper._C not built")
sj_neuron = pytest.importorskip("spikingjelly.activation_based.neuron")
sj_functional = pytest.importorskip("spikingjelly.activation_based.functional")

T, N, D, H, C = 4, 3, 5, 6, 3
ce = nn.functional.cross_entropy
SLTTLIFNode = getattr(sj_neuron, "SLTTLIFNode", None)
needs_sltt_node = pytest.mark.skipif(SLTTLIFNode is None,
                                     reason="this SpikingJelly has no SLTTLIFNode")


def _sj_sltt_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(D, H), SLTTLIFNode(tau=2.0),
        nn.Linear(H, C), SLTTLIFNode(tau=1.5, v_reset=None, decay_input=False,
                                     detach_reset=False))


def _lif_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, H), neuron.LIFNode(), nn.Linear(H, C))


@needs_sltt_node
@pytest.mark.parametrize("sltt_flag", [False, True])
def test_convert_takes_spikingjellys_sltt_lif_node_and_trains_online_as_it(sltt_flag):
    """SpikingJelly 2.0's SLTTLIFNode (a LIFNode whose charge reads the membrane detached in
    training) was left by convert with a warning (a subclass), and train_step_online then refused
    the model ("no pypaper.snn neurons"). Now it becomes pypaper's LIFNode with sltt=True (also
    when convert's sltt is False: the neuron is SLTT's by its class), and the online step's
    gradients equal those of SpikingJelly's own neuron in the SLTT authors' per-step loop."""
    theirs = _sj_sltt_model()
    ours = copy.deepcopy(theirs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left as SpikingJelly's
        assert ps.convert(ours, sltt=sltt_flag) is ours
    nodes = [m for m in ours if isinstance(m, neuron.BaseNode)]
    assert len(nodes) == 2 and all(type(m) is neuron.LIFNode and m.sltt for m in nodes)
    assert (nodes[1].tau, nodes[1].v_reset, nodes[1].decay_input, nodes[1].detach_reset) == (
        1.5, None, False, False)

    x = torch.randn(T, N, D) * 2
    y = torch.randint(0, C, (N,))
    for t in range(T):  # the SLTT authors' loop: one backward per step, loss / T
        (ce(theirs(x[t]), y) / T).backward()
    sj_functional.reset_net(theirs)
    sltt.train_step_online(ours, x, y, ce)
    assert any(float(p.grad.abs().sum()) > 0 for p in theirs.parameters())
    for (name, p), q in zip(theirs.named_parameters(), ours.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)


@needs_sltt_node
def test_revert_gives_back_an_sltt_lif_node_in_the_step_mode_it_was_set_to():
    """revert rebuilds the SLTTLIFNode; its constructor asserts step_mode 's', so a converted
    neuron switched to 'm' is built in 's' and given 'm' after (it raised AssertionError)."""
    model = _sj_sltt_model()
    ps.convert(model)
    functional.set_step_mode(model, "m")
    model(torch.randn(T, N, D))
    assert ps.revert(model) is model
    assert type(model[1]) is SLTTLIFNode and type(model[3]) is SLTTLIFNode
    assert model[1].step_mode == "m" and model[3].v_reset is None
    sj_functional.reset_net(model)
    assert model(torch.randn(T, N, D)).shape == (T, N, C)


def test_a_model_of_spikingjelly_neurons_is_refused_with_the_convert_hint():
    """A ported SpikingJelly script's model: the error named no neuron and no way out."""
    model = nn.Sequential(nn.Linear(D, C), sj_neuron.LIFNode())
    with pytest.raises(ValueError, match=r"1 \(LIFNode\).*pypaper\.snn\.convert\(model, sltt=True\)"):
        sltt.train_step_online(model, torch.randn(T, N, D), torch.randint(0, C, (N,)), ce)
    with pytest.raises(ValueError, match="no pypaper.snn neurons"):
        sltt.train_step_online(nn.Linear(D, C), torch.randn(T, N, D), torch.randint(0, C, (N,)),
                               ce)


def test_a_per_step_target_error_names_loss_fn_the_shapes_and_the_step():
    """A target of one label per step and sample [T, N]: torch's 'Expected input batch_size (3)
    to match target batch_size (4)' did not say that every step's [N, C] output meets the whole
    target. The type of the error is kept."""
    model = _lif_model()
    with pytest.raises(ValueError, match=r"(?s)loss_fn\(output, target\) failed on time step 0.*"
                                         r"batch_size.*output: tensor of shape \(3, 3\).*"
                                         r"target: tensor of shape \(4, 3\).*one entry per time "
                                         r"step"):
        sltt.train_step_online(model, torch.randn(T, N, D), torch.randint(0, C, (T, N)), ce)
    # the model is left as it was: neurons back in their mode, reset
    assert model[1].step_mode == "s" and not model[1].sltt and model[1].v == 0.0


@pytest.mark.parametrize("how", ["no_grad", "inference_mode", "frozen"])
def test_a_loss_without_grad_is_refused_naming_the_causes(how):
    """autograd's 'element 0 of tensors does not require grad' said nothing of why."""
    model = _lif_model()
    x, y = torch.randn(T, N, D), torch.randint(0, C, (N,))
    ctx = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}.get(how)
    if how == "frozen":
        model.requires_grad_(False)
    with pytest.raises(RuntimeError, match="loss of time step 0 does not require grad.*no_grad"):
        if ctx is None:
            sltt.train_step_online(model, x, y, ce)
        else:
            with ctx():
                sltt.train_step_online(model, x, y, ce)
    # a frozen model still trains a leaf input (saliency): that is not refused
    if how == "frozen":
        xl = x.clone().requires_grad_()
        sltt.train_step_online(model, xl, y, ce)
        assert xl.grad is not None


def test_wrong_argument_types_are_refused_before_anything_runs():
    """A module passed where the optimizer goes has zero_grad(): it zeroed the gradients a user
    accumulated and the call failed only after the whole forward and backward
    ('Sequential' object has no attribute 'step'). model=None and loss_fn=None gave
    AttributeError / "'NoneType' object is not callable" naming neither."""
    model = _lif_model()
    other = _lif_model()
    for p in other.parameters():
        p.grad = torch.ones_like(p)
    x, y = torch.randn(T, N, D), torch.randint(0, C, (N,))
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer.*Sequential"):
        sltt.train_step_online(model, x, y, ce, other)
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in other.parameters())
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got NoneType"):
        sltt.train_step_online(None, x, y, ce)
    with pytest.raises(TypeError, match="loss_fn must be callable.*NoneType"):
        sltt.train_step_online(model, x, y, None)


@pytest.mark.parametrize("k", [np.int64(2), torch.tensor(2)], ids=["numpy", "tensor"])
def test_k_takes_any_integer_and_draws_the_same_steps(k):
    """k from a numpy config or a 0-d integer tensor was refused ('k must be an integer')."""
    x, y = torch.randn(T, N, D), torch.randint(0, C, (N,))
    got = sltt.train_step_online(_lif_model(), x, y, ce, k=k,
                                 generator=torch.Generator().manual_seed(3)).trained_steps
    want = sltt.train_step_online(_lif_model(), x, y, ce, k=2,
                                  generator=torch.Generator().manual_seed(3)).trained_steps
    assert got == want and len(got) == 2
    for bad in (True, 2.0, torch.tensor(2.0), 0, T + 1):
        with pytest.raises(ValueError, match=r"k must be an integer in 1\.\.T"):
            sltt.train_step_online(_lif_model(), x, y, ce, k=bad)
