"""The shared benchmark harness of every family (DESIGN.md, "Benchmarks").

A family module describes ``Case``s: one kernel at one shape/dtype/device, the bytes it moves per
mode ("fwd", "bwd", "fwd+bwd"), and a factory of ``Provider``s (pypaper, the plain-PyTorch
reference, torch.compile of it, peers), each a zero-argument call per mode. The harness times
every provider of a case in the same run, round-robin, reports medians, GB/s against the copy
bandwidth measured in the same run and speedups against the "reference" provider, then writes a
markdown table, CSV rows and a PNG plot. Timings are never asserted anywhere.
"""
import os
import sys

_TORCH_PRELOADED = "torch" in sys.modules
# Allocations > 32 MB are fresh mmaps that page-fault on first touch (x.clone() runs at a fifth of
# y.copy_(x) on the 2-core build machines); with this torch madvises huge pages for them. torch
# reads it once, at its first CPU allocation, so it must be set before torch is imported.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import csv  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable, Optional, Sequence  # noqa: E402

import torch  # noqa: E402

MODES = ("fwd", "bwd", "fwd+bwd")
REFERENCE = "reference"
REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"
LIMIT_NUMEL = 1 << 24  # 64 MB of fp32: well past the last-level cache


# ---------------------------------------------------------------------------------------------
# Descriptions


@dataclass
class Provider:
    """One way to run a case: a zero-argument call per mode, or the reason it cannot run."""

    name: str
    calls: dict = field(default_factory=dict)  # mode -> Callable[[], object]
    reason: Optional[str] = None
    saved_bytes: Optional[int] = None  # kept for backward by one forward (saved_bytes() below)


def unavailable(name: str, reason: str) -> Provider:
    """A provider reported as missing (with why) instead of timed."""
    return Provider(name, {}, reason)


@dataclass
class Case:
    """One kernel at one shape, dtype and device.

    ``bytes_moved[mode]``: inputs read + outputs written by one call, the same count for every
    provider (what the op must move, not what an implementation happens to move); ``bytes_note``
    says how it was counted. ``providers`` builds the tensors and calls lazily, so only one case's
    tensors are alive at a time. ``memory``: also record the peak memory of one call.
    """

    kernel: str
    shape: tuple
    dtype: torch.dtype
    device: str
    bytes_moved: dict
    providers: Callable[[], list]
    bytes_note: str = ""
    memory: bool = False
    baseline: str = REFERENCE  # the provider the "vs" column divides by

    @property
    def modes(self) -> tuple:
        return tuple(m for m in MODES if m in self.bytes_moved)


@dataclass
class Timing:
    """How to sample: ``repeats`` timed calls after ``warmup`` calls, but a provider stops once
    it has ``min_repeats`` samples and has spent ``budget_s`` seconds (slow references)."""

    repeats: int = 20
    warmup: int = 1
    budget_s: float = 2.0
    min_repeats: int = 3


@dataclass
class Result:
    """The measurement of one (case, mode, provider)."""

    case: Case
    mode: str
    provider: str
    median_s: Optional[float] = None
    repeats: int = 0
    reason: Optional[str] = None
    error: bool = False  # the call raised (as opposed to a provider that is not installed)
    peak_bytes: Optional[int] = None
    saved_bytes: Optional[int] = None
    speedup: Optional[float] = None
    copy_gbps: Optional[float] = None  # copy bandwidth timed in the same rounds

    @property
    def gbps(self) -> Optional[float]:
        if self.median_s is None:
            return None
        return self.case.bytes_moved[self.mode] / self.median_s / 1e9


