"""What a model written for SpikingJelly (2.0, or its PyPI release 0.0.0.0.14) relies on beyond
the dynamics: the backend argument, set_step_mode's container rule, surrogates of the user's own
and SpikingJelly's static surrogate methods, the state following .to(), store_v_seq, SLTT online
training with SpikingJelly layers."""
import pytest
import torch
from torch import nn

from pypaper.snn import functional, neuron, surrogate


def test_spikingjelly_0014_backend_argument_is_accepted():
    """SpikingJelly's PyPI release (0.0.0.0.14) passes backend='torch' | 'cupy' to its neurons
    and switches it with functional.set_backend; a model written that way runs unchanged and
    computes what the default does (pypaper runs its fused kernel either way)."""
    x = torch.randn(6, 4, 5) + 0.8
    ref = neuron.LIFNode(tau=2.0, step_mode="m")(x)
    lif = neuron.LIFNode(tau=2.0, step_mode="m", backend="cupy")
    plif = neuron.ParametricLIFNode(step_mode="m", backend="cupy")
    assert lif.backend == "cupy" and plif.backend == "cupy"
    assert torch.equal(lif(x), ref)
    model = nn.Sequential(nn.Linear(5, 5), neuron.LIFNode(step_mode="m"), nn.Linear(5, 5),
                          neuron.ParametricLIFNode(step_mode="m"))
    functional.set_backend(model, "cupy", instance=neuron.LIFNode)
    assert model[1].backend == "cupy" and model[3].backend == "torch"
    functional.set_backend(model, "cupy")
    assert model[3].backend == "cupy"
    with pytest.warns(UserWarning, match="does not support backend='lava'"):
        functional.set_backend(model, "lava")
    assert model[1].backend == "cupy"
    with pytest.raises(ValueError, match="backend must be one of"):
        neuron.LIFNode(backend="cuda")
    with pytest.raises(TypeError, match="pass backend= by keyword"):
        neuron.LIFNode(2.0, True, 1.0, 0.0, None, False, "m", "cupy")


def test_set_step_mode_leaves_the_children_of_step_mode_containers_alone():
    """SpikingJelly's rule: a MultiStepContainer loops a single-step module over T, so its child
    must stay 's'; set_step_mode (pypaper's and SpikingJelly's) sets everything else."""
    sj_layer = pytest.importorskip("spikingjelly.activation_based.layer")
    from spikingjelly.activation_based import functional as sj_functional

    for set_mode in (functional.set_step_mode, sj_functional.set_step_mode):
        inner = neuron.LIFNode()
        outside = neuron.LIFNode()
        net = nn.Sequential(sj_layer.MultiStepContainer(inner), outside)
        set_mode(net, "m")
        assert inner.step_mode == "s" and outside.step_mode == "m"
        x = torch.rand(4, 3, 8) * 2
        functional.reset_net(net)
        want = neuron.LIFNode(step_mode="m")(neuron.LIFNode(step_mode="m")(x))
        assert torch.equal(net(x), want) and inner.v.shape == (3, 8)


class _Boxcar(surrogate.SurrogateFunctionBase):
    """A surrogate of the user's own, written to SpikingJelly's contract."""

    @staticmethod
    def spiking_function(x, alpha):
        return _BoxcarFn.apply(x, alpha)

    @staticmethod
    def primitive_function(x, alpha):
        return torch.clamp(x * alpha + 0.5, 0, 1)


class _BoxcarFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, alpha):
        ctx.save_for_backward(x)
        ctx.alpha = alpha
        return (x >= 0).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (x.abs() < 0.5 / ctx.alpha).to(g.dtype) * ctx.alpha, None


def test_a_surrogate_of_ones_own_runs_in_the_neurons():
    """surrogate_id -1 and SpikingJelly's static methods: the neuron runs it (plain-PyTorch
    loop) and its gradient is the custom one - here the same box as the built-in Rect."""
    x = (torch.rand(5, 2, 6) * 2).requires_grad_()
    xr = x.detach().clone().requires_grad_()
    mine = neuron.LIFNode(surrogate_function=_Boxcar(alpha=1.0), step_mode="m")
    rect = neuron.LIFNode(surrogate_function=surrogate.Rect(alpha=1.0), step_mode="m")
    s, sr = mine(x), rect(xr)
    assert torch.equal(s, sr)
    s.sum().backward()
    sr.sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)
    assert torch.equal(_Boxcar(spiking=False)(torch.tensor([-1.0, 0.0, 1.0])),
                       torch.tensor([0.0, 0.5, 1.0]))


