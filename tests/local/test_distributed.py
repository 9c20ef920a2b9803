"""Local learning over 2 processes (torch.distributed, gloo, CPU): block 0 on rank 0, block 1 (and
the network's head) on rank 1; rank 0 sends its detached output forward, nothing comes back. The
parameters after a few steps equal those of the single-process run with the same seed."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import pypaper.local as L
from pypaper.local.distributed import LocalPipeline, partition

from .helpers import digits_split, mlp_blocks

STEPS, BATCH, LR = 4, 32, 0.1

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _net(x_example):
    torch.manual_seed(0)
    return L.LocalSequential(mlp_blocks([64, 48, 32]), "dgl", num_classes=10,
                             example_input=x_example, aux_depth=1)


def _data():
    xtr, ytr, _, _ = digits_split(seed=0)
    return xtr[:STEPS * BATCH], ytr[:STEPS * BATCH]


def _worker(rank, world_size, tmp):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank,
                            world_size=world_size)
    try:
        x, y = _data()
        net = _net(x[:4])
        pipe = LocalPipeline(net, rank, world_size)
        opt = torch.optim.SGD(pipe.parameters(), lr=LR)
        for s in range(STEPS):
            sl = slice(s * BATCH, (s + 1) * BATCH)
            pipe.train_step(x[sl] if rank == 0 else None, y[sl], opt)
        state = {f"{i}.{k}": v for i, m in enumerate(pipe.modules())
                 for k, v in m.state_dict().items()}
        torch.save(state, os.path.join(tmp, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_partition():
    assert partition(5, 2) == [(0, 3), (3, 5)]
    assert partition(2, 2) == [(0, 1), (1, 2)]
    with pytest.raises(ValueError, match="world_size must be in"):
        partition(2, 3)


def test_two_process_pipeline_matches_single_process(tmp_path):
    torch.set_num_threads(1)
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    x, y = _data()
    net = _net(x[:4])
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=LR)
    for s in range(STEPS):
        sl = slice(s * BATCH, (s + 1) * BATCH)
        net.train_step(x[sl], y[sl], opt)
    untrained = _net(x[:4])
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        pipe = LocalPipeline(net, rank, 2)
        ref = {f"{i}.{k}": v for i, m in enumerate(pipe.modules())
               for k, v in m.state_dict().items()}
        assert got.keys() == ref.keys()
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=1e-6, atol=1e-7, msg=k)
        # ... and the run did train them
        first = LocalPipeline(untrained, rank, 2).modules()[0]
        assert not torch.equal(first[0].weight, pipe.modules()[0][0].weight)