class Limits:
    """What the machine can do, measured in the same run as the kernels.

    Copy (y.copy_(x) into an existing tensor) and clone (x.clone(), allocating) of ``numel``
    fp32 elements are timed before the cases and again in every round of every case (see
    ``sample_round_robin``), so that a row's "% copy" compares against the copy bandwidth of the
    same moments: on a shared machine the load changes within a run.
    """

    def __init__(self, device: str, numel: int, matmul_gflops: float, thp: str):
        self.device = device
        self.x = torch.randn(numel, device=device)
        self.y = torch.empty_like(self.x)
        self.nbytes = 2 * self.x.numel() * self.x.element_size()  # read + write
        self.samples = {"copy": [], "clone": []}
        self.matmul_gflops = matmul_gflops
        self.thp = thp

    def probes(self) -> dict:
        """The calls timed next to the providers: {"copy": ..., "clone": ...}."""
        return {"copy": lambda: self.y.copy_(self.x), "clone": self.x.clone}

    def add(self, samples: dict) -> None:
        for k, v in samples.items():
            self.samples[k] += v

    def gbps(self, kind: str, samples: Optional[Sequence[float]] = None) -> float:
        """Bandwidth of the median of ``samples`` (default: every sample of the run)."""
        return self.nbytes / statistics.median(samples or self.samples[kind]) / 1e9

    @property
    def copy_gbps(self) -> float:
        return self.gbps("copy")

    @property
    def clone_gbps(self) -> float:
        return self.gbps("clone")

    def line(self) -> str:
        return (f"Limits: copy {self.copy_gbps:.1f} GB/s (y.copy_(x), read+write), "
                f"clone {self.clone_gbps:.1f} GB/s (x.clone(), allocating), "
                f"fp32 matmul {self.matmul_gflops:.0f} GFLOP/s (1024^3); THP {self.thp}. "
                f"Copy and clone: medians of {len(self.samples['copy'])} samples spread over "
                f"the run; % copy compares each row with the copies timed in its own rounds.")


# ---------------------------------------------------------------------------------------------
# Timing


def synchronizer(device: str) -> Callable[[], None]:
    """What makes device work finish before the clock is read."""
    if torch.device(device).type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def time_once(call: Callable[[], object], sync: Callable[[], None]) -> float:
    """Seconds of one call, device work included. The result is dropped after the clock stops,
    so freeing it is not timed."""
    sync()
    t0 = time.perf_counter()
    out = call()
    sync()
    elapsed = time.perf_counter() - t0
    del out
    return elapsed


def _done(samples: list, spent: float, timing: Timing) -> bool:
    if len(samples) >= timing.repeats:
        return True
    return len(samples) >= min(timing.min_repeats, timing.repeats) and spent >= timing.budget_s


def balanced_orders(n: int) -> list:
    """A Williams design over n items: n orders (2n for odd n) in which every item is first once
    per cycle and comes right after every other item equally often (first-order carryover
    balanced). Row r: r, r + 1, r - 1, r + 2, r - 2, ... (mod n); odd n adds the reversed rows."""
    if n <= 1:
        return [list(range(n))]
    base, lo, hi = [0], 1, n - 1
    while len(base) < n:
        base.append(lo)
        lo += 1
        if len(base) < n:
            base.append(hi)
            hi -= 1
    rows = [[(b + r) % n for b in base] for r in range(n)]
    if n % 2:
        rows += [row[::-1] for row in rows]
    return rows


def sample_round_robin(calls: dict, sync: Callable[[], None], timing: Timing,
                       probes: Optional[dict] = None) -> tuple:
    """Timed samples per provider, taken in turns so that the machine's noise falls on every
    provider alike; each round also times every probe once (the copy limit). The rounds cycle
    through the orders of a Williams design (:func:`balanced_orders`), in which every provider
    comes right after every other one equally often: a fixed order (A B C A B C ...) gives each
    provider a fixed predecessor, and what that call leaves behind (a 64 MB fp32 weight stream
    in the caches, the core's state) is a bias, not noise. Measured on the Xeon: the int4 decode
    kernel right after the fp32 baseline 3.6x, the same kernel one slot later 4.2x.
    Warm-up (first call, compilation) is done before. Returns (samples, probe samples)."""
    samples = {name: [] for name in calls}
    spent = dict.fromkeys(calls, 0.0)
    probes = probes or {}
    probe_samples = {name: [] for name in probes}
    rnd = 0
    while True:
        active = [n for n in calls if not _done(samples[n], spent[n], timing)]
        if not active:
            return samples, probe_samples
        orders = balanced_orders(len(active))
        order = orders[rnd % len(orders)]
        rnd += 1
        for name in (active[i] for i in order):
            t = time_once(calls[name], sync)
            samples[name].append(t)
            spent[name] += t
        for name, probe in probes.items():
            probe_samples[name].append(time_once(probe, sync))


