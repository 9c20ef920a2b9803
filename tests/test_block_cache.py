"""pypaper's CPU block cache (csrc/block_cache.h, pypaper/memory.py): large outputs of the LIF op
come from it; freed blocks are reused; results are the same with it off; the counters, limit and
environment variable do what they say; the tensors behave as any tensor."""
import copy
import multiprocessing
import os
import pickle
import subprocess
import sys
import threading

import pytest
import torch

import pypaper
from pypaper import memory, snn

pytestmark = pytest.mark.skipif(not pypaper._ext.LOADED, reason="pypaper._C is not built")

T, N = 4, 1 << 16  # a [T, N] fp32 output is 1 MiB: the smallest size the cache takes
MIB = 1 << 20


@pytest.fixture(autouse=True)
def _restore_limit():
    limit = memory.cache_info()["limit_bytes"]
    memory.set_cache_limit(256 * MIB)
    memory.empty_cache()
    yield
    memory.set_cache_limit(limit)


def _x(seed=0, steps=T, n=N):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(steps, n, generator=g) + 0.6


def _spikes(x):
    return snn.lif_multi_step(x, tau=2.0, surrogate_function=snn.surrogate.ATan())[0]


def test_a_freed_output_is_reused():
    s = _spikes(_x())
    ptr = s.data_ptr()
    info = memory.cache_info()
    assert info["live_bytes"] >= s.numel() * 4
    del s
    after_free = memory.cache_info()
    assert after_free["cached_bytes"] >= T * N * 4 and after_free["cached_blocks"] >= 1
    s2 = _spikes(_x(1))
    assert s2.data_ptr() == ptr
    assert memory.cache_info()["hits"] == after_free["hits"] + 1


