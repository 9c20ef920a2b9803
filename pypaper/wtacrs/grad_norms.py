"""Last step's output-gradient norms, keyed by sample id: the ||dy_t|| half of WTA-CRS's
sampling probabilities p_t ~ ||x_t|| ||dy_t||.

dY is unknown in the forward pass, when the rows to keep must be chosen. Liu et al. (NeurIPS
2023) reuse the gradient norms that the same training samples produced the previous time they
were seen; the caller names the samples of a batch by id (``with sample_ids(ids): ...`` or
``layer(x, sample_ids=ids)``), one id per entry of the input's first dim, and every position
inside a sample (a token) has its own entry. Unknown entries (a sample not seen yet, a longer
sequence) take the mean of the known ones; with nothing known the layer samples by ||x_t|| alone.

Layers that share one sample (Q, K, V reading the same tensor) share one cache: it holds the sum
of their ||dy_t||^2, so the shared probabilities are ||x_t|| sqrt(sum_l ||dy^l_t||^2), the
minimiser of the summed variance of their estimates.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Optional

import torch

_local = threading.local()


def _stack() -> list:
    if not hasattr(_local, "ids"):
        _local.ids = []
    return _local.ids


@contextlib.contextmanager
def sample_ids(ids: Optional[torch.Tensor]) -> Iterator[None]:
    """Name the samples of the batch run in this block (one id >= 0 per entry of the inputs'
    first dim) so that WTA-CRS layers sample with last step's gradient norms of those samples."""
    if ids is not None:
        check_ids(ids)
    _stack().append(ids)
    try:
        yield
    finally:
        _stack().pop()


def current_sample_ids() -> Optional[torch.Tensor]:
    st = _stack()
    return st[-1] if st else None


def check_ids(ids, batch: Optional[int] = None) -> None:
    if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.is_complex() \
            or ids.dtype == torch.bool:
        raise TypeError(f"sample_ids must be an integer tensor, got "
                        f"{ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__}")
    if ids.dim() != 1 or (batch is not None and ids.numel() != batch):
        want = f"({batch},)" if batch is not None else "(B,)"
        raise ValueError(f"sample_ids must be 1-D with one id per entry of the input's first dim, "
                         f"expected shape {want}, got {tuple(ids.shape)}")


class GradNormCache:
    """sum over the layers sharing it of ||dy_t||^2 of the last step, per (sample id, position).

    ``device``: where the table lives (None: the device of the first gradients stored), e.g.
    "cpu" to keep it off the GPU for a large dataset. Grows to the largest id and sequence seen.
    """

    def __init__(self, device=None):
        self.device = torch.device(device) if device is not None else None
        self.table: Optional[torch.Tensor] = None  # [ids, positions] float32, NaN: unknown
        self.stamp: Optional[torch.Tensor] = None  # [ids] int64: the step that wrote the row
        self.step = 0

    def begin_step(self) -> int:
        """A new sample is drawn: stores under this step replace older values."""
        self.step += 1
        return self.step

    def lookup(self, ids: torch.Tensor, rows: int, device) -> Optional[torch.Tensor]:
        """||dy|| estimates of the ``rows`` = len(ids) * positions rows, on ``device``; None when
        nothing about these samples is known."""
        if self.table is None or ids.numel() == 0:
            return None
        b = ids.numel()
        t = rows // b
        idx = ids.to(self.table.device, torch.int64)
        known_id = idx < self.table.shape[0]
        vals = torch.full((b, t), float("nan"), device=self.table.device)
        w = min(t, self.table.shape[1])
        vals[known_id, :w] = self.table[idx[known_id], :w]
        g = vals.sqrt().reshape(-1)
        unknown = torch.isnan(g)
        if bool(unknown.all()):
            return None
        if bool(unknown.any()):
            g = torch.where(unknown, g[~unknown].mean(), g)
        return g.to(device)

    def store(self, ids: torch.Tensor, sq_norms: torch.Tensor, step: int) -> None:
        """Add ||dy_t||^2 (``sq_norms``: [len(ids) * positions]) of a backward of ``step``."""
        b = ids.numel()
        t = sq_norms.numel() // b
        # Write where the table lives: it stays where it was first filled (or ``device``), while
        # the layers may move after (``model.cuda()`` after training or after loading a pickled
        # model with map_location="cpu"; .to() moves only registered tensors). Indexing the table
        # with ids on the gradients' device then failed (a CPU table, CUDA indices); lookup
        # already reads across devices.
        dev = self.table.device if self.table is not None else (self.device or sq_norms.device)
        idx = ids.to(dev, torch.int64)
        need_rows = int(idx.max()) + 1
        self._grow(need_rows, t, dev)
        fresh = self.stamp[idx] != step
        if bool(fresh.any()):
            rows = idx[fresh]
            self.table[rows] = float("nan")
            self.table[rows, :t] = 0.0
        view = self.table[:, :t]
        view.index_put_((idx,), sq_norms.reshape(b, t).to(dev, torch.float32), accumulate=True)
        self.stamp[idx] = step

    def _grow(self, rows: int, width: int, device) -> None:
        if self.table is None:
            self.table = torch.full((rows, width), float("nan"), device=device)
            self.stamp = torch.zeros(rows, dtype=torch.int64, device=device)
            return
        r, w = self.table.shape
        if rows <= r and width <= w:
            return
        new = torch.full((max(rows, r), max(width, w)), float("nan"), device=self.table.device)
        new[:r, :w] = self.table
        stamp = torch.zeros(max(rows, r), dtype=torch.int64, device=self.table.device)
        stamp[:r] = self.stamp
        self.table, self.stamp = new, stamp
