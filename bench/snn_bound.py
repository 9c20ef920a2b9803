"""python -m bench.snn_bound: the highest speedup over snntorch a fused LIF op can show here.

Issue #3 asks the LIF op's forward + backward (T = 32, 2^18 neurons, fp32, ATan) to be 30x faster
than snntorch's Leaky loop, measured in the same run. No implementation can take less than the
sum of two things this script measures in one run:

1. the memory floor: the [T, N] streams the op must move (forward: X read, S written; backward,
   rerunning the forward: X and grad_S read, grad_X written), timed by bench.membw on cold
   buffers with non-temporal stores and nothing computed;
2. the fixed cost of one call and its backward through PyTorch, in the state a training step
   leaves the machine in: timed on a 16-element input right after a snntorch forward + backward
   has filled the caches with its own data (as in the benchmark, where every provider runs between
   the others; snntorch itself always runs right after another provider, as there). Three ops:
   - "built-in": torch's x * 2 (C++ kernel, C++ autograd): what any op pays at the least;
   - "contract": an op that does nothing, registered as ../shared/DESIGN.md asks of every pypaper
     op (torch.library schema, a CPU kernel, torch.library.register_autograd with a backward
     that is itself an op): what a pypaper op pays at the least (its kernels are Python here,
     a C++ kernel would save a little of it);
   - "pypaper": lif_multi_step itself on the 16 elements.

For each it prints snntorch's (and SpikingJelly's) fwd+bwd time over (floor + fixed cost): the
speedup a kernel running at the memory floor would show, next to pypaper's measured one.
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

from . import harness  # noqa: F401  (first: sets THP_MEM_ALLOC_ENABLE before torch loads)
from . import membw
from .snn import BATCH, TAU, _snntorch, _spikingjelly

import torch  # noqa: E402

import pypaper  # noqa: E402,F401
from pypaper import snn  # noqa: E402

def _contract_noop():
    """x -> empty_like(x) as a torch.library op with register_autograd, backward another op."""
    lib = torch.library.Library("pypaper_bound", "FRAGMENT")
    lib.define("noop(Tensor x) -> Tensor")
    lib.define("noop_backward(Tensor grad) -> Tensor")
    lib.impl("noop", lambda x: torch.empty_like(x), "CPU")
    lib.impl("noop_backward", lambda g: torch.empty_like(g), "CPU")
    torch.library.register_fake("pypaper_bound::noop", lambda x: torch.empty_like(x), lib=lib)
    torch.library.register_fake("pypaper_bound::noop_backward", lambda g: torch.empty_like(g),
                                lib=lib)
    torch.library.register_autograd(
        "pypaper_bound::noop", lambda ctx, g: torch.ops.pypaper_bound.noop_backward(g),
        setup_context=lambda ctx, inputs, output: None, lib=lib)
    return lib, torch.ops.pypaper_bound.noop


def _fwd_bwd(fn, xg, g):
    return lambda: torch.autograd.grad(fn(xg), (xg,), g)


def _ms(call) -> float:
    t0 = time.perf_counter()
    out = call()
    dt = time.perf_counter() - t0
    del out
    return dt * 1e3


def measure(steps: int, neurons: int, rounds: int) -> dict:
    """Median ms of: snntorch / SpikingJelly / pypaper fwd+bwd on [steps, 16, neurons/16], and of
    each fixed cost on 16 elements right after a snntorch fwd+bwd."""
    x = torch.randn(steps, BATCH, neurons // BATCH) + 0.6
    xg = x.clone().requires_grad_()
    g = torch.randn_like(x)
    small = (torch.randn(4, 2, 2) + 0.6).requires_grad_()
    gs = torch.randn_like(small)
    sur = snn.surrogate.ATan()
    lif = lambda t: snn.lif_multi_step(t, tau=TAU, surrogate_function=sur)[0]  # noqa: E731
    _lib, noop = _contract_noop()
    peer = _fwd_bwd(_snntorch()[0], xg, g)  # the benchmark's own providers
    sj = _spikingjelly()[0]
    fixed = {"built-in": _fwd_bwd(lambda t: t * 2, small, gs),
             "contract": _fwd_bwd(noop, small, gs),
             "pypaper": _fwd_bwd(lif, small, gs)}
    big = {"pypaper fwd+bwd": _fwd_bwd(lif, xg, g)}
    if sj is not None:
        big["spikingjelly fwd+bwd"] = _fwd_bwd(sj, xg, g)
    for call in (*fixed.values(), *big.values(), peer):  # warm-up: first calls build caches
        call()
    # snntorch always runs right after another provider's full-size fwd+bwd, as in the benchmark
    # (back to back with itself it is up to 1.7x slower here), and each fixed cost right after
    # snntorch, whose fwd+bwd leaves the caches full of its own data.
    samples = {}
    bigs = list(big.items())
    k = 0
    for _ in range(rounds):
        for name, call in fixed.items():
            big_name, big_call = bigs[k % len(bigs)]
            k += 1
            samples.setdefault(big_name, []).append(_ms(big_call))
            samples.setdefault("snntorch fwd+bwd", []).append(_ms(peer))
            samples.setdefault(name, []).append(_ms(call))
    return {k: statistics.median(v) for k, v in samples.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.snn_bound", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--neurons", type=int, default=1 << 18)
    p.add_argument("--rounds", type=int, default=8, help="samples of each measurement")
    p.add_argument("--membw-reps", type=int, default=11)
    args = p.parse_args(argv)
    if importlib.util.find_spec("snntorch") is None:
        print("snntorch is not installed: nothing to bound against")
        return 1
    if args.neurons % BATCH or args.neurons < BATCH:
        p.error(f"--neurons must be a positive multiple of {BATCH}")
    mib = max(1, args.steps * args.neurons * 4 >> 20)
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        rows = membw.measure(membw.build(Path(tmp)), mib, args.membw_reps, threads)
    floor = (membw.best_ms(rows["copy (1 read, 1 write)"])
             + membw.best_ms(rows["2 reads, 1 write (LIF backward)"]))
    m = measure(args.steps, args.neurons, args.rounds)
    st = m["snntorch fwd+bwd"]
    print(f"## LIF fwd+bwd bound, T = {args.steps}, {args.neurons} neurons, fp32, {threads} "
          f"threads\n")
    print(f"memory floor (bench.membw, {mib} MiB per stream, cold): {floor:.2f} ms")
    print(f"snntorch fwd+bwd: {st:.2f} ms; pypaper fwd+bwd: {m['pypaper fwd+bwd']:.2f} ms = "
          f"{st / m['pypaper fwd+bwd']:.1f}x snntorch")
    if "spikingjelly fwd+bwd" in m:
        sj = m["spikingjelly fwd+bwd"]
        print(f"spikingjelly fwd+bwd: {sj:.2f} ms; pypaper = {sj / m['pypaper fwd+bwd']:.1f}x "
              f"spikingjelly")
    print("\n| fixed cost of one call + backward (16 elements, after snntorch) | ms "
          "| floor + it, ms | snntorch / that | spikingjelly / that |\n|---|---:|---:|---:|---:|")
    for name in ("built-in", "contract", "pypaper"):
        bound = floor + m[name]
        sj_ratio = f"{m['spikingjelly fwd+bwd'] / bound:.1f}x" if "spikingjelly fwd+bwd" in m \
            else "-"
        print(f"| {name} | {m[name]:.3f} | {bound:.2f} | {st / bound:.1f}x | {sj_ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