def test_builtin_surrogates_have_spikingjellys_static_methods():
    x = torch.linspace(-2, 2, 9, dtype=torch.float64, requires_grad=True)
    for cls in (surrogate.ATan, surrogate.Sigmoid, surrogate.Erf, surrogate.Rect):
        f = cls()
        s = cls.spiking_function(x, f.alpha)
        assert torch.equal(s, (x >= 0).to(x.dtype))
        g, = torch.autograd.grad(s.sum(), x)
        torch.testing.assert_close(g, f.derivative(x.detach()))
        torch.testing.assert_close(cls.backward(torch.ones(9, dtype=torch.float64), x.detach(),
                                                f.alpha), g)
        torch.testing.assert_close(cls.primitive_function(x.detach(), f.alpha),
                                   cls(spiking=False)(x.detach()))


def test_a_builtin_subclass_that_overrides_spiking_function_is_not_fused():
    class Halved(surrogate.ATan):
        @staticmethod
        def spiking_function(x, alpha):
            return surrogate.ATan.spiking_function(x, alpha) * 0.5

    assert surrogate.surrogate_spec(Halved()) is None
    assert surrogate.surrogate_spec(surrogate.ATan()) is not None


def test_state_follows_to_and_store_v_seq_setter_clears_it():
    lif = neuron.LIFNode(step_mode="m", store_v_seq=True)
    lif(torch.rand(3, 2, 4))
    lif.to(torch.float64)
    assert lif.v.dtype == torch.float64 and lif.v_seq.dtype == torch.float64
    lif.store_v_seq = False
    assert lif.v_seq is None


def test_sltt_online_switches_spikingjelly_layers_too():
    sj_layer = pytest.importorskip("spikingjelly.activation_based.layer")
    from pypaper.snn import sltt

    torch.manual_seed(0)
    net = nn.Sequential(sj_layer.Conv2d(1, 2, 3, padding=1), neuron.LIFNode(),
                        sj_layer.Flatten(), sj_layer.Linear(2 * 6 * 6, 3))
    functional.set_step_mode(net, "m")
    x = torch.rand(4, 2, 1, 6, 6)
    res = sltt.train_step_online(net, x, torch.tensor([0, 2]), nn.functional.cross_entropy)
    assert res.output.shape == (2, 3) and net[0].step_mode == "m" and net[1].step_mode == "m"
    assert net[0].weight.grad is not None


class _FastSig(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, a):
        ctx.save_for_backward(x)
        ctx.a = a
        return (x >= 0).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * ctx.a / (1 + (ctx.a * x).abs()) ** 2, None


class _Scaled(surrogate.SurrogateFunctionBase):
    """Written to SpikingJelly 2.0's contract: (spiking, **params), parameters by name."""

    def __init__(self, alpha=4.0, gain=0.5, spiking=True):
        super().__init__(spiking=spiking, alpha=alpha, gain=gain)

    @staticmethod
    def spiking_function(x, alpha, gain):
        return _FastSig.apply(x, alpha * gain)

    @staticmethod
    def primitive_function(x, alpha, gain):
        return 0.5 * (alpha * gain * x / (1 + (alpha * gain * x).abs())) + 0.5


