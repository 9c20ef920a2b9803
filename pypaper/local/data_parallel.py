"""Data-parallel local learning: every rank holds the whole model and trains on its own shard of
the batch; the gradients are averaged over the ranks before the optimizer steps, so every rank
applies the same update and the replicas stay identical.

    dist.init_process_group("gloo" | "nccl", ...)
    net = LocalSequential(...)                     # built identically on every rank (same seed),
    broadcast_parameters(net)                      # or made identical by a broadcast from rank 0
    opt = torch.optim.Adam(net.parameters())
    net.train_step(x_shard, y_shard, opt, data_parallel=True)     # LocalSequential

    ff = FFNetwork([784, 500, 500], 10)            # Forward-Forward: negatives drawn and the
    ff.train_step(x_shard, y_shard, opt, data_parallel=True)  # overlay value taken batch-wide

    tp = TPNetwork([784, 500], 10)                 # networks whose train_step steps by itself:
    sync_grads_on_step(opt)                        # the optimizer averages before every step
    tp.train_step(x_shard, y_shard, opt)

    for layer in layers: layer.local_step(...)     # a hand-written loop
    sync_grads(layers)
    opt.step()

Why not torch.nn.parallel.DistributedDataParallel: DDP all-reduces the gradients from autograd
hooks armed by *its own* forward (Reducer.prepare_for_backward). The local layers write .grad
from fused ops (no autograd at all) and LocalSequential's blocks call backward on their own
block + aux graphs, never through the wrapper's forward: under DDP every rank silently trains its
own copy. pypaper's local layers and LocalSequential.train_step therefore raise when they find
themselves inside a DDP wrapper (check_not_ddp_wrapped).

Why averaging is exact. A local loss that is a MEAN over the rows of the batch,
L_B(theta) = 1/|B| sum_{i in B} l_i(theta), has the gradient g_B = 1/|B| sum_{i in B} grad l_i.
For W ranks with equal-sized shards B_1..B_W (|B_r| = n) of the batch B = B_1 u ... u B_W:

    1/W sum_r g_{B_r} = 1/W sum_r 1/n sum_{i in B_r} grad l_i = 1/(W n) sum_{i in B} grad l_i = g_B,

the gradient of one process on the concatenated batch. This holds for each layer's / block's
local loss separately, since every row's l_i depends only on that row (its activations come from
its own input row): Forward-Forward's mean_pos + mean_neg terms (equal positive and negative
counts per rank; FFNetwork.train_step(..., data_parallel=True) also draws the negatives and
takes the overlay value - by default the batch max - as one process on the whole batch does),
tpSGD's 1/(2N) sum ||h - t||^2, the aux heads' cross-entropy. It does NOT hold
for batch-coupled layers: BatchNorm in train mode normalises with the shard's statistics, not the
batch's (use nn.SyncBatchNorm, GPU only, whose collectives run in the same block order on every
rank), and its running statistics stay per-rank buffers. With unequal shards the average weights
every shard equally (as DDP does); scale the losses by n_r W / N for the exact batch gradient.
The sum is linear: averaging after each of k accumulated micro-batches gives the same result as
averaging once at the end (an already averaged part is identical on all ranks and averages to
itself), so gradient accumulation is correct either way; syncing once saves the communication.
"""
from __future__ import annotations

import gc
import weakref
import zlib
from typing import Iterable, Optional, Union

import torch
from torch import nn

__all__ = ["broadcast_parameters", "check_not_ddp_wrapped", "require_process_group", "sync_grads",
           "sync_grads_on_step"]

# DDP's default bucket size (bucket_cap_mb=25): large enough to amortise a collective's latency,
# small enough not to double the gradient memory for a big model.
DEFAULT_BUCKET_BYTES = 25 * 1024 * 1024


def require_process_group():
    """torch.distributed with an initialised default process group, or a clear error."""
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("data-parallel local learning needs torch.distributed, which this "
                           "torch build lacks (torch.distributed.is_available() is False)")
    if not dist.is_initialized():
        raise RuntimeError("data-parallel local learning needs an initialised process group: "
                           "call torch.distributed.init_process_group(...) on every rank first "
                           "(in a single process there is nothing to average)")
    return dist


