"""Triton launches run on their tensors' CUDA device (pypaper._triton.wrap_triton).

Triton launches on the current CUDA device and its current stream, whatever device the pointers
belong to; a Python op registered with torch.library gets no device guard from the dispatcher.
Every family's launches therefore go through pypaper._triton.wrap_triton (tests/test_backend.py
checks that), which makes the tensors' device current for a compiled kernel. No GPU here:
torch.cuda and torch.library.wrap_triton are stubbed; tests/snn/test_triton_review_s34.py runs
the real thing on two GPUs where there are two."""
import contextlib
import types

import pytest
import torch

pytest.importorskip("triton")

from pypaper import _triton  # noqa: E402


class _DeviceStub:
    """torch.cuda.current_device / torch.cuda.device stand-ins: the current index, and which
    device each context entered."""

    def __init__(self, current=0):
        self.current = current
        self.entered = []

    def current_device(self):
        return self.current

    @contextlib.contextmanager
    def device(self, dev):
        prev, self.current = self.current, torch.device(dev).index
        self.entered.append(self.current)
        try:
            yield
        finally:
            self.current = prev


def test_compiled_launches_run_with_their_tensors_device_current(monkeypatch):
    """pypaper._triton.wrap_triton, as it wraps a compiled kernel: a launch over tensors on
    cuda:1 while cuda:0 is current runs with cuda:1 current (cuda:0 restored after); over
    tensors of the current device or the CPU it changes nothing. torch.cuda and
    torch.library.wrap_triton are stubbed (no GPU here)."""
    stub = _DeviceStub(current=0)
    monkeypatch.setattr(torch.cuda, "current_device", stub.current_device)
    monkeypatch.setattr(torch.cuda, "device", stub.device)
    ran = []

    class Launcher:  # torch.library.wrap_triton(kernel): kernel[grid](*args) launches
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kw: ran.append((self.kernel, grid, stub.current, args, kw))

    monkeypatch.setattr(_triton, "_INTERPRETED", False)
    monkeypatch.setattr(torch.library, "wrap_triton", Launcher)
    on = lambda dev: types.SimpleNamespace(device=torch.device(dev))  # noqa: E731
    k = object()
    _triton.wrap_triton(k)[(3,)](7, on("cuda:1"), on("cuda:0"), BLOCK=4)
    assert ran[-1][:3] == (k, (3,), 1) and ran[-1][4] == {"BLOCK": 4}
    assert stub.current == 0 and stub.entered == [1]
    for dev in ("cuda:0", "cpu"):
        _triton.wrap_triton(k)[(1,)](on(dev), 2.0)
        assert ran[-1][2] == 0
    assert stub.entered == [1]