def _describe(e: BaseException) -> str:
    """The exception's type and first line, short enough for a table note."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:200]


def warm_up(calls: dict, sync: Callable[[], None], timing: Timing) -> dict:
    """Run each call ``timing.warmup`` times; returns {name: error message} of those that raised
    (a peer that does not support the dtype, a compile that fails) and drops them from calls."""
    errors = {}
    for name in list(calls):
        try:
            for _ in range(max(1, timing.warmup)):
                time_once(calls[name], sync)
        except Exception as e:  # noqa: BLE001 - reported in the table, not fatal
            errors[name] = _describe(e)
            del calls[name]
    return errors


# ---------------------------------------------------------------------------------------------
# Autograd helpers shared by families


def saved_bytes(forward: Callable[[], object], exclude: Sequence[torch.Tensor] = ()) -> int:
    """Bytes autograd keeps for the backward of one call of ``forward`` (each storage once;
    ``exclude``: tensors that live anyway, such as parameters), via saved-tensor hooks."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(seen.values())


def backward_only(forward: Callable[[], torch.Tensor], inputs: Sequence[torch.Tensor],
                  grad: torch.Tensor) -> Callable[[], object]:
    """A call that runs the backward alone: the first call (a warm-up) builds the graph of one
    forward, later calls replay its backward with retain_graph. autograd.grad returns fresh
    gradients instead of accumulating into .grad, which would add a read-modify-write."""
    state = {}

    def call():
        if "y" not in state:
            state["y"] = forward()
        return torch.autograd.grad(state["y"], inputs, grad, retain_graph=True)

    return call


def on_backend(calls: dict, backend) -> dict:
    """``calls`` (mode -> callable), each run under pypaper.use_backend(backend); unchanged when
    backend is None (the device's default)."""
    if backend is None:
        return calls
    import pypaper

    def wrap(call):
        def run():
            with pypaper.use_backend(backend):
                return call()
        return run

    return {m: wrap(c) for m, c in calls.items()}


def forward_backward(forward: Callable[[], torch.Tensor], inputs: Sequence[torch.Tensor],
                     grad: torch.Tensor) -> Callable[[], object]:
    """A call that runs forward then backward (what one training step pays)."""
    return lambda: torch.autograd.grad(forward(), inputs, grad)


# ---------------------------------------------------------------------------------------------
# Peak memory (optional, per case)


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def peak_memory(call: Callable[[], object], device: str) -> Optional[int]:
    """Bytes above the starting level at the peak of one call: the CUDA caching allocator's peak
    on GPUs; on Linux CPUs the resident high-water mark (reset through /proc/self/clear_refs).
    None where neither can be read."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = call()
        torch.cuda.synchronize()
        del out
        return torch.cuda.max_memory_allocated() - base
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        base = _proc_status_bytes("VmRSS")
        out = call()
        peak = _proc_status_bytes("VmHWM")
        del out
        return max(0, peak - base)
    except (OSError, KeyError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------
# Machine limits and environment


def _anon_huge_bytes() -> Optional[int]:
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def thp_state() -> str:
    """'on' if torch's large CPU allocations get transparent huge pages in this process, checked
    by allocating 64 MB and reading AnonHugePages; else 'off' (with why, where known)."""
    before = _anon_huge_bytes()
    probe = torch.empty(64 << 20, dtype=torch.uint8).fill_(1)
    after = _anon_huge_bytes()
    del probe
    env = os.environ.get("THP_MEM_ALLOC_ENABLE", "")
    if before is None or after is None:
        return "unknown (no /proc/self/smaps_rollup)" + (", env=1" if env == "1" else "")
    if after - before >= (2 << 20):
        return "on"
    if _TORCH_PRELOADED:
        return "off (torch allocated before bench.harness set THP_MEM_ALLOC_ENABLE)"
    return "off" if env == "1" else "off (THP_MEM_ALLOC_ENABLE unset)"


def measure_limits(device: str, repeats: int = 10, numel: int = LIMIT_NUMEL) -> Limits:
    """The first samples of copy and clone on ``numel`` fp32 elements, and the fp32 matmul
    1024^3 throughput (measured once: families of GEMMs compare against it)."""
    sync = synchronizer(device)
    a = torch.randn(1024, 1024, device=device)
    b = torch.randn(1024, 1024, device=device)
    time_once(lambda: a @ b, sync)
    mm = 2 * 1024 ** 3 / statistics.median(time_once(lambda: a @ b, sync)
                                           for _ in range(repeats)) / 1e9
    thp = thp_state() if torch.device(device).type == "cpu" else "n/a"
    limits = Limits(device, numel, mm, thp)
    probes = limits.probes()
    for call in probes.values():
        time_once(call, sync)
    limits.add({k: [time_once(c, sync) for _ in range(repeats)] for k, c in probes.items()})
    return limits


def device_name(device: str) -> str:
    """GPU name, or the CPU model with its core count."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    model = "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} x{torch.get_num_threads()} threads"


