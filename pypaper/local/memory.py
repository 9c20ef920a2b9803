"""Saved-activation accounting: how many bytes autograd holds for backward passes, live, and the
peak over a training step (the memory that local learning exists to save).

    meter = SavedTensorMeter(exclude=model.parameters())
    with meter:
        net.train_step(x, y, opt)
    meter.peak_bytes, meter.live_bytes

Every tensor autograd saves goes through a saved-tensor pack hook; the meter counts each storage
once while any saved reference to it is alive, and subtracts it when the graph holding it is freed
(the packed handle is released). Parameters (``exclude``) live anyway and are not counted.
"""
from __future__ import annotations

import weakref

import torch


class _Handle:
    __slots__ = ("tensor", "meter", "key", "__weakref__")

    def __init__(self, tensor, meter, key):
        self.tensor, self.meter, self.key = tensor, meter, key

    def __del__(self):
        m = self.meter
        if m is not None and self.key is not None:
            m._release(self.key)


class SavedTensorMeter:
    """Counts live saved-for-backward bytes (per storage) and their peak inside ``with``.
    ``handles``: weak references to every packed tensor handle (dead once its graph is freed)."""

    def __init__(self, exclude=()):
        self.skip = {t.untyped_storage().data_ptr() for t in exclude}
        self.refs = {}
        self.sizes = {}
        self.live_bytes = 0
        self.peak_bytes = 0
        self.total_packed = 0
        self.handles = []
        self._hooks = None

    def _pack(self, t):
        st = t.untyped_storage()
        key = st.data_ptr()
        if key in self.skip or st.nbytes() == 0:
            return _Handle(t, None, None)
        if key not in self.refs:
            self.refs[key] = 0
            self.sizes[key] = st.nbytes()
            self.live_bytes += st.nbytes()
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        self.refs[key] += 1
        self.total_packed += 1
        h = _Handle(t, self, key)
        self.handles.append(weakref.ref(h))
        return h

    @staticmethod
    def _unpack(h):
        return h.tensor

    def _release(self, key):
        self.refs[key] -= 1
        if self.refs[key] == 0:
            del self.refs[key]
            self.live_bytes -= self.sizes.pop(key)

    def alive(self) -> int:
        """How many packed handles are still alive."""
        return sum(1 for r in self.handles if r() is not None)

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        return False


def peak_saved_bytes(step, exclude=()) -> int:
    """The peak of live saved-for-backward bytes during one call of ``step()``."""
    meter = SavedTensorMeter(exclude)
    with meter:
        step()
    return meter.peak_bytes