def _resolve_group(group):
    """data_parallel=True -> the default group; a ProcessGroup -> itself."""
    return None if group is True else group


def _trainable(obj) -> list:
    """The parameters to sync, in a deterministic order (identical on every rank when the model
    is built identically), each once, those with requires_grad only (a frozen parameter gets no
    gradient from the local layers, and DDP skips it too)."""
    if isinstance(obj, nn.Module):
        it = obj.parameters()
    elif isinstance(obj, torch.Tensor):
        it = [obj]
    elif hasattr(obj, "param_groups"):  # an optimizer: what it steps
        it = (p for g in obj.param_groups for p in g["params"])
    else:
        try:
            it = iter(obj)
        except TypeError:
            raise TypeError(f"expected a module, an optimizer or an iterable of parameters, got "
                            f"{type(obj).__name__}") from None
    out, seen = [], set()
    for p in it:
        if isinstance(p, nn.Module):  # a list of modules (e.g. the layers of a hand-written net)
            for q in _trainable(p):
                if id(q) not in seen:
                    seen.add(id(q))
                    out.append(q)
            continue
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"expected parameters (tensors), got {type(p).__name__}")
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _group_size(dist, group, who: str) -> int:
    """The size of ``group``; a clear error on a rank outside it (torch's collectives return
    there without doing anything, after a warning: the layout check then reported a model
    mismatch that did not exist)."""
    if group is not None and dist.get_rank(group) < 0:
        raise ValueError(f"{who}: this process (global rank {dist.get_rank()}) is not a member of "
                         f"the process group passed; call it only on the group's ranks")
    return dist.get_world_size(group)


def data_parallel_group(data_parallel, who: str):
    """A train_step's ``data_parallel=`` argument: None when off (False / None); else (group,
    world size) with group None for True (the default group) or the ProcessGroup passed, after
    the checks, made before any block runs so that a setup error leaves no half-done step: the
    type, an initialised process group, and membership (new_group() hands a rank outside the
    group the int sentinel NON_GROUP_MEMBER, not a ProcessGroup: it gets _group_size's clear
    error, not a type error)."""
    if data_parallel is None or data_parallel is False:
        return None
    if data_parallel is not True:
        import torch.distributed as dist

        if not (dist.is_available() and (
                isinstance(data_parallel, dist.ProcessGroup)
                or (type(data_parallel) is int
                    and data_parallel == dist.GroupMember.NON_GROUP_MEMBER))):
            raise TypeError(f"data_parallel must be a bool or a torch.distributed ProcessGroup, "
                            f"got {type(data_parallel).__name__}")
    dist = require_process_group()
    group = _resolve_group(data_parallel)
    return group, _group_size(dist, group, f"{who}(data_parallel=...)")


def _comm_device(params, dist, group):
    if params:
        return params[0].device
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _layout_signature(params) -> int:
    """A 20-bit checksum of the shapes and dtypes, in order (crc32: the same in every process,
    unlike hash() of strings). Device indices may differ across ranks and are left out."""
    text = repr([(tuple(p.shape), str(p.dtype)) for p in params])
    return zlib.crc32(text.encode()) & 0xFFFFF


