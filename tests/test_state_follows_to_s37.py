"""State kept outside registered parameters / buffers must survive ``.to(dtype / device)``,
``to_empty`` and ``load_state_dict(assign=True)``: after the move the model runs, gives what a
model built in the new dtype / on the new device gives, and keeps training."""
import copy

import pytest
import torch
from torch import nn

from pypaper.quant import Int4WeightOnlyLinear, Int8DynamicLinear, Int8WeightOnlyLinear
from pypaper.wtacrs import WTACRSLinear, sample_ids


def _train_with_ids(m, device, dtype, steps=3, first=0):
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    for s in range(first, first + steps):
        g = torch.Generator().manual_seed(s)
        x = torch.randn(4, 16, 8, generator=g).to(device=device, dtype=dtype)
        ids = torch.arange(4, device=device) + s  # new ids grow the table, old ones are reused
        with sample_ids(ids):
            y = m(x)
        y.float().square().mean().backward()
        opt.step()
        opt.zero_grad()
    return y


def _wtacrs():
    return WTACRSLinear(8, 8, keep_ratio=0.25, min_k=2,
                        generator=torch.Generator().manual_seed(0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device (CUDA)")
def test_wtacrs_grad_norm_cache_survives_a_device_move_after_training():
    # The grad-norm table is not a buffer: it stays where it was first filled while .cuda() /
    # .cpu() move the layer. store() indexed that table with ids put on the gradients' device
    # (a CPU table, CUDA indices: "indices should be either on cpu or on the same device") and
    # the first backward after the move raised. Both directions, and the pickled-model route
    # (torch.load(map_location="cpu") then .cuda()) reduce to the same first case.
    for first, then in (("cpu", "cuda"), ("cuda", "cpu")):
        torch.manual_seed(0)
        m = _wtacrs().to(first)
        _train_with_ids(m, first, torch.float32)
        filled = m.grad_norms.table.clone()
        m.to(then)
        _train_with_ids(m, then, torch.float32, first=1)  # ids 1..6: old rows and new ones
        t = m.grad_norms.table
        assert t.device.type == first  # it stays where it lives (and where lookup reads it)
        assert t.shape[0] == filled.shape[0] + 1
        assert torch.isfinite(t[:7, :16]).all()


def test_wtacrs_dtype_moves_after_training_with_sample_ids_match_a_model_built_in_the_dtype():
    # CPU proxy of the same bug class: the filled (float32) table must serve a model moved to
    # fp64 / bf16 exactly as it serves a model built in that dtype with the same state.
    for dt in (torch.float64, torch.bfloat16):
        torch.manual_seed(0)
        a = _wtacrs()
        _train_with_ids(a, "cpu", torch.float32)
        b = WTACRSLinear(8, 8, keep_ratio=0.25, min_k=2, dtype=dt,
                         generator=copy.deepcopy(a.generator))
        b.load_state_dict(a.state_dict())
        b.grad_norms = copy.deepcopy(a.grad_norms)
        a.to(dt)
        ya = _train_with_ids(a, "cpu", dt, first=1)
        yb = _train_with_ids(b, "cpu", dt, first=1)
        assert ya.dtype == dt
        assert torch.equal(ya, yb)
        assert torch.equal(a.weight, b.weight)
        assert torch.equal(a.grad_norms.table, b.grad_norms.table)


@pytest.mark.parametrize("make", [
    lambda lin: Int8DynamicLinear.from_float(lin),
    lambda lin: Int8WeightOnlyLinear.from_float(lin, group_size=32),
    lambda lin: Int4WeightOnlyLinear.from_float(lin, group_size=32),
], ids=["int8_dynamic", "int8_weight_only", "int4_weight_only"])
@pytest.mark.parametrize("store", [torch.bfloat16, torch.float16, torch.float64])
def test_qlinear_assign_load_of_a_low_precision_checkpoint_keeps_float32_scales(make, store):
    # The layers keep their scales / zero points / bias in float32 whatever .to() says
    # (qlinear._QuantizedLinear._apply). load_state_dict(assign=True) into a meta-built layer
    # installed a checkpoint's bf16 / fp16 / fp64 floats as they were, and every forward then
    # raised "bias must be float32"; a plain load of the same checkpoint worked.
    torch.manual_seed(0)
    q = make(nn.Linear(64, 16))
    sd = {k: v.to(store) if v.is_floating_point() else v for k, v in q.state_dict().items()}
    plain = make(nn.Linear(64, 16))
    plain.load_state_dict(sd)
    with torch.device("meta"):
        lazy = make(nn.Linear(64, 16))
    lazy.load_state_dict(sd, assign=True)
    assert {n: t.dtype for n, t in lazy.state_dict().items()} == \
        {n: t.dtype for n, t in q.state_dict().items()}
    assert isinstance(lazy.bias, nn.Parameter) and lazy.bias.requires_grad
    x = torch.randn(3, 64)
    for dt in (torch.float32, torch.bfloat16):
        assert torch.equal(lazy(x.to(dt)), plain(x.to(dt)))
    # the caller's checkpoint is left as it was
    assert sd["bias"].dtype == store
    # it still trains (the bias, the one float parameter)
    lazy(x).sum().backward()
    assert lazy.bias.grad is not None and lazy.bias.grad.dtype == torch.float32


# ---- after the review: PowerQuantLinear's assign-load, the target projection's dtype ------------

def test_power_quant_assign_load_of_a_bf16_checkpoint_runs():
    """load_state_dict(assign=True) of a PowerQuantLinear checkpoint stored in bf16 installed
    bf16 ranges, and the forward raised "max_abs must be float32 or float64"."""
    from pypaper.quant import PowerExponentConfig, quantize_

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8))
    quantize_(model, PowerExponentConfig(4, 1.0))
    sd = {k: v.bfloat16() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    with torch.device("meta"):
        fresh = torch.nn.Sequential(torch.nn.Linear(16, 8))
        quantize_(fresh, PowerExponentConfig(4, 1.0))
    fresh.load_state_dict(sd, assign=True)
    plain = torch.nn.Sequential(torch.nn.Linear(16, 8))
    quantize_(plain, PowerExponentConfig(4, 1.0))
    plain.load_state_dict(sd)
    x = torch.randn(3, 16)
    assert torch.equal(fresh(x), plain(x))
    assert sd[next(k for k in sd if k.endswith("max_abs"))].dtype == torch.bfloat16  # untouched


def test_target_projection_keeps_float32_targets_after_to_bf16():
    """.to(torch.bfloat16) rounded the fixed projection for good, where a layer built with
    dtype=torch.bfloat16 keeps it in float32: the two trained toward different targets."""
    from pypaper.local import TargetProjectionLinear

    torch.manual_seed(0)
    moved = TargetProjectionLinear(12, 10, 4).to(torch.bfloat16)
    torch.manual_seed(0)
    built = TargetProjectionLinear(12, 10, 4, dtype=torch.bfloat16)
    assert moved.proj.dtype == torch.float32
    assert torch.equal(moved.proj, built.proj)
    x, y = torch.randn(6, 12, dtype=torch.bfloat16), torch.tensor([0, 1, 2, 3, 0, 1])
    assert torch.equal(moved.local_step(x, y)[0], built.local_step(x, y)[0])
    assert moved.double().proj.dtype == torch.float64  # .double() still converts
