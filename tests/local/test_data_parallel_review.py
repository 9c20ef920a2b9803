"""Review of data-parallel local learning (pypaper.local.data_parallel, 66e38db), 3 gloo CPU
processes in ONE spawn (module fixture):

* torch.compile of a function calling a local layer's local_step in a multi-process run crashed
  (InternalTorchDynamoError: the DDP check's gc.get_objects() loop handed dynamo a dead weakref);
* the DDP check was cached per module forever: a model wrapped in DistributedDataParallel after
  its first local step trained silently per rank; a removed sync_grads_on_step hook kept the
  exemption; and every module paid its own heap scan (~0.7 s per module at 2M objects);
* a rank outside the subgroup passed to sync_grads / broadcast_parameters / train_step got
  "the parameters differ across ranks" (the collectives silently do nothing there);
* FFNetwork.train_step under data parallelism: every rank drew the same wrong-label offsets
  (identical RNG states) and overlaid each shard's own max: not the single process's step on
  the whole batch. train_step(..., data_parallel=True) now is.
"""
import gc

import pytest
import torch
import torch.distributed as dist
from torch import nn

import pypaper.local as L
from pypaper.local.data_parallel import sync_grads

from .helpers import digits_split, mlp_blocks, run_gloo_ranks, state_copy

WORLD, SHARD, STEPS, LR = 3, 6, 3, 0.1
BATCH = WORLD * SHARD

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _ff_data():
    """Digits standardised per feature: the shards' maxima differ (raw digits all reach 1.0)."""
    xtr, ytr, _, _ = digits_split(seed=0)
    x, y = xtr[:STEPS * BATCH], ytr[:STEPS * BATCH]
    x = (x - x.mean(0)) / (x.std(0) + 0.1)
    return x, y


def _ff_net():
    torch.manual_seed(5)
    return L.FFNetwork([64, 24, 16], 10)


def _ff_pair(x, y):
    return (L.overlay_label(x, y, 10, value=1.0), L.overlay_label(x, (y + 1) % 10, 10, value=1.0))


def _catch(fn):
    try:
        fn()
        return None
    except Exception as e:  # noqa: BLE001 - the message is what the tests check
        return f"{type(e).__name__}: {e}"


def _body(rank, world):
    """One rank's scenarios (helpers.run_gloo_ranks runs it in every process, with the
    default process group initialised): what the tests compare, by name."""
    out = {}
    x, y = _ff_data()

    # 1. the DDP check scans the heap once per process, not once per module
    calls = [0]
    real = gc.get_objects

    def counting(*a, **k):
        calls[0] += 1
        return real(*a, **k)

    gc.get_objects = counting
    try:
        for _ in range(3):
            layer = L.FFLinear(64, 8)
            layer.local_step(*_ff_pair(x[:4], y[:4]))
    finally:
        gc.get_objects = real
    out["scans"] = calls[0]

    # 2. wrapped in DDP after its first local step: the next step raises
    torch.manual_seed(0)
    layer = L.FFLinear(64, 8)
    layer.local_step(*_ff_pair(x[:4], y[:4]))
    ddp = nn.parallel.DistributedDataParallel(layer)
    out["late_wrap"] = _catch(lambda: layer.local_step(*_ff_pair(x[:4], y[:4])))
    del ddp
    gc.collect()
    out["after_unwrap"] = _catch(lambda: layer.local_step(*_ff_pair(x[:4], y[:4])))

    # 3. a removed sync_grads_on_step hook no longer exempts the module
    layer = L.FFLinear(64, 8)
    opt = torch.optim.SGD(layer.parameters(), lr=LR)
    ddp = nn.parallel.DistributedDataParallel(layer)
    handle = L.sync_grads_on_step(opt)
    out["synced_in_ddp"] = _catch(lambda: layer.local_step(*_ff_pair(x[:4], y[:4])))
    handle.remove()
    out["hook_removed_in_ddp"] = _catch(lambda: layer.local_step(*_ff_pair(x[:4], y[:4])))
    del ddp, opt

    # 4. torch.compile of a function that calls local_step (the check runs while tracing)
    torch.manual_seed(1)
    layer = L.FFLinear(64, 8)
    xp, xn = _ff_pair(x[:4], y[:4])
    step = torch.compile(lambda a, b: layer.local_step(a, b)[0], backend="eager")
    out["compile_error"] = _catch(lambda: step(xp, xn))
    out["compile_grad"] = None if layer.weight.grad is None else layer.weight.grad.clone()

    # 5. a subgroup of ranks 0 and 1: the third rank gets a clear error, no collective runs
    g = dist.new_group([0, 1])
    torch.manual_seed(2)
    net = L.LocalSequential(mlp_blocks([64, 16, 12]), "dgl", num_classes=10,
                            example_input=x[:2], aux_depth=1)
    lin = nn.Linear(3, 2)
    lin.weight.grad = torch.ones(2, 3)
    if rank == 2:
        out["nonmember_sync"] = _catch(lambda: sync_grads(lin, g))
        out["nonmember_bcast"] = _catch(lambda: L.broadcast_parameters(lin, group=g))
        out["nonmember_train"] = _catch(lambda: net.train_step(
            x[:SHARD], y[:SHARD], torch.optim.SGD(net.parameters(), lr=LR),
            data_parallel=g))
        out["nonmember_train_grads"] = [p.grad is None for p in net.parameters()]
    else:
        sync_grads(lin, g)
        out["member_sync"] = lin.weight.grad.clone()

    # 6. FFNetwork.train_step(data_parallel=True): the single process's step on the batch
    net = _ff_net()
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=0.9)
    gen = torch.Generator().manual_seed(7)  # the same state on every rank

    def ff_steps():
        for s in range(STEPS):
            b = s * BATCH + rank * SHARD
            net.train_step(x[b:b + SHARD], y[b:b + SHARD], opt, generator=gen,
                           data_parallel=True)

    out["ff_dp_error"] = _catch(ff_steps)
    out["ff_dp"] = state_copy(net)

    return out

