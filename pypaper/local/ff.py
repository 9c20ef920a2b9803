"""Forward-Forward networks for classification (Hinton 2022): the label is written into the
input (``overlay_label``: the first num_classes features replaced by a one-hot of the label);
positive data carry the true label, negative data a wrong one; a sample is classified by the label
whose overlay gives the largest goodness summed over the layers.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .data_parallel import data_parallel_group, sync_grads
from .layers import FFLinear


def overlay_label(x: torch.Tensor, y: torch.Tensor, num_classes: int,
                  value: float = None) -> torch.Tensor:
    """x [N, D] with its first num_classes features set to value * onehot(y) (value: max of x,
    as in Hinton's MNIST setup)."""
    x = x.clone()
    v = float(x.max()) if value is None else value
    x[:, :num_classes] = 0
    x[torch.arange(x.shape[0], device=x.device), y] = v
    return x


def wrong_labels(y: torch.Tensor, num_classes: int, generator=None) -> torch.Tensor:
    """A uniformly drawn wrong label per row."""
    off = torch.randint(1, num_classes, y.shape, generator=generator, device=y.device)
    return (y + off) % num_classes


class FFNetwork(nn.Module):
    """A stack of FFLinear layers trained together, each by its own local loss."""

    def __init__(self, sizes: Sequence[int], num_classes: int, threshold: float = 2.0):
        super().__init__()
        self.num_classes = num_classes
        self.layers = nn.ModuleList(FFLinear(a, b, threshold=threshold)
                                    for a, b in zip(sizes[:-1], sizes[1:]))

    def train_step(self, x, y, optimizer, generator=None, value=None, *, data_parallel=False):
        """One step on a batch: every layer's local_step on (positive, negative) pairs, then the
        optimizer. Returns the per-layer losses.

        Data parallel (every rank holds the whole net, x / y are this rank's shard):
        ``data_parallel=True`` (the default process group) or a ProcessGroup makes the step that
        of one process on the concatenated batch (equal-sized shards, the ranks' generators -
        or global RNGs - in the same state, as after seeding every rank alike):
          * the wrong labels are drawn for all W * n rows, as the single process draws them, and
            rank r keeps rows r n .. (r + 1) n - 1. Drawing n per rank gave every rank the SAME
            offsets (identical generator states), correlated negatives across the batch;
          * value=None (the overlay value is the batch max) takes the max over all the shards
            (one all_reduce MAX); each shard's own max made the overlays differ from the
            single process's, the loss then coupled to the shard;
          * the gradients are averaged (sync_grads) before optimizer.step().
        sync_grads_on_step(optimizer) alone averages the gradients but keeps per-shard draws
        and overlay values."""
        dp = data_parallel_group(data_parallel, "FFNetwork.train_step")
        group, world = dp if dp is not None else (None, None)
        if world is not None and world > 1:
            import torch.distributed as dist

            n, rank = y.shape[0], dist.get_rank(group)
            # the single process's draw for the whole batch of W * n rows, this rank's rows:
            # y repeated W times has the whole batch's shape, and its rows r n .. (r + 1) n - 1
            # are y (the drawn offsets do not depend on the labels)
            whole = y.repeat(world, *([1] * (y.dim() - 1)))
            wrong = wrong_labels(whole, self.num_classes, generator)[rank * n:(rank + 1) * n]
            if value is None:  # the batch max = the max of the shards' maxima
                m = x.detach().max().reshape(1)
                dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
                value = float(m)
        else:
            wrong = wrong_labels(y, self.num_classes, generator)
        xp = overlay_label(x, y, self.num_classes, value)
        xn = overlay_label(x, wrong, self.num_classes, value)
        losses = []
        for layer in self.layers:
            loss, xp, xn = layer.local_step(xp, xn)
            losses.append(loss)
        if dp is not None:
            sync_grads(self, group)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return torch.stack(losses)

    @torch.no_grad()
    def predict(self, x, value=None, skip_first: bool = None):
        """argmax over labels of the goodness summed over layers (the first layer skipped when
        there are several, as Hinton does)."""
        skip = len(self.layers) > 1 if skip_first is None else skip_first
        scores = []
        for c in range(self.num_classes):
            h = overlay_label(x, torch.full((x.shape[0],), c, dtype=torch.long,
                                            device=x.device), self.num_classes, value)
            g = 0
            for i, layer in enumerate(self.layers):
                h = layer(h)
                if not (skip and i == 0):
                    g = g + h.float().pow(2).sum(1)
            scores.append(g)
        return torch.stack(scores, 1).argmax(1)


class FFSingleForwardNetwork(nn.Module):
    """A stack of FFClassEmbeddingLinear layers (ForwardGNN's single forward, Park et al., ICLR
    2024): each layer gets the data rows and the class rows (fixed random inputs for the first
    layer, the previous layer's class embeddings after it), is trained by the cross-entropy of
    the rows' similarities to the class embeddings, and nothing else; no negative data. A sample
    is classified by the sum over layers of the softmax of its similarities."""

    def __init__(self, sizes: Sequence[int], num_classes: int, temperature: float = 0.1,
                 seed: int = 0):
        super().__init__()
        from .layers import FFClassEmbeddingLinear

        self.num_classes = num_classes
        self.layers = nn.ModuleList(
            FFClassEmbeddingLinear(a, b, num_classes, temperature=temperature, seed=seed + i)
            for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])))

    def train_step(self, x, y, optimizer, generator=None):
        """Every layer's local step (data and class rows forward together), then the optimizer.
        Returns the per-layer losses."""
        h, cx, losses = x, None, []
        for layer in self.layers:
            loss, h, cx = layer.local_step(h, y, cx)
            losses.append(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return torch.stack(losses)

    @torch.no_grad()
    def predict(self, x):
        h, cx, p = x, None, 0
        for layer in self.layers:
            logits, h, cx = layer.scores(h, cx)
            p = p + logits.softmax(1)
        return p.argmax(1)
