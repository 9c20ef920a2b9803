"""Review regressions of pypaper.local (session 36): the 2-process pipeline's activation dtype,
torch.compile with symbolic float / int arguments, the Triton head and single-forward kernels
past one tile of classes, and eps checked when a Forward-Forward layer is built."""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import pypaper
import pypaper.local as L
from pypaper.local import reference as R
from pypaper.local.distributed import LocalPipeline

_CPU_OPS = L.backend_for(torch.zeros(1)) == "cpu"


# ---- 1. LocalPipeline: the activation travels in the dtype the block produced ---------------

def _pipe_net(dtype):
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(8, 6), nn.ReLU()), nn.Sequential(nn.Linear(6, 3))]
    return L.LocalSequential(blocks, "dgl", num_classes=3, example_input=torch.randn(2, 8),
                             aux_depth=1).to(dtype)


def _pipe_data(dtype):
    g = torch.Generator().manual_seed(1)
    return torch.randn(5, 8, generator=g).to(dtype), torch.randint(0, 3, (5,), generator=g)


def _pipe_step(run, mode):
    """One train_step of ``run`` (a LocalPipeline or the LocalSequential) in ``mode``: "f64" (an
    fp64 net) or "bf16" (fp32 net under CPU autocast: block 0's output is bf16)."""
    dtype = torch.float64 if mode == "f64" else torch.float32
    x, y = _pipe_data(dtype)
    if isinstance(run, LocalPipeline):
        opt = torch.optim.SGD(run.parameters(), lr=0.1)
        x = x if run.rank == 0 else None
    else:
        opt = torch.optim.SGD([p for p in run.parameters() if p.requires_grad], lr=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16"):
        return run.train_step(x, y, opt)


def _pipe_worker(rank, world_size, tmp):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank,
                            world_size=world_size)
    try:
        out = {}
        for mode in ("f64", "bf16"):
            dtype = torch.float64 if mode == "f64" else torch.float32
            pipe = LocalPipeline(_pipe_net(dtype), rank, world_size)
            out[mode] = _pipe_step(pipe, mode)
        # a label out of range: every rank must raise the ValueError, before any send / recv
        pipe = LocalPipeline(_pipe_net(torch.float32), rank, world_size)
        x, _ = _pipe_data(torch.float32)
        try:
            pipe.train_step(x if rank == 0 else None, torch.tensor([0, 1, 2, 3, 1]))
            out["bad_labels"] = "no error"
        except Exception as e:  # noqa: BLE001 (recorded for the test to check)
            out["bad_labels"] = f"{type(e).__name__}: {e}"
        torch.save(out, os.path.join(tmp, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_pipeline_activation_dtype_and_label_errors_on_every_rank():
    # The receiver used to allocate float32 whatever was sent: an fp64 net aborted gloo (a
    # message-size mismatch, SIGABRT), and under autocast the bf16 activation was read as fp32
    # garbage (rank 1's loss 5e5 instead of 1.36), silently.
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_pipe_worker, args=(2, tmp), nprocs=2, join=True)
        got = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]
    for mode in ("f64", "bf16"):
        dtype = torch.float64 if mode == "f64" else torch.float32
        single = _pipe_step(_pipe_net(dtype), mode)
        pipe = torch.cat([got[0][mode], got[1][mode]])
        assert pipe.dtype == single.dtype, mode
        torch.testing.assert_close(pipe, single, rtol=1e-6, atol=1e-7, msg=mode)
    # Bad labels: rank 0 raised in its block's loss while rank 1 waited in recv, and rank 1
    # failed with gloo's "Connection closed by peer" instead of the error naming y.
    for r in range(2):
        assert got[r]["bad_labels"].startswith(
            "ValueError: y must hold class labels in [0, 3)"), (r, got[r]["bad_labels"])


# ---- 2. torch.compile(fullgraph=True) with floats / ints that dynamo makes symbolic --------------

@pytest.mark.skipif(not _CPU_OPS, reason="the C++ local ops (pypaper._C) are not built")
def test_compile_fullgraph_with_a_varying_threshold_and_temperature():
    # A float argument that takes a second value (a threshold or temperature schedule) reaches
    # the argument checks as a SymFloat (specialize_float is False); math.isfinite refused it:
    # "torch.* op returned non-Tensor" under fullgraph=True.
    torch._dynamo.reset()
    torch.manual_seed(0)
    x, w, b = torch.randn(6, 5), torch.randn(4, 5), torch.randn(4)
    cx, y = torch.randn(3, 5), torch.tensor([0, 1, 2, 0, 1, 2])

    def ff(x, th):
        return L.ff_linear(x, w, b, num_pos=3, threshold=th)

    def sf(x, temp):
        return L.ff_sf_linear(x, cx, w, b, y, temperature=temp)

    cff, csf = torch.compile(ff, fullgraph=True), torch.compile(sf, fullgraph=True)
    for v in (1.0, 2.0, 3.0):
        torch.testing.assert_close(cff(x, v), ff(x, v), rtol=0, atol=0)
        torch.testing.assert_close(csf(x, v), sf(x, v), rtol=0, atol=0)
    with pytest.raises(ValueError, match="threshold must be finite"):
        ff(x, float("nan"))  # eager checks are unchanged


