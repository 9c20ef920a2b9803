"""pypaper.snn.base: SpikingJelly's memory functions (named_memories, extract / load_memories,
to_functional_forward) on models holding pypaper's neurons, against SpikingJelly's own on the same
model built from its neurons."""
import pytest
import torch
from torch import nn

from pypaper.snn import base, functional, layer, neuron

sj = pytest.importorskip("spikingjelly.activation_based")
from spikingjelly.activation_based import base as sj_base  # noqa: E402
from spikingjelly.activation_based import layer as sj_layer  # noqa: E402
from spikingjelly.activation_based import neuron as sj_neuron  # noqa: E402
from spikingjelly.activation_based import functional as sj_functional  # noqa: E402

T, N, C = 5, 3, 4


def _model(lib_neuron, lib_layer, dropout=True):
    torch.manual_seed(0)
    parts = [nn.Linear(C, C), lib_neuron.LIFNode(tau=2.0, step_mode="m")]
    if dropout:
        parts.append(lib_layer.Dropout(0.5, step_mode="m"))
    parts += [nn.Linear(C, C), lib_neuron.ParametricLIFNode(init_tau=3.0, step_mode="m")]
    with torch.no_grad():  # weights that make both layers fire (all-zero spikes prove little)
        for lin in (parts[0], parts[-2]):
            lin.weight.mul_(3).abs_()
    return nn.Sequential(*parts)


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(T, N, C, generator=g) * 2


def test_names_and_order_are_spikingjellys():
    ours, theirs = _model(neuron, layer), _model(sj_neuron, sj_layer)
    names = [n for n, _ in base.named_memories(ours)]
    assert names == [n for n, _ in sj_base.named_memories(theirs)] == ["1.v", "2.mask", "4.v"]
    # why this module exists: SpikingJelly's own walk does not see pypaper's state
    assert list(sj_base.named_memories(ours)) == []


def test_a_model_mixing_both_libraries():
    mixed = nn.Sequential(neuron.LIFNode(step_mode="m"), sj_layer.Dropout(0.3, step_mode="m"),
                          nn.Sequential(sj_neuron.IFNode(step_mode="m")))
    assert [n for n, _ in base.named_memories(mixed)] == ["0.v", "1.mask", "2.0.v"]


def test_registered_memories_come_after_v():
    class Counting(neuron.LIFNode):
        def __init__(self):
            super().__init__(step_mode="m")
            self.register_memory("count", 0)

    assert [n for n, _ in base.named_memories(nn.Sequential(Counting()))] == ["0.v", "0.count"]


def test_extract_and_load_round_trip():
    model = _model(neuron, layer)
    model(_inputs(1))
    saved = base.extract_memories(model)
    assert [type(v) for v in saved] == [torch.Tensor] * 3
    functional.reset_net(model)
    assert base.extract_memories(model)[0] == 0.0
    base.load_memories(model, saved)
    assert all(a is b for a, b in zip(base.extract_memories(model), saved))
    with pytest.raises(ValueError, match="model has 3 memories but list contains 2"):
        base.load_memories(model, saved[:2])


def test_functional_forward_carries_the_state_and_leaves_the_module_as_it_was():
    model = _model(neuron, layer, dropout=False)
    f = base.to_functional_forward(model)
    x1, x2 = _inputs(1), _inputs(2)
    rest = tuple(base.extract_memories(model))
    out1, s1 = f((x1,), rest)
    out2, s2 = f((x2,), s1)
    assert base.extract_memories(model) == [0.0, 0.0]  # untouched
    y1, y2 = model(x1), model(x2)  # the same, statefully
    assert torch.equal(out1[0], y1) and torch.equal(out2[0], y2)
    assert out2[0].sum() > 0 and not torch.equal(out2[0], f((x2,), rest)[0][0])  # state matters
    for got, want in zip(s2, base.extract_memories(model)):
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="expected 2 states, but got 1"):
        f((x1,), rest[:1])


