"""BitLinear (Ivan 2022, bit-wise training): the weight formula, He-matched alpha, the
straight-through bit gradients, and training on scikit-learn's real 8x8 digits with the bits
report."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pypaper.nn import BitLinear as BitLinearFromNn
from pypaper.quant.bitlinear import BitLinear, bits_report, he_alpha


def test_exported():
    assert BitLinearFromNn is BitLinear


@pytest.mark.parametrize("bits", [1, 4, 8])
def test_alpha_matches_he_std(bits):
    layer = BitLinear(512, 256, bits=bits, generator=torch.Generator().manual_seed(0))
    w = layer.weight().detach()
    he = math.sqrt(2.0 / 512)
    assert float(w.pow(2).mean().sqrt()) == pytest.approx(he, rel=0.02)
    assert layer.alpha == pytest.approx(he_alpha(512, bits))


def test_weight_formula_and_integers():
    layer = BitLinear(7, 3, bits=5, generator=torch.Generator().manual_seed(1))
    b = (layer.bit_latents.detach() > 0).double()
    s = (layer.sign_latent.detach() > 0).double()
    want = layer.alpha * (-1.0) ** s * sum(b[i] * 2 ** i for i in range(5))
    assert torch.allclose(layer.weight().double(), want, rtol=1e-6)
    ints = layer.integer_weight()
    assert ints.dtype == torch.int32 and int(ints.abs().max()) <= 31
    assert torch.allclose(ints.double() * layer.alpha, want, rtol=1e-6)
    x = torch.randn(4, 7)
    assert torch.allclose(layer(x), F.linear(x, want.float(), layer.bias), rtol=1e-5, atol=1e-6)


def test_straight_through_bit_gradients():
    layer = BitLinear(6, 4, bits=3, bias=False, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        layer.bit_latents[0, 0, 0] = 3.0  # |z| > 1: this bit's gradient is masked
    x = torch.randn(5, 6)
    g = torch.randn(5, 4)
    (layer(x) * g).sum().backward()
    dw = g.t() @ x  # dL/dw
    sign = 1.0 - 2.0 * (layer.sign_latent.detach() > 0).float()
    for i in range(3):
        want = dw * layer.alpha * sign * 2 ** i
        mask = (layer.bit_latents.detach()[i].abs() <= 1).float()
        assert torch.allclose(layer.bit_latents.grad[i], want * mask, rtol=1e-5, atol=1e-7)
    assert layer.bit_latents.grad[0, 0, 0] == 0


def test_bad_inputs():
    with pytest.raises(ValueError, match="bits"):
        BitLinear(4, 4, bits=0)
    with pytest.raises(ValueError, match="bits"):
        BitLinear(4, 4, bits=2.5)
    with pytest.raises(ValueError, match="in_features"):
        BitLinear(0, 4)
    with pytest.raises(ValueError, match="BitLinear"):
        bits_report(nn.Linear(3, 3), lambda m: 0.0)


def test_digits_training_and_bits_report():
    """Real check on scikit-learn's 1797 8x8 digits (1400 train / 397 test): an 8-bit BitLinear
    MLP learns its bits to >= 90% accuracy, and the report shows the accuracy is carried by the
    top bits: the 4 most significant bits give the full accuracy within a point, none gives
    chance."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
    X, y = X[perm], y[perm]
    Xtr, ytr, Xte, yte = X[:1400], y[:1400], X[1400:], y[1400:]
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(BitLinear(64, 128, bits=8, generator=g), nn.ReLU(),
                          BitLinear(128, 10, bits=8, generator=g))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(20):
        p = torch.randperm(len(Xtr), generator=g)
        for i in range(0, len(Xtr), 64):
            idx = p[i:i + 64]
            loss = F.cross_entropy(model(Xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()

    def evaluate(m):
        with torch.no_grad():
            return float((m(Xte).argmax(1) == yte).float().mean()) * 100

    full = evaluate(model)
    rep = bits_report(model, evaluate)
    acc = rep["top_k_accuracy"]
    print(f"digits BitLinear 8 bits: {full:.1f}%  top-k: "
          + ", ".join(f"{k}:{v:.1f}" for k, v in acc.items()))
    assert full >= 90.0
    assert acc[8] == pytest.approx(full)
    assert acc[0] < 20.0
    assert acc[4] >= full - 1.0
    assert len(rep["flipped_fraction"]) == 8 and max(rep["flipped_fraction"]) > 0.01
    assert model[0].keep_top_bits is None  # the report restores the layers
