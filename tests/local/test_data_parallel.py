"""Data-parallel local learning (pypaper.local.data_parallel): 2 CPU processes (gloo), each
holding the whole model and training on its own half of every batch, the gradients averaged
before the optimizer steps. After a few steps the ranks' parameters are bit-identical and equal
the single-process run on the concatenated batches (mean losses over equal shards: the average
of the shard gradients is the batch gradient); without the averaging they diverge. Wrapping the
model in torch's DistributedDataParallel instead - whose hooks the local steps bypass - raises.

All the multi-process scenarios run in ONE spawn (module fixture): starting the processes is the
slow part."""

import pytest
import torch
import torch.distributed as dist
from torch import nn

import pypaper.local as L
from pypaper.local.data_parallel import sync_grads

from .helpers import digits_split, mlp_blocks, run_gloo_ranks, state_copy

STEPS, SHARD, WORLD, LR = 3, 16, 2, 0.1
BATCH = SHARD * WORLD

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _data():
    xtr, ytr, _, _ = digits_split(seed=0)
    return xtr[:STEPS * BATCH], ytr[:STEPS * BATCH]


def _shard(t, step, rank):
    """Rank r's rows of batch ``step``: the batch is the ranks' shards concatenated in order."""
    start = step * BATCH + rank * SHARD
    return t[start:start + SHARD]


def _batch(t, step):
    return t[step * BATCH:(step + 1) * BATCH]


# --- the models, built identically on every rank and in the single-process reference --------

def _ff_layers():
    torch.manual_seed(1)
    return nn.ModuleList([L.FFLinear(64, 32), L.FFLinear(32, 24)])


def _ff_pair(x, y):
    """Forward-Forward positive / negative data: the label (true / next one) in the first 10
    features, with a fixed value (overlay_label's default, the batch max, would differ per
    shard)."""
    return (L.overlay_label(x, y, 10, value=1.0), L.overlay_label(x, (y + 1) % 10, 10, value=1.0))


def _ff_step(layers, x, y, opt, sync=None):
    xp, xn = _ff_pair(x, y)
    for layer in layers:
        _, xp, xn = layer.local_step(xp, xn)
    if sync is not None:
        sync(layers)
    opt.step()
    opt.zero_grad(set_to_none=True)


def _ff_opt(layers):
    return torch.optim.SGD(layers.parameters(), lr=LR, momentum=0.9)


def _tp_net():
    torch.manual_seed(2)
    return L.TPNetwork([64, 32, 24], 10, activation="sigmoid")


def _seq_net(x_example):
    torch.manual_seed(0)
    return L.LocalSequential(mlp_blocks([64, 48, 32]), "dgl", num_classes=10,
                             example_input=x_example, aux_depth=1)


def _seq_opt(net):
    return torch.optim.SGD(net.parameters(), lr=LR, momentum=0.9)


# --- the worker ----------------------------------------------------------------------------

