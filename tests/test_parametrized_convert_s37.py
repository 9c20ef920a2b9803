"""Layers with parametrizations, pruning masks or hook-based weight_norm / spectral_norm through
pypaper's converters: quant.quantize_ (+ HAWQ), quant.fewbit.convert, wtacrs.convert
(pypaper/_module_swap.py).

The effective weight is what the converted layer must use (or a clear refusal naming the
parametrization); the module swapped out must keep working; modules inside a parametrization
(weight transforms) are no layers of the model to convert.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize, prune
from torch.nn.utils.parametrizations import weight_norm

import pypaper.quant as Q
from pypaper import wtacrs
from pypaper.quant import fewbit

CONFIGS = [Q.Int8WeightOnlyConfig(), Q.Int8DynamicConfig(), Q.Int4WeightOnlyConfig(32),
           Q.PowerExponentConfig(4, 1.0)]


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4)).eval()


def _plain_twin(model):
    """The same model with every layer's current weight as a plain Parameter."""
    twin = _model()
    with torch.no_grad():
        for i in (0, 2):
            src = model[i]
            if hasattr(src, "weight_orig") and isinstance(
                    next(iter(src._forward_pre_hooks.values()), None), prune.BasePruningMethod):
                w = src.weight_orig * src.weight_mask
            elif hasattr(src, "weight_g"):
                w = torch._weight_norm(src.weight_v, src.weight_g, 0)
            elif hasattr(src, "weight_u"):  # hook spectral_norm, eval: no power iteration
                wm = src.weight_orig
                w = wm / torch.dot(src.weight_u, wm @ src.weight_v)
            else:
                w = src.weight
            twin[i].weight.copy_(w)
            twin[i].bias.copy_(src.bias)
    return twin


def _pruned():
    m = _model()
    prune.l1_unstructured(m[0], "weight", amount=0.5)
    with torch.no_grad():  # an optimizer step on weight_orig, no forward since: .weight is stale
        m[0].weight_orig.add_(torch.randn_like(m[0].weight_orig) * 0.1)
    return m


def _hook_weight_norm():
    m = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.nn.utils.weight_norm(m[0])
    with torch.no_grad():
        m[0].weight_g.mul_(1.5)  # a step on g: the attribute .weight is stale
    return m


def _hook_spectral_norm():
    m = _model()
    torch.nn.utils.spectral_norm(m[0])
    m.eval()
    return m


@pytest.mark.parametrize("make", [_pruned, _hook_weight_norm, _hook_spectral_norm])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: type(c).__name__)
def test_quantize_hook_reparametrized_layer_uses_current_weight(make, config):
    # before: the prune / weight_norm / spectral_norm forward pre-hook was shared onto the
    # quantized layer, and the model's first forward raised AttributeError (no weight_orig /
    # weight_g): after the swap, so the model was left broken
    torch.manual_seed(1)
    x = torch.randn(5, 32)
    m = make()
    twin = _plain_twin(m)
    Q.quantize_(m, config)
    Q.quantize_(twin, config)
    with torch.no_grad():
        torch.testing.assert_close(m(x), twin(x), rtol=0, atol=0)
    assert not any(isinstance(h, (prune.BasePruningMethod,)) for h in m[0]._forward_pre_hooks.values())


def test_pruned_layer_swapped_out_keeps_working_and_user_hooks_follow():
    torch.manual_seed(2)
    x = torch.randn(5, 32)
    m = _pruned()
    fc = m[0]
    calls = []
    handle = fc.register_forward_pre_hook(lambda mod, args: calls.append(type(mod).__name__))
    with torch.no_grad():
        ref_fc = F.linear(x, fc.weight_orig * fc.weight_mask, fc.bias)
    Q.quantize_(m, Q.Int8WeightOnlyConfig())
    with torch.no_grad():
        m(x)
    assert calls == ["Int8WeightOnlyLinear"]  # the user's hook runs on the layer in the model
    handle.remove()
    with torch.no_grad():
        m(x)
    assert calls == ["Int8WeightOnlyLinear"]  # and its handle removes it there
    # the float layer, out of the model, still runs its pruning (and can be made permanent)
    with torch.no_grad():
        torch.testing.assert_close(fc(x), ref_fc)
    prune.remove(fc, "weight")
    assert isinstance(fc._parameters["weight"], nn.Parameter)


