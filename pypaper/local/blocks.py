"""Supervised local learning with auxiliary heads: a network cut into blocks, each trained by the
loss of its own small auxiliary network (gradient-isolated: no gradient crosses a block boundary).

Heads (each ends in the fused pool -> linear -> cross-entropy of ops.local_head):
  DGL / InfoPro style (Belilovsky et al., ICML 2020; Wang et al., ICLR 2021): a few 1x1 convs,
      spatial averaging to a quarter of the side and a small MLP (or linear layers on vectors),
      then the fused head - ``dgl_head``;
  AugLocal (Ma et al., ICLR 2024): copies (freshly initialised) of a uniformly spaced subset of
      the *later* blocks, its depth decreasing linearly with the block index - ``auglocal_head``
      (selection: ``auglocal_indices``, depths: ``auglocal_depths``);
  MAN (Su et al., ECCV 2024): a learnable per-channel bias, then an EMA copy of the *next* block
      (theta_ema <- m theta_ema + (1 - m) theta_next, m = 0.995, after every optimizer step), then
      a DGL head (one 1x1 conv layer on feature maps) - ``MANHead``.

Training (gradient-in-forward): ``LocalSequential.train_step(x, y, optimizer)`` runs, block by
block, the block's forward, its local loss, and its backward right away, so the block's graph is
freed before the next block runs; only the detached output travels on. Activation memory is that
of one block plus its head, whatever the depth.

Evaluation: ``recalibrate_batchnorm`` (or ``LocalSequential.recalibrate_batchnorm``) re-estimates
the BatchNorm running statistics with the final weights; at a constant lr they lag the weights
(see its docstring for the MNIST numbers).
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .._module_swap import run_reparam_hooks
from . import ops
from .data_parallel import check_not_ddp_wrapped, data_parallel_group, sync_grads


def _channels(shape) -> int:
    if len(shape) < 2:
        raise ValueError(f"a block output must have shape [N, C, *], got {tuple(shape)}")
    return int(shape[1])


def _device_of(module: nn.Module):
    p = next(module.parameters(), None)
    return None if p is None else p.device


class LinearHead(nn.Module):
    """Global average pool -> linear -> cross-entropy, fused (ops.local_head). ``forward(feat)``
    gives logits; ``loss(feat, y)`` -> (loss, logits detached), differentiable w.r.t. feat and
    the head's parameters while keeping only [N, C] for the backward."""

    def __init__(self, in_channels: int, num_classes: int, bias: bool = True):
        super().__init__()
        self.in_channels, self.num_classes = in_channels, num_classes
        self.linear = nn.Linear(in_channels, num_classes, bias=bias)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        pooled = feat.flatten(2).mean(2) if feat.dim() > 2 else feat
        return self.linear(pooled)

    def loss(self, feat: torch.Tensor, y: torch.Tensor):
        # the linear is read, not called: a prune / hook weight_norm pre-hook on it runs here,
        # as a call would (the weight was stale, and the second local_step raised "backward
        # through the graph a second time")
        run_reparam_hooks(self.linear)
        return ops.head_loss(feat, self.linear.weight, self.linear.bias, y)


class AuxHead(nn.Module):
    """An auxiliary network: ``body`` (any module, Identity for none) then a LinearHead."""

    def __init__(self, body: nn.Module, in_channels: int, num_classes: int):
        super().__init__()
        self.body = body
        self.head = LinearHead(in_channels, num_classes)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(h))

    def loss(self, h: torch.Tensor, y: torch.Tensor):
        feat = self.body(h)
        if feat.dim() < 2 or feat.shape[1] != self.head.in_channels:
            raise ValueError(f"the auxiliary body's output has shape {tuple(feat.shape)} but the "
                             f"head expects {self.head.in_channels} channels in dim 1")
        return self.head.loss(feat, y)