def git_commit() -> str:
    """HEAD's short hash; PYPAPER_COMMIT when set (a copy of the tree without .git: a GPU host)."""
    if os.environ.get("PYPAPER_COMMIT"):
        return os.environ["PYPAPER_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: str, limits: Limits) -> dict:
    """Run-wide fields of every CSV row."""
    try:
        import pypaper

        simd = pypaper.build_info().get("simd", "unknown")
    except Exception:  # noqa: BLE001 - the bench still runs peers without pypaper
        simd = "unavailable"
    return {
        "timestamp": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": torch.device(device).type,
        "device_name": device_name(device),
        "commit": git_commit(),
        "torch": torch.__version__,
        "simd": simd,
        "thp": limits.thp,
    }


# ---------------------------------------------------------------------------------------------
# Running


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, file=sys.stderr, disable=not enabled, unit="case", leave=False,
                dynamic_ncols=True)


def _results_for_mode(case: Case, mode: str, providers: list, timing: Timing,
                      limits: Limits) -> list:
    """Warm up and time every provider of ``case`` that has ``mode``, with the copy limit."""
    sync = synchronizer(case.device)
    results = [Result(case, mode, p.name, reason=p.reason) for p in providers
               if p.reason is not None]
    calls = {p.name: p.calls[mode] for p in providers if p.reason is None and mode in p.calls}
    for name, why in warm_up(calls, sync, timing).items():
        results.append(Result(case, mode, name, reason=why, error=True))
    samples, probe_samples = sample_round_robin(calls, sync, timing, limits.probes())
    limits.add(probe_samples)
    copy = limits.gbps("copy", probe_samples["copy"]) if probe_samples["copy"] else None
    saved = {p.name: p.saved_bytes for p in providers}
    for name, times in samples.items():
        r = Result(case, mode, name, statistics.median(times), len(times), copy_gbps=copy,
                   saved_bytes=saved.get(name))
        if case.memory:
            r.peak_bytes = peak_memory(calls[name], case.device)
        results.append(r)
    order = [p.name for p in providers]
    return sorted(results, key=lambda r: order.index(r.provider))


def add_speedups(results: list) -> None:
    """speedup = t_baseline / t, per (case, mode); the baseline is the case's (the reference
    unless the family names another, e.g. torch's own op)."""
    ref = {(id(r.case), r.mode): r.median_s for r in results
           if r.provider == r.case.baseline and r.median_s}
    for r in results:
        t_ref = ref.get((id(r.case), r.mode))
        if t_ref and r.median_s:
            r.speedup = t_ref / r.median_s


def _drop_mode(providers: list, mode: str) -> None:
    # Frees what the mode's calls hold (retained graphs) before the next mode allocates its own.
    for p in providers:
        p.calls.pop(mode, None)


def run_cases(cases: Sequence[Case], timing: Timing, limits: Limits, progress: bool = True,
              only: Optional[set] = None) -> list:
    """Time every (case, mode, provider); ``only``: provider names to keep (None: all)."""
    results = []
    bar = _progress(sum(len(c.modes) for c in cases), progress)
    try:
        for case in cases:
            providers = [p for p in case.providers() if only is None or p.name in only]
            for mode in case.modes:
                bar.set_postfix_str(f"{case.kernel} {dtype_name(case.dtype)} {mode}")
                results += _results_for_mode(case, mode, providers, timing, limits)
                _drop_mode(providers, mode)
                bar.update(1)
            del providers
            _reset_compiled()
    finally:
        bar.close()
    add_speedups(results)
    return results


def _reset_compiled() -> None:
    # Compiled graphs and their caches of one case must not pile up (or hit recompile limits).
    torch.compiler.reset()
    gc.collect()


