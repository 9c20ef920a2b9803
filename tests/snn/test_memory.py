"""What autograd keeps for the backward, measured with saved_tensors_hooks: the fused op keeps one
fp32 value per neuron-step (H[t]); the online SLTT helper keeps one step's graph whatever T is."""
import weakref

import torch

import pypaper
from pypaper.snn import neuron, sltt


class _Holder:
    __slots__ = ("t", "__weakref__")

    def __init__(self, t):
        self.t = t


class SavedBytes:
    """Bytes of the tensors autograd holds for backward: the total packed, and the peak alive."""

    def __init__(self):
        self.total = self.live = self.peak = 0

    def _pack(self, t):
        n = t.numel() * t.element_size()
        h = _Holder(t)
        self.total += n
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(h, self._release, n)
        return h

    def _release(self, n):
        self.live -= n

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda h: h.t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


def test_bptt_keeps_at_most_four_bytes_per_neuron_step():
    T, N, F = 16, 32, 24
    x = torch.randn(T, N, F, requires_grad=True)
    for node in (neuron.LIFNode(step_mode="m"), neuron.ParametricLIFNode(step_mode="m")):
        with SavedBytes() as kept:
            s = node(x)
        s.sum().backward()
        assert kept.total <= 4 * T * N * F + 64, kept.total  # H, plus the two scalars
        node.reset()
    # per-neuron tau and threshold add one value per feature, not per neuron-step
    node = neuron.ParametricLIFNode(step_mode="m", tau_shape=(F,), learnable_threshold=True,
                                    threshold_shape=(F,))
    with SavedBytes() as kept:
        s = node(x)
    assert kept.total <= 4 * T * N * F + 4 * 4 * F + 64, kept.total
    # the measurement itself: the reference's autograd keeps many values per neuron-step
    with pypaper.use_backend("reference"), SavedBytes() as ref:
        neuron.LIFNode(step_mode="m")(x)
    assert ref.total >= 3 * 4 * T * N * F


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(20, 64), neuron.LIFNode(),
                               torch.nn.Linear(64, 5), neuron.LIFNode(v_reset=None))


def test_online_sltt_memory_does_not_grow_with_time_steps():
    peaks = {}
    for T in (4, 16):
        model = _model()
        x, y = torch.randn(T, 8, 20), torch.randint(0, 5, (8,))
        with SavedBytes() as kept:
            sltt.train_step_online(model, x, y, torch.nn.functional.cross_entropy)
        peaks[T] = kept.peak
        assert kept.live == 0  # everything was released
    assert peaks[4] == peaks[16] > 0
    # while BPTT over the whole sequence grows with T
    bptt = {}
    for T in (4, 16):
        model = _model()
        pypaper.snn.set_step_mode(model, "m")
        with SavedBytes() as kept:
            out = model(torch.randn(T, 8, 20))
        bptt[T] = kept.peak
    assert bptt[16] > 3 * bptt[4]
