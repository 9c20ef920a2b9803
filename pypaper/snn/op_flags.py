"""The ``flags`` argument of pypaper::lif_forward and pypaper::lif_backward: the ops' bools as bits.

The native LIF ops take their bools as one int (bit set = true) rather than as six or seven schema
arguments: torch.library's Python autograd path costs time per schema argument, and a training
step pays it with the caches full of another layer's data (do-nothing ops right after a snntorch
fwd + bwd: 0.58 ms with 13 arguments, 0.54 ms with 8; hot, ~54 us for 13 against 7). The bits
are csrc/snn/snn_args.h's ``LifFlag``; the C++ ops reject a bit their op does not take.

The Triton twins (pypaper/snn/triton_kernels.py) take the same flags.
"""
from __future__ import annotations

DECAY_INPUT = 1 << 0  # charge H = V + (X - (V - Vr)) / tau, else V - (V - Vr) / tau + X
DECAY_IS_TAU = 1 << 1  # decay holds tau ("/ tau"), else k = 1 / tau ("* k")
DETACH_RESET = 1 << 2  # S is detached in the reset term (backward)
SLTT = 1 << 3  # SLTT (Meng et al., ICCV 2023): no temporal gradient path (backward)
STORE_V_SEQ = 1 << 4  # forward: also return V[t] for every t
KEEP_H = 1 << 5  # forward: return H[t] for a backward that reads it
NEED_DECAY_GRAD = 1 << 6  # backward: the decay's gradient is wanted
NEED_THRESHOLD_GRAD = 1 << 7  # backward: the threshold's gradient is wanted
RECOMPUTE = 1 << 8  # backward: h_seq holds x; rerun the forward chunk by chunk (CPU)

# The bits the forward and the backward share (the neuron's dynamics), and each op's bits.
DYNAMICS = DECAY_INPUT | DECAY_IS_TAU | DETACH_RESET | SLTT
FORWARD = DYNAMICS | STORE_V_SEQ | KEEP_H
BACKWARD = DYNAMICS | NEED_DECAY_GRAD | NEED_THRESHOLD_GRAD | RECOMPUTE


def check(flags: int, allowed: int, op: str) -> None:
    """Raises if flags has a bit op does not take (the C++ ops' TORCH_CHECK, in Python)."""
    if flags < 0 or flags & ~allowed:
        raise ValueError(f"{op}: flags {flags} has bits this op does not take (allowed: "
                         f"{allowed}; pypaper/snn/op_flags.py builds them)")


def forward_flags(decay_input: bool, decay_is_tau: bool, detach_reset: bool, sltt: bool,
                  store_v_seq: bool, keep_h: bool = True) -> int:
    """lif_forward's flags."""
    return ((DECAY_INPUT if decay_input else 0) | (DECAY_IS_TAU if decay_is_tau else 0)
            | (DETACH_RESET if detach_reset else 0) | (SLTT if sltt else 0)
            | (STORE_V_SEQ if store_v_seq else 0) | (KEEP_H if keep_h else 0))


def backward_flags(decay_input: bool, decay_is_tau: bool, detach_reset: bool, sltt: bool,
                   need_decay_grad: bool, need_threshold_grad: bool,
                   recompute: bool = False) -> int:
    """lif_backward's flags."""
    return (forward_flags(decay_input, decay_is_tau, detach_reset, sltt, False, False)
            | (NEED_DECAY_GRAD if need_decay_grad else 0)
            | (NEED_THRESHOLD_GRAD if need_threshold_grad else 0)
            | (RECOMPUTE if recompute else 0))