def test_quantize_parametrized_with_device_argument():
    # before: the device copy was copy.copy(linear), which a parametrized module refuses
    # (RuntimeError "Serialization of parametrized modules ..."), and would have kept reading
    # the original's parametrizations
    torch.manual_seed(3)
    x = torch.randn(5, 32)
    m = _model()
    weight_norm(m[0])
    twin = copy.deepcopy(m)
    layer = m[0]
    w = layer.weight.detach().clone()
    Q.quantize_(m, Q.Int8WeightOnlyConfig(), device="cpu")
    Q.quantize_(twin, Q.Int8WeightOnlyConfig())
    with torch.no_grad():
        torch.testing.assert_close(m(x), twin(x), rtol=0, atol=0)
    assert isinstance(m[0], Q.Int8WeightOnlyLinear)
    # the layer swapped out keeps its parametrization and its weight
    assert parametrize.is_parametrized(layer, "weight")
    torch.testing.assert_close(layer.weight, w, rtol=0, atol=0)


class _Mix(nn.Module):
    """A parametrization with a Linear of its own: W + W P."""

    def __init__(self, n):
        super().__init__()
        self.proj = nn.Linear(n, n, bias=False)
        nn.init.normal_(self.proj.weight, std=0.1)

    def forward(self, w):
        return w + self.proj(w)


def test_quantize_leaves_linear_inside_parametrization():
    # before: the mapping's "_default" reached layer 0's parametrization (a Linear transforming
    # its weight): layer 0, asked to stay float ("0": None), changed its output
    torch.manual_seed(4)
    x = torch.randn(5, 32)
    m = _model()
    parametrize.register_parametrization(m[0], "weight", _Mix(32))
    with torch.no_grad():
        ref0 = m[0](x)
    Q.quantize_(m, {"0": None, "_default": Q.Int8WeightOnlyConfig()})
    assert type(m[0].parametrizations.weight[0].proj) is nn.Linear
    assert isinstance(m[2], Q.Int8WeightOnlyLinear)
    with torch.no_grad():
        torch.testing.assert_close(m[0](x), ref0, rtol=0, atol=0)
    with pytest.raises(ValueError, match="inside a parametrization"):
        Q.quantize_(m, {"0.parametrizations.weight.0.proj": Q.Int8WeightOnlyConfig()})
    # HAWQ allocates bits to the model's layers only
    assert "0.parametrizations.weight.0.proj" not in Q.hawq.select_layers(_with_mix())


def _with_mix():
    m = _model()
    parametrize.register_parametrization(m[0], "weight", _Mix(32))
    return m


@pytest.mark.parametrize("kind", ["weight_norm", "pruned", "hook_weight_norm"])
def test_hawq_trace_of_parametrized_or_pruned_layer(kind):
    # before: the weight read before the forward is not the tensor the forward used, so its
    # gradient came back unused and the layer's trace was 0 (least sensitive: fewest bits)
    torch.manual_seed(5)
    x, y = torch.randn(16, 32), torch.randn(16, 4)
    if kind == "weight_norm":
        m = _model()
        weight_norm(m[0])
    elif kind == "pruned":
        m = _pruned()
    else:
        m = _hook_weight_norm()
    twin = _plain_twin(m)
    layer0 = m[0]
    r = Q.hawq_allocate(m, F.mse_loss, (x, y), avg_bits=4, n_probes=8, seed=0)
    rt = Q.hawq_allocate(twin, F.mse_loss, (x, y), avg_bits=4, n_probes=8, seed=0)
    assert r.traces["0"] > 0
    for name in ("0", "2"):
        assert r.traces[name] == pytest.approx(rt.traces[name], rel=1e-5)
        for b in r.errors[name]:
            assert r.errors[name][b] == pytest.approx(rt.errors[name][b], rel=1e-6)
    assert m[0] is layer0  # the model has its own module back


