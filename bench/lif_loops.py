"""python -m bench.lif_loops: is the fused LIF op bound by memory or by its arithmetic on this CPU?

Builds bench/tools/lif_loops.cpp (the CPU loops of kernels/cpu/snn_cpu.h, torch-free) and, in the
same run, bench/tools/membw.cpp, then prints for T = 32 (fp32, ATan, the bench's case; or
--surrogate's):

- the loops' arithmetic: forward and backward with their data in L2 (1024 neurons per thread),
  in ns per neuron-step, on one thread and on all;
- the loops cold (2^18 neurons, 32 MiB per [T, N] tensor, buffers swept from the caches before
  each pass), on all threads;
- the memory floor of the same streams (bench.membw: nothing computed);

for both backward modes: `rerun` (the CPU op's: the backward reruns the forward from x, 20 bytes
per neuron-step) and `keep_h` (the forward writes H, 24 bytes, no rerun). The cold time cannot
beat the larger of the two floors; which one it sits on says what a faster kernel would have to
cut. On the 2-core Xeon of the README's tables the backward's arithmetic in cache is well under
its memory floor (memory-bound, rerun wins); on a CPU whose cores do less per cycle the
arithmetic is the larger one, and there keeping H (less arithmetic, more bytes) can be faster.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from pypaper.snn import surrogate as surrogates
from pypaper.snn.reference import SURROGATE_IDS

from . import membw

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "tools" / "lif_loops.cpp"
# setup.py's flags for the CPU kernels (without torch): the same code generation as pypaper._C.
CXX_FLAGS = ["-O3", "-std=c++17", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math"]


def build(out_dir: Path) -> Path:
    arch = shlex.split(os.environ.get("PYPAPER_CPU_ARCH", "-march=native"))  # as setup.py reads it
    return membw.compile_tool(SOURCE, out_dir / "lif_loops", CXX_FLAGS + arch)


def measure(exe: Path, steps: int, neurons: int, reps: int, threads: int,
            surrogate: str = "ATan") -> list:
    """The tool's rows; ``surrogate`` runs with SpikingJelly's default alpha (pypaper's class)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    sid, alpha = SURROGATE_IDS[surrogate], getattr(surrogates, surrogate).default_alpha
    out = subprocess.run([str(exe), str(steps), str(neurons), str(reps), str(sid), str(alpha)],
                         env=env, check=True, capture_output=True, text=True).stdout
    rows = []
    for line in out.strip().splitlines():
        mode, case, nthreads, n, fwd, bwd = line.split("\t")
        rows.append({"mode": mode, "case": case, "threads": int(nthreads), "neurons": int(n),
                     "fwd_ms": float(fwd), "bwd_ms": float(bwd)})
    return rows


def _prefetch_hint() -> str:
    """The far-prefetch hint the loops use here: lif_prefetch_nta_default's choice (the env
    override, else the non-temporal hint on AMD CPUs)."""
    env = os.environ.get("PYPAPER_LIF_PREFETCH")
    if env in ("nta", "l2"):
        return f"{env} (PYPAPER_LIF_PREFETCH)"
    try:
        with open("/proc/cpuinfo") as f:
            amd = "AuthenticAMD" in f.read(4096)
    except OSError:
        amd = False
    return "nta (AMD CPU)" if amd else "l2"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.lif_loops", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=11, help="timed repeats of the cold case")
    p.add_argument("--neurons", type=int, default=1 << 18,
                   help="neurons of the cold case (default 2^18: the bench's; a multiple of 2^13 "
                        "keeps membw's streams the same size)")
    p.add_argument("--surrogate", default="ATan", choices=tuple(SURROGATE_IDS),
                   help="the backward's surrogate, with SpikingJelly's default alpha (default ATan, "
                        "the bench's; Sigmoid is SpikingJelly's default)")
    p.add_argument("--threads", type=int, default=None,
                   help="OpenMP threads (default: torch's intra-op threads, else all cores)")
    args = p.parse_args(argv)
    threads = membw.default_threads(args.threads)
    steps, neurons = 32, args.neurons
    if neurons < 1:
        raise SystemExit(f"--neurons must be >= 1, got {neurons}")
    mib = max(1, steps * neurons * 4 >> 20)  # membw's streams: one [T, N] fp32 tensor each
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(build(Path(tmp)), steps, neurons, args.reps, threads, args.surrogate)
        bw = membw.measure(membw.build(Path(tmp)), mib, args.reps, threads)
    # membw's floors, scaled from its stream size to the cold case's T x neurons
    scale = steps * neurons * 4 / (mib << 20)
    copy = membw.best_ms(bw["copy (1 read, 1 write)"]) * scale
    write2 = membw.best_ms(bw["1 read, 2 writes (LIF forward keeping H)"]) * scale
    read2 = membw.best_ms(bw["2 reads, 1 write (LIF backward)"]) * scale
    per_ns = 1e6 / (steps * neurons)  # ms of the cold case -> ns per neuron-step
    print(f"## LIF loops, T = {steps}, fp32, {args.surrogate}: arithmetic (in cache) against "
          f"memory (cold), {threads} threads\n")
    print(f"ns per neuron-step (wall time / (T x neurons)); `cold` at {neurons} neurons; the "
          "floor is bench.membw's, same run, same streams, nothing computed. Far prefetches: "
          f"{_prefetch_hint()} (kernels/cpu/snn_cpu.h lif_prefetch_nta_default; "
          "PYPAPER_LIF_PREFETCH=nta|l2 chooses).\n")
    print("| mode | case | threads | neurons | fwd ns | bwd ns | fwd+bwd ns |\n"
          "|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        work = steps * r["neurons"]
        f, b = r["fwd_ms"] * 1e6 / work, r["bwd_ms"] * 1e6 / work
        print(f"| {r['mode']} | {r['case']} | {r['threads']} | {r['neurons']} | {f:.3f} | "
              f"{b:.3f} | {f + b:.3f} |")
    for mode, fwd_floor in (("rerun", copy), ("keep_h", write2)):
        f, b = fwd_floor * per_ns, read2 * per_ns
        print(f"| {mode} | memory floor | {threads} | {neurons} | {f:.3f} | {b:.3f} | "
              f"{f + b:.3f} |")
    print()
    for mode in ("rerun", "keep_h"):
        hot = next(r for r in rows if r["mode"] == mode and r["case"] == "in cache"
                   and r["threads"] == threads)
        cold = next(r for r in rows if r["mode"] == mode and r["case"] == "cold")
        fwd_floor = copy if mode == "rerun" else write2
        for part, floor_ms in (("fwd", fwd_floor), ("bwd", read2)):
            arith = hot[f"{part}_ms"] * neurons / hot["neurons"]  # in-cache rate at 2^18
            took = cold[f"{part}_ms"]
            bound = "arithmetic" if arith > floor_ms else "memory"
            print(f"- {mode} {part}: cold {took:.2f} ms; arithmetic {arith:.2f} ms, memory "
                  f"{floor_ms:.2f} ms: bound by {bound} ({took / max(arith, floor_ms):.2f}x the "
                  f"larger)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