def _body(rank, world_size):
    """One rank's scenarios (helpers.run_gloo_ranks runs it in every process, with the
    default process group initialised): what the tests compare, by name."""
    out = {}
    x, y = _data()

    # FF layers, a hand-written loop, sync_grads with tiny buckets (several per step)
    layers = _ff_layers()
    opt = _ff_opt(layers)
    for s in range(STEPS):
        _ff_step(layers, _shard(x, s, rank), _shard(y, s, rank), opt,
                 sync=lambda m: sync_grads(m, bucket_bytes=1024))
    out["ff"] = state_copy(layers)

    # TPNetwork steps inside its train_step: the optimizer syncs before every step
    tp = _tp_net()
    opt = torch.optim.SGD(tp.parameters(), lr=LR)
    handle = L.sync_grads_on_step(opt)
    for s in range(STEPS):
        tp.train_step(_shard(x, s, rank), _shard(y, s, rank), opt)
    handle.remove()
    out["tp"] = state_copy(tp)

    # LocalSequential with DGL aux heads, train_step(data_parallel=True)
    net = _seq_net(x[:4])
    opt = _seq_opt(net)
    for s in range(STEPS):
        net.train_step(_shard(x, s, rank), _shard(y, s, rank), opt, data_parallel=True)
    out["seq"] = state_copy(net)

    # the control: the same without averaging
    net = _seq_net(x[:4])
    opt = _seq_opt(net)
    for s in range(STEPS):
        net.train_step(_shard(x, s, rank), _shard(y, s, rank), opt)
    out["seq_unsynced"] = state_copy(net)

    # the DDP trap: a LocalSequential / an FF layer inside DistributedDataParallel
    net = _seq_net(x[:4])
    ddp = nn.parallel.DistributedDataParallel(net)
    opt = _seq_opt(net)
    try:
        net.train_step(_shard(x, 0, rank), _shard(y, 0, rank), opt)
        out["ddp_seq_error"] = None
    except RuntimeError as e:
        out["ddp_seq_error"] = str(e)
    net.train_step(_shard(x, 0, rank), _shard(y, 0, rank), opt, data_parallel=True)
    out["ddp_seq_synced"] = state_copy(net)
    del ddp

    layers = _ff_layers()
    ddp = nn.parallel.DistributedDataParallel(layers)
    opt = _ff_opt(layers)
    try:
        _ff_step(layers, _shard(x, 0, rank), _shard(y, 0, rank), opt)
        out["ddp_ff_error"] = None
    except RuntimeError as e:
        out["ddp_ff_error"] = str(e)
    opt.zero_grad(set_to_none=True)
    L.sync_grads_on_step(opt)  # the gradients are averaged now: no error
    _ff_step(layers, _shard(x, 0, rank), _shard(y, 0, rank), opt)
    out["ddp_ff_synced"] = state_copy(layers)
    del ddp

    torch.manual_seed(3)
    blk = L.LocalBlock(nn.Sequential(nn.Linear(64, 16), nn.ReLU()), L.LinearHead(16, 10))
    ddp = nn.parallel.DistributedDataParallel(blk)
    try:
        blk.local_step(_shard(x, 0, rank), _shard(y, 0, rank))
        out["ddp_block_error"] = None
    except RuntimeError as e:
        out["ddp_block_error"] = str(e)
    del ddp

    # missing gradients: `a` has one on rank 0 only, `b` on no rank; mixed dtypes
    m = nn.ModuleDict({"a": nn.Linear(3, 2), "b": nn.Linear(3, 2),
                       "c": nn.Linear(3, 2).double()})
    m["c"].weight.grad = torch.full((2, 3), float(rank + 1), dtype=torch.float64)
    if rank == 0:
        m["a"].weight.grad = torch.full((2, 3), 4.0)
    sync_grads(m)
    out["none_a"] = m["a"].weight.grad
    out["none_a_bias"] = m["a"].bias.grad
    out["none_b"] = m["b"].weight.grad
    out["none_c"] = m["c"].weight.grad

    # different models on the ranks: an error on both, not a hang
    bad = nn.Linear(3, 2 + rank)
    bad.weight.grad = torch.ones_like(bad.weight)
    try:
        sync_grads(bad)
        out["layout_error"] = None
    except ValueError as e:
        out["layout_error"] = str(e)

    # broadcast_parameters: different initial weights made rank 0's
    torch.manual_seed(100 + rank)
    m = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    m[1].running_mean.fill_(rank)
    L.broadcast_parameters(m)
    out["broadcast"] = state_copy(m)

    return out

@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_gloo_ranks(_body, WORLD, tmp_path_factory.mktemp("data_parallel"))


def _assert_same_across_ranks(ranks, key):
    a, b = ranks[0][key], ranks[1][key]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{key}.{k} differs between the ranks"


def _assert_matches(got, ref, untrained, tol=dict(rtol=1e-5, atol=1e-6)):
    assert got.keys() == ref.keys()
    moved = False
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], **tol, msg=k)
        moved |= not torch.equal(ref[k], untrained[k])
    assert moved, "the run did not train"


# --- multi-process ---------------------------------------------------------------------------

def test_ff_layers_match_single_process(ranks):
    _assert_same_across_ranks(ranks, "ff")
    x, y = _data()
    layers = _ff_layers()
    untrained = state_copy(layers)
    opt = _ff_opt(layers)
    for s in range(STEPS):
        _ff_step(layers, _batch(x, s), _batch(y, s), opt)
    _assert_matches(ranks[0]["ff"], state_copy(layers), untrained)


def test_tp_network_with_sync_on_step_matches_single_process(ranks):
    _assert_same_across_ranks(ranks, "tp")
    x, y = _data()
    tp = _tp_net()
    untrained = state_copy(tp)
    opt = torch.optim.SGD(tp.parameters(), lr=LR)
    for s in range(STEPS):
        tp.train_step(_batch(x, s), _batch(y, s), opt)
    _assert_matches(ranks[0]["tp"], state_copy(tp), untrained)


