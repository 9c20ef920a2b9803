"""Local learning across processes: a LocalSequential's blocks split over the ranks of a
torch.distributed group (one block - or a contiguous run of blocks - per rank). Each rank runs its
blocks' gradient-in-forward steps and sends the detached output activation forward to the next
rank; no gradient is ever sent back (there is no global backward to wait for: no update locking).

    dist.init_process_group("gloo", ...)
    net = LocalSequential(...)                  # built identically on every rank (same seed)
    pipe = LocalPipeline(net, rank, world_size)
    opt = torch.optim.SGD(pipe.parameters(), lr=...)
    losses = pipe.train_step(x, y, opt)         # x used on rank 0 only; y on every rank

The labels are needed by every block's local loss: each rank reads them itself (here: passed in;
they could equally be sent along with the activation). MAN heads need the next block's parameters
for their EMA, which live on the next rank: they are not supported across ranks.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from . import ops
from .blocks import LocalSequential, MANHead, _optimizer_key, check_optimizer_covers


# The dtypes an activation may travel in, by their index in the message header.
_WIRE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def partition(num_blocks: int, world_size: int) -> list:
    """Contiguous ranges of blocks per rank, as even as possible: [(start, stop), ...]."""
    if world_size < 1 or world_size > num_blocks:
        raise ValueError(f"world_size must be in [1, num_blocks = {num_blocks}], got {world_size}")
    base, extra = divmod(num_blocks, world_size)
    out, start = [], 0
    for r in range(world_size):
        n = base + (1 if r < extra else 0)
        out.append((start, start + n))
        start += n
    return out


class LocalPipeline:
    """The blocks of ``net`` owned by ``rank`` and the point-to-point sends between ranks."""

    def __init__(self, net: LocalSequential, rank: int, world_size: int, group=None):
        self.net, self.rank, self.world_size, self.group = net, rank, world_size, group
        self.start, self.stop = partition(len(net.blocks), world_size)[rank]
        for i in range(self.start, self.stop):
            if i < len(net.aux) and isinstance(net.aux[i], MANHead) and i + 1 >= self.stop:
                raise NotImplementedError(
                    f"block {i}'s MAN head needs block {i + 1}, which lives on rank {rank + 1}")

    @property
    def is_last(self) -> bool:
        return self.stop == len(self.net.blocks)

    def modules(self):
        mods = [self.net.blocks[i] for i in range(self.start, self.stop)]
        mods += [self.net.aux[i] for i in range(self.start, min(self.stop, len(self.net.aux)))]
        if self.is_last:
            mods.append(self.net.head)
        return mods

    def parameters(self):
        return [p for m in self.modules() for p in m.parameters() if p.requires_grad]

    def _send(self, t: torch.Tensor) -> None:
        # The header carries the dtype with the shape: the receiver allocates exactly what was
        # sent. (A receiver that assumed fp32 read a bf16 activation - the output of a block run
        # under torch.autocast - as garbage, and an fp64 net's activation aborted gloo on a
        # message-size mismatch.)
        if t.dtype not in _WIRE_DTYPES:
            raise TypeError(f"block {self.stop - 1}'s output has dtype {t.dtype}; the pipeline "
                            f"sends floating activations ({', '.join(map(str, _WIRE_DTYPES))})")
        meta = torch.tensor([_WIRE_DTYPES.index(t.dtype), t.dim(), *t.shape], dtype=torch.int64)
        dist.send(torch.tensor([meta.numel()], dtype=torch.int64), self.rank + 1, self.group)
        dist.send(meta, self.rank + 1, self.group)
        dist.send(t.contiguous(), self.rank + 1, self.group)

    def _recv(self) -> torch.Tensor:
        n = torch.empty(1, dtype=torch.int64)
        dist.recv(n, self.rank - 1, self.group)
        meta = torch.empty(int(n), dtype=torch.int64)
        dist.recv(meta, self.rank - 1, self.group)
        dtype = _WIRE_DTYPES[int(meta[0])]
        shape = [int(v) for v in meta[2:2 + int(meta[1])]]
        t = torch.empty(shape, dtype=dtype)
        dist.recv(t, self.rank - 1, self.group)
        return t

    def train_step(self, x: Optional[torch.Tensor], y: torch.Tensor,
                   optimizer: Optional[torch.optim.Optimizer] = None,
                   dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """This rank's part of one step: receive the activation (rank > 0), run the owned blocks'
        local steps, send the output on (unless last), step the optimizer. Returns the owned
        blocks' losses.

        The activation arrives in the dtype the previous rank's block produced (fp64 for an fp64
        net, bf16 under torch.autocast); ``dtype``, if given, casts it on arrival."""
        # The labels, on every rank before any communication (as LocalSequential.train_step checks
        # them before block 0): a bad y then raises the same ValueError on every rank. Checked
        # only where a block's loss reads them, rank 0 raised while the next rank waited in recv,
        # to fail later with gloo's "Connection closed by peer" (or hang until the timeout).
        if isinstance(x, torch.Tensor) and x.dim() >= 1:
            n = x.shape[0]
        else:
            n = y.shape[0] if isinstance(y, torch.Tensor) and y.dim() >= 1 else 1
        ops.check_labels(y, n, self.net.num_classes, getattr(y, "device", "cpu"))
        if optimizer is not None and _optimizer_key(optimizer) != getattr(self, "_opt_key", None):
            # the owned aux nets' / head's parameters must be in it (once per optimizer)
            owned = [(f"aux.{i}.{n}", p)
                     for i in range(self.start, min(self.stop, len(self.net.aux)))
                     for n, p in self.net.aux[i].named_parameters()]
            if self.is_last:
                owned += [("head." + n, p) for n, p in self.net.head.named_parameters()]
            check_optimizer_covers(optimizer, owned)
            self._opt_key = _optimizer_key(optimizer)
        h = x if self.rank == 0 else self._recv()
        if dtype is not None and h is not None:
            h = h.to(dtype)
        losses = []
        for i in range(self.start, self.stop):
            loss, h = self.net.block_step(i, h, y)
            losses.append(loss)
        if not self.is_last:
            self._send(h)
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            for i in range(self.start, min(self.stop, len(self.net.aux))):
                a = self.net.aux[i]
                if isinstance(a, MANHead):
                    a.ema_update(self.net.blocks[i + 1])
        return torch.stack(losses)
