"""Compile every Triton kernel launch the test suite made for NVIDIA GPUs, on a machine without one.

Why: the build machines (and CI) have no GPU, so pypaper's Triton kernels are tested under
TRITON_INTERPRET=1, where numpy runs them. The interpreter accepts things the compiler refuses
(a shape that is not a constexpr, Python control flow on tensor values) and never sees the
compiled-only paths (USE_RN's inline PTX, bf16 pointers instead of the interpreter's int16 bit
patterns). A GPU is lent to few sessions, for minutes; a kernel that does not compile should not
cost that time. This is to the Triton kernels what ctest's nvcc compile proof is to the CUDA ones.

Two halves:

1. ``start_recording(directory)`` (tests/conftest.py calls it when PYPAPER_TRITON_LAUNCHES names a
   folder): every interpreted launch appends one line of JSON to ``<directory>/<pid>.jsonl``: the
   kernel (module:qualname) and its arguments by name, tensors reduced to their dtype and whether
   their address is 16-byte aligned (what Triton specializes on).
2. ``python tools/triton_compile_check.py DIRECTORY [--arch 90,80]``: in a process without the
   interpreter, each distinct launch is rebuilt as a GPU launch would be (USE_RN on, BF16_BITS off
   with the int16 tensors it marked as bf16 again) and compiled through Triton's own JIT
   specialization for each architecture, down to a cubin (ptxas), with a stand-in driver that
   names the target instead of asking a GPU. Nothing is launched. Exit status 1 if any fails.
"""
from __future__ import annotations

import argparse
import glob
import importlib
import json
import os
import sys
import time
import traceback
import warnings

# Run as a script (tools/dev.sh: `python tools/triton_compile_check.py`), sys.path[0] is tools/:
# the repository root, where pypaper is built in place, goes next to it.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(1, _ROOT)

# ---- recording (in the interpreted test process) ----------------------------------------------


def _encode(value):
    import torch

    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).removeprefix("torch."),
                "align16": value.data_ptr() % 16 == 0}
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    name = getattr(value, "name", None)
    if type(value).__module__.startswith("triton.language") and isinstance(name, str):
        return {"tl_dtype": name}
    return {"unsupported": repr(value)}


def _constexpr_names(fn) -> list[str]:
    """The parameters annotated tl.constexpr (a string annotation under `from __future__ import
    annotations`): each value of one of them is a kernel of its own."""
    import inspect

    return [p.name for p in inspect.signature(fn).parameters.values()
            if p.annotation is not inspect.Parameter.empty and "constexpr" in str(p.annotation)]


def start_recording(directory: str) -> None:
    """Record every interpreted Triton launch of this process under ``directory``."""
    from triton.runtime.interpreter import InterpretedFunction

    if getattr(InterpretedFunction.run, "_pypaper_recording", False):
        return
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{os.getpid()}.jsonl")
    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        named = dict(zip(self.arg_names, args))
        named.update(kwargs)
        record = {"kernel": f"{self.fn.__module__}:{self.fn.__qualname__}",
                  "args": {k: _encode(v) for k, v in named.items()},
                  "constexprs": _constexpr_names(self.fn)}
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    run._pypaper_recording = True
    InterpretedFunction.run = run


# ---- compiling (in a process without the interpreter) -----------------------------------------


def _int_class(v: int) -> tuple:
    """What Triton's specialization sees of an int: its width, == 1, divisibility by 16."""
    return (-2**31 <= v < 2**31, v == 1, v % 16 == 0)


def _key(record: dict) -> str:
    """Launches that compile to the same kernel: runtime ints by their specialization class,
    runtime floats by type only (their value is an argument); a constexpr by its value (each
    value, BLOCK=32 or 64, MODE=2 or 3, compiles a kernel of its own)."""
    constexprs = set(record.get("constexprs", ()))

    def norm(k, v):
        if k in constexprs or isinstance(v, bool) or not isinstance(v, (int, float)):
            return v
        return ["int", *_int_class(v)] if isinstance(v, int) else "float"

    return json.dumps([record["kernel"],
                       {k: norm(k, v) for k, v in sorted(record["args"].items())}])


def load_launches(directory: str) -> list[dict]:
    """The distinct launches recorded under ``directory``, in first-seen order."""
    seen = {}
    for path in sorted(glob.glob(os.path.join(directory, "*.jsonl"))):
        with open(path) as f:
            for line in f:
                record = json.loads(line)
                seen.setdefault(_key(record), record)
    return list(seen.values())