def test_local_sequential_data_parallel_matches_single_process(ranks):
    _assert_same_across_ranks(ranks, "seq")
    x, y = _data()
    net = _seq_net(x[:4])
    untrained = state_copy(net)
    opt = _seq_opt(net)
    for s in range(STEPS):
        net.train_step(_batch(x, s), _batch(y, s), opt)
    _assert_matches(ranks[0]["seq"], state_copy(net), untrained)


def test_without_averaging_the_ranks_diverge(ranks):
    """The control: the same training without data_parallel leaves each rank with its own
    copy (so the checks above can fail)."""
    a, b = ranks[0]["seq_unsynced"], ranks[1]["seq_unsynced"]
    assert any(not torch.allclose(a[k], b[k]) for k in a if a[k].is_floating_point())
    ref = ranks[0]["seq"]
    assert any(not torch.allclose(a[k], ref[k]) for k in a if a[k].is_floating_point())


def test_ddp_wrapper_raises_with_a_pointer_to_the_helper(ranks):
    for r in ranks:
        for key, what in (("ddp_seq_error", "LocalSequential.train_step"),
                          ("ddp_ff_error", "FFLinear.local_step"),
                          ("ddp_block_error", "LocalBlock.local_step")):
            msg = r[key]
            assert msg is not None, f"{key}: no error inside DistributedDataParallel"
            assert what in msg and "DistributedDataParallel" in msg
            assert "data_parallel=True" in msg and "sync_grads" in msg
    # with the averaging arranged, the wrapped models train, identically on both ranks
    _assert_same_across_ranks(ranks, "ddp_seq_synced")
    _assert_same_across_ranks(ranks, "ddp_ff_synced")


def test_missing_gradients_count_as_zeros_and_none_everywhere_stays_none(ranks):
    for r in ranks:
        torch.testing.assert_close(r["none_a"], torch.full((2, 3), 2.0), rtol=0, atol=0)
        assert r["none_a_bias"] is None and r["none_b"] is None
        assert r["none_c"].dtype == torch.float64
        torch.testing.assert_close(r["none_c"], torch.full((2, 3), 1.5, dtype=torch.float64),
                                   rtol=0, atol=0)


def test_different_models_on_the_ranks_raise_on_every_rank(ranks):
    for r in ranks:
        assert r["layout_error"] is not None and "differ across ranks" in r["layout_error"]


def test_broadcast_parameters_copies_rank_0(ranks):
    _assert_same_across_ranks(ranks, "broadcast")
    assert torch.equal(ranks[1]["broadcast"]["1.running_mean"], torch.zeros(3))


# --- single process ----------------------------------------------------------------------------

def test_no_process_group_is_a_clear_error():
    if dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    m = nn.Linear(3, 2)
    m(torch.randn(4, 3)).sum().backward()
    with pytest.raises(RuntimeError, match="init_process_group"):
        sync_grads(m)
    with pytest.raises(RuntimeError, match="init_process_group"):
        L.sync_grads_on_step(torch.optim.SGD(m.parameters(), lr=0.1))
    x, y = _data()
    net = _seq_net(x[:4])
    with pytest.raises(RuntimeError, match="init_process_group"):
        net.train_step(x[:8], y[:8], _seq_opt(net), data_parallel=True)


def test_bad_arguments():
    x, y = _data()
    net = _seq_net(x[:4])
    with pytest.raises(TypeError, match="data_parallel must be a bool or a torch.distributed"):
        net.train_step(x[:8], y[:8], _seq_opt(net), data_parallel="yes")
    with pytest.raises(TypeError, match="expected a module, an optimizer or an iterable"):
        sync_grads(3)


@pytest.fixture
def world_of_one(tmp_path):
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/init", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_world_of_one_is_plain_training(world_of_one):
    x, y = _data()
    a, b = _seq_net(x[:4]), _seq_net(x[:4])
    oa, ob = _seq_opt(a), _seq_opt(b)
    for s in range(2):
        a.train_step(_batch(x, s), _batch(y, s), oa, data_parallel=True)
        b.train_step(_batch(x, s), _batch(y, s), ob)
    sa, sb = state_copy(a), state_copy(b)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    m = nn.Linear(3, 2)
    assert m.weight.grad is None
    sync_grads(m)  # nothing to average: grads untouched, None stays None
    assert m.weight.grad is None
    with pytest.raises(ValueError, match="bucket_bytes must be a positive int"):
        sync_grads(m, bucket_bytes=0)
    e = nn.Embedding(5, 3, sparse=True)
    e(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match="sparse gradients"):
        sync_grads(e)