def test_a_spikingjelly_2_surrogate_with_its_own_parameters_runs():
    """SpikingJelly 2.0's SurrogateFunctionBase(spiking=True, **params): each keyword is an
    attribute passed by name to the static methods (pypaper's base took only 0.0.0.0.14's
    (alpha, spiking): TypeError for a second parameter, alpha given twice for (spiking,
    alpha=...), a bool taken for alpha for (spiking))."""
    x = (torch.randn(5, 2, 6) * 2).requires_grad_()
    sg = _Scaled(gain=0.25)
    assert (sg.alpha, sg.gain) == (4.0, 0.25) and repr(sg) == "_Scaled(alpha=4.0, gain=0.25, spiking=True)"
    spikes = neuron.LIFNode(surrogate_function=sg, step_mode="m")(x)
    spikes.sum().backward()
    # the custom gradient: the same as a built-in-free hand loop's with slope alpha * gain = 1
    xr = x.detach().clone().requires_grad_()
    v, out = torch.zeros(2, 6), []
    for t in range(5):
        h = v + (xr[t] - v) / 2.0
        s = _FastSig.apply(h - 1.0, 1.0)
        v = h * (1 - s)
        out.append(s)
    torch.stack(out).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)
    assert float(x.grad.abs().sum()) > 0
    assert torch.equal(_Scaled(spiking=False)(torch.tensor([0.0])), torch.tensor([0.5]))

    class Positional(surrogate.SurrogateFunctionBase):
        def __init__(self, spiking=True):
            super().__init__(spiking, beta=2.0)

        @staticmethod
        def spiking_function(x, beta):
            return _FastSig.apply(x, beta)

    class Bare(surrogate.SurrogateFunctionBase):
        def __init__(self, spiking=True):
            super().__init__(spiking)

        @staticmethod
        def spiking_function(x):
            return _FastSig.apply(x, 1.0)

    assert Positional(False).spiking is False and Positional().beta == 2.0
    assert repr(Bare()) == "Bare(spiking=True)" and torch.equal(Bare()(torch.ones(2)), torch.ones(2))
    with pytest.raises(NotImplementedError, match="primitive_function"):
        Positional(spiking=False)(torch.ones(2))
    with pytest.raises(TypeError, match="by position and by keyword"):
        surrogate.SurrogateFunctionBase(2.0, True, alpha=3.0)


def test_a_tensor_alpha_is_read_at_each_call():
    """SpikingJelly keeps a tensor alpha as given: annealing it in place changes the next
    gradients, and a Parameter alpha is in the state_dict (loadable from SpikingJelly's). pypaper
    froze it at construction (alpha.item()) and refused a Parameter."""
    x = torch.randn(6, 3, 5) * 2
    alpha = torch.tensor(4.0)
    node = neuron.LIFNode(surrogate_function=surrogate.Sigmoid(alpha=alpha), step_mode="m")

    def grad(n):
        n.reset()
        xx = x.clone().requires_grad_()
        n(xx).sum().backward()
        return xx.grad

    want4 = grad(neuron.LIFNode(surrogate_function=surrogate.Sigmoid(alpha=4.0), step_mode="m"))
    want1 = grad(neuron.LIFNode(surrogate_function=surrogate.Sigmoid(alpha=1.0), step_mode="m"))
    assert torch.equal(grad(node), want4)
    alpha.fill_(1.0)
    assert torch.equal(grad(node), want1) and not torch.equal(want1, want4)
    learnable = neuron.LIFNode(surrogate_function=surrogate.ATan(alpha=nn.Parameter(torch.tensor(3.0))))
    assert list(learnable.state_dict()) == ["surrogate_function.alpha"]
    learnable.load_state_dict({"surrogate_function.alpha": torch.tensor(2.0)})
    assert surrogate.surrogate_spec(learnable.surrogate_function)[1] == 2.0
    with torch.no_grad():
        alpha.fill_(-1.0)
    with pytest.raises(ValueError, match="Sigmoid's alpha must be a positive finite number"):
        grad(node)
    with pytest.raises(ValueError, match="one-element floating tensor"):
        surrogate.ATan(alpha=torch.ones(2))