def sync_grads(params: Union[nn.Module, Iterable, torch.optim.Optimizer], group=None, *,
               bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
    """Average the ``.grad`` of every trainable parameter over the ranks of ``group`` (default:
    the default process group), in place: g <- 1/W sum_r g_r, W = the group's size. Call it on
    every rank, after the local steps and before ``optimizer.step()``; every rank then holds the
    same gradient and, from identical parameters, takes the same step.

    ``params``: a module, an optimizer (its param_groups) or an iterable of parameters / modules;
    only parameters with requires_grad, each once, in their order - which must be the same on
    every rank (the same model built the same way). A mismatch of shapes or dtypes across ranks
    raises ValueError on every rank instead of hanging or mixing unrelated gradients.

    Missing gradients: a parameter whose .grad is None on some ranks but not on others (e.g. a
    branch used by only some shards) counts as zeros on those ranks - exactly what a single
    process on the concatenated batch sees: those rows contribute nothing to its gradient - and
    gets the averaged .grad everywhere. A parameter with no gradient on ANY rank keeps
    .grad = None (an optimizer then skips it, as it would in one process; zeros would still move
    it through momentum or Adam's moments).

    Communication: one all_reduce of 3 int64 (layout check, "is a gradient missing anywhere"),
    one more of one int32 per parameter only when some rank misses a gradient, then the
    gradients flattened into buckets of at most ``bucket_bytes`` per (device, dtype), divided by
    W before the SUM (as DDP's default hook: fp16 sums stay in range) - one all_reduce per
    bucket, all in flight at once. The backend's sum is the same on every rank (gloo and NCCL
    broadcast the reduced chunks), so the replicas stay bit-identical. Sparse gradients are not
    supported (TypeError). With a GradScaler, call this before ``scaler.step(optimizer)``: the
    inf/NaN of one rank then reaches every rank and all of them skip the step together.

    Math (why this equals training on the whole batch): see the module docstring -
    1/W sum_r g_{B_r} = g_B for a mean loss over W equal-sized shards B_r of the batch B.
    """
    if not isinstance(bucket_bytes, int) or isinstance(bucket_bytes, bool) or bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be a positive int, got {bucket_bytes!r}")
    params = _trainable(params)
    for p in params:
        if p.grad is not None and p.grad.is_sparse:
            raise TypeError("sync_grads does not support sparse gradients (an nn.Embedding "
                            "with sparse=True?): use dense gradients")
    dist = require_process_group()
    group = _resolve_group(group)
    world = _group_size(dist, group, "sync_grads")
    if world == 1:
        return
    dev = _comm_device(params, dist, group)

    # 1. layout check and "is any gradient missing anywhere", in one small collective. The
    #    signatures s_r are all equal iff W sum s_r^2 == (sum s_r)^2 (Cauchy-Schwarz equality).
    sig = _layout_signature(params)
    missing_here = sum(p.grad is None for p in params)
    head = torch.tensor([sig, sig * sig, missing_here], dtype=torch.int64, device=dev)
    dist.all_reduce(head, group=group)
    s1, s2, missing = (int(v) for v in head.tolist())
    if world * s2 != s1 * s1:
        raise ValueError("sync_grads: the parameters differ across ranks (their shapes / dtypes "
                         "/ count): every rank must pass the same model, built the same way")

    # 2. which parameters have a gradient somewhere (only asked when some rank misses one)
    if missing:
        flags = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=dev)
        dist.all_reduce(flags, group=group)
        live = [p for p, f in zip(params, flags.tolist()) if f > 0]
    else:
        live = params

    # 3. buckets per (device, dtype), in parameter order (the same on every rank)
    buckets, open_ = [], {}
    for p in live:
        key = (p.device, p.dtype)
        nbytes = p.numel() * p.element_size()
        b = open_.get(key)
        if b is None or (b[1] and b[1] + nbytes > bucket_bytes):
            b = [[], 0]
            open_[key] = b
            buckets.append(b[0])
        b[0].append(p)
        b[1] += nbytes

    pending = []
    for bucket in buckets:
        flat = torch.cat([(torch.zeros_like(p, memory_format=torch.contiguous_format)
                           if p.grad is None else p.grad.detach()).reshape(-1) for p in bucket])
        flat.div_(world)
        pending.append((bucket, flat, dist.all_reduce(flat, group=group, async_op=True)))
    for bucket, flat, work in pending:
        work.wait()
        off = 0
        for p in bucket:
            n = p.numel()
            avg = flat[off:off + n].view(p.shape)
            off += n
            if p.grad is None:
                p.grad = avg.clone()  # its own storage: the bucket is freed
            else:
                p.grad.copy_(avg)