def dgl_head(out_shape, num_classes: int, depth: int = 2, pool: Optional[int] = None,
             kernel_size: int = 1) -> AuxHead:
    """DGL-style auxiliary net (Belilovsky et al., "Decoupled Greedy Learning of CNNs", ICML 2020:
    a few conv layers, spatial averaging, then a small MLP classifier) for a block output of
    shape ``out_shape``. On feature maps [N, C, H, W]: ``depth`` x (``kernel_size`` conv, 1 x 1
    as in DGL's code, same padding, BatchNorm, ReLU), average pooling to ``pool`` x ``pool``
    (default ceil(H / 4): DGL's code averages to a quarter of the side, so the classifier still
    sees where things are), flatten, one hidden (Linear, ReLU), then the fused linear -> CE
    (pool=0: no hidden layer, the fused global pool -> linear -> CE straight on the map).
    The pooled size matters on a first block with a 3 x 3 receptive field: a fixed 2 x 2 pool
    left its head a weak signal (MNIST CNN, examples/local_mnist.py: 90.4% with a 2 x 2 pool,
    96.9% with ceil(H / 4) = 4 x 4; backprop 94.5%).
    On vectors [N, C]: ``depth`` x (Linear, ReLU), then the fused linear -> CE."""
    c = _channels(out_shape)
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
    layers = []
    for _ in range(depth):
        if len(out_shape) > 2:
            if len(out_shape) == 4:
                layers += [nn.Conv2d(c, c, kernel_size, padding=kernel_size // 2, bias=False),
                           nn.BatchNorm2d(c), nn.ReLU()]
            else:
                layers += [nn.Conv1d(c, c, 1, bias=False), nn.BatchNorm1d(c), nn.ReLU()]
        else:
            layers += [nn.Linear(c, c), nn.ReLU()]
    width = c
    if pool is None:
        pool = -(-int(out_shape[2]) // 4) if len(out_shape) == 4 else 0
    if len(out_shape) == 4 and pool:
        width = c * pool * pool
        layers += [nn.AdaptiveAvgPool2d(pool), nn.Flatten(), nn.Linear(width, width), nn.ReLU()]
    return AuxHead(nn.Sequential(*layers) if layers else nn.Identity(), width, num_classes)


def auglocal_depths(num_blocks: int, depth: int, coeff: float = 0.5) -> list:
    """AugLocal's pyramidal depths of the auxiliary nets of blocks 0 .. num_blocks - 2 (the last
    block has the network's own head): d_i = max(1, round(depth (1 - i c / (K - 2)) +
    i c / (K - 2))) with K = num_blocks - linearly from ``depth`` down to depth (1 - c) + c."""
    k = num_blocks
    if k < 2:
        return []
    if k == 2:
        return [max(1, depth)]
    return [max(1, round(depth * (1 - i * coeff / (k - 2)) + i * coeff / (k - 2)))
            for i in range(k - 1)]


def auglocal_indices(block_index: int, num_blocks: int, depth: int) -> list:
    """The later blocks AugLocal copies into block ``block_index``'s auxiliary net: uniformly
    spaced over (block_index, num_blocks - 1], round(i + (L - i - 1) / d * j) for j = 1..d, or
    every later block when d >= L - 1 - i. The last block is always included."""
    i, n = block_index, num_blocks
    if depth >= n - 1 - i:
        return list(range(i + 1, n))
    return [round(i + (n - i - 1) / depth * j) for j in range(1, depth + 1)]


def _reinit(module: nn.Module) -> nn.Module:
    """Fresh parameters for a copied block (AugLocal builds its aux nets from the later blocks'
    architecture, not their weights)."""
    for m in module.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return module


def _pool(size) -> nn.Module:
    return nn.AdaptiveAvgPool2d(size) if len(size) == 2 else (
        nn.AdaptiveAvgPool1d(size) if len(size) == 1 else nn.AdaptiveAvgPool3d(size))


def _map_to_vector(cur, width: int) -> list:
    """Layers that turn a feature map [N, C, *S] into the [N, width] vector a copied block expects
    (the blocks the selection skipped end in a Flatten or a pooling): average pooling to
    ceil(S / k) for the smallest integer k with C * prod(ceil(S / k)) <= width (no pooling when
    k = 1), Flatten, then a linear map to ``width`` unless the flattened size is already it (as
    when the skipped block is a bare Flatten: C * prod(S) == width)."""
    c, spatial = int(cur[1]), [int(v) for v in cur[2:]]
    k = 1
    while True:
        size = tuple(-(-v // k) for v in spatial)
        flat = c * math.prod(size)
        if flat <= width or all(v == 1 for v in size):
            break
        k += 1
    layers = [] if list(size) == spatial else [_pool(size)]
    layers.append(nn.Flatten())
    if flat != width:
        layers.append(nn.Linear(flat, width))
    return layers


def _adapter(cur, need) -> list:
    """Layers that turn a [N, C, *S] output into the input [N, C', *S'] a copied block expects:
    adaptive average pooling to S', then a 1x1 conv (or a linear map on vectors) to C'; a feature
    map going into a block that takes vectors is pooled and flattened to the vector's width
    (_map_to_vector). Empty when the shapes already agree (consecutive blocks, or equal-width
    ResNet layers)."""
    cur, need = tuple(cur), tuple(need)
    if len(need) == 2 and len(cur) > 2:
        return _map_to_vector(cur, int(need[1]))
    if len(need) != len(cur):
        raise ValueError(f"cannot adapt an output of shape {cur} to the input shape {need} of a "
                         f"copied block (only maps to maps, vectors to vectors and maps to "
                         f"vectors); pass a custom aux factory")
    layers = []
    if len(need) > 2 and tuple(cur[2:]) != tuple(need[2:]):
        layers.append(_pool(tuple(need[2:])))
    if cur[1] != need[1]:
        if len(need) == 4:
            layers.append(nn.Conv2d(cur[1], need[1], 1, bias=False))
        elif len(need) == 2:
            layers.append(nn.Linear(cur[1], need[1]))
        else:
            layers.append(nn.Conv1d(cur[1], need[1], 1, bias=False))
    return layers


def auglocal_head(block_index: int, blocks: Sequence[nn.Module], out_shapes, num_classes: int,
                  depth: int) -> AuxHead:
    """AugLocal auxiliary net of block ``block_index``: fresh copies of the selected later blocks
    (auglocal_indices; AugLocal rebuilds them with the same widths and strides, here they are
    deep copies re-initialised), then the fused pool -> linear -> CE on the last one's channels.
    Where a copied block expects another input shape than the previous output has (the selection
    skips blocks), a pool / 1x1 adapter is put in front of it (AugLocal's first conv of a copied
    layer likewise takes the current width); where it takes vectors and the previous output is a
    feature map (a skipped Flatten), pooling + Flatten (+ a linear map if the widths still
    differ) to the width it expects."""
    idx = auglocal_indices(block_index, len(blocks), depth)
    layers, cur = [], tuple(out_shapes[block_index])
    for j in idx:
        try:
            layers += _adapter(cur, tuple(out_shapes[j - 1]))
        except ValueError as e:
            raise ValueError(f"AugLocal aux net of block {block_index}, copy of block {j}: "
                             f"{e}") from e
        layers.append(_reinit(copy.deepcopy(blocks[j])))
        cur = tuple(out_shapes[j])
    head = AuxHead(nn.Sequential(*layers), _channels(out_shapes[idx[-1]]), num_classes)
    head.indices = idx
    return head


class ChannelBias(nn.Module):
    """x + b, one learnable value per channel (dim 1), initialised to 0."""

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bias.view((1, -1) + (1,) * (x.dim() - 2))


class MANHead(nn.Module):
    """MAN auxiliary net of a block (Su et al., "Momentum Auxiliary Network for Supervised Local
    Learning", ECCV 2024): learnable per-channel bias, then an EMA copy of the next block (its
    parameters follow theta_ema <- m theta_ema + (1 - m) theta_next through ``ema_update``; they
    get no gradient), then a DGL-style head ending in the fused linear -> CE (``aux_depth`` conv
    layers: default 1 on feature maps, 0 on vectors)."""

    def __init__(self, next_block: nn.Module, in_channels: int, out_shape,
                 num_classes: int, momentum: float = 0.995, aux_depth: Optional[int] = None):
        super().__init__()
        self.momentum = ops.check_finite(momentum, "momentum")
        if not 0.0 <= self.momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        self.bias = ChannelBias(in_channels)
        self.ema = copy.deepcopy(next_block)
        for p in self.ema.parameters():
            p.requires_grad_(False)
        # MAN puts the original (DGL-style) auxiliary net after the EMA block: on feature maps
        # one 1 x 1 conv layer, spatial averaging and the MLP classifier (``aux_depth``); on
        # vectors the classifier alone.
        shape = tuple(out_shape)
        self.head = dgl_head(shape, num_classes,
                             depth=(1 if aux_depth is None else aux_depth) if len(shape) == 4
                             else (0 if aux_depth is None else aux_depth))

    def forward(self, h):
        return self.head(self.ema(self.bias(h)))

    def loss(self, h: torch.Tensor, y: torch.Tensor):
        return self.head.loss(self.ema(self.bias(h)), y)

    @torch.no_grad()
    def ema_update(self, next_block: nn.Module) -> None:
        """theta_ema <- m theta_ema + (1 - m) theta_next; buffers (BatchNorm statistics) copied."""
        m = self.momentum
        for pe, p in zip(self.ema.parameters(), next_block.parameters()):
            pe.mul_(m).add_(p.detach(), alpha=1 - m)
        for be, b in zip(self.ema.buffers(), next_block.buffers()):
            be.copy_(b)


class LocalBlock(nn.Module):
    """A block and its auxiliary net. ``local_step(x, y)`` runs block(x.detach()), the aux loss
    and its backward at once (accumulating .grad of the block and the head), and returns
    (loss detached, output detached): the block's graph is gone when it returns."""

    def __init__(self, block: nn.Module, aux: nn.Module):
        super().__init__()
        if not hasattr(aux, "loss"):
            raise TypeError("aux must have a loss(h, y) -> (loss, logits) method (an AuxHead, "
                            "MANHead or LinearHead)")
        self.block, self.aux = block, aux

    def forward(self, x):
        return self.block(x)

    def local_step(self, x: torch.Tensor, y: torch.Tensor):
        check_not_ddp_wrapped(self, "LocalBlock.local_step")
        with torch.enable_grad():
            out = self.block(x.detach())
            loss, _ = self.aux.loss(out, y)
            loss.backward()
        return loss.detach(), out.detach()


AuxSpec = Union[str, Callable[[int, Sequence[nn.Module], list, int], nn.Module]]


class LocalSequential(nn.Module):
    """An existing network (nn.Sequential, or a list of ResNet stages) trained block by block.

    Args:
        blocks: the network's blocks, in order (an nn.Sequential or a list of modules). Each
            gets its own aux net and loss: pass stages (slices such as model[0:3], conv-BN-ReLU
            (-pool), or a ResNet's layers), not list(model), which would cut every conv from
            its BatchNorm and give every ReLU / pool / Flatten an aux net of its own.
        aux: "dgl", "auglocal", "man", or a factory ``aux(i, blocks, out_shapes, num_classes)``
            returning block i's auxiliary net (with a ``loss(h, y)`` method).
        head: the network's own output head on the last block (any module giving logits, or
            a LinearHead); default LinearHead(C_last, num_classes), or nn.Identity() when the
            last block already outputs [N, num_classes] (it ends in the model's classifier:
            its output is trained as the logits, and net(x) == model(x)). Pass
            head=LinearHead(num_classes, num_classes) to put a head on such a block anyway.
        num_classes: classes of the labels.
        example_input: one input batch (a few rows suffice) to learn each block's output shape.
        aux_depth / auglocal_coeff: DGL depth, or AugLocal's maximum depth and pyramid coefficient
            (None: 2), or MAN's head depth (None: MANHead's own default, 1 after a conv block).
        man_momentum: MAN's EMA momentum (0.995).

    Blocks may sit on different devices (move each block and its aux net there): block_step
    moves the activation and the labels to the block's device. Across processes: one block
    per rank, pypaper.local.distributed.LocalPipeline (model parallel); the whole net on every
    rank, ``train_step(..., data_parallel=True)`` (data parallel).
    """

    def __init__(self, blocks, aux: AuxSpec = "dgl", head: Optional[nn.Module] = None, *,
                 num_classes: int, example_input: torch.Tensor,
                 aux_depth: Optional[int] = None, auglocal_coeff: float = 0.5,
                 man_momentum: float = 0.995):
        super().__init__()
        blocks = list(blocks)
        if len(blocks) < 1:
            raise ValueError("blocks must hold at least one block")
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if not isinstance(example_input, torch.Tensor):
            raise TypeError(f"example_input must be a torch.Tensor (one input batch), got "
                            f"{type(example_input).__name__}")
        self.blocks = nn.ModuleList(blocks)
        self.num_classes = num_classes
        with torch.no_grad():
            was = [b.training for b in blocks]
            shapes, h = [], example_input
            try:
                for i, b in enumerate(blocks):
                    b.eval()
                    try:
                        h = b(h)
                    except (RuntimeError, ValueError, TypeError, IndexError) as e:
                        what = ("example_input" if i == 0 else
                                f"block {i - 1}'s output (from example_input)")
                        raise ValueError(
                            f"example_input of shape {tuple(example_input.shape)} does not fit the "
                            f"blocks: block {i} ({type(b).__name__}) failed on {what} of shape "
                            f"{tuple(h.shape)}: {e}") from e
                    if not isinstance(h, torch.Tensor):
                        raise TypeError(f"block {i} must return a tensor, got "
                                        f"{type(h).__name__}")
                    shapes.append(tuple(h.shape))
            finally:
                for b, t in zip(blocks, was):
                    b.train(t)
        self.out_shapes = shapes
        self.kind = aux if isinstance(aux, str) else "custom"
        n = len(blocks)
        heads = []
        # MAN's heads have a default depth of their own; aux_depth was ignored for them (a
        # silently unused argument): passed through now, None keeping each kind's default
        depth = 2 if aux_depth is None else aux_depth
        if isinstance(aux, str):
            if aux == "dgl":
                heads = [dgl_head(shapes[i], num_classes, depth) for i in range(n - 1)]
            elif aux == "auglocal":
                depths = auglocal_depths(n, depth, auglocal_coeff)
                self.aux_depths = depths
                heads = [auglocal_head(i, blocks, shapes, num_classes, depths[i])
                         for i in range(n - 1)]
            elif aux == "man":
                heads = [MANHead(blocks[i + 1], _channels(shapes[i]), shapes[i + 1],
                                 num_classes, man_momentum, aux_depth) for i in range(n - 1)]
            else:
                raise ValueError(f"aux must be 'dgl', 'auglocal', 'man' or a callable, got {aux!r}")
        else:
            heads = [aux(i, blocks, shapes, num_classes) for i in range(n - 1)]
        self.aux = nn.ModuleList(heads)
        if head is None:
            # A model that already ends in its classifier (list(model) of a network whose last
            # layer gives [N, num_classes]): its output is the logits, trained by the real loss;
            # a LinearHead after it would turn them into features of an extra layer.
            head = (nn.Identity() if len(shapes[-1]) == 2 and shapes[-1][1] == num_classes
                    else LinearHead(_channels(shapes[-1]), num_classes))
        self.head = head
        self._check_heads(example_input)

    def _check_heads(self, example_input) -> None:
        """Every head must accept its block's output: a mismatch is reported here, naming it."""
        with torch.no_grad():
            h = example_input
            for i, b in enumerate(self.blocks):
                was = b.training
                b.eval()
                h = b(h)
                b.train(was)
                head = self.aux[i] if i < len(self.aux) else self.head
                name = f"aux[{i}]" if i < len(self.aux) else "head"
                hw = head.training
                head.eval()
                try:
                    logits = head(h)
                except RuntimeError as e:
                    raise ValueError(f"block {i}'s output of shape {tuple(h.shape)} does not fit "
                                     f"{name}: {e}") from e
                finally:
                    head.train(hw)
                if logits.dim() != 2 or logits.shape[1] != self.num_classes:
                    raise ValueError(f"{name} on block {i}'s output gives shape "
                                     f"{tuple(logits.shape)}, expected [N, {self.num_classes}]")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            dev = _device_of(b)
            x = b(x if dev is None else x.to(dev))
        dev = _device_of(self.head)
        return self.head(x if dev is None else x.to(dev))

    def _final_loss(self, out, y):
        if isinstance(self.head, LinearHead):
            return self.head.loss(out, y)[0]
        return F.cross_entropy(self.head(out), y)

    def block_step(self, i: int, x: torch.Tensor, y: torch.Tensor, scaler=None):
        """Block i's gradient-in-forward step: forward, local loss, backward; returns (loss
        detached, output detached). The last block is trained by the network's own head.
        Blocks may live on different devices: the activation and the labels move to block i's.
        ``scaler`` (a torch.amp.GradScaler): the loss is scaled before its backward."""
        dev = _device_of(self.blocks[i])
        if dev is not None and x.device != dev:
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        with torch.enable_grad():
            out = self.blocks[i](x.detach())
            if i < len(self.aux):
                loss = self.aux[i].loss(out, y)[0]
            else:
                loss = self._final_loss(out, y)
            (loss if scaler is None else scaler.scale(loss)).backward()
        return loss.detach(), out.detach()

    def train_step(self, x: torch.Tensor, y: torch.Tensor,
                   optimizer: Optional[torch.optim.Optimizer] = None,
                   scaler=None, *, data_parallel=False) -> torch.Tensor:
        """One training step without a global backward: each block in turn runs forward, local
        loss and backward (its graph freed before the next block runs), then ``optimizer`` steps
        and zeroes the gradients, and MAN heads update their EMA copies. Returns the per-block
        losses [num_blocks] (unscaled).

        ``optimizer`` must hold every trainable parameter of the aux nets and the head (build it
        from net.parameters(), not from the wrapped model's): checked on the first step with
        that optimizer, ValueError otherwise (check_optimizer_covers).
        Mixed precision: run it under torch.autocast; ``scaler`` (torch.amp.GradScaler, for
        fp16) scales each block's loss before its backward, then scaler.step(optimizer) and
        scaler.update() replace optimizer.step().

        Data parallel (every rank holds the whole net, x / y are this rank's shard of the batch):
        ``data_parallel=True`` (the default process group) or a ProcessGroup averages every
        gradient over the ranks (pypaper.local.sync_grads) after the last block and before the
        optimizer / scaler steps - for equal-sized shards, the step of one process on the
        concatenated batch (the math: pypaper.local.data_parallel). The returned losses stay
        this rank's. Without an optimizer the gradients are averaged as well (the average is
        linear: accumulating averaged micro-batches is exact; pass it on the last one only to
        save the communication). Do not wrap the net in DistributedDataParallel: its hooks never
        run here, and train_step raises when it finds itself inside one."""
        _check_step_args(optimizer, scaler)
        dp = data_parallel_group(data_parallel, "LocalSequential.train_step")
        ops.check_labels(y, x.shape[0], self.num_classes, x.device)
        if dp is None:
            check_not_ddp_wrapped(self, "LocalSequential.train_step")
        if optimizer is not None and _optimizer_key(optimizer) != getattr(self, "_opt_key", None):
            check_optimizer_covers(optimizer, [("aux." + n, p) for n, p in
                                               self.aux.named_parameters()]
                                   + [("head." + n, p) for n, p in self.head.named_parameters()])
            self._opt_key = _optimizer_key(optimizer)  # checked once per optimizer
        losses = []
        h = x
        for i in range(len(self.blocks)):
            loss, h = self.block_step(i, h, y, scaler)
            losses.append(loss)
        if dp is not None:
            # before scaler.step: an inf on one rank reaches all, and they skip the step together
            sync_grads(self, dp[0])
        if optimizer is not None:
            if scaler is None:
                optimizer.step()
            else:
                scaler.step(optimizer)
                scaler.update()
            optimizer.zero_grad(set_to_none=True)
            self.after_step()
        return torch.stack(losses)

    def __getstate__(self):
        # _opt_key records that the optimizer with that id held this net's aux / head
        # Parameters. A deep copy or a torch.load'ed twin has Parameters of its own, which that
        # optimizer does not hold: carrying the key over skipped the check, and the copy's
        # train_step(x, y, optimizer) with the original's optimizer ran every backward and
        # stepped nothing of the copy, silently (its .grad only grew). The copy checks again.
        state = super().__getstate__().copy()
        state.pop("_opt_key", None)
        return state

    def recalibrate_batchnorm(self, inputs, batch_size: int = 500) -> "LocalSequential":
        """Re-estimate the BatchNorm statistics of the blocks and the head (what ``forward``
        uses) with the final weights - ``recalibrate_batchnorm``; the aux nets are not on the
        prediction path and keep theirs. Call after training, before evaluating."""
        return recalibrate_batchnorm(self, inputs, batch_size, within=[*self.blocks, self.head])

    def after_step(self) -> None:
        """MAN: move each EMA copy toward its next block (call after every optimizer step)."""
        for i, a in enumerate(self.aux):
            if isinstance(a, MANHead):
                a.ema_update(self.blocks[i + 1])


def _is_scaler(obj) -> bool:
    return all(callable(getattr(obj, a, None)) for a in ("scale", "unscale_", "update"))


def _check_step_args(optimizer, scaler) -> None:
    if optimizer is not None and _is_scaler(optimizer):
        raise TypeError("optimizer is a gradient scaler: pass it as scaler=, with the optimizer "
                        "as optimizer=")
    if optimizer is not None and not hasattr(optimizer, "param_groups"):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got "
                        f"{type(optimizer).__name__}")
    if scaler is not None:
        if not _is_scaler(scaler):
            raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        if optimizer is None:
            raise ValueError("scaler needs an optimizer: it unscales the gradients and steps it")


def _optimizer_key(optimizer) -> tuple:
    """Which optimizer (and how many parameters it holds) was last checked: the check runs on
    the first step with an optimizer, and again when another one (or a grown one) comes."""
    return id(optimizer), sum(len(g["params"]) for g in optimizer.param_groups)


def check_optimizer_covers(optimizer, named_params) -> None:
    """Every trainable parameter in ``named_params`` must be in ``optimizer``'s param_groups.
    An aux net / head parameter left out gets a gradient every step that no optimizer applies or
    zeroes (it grows forever) while the head stays at its initialisation: raised, not warned -
    to keep a head fixed on purpose, set requires_grad_(False) on its parameters (then it gets
    no gradient at all). The usual cause: an optimizer built from the wrapped model's
    parameters before wrapping it."""
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    missing = [n for n, p in named_params if p.requires_grad and id(p) not in held]
    if missing:
        shown = ", ".join(missing[:4]) + (f", ... ({len(missing)} in all)"
                                          if len(missing) > 4 else "")
        raise ValueError(f"the optimizer does not hold the trainable parameters {shown}: their "
                         f"gradients would never be applied nor zeroed. Build the optimizer "
                         f"from net.parameters() (the LocalSequential's, which include the aux "
                         f"nets and the head), or freeze them with requires_grad_(False)")


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, inputs, batch_size: int = 500,
                          within: Optional[Sequence[nn.Module]] = None) -> nn.Module:
    """Re-estimate every BatchNorm's running statistics with the model's *final* weights
    ("precise BN", Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021): reset them, run
    ``inputs`` (a tensor, cut into ``batch_size`` rows, or an iterable of input batches) through
    the model with only the BatchNorm layers in train mode and momentum None (a plain average of
    the per-batch mean / unbiased variance), then restore the momenta and every module's mode.
    Parameters are not touched; call it after the last optimizer step, before evaluating.
    ``within``: recalibrate only the BatchNorm layers inside these submodules (default: all).

    Why: with BN momentum 0.1 the running statistics average the last ~10 batches, i.e. weights
    of ~10 steps ago. With Adam at a constant lr (2e-3 on the MNIST CNN of
    examples/local_mnist.py) the last block's pre-BN channel means move ~0.05 std per step, so
    at the end of training its running means lag the final weights by ~0.3 std on average
    (up to 0.6-0.8 std on some channels): eval-mode
    accuracy then swings from epoch to epoch (MAN, seed 1: 94.5% -> 83.2% between epochs 7 and
    8, while the same weights with re-estimated statistics give 96.8% and 97.3%). Every method
    is hit (backprop 94.5 -> 98.3% at seed 0, DGL 95.2 -> 97.7% at seed 1); MAN's
    network was the most sensitive to the lag. Apply it to all methods alike."""
    if isinstance(inputs, torch.Tensor) and inputs.shape[0] == 0:
        raise ValueError("recalibrate_batchnorm needs at least one input row")
    roots = [model] if within is None else list(within)
    bns = list({id(m): m for r in roots for m in r.modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm)}.values())
    if not bns:
        return model
    modes = [(m, m.training) for m in model.modules()]
    momenta = [m.momentum for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        if isinstance(inputs, torch.Tensor):
            if batch_size < 2:
                raise ValueError(f"batch_size must be at least 2, got {batch_size}")
            chunks = (inputs[i:i + batch_size] for i in range(0, inputs.shape[0], batch_size))
        else:
            chunks = iter(inputs)
        seen = 0
        for x in chunks:
            model(x)
            seen += 1
        if seen == 0:
            raise ValueError("recalibrate_batchnorm needs at least one input batch")
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        for m, t in modes:
            m.train(t)
    return model


def backprop_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                  optimizer: Optional[torch.optim.Optimizer] = None) -> torch.Tensor:
    """The end-to-end baseline: one forward, cross-entropy, one global backward, the step."""
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach()
