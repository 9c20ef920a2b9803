"""train_step_online with a GradScaler (float16 autocast training) and under DistributedDataParallel.

scaler: each step's loss is scaled before its backward and scaler.step / update close the call, so
an inf gradient skips the optimizer step (as in any amp loop) instead of writing NaN parameters.
DDP: the steps' gradients accumulate locally under no_sync() and one all-reduce closes the call
(T backwards used to all-reduce T times); the gradients equal a single process's on the whole
batch.
"""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from pypaper.snn import neuron
from pypaper.snn.sltt import train_step_online

T, N, C_IN, C_HID, C_OUT = 5, 3, 8, 16, 4


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(C_IN, C_HID), neuron.ParametricLIFNode(init_tau=2.0),
                         nn.Linear(C_HID, C_OUT), neuron.LIFNode(tau=2.0))


def _batch(seed, n=N):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(T, n, C_IN, generator=g) * 2, torch.randint(0, C_OUT, (n,), generator=g)


def _loss(out, y):
    return nn.functional.cross_entropy(out * 4.0, y)


# ---- scaler ---------------------------------------------------------------------------------------

def test_scaler_needs_an_optimizer():
    x, y = _batch(0)
    with pytest.raises(ValueError, match="scaler needs optimizer"):
        train_step_online(_model(), x, y, _loss, scaler=torch.amp.GradScaler("cpu"))


def test_scaler_steps_as_without_it_when_the_gradients_are_finite():
    """A power-of-two scale is exact both ways: the same parameters after the step."""
    x, y = _batch(1)
    got, want = _model(), _model()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    a = train_step_online(got, x, y, _loss, torch.optim.SGD(got.parameters(), lr=0.5),
                          scaler=scaler)
    b = train_step_online(want, x, y, _loss, torch.optim.SGD(want.parameters(), lr=0.5))
    assert a.loss == pytest.approx(b.loss, rel=1e-6)  # the unscaled loss
    assert any(not torch.equal(p, q) for p, q in zip(got.parameters(), _model().parameters()))
    for p, q in zip(got.parameters(), want.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_scaler_skips_the_step_on_an_inf_gradient_and_lowers_its_scale():
    x, y = _batch(2)
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)

    def exploding(out, y):  # an fp16 overflow, as a loss would see it
        return _loss(out, y) + model[0].weight.sum() * float("inf")

    train_step_online(model, x, y, exploding, torch.optim.SGD(model.parameters(), lr=0.5),
                      scaler=scaler)
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)
    assert scaler.get_scale() == 2.0 ** 7


# ---- DDP ------------------------------------------------------------------------------------------

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, k, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        ddp = nn.parallel.DistributedDataParallel(_model())
        calls = []

        def counting_allreduce(state, bucket):  # the default hook's math, counted
            calls.append(1)
            t = bucket.buffer().div_(world)
            return dist.all_reduce(t, async_op=True).get_future().then(lambda f: f.value()[0])

        ddp.register_comm_hook(None, counting_allreduce)
        x, y = _batch(10 + rank)
        gen = torch.Generator().manual_seed(5 + rank)  # SLTT-K: each rank its own steps
        train_step_online(ddp, x, y, _loss, k=k, generator=gen)
        torch.save({"grads": [p.grad for p in ddp.module.parameters()], "calls": len(calls)},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("k", [None, 3])
def test_ddp_all_reduces_once_per_call_and_matches_one_process(tmp_path, k):
    world = 2
    mp.spawn(_ddp_worker, args=(world, _free_port(), k, str(tmp_path)), nprocs=world)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    # one bucket (a small model): one all-reduce per call, not one per trained step
    assert [r["calls"] for r in ranks] == [1, 1]
    for a, b in zip(ranks[0]["grads"], ranks[1]["grads"]):
        assert torch.equal(a, b)
    # the average over ranks of each rank's own SLTT gradient (its own steps under SLTT-K)
    want = None
    for r in range(world):
        m = _model()
        x, y = _batch(10 + r)
        train_step_online(m, x, y, _loss, k=k, generator=torch.Generator().manual_seed(5 + r))
        g = [p.grad / world for p in m.parameters()]
        want = g if want is None else [a + b for a, b in zip(want, g)]
    assert any(w.abs().sum() > 0 for w in want)
    for got, w in zip(ranks[0]["grads"], want):
        torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-7)
