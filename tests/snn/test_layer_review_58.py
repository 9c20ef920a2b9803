"""Differential tests, pypaper.snn.layer / functional against SpikingJelly 2.0 (installed), for
what a model switching ``from spikingjelly.activation_based import layer, functional`` to
``from pypaper.snn import layer, functional`` met after review 58: the StepModule method
``supported_step_mode()`` on every layer and container, and SpikingJelly 2.0's MemoryModule API
(explicit-state ``functional_forward`` and its single- / multi-step forms, ``materialize_states``,
``single_step_forward`` / ``multi_step_forward``, ``detach``) on Dropout / Dropout2d."""
import pytest
import torch
from torch import nn

from pypaper.snn import layer as pl

sj_layer = pytest.importorskip("spikingjelly.activation_based.layer")

# (class name, constructor args) of every layer pypaper implements itself
LAYERS = [
    ("Linear", (3, 2)), ("Flatten", ()), ("Conv1d", (1, 1, 1)), ("Conv2d", (1, 1, 1)),
    ("Conv3d", (1, 1, 1)), ("ConvTranspose1d", (1, 1, 1)), ("ConvTranspose2d", (1, 1, 1)),
    ("ConvTranspose3d", (1, 1, 1)), ("BatchNorm1d", (2,)), ("BatchNorm2d", (2,)),
    ("BatchNorm3d", (2,)), ("GroupNorm", (1, 2)), ("MaxPool1d", (2,)), ("MaxPool2d", (2,)),
    ("MaxPool3d", (2,)), ("AvgPool1d", (2,)), ("AvgPool2d", (2,)), ("AvgPool3d", (2,)),
    ("AdaptiveAvgPool1d", (2,)), ("AdaptiveAvgPool2d", (2,)), ("AdaptiveAvgPool3d", (2,)),
    ("Upsample", (None, 2.0)), ("VotingLayer", (2,)), ("Dropout", (0.5,)), ("Dropout2d", (0.5,)),
    ("SeqToANNContainer", (nn.Identity(),)), ("MultiStepContainer", (nn.Identity(),)),
    ("StepModeContainer", (False, "s", nn.Identity())),
]


@pytest.mark.parametrize("name,args", LAYERS, ids=[c[0] for c in LAYERS])
def test_supported_step_mode_is_spikingjellys(name, args):
    """SpikingJelly's StepModule has ``supported_step_mode()`` (its step_mode setter checks
    against it); pypaper's layers raised AttributeError."""
    ours, theirs = getattr(pl, name)(*args), getattr(sj_layer, name)(*args)
    assert tuple(ours.supported_step_mode()) == tuple(theirs.supported_step_mode())


@pytest.mark.parametrize("lib", ["spikingjelly", "pypaper"])
def test_a_subclass_restricting_supported_step_mode_is_enforced(lib):
    """A subclass overriding supported_step_mode() (SpikingJelly's way to restrict a module's
    modes) is refused the other mode by the step_mode setter in either library."""
    base = sj_layer.Conv2d if lib == "spikingjelly" else pl.Conv2d

    class MultiStepConv(base):
        def supported_step_mode(self):
            return ("m",)

    m = MultiStepConv(1, 1, 1, step_mode="m")
    assert m.supported_step_mode() == ("m",)
    with pytest.raises(ValueError):
        m.step_mode = "s"
    with pytest.raises(ValueError):
        MultiStepConv(1, 1, 1)  # default step_mode 's'


def _x(step_mode):
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 2, 4, 3, 3, generator=g) if step_mode == "m" else \
        torch.randn(2, 4, 3, 3, generator=g)


@pytest.mark.parametrize("step_mode", ["s", "m"])
@pytest.mark.parametrize("name", ["Dropout", "Dropout2d"])
def test_dropout_functional_forward_as_spikingjelly(name, step_mode):
    """SpikingJelly 2.0's explicit-state API on Dropout: ``functional_forward((x,), (mask,))``
    draws a mask from a None state, returns it, reuses a given one, leaves the module's own
    mask alone and passes x and the mask through in eval. pypaper's Dropout had none of it."""
    x = _x(step_mode)
    res = {}
    for lib, mod in (("sj", sj_layer), ("pp", pl)):
        d = getattr(mod, name)(0.5, step_mode=step_mode)
        torch.manual_seed(0)
        (y1,), (mask1,) = d.functional_forward((x,), (None,))
        assert d.mask is None  # the module's state is not touched
        (y2,), (mask2,) = d.functional_forward((2 * x,), (mask1,))
        assert mask2 is mask1
        s_states = d.materialize_states((x,), (None,), step_mode)
        d.eval()
        (y3,), (mask3,) = d.functional_forward((x,), (mask1,))
        assert y3 is x and mask3 is mask1
        res[lib] = (y1, mask1, y2, s_states)
    for a, b in zip(res["sj"], res["pp"]):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        else:
            assert a == b


