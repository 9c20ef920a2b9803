"""Review s34 of pypaper.snn.layer / base / functional against SpikingJelly 2.0 (installed): what
a model switching ``from spikingjelly.activation_based import layer, functional, base`` to
``from pypaper.snn import ...`` met. Each test compares with SpikingJelly's own module on the
same seed and weights, and failed before its fix."""
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize, parametrizations

from pypaper.snn import layer as pl

sj_layer = pytest.importorskip("spikingjelly.activation_based.layer")


class _Double(nn.Module):
    """A plain parametrization: the layer sees 2 * its stored weight."""

    def forward(self, w):
        return 2 * w


def _param_cases():
    # (name, constructor args, one step's input shape, how the weight is parametrized)
    return [
        ("Conv2d", (2, 3, 3), (2, 2, 6, 6), "weight_norm"),
        ("Conv1d", (2, 3, 3), (2, 2, 7), "weight_norm"),
        ("ConvTranspose2d", (2, 3, 3), (2, 2, 5, 5), "weight_norm"),
        ("Linear", (5, 4), (2, 5), "spectral_norm"),
        ("BatchNorm2d", (3,), (4, 3, 4, 4), "double"),
        ("BatchNorm1d", (3,), (4, 3), "double"),
        ("GroupNorm", (1, 3), (2, 3, 4, 4), "double"),
    ]


def _parametrize(m, how):
    if how == "weight_norm":
        parametrizations.weight_norm(m)
    elif how == "spectral_norm":
        parametrizations.spectral_norm(m)
    else:
        parametrize.register_parametrization(m, "weight", _Double())
    return m


@pytest.mark.parametrize("step_mode", ["s", "m"])
@pytest.mark.parametrize("name,args,shape,how", _param_cases(),
                         ids=[f"{c[0]}-{c[3]}" for c in _param_cases()])
def test_weight_parametrizations_run_as_in_spikingjelly(name, args, shape, how, step_mode):
    """torch.nn.utils.parametrize (weight_norm, spectral_norm, orthogonal, one's own) swaps the
    layer's class for a subclass it builds in torch.nn.utils.parametrize; pypaper's layers took
    that subclass for the torch layer they wrap and raised ValueError ('duplicate parameter
    name: step_mode') at registration (BatchNorm would have recursed in super_forward).
    SpikingJelly's layers take the parametrization; pypaper's must give the same numbers."""
    torch.manual_seed(0)
    theirs = _parametrize(getattr(sj_layer, name)(*args, step_mode=step_mode), how)
    ours = _parametrize(getattr(pl, name)(*args, step_mode=step_mode), how)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(((3,) if step_mode == "m" else ()) + shape)
    for train in (True, False):
        ours.train(train), theirs.train(train)
        torch.manual_seed(1)  # spectral_norm's power iteration in train mode
        want = theirs(x)
        torch.manual_seed(1)
        got = ours(x)
        torch.testing.assert_close(got, want)
    got.sum().backward()
    assert all(p.grad is not None for p in ours.parameters() if p.requires_grad)
    # removing the parametrization gives the torch layer with its step mode back
    parametrize.remove_parametrizations(ours, "weight")
    assert type(ours) is getattr(pl, name) and ours.step_mode == step_mode


@pytest.mark.parametrize("step_mode,shape", [("s", (0, 20)), ("s", (0, 21)), ("m", (3, 0, 20)),
                                             ("m", (0, 2, 20)), ("m", (3, 2, 21))])
def test_voting_layer_on_an_empty_batch_or_sequence(step_mode, shape):
    """VotingLayer reshaped its pooled output with a -1, which an empty batch or sequence (0
    elements) cannot resolve: RuntimeError 'cannot reshape tensor of 0 elements', where
    SpikingJelly's gives [0, C] / [T, 0, C]. Same shapes and values as SpikingJelly's, gradients
    included (a last partial batch of size 0, an empty shard)."""
    x = torch.randn(shape, requires_grad=True)
    theirs = sj_layer.VotingLayer(10, step_mode=step_mode)
    ours = pl.VotingLayer(10, step_mode=step_mode)
    want, got = theirs(x), ours(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want)
    (g_want,) = torch.autograd.grad(want.sum(), x)
    (g_got,) = torch.autograd.grad(got.sum(), x)
    torch.testing.assert_close(g_got, g_want)
