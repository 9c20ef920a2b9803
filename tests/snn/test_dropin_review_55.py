"""Differences from SpikingJelly 2.0 a model switching its imports met, found by a review (each
test failed before its fix): a neuron subclass whose own reset() reads what its __init__ sets
after super().__init__() could not be constructed (pypaper's BaseNode called reset() there);
the explicit-state API restarted a state of another shape at the reset value where SpikingJelly
(and the module's own forward) restarts at v_reset; an nn.Parameter assigned to v (a learnable
initial membrane) became a parameter of the neuron and its next call raised a TypeError."""
import pytest
import torch
from spikingjelly.activation_based import neuron as sj_neuron
from spikingjelly.activation_based import surrogate as sj_surrogate

from pypaper.snn import neuron

KINDS = ["IFNode", "LIFNode", "ParametricLIFNode"]


def _pair(kind, **kw):
    ours = getattr(neuron, kind)(**kw)
    theirs = getattr(sj_neuron, kind)(surrogate_function=sj_surrogate.Sigmoid(), **kw)
    return ours, theirs


@pytest.mark.parametrize("kind", KINDS)
def test_a_subclass_whose_reset_reads_its_own_attributes_constructs(kind):
    """SpikingJelly's constructors register v without calling reset(); a subclass that extends
    reset() with state of its own set up after super().__init__() is the usual pattern."""
    results = []
    for lib in (neuron, sj_neuron):
        class Counting(getattr(lib, kind)):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self.window = 3
                self.register_memory("count", 0.0)

            def reset(self):
                super().reset()
                self.steps_left = self.window

        kw = {} if lib is neuron else {"surrogate_function": sj_surrogate.Sigmoid()}
        # raised AttributeError: no attribute 'window'
        node = Counting(step_mode="m", store_v_seq=True, **kw)
        assert not hasattr(node, "steps_left")  # reset() was not called by the constructor
        x = torch.linspace(-1.0, 3.0, 24).reshape(4, 2, 3)
        spikes = node(x)
        v, v_seq = node.v, node.v_seq
        # the subclass's memory moved off its reset value, as a learnable one (an nn.Parameter
        # stays state there, as v does: not a parameter of the neuron)
        node.count = torch.nn.Parameter(torch.ones(3))
        assert "count" not in dict(node.named_parameters())
        node.reset()  # puts back v, v_seq and the registered memory
        results.append((spikes, v, v_seq, node.v, node.steps_left, node.count, node.v_seq))
    ours, theirs = results
    assert all(torch.equal(a, b) for a, b in zip(ours[:3], theirs[:3]))
    assert ours[3:] == theirs[3:] == (0.0, 3, 0.0, None)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("step_mode", ["s", "m"])
@pytest.mark.parametrize("how", ["set_reset_value", "v_reset_assigned", "soft_reset"])
def test_functional_forward_restarts_a_state_of_another_shape_at_v_reset(kind, step_mode, how):
    """materialize_states replaces a state tensor of another shape (a new batch size) by
    v_reset, or 0 for a soft reset, as SpikingJelly's BaseNode does and as the module's own
    forward restarts; it filled it with the reset value (set_reset_value('v', ...), or v_reset
    as constructed): another membrane and other spikes."""
    kw = {"v_reset": None} if how == "soft_reset" else {}
    ours, theirs = _pair(kind, step_mode=step_mode, **kw)
    for node in (ours, theirs):
        if how == "v_reset_assigned":
            node.v_reset = -0.5
        else:
            node.set_reset_value("v", 0.5)
    x = torch.linspace(-0.5, 1.5, 24).reshape(3, 2, 4)
    x = x if step_mode == "m" else x[0]
    stale = (torch.zeros(7),)  # a state left by another batch size
    (s_ours,), (v_ours,) = ours.functional_forward((x,), stale)
    (s_theirs,), (v_theirs,) = theirs.functional_forward((x,), stale)
    assert torch.equal(s_ours, s_theirs)
    assert torch.allclose(v_ours, v_theirs, rtol=0, atol=1e-6)
    rest = -0.5 if how == "v_reset_assigned" else 0.0
    states = ours.materialize_states((x,), stale, step_mode)
    assert torch.equal(states[0], torch.full_like(states[0], rest))
    # the module's own forward from such a membrane: the same restart
    ours.v = torch.zeros(7)
    assert torch.equal(ours(x), s_ours) and torch.equal(ours.v, v_ours)
    # reset() on the other hand puts v at the reset value (set_reset_value, or v_reset as
    # constructed), as SpikingJelly's does, and the next forward starts from there
    for node in (ours, theirs):
        node.reset()
    assert ours.v == theirs.v == (0.0 if how == "v_reset_assigned" else 0.5)
    assert torch.equal(ours(x), theirs(x))
    assert torch.allclose(ours.v, theirs.v, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("step_mode", ["s", "m"])
def test_a_learnable_initial_membrane_assigned_to_v(kind, step_mode):
    """A model that learns the initial membrane owns it as an nn.Parameter and assigns it to the
    neuron's v before a sequence (or loads it with base.load_memories). SpikingJelly keeps it as
    state; pypaper's neuron registered it as a parameter of its own (named 'v' in the
    state_dict), and its next call failed assigning the new membrane: "cannot assign
    'torch.FloatTensor' as parameter 'v'"."""
    from spikingjelly.activation_based import functional as sj_functional

    from pypaper.snn import base, functional

    class Model(torch.nn.Module):
        def __init__(self, lib):
            super().__init__()
            kw = {} if lib is neuron else {"surrogate_function": sj_surrogate.Sigmoid()}
            self.node = getattr(lib, kind)(step_mode=step_mode, **kw)
            self.v0 = torch.nn.Parameter(torch.linspace(-0.25, 0.75, 10).reshape(2, 5))

        def forward(self, x):
            self.node.v = self.v0
            if step_mode == "m":
                return self.node(x)
            return torch.stack([self.node(xt) for xt in x])

    x = torch.linspace(-1.0, 2.0, 40).reshape(4, 2, 5)
    weight = torch.linspace(0.5, 1.5, 40).reshape(4, 2, 5)
    results = []
    for lib, fn in ((neuron, functional), (sj_neuron, sj_functional)):
        model = Model(lib)
        spikes = model(x)  # raised TypeError here (s: at the first step)
        ((spikes * weight).sum() + (model.node.v ** 2).sum()).backward()
        keys = sorted(model.state_dict())
        fn.reset_net(model)
        rest = model.node.v
        spikes2 = model(x)  # the parameter assigned again after reset
        results.append((spikes, model.v0.grad.clone(), keys, rest, spikes2))
    ours, theirs = results
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[4], theirs[4])
    assert torch.allclose(ours[1], theirs[1], rtol=1e-5, atol=1e-6)
    assert ours[2] == theirs[2] and "node.v" not in ours[2]
    assert ours[3] == theirs[3] == 0.0
    # base.load_memories assigns the same way
    model = Model(neuron)
    base.load_memories(model, [model.v0])
    assert model.node.v is model.v0 and "v" not in dict(model.node.named_parameters())
    model.node(x if step_mode == "m" else x[0])
    assert not isinstance(model.node.v, torch.nn.Parameter)