def test_surrogate_contracts_of_both_spikingjelly_releases_after_a_second_review():
    """0.0.0.0.14 passed alpha by position, whatever the static method named it; a class
    attribute default_alpha fills alpha=None; a surrogate pickled before the parameter names
    were kept still runs; an nn.Parameter alpha with spiking=False gets its gradient through
    the primitive (as SpikingJelly's); a lone positional bool (numpy's too) or a positional with
    keyword parameters is spiking (2.0), two positionals are (alpha, spiking)."""
    import numpy as np

    class Old14(surrogate.SurrogateFunctionBase):
        default_alpha = 3.0

        def __init__(self, alpha=None, spiking=True):
            super().__init__(alpha, spiking)

        @staticmethod
        def spiking_function(x, a):
            return _FastSig.apply(x, a)

        @staticmethod
        def primitive_function(x, a):
            return torch.sigmoid(a * x)

    class MyATan(surrogate.ATan):
        @staticmethod
        def spiking_function(x, a):
            return surrogate.ATan.spiking_function(x, a) * 1.0

    old = Old14()
    assert old.alpha == 3.0 and old(torch.tensor([0.5])).item() == 1.0
    assert Old14(2.0, False)(torch.tensor([0.0])).item() == 0.5
    x = torch.rand(3, 2, requires_grad=True)
    neuron.LIFNode(surrogate_function=old, step_mode="m")(x).sum().backward()
    assert x.grad is not None and MyATan()(torch.ones(2)).sum() == 2
    del old.__dict__["_sg_param_names"]  # as unpickled from before
    assert repr(old) == "Old14(alpha=3.0, spiking=True)" and old(torch.ones(1)).item() == 1.0
    alpha = nn.Parameter(torch.tensor(2.0))
    xs = torch.linspace(0.1, 1, 5)
    surrogate.ATan(alpha=alpha, spiking=False)(xs).sum().backward()
    a = torch.tensor(2.0, requires_grad=True)
    (torch.atan(xs * (torch.pi / 2 * a)) / torch.pi + 0.5).sum().backward()
    torch.testing.assert_close(alpha.grad, a.grad)
    assert float(alpha.grad.abs()) > 0

    class V20(surrogate.SurrogateFunctionBase):
        def __init__(self, spiking=True, beta=1.0):
            super().__init__(spiking, beta=beta)

        @staticmethod
        def spiking_function(x, beta):
            return _FastSig.apply(x, beta)

    assert V20(np.bool_(False)).spiking is False and V20(0).spiking is False
    assert V20(torch.tensor(True)).beta == 1.0
    with pytest.raises(TypeError, match="spiking given by position and by keyword"):
        surrogate.SurrogateFunctionBase(True, spiking=False)


@pytest.mark.parametrize("step_mode", ["s", "m"])
@pytest.mark.parametrize("cls,kw", [("LIFNode", {}), ("IFNode", {}), ("ParametricLIFNode", {}),
                                    ("LIFNode", dict(v_reset=None, decay_input=False, tau=3.0))])
def test_functional_forward_with_explicit_state_as_spikingjelly(cls, kw, step_mode):
    """SpikingJelly 2.0's explicit-state API on a neuron (functional_forward, the single- and
    multi-step forms, materialize_states): same outputs and states as SpikingJelly's, for a float
    state, a tensor state and one of another shape (restarts from rest), and neither the module's
    membrane nor the states passed in change."""
    sj_neuron = pytest.importorskip("spikingjelly.activation_based.neuron")
    from pypaper.snn import neuron as pp_neuron

    torch.manual_seed(0)
    ours = getattr(pp_neuron, cls)(step_mode=step_mode, **kw)
    theirs = getattr(sj_neuron, cls)(step_mode=step_mode, **kw)
    x = torch.randn(4, 3, 5) * 2 if step_mode == "m" else torch.randn(3, 5) * 2
    v0 = torch.randn(3, 5)
    for state in [(0.0,), (0.4,), (v0,), (torch.randn(2, 5),)]:
        kept = [s.clone() if isinstance(s, torch.Tensor) else s for s in state]
        (got,), (v_got,) = ours.functional_forward((x,), state)
        (want,), (v_want,) = theirs.functional_forward((x,), state)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(v_got, v_want)
        assert ours.v == 0.0
        for s, k in zip(state, kept):
            assert torch.equal(s, k) if isinstance(s, torch.Tensor) else s == k
    assert got.shape == x.shape and got.any()
    # the explicit forms, differentiable as the module's call
    xs = x.clone().requires_grad_()
    (spikes,), (v,) = ours.functional_forward((xs,), ours.materialize_states((xs,), (v0,),
                                                                             step_mode))
    (spikes.sum() + v.sum()).backward()
    assert xs.grad is not None and xs.grad.abs().sum() > 0