@pytest.mark.parametrize("name", ["Dropout", "Dropout2d"])
def test_dropout_step_forwards_and_detach_as_spikingjelly(name):
    """single_step_forward / multi_step_forward (called directly, whatever step_mode says) keep
    the mask as forward does, and detach() exists (SpikingJelly's detach_net and code walking
    a model's stateful modules call it)."""
    xs, xm = _x("s"), _x("m")
    outs = {}
    for lib, mod in (("sj", sj_layer), ("pp", pl)):
        d = getattr(mod, name)(0.5)
        torch.manual_seed(0)
        a = d.single_step_forward(xs)
        b = d.multi_step_forward(xm)  # the mask drawn by the 's' step, kept for every step
        mask = d.mask
        d.mask = mask.clone().requires_grad_()
        d.detach()
        assert not d.mask.requires_grad
        d.reset()
        assert d.mask is None
        outs[lib] = (a, b, mask)
    for a, b in zip(outs["sj"], outs["pp"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("step_mode", ["s", "m"])
def test_batchnorm_subclass_overriding_super_forward_as_spikingjelly(step_mode):
    """SpikingJelly's BatchNorm1d/2d/3d run both step modes through ``super_forward``; a
    subclass overriding it (a custom normalisation keeping the step-mode handling) was silently
    ignored by pypaper's, which called torch's forward directly."""
    x = _x(step_mode)
    outs = {}
    for lib, mod in (("sj", sj_layer), ("pp", pl)):
        class ShiftedBN(mod.BatchNorm2d):
            def super_forward(self, x):
                assert x.dim() == 4  # one batch [N, C, H, W] or [T * N, C, H, W]
                return super().super_forward(x) + 1.0

        m = ShiftedBN(4, step_mode=step_mode)
        xx = x.clone().requires_grad_()
        y = m(xx)
        (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
        outs[lib] = (y.detach(), xx.grad, m.running_mean, m.running_var)
    for a, b in zip(outs["sj"], outs["pp"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("step_mode", ["s", "m"])
def test_voting_layer_subclass_overriding_single_step_forward_as_spikingjelly(step_mode):
    """SpikingJelly's VotingLayer runs its ``single_step_forward`` (on [T * N, C] in 'm');
    pypaper's had none, so an override was ignored."""
    x = torch.rand(3, 2, 6) if step_mode == "m" else torch.rand(2, 6)
    outs = {}
    for lib, mod in (("sj", sj_layer), ("pp", pl)):
        class MaxVoting(mod.VotingLayer):
            def single_step_forward(self, x):
                assert x.dim() == 2
                return torch.nn.functional.max_pool1d(x.unsqueeze(1), self.voting_size).squeeze(1)

        outs[lib] = MaxVoting(3, step_mode=step_mode)(x)
    torch.testing.assert_close(outs["sj"], outs["pp"], rtol=0, atol=0)


@pytest.mark.parametrize("step_mode", ["s", "m"])
def test_conv_bn_fusion_on_a_pypaper_model(step_mode):
    import importlib

    from pypaper.snn import functional, neuron

    fusion = importlib.import_module("pypaper.snn.functional.conv_bn_fusion")
    torch.manual_seed(0)
    # eps well above its default, and an affine map of its own: a fusion that dropped either
    # (folding the statistics only) would still match with gamma = 1, beta = 0, eps = 1e-5
    net = nn.Sequential(pl.Conv2d(1, 4, 3, padding=1), pl.BatchNorm2d(4, eps=0.25),
                        neuron.IFNode(), pl.Flatten(), pl.Linear(64, 3))
    functional.set_step_mode(net, step_mode)
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
        net[1].weight.uniform_(0.5, 2)
        net[1].bias.uniform_(-1, 1)
    net.eval()
    x = torch.rand(2, 2, 1, 4, 4) if step_mode == "m" else torch.rand(2, 1, 4, 4)
    # the neuron's input too (the fused model shares the neuron): its spikes alone hide most
    # errors of the folded weights, which rarely move a value across the threshold
    seen = []
    net[2].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    want = net(x)
    functional.reset_net(net)
    fused = fusion.fuse_conv_bn_eval_modules(net)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    torch.testing.assert_close(fused(x), want)
    assert len(seen) == 2
    torch.testing.assert_close(seen[1], seen[0])