def sync_grads_on_step(optimizer: torch.optim.Optimizer, group=None, *,
                       bucket_bytes: int = DEFAULT_BUCKET_BYTES):
    """Make ``optimizer`` average its parameters' gradients over ``group`` right before each
    ``step()`` (a step pre-hook running sync_grads(optimizer, group)): for training loops that
    step inside (FFSingleForwardNetwork.train_step, TPNetwork.train_step; FFNetwork.train_step
    averages, but its negatives and overlay value stay per shard: pass it data_parallel=True)
    or to put the sync in one place. Returns the hook's handle (``.remove()`` undoes it).

    Not with a GradScaler: scaler.step skips optimizer.step() on a rank whose gradients hold an
    inf - that rank would miss the collective and the others would wait for it. Call
    sync_grads before scaler.step there (LocalSequential.train_step(..., data_parallel=True,
    scaler=...) does)."""
    if not hasattr(optimizer, "register_step_pre_hook"):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got "
                        f"{type(optimizer).__name__}")
    require_process_group()
    if not isinstance(bucket_bytes, int) or isinstance(bucket_bytes, bool) or bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be a positive int, got {bucket_bytes!r}")
    group = _resolve_group(group)

    def hook(opt, args, kwargs):
        sync_grads(opt, group, bucket_bytes=bucket_bytes)

    handle = optimizer.register_step_pre_hook(hook)
    _mark_synced(optimizer, handle)
    return handle


@torch.no_grad()
def broadcast_parameters(module: nn.Module, src: int = 0, group=None,
                         buffers: bool = True) -> nn.Module:
    """Copy rank ``src``'s parameters (and buffers) to every rank of ``group``, as DDP's
    constructor does: call once after building the model when the ranks may have drawn
    different initial weights. ``src`` is a global rank. Returns ``module``."""
    dist = require_process_group()
    group = _resolve_group(group)
    tensors = list(module.parameters()) + (list(module.buffers()) if buffers else [])
    world = _group_size(dist, group, "broadcast_parameters")
    if world == 1:
        return module
    sig = _layout_signature(tensors)
    head = torch.tensor([sig, sig * sig], dtype=torch.int64,
                        device=_comm_device(tensors, dist, group))
    dist.all_reduce(head, group=group)
    s1, s2 = (int(v) for v in head.tolist())
    if world * s2 != s1 * s1:
        raise ValueError("broadcast_parameters: the parameters / buffers differ across ranks "
                         "(shapes, dtypes or count): build the same model on every rank")
    for t in tensors:
        if t.is_contiguous():
            dist.broadcast(t.detach(), src=src, group=group)
        else:  # the collectives need contiguous memory; copy back into the strided tensor
            c = t.detach().contiguous()
            dist.broadcast(c, src=src, group=group)
            t.copy_(c)
    return module


# --- the DDP trap --------------------------------------------------------------------------

# Modules found outside every DDP wrapper, with the value of _DDP_GENERATION at that check: the
# result stands until a new DDP wraps a module (which bumps the generation), so a model wrapped
# *after* its first local step is caught at its next one.
_CHECKED: "weakref.WeakKeyDictionary[nn.Module, int]" = weakref.WeakKeyDictionary()
# Optimizers with sync_grads_on_step hooks: {optimizer: {hook ids}}. A module whose trainable
# parameters all belong to optimizers whose hook is still registered trains correctly inside a
# DDP wrapper; the ids are looked up in the optimizer's own pre-hook dict, so handle.remove()
# ends the exemption.
_SYNC_OPTIMIZERS: "weakref.WeakKeyDictionary[torch.optim.Optimizer, set]" = (
    weakref.WeakKeyDictionary())
# The live DistributedDataParallel wrappers of this process, kept by a global module
# registration hook (DDP's constructor assigns ``self.module = module``, which runs it) once the
# first multi-process local step installed it; the wrappers built before that are found by one
# scan of the garbage collector's objects at installation.
_DDP_WRAPPERS: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
_DDP_GENERATION = 0
_DDP_WATCH = None  # (the DDP class, the registration hook's handle) once installed


def _mark_synced(optimizer, handle) -> None:
    _SYNC_OPTIMIZERS.setdefault(optimizer, set()).add(handle.id)