def test_state_outputs_of_a_mib_come_from_the_cache_too():
    """v_last [N] of the forward and grad_v_init [N] of the backward: at 2^18 fp32 neurons 1 MiB
    each, which glibc maps and zeroes again on some calls (~256 page faults each)."""
    x = _x(steps=2, n=MIB // 4).requires_grad_()

    def step():
        s, v, _ = snn.lif_multi_step(x, tau=2.0, surrogate_function=snn.surrogate.ATan())
        live = memory.cache_info()["live_bytes"]
        torch.autograd.grad(s, x, torch.ones_like(s))
        return live

    step()  # every block now sits in the free list
    hits = memory.cache_info()["hits"]
    live = step()
    assert live >= (2 + 1) * MIB  # spikes [2, N] and v_last [N]
    assert memory.cache_info()["hits"] == hits + 4  # spikes, v_last, grad_x, grad_v_init


def test_per_neuron_parameter_sums_come_from_the_cache():
    """Per-neuron tau and threshold: the backward sums their gradients per neuron ([N], 1 MiB
    each at 2^18 fp32 neurons) before reducing over the batch."""
    x = _x(steps=2, n=MIB // 4).view(2, 4, MIB // 16).requires_grad_()
    tau = torch.full((MIB // 16,), 2.5, requires_grad=True)
    vth = torch.full((MIB // 16,), 1.0, requires_grad=True)

    def step():
        s, _, _ = snn.lif_multi_step(x, tau=tau, v_threshold=vth,
                                     surrogate_function=snn.surrogate.ATan())
        return torch.autograd.grad(s, (x, tau, vth), torch.ones_like(s))

    first = [g.clone() for g in step()]  # every block now sits in the free list
    hits = memory.cache_info()["hits"]
    again = step()
    # spikes, v_last, grad_x, grad_v_init and the two per-neuron sums
    assert memory.cache_info()["hits"] == hits + 6
    for a, b in zip(first, again):
        assert torch.equal(a, b)


def test_small_outputs_do_not_use_the_cache():
    before = memory.cache_info()
    s = _spikes(_x(steps=2, n=1000))
    del s
    assert memory.cache_info() == before


def test_results_are_the_same_with_the_cache_off():
    x = _x(3).requires_grad_()
    g = torch.randn_like(x)

    def run():
        s, v, _ = snn.lif_multi_step(x, tau=2.0, surrogate_function=snn.surrogate.ATan())
        return (s, v) + torch.autograd.grad(s, x, g)

    on = [t.clone() for t in run()]  # the run's own blocks go back to the cache
    hits = memory.cache_info()["hits"]
    on_again = run()
    assert memory.cache_info()["hits"] > hits  # the second run took blocks from the free list
    memory.set_cache_limit(0)
    assert memory.cache_info()["cached_bytes"] == 0
    off = run()
    assert memory.cache_info()["cached_bytes"] == 0
    for a, b, c in zip(on, on_again, off):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_limit_zero_caches_nothing():
    memory.set_cache_limit(0)
    before = memory.cache_info()
    s = _spikes(_x())
    del s
    info = memory.cache_info()
    assert info["cached_bytes"] == 0 and info["hits"] == before["hits"]
    assert info["misses"] == before["misses"]  # plain torch.empty: the cache is not asked


def test_blocks_above_the_limit_are_freed():
    memory.set_cache_limit(MIB // 2)  # smaller than one block
    s = _spikes(_x())
    del s
    assert memory.cache_info()["cached_bytes"] == 0
    memory.set_cache_limit(256 * MIB)
    a, b = _spikes(_x()), _spikes(_x(1))
    del a, b
    assert memory.cache_info()["cached_blocks"] == 2
    memory.set_cache_limit(MIB + MIB // 2)  # 1 MiB blocks: one fits
    assert memory.cache_info()["cached_blocks"] == 1
    memory.empty_cache()
    assert memory.cache_info()["cached_bytes"] == 0


def test_stale_sizes_are_evicted_for_new_ones():
    memory.set_cache_limit(3 * MIB)
    olds = [_spikes(_x(i)) for i in range(3)]  # three 1 MiB blocks fill the limit
    del olds
    assert memory.cache_info()["cached_bytes"] == 3 * MIB
    before = memory.cache_info()
    for i in range(5):  # a new shape: 2 MiB outputs
        s = _spikes(_x(i, steps=2 * T))
        del s
    after = memory.cache_info()
    assert after["misses"] == before["misses"] + 1  # only the first one is new
    assert after["hits"] == before["hits"] + 4
    assert after["cached_bytes"] <= 3 * MIB


def test_blocks_are_rounded_to_64_kib_below_16_mib():
    base = memory.cache_info()["live_bytes"]
    s = snn.lif_multi_step(torch.randn(1, MIB // 4 + 1))[0]  # 1 MiB + 4 bytes
    assert memory.cache_info()["live_bytes"] - base == MIB + 64 * 1024
    del s
    big = snn.lif_multi_step(torch.randn(1, 4 * MIB + 1))[0]  # 16 MiB + 4 bytes: huge pages
    assert memory.cache_info()["live_bytes"] - base == 16 * MIB + 2 * MIB
    del big


def test_a_failed_allocation_counts_nothing():
    s = _spikes(_x())
    before = memory.cache_info()
    with pytest.raises(torch.OutOfMemoryError, match="out of CPU memory"):
        s.resize_(1 << 50)  # 4 PiB
    assert memory.cache_info() == before
    del s


def test_cached_outputs_behave_as_tensors(tmp_path):
    base = memory.cache_info()
    s = _spikes(_x())
    assert memory.cache_info()["live_bytes"] == base["live_bytes"] + T * N * 4  # from the cache
    ref = s.clone()
    assert torch.equal(pickle.loads(pickle.dumps(s)), ref)
    assert torch.equal(copy.deepcopy(s), ref)
    torch.save(s, tmp_path / "s.pt")
    assert torch.equal(torch.load(tmp_path / "s.pt"), ref)
    lazy = torch._lazy_clone(s)  # copy-on-write clone: needs the data pointer as the context
    assert torch.equal(lazy, ref)
    s.resize_(2 * T, N)  # the storage grows through the cache's allocator
    assert memory.cache_info()["live_bytes"] >= base["live_bytes"] + 2 * T * N * 4
    assert torch.equal(s[:T], ref) and torch.equal(lazy, ref)
    s.resize_(1, 3)
    assert torch.equal(s, ref.view(-1)[:3].view(1, 3))
    s = _spikes(_x())
    assert torch.equal(torch.from_numpy(s.numpy().copy()), ref)  # (numpy() pins the size)
    s.share_memory_()
    assert s.is_shared()
    with torch.inference_mode():
        t = _spikes(_x())
    assert t.is_inference() and torch.equal(t, ref)


def _child_spikes(x, queue):
    torch.set_num_threads(1)  # as DataLoader workers do: GNU OpenMP is not fork-safe
    queue.put(_spikes(x).sum().item())


def test_a_forked_child_uses_the_cache():
    x = _x()
    held = _spikes(x)  # cache state the child inherits: one live block, one free
    del held
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    p = ctx.Process(target=_child_spikes, args=(x, queue))
    p.start()
    got = queue.get(timeout=60)
    p.join(timeout=60)
    assert p.exitcode == 0 and got == _spikes(x).sum().item()


def test_threads_share_the_cache_safely():
    xs = [_x(i) for i in range(4)]
    want = [_spikes(x) for x in xs]
    base_live = memory.cache_info()["live_bytes"]
    errors = []

    def work(i):
        try:
            for _ in range(10):
                if not torch.equal(_spikes(xs[i]), want[i]):
                    errors.append(f"thread {i}: wrong spikes")
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert memory.cache_info()["live_bytes"] == base_live


def test_profiler_sees_the_allocations():
    x = _x()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        s = _spikes(x)
        del s
    mem = [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage != 0]
    assert any(m >= T * N * 4 for m in mem)


def test_bad_limits_raise():
    with pytest.raises(ValueError, match="limit_bytes must be >= 0"):
        memory.set_cache_limit(-1)
    with pytest.raises(TypeError, match="limit_bytes must be an int"):
        memory.set_cache_limit(1.5)


def _run_with_env(value, code):
    env = dict(os.environ, PYPAPER_CPU_CACHE_MB=value)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)


def test_environment_variable_sets_the_limit():
    code = ("import torch, pypaper\n"
            "from pypaper import memory, snn\n"
            "print(memory.cache_info()['limit_bytes'])\n"
            "s = snn.lif_multi_step(torch.randn(4, 1 << 16))[0]\n"
            "del s\n"
            "print(memory.cache_info()['cached_bytes'])\n")
    r = _run_with_env("0", code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["0", "0"]
    r = _run_with_env("64", code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(64 * MIB), str(MIB)]
    for bad in ("lots", "-1", "99999999999999999999", str(1 << 44)):
        r = _run_with_env(bad, "import pypaper\n")  # fails at import, naming the variable
        assert r.returncode != 0 and "ValueError" in r.stderr
        assert "PYPAPER_CPU_CACHE_MB" in r.stderr, (bad, r.stderr)


def _grad_of(fn, x):
    x = x.detach().clone().requires_grad_()
    y = fn(x)
    (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    return y, gx


@pytest.mark.parametrize("op", ["fake_quantize", "quantize", "fewbit_gelu"])
def test_other_families_take_their_big_outputs_from_the_cache(op):
    from pypaper import quant
    from pypaper.quant import fewbit

    x = torch.randn(1024, 1024)  # 4 MiB (the int8 codes: 1 MiB)
    base = memory.cache_info()["live_bytes"]
    if op == "fake_quantize":
        out = _grad_of(lambda t: quant.fake_quantize(t, 0.05, 0, bits=8), x)  # y and grad_x
        want = 2 * x.numel() * 4
    elif op == "quantize":
        out = quant.quantize(x, bits=8)  # int8 codes
        want = x.numel()
    else:
        out = _grad_of(lambda t: fewbit.activation(t, "gelu", bits=2), x)  # y, codes, grad_x
        want = 2 * x.numel() * 4
    assert memory.cache_info()["live_bytes"] - base >= want
    del out
    assert memory.cache_info()["live_bytes"] == base
