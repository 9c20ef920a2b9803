"""Local learning across two processes (torch.distributed, gloo, CPU): block 0 and its auxiliary
head on rank 0, block 1 and the classifier on rank 1. Rank 0 sends its detached activations
forward; no gradient ever travels back, so rank 0 never waits for rank 1's backward.

    python examples/local_distributed.py

Trains on scikit-learn's real digits, then checks that the parameters equal those of the same
LocalSequential trained in one process with the same seed, and prints the held-out accuracy.
"""
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import pypaper.local as L  # noqa: E402
from pypaper.local.distributed import LocalPipeline  # noqa: E402
from tests.local.helpers import accuracy, digits_split, mlp_blocks  # noqa: E402

EPOCHS, BATCH, LR = 10, 64, 0.05


def make_net(x):
    torch.manual_seed(0)
    return L.LocalSequential(mlp_blocks([64, 128, 128]), "dgl", num_classes=10,
                             example_input=x[:4], aux_depth=1)


def worker(rank, world, tmp):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank,
                            world_size=world)
    xtr, ytr, _, _ = digits_split()
    net = make_net(xtr)
    pipe = LocalPipeline(net, rank, world)
    opt = torch.optim.SGD(pipe.parameters(), lr=LR, momentum=0.9)
    for _ in range(EPOCHS):
        for i in range(0, xtr.shape[0], BATCH):
            pipe.train_step(xtr[i:i + BATCH] if rank == 0 else None, ytr[i:i + BATCH], opt)
    torch.save({f"{j}.{k}": v for j, m in enumerate(pipe.modules())
                for k, v in m.state_dict().items()}, os.path.join(tmp, f"rank{rank}.pt"))
    dist.destroy_process_group()


def main():
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(2, tmp), nprocs=2, join=True)
        xtr, ytr, xte, yte = digits_split()
        net = make_net(xtr)
        opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=LR,
                              momentum=0.9)
        for _ in range(EPOCHS):
            for i in range(0, xtr.shape[0], BATCH):
                net.train_step(xtr[i:i + BATCH], ytr[i:i + BATCH], opt)
        worst = 0.0
        for rank in range(2):
            got = torch.load(os.path.join(tmp, f"rank{rank}.pt"))
            pipe = LocalPipeline(net, rank, 2)
            ref = {f"{j}.{k}": v for j, m in enumerate(pipe.modules())
                   for k, v in m.state_dict().items()}
            worst = max(worst, max(float((got[k] - ref[k]).abs().max()) for k in ref))
        # The distributed parameters into the single-process network: evaluate them.
        for rank in range(2):
            got = torch.load(os.path.join(tmp, f"rank{rank}.pt"))
            for j, m in enumerate(LocalPipeline(net, rank, 2).modules()):
                m.load_state_dict({k[len(f"{j}."):]: v for k, v in got.items()
                                   if k.startswith(f"{j}.")})
        net.eval()
        acc = accuracy(lambda x: net(x).argmax(1), xte, yte)
        print(f"2-process pipeline vs 1 process: max |parameter difference| = {worst:.3g}")
        print(f"held-out accuracy of the 2-process model: {100 * acc:.2f}%")


if __name__ == "__main__":
    main()
