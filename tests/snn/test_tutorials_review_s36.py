"""Review s36: SpikingJelly 2.0's activation_based tutorials and examples walked through with the
import switched to pypaper.snn (basic concepts, neurons with store_v_seq in both step modes,
surrogates, containers, monitors, encoders, recurrent containers, the spiking attention layers,
the model zoo, the plasticity examples, chunk_multi_step_forward, BatchNorm step modes), side by
side with SpikingJelly's own modules: spikes, membranes, v_seq, gradients and monitor records
agreed. What differed are the configuration mistakes a new user makes while following them:

- ``surrogate_function=surrogate.ATan`` (the class, parentheses forgotten) was accepted, and the
  first step raised "alpha must be a positive finite number ... got a float32 tensor of shape
  (2, 3)" (the neuron called the class on the membrane, constructing ATan(alpha=<membrane>)),
  which does not name the mistake;
- a flag given as text (``detach_reset='False'`` from a YAML / JSON config or an argparse option
  without a bool type) was taken as ``bool('False')`` = True: silently the other dynamics
  (decay_input) or other gradients (detach_reset, sltt); SpikingJelly's BaseNode asserts that
  detach_reset is a bool.
"""
import numpy as np
import pytest
import torch

from pypaper import _ext
from pypaper.snn import lif_multi_step, neuron, surrogate

pytestmark = pytest.mark.skipif(not _ext.LOADED, reason="pypaper._C not built")

NODES = {"IFNode": {}, "LIFNode": {"tau": 2.0}, "ParametricLIFNode": {"init_tau": 2.0}}


# ---- a surrogate class given where an instance belongs --------------------------------------

@pytest.mark.parametrize("kind", sorted(NODES))
@pytest.mark.parametrize("name", ["ATan", "Sigmoid", "Erf"])
def test_a_surrogate_class_is_refused_when_the_neuron_is_built(kind, name):
    cls = getattr(surrogate, name)
    with pytest.raises(TypeError, match=rf"got the class {name} itself.*{name}\(\)"):
        getattr(neuron, kind)(surrogate_function=cls, **NODES[kind])


@pytest.mark.parametrize("step_mode", ["s", "m"])
def test_a_surrogate_class_assigned_later_or_given_to_the_op_is_refused(step_mode):
    node = neuron.LIFNode(step_mode=step_mode)
    with pytest.raises(TypeError, match="got the class ATan itself"):
        node.surrogate_function = surrogate.ATan
    # the neuron keeps the surrogate it had and still runs
    assert isinstance(node.surrogate_function, surrogate.Sigmoid)
    x = torch.rand(3, 2, 4) * 2
    node(x if step_mode == "m" else x[0])
    with pytest.raises(TypeError, match="got the class ATan itself"):
        lif_multi_step(torch.rand(3, 2, 4), surrogate_function=surrogate.ATan)
    # SpikingJelly's own surrogate classes (and the ones pypaper forwards from it) too
    spikingjelly = pytest.importorskip("spikingjelly.activation_based.surrogate")
    for cls in (spikingjelly.ATan, surrogate.PiecewiseLeakyReLU):
        with pytest.raises(TypeError, match=f"got the class {cls.__name__} itself"):
            neuron.IFNode(surrogate_function=cls)


def test_surrogate_instances_and_functions_still_run():
    x = (torch.rand(3, 2, 4) * 2).requires_grad_()
    for sg in (surrogate.ATan(), surrogate.Sigmoid(alpha=2.0), surrogate.ATan(spiking=False),
               surrogate.PiecewiseLeakyReLU(), None):
        node = neuron.LIFNode(surrogate_function=sg, step_mode="m")
        node(x).sum().backward()
    node = neuron.LIFNode(step_mode="m", surrogate_function=torch.sigmoid)  # a plain function
    assert node(x).shape == x.shape


# ---- flags given as text ---------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(NODES))
@pytest.mark.parametrize("flag", ["detach_reset", "decay_input", "sltt", "learnable_threshold"])
@pytest.mark.parametrize("value", ["False", "True", "0", None, 0.5, 2])
def test_a_flag_that_is_not_a_bool_is_refused(kind, flag, value):
    if kind == "IFNode" and flag == "decay_input":
        pytest.skip("IFNode has no decay_input")
    with pytest.raises(TypeError, match=f"{flag} must be a bool"):
        getattr(neuron, kind)(**{flag: value}, **NODES[kind])


@pytest.mark.parametrize("flag", ["detach_reset", "decay_input", "sltt", "store_v_seq"])
def test_a_flag_assigned_as_text_is_refused_and_the_old_value_kept(flag):
    node = neuron.LIFNode()
    before = getattr(node, flag)
    with pytest.raises(TypeError, match=f"{flag} must be a bool"):
        setattr(node, flag, "False")
    assert getattr(node, flag) is before


@pytest.mark.parametrize("flag", ["detach_reset", "decay_input", "sltt"])
@pytest.mark.parametrize("value", [False, True, 0, 1, np.False_, np.True_])
def test_bool_like_flags_run_as_the_bool_they_equal(flag, value):
    torch.manual_seed(0)
    x = (torch.randn(4, 2, 3) * 2).requires_grad_()
    runs = []
    for v in (value, bool(value)):
        node = neuron.LIFNode(step_mode="m", v_reset=None, **{flag: v})
        assert getattr(node, flag) is bool(value)
        y = node(x)
        (g,) = torch.autograd.grad((y * torch.arange(3.0)).sum() + node.v.sum(), x)
        runs.append((y, node.v, g))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_detach_reset_text_was_read_as_true():
    """The silent case the check closes: 'False' ran as detach_reset=True, whose gradients
    differ from detach_reset=False (here by a lot)."""
    torch.manual_seed(0)
    x = (torch.randn(6, 2, 3) * 2).requires_grad_()
    grads = {}
    for dr in (False, True):
        node = neuron.LIFNode(step_mode="m", detach_reset=dr)
        (grads[dr],) = torch.autograd.grad(node(x).sum(), x)
    assert not torch.allclose(grads[False], grads[True])
    with pytest.raises(TypeError):
        neuron.LIFNode(step_mode="m", detach_reset="False")


@pytest.mark.parametrize("how", ["keyword", "positional", "set_spiking_mode"])
def test_a_surrogate_spiking_flag_given_as_text_is_refused(how):
    """surrogate.ATan(spiking='False') ran the spiking function (bool('False') is True) where
    the primitive was asked for."""
    with pytest.raises(TypeError, match="spiking must be a bool"):
        if how == "keyword":
            surrogate.ATan(spiking="False")
        elif how == "positional":
            surrogate.ATan(2.0, "False")
        else:
            surrogate.ATan().set_spiking_mode("False")


@pytest.mark.parametrize("value", [False, 0, np.False_, torch.tensor(False)])
def test_bool_like_spiking_flags_still_select_the_primitive(value):
    x = torch.linspace(-1, 1, 5)
    assert surrogate.ATan(spiking=value).spiking is False
    torch.testing.assert_close(surrogate.ATan(spiking=value)(x), surrogate.ATan(spiking=False)(x))
    sg = surrogate.ATan()
    sg.set_spiking_mode(value)
    assert sg.spiking is False