@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_gloo_ranks(_body, WORLD, tmp_path_factory.mktemp("data_parallel_review"))


def test_ddp_check_scans_the_heap_once_per_process(ranks):
    for r in ranks:
        assert r["scans"] <= 1, f"{r['scans']} heap scans for 3 modules"


def test_ddp_wrap_after_the_first_local_step_raises(ranks):
    for r in ranks:
        msg = r["late_wrap"]
        assert msg is not None, "a model wrapped after its first step trained silently in DDP"
        assert "DistributedDataParallel" in msg and "FFLinear.local_step" in msg
        assert r["after_unwrap"] is None  # the wrapper gone: the layer trains again


def test_removed_sync_hook_no_longer_exempts_a_ddp_wrapped_module(ranks):
    for r in ranks:
        assert r["synced_in_ddp"] is None
        msg = r["hook_removed_in_ddp"]
        assert msg is not None and "DistributedDataParallel" in msg


def test_compiled_local_step_in_a_multi_process_run(ranks):
    torch.manual_seed(1)
    layer = L.FFLinear(64, 8)
    x, y = _ff_data()
    layer.local_step(*_ff_pair(x[:4], y[:4]))
    for r in ranks:
        assert r["compile_error"] is None, r["compile_error"]
        torch.testing.assert_close(r["compile_grad"], layer.weight.grad)


def test_a_rank_outside_the_group_gets_a_clear_error(ranks):
    for r in ranks[:2]:
        torch.testing.assert_close(r["member_sync"], torch.ones(2, 3), rtol=0, atol=0)
    r = ranks[2]
    for key in ("nonmember_sync", "nonmember_bcast", "nonmember_train"):
        assert r[key] is not None and "not a member" in r[key], (key, r[key])
    assert all(r["nonmember_train_grads"]), "the blocks ran before the error"


def test_ff_network_data_parallel_is_the_single_process_step(ranks):
    assert ranks[0]["ff_dp_error"] is None, ranks[0]["ff_dp_error"]
    for r in ranks[1:]:
        for k, v in ranks[0]["ff_dp"].items():
            assert torch.equal(v, r["ff_dp"][k]), k
    x, y = _ff_data()
    net = _ff_net()
    untrained = state_copy(net)
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=0.9)
    gen = torch.Generator().manual_seed(7)
    for s in range(STEPS):
        net.train_step(x[s * BATCH:(s + 1) * BATCH], y[s * BATCH:(s + 1) * BATCH], opt,
                       generator=gen)
    ref = state_copy(net)
    for k in ref:
        torch.testing.assert_close(ranks[0]["ff_dp"][k], ref[k], rtol=1e-5, atol=1e-6, msg=k)
        assert not torch.equal(ref[k], untrained[k]), k


def test_ff_network_data_parallel_without_a_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    x, y = _ff_data()
    net = _ff_net()
    with pytest.raises(RuntimeError, match="init_process_group"):
        net.train_step(x[:4], y[:4], torch.optim.SGD(net.parameters(), lr=LR),
                       data_parallel=True)
    assert all(p.grad is None for p in net.parameters())
