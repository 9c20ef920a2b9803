"""Backend selection for every pypaper op.

Backends: ``cpu`` (C++ kernels), ``cuda`` (hand-written CUDA kernels), ``triton`` (Triton kernels;
on CPU tensors only under TRITON_INTERPRET=1) and ``reference`` (plain PyTorch, runs anywhere).

The choice, highest priority first: the innermost ``pypaper.use_backend(...)`` context, the
``PYPAPER_BACKEND`` environment variable, then the op's default for the tensor's device (the
fastest measured; each family documents its defaults). An explicit request that cannot serve an
input raises ``BackendUnavailable`` saying why; the automatic choice falls back quietly.
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Callable, Iterator, Optional

import torch

from . import _ext

BACKENDS = ("cpu", "cuda", "triton", "reference")


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run this input."""


_local = threading.local()


def _stack() -> list:
    if not hasattr(_local, "stack"):
        _local.stack = []
    return _local.stack


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run pypaper ops in this block on backend ``name`` (cpu, cuda, triton or reference)."""
    _stack().append(_check_name(name))
    try:
        yield
    finally:
        _stack().pop()


_ENV_NAME = "PYPAPER_BACKEND"
try:  # the key as os.environ stores it (bytes on POSIX, upper-case str on Windows)
    _ENV_KEY = os.environ.encodekey(_ENV_NAME)
except AttributeError:  # not CPython's os._Environ: _env_value uses os.environ.get
    _ENV_KEY = _ENV_NAME


def _env_value() -> str:
    """PYPAPER_BACKEND as os.environ holds it now ("" when unset).

    Read on every call, so that setting it takes effect at once. When it is unset (the common
    case), ``os.environ.get`` finds out by raising and catching a KeyError inside os.py, ~30 us a
    call when another layer's data fills the caches (a training step; ~5% of the LIF op's whole
    fixed cost): so the lookup goes to the dict os.environ keeps its (encoded) variables in,
    where CPython has it, and through os.environ otherwise."""
    env = os.environ
    data = getattr(env, "_data", None)
    if type(data) is not dict:
        return env.get(_ENV_NAME, "")
    raw = data.get(_ENV_KEY)
    return "" if raw is None else env.decodevalue(raw)


def requested() -> Optional[str]:
    """The explicitly requested backend (context manager, then PYPAPER_BACKEND), or None."""
    st = getattr(_local, "stack", None)
    if st:
        return st[-1]
    env = _env_value()
    if not env:
        return None
    env = env.strip().lower()
    if env in ("", "auto", "default"):
        return None
    if env not in BACKENDS:
        raise ValueError(f"PYPAPER_BACKEND must be one of {BACKENDS} (or auto), got {env!r}")
    return env


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether pypaper._C registered a kernel for ``op`` ("pypaper::<name>") at ``dispatch_key``
    (False where its schema is not registered: pypaper._C not built). Families ask once, at import
    (kernel_table): torch.compile cannot trace the dispatcher query (a fullgraph compile on a GPU
    failed on it, H200, 2026-12-04), and the answer is fixed once pypaper._C has loaded."""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(op, dispatch_key)
    except RuntimeError:
        return False


def kernel_table(op: str) -> dict:
    """{"CPU": has_kernel(op, "CPU"), "CUDA": has_kernel(op, "CUDA")}."""
    return {key: has_kernel(op, key) for key in ("CPU", "CUDA")}


def native_reason(device: torch.device, name: str) -> Optional[str]:
    """Why the C++/CUDA backend ``name`` cannot serve tensors on ``device`` (None if it can)."""
    if not _ext.LOADED:
        return f"pypaper._C is not loaded ({_ext.LOAD_ERROR})"
    if name == "cpu" and device.type != "cpu":
        return f"the cpu backend needs CPU tensors, got {device.type} tensors"
    if name == "cuda":
        if device.type != "cuda":
            return f"the cuda backend needs CUDA tensors, got {device.type} tensors"
        if not _ext.CUDA_KERNELS:
            return "pypaper._C was built without CUDA kernels (torch without CUDA, or no nvcc)"
    return None


_NO_TRITON_DEVICE = ("triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for the CPU "
                     "interpreter)")


def triton_reason(device: torch.device, load_triton: Callable[[], object]) -> Optional[str]:
    """Why a family's Triton ops cannot run on ``device`` (None if they can).

    ``load_triton()`` imports the family's Triton module (and registers its ops); it is called only
    where the kernels could run, on CUDA or on CPU under TRITON_INTERPRET=1, because importing
    triton takes seconds."""
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return _NO_TRITON_DEVICE
    ok, why = load_triton().triton_available(device)
    return None if ok else why


def standard_reasons(load_triton: Callable[[], object]
                     ) -> dict[str, Callable[[torch.device], Optional[str]]]:
    """The ``reasons`` of :func:`select` for a family with C++, CUDA and Triton kernels."""
    return {
        "cpu": lambda d: native_reason(d, "cpu"),
        "cuda": lambda d: native_reason(d, "cuda"),
        "triton": lambda d: triton_reason(d, load_triton),
    }


def select(device: torch.device, default_order: tuple[str, ...],
           reasons: dict[str, Callable[[torch.device], Optional[str]]]) -> str:
    """Choose a backend for tensors on ``device``.

    ``default_order``: backends to try, best first, when nothing is requested.
    ``reasons[name](device)``: why ``name`` cannot run there, or None.
    """
    want = requested()
    if want is not None:
        if want == "reference":
            return want
        why = reasons[want](device) if want in reasons else f"the op has no {want} backend"
        if why:
            raise BackendUnavailable(f"backend {want!r} was requested but cannot run: {why}")
        return want
    for name in default_order:
        if name == "reference" or not reasons[name](device):
            if name == "reference" and not _ext.LOADED:
                _ext.warn_fallback_once()
            return name
    return "reference"