# ---------------------------------------------------------------------------------------------
# Output


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def shape_str(shape: Sequence[int]) -> str:
    return "x".join(str(s) for s in shape)


def _fmt(v: Optional[float], spec: str, none: str = "—") -> str:
    return none if v is None else format(v, spec)


def _mb(nbytes: Optional[int]) -> Optional[float]:
    return None if nbytes is None else nbytes / 2 ** 20


def pct_copy(r: Result, limits: Limits) -> Optional[float]:
    """Achieved GB/s against the copy of the row's own rounds (else of the whole run)."""
    return None if r.gbps is None else 100.0 * r.gbps / (r.copy_gbps or limits.copy_gbps)


def header_line(family: str, env: dict) -> str:
    return (f"## {family} on {env['device']} ({env['device_name']}): torch {env['torch']}, "
            f"pypaper simd {env['simd']}, commit {env['commit']}, THP {env['thp']}")


def markdown_table(results: Sequence[Result], limits: Limits) -> str:
    """One row per (case, mode, provider); missing providers get dashes here and a reason
    below the table. A peak-memory column appears when some case measured it."""
    mem = any(r.case.memory for r in results)
    kept = any(r.saved_bytes is not None for r in results)
    lines = ["| kernel | shape | dtype | mode | provider | median ms | GB/s | % copy | speedup |"
             + (" peak MB |" if mem else "") + (" saved for bwd MB |" if kept else ""),
             "|---|---|---|---|---|---:|---:|---:|---:|" + ("---:|" if mem else "")
             + ("---:|" if kept else "")]
    for r in results:
        speedup = _fmt(r.speedup, ".2f") + ("x" if r.speedup else "")
        lines.append(
            f"| {r.case.kernel} | {shape_str(r.case.shape)} | {dtype_name(r.case.dtype)} | {r.mode} "
            f"| {r.provider} | {_fmt(r.median_s and r.median_s * 1e3, '.2f')} "
            f"| {_fmt(r.gbps, '.2f')} | {_fmt(pct_copy(r, limits), '.0f')} | {speedup} |"
            + (f" {_fmt(r.peak_bytes and r.peak_bytes / 2 ** 20, '.1f')} |" if mem else "")
            + (f" {_fmt(_mb(r.saved_bytes), '.2f')} |" if kept else ""))
    return "\n".join(lines)


def notes(results: Sequence[Result], cases: Sequence[Case]) -> str:
    """How bytes were counted, per kernel, and why providers are missing, once each."""
    counted = {}
    for c in cases:
        if c.bytes_note:
            counted.setdefault(c.bytes_note, []).append(c.kernel)
    out = [f"- bytes of {', '.join(dict.fromkeys(ks))}: {note}" for note, ks in counted.items()]
    baselines = {}
    for c in cases:
        baselines.setdefault(c.baseline, []).append(c.kernel)
    out += [f"- speedup: time of {b} / time ({', '.join(dict.fromkeys(ks))})"
            for b, ks in baselines.items()]
    missing = {}
    for r in results:
        if r.reason:
            missing.setdefault((r.provider, r.reason, r.error), []).append(
                f"{r.case.kernel} {dtype_name(r.case.dtype)} {r.mode}")
    for (prov, why, err), where in missing.items():
        kind = "failed" if err else "unavailable"
        out.append(f"- {prov} {kind} ({'; '.join(dict.fromkeys(where))}): {why}")
    return "\n".join(out)


CSV_COLUMNS = ("timestamp", "kernel", "provider", "mode", "shape", "dtype", "device",
               "device_name", "median_ms", "gbps", "pct_copy", "speedup", "baseline", "commit",
               "torch", "simd", "thp", "repeats", "peak_mem_mb", "saved_bytes", "copy_gbps",
               "clone_gbps", "matmul_gflops", "note")


