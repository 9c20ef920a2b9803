"""API surface of pypaper.snn's own classes against SpikingJelly 2.0's classes of the same name
(2026-12-07): every public name SpikingJelly's class has, pypaper's has too, with SpikingJelly's
semantics (BaseNode's static reset helpers and Lava scale, Dropout's MemoryModule API, the error
types of the memory API)."""
import inspect

import pytest
import torch
from torch import nn

sj = pytest.importorskip("spikingjelly.activation_based")
from spikingjelly.activation_based import base as sj_base  # noqa: E402
from spikingjelly.activation_based import functional as sj_functional  # noqa: E402
from spikingjelly.activation_based import layer as sj_layer  # noqa: E402
from spikingjelly.activation_based import neuron as sj_neuron  # noqa: E402
from spikingjelly.activation_based import surrogate as sj_surrogate  # noqa: E402

from pypaper.snn import base, functional, layer, neuron, surrogate  # noqa: E402
from pypaper.snn import convert, revert  # noqa: E402

_MODULES = [(neuron, sj_neuron), (layer, sj_layer), (surrogate, sj_surrogate)]
_NN = set(dir(nn.Module))


def _own_classes():
    for pp_mod, sj_mod in _MODULES:
        for name, cls in vars(pp_mod).items():
            if (not name.startswith("_") and inspect.isclass(cls)
                    and cls.__module__.startswith("pypaper") and hasattr(sj_mod, name)):
                yield f"{pp_mod.__name__.rsplit('.', 1)[1]}.{name}", cls, getattr(sj_mod, name)


@pytest.mark.parametrize("name,pp_cls,sj_cls", list(_own_classes()),
                         ids=[n for n, _, _ in _own_classes()])
def test_class_has_spikingjelly_public_names(name, pp_cls, sj_cls):
    # class-level names (methods, static methods, properties) beyond nn.Module's own
    missing = sorted({a for a in dir(sj_cls) if not a.startswith("_")} - _NN - set(dir(pp_cls)))
    assert not missing, f"{name} lacks SpikingJelly's {missing}"


@pytest.mark.parametrize("cls", ["IFNode", "LIFNode", "ParametricLIFNode"])
def test_neuron_instance_attributes(cls):
    s, p = getattr(sj_neuron, cls)(), getattr(neuron, cls)()
    missing = {a for a in vars(s) if not a.startswith("_")} - set(dir(p))
    assert not missing
    assert p.lava_s_cale == s.lava_s_cale == 64


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_apply_reset_helpers_match_spikingjelly(dtype):
    g = torch.Generator().manual_seed(0)
    v = torch.randn(3, 5, generator=g, dtype=dtype, requires_grad=True)
    spike = (torch.rand(3, 5, generator=g) > 0.5).to(dtype).requires_grad_()
    for helper, arg in (("apply_hard_reset", -0.25), ("apply_soft_reset", 0.75)):
        for pp_fn in (getattr(neuron.BaseNode, helper), getattr(neuron.LIFNode(), helper)):
            ref = getattr(sj_neuron.BaseNode, helper)(v, spike, arg)
            out = pp_fn(v, spike, arg)
            assert torch.equal(out, ref)
            gr = torch.autograd.grad(ref.sum(), (v, spike))
            go = torch.autograd.grad(out.sum(), (v, spike))
            for a, b in zip(go, gr):
                assert torch.equal(a, b)


def test_apply_reset_in_a_subclass_step():
    # a subclass's own step forward may call the helpers, as SpikingJelly's neurons can
    class ClampedIF(neuron.IFNode):
        def single_step_forward(self, x):
            s = super().single_step_forward(x)
            self.v = self.apply_soft_reset(self.v, (self.v < -1).to(self.v), -1.0)
            return s

    n = ClampedIF()
    n(torch.full((2,), -3.0))
    assert torch.equal(n.v, torch.full((2,), -2.0))


def test_convert_carries_lava_scale_both_ways():
    sj_model = nn.Sequential(nn.Linear(2, 3), sj_neuron.LIFNode())
    sj_model[1].lava_s_cale = 1 << 4
    model = convert(sj_model)
    assert isinstance(model[1], neuron.LIFNode) and model[1].lava_s_cale == 16
    model[1].lava_s_cale = 1 << 5
    back = revert(model)
    assert type(back[1]) is sj_neuron.LIFNode and back[1].lava_s_cale == 32


