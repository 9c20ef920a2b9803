"""Review s35 of pypaper.snn.surrogate as a SpikingJelly 2.0 user meets it after swapping the
import: each test is a scenario that went wrong, checked against SpikingJelly where it has one.

The eight built-ins matched SpikingJelly already (forward, gradient, primitive and its autograd
gradient in fp64 / fp32 / bf16 / fp16, at 0, +-inf, NaN and huge |x|; repr, state_dict, deepcopy,
pickle; alpha a number, an int, a numpy scalar, a 0-d tensor, a Parameter, annealed in place or
reassigned, in the neurons eagerly and under torch.compile; SpikingJelly's other surrogates and
users' subclasses of either base in pypaper's neurons). What did not:

- ``isinstance(m, surrogate.SurrogateFunctionBase)`` was False for the surrogates pypaper's own
  ``surrogate`` module hands out from SpikingJelly (S2NN, LeakyKReLU, ...) and for the
  SpikingJelly objects ``convert()`` keeps, where SpikingJelly's import answers True. Code that
  finds a model's surrogates so skipped them, pypaper's own fx tracer included:
  ``pack_conv_bn_train_modules`` traced into SpikingJelly's spiking function, whose heaviside then
  carried no surrogate gradient, and the convolution before it got no gradient at all.
- The cache deciding how a surrogate's parameters are passed kept every bound ``spiking_function``
  (one written without @staticmethod, which SpikingJelly's forward calls as well) and so the
  surrogate for the life of the process; and it was keyed by the function alone, so a function
  shared by a 2.0-style class (parameters by name) and a 0.0.0.0.14-style one (alpha by position)
  was called the first class's way for both.
"""
from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

from pypaper.snn import neuron, surrogate
from pypaper.snn.functional.conv_bn_fusion import (fuse_conv_bn_eval_modules,
                                                   pack_conv_bn_train_modules)

sj_surrogate = pytest.importorskip("spikingjelly.activation_based.surrogate")


# -- isinstance of the base class -------------------------------------------------------------

@pytest.mark.parametrize("make", [lambda: surrogate.S2NN(), lambda: surrogate.LeakyKReLU(),
                                  lambda: surrogate.PiecewiseLeakyReLU(),
                                  lambda: sj_surrogate.ATan(), lambda: sj_surrogate.Rect()],
                         ids=["S2NN", "LeakyKReLU", "PiecewiseLeakyReLU", "sj.ATan", "sj.Rect"])
def test_spikingjellys_surrogates_are_surrogates_as_with_its_import(make):
    """With SpikingJelly's import, every surrogate is an instance of its SurrogateFunctionBase;
    pypaper's module forwards S2NN & co. from SpikingJelly, so the same line with pypaper's
    import must answer the same (it answered False)."""
    m = make()
    assert isinstance(m, sj_surrogate.SurrogateFunctionBase)  # SpikingJelly's answer
    assert isinstance(m, surrogate.SurrogateFunctionBase)
    assert issubclass(type(m), surrogate.SurrogateFunctionBase)


def test_only_the_base_class_claims_spikingjellys_surrogates():
    """SpikingJelly's ATan is a surrogate, not a pypaper ATan (its alpha and spiking function are
    SpikingJelly's); other modules are not surrogates; pypaper's own keep their classes."""
    assert not isinstance(sj_surrogate.ATan(), surrogate.ATan)
    assert not isinstance(sj_surrogate.Sigmoid(), surrogate.Sigmoid)
    assert not isinstance(nn.Linear(2, 2), surrogate.SurrogateFunctionBase)
    assert not isinstance(torch.zeros(1), surrogate.SurrogateFunctionBase)
    assert isinstance(surrogate.ATan(), surrogate.SurrogateFunctionBase)
    assert isinstance(surrogate.ATan(), surrogate.ATan)
    assert not isinstance(surrogate.ATan(), surrogate.Sigmoid)