class _TanhWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.act = nn.Tanh()

    def forward(self, w):
        return self.act(w)


def test_fewbit_convert_leaves_parametrization_activation():
    # before: the Tanh of a weight parametrization became a few-bit Tanh, and the weight was
    # trained with the table's approximate derivative (weight gradient 18% off)
    torch.manual_seed(6)
    x = torch.randn(4, 32)
    m = nn.Sequential(nn.Linear(32, 16), nn.ReLU())
    parametrize.register_parametrization(m[0], "weight", _TanhWeight())
    c = copy.deepcopy(m)
    fewbit.convert(c)
    assert type(c[0].parametrizations.weight[0].act) is nn.Tanh
    assert isinstance(c[1], fewbit.ReLU)  # the model's activation is converted (exact for ReLU)
    m(x).square().sum().backward()
    c(x).square().sum().backward()
    torch.testing.assert_close(c[0].parametrizations.weight.original.grad,
                               m[0].parametrizations.weight.original.grad, rtol=0, atol=0)


def test_wtacrs_parametrized_linear_warns_and_from_linear_names_it():
    # before: a parametrized nn.Linear (class ParametrizedLinear) was skipped without the
    # warning the docstring promises, and from_linear raised torch's "cannot assign
    # 'torch.FloatTensor' as parameter 'weight'"
    m = _model()
    weight_norm(m[0])
    with pytest.warns(UserWarning, match="weight is computed"):
        wtacrs.convert(m, keep_ratio=0.5)
    assert parametrize.is_parametrized(m[0]) and isinstance(m[2], wtacrs.WTACRSLinear)
    with pytest.raises(ValueError, match="_WeightNorm"):
        wtacrs.WTACRSLinear.from_linear(m[0])
    p = _model()[0]
    prune.random_unstructured(p, "bias", amount=0.5)
    with pytest.raises(ValueError, match="RandomUnstructured"):
        wtacrs.WTACRSLinear.from_linear(p)
    # a Linear inside a parametrization stays as it is
    mm = _with_mix()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wtacrs.convert(mm, keep_ratio=0.5)
    assert type(mm[0].parametrizations.weight[0].proj) is nn.Linear


def test_deepcopied_parametrized_model_quantized_leaves_original_intact():
    # control: quantizing a deep copy does not touch the original's parametrization
    torch.manual_seed(7)
    x = torch.randn(5, 32)
    m = _model()
    weight_norm(m[0])
    with torch.no_grad():
        ref = m(x)
    q = copy.deepcopy(m)
    Q.quantize_(q, Q.Int8DynamicConfig())
    assert parametrize.is_parametrized(m[0], "weight")
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref, rtol=0, atol=0)
    m(x).sum().backward()
    assert m[0].parametrizations.weight.original1.grad is not None


def test_float_layer_kept_outside_keeps_its_kwargs_hooks_after_a_handle_removes_one():
    """A pruned Linear with a with_kwargs pre-hook, quantized: removing the hook by its handle
    (from the quantized layer now in the model) took the kwargs flag away from the float layer's
    own copy of the hook dict, and calling the float layer raised TypeError (missing 'kwargs')."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 8))
    lin = m[0]
    prune.l1_unstructured(lin, "weight", amount=0.3)
    calls = []
    h = lin.register_forward_pre_hook(lambda mod, a, kw: calls.append(kw) or None,
                                      with_kwargs=True)
    x = torch.randn(3, 16)
    want = lin(x)
    Q.quantize_(m, Q.Int8WeightOnlyConfig())
    m(x)
    assert len(calls) == 2  # the hook followed the swap
    h.remove()
    m(x)
    assert len(calls) == 2  # and its handle removes it there
    torch.testing.assert_close(lin(x), want)  # the float layer still runs, its hook included
    assert len(calls) == 3
