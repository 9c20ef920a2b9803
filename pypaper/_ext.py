"""Loads pypaper._C (the compiled kernels). Importing pypaper never fails because of it: without
the extension every op runs its plain-PyTorch reference, with one warning, and
pypaper.build_info() says what is missing."""
from __future__ import annotations

import warnings

try:
    from . import _C  # noqa: F401  (registers torch.ops.pypaper.*)

    LOADED = True
    LOAD_ERROR = ""
    CUDA_KERNELS = bool(_C.build_info()["cuda_kernels"])
except ImportError as exc:  # not built, or built against another torch
    _C = None
    LOADED = False
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"
    CUDA_KERNELS = False

_warned = False


def warn_fallback_once() -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            "pypaper._C could not be loaded; ops fall back to the plain-PyTorch reference "
            f"(slow). Reason: {LOAD_ERROR}. Rebuild with "
            "`pip install --no-build-isolation -e .`",
            RuntimeWarning,
            stacklevel=3,
        )


def build_info() -> dict:
    """How pypaper was built: compiler, OpenMP, SIMD level, CUDA kernels, torch versions."""
    import torch

    if LOADED:
        info = dict(_C.build_info())
        info["extension_loaded"] = True
    else:
        info = {"extension_loaded": False, "error": LOAD_ERROR, "cuda_kernels": False}
    info["torch_runtime_version"] = torch.__version__
    try:
        import triton

        info["triton_version"] = triton.__version__
    except ImportError:
        info["triton_version"] = None
    info["cuda_available"] = torch.cuda.is_available()
    return info