def test_the_kernels_still_take_spikingjellys_objects_as_spikingjellys():
    """surrogate_spec tells pypaper's classes from SpikingJelly's by inheritance, not isinstance:
    SpikingJelly's ATan runs in the kernels with its own alpha, its S2NN through its function."""
    assert surrogate.surrogate_spec(sj_surrogate.ATan(alpha=3.0)) == (1, 3.0)
    assert surrogate.surrogate_spec(sj_surrogate.Rect(alpha=0.5)) == (7, 0.5)
    assert surrogate.surrogate_spec(sj_surrogate.S2NN()) is None
    assert surrogate.surrogate_spec(surrogate.Erf(alpha=1.5)) == (6, 1.5)


def test_annealing_every_surrogate_found_by_isinstance_reaches_spikingjellys_too():
    """A schedule that walks the model's modules for surrogates (SpikingJelly code) must find
    the SpikingJelly ATan that convert() or an explicit SpikingJelly surrogate left in a pypaper
    model (it skipped it: that layer kept alpha 2)."""
    torch.manual_seed(0)
    model = nn.Sequential(neuron.LIFNode(surrogate_function=sj_surrogate.ATan(), step_mode="m"),
                          neuron.LIFNode(surrogate_function=surrogate.ATan(), step_mode="m"))
    for m in model.modules():
        if isinstance(m, surrogate.SurrogateFunctionBase):
            m.alpha = 5.0
    assert model[0].surrogate_function.alpha == 5.0
    assert model[1].surrogate_function.alpha == 5.0


def _conv_model(sg: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), sg, nn.Flatten(),
                         nn.Linear(27, 2))


@pytest.mark.parametrize("make", [lambda: surrogate.S2NN(), lambda: sj_surrogate.ATan(),
                                  lambda: surrogate.ATan()], ids=["S2NN", "sj.ATan", "ATan"])
def test_pack_conv_bn_keeps_the_surrogate_gradient_of_spikingjellys_surrogates(make):
    """pack_conv_bn_train_modules keeps pypaper's surrogates whole (fx leaves); SpikingJelly's
    were traced into: the packed model's spikes came from a bare heaviside, so the convolution
    got no gradient (None: the optimizer skipped it) where the model as built trains it."""
    model = _conv_model(make()).train()
    x = torch.randn(4, 2, 5, 5)
    packed = pack_conv_bn_train_modules(model)
    grads = []
    for m in (model, packed):
        model.zero_grad()
        m(x).pow(2).sum().backward()
        grads.append(model[0].weight.grad)
    assert grads[1] is not None, "the packed model gave the convolution no gradient"
    torch.testing.assert_close(grads[1], grads[0])


@pytest.mark.parametrize("make", [lambda: surrogate.S2NN(), lambda: sj_surrogate.ATan()],
                         ids=["S2NN", "sj.ATan"])
def test_fuse_conv_bn_eval_keeps_the_surrogate_gradient_of_spikingjellys_surrogates(make):
    """The eval fusion's graph module: the input's gradient through SpikingJelly's surrogate is
    the model's (the traced heaviside gave none)."""
    model = _conv_model(make())
    with torch.no_grad():  # statistics that are not the identity, so the fold does something
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    model.eval()
    fused = fuse_conv_bn_eval_modules(model)
    x = torch.randn(4, 2, 5, 5)
    grads = []
    for m in (model, fused):
        xi = x.clone().requires_grad_(True)
        out = m(xi)
        assert out.requires_grad, "the fused model's output does not depend on x differentiably"
        out.pow(2).sum().backward()
        grads.append(xi.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-5)


# -- how parameters are passed: the per-function cache --------------------------------------

def test_a_spiking_function_written_as_a_method_does_not_keep_the_surrogate_alive():
    """SpikingJelly's forward calls self.spiking_function(x, **params), so one written without
    @staticmethod works there; here the cache kept the bound method, and with it the surrogate
    (and whatever it refers to), after the model was deleted."""

    class MethodATan(surrogate.SurrogateFunctionBase):
        def __init__(self, alpha=2.0, spiking=True):
            super().__init__(spiking=spiking, alpha=alpha)

        def spiking_function(self, x, alpha):  # no @staticmethod
            return surrogate.ATan.spiking_function(x, alpha)

    sg = MethodATan()
    x = torch.linspace(-1, 1, 5, requires_grad=True)
    sg(x).sum().backward()
    torch.testing.assert_close(x.grad, surrogate.ATan().derivative(x.detach()))
    ref = weakref.ref(sg)
    del sg
    gc.collect()
    assert ref() is None, "the surrogate was kept alive after its last reference went"