def _is_synced(module: nn.Module) -> bool:
    ps = [p for p in module.parameters() if p.requires_grad]
    if not ps:
        return False
    held = set()  # ids of parameters held by an optimizer that syncs (alive: it holds them)
    for opt, hook_ids in list(_SYNC_OPTIMIZERS.items()):
        live = getattr(opt, "_optimizer_step_pre_hooks", {})
        if any(h in live for h in hook_ids):
            held.update(id(p) for g in opt.param_groups for p in g["params"])
    return all(id(p) in held for p in ps)


def _on_module_registered(parent, name, submodule):
    """Global module registration hook: records a DDP wrapper when it takes its module."""
    global _DDP_GENERATION
    if submodule is not None and issubclass(type(parent), _DDP_WATCH[0]):
        _DDP_WRAPPERS.add(parent)
        _DDP_GENERATION += 1
    return None  # the submodule is registered unchanged


def _watch_ddp() -> bool:
    """Start tracking the DDP wrappers of this process (once); False without DDP."""
    global _DDP_WATCH
    if _DDP_WATCH is None:
        try:
            from torch.nn.parallel import DistributedDataParallel as DDP
        except ImportError:  # pragma: no cover - torch without distributed
            _DDP_WATCH = (None, None)
            return False
        from torch.nn.modules.module import register_module_module_registration_hook

        _DDP_WATCH = (DDP, register_module_module_registration_hook(_on_module_registered))
        # The wrappers built before the hook: one scan of the heap (~50 ms per ~200k objects),
        # once per process. issubclass(type(o)) rather than isinstance: isinstance reads
        # o.__class__, which on some lazily deprecated objects (torch.distributed.reduce_op)
        # emits a warning.
        for o in gc.get_objects():
            if issubclass(type(o), DDP):
                _DDP_WRAPPERS.add(o)
    return _DDP_WATCH[0] is not None


def _ddp_wrapper_of(module: nn.Module):
    """The live DistributedDataParallel whose module tree holds ``module``, or None.

    DDP leaves no mark on the module it wraps (torch 2.13: no attribute on the module or its
    parameters; its gradient hooks sit on the parameters' AccumulateGrad nodes in C++, invisible
    from Python), so the wrappers themselves are tracked (_watch_ddp) and their trees walked."""
    if not _watch_ddp():
        return None
    for ddp in list(_DDP_WRAPPERS):
        inner = getattr(ddp, "module", None)
        if isinstance(inner, nn.Module) and any(m is module for m in inner.modules()):
            return ddp
    return None


def check_not_ddp_wrapped(module: nn.Module, what: str) -> None:
    """Raise if ``module`` sits inside a torch DistributedDataParallel wrapper in a multi-process
    run and nothing averages its gradients: DDP's all-reduce is armed by its own forward, which
    ``what`` (a local step) never goes through, so every rank would silently train its own copy.
    Free in a single process (no process group, or a group of one); otherwise a walk of the
    live wrappers' module trees, once per module until a new wrapper is built.

    Under torch.compile the check is skipped: dynamo cannot trace the heap scan (it crashed with
    an InternalTorchDynamoError on a dead weakref), and a guard could not see a wrapper built
    later anyway. An eager step before compiling checks the module."""
    if torch.compiler.is_compiling():
        return
    if _CHECKED.get(module) == _DDP_GENERATION:
        return
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    if _is_synced(module):
        return  # not cached: removing the sync hook must bring the check back
    ddp = _ddp_wrapper_of(module)
    if ddp is not None:
        raise RuntimeError(
            f"{what} of a {type(module).__name__} inside torch.nn.parallel."
            f"DistributedDataParallel: DDP averages gradients only through its own forward and "
            f"backward, which local steps never use - every rank would train its own copy, "
            f"silently diverging. Drop the DDP wrapper and average the gradients with "
            f"pypaper.local: LocalSequential.train_step(x, y, optimizer, data_parallel=True) "
            f"or FFNetwork.train_step(..., data_parallel=True), sync_grads_on_step(optimizer) "
            f"(for TPNetwork / FFSingleForwardNetwork train_step), or "
            f"sync_grads(model) before optimizer.step(); broadcast_parameters(model) makes the "
            f"initial weights identical as DDP's constructor did")
    _CHECKED[module] = _DDP_GENERATION
