"""pypaper.snn: spiking neurons with a fused time loop, drop-in for SpikingJelly.

    from pypaper.snn import neuron, layer, surrogate, functional   # SpikingJelly's module names
    lif = neuron.LIFNode(tau=2.0, surrogate_function=surrogate.ATan(), step_mode="m")
    spikes = lif(x_seq)                      # x_seq: [T, N, *]
    functional.reset_net(model)              # between samples

    lif_multi_step(x_seq, v=None, *, tau=2.0 | k=..., v_threshold=1.0, v_reset=0.0, ...)
        -> (spikes, v_last, v_seq)           # the fused op behind the neurons
    sltt.train_step_online(model, x_seq, target, loss_fn, optimizer, k=None)   # online SLTT(-K)
    functional.checkpoint(block, x_seq)      # activation checkpointing that restores neuron state
    model = convert(model)                   # a built SpikingJelly model's IF/LIF/PLIF -> pypaper's
    base.extract_memories(model)             # SpikingJelly's memory functions, pypaper's state too

Kernels: C++ kernels/cpu/snn_cpu.h; the shared per-element math kernels/common/snn_math.h; the
plain-PyTorch reference pypaper/snn/reference.py.
"""
from .. import _ext
from . import (_registration, base, functional, layer, neuron, reference, sltt,
               spikingjelly_fallback, surrogate)
from .functional import detach_net, reset_net, set_step_mode
from .neuron import IFNode, LIFNode, ParametricLIFNode
from .ops import backend_for, lif_multi_step
from .delays import DelayedLinear, sigma_schedule  # learnable delays (pypaper/snn/delays.py)
from .convert import convert, revert  # SpikingJelly's neurons in a built model (snn/convert.py)

if _ext.LOADED:
    _registration.register_native()

# SpikingJelly's modules pypaper has none of (encoding, monitor, learning, rnn, ...) come from
# spikingjelly.activation_based, so that `from pypaper.snn import neuron, encoding, ...` runs
# (pypaper/snn/spikingjelly_fallback.py)
__getattr__ = spikingjelly_fallback.package_forwarder(__name__)

__all__ = ["DelayedLinear", "IFNode", "LIFNode", "ParametricLIFNode", "backend_for", "base",
           "convert", "detach_net", "functional", "layer", "lif_multi_step", "neuron", "reference",
           "reset_net", "revert", "set_step_mode", "sigma_schedule", "sltt", "surrogate"]