def test_one_function_shared_by_a_by_name_and_a_positional_surrogate():
    """spike(x, a) used by a 2.0-style class (parameter 'a', passed by name) and a
    0.0.0.0.14-style one ((alpha, spiking): alpha passed by position). The decision was cached per
    function, so the second class called spike(x, alpha=...) and raised TypeError."""

    def spike(x, a):
        return surrogate.Sigmoid.spiking_function(x, a)

    class ByName(surrogate.SurrogateFunctionBase):
        def __init__(self, a=3.0, spiking=True):
            super().__init__(spiking=spiking, a=a)

        spiking_function = staticmethod(spike)

    class Positional(surrogate.SurrogateFunctionBase):
        def __init__(self, alpha=3.0, spiking=True):
            super().__init__(alpha, spiking)

        spiking_function = staticmethod(spike)

    x = torch.linspace(-1, 1, 5, requires_grad=True)
    expected = surrogate.Sigmoid(alpha=3.0).derivative(x.detach())
    for cls in (ByName, Positional, ByName):
        x.grad = None
        cls()(x).sum().backward()
        torch.testing.assert_close(x.grad, expected)


class _Spike(torch.autograd.Function):
    """Theta forward, alpha / (1 + (alpha x)^2) backward (a surrogate of a user's own)."""

    @staticmethod
    def forward(ctx, x, alpha):
        ctx.save_for_backward(x)
        ctx.alpha = alpha
        return (x >= 0).to(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * ctx.alpha / (1 + (ctx.alpha * x) ** 2), None


class _Static(surrogate.SurrogateFunctionBase):
    def __init__(self, alpha=2.0, spiking=True):
        super().__init__(spiking=spiking, alpha=alpha)

    @staticmethod
    def spiking_function(x, alpha):
        return _Spike.apply(x, alpha)


class _Method(surrogate.SurrogateFunctionBase):
    def __init__(self, alpha=2.0, spiking=True):
        super().__init__(spiking=spiking, alpha=alpha)

    def spiking_function(self, x, alpha):
        return _Spike.apply(x, alpha)


class _Positional(surrogate.SurrogateFunctionBase):  # 0.0.0.0.14's contract
    def __init__(self, alpha=2.0, spiking=True):
        super().__init__(alpha, spiking)

    @staticmethod
    def spiking_function(x, a):
        return _Spike.apply(x, a)


@pytest.mark.parametrize("compiled_first", [True, False])
@pytest.mark.parametrize("make", [_Static, _Method, _Positional,
                                  lambda: surrogate.ATan(spiking=False)],
                         ids=["static", "method", "positional", "primitive"])
def test_surrogates_called_through_the_cache_compile_fullgraph(make, compiled_first):
    """The parameter-passing lookup is traced by torch.compile whenever the neuron calls the
    surrogate (a user's own, or spiking=False): a weak-keyed cache failed there ("weak object has
    gone away"); the compiled neuron must equal the eager one."""
    torch._dynamo.reset()
    try:
        node = neuron.LIFNode(surrogate_function=make(), step_mode="m")
        compiled = torch.compile(node, fullgraph=True, backend="aot_eager")
        torch.manual_seed(0)
        x0 = torch.randn(4, 2, 3)
        results = {}
        for name in (("compiled", "eager") if compiled_first else ("eager", "compiled")):
            x = x0.clone().requires_grad_(True)
            y = (compiled if name == "compiled" else node)(x)
            y.sum().backward()
            node.reset()
            results[name] = (y.detach(), x.grad)
        torch.testing.assert_close(results["compiled"], results["eager"])
    finally:
        torch._dynamo.reset()
