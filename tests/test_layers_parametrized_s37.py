"""pypaper's own layers as the target of torch's weight reparametrizations: torch.nn.utils.
parametrize (parametrizations.weight_norm / spectral_norm / a user's own), torch.nn.utils.prune
(weight = weight_orig * weight_mask, written by a forward pre-hook) and the deprecated hook-based
torch.nn.utils.weight_norm.

Each case compares with a twin holding the effective weight as a plain Parameter: the output is
the twin's, and the gradient of the ORIGINAL parameters is the twin's weight gradient carried
through the reparametrization by plain autograd (float64).
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize, prune
from torch.nn.utils.parametrizations import spectral_norm, weight_norm

from pypaper.hopfield import Hopfield, HopfieldLayer
from pypaper.local import FFClassEmbeddingLinear, FFLinear, TargetProjectionLinear
from pypaper.snn.delays import DelayedLinear

DT = torch.float64


# ---- reparametrizations and their effective weight ----------------------------------------------

def _wn(m, name="weight"):
    weight_norm(m, name)


def _sn(m, name="weight"):
    spectral_norm(m, name)


def _prune(m, name="weight"):
    prune.l1_unstructured(m, name, amount=0.5)


def _hook_wn(m, name="weight"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its deprecation warning
        torch.nn.utils.weight_norm(m, name)


class _Scale(nn.Module):  # a user's own parametrization: W = 2 tanh(A)
    def forward(self, a):
        return 2 * torch.tanh(a)


def _tanh(m, name="weight"):
    parametrize.register_parametrization(m, name, _Scale())


REPARAMS = {"weight_norm": _wn, "spectral_norm": _sn, "prune": _prune, "hook_weight_norm": _hook_wn,
            "tanh": _tanh}


def _originals(m, name="weight"):
    """The leaf parameters the reparametrized tensor ``name`` of ``m`` is computed from."""
    if parametrize.is_parametrized(m, name):
        return list(m.parametrizations[name].parameters())
    if hasattr(m, name + "_orig"):  # prune
        return [getattr(m, name + "_orig")]
    return [getattr(m, name + "_g"), getattr(m, name + "_v")]


def _effective(m, name="weight"):
    """The tensor ``name`` as the next forward computes it, with its graph to the originals
    (spectral_norm without a power iteration: the u, v the last step left)."""
    if parametrize.is_parametrized(m, name):
        with parametrize.cached():
            was = m.training
            m.eval()  # parametrizations.spectral_norm iterates only in training
            try:
                return getattr(m, name)
            finally:
                m.train(was)
    if hasattr(m, name + "_mask"):
        return getattr(m, name + "_orig") * getattr(m, name + "_mask")
    return torch._weight_norm(getattr(m, name + "_v"), getattr(m, name + "_g"), 0)


def _chain(m, grad_w, name="weight"):
    """Plain autograd: d(loss)/d(originals) = (dW/d originals)^T grad_w."""
    origs = _originals(m, name)
    return torch.autograd.grad(_effective(m, name), origs, grad_w)


# ---- pypaper.local: gradient computed inside local_step, written to .grad -------------------------

def _local_cases():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 5, generator=g, dtype=DT)
    xn = torch.randn(7, 5, generator=g, dtype=DT)
    y = torch.randint(0, 3, (7,), generator=g)
    return {
        "FFLinear": (lambda: FFLinear(5, 4, threshold=0.5, dtype=DT),
                     lambda m: m.local_step(x, xn)),
        "FFClassEmbeddingLinear": (lambda: FFClassEmbeddingLinear(5, 4, 3, dtype=DT),
                                   lambda m: m.local_step(x, y)),
        "TargetProjectionLinear": (lambda: TargetProjectionLinear(5, 4, 3, "tanh", dtype=DT),
                                   lambda m: m.local_step(x, y)),
    }, x


def _twin(layer, make):
    """The same layer with the current effective weight as a plain Parameter."""
    twin = make()
    with torch.no_grad():
        twin.weight.copy_(_effective(layer))
        twin.bias.copy_(layer.bias)
    return twin


@pytest.mark.parametrize("reparam", sorted(REPARAMS))
@pytest.mark.parametrize("cls", ["FFLinear", "FFClassEmbeddingLinear", "TargetProjectionLinear"])
def test_local_step_gradient_reaches_the_original_parameters(cls, reparam):
    """local_step wrote dL/dW into .grad of the recomputed (non-leaf) weight: the originals
    (parametrizations.weight.original*, weight_orig, weight_g / weight_v) got no gradient and the
    optimizer never moved the weight, silently (only torch's non-leaf .grad warning)."""
    cases, _ = _local_cases()
    make, step = cases[cls]
    torch.manual_seed(0)
    layer = make()
    REPARAMS[reparam](layer)
    loss, *_ = step(layer)
    twin = _twin(layer, make)  # after the step: spectral_norm's power iteration ran in it
    loss_t, *_ = step(twin)
    torch.testing.assert_close(loss, loss_t)
    for p, e in zip(_originals(layer), _chain(layer, twin.weight.grad)):
        assert p.grad is not None, f"{reparam}: no gradient reached the original parameters"
        torch.testing.assert_close(p.grad, e)
    torch.testing.assert_close(layer.bias.grad, twin.bias.grad)


@pytest.mark.parametrize("reparam", ["weight_norm", "prune", "hook_weight_norm"])
def test_local_step_accumulates_and_trains_the_current_weight(reparam):
    """Two local_steps add their gradients (as two backwards do), and after an optimizer step
    the next local_step / forward / goodness use the updated effective weight (a pruned weight
    attribute is only refreshed by a call of the module)."""
    cases, x = _local_cases()
    make, step = cases["FFLinear"]
    layer = make()
    REPARAMS[reparam](layer)
    twin = _twin(layer, make)
    for m in (layer, layer, twin, twin):
        step(m)
    for p, e in zip(_originals(layer), _chain(layer, twin.weight.grad)):
        torch.testing.assert_close(p.grad, e)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    for _ in range(3):
        opt.step()
        opt.zero_grad()
        step(layer)
    twin = _twin(layer, make)
    loss, *_ = step(layer)
    loss_t, *_ = step(twin)
    torch.testing.assert_close(loss, loss_t)
    torch.testing.assert_close(layer.goodness(x), twin.goodness(x))
    torch.testing.assert_close(layer(x), twin(x))


def test_local_step_frozen_original_gets_no_grad():
    """A frozen original (requires_grad=False) gets no .grad, as a frozen nn.Linear weight."""
    cases, _ = _local_cases()
    make, step = cases["TargetProjectionLinear"]
    layer = make()
    _wn(layer)
    layer.parametrizations.weight.original1.requires_grad_(False)  # v frozen, g trained
    step(layer)
    assert layer.parametrizations.weight.original1.grad is None
    assert layer.parametrizations.weight.original0.grad is not None


def test_local_parametrized_state_dict_round_trip():
    """Control (passed before): a pruned layer's state_dict loads into another pruned one."""
    cases, x = _local_cases()
    make, step = cases["FFClassEmbeddingLinear"]
    layer = make()
    _prune(layer)
    step(layer)
    other = make()
    _prune(other)
    other.load_state_dict(layer.state_dict())
    torch.testing.assert_close(other(x), layer(x))


# ---- pypaper.hopfield: the core's weights are read by Hopfield, not by calling the core ---------

def _hopfield_twin(h, name="in_proj_weight"):
    t = Hopfield(input_size=8, num_heads=2).to(DT)
    params = dict(h.named_parameters())
    with torch.no_grad():
        for k, p in t.named_parameters():
            if k in params:
                p.copy_(params[k])
        getattr(t.association_core, name).copy_(_effective(h.association_core, name))
    return t


@pytest.mark.parametrize("reparam", ["prune", "hook_weight_norm", "weight_norm"])
def test_hopfield_core_reparametrized_trains(reparam):
    """prune / the hook weight_norm on association_core (where in_proj_weight lives): its
    pre-hook never ran (Hopfield reads the core's weights in project(), the core is never
    called), so the second backward raised "Trying to backward through the graph a second
    time", and the forward kept the weight computed when the hook was applied."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8, dtype=DT)
    h = Hopfield(input_size=8, num_heads=2).to(DT)
    REPARAMS[reparam](h.association_core, "in_proj_weight")
    opt = torch.optim.SGD(h.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        h(x).square().sum().backward()
        opt.step()
    opt.zero_grad()
    twin = _hopfield_twin(h)
    y, yt = h(x), twin(x)
    torch.testing.assert_close(y, yt)
    y.square().sum().backward()
    yt.square().sum().backward()
    core = h.association_core
    for p, e in zip(_originals(core, "in_proj_weight"),
                    _chain(core, twin.association_core.in_proj_weight.grad, "in_proj_weight")):
        torch.testing.assert_close(p.grad, e)


def test_hopfield_layer_core_pruned_association_matrix_is_current():
    """The accessors go through the same projection: after an optimizer step they use the
    current pruned weight."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8, dtype=DT)
    h = HopfieldLayer(8, quantity=4).to(DT)
    _prune(h.hopfield.association_core, "in_proj_weight")
    opt = torch.optim.SGD(h.parameters(), lr=1.0)
    h(x).sum().backward()
    opt.step()
    sd = h.state_dict()
    key = "hopfield.association_core.in_proj_weight"
    sd[key] = sd.pop(key + "_orig") * sd.pop(key + "_mask")
    plain = HopfieldLayer(8, quantity=4).to(DT)
    plain.load_state_dict(sd)
    torch.testing.assert_close(h.get_association_matrix(x), plain.get_association_matrix(x))
    torch.testing.assert_close(h(x), plain(x))


# ---- pypaper.snn.DelayedLinear: positions under a user's parametrization -------------------------

class _Shift(nn.Module):  # p = u + 1, invertible
    def forward(self, u):
        return u + 1.0

    def right_inverse(self, p):
        return p - 1.0


class _ShiftNoInverse(nn.Module):
    def forward(self, u):
        return u + 1.0


class _Sigmoid(nn.Module):  # p = (K - 1) sigmoid(u): always in range
    def forward(self, u):
        return 4.0 * torch.sigmoid(u)


def test_delayed_linear_parametrized_positions_gradient():
    """Control (passed before): the forward reads the property, gradients reach u."""
    torch.manual_seed(0)
    x = torch.randn(6, 2, 4, dtype=DT)
    layer = DelayedLinear(4, 3, 5, dtype=DT)
    parametrize.register_parametrization(layer, "position", _Sigmoid())
    twin = DelayedLinear(4, 3, 5, dtype=DT)
    with torch.no_grad():
        twin.weight.copy_(layer.weight)
        twin.bias.copy_(layer.bias)
        twin.position.copy_(layer.position)
    g = torch.randn(6, 2, 3, dtype=DT)
    (layer(x) * g).sum().backward()
    (twin(x) * g).sum().backward()
    (e,) = _chain(layer, twin.position.grad, "position")
    torch.testing.assert_close(layer.parametrizations.position.original.grad, e)


def test_delayed_linear_clamp_positions_through_parametrization():
    """clamp_positions_ clamped the recomputed attribute in place: a temporary, the stored u
    kept positions outside [0, K - 1], silently."""
    layer = DelayedLinear(4, 3, 5)
    parametrize.register_parametrization(layer, "position", _Shift())
    with torch.no_grad():
        layer.parametrizations.position.original.mul_(3).sub_(2)
    assert layer.position.max() > 4 or layer.position.min() < 0
    layer.clamp_positions_()
    p = layer.position.detach()
    assert 0 <= float(p.min()) and float(p.max()) <= 4

    inrange = DelayedLinear(4, 3, 5)
    parametrize.register_parametrization(inrange, "position", _Sigmoid())
    before = inrange.parametrizations.position.original.detach().clone()
    inrange.clamp_positions_()  # in range already: nothing to write
    torch.testing.assert_close(inrange.parametrizations.position.original, before)

    stuck = DelayedLinear(4, 3, 5)
    parametrize.register_parametrization(stuck, "position", _ShiftNoInverse())
    with torch.no_grad():
        stuck.parametrizations.position.original.fill_(9.0)
    with pytest.raises(RuntimeError, match="clamp_positions_: position is parametrized by"):
        stuck.clamp_positions_()


def test_delayed_linear_round_delays_refuses_parametrized_positions():
    """round_delays rounded and froze a temporary: the positions kept learning with finalized
    set. Now a clear refusal, before anything changes."""
    layer = DelayedLinear(4, 3, 5)
    parametrize.register_parametrization(layer, "position", _Shift())
    with pytest.raises(RuntimeError, match="round_delays: position is computed by"):
        layer.round_delays()
    assert not layer.finalized and layer.sigma == layer.sigma_init
    assert layer.parametrizations.position.original.requires_grad
    parametrize.remove_parametrizations(layer, "position")  # the remedy the message names
    layer.round_delays()
    assert layer.finalized and not layer.position.requires_grad


@pytest.mark.parametrize("reparam", ["weight_norm", "prune", "hook_weight_norm"])
def test_delayed_linear_weight_reparametrized(reparam):
    """Control (passed before): weights under weight_norm / pruning, two training steps."""
    torch.manual_seed(0)
    x = torch.randn(6, 2, 4, dtype=DT)
    layer = DelayedLinear(4, 3, 5, dtype=DT)
    REPARAMS[reparam](layer)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        layer(x).square().sum().backward()
        opt.step()
    twin = DelayedLinear(4, 3, 5, dtype=DT)
    with torch.no_grad():
        twin.weight.copy_(_effective(layer))
        twin.bias.copy_(layer.bias)
        twin.position.copy_(layer.position)
    torch.testing.assert_close(layer(x), twin(x))


# ---- a local aux head's linear, WTA-CRS's weight read (2026-12-07, after the review) -----------

@pytest.mark.parametrize("reparam", ["prune", "hook_weight_norm"])
def test_local_aux_head_linear_reparametrized_trains(reparam):
    """LinearHead.loss reads its linear's weight without calling the linear: with prune or the
    hook weight_norm on it, the second step raised "Trying to backward through the graph a second
    time" (and the weight was the one computed when the reparametrization was applied)."""
    from pypaper.local import LinearHead

    torch.manual_seed(0)
    head = LinearHead(4, 3).double()
    REPARAMS[reparam](head.linear)
    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    feat = torch.randn(6, 4, 2, 2, dtype=DT)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    for _ in range(3):
        loss, _ = head.loss(feat, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    # the loss is the plain head's on the current effective weight
    w, b = _effective(head.linear), head.linear.bias
    want = nn.functional.cross_entropy(nn.functional.linear(feat.mean((2, 3)), w, b), y)
    torch.testing.assert_close(head.loss(feat, y)[0], want)


def test_wtacrs_reads_a_spectral_norm_weight_once_per_step():
    """WTACRSLinear read self.weight twice per training forward: spectral_norm's power iteration
    (one per read in training) ran twice where nn.Linear's runs once, so its u, v estimate
    drifted from the twin's."""
    from pypaper.wtacrs import WTACRSLinear

    torch.manual_seed(0)
    lin = nn.Linear(8, 5).double()
    w = WTACRSLinear(8, 5, keep_ratio=0.5).double()
    with torch.no_grad():
        w.weight.copy_(lin.weight)
        w.bias.copy_(lin.bias)
    _sn(lin)
    _sn(w)
    w.parametrizations.weight[0]._u.copy_(lin.parametrizations.weight[0]._u)
    w.parametrizations.weight[0]._v.copy_(lin.parametrizations.weight[0]._v)
    x = torch.randn(16, 8, dtype=DT)
    lin(x)
    w(x).sum().backward()
    torch.testing.assert_close(w.parametrizations.weight[0]._u,
                               lin.parametrizations.weight[0]._u, rtol=0, atol=0)