def csv_rows(results: Sequence[Result], limits: Limits, env: dict) -> list:
    rows = []
    for r in results:
        rows.append({
            **env, "kernel": r.case.kernel, "provider": r.provider, "mode": r.mode,
            "shape": shape_str(r.case.shape), "dtype": dtype_name(r.case.dtype),
            "median_ms": _fmt(r.median_s and r.median_s * 1e3, ".4f", ""),
            "gbps": _fmt(r.gbps, ".3f", ""), "pct_copy": _fmt(pct_copy(r, limits), ".1f", ""),
            "speedup": _fmt(r.speedup, ".3f", ""), "baseline": r.case.baseline,
            "repeats": r.repeats,
            "peak_mem_mb": _fmt(r.peak_bytes and r.peak_bytes / 2 ** 20, ".1f", ""),
            "saved_bytes": "" if r.saved_bytes is None else r.saved_bytes,
            "copy_gbps": f"{r.copy_gbps or limits.copy_gbps:.3f}", "clone_gbps": f"{limits.clone_gbps:.3f}",
            "matmul_gflops": f"{limits.matmul_gflops:.1f}", "note": r.reason or "",
        })
    return rows


def append_csv(path: Path, rows: Sequence[dict]) -> None:
    """Append rows; a file with other columns (an older layout) is moved aside, not mixed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        with open(path, newline="") as f:
            head = next(csv.reader(f), None)
        if head is not None and tuple(head) != CSV_COLUMNS:
            path.rename(path.with_suffix(f".{int(time.time())}.old.csv"))
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerows(rows)


def _plot_title(family: str, env: dict) -> str:
    return (f"{family} on {env['device_name']}\ntorch {env['torch']}, simd {env['simd']}, "
            f"commit {env['commit']}, THP {env['thp']}, {env['timestamp']}")


def plot(results: Sequence[Result], limits: Limits, title: str, path: Path) -> None:
    """Bars of GB/s per provider, grouped by (kernel, dtype, mode); a black tick over each group
    marks the copy bandwidth timed in its rounds, dashed lines the run's copy and clone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = lambda r: (r.case.kernel, dtype_name(r.case.dtype), r.mode)  # noqa: E731
    groups = list(dict.fromkeys(key(r) for r in results))
    provs = list(dict.fromkeys(r.provider for r in results))
    gb = {(key(r), r.provider): r.gbps for r in results}
    copy = {key(r): r.copy_gbps for r in results if r.copy_gbps}
    width = 0.8 / max(1, len(provs))
    fig, ax = plt.subplots(figsize=(min(20.0, max(8.0, 3.0 + 0.9 * len(groups))), 5.0))
    for i, p in enumerate(provs):
        xs = [g + (i - (len(provs) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [gb.get((g, p)) or 0.0 for g in groups], width, label=p)
    ticks = [(i, copy[g]) for i, g in enumerate(groups) if g in copy]
    if ticks:
        ax.hlines([c for _, c in ticks], [i - 0.45 for i, _ in ticks], [i + 0.45 for i, _ in ticks],
                  colors="k", lw=2, label="copy, same rounds")
    ax.axhline(limits.copy_gbps, color="k", lw=0.8, ls="--",
               label=f"copy, run {limits.copy_gbps:.1f} GB/s")
    ax.axhline(limits.clone_gbps, color="gray", lw=0.8, ls=":",
               label=f"clone, run {limits.clone_gbps:.1f} GB/s")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{k}\n{d} {m}" for k, d, m in groups], rotation=35, ha="right",
                       fontsize=7)
    ax.set_ylabel("GB/s (bytes read + written / median time)")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# One family, end to end


@dataclass
class Report:
    markdown: str
    results: list
    csv_path: Path
    png_path: Optional[Path]


def run_family(family: str, cases: Sequence[Case], device: str, timing: Timing,
               csv_dir: Path = RESULTS_DIR, make_plot: bool = True, progress: bool = True,
               only: Optional[set] = None, limits: Optional[Limits] = None) -> Report:
    """Measure the limits (unless given), time the cases, write CSV (and PNG); the markdown
    (header, limits line, table, notes) is returned for the caller to print."""
    limits = limits or measure_limits(device)
    env = environment(device, limits)
    results = run_cases(cases, timing, limits, progress, only)
    head = header_line(family, env)
    md = "\n\n".join(s for s in (head, limits.line(), markdown_table(results, limits),
                                 notes(results, cases)) if s)
    csv_path = Path(csv_dir) / f"{family}.csv"
    append_csv(csv_path, csv_rows(results, limits, env))
    png = None
    if make_plot:
        png = Path(csv_dir) / f"{family}_{env['device']}.png"
        plot(results, limits, _plot_title(family, env), png)
    return Report(md, results, csv_path, png)
