"""pypaper.wtacrs: linear layers that keep a sample of their input rows for the backward.

Liu et al., "Winner-Take-All Column Row Sampling for Memory Efficient Adaptation of Language
Model" (NeurIPS 2023). ``WTACRSLinear`` is a drop-in nn.Linear whose grad_W is the unbiased
WTA-CRS estimate from k = keep_ratio * N of its N input rows (forward, grad_input and grad_bias
exact); ``convert(model)`` swaps the linear layers of a built model (HuggingFace included) and
lets sibling Q/K/V layers share one sample; ``sample_ids(ids)`` feeds last step's gradient norms
of the same samples into the sampling probabilities.

Kernels: C++ kernels/cpu/wtacrs_cpu.h (+ csrc/wtacrs/), CUDA kernels/cuda/wtacrs_kernels.cu,
Triton pypaper/wtacrs/triton_kernels.py; the shared math kernels/common/wtacrs_math.h; the
plain-PyTorch reference reference.py.
"""
from .. import _ext
from . import _registration, reference
from .convert import convert, revert
from .grad_norms import GradNormCache, sample_ids
from .modules import SampleGroup, WTACRSLinear
from .ops import (backend_for, gather_scale, linear, row_norms, sample, sampled_grad_weight,
                  select)

if _ext.LOADED:
    _registration.register_native()

__all__ = ["GradNormCache", "SampleGroup", "WTACRSLinear", "backend_for", "convert",
           "gather_scale", "linear", "reference", "revert", "row_norms", "sample",
           "sample_ids", "sampled_grad_weight", "select"]