def _counting_dropout(base_cls):
    class CountingDropout(base_cls):
        def __init__(self, p):
            super().__init__(p)
            self.register_memory("steps", 0)

        # SpikingJelly's way: the functional step takes and returns every memory
        def single_step_functional_forward(self, inputs, states, **kwargs):
            (y,), new = super().single_step_functional_forward(inputs, states[:1], **kwargs)
            return (y,), (new[0], states[1] + 1)

    return CountingDropout


def test_dropout_register_memory_matches_spikingjelly():
    pp_d, sj_d = _counting_dropout(layer.Dropout)(0.5), _counting_dropout(sj_layer.Dropout)(0.5)
    x = torch.ones(4, 6)
    for d in (pp_d, sj_d):
        torch.manual_seed(3)
        ys = [d(x) for _ in range(3)]
        d.ys = ys
    for a, b in zip(pp_d.ys, sj_d.ys):
        assert torch.equal(a, b)
    assert [n for n, _ in pp_d.named_memories()] == [n for n, _ in sj_d.named_memories()]
    assert pp_d.steps == sj_d.steps == 3
    assert pp_d.get_reset_value("steps") == sj_d.get_reset_value("steps") == 0
    assert pp_d.get_reset_value("mask") is None and sj_d.get_reset_value("mask") is None
    # base's memory functions see the subclass's memory, in SpikingJelly's order
    pp_mem, sj_mem = base.extract_memories(pp_d), sj_base.extract_memories(sj_d)
    assert len(pp_mem) == len(sj_mem) == 2 and pp_mem[1] == sj_mem[1] == 3
    assert torch.equal(pp_mem[0], sj_mem[0])
    functional.reset_net(pp_d)
    sj_functional.reset_net(sj_d)
    assert pp_d.steps == sj_d.steps == 0 and pp_d.mask is None and sj_d.mask is None
    # a reset value for the mask: a fixed mask after every reset, as in SpikingJelly
    fixed = torch.tensor([[0.0, 2.0, 2.0, 0.0, 2.0, 2.0]]).expand(4, 6)
    for d in (pp_d, sj_d):
        d.set_reset_value("steps", 10)
        d.set_reset_value("mask", fixed)
        d.reset()
        assert d.steps == 10 and torch.equal(d.mask, fixed)
        assert torch.equal(d(x), fixed)


def test_dropout_memory_of_a_subclass_passes_through_the_step():
    # a memory the functional step does not update stays as it is (SpikingJelly's Dropout
    # raised zip()'s ValueError on it)
    class Traced(layer.Dropout):
        def __init__(self):
            super().__init__(0.5, step_mode="m")
            self.register_memory("note", "x")

    d = Traced()
    torch.manual_seed(0)
    y = d(torch.ones(3, 2, 4))
    assert d.note == "x" and d.mask.shape == (2, 4) and torch.equal(y[0], y[2])


@pytest.mark.parametrize("lib", [layer, sj_layer], ids=["pypaper", "spikingjelly"])
def test_dropout_memories_follow_to_and_detach(lib):
    d = _counting_dropout(lib.Dropout2d)(0.2)
    d.register_memory("trace", torch.zeros(2))
    d.trace = torch.ones(2, requires_grad=True) * 2
    d.detach()
    assert d.trace.grad_fn is None
    d.double()  # the memory and its reset value (SpikingJelly's MemoryModule._apply)
    assert d.trace.dtype == torch.float64
    d.reset()
    assert torch.equal(d.trace, torch.zeros(2, dtype=torch.float64))


@pytest.mark.parametrize("kind", ["LIFNode", "Dropout"])
def test_memory_api_error_types_match_spikingjelly(kind):
    pp_m, sj_m = ((neuron.LIFNode(), sj_neuron.LIFNode()) if kind == "LIFNode"
                  else (layer.Dropout(0.5), sj_layer.Dropout(0.5)))
    # an unregistered memory: SpikingJelly raises KeyError (pypaper's error also stays an
    # AttributeError, as it was)
    with pytest.raises(KeyError):
        sj_m.get_reset_value("nope")
    with pytest.raises(KeyError, match="no memory 'nope'"):
        pp_m.get_reset_value("nope")
    with pytest.raises(AttributeError):
        pp_m.get_reset_value("nope")
    # a name the module already has: SpikingJelly asserts
    with pytest.raises(AssertionError):
        sj_m.register_memory("training", 0)
    with pytest.raises(AssertionError, match="already an attribute"):
        pp_m.register_memory("training", 0)
    with pytest.raises(ValueError):
        pp_m.register_memory("training", 0)
