"""pypaper's CPU block cache: counters and controls.

Large CPU outputs of pypaper's kernels (today the LIF op's spikes, its saved H and its grad_x, when
at least 1 MiB) come from a caching allocator (csrc/block_cache.h): a training step
asks for the same sizes every step, and glibc returns every allocation above 32 MiB to the system
on free, so each step would pay page faults and the zeroing of every page again (1.3-3 ms per
32 MiB on the 2-core Xeon, more than the LIF kernel's own pass over the bytes). Freed blocks wait
in a free list for the next request of their size, like PyTorch's CUDA caching allocator.

The free list holds at most ``limit_bytes`` (the least recently freed blocks go first):
PYPAPER_CPU_CACHE_MB at import (0 turns the cache off: plain torch.empty), else an eighth of
physical memory, at most 4 GiB. Blocks are rounded up to 64 KiB, from 16 MiB on to 2 MiB huge
pages. Tensors keep working as any tensor (``resize_``, pickling, sharing: their storage carries
the cache as its allocator).
"""
from __future__ import annotations

from . import _ext

__all__ = ["cache_info", "empty_cache", "set_cache_limit"]

_EMPTY_INFO = {"limit_bytes": 0, "cached_bytes": 0, "cached_blocks": 0, "live_bytes": 0,
               "hits": 0, "misses": 0}


def _read_environment() -> None:
    """Reads PYPAPER_CPU_CACHE_MB now, so a bad value fails the import instead of every later op."""
    if _ext.LOADED:
        try:
            _ext._C.block_cache_info()
        except RuntimeError as e:
            raise ValueError(str(e).splitlines()[0]) from None


_read_environment()


def cache_info() -> dict:
    """Counters: ``limit_bytes``, ``cached_bytes`` / ``cached_blocks`` (free, kept for reuse),
    ``live_bytes`` (held by tensors now), ``hits`` / ``misses`` (requests served from the free
    list / by a new block). All zero without the compiled extension."""
    return dict(_ext._C.block_cache_info()) if _ext.LOADED else dict(_EMPTY_INFO)


def empty_cache() -> None:
    """Returns every cached (free) block to the system; live tensors are not touched."""
    if _ext.LOADED:
        _ext._C.block_cache_empty()


def set_cache_limit(limit_bytes: int) -> None:
    """Sets the most bytes the free list may hold (0: cache nothing from now on, and free what is
    cached). Blocks above the new limit are freed at once."""
    if isinstance(limit_bytes, bool) or not isinstance(limit_bytes, int):
        raise TypeError(f"limit_bytes must be an int, got {type(limit_bytes).__name__}")
    if limit_bytes < 0:
        raise ValueError(f"limit_bytes must be >= 0, got {limit_bytes}")
    if _ext.LOADED:
        _ext._C.block_cache_set_limit(limit_bytes)
