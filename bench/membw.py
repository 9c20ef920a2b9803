"""python -m bench.membw: the memory-bandwidth floor of the LIF kernels on this CPU.

Builds bench/tools/membw.cpp (torch-free C++, OpenMP) with the system compiler and runs the
streams the fused LIF op moves at T = 32 with 2^18 neurons (32 MiB per [T, N] fp32 tensor), each
on cold buffers with non-temporal stores and nothing to compute, in two orders (linear, and the
kernels' own: chunks of 128 neurons walking their T rows); the faster order counts:

    forward:  X read; S written (and H, by an op that keeps it)   (1 read, 1 or 2 writes)
    backward: grad_S and X (or H) read; grad_X written           (2 reads, 1 write)

The sums are the least time an implementation can take for forward + backward when its tensors
come from DRAM, as they do in the benchmark (every provider runs between the others, so each
starts cold): pypaper's CPU op reruns the forward in the backward (20 bytes per neuron-step), an
op that keeps H moves 24. With the latest fwd+bwd rows of bench/results/snn.csv it prints the
largest speedup over each peer the floor allows.
"""
from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "tools" / "membw.cpp"
SNN_CSV = HERE / "results" / "snn.csv"
LIF_KERNEL = "LIF multi-step T=32"


def compile_tool(source: Path, exe: Path, flags: list) -> Path:
    """Builds one torch-free timing tool of bench/tools with $CXX (else c++ / g++)."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        raise SystemExit("no C++ compiler found (set CXX)")
    subprocess.run([cxx, *flags, str(source), "-o", str(exe)], check=True)
    return exe


def build(out_dir: Path) -> Path:
    return compile_tool(SOURCE, out_dir / "membw", ["-O3", "-march=native", "-fopenmp"])


def measure(exe: Path, mib: int, reps: int, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    out = subprocess.run([str(exe), str(mib), str(reps)], env=env, check=True,
                         capture_output=True, text=True).stdout
    rows = {}  # name -> {order: (bytes, ms, GB/s)}
    for line in out.strip().splitlines():
        name, order, nbytes, ms, gbps = line.split("\t")
        rows.setdefault(name, {})[order] = (int(float(nbytes)), float(ms), float(gbps))
    return rows


def best_ms(orders: dict) -> float:
    return min(ms for _, ms, _ in orders.values())


def latest_peers(path: Path = SNN_CSV) -> dict:
    """provider -> median ms of the newest fwd+bwd rows of the LIF T = 32 case."""
    if not path.exists():
        return {}
    with path.open() as f:
        rows = [r for r in csv.DictReader(f)
                if r["kernel"] == LIF_KERNEL and r["mode"] == "fwd+bwd" and r["device"] == "cpu"]
    if not rows:
        return {}
    newest = max(r["timestamp"] for r in rows)
    return {r["provider"]: float(r["median_ms"]) for r in rows if r["timestamp"] == newest}


def default_threads(requested=None) -> int:
    """The OpenMP threads to time with: as asked, else torch's intra-op threads (what the ops
    use), else every core."""
    if requested is not None:
        return requested
    try:
        import torch

        return torch.get_num_threads()
    except ImportError:
        return os.cpu_count() or 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.membw", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mib", type=int, default=32, help="MiB per stream (default 32: the bench)")
    p.add_argument("--reps", type=int, default=11, help="timed repeats per pattern")
    p.add_argument("--threads", type=int, default=None,
                   help="OpenMP threads (default: torch's intra-op threads, else all cores)")
    args = p.parse_args(argv)
    threads = default_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(build(Path(tmp)), args.mib, args.reps, threads)
    print(f"## memory-bandwidth floor, {threads} threads, {args.mib} MiB per stream, cold buffers, "
          f"non-temporal stores\n")
    print("| pattern | order | MB moved | median ms | GB/s |\n|---|---|---:|---:|---:|")
    for name, orders in rows.items():
        for order, (nbytes, ms, gbps) in orders.items():
            print(f"| {name} | {order} | {nbytes / 1e6:.1f} | {ms:.3f} | {gbps:.1f} |")
    fwd = best_ms(rows["copy (1 read, 1 write)"])
    fwd_h = best_ms(rows["1 read, 2 writes (LIF forward keeping H)"])
    bwd = best_ms(rows["2 reads, 1 write (LIF backward)"])
    floor = fwd + bwd
    print(f"\nLIF forward + backward floor, rerunning the forward in the backward: {fwd:.2f} + "
          f"{bwd:.2f} = {floor:.2f} ms; keeping H: {fwd_h:.2f} + {bwd:.2f} = {fwd_h + bwd:.2f} ms "
          f"({args.mib} MiB per [T, N] tensor; T = 32 x 2^18 neurons at 32)")
    peers = latest_peers() if args.mib == 32 else {}
    if peers:
        print(f"\nnewest fwd+bwd rows of {SNN_CSV.relative_to(HERE.parent)}:")
        for name, ms in sorted(peers.items()):
            print(f"- {name}: {ms:.2f} ms; at the floor a kernel would be {ms / floor:.1f}x "
                  f"faster than it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