@pytest.mark.skipif(not _CPU_OPS, reason="the C++ local ops (pypaper._C) are not built")
def test_compile_dynamic_shapes_fullgraph():
    # dynamic=True: every float is a SymFloat and num_pos = x.shape[0] // 2 a SymInt, which the
    # isinstance(num_pos, int) check refused.
    torch._dynamo.reset()
    torch.manual_seed(0)
    w, b = torch.randn(4, 6), torch.randn(4)
    ff = torch.compile(lambda x: L.ff_linear(x, w, b, num_pos=x.shape[0] // 2), dynamic=True,
                       fullgraph=True)
    sf = torch.compile(lambda x, cx, y: L.ff_sf_linear(x, cx, w, b, y), dynamic=True,
                       fullgraph=True)
    for n in (6, 9, 1):
        x = torch.randn(n, 6)
        torch.testing.assert_close(ff(x), L.ff_linear(x, w, b, num_pos=n // 2), rtol=0, atol=0)
        cx, y = torch.randn(3, 6), torch.randint(0, 3, (n,))
        torch.testing.assert_close(sf(x, cx, y), L.ff_sf_linear(x, cx, w, b, y), rtol=0, atol=0)


# ---- 3. Triton kernels past one tile (2048) of classes -------------------------------------------

def _triton_ok():
    try:
        from pypaper.local import triton_kernels as tk
    except Exception:  # noqa: BLE001 (no triton)
        return False
    return tk.HAVE_TRITON and tk.triton_available(torch.device("cpu"))[0]


@pytest.mark.triton
@pytest.mark.skipif(not _triton_ok(), reason="Triton kernels cannot run here "
                                             "(TRITON_INTERPRET=1 on CPU)")
def test_triton_head_with_more_classes_than_one_tile():
    # The CE kernel read one tile of block_for(k) <= 2048 classes: with 2100 classes the loss,
    # grad_pooled and the parameter gradients were wrong (the last 52 classes left out of the
    # softmax, their dlogits never written), with no error.
    torch.manual_seed(0)
    k = 2100
    feat, w, b = torch.randn(2, 3, 2, 2), torch.randn(k, 3), torch.randn(k)
    y = torch.tensor([5, k - 1])
    with pypaper.use_backend("triton"):
        out = L.local_head(feat, w, b, y)
    ref = R.local_head(feat, w, b, y)
    for a, r in zip(out, ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)


@pytest.mark.triton
@pytest.mark.skipif(not _triton_ok(), reason="Triton kernels cannot run here "
                                             "(TRITON_INTERPRET=1 on CPU)")
def test_triton_single_forward_refuses_more_classes_than_one_tile():
    # Its kernel holds a row's logits in one tile of <= 2048 classes: past it the softmax left
    # classes out, silently. Refused now, and an automatic choice goes on to the reference.
    torch.manual_seed(0)
    k = 2049
    x, cx, w = torch.randn(2, 4), torch.randn(k, 4), torch.randn(3, 4)
    y = torch.tensor([0, k - 1])
    with pypaper.use_backend("triton"):
        with pytest.raises(pypaper.BackendUnavailable, match="up to 2048 classes"):
            L.ff_sf_linear(x, cx, w, None, y)
    with pytest.raises(ValueError, match="class_x: the Triton single-forward kernel takes up to"):
        torch.ops.pypaper.local_ff_sf_linear_triton(x, cx, w, None, y, True, 1e-4, 1.0)


@pytest.mark.triton
@pytest.mark.skipif(not _triton_ok(), reason="Triton kernels cannot run here "
                                             "(TRITON_INTERPRET=1 on CPU)")
def test_single_forward_automatic_choice_falls_back_past_the_class_limit(monkeypatch):
    # An automatic choice of a GPU backend that cannot take k classes goes on to the next one
    # (CUDA -> Triton -> reference) instead of raising or answering wrong. Here Triton is what
    # the device would pick (as on a GPU build without the CUDA kernels).
    from pypaper.local import ops

    monkeypatch.setattr(ops, "backend_for", lambda x: "triton")
    torch.manual_seed(0)
    x, cx, w = torch.randn(3, 4), torch.randn(2100, 4), torch.randn(5, 4)
    y = torch.tensor([2048, 7, 2099])  # labels past the first tile: their logit was read as 0
    out = ops.ff_sf_linear(x, cx, w, None, y)  # served by the reference, not the Triton op
    for a, r in zip(out, R.ff_sf_linear(x, cx, w, None, y)):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)


# ---- 4. eps of the Forward-Forward layers ----------------------------------------------------

@pytest.mark.parametrize("make", [lambda eps: L.FFLinear(4, 3, eps=eps),
                                  lambda eps: L.FFClassEmbeddingLinear(4, 3, 2, eps=eps)])
def test_negative_eps_is_refused_when_the_layer_is_built(make):
    # A negative eps was accepted: forward divided by ||x|| - |eps| silently (inf / sign flips
    # for short rows), and only local_step raised, from inside the C++ op.
    with pytest.raises(ValueError, match="eps must be >= 0"):
        make(-0.5)
    layer = make(0.0)
    assert layer.eps == 0.0
    with pytest.raises(ValueError, match="eps must be >= 0"):
        L.ops.ff_linear_into(torch.randn(2, 4), layer.weight.detach(), layer.bias.detach(),
                             torch.zeros(3, 4), torch.zeros(3), num_pos=1, eps=-1.0)