def as_gpu_launch(record: dict) -> dict:
    """The arguments a launch on an NVIDIA GPU passes: USE_RN on (the PTX rounding helpers), and
    bf16 tensors as bf16 (the interpreter passes their int16 bit patterns with BF16_BITS on).
    Constexprs the interpreted run passed explicitly stay as they were."""
    args = dict(record["args"])
    if "USE_RN" in args:
        args["USE_RN"] = True
    if args.get("BF16_BITS") is True:
        args["BF16_BITS"] = False
        for k, v in args.items():
            if isinstance(v, dict) and v.get("tensor") == "int16":
                args[k] = {**v, "tensor": "bfloat16"}
    return args


def _decode(value):
    import torch
    import triton.language as tl

    if not isinstance(value, dict):
        return value
    if "tensor" in value:
        dtype = getattr(torch, value["tensor"])
        t = torch.empty(64, dtype=dtype)  # CPU allocations are 64-byte aligned
        return t if value["align16"] else t[1:]
    if "tl_dtype" in value:
        return tl.dtype(value["tl_dtype"])
    raise ValueError(f"cannot rebuild argument {value['unsupported']}")


class _TargetOnlyDriver:
    """Triton's driver interface as far as compiling needs it: the target, no device."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        # Triton keeps one compile cache per device number and fixes its target when the cache
        # is made: one number per architecture, or a second --arch would reuse the first's
        return self.target.arch

    def get_current_stream(self, device=None):
        return 0


def _kernel(qualified: str):
    module, _, qualname = qualified.partition(":")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _load_kernel_modules() -> None:
    """pypaper's Triton kernels are defined when their family loads its Triton twin; load them
    all first, as a test run would have (a kernel's own module is imported with it: a kernel a
    test module defines needs what that module imports)."""
    import pypaper  # noqa: F401
    from pypaper.hopfield import _registration as hopfield
    from pypaper.snn import _registration as snn

    for load in (hopfield.load_triton, snn.load_triton):
        load()


def compile_launches(launches: list[dict], archs: list[int], log=print) -> list[str]:
    """Compile each launch for each architecture; return the failures as text."""
    from triton.runtime.driver import driver

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: compiling needs the real @triton.jit kernels")
    _load_kernel_modules()
    failures = []
    previous = driver._active  # None where no GPU driver was ever made active (reset_active
    for arch in archs:        # would look for one and fail)
        driver.set_active(_TargetOnlyDriver(arch))
        try:
            for record in launches:
                name = record["kernel"]
                try:
                    fn = _kernel(name)
                    fn = getattr(fn, "fn", fn) if not hasattr(fn, "warmup") else fn
                    args = {k: _decode(v) for k, v in as_gpu_launch(record).items()}
                    fn.warmup(grid=(1,), **args)
                except Exception as e:  # report every kernel, not just the first
                    summary = "".join(traceback.format_exception_only(type(e), e)).strip()
                    failures.append(f"sm_{arch} {name} {json.dumps(record['args'])}\n  {summary}")
        finally:
            driver._active = previous
        log(f"sm_{arch}: {len(launches)} launches compiled, "
            f"{sum(f.startswith(f'sm_{arch} ') for f in failures)} failed")
    return failures


def _compile_share(share):
    launches, archs = share
    return compile_launches(launches, archs, log=lambda *_: None)


def compile_in_parallel(launches: list[dict], archs: list[int], jobs: int) -> list[str]:
    """compile_launches over ``jobs`` processes (forked before this process imports torch),
    each taking every jobs-th launch."""
    if jobs <= 1:
        return compile_launches(launches, archs)
    import multiprocessing

    shares = [(launches[i::jobs], archs) for i in range(jobs)]
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        return [f for part in pool.map(_compile_share, shares) for f in part]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", help="where start_recording wrote the launches")
    parser.add_argument("--arch", default="90",
                        help="compute capabilities, comma separated (default 90: Hopper)")
    parser.add_argument("--require-launches", action="store_true",
                        help="fail when nothing was recorded (else: nothing to check, status 0)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="compiling processes (default: one per CPU)")
    opts = parser.parse_args(argv)
    # Triton 3.9 warns once per process that its FP-fusion default will change; the kernels whose
    # rounding matters do not depend on it (USE_RN: inline PTX)
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
    launches = load_launches(opts.directory)
    if not launches:
        print(f"no Triton launches recorded under {opts.directory}", file=sys.stderr)
        return 1 if opts.require_launches else 0
    kernels = len({r["kernel"] for r in launches})
    print(f"compiling {len(launches)} distinct launches of {kernels} Triton kernels "
          f"(recorded under {opts.directory}) for sm_{opts.arch}")
    start = time.perf_counter()
    failures = compile_in_parallel(launches, [int(a) for a in opts.arch.split(",")], opts.jobs)
    print(f"done in {time.perf_counter() - start:.0f} s: {len(failures)} failed")
    for f in failures:
        print("FAILED", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