def test_functional_forward_matches_spikingjellys_on_its_own_model():
    ours, theirs = _model(neuron, layer, dropout=False), _model(sj_neuron, sj_layer, dropout=False)
    f, g = base.to_functional_forward(ours), sj_base.to_functional_forward(theirs)
    states_f, states_g = tuple(base.extract_memories(ours)), tuple(sj_base.extract_memories(theirs))
    for seed in (1, 2, 3):
        (y_f,), states_f = f((_inputs(seed),), states_f)
        (y_g,), states_g = g((_inputs(seed),), states_g)
        assert torch.equal(y_f, y_g)
        for a, b in zip(states_f, states_g):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    sj_functional.reset_net(theirs)


def test_gradient_flows_to_the_explicit_state():
    model = _model(neuron, layer, dropout=False)
    f = base.to_functional_forward(model)
    x = _inputs(4)
    v0 = (torch.rand(N, C) * 0.5).requires_grad_()
    (y,), _ = f((x,), (v0, 0.0))
    y.sum().backward()
    model[1].v = v0_ref = v0.detach().clone().requires_grad_()
    model(x).sum().backward()
    assert v0.grad.abs().sum() > 0
    torch.testing.assert_close(v0.grad, v0_ref.grad, rtol=0, atol=0)


def test_the_module_is_restored_when_the_forward_raises():
    model = _model(neuron, layer, dropout=False)
    model(_inputs(1))
    before = base.extract_memories(model)

    def failing(x):
        model(x)
        raise RuntimeError("boom")

    f = base.to_functional_forward(model, failing)
    with pytest.raises(RuntimeError, match="boom"):
        f((_inputs(2),), (0.0, 0.0))
    assert all(a is b for a, b in zip(base.extract_memories(model), before))


class _Add(nn.Module):
    def forward(self, a, b=None, scale=1.0):
        return a * scale + (0 if b is None else b)


def test_a_sequential_takes_several_inputs_and_keywords_as_spikingjellys_does():
    """nn.Sequential's own forward takes one input and no keywords; SpikingJelly's functional
    forward runs the children in turn, the inputs and keywords going to the first."""
    x, b = _inputs(1), _inputs(2)
    (want,), _ = sj_base.to_functional_forward(nn.Sequential(_Add(), sj_neuron.LIFNode(
        step_mode="m")))((x, b), (0.0,), scale=2.0)
    (got,), _ = base.to_functional_forward(nn.Sequential(_Add(), neuron.LIFNode(
        step_mode="m")))((x, b), (0.0,), scale=2.0)
    assert want.sum() > 0 and torch.equal(got, want)


def test_v_seq_is_put_back_too():
    lif = neuron.LIFNode(step_mode="s", store_v_seq=True)
    model = nn.Sequential(lif)
    model(_inputs(1)[0])
    before = lif.v_seq
    base.to_functional_forward(model)((_inputs(2)[0],), (0.0,))
    assert lif.v_seq is before


def test_dropout_mask_is_state_of_the_functional_forward():
    model = nn.Sequential(layer.Dropout(0.5, step_mode="m"), neuron.LIFNode(step_mode="m"))
    f = base.to_functional_forward(model)
    torch.manual_seed(0)
    (y1,), (mask, v) = f((_inputs(1),), (None, 0.0))
    assert model[0].mask is None and set(mask.unique().tolist()) == {0.0, 2.0}
    (y2,), (mask2, _) = f((_inputs(1),), (mask, 0.0))  # the mask given is the mask used
    assert mask2 is mask and torch.equal(y1, y2)


def test_only_memory_modules_are_asked():
    """A wrapper whose own named_memories reports its children's state is not asked (as in
    SpikingJelly): its neuron is counted once."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lif = neuron.LIFNode(step_mode="m")

        def named_memories(self):
            yield from (("lif." + n, v) for n, v in self.lif.named_memories())

        def forward(self, x):
            return self.lif(x)

    assert [n for n, _ in base.named_memories(nn.Sequential(Block()))] == ["0.lif.v"]


def test_torch_func_grad_through_the_functional_forward():
    model = _model(neuron, layer, dropout=False)
    f = base.to_functional_forward(model)
    x = _inputs(3)

    def loss(v0):
        (y,), _ = f((x,), (v0, 0.0))
        return y.sum()

    v0 = torch.rand(N, C) * 0.5
    g = torch.func.grad(loss)(v0)
    v = v0.clone().requires_grad_()
    loss(v).backward()
    assert g.abs().sum() > 0 and torch.equal(g, v.grad)
    assert base.extract_memories(model) == [0.0, 0.0]
