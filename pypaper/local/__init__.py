"""pypaper.local: layers and blocks trained by local losses, without a global backward pass.

    from pypaper import local
    ff = local.FFLinear(784, 500, threshold=2.0)
    loss, h_pos, h_neg = ff.local_step(x_pos, x_neg)       # .grad accumulated; h detached
    tp = local.TargetProjectionLinear(784, 500, num_classes=10, activation="sigmoid", seed=0)
    loss, h = tp.local_step(x, y)
    net = local.LocalSequential(blocks, aux="dgl" | "auglocal" | "man" | factory, head=classifier,
                                num_classes=10)
    loss = net.train_step(x, y, optimizer)                  # gradient-in-forward, block by block
    loss = net.train_step(x, y, optimizer, data_parallel=True)  # grads averaged over the ranks
    local.sync_grads(model); local.sync_grads_on_step(optimizer)  # for hand-written / FF loops

Fused ops (pypaper.local.ops / pypaper.ops): ff_linear, ff_sf_linear, tp_linear, local_head.
Kernels: C++ kernels/cpu/local_cpu.h; shared math kernels/common/local_math.h; CUDA
kernels/cuda/local_kernels.cu; Triton pypaper/local/triton_kernels.py; plain-PyTorch reference
pypaper/local/reference.py.
"""
from .. import _ext
from . import _registration, reference
from .ops import backend_for, ff_linear, ff_sf_linear, head_loss, local_head, tp_linear
from .layers import FFClassEmbeddingLinear, FFLinear, TargetProjectionLinear
from .blocks import (AuxHead, ChannelBias, LinearHead, LocalBlock, LocalSequential, MANHead,
                     auglocal_depths, auglocal_head, auglocal_indices, backprop_step, dgl_head,
                     recalibrate_batchnorm)
from .ff import FFNetwork, FFSingleForwardNetwork, overlay_label, wrong_labels
from .tp import TPNetwork
from .data_parallel import broadcast_parameters, sync_grads, sync_grads_on_step
from .memory import SavedTensorMeter, peak_saved_bytes

if _ext.LOADED and hasattr(_ext._C, "build_info"):
    import torch as _torch

    if hasattr(_torch.ops.pypaper, "local_ff_linear"):
        _registration.register_native()

__all__ = ["AuxHead", "ChannelBias", "FFClassEmbeddingLinear", "FFLinear", "FFNetwork", "FFSingleForwardNetwork",
           "LinearHead", "LocalBlock", "LocalSequential", "MANHead", "SavedTensorMeter",
           "TPNetwork", "TargetProjectionLinear", "auglocal_depths", "auglocal_head",
           "auglocal_indices", "backend_for", "backprop_step", "broadcast_parameters",
           "dgl_head", "ff_linear", "ff_sf_linear", "head_loss", "local_head", "overlay_label",
           "peak_saved_bytes", "recalibrate_batchnorm", "reference", "sync_grads",
           "sync_grads_on_step", "tp_linear", "wrong_labels"]
