"""Whole-model persistence and copies across the families: torch.save / torch.load (pickle),
copy.deepcopy, state_dict round trips and torch.optim.swa_utils.AveragedModel.

What a copy or a loaded model must not carry over from the original: caches bound to a device
(the few-bit derivative tables), checks recorded against objects the copy does not share (the
optimizer LocalSequential checked), and buffers AveragedModel cannot average (BitLinear's start).
"""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import pypaper.local as L
import pypaper.quant as Q
from pypaper.quant import fewbit
from pypaper.quant.fewbit import tables


def _roundtrip(obj, **load_kw):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False, **load_kw)


# ---- few-bit activations: the per-device table cache ----------------------------------------

def _fewbit_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), fewbit.GELU(bits=2), nn.Linear(8, 8), fewbit.SiLU(bits=3),
                         nn.Linear(8, 3))


def test_fewbit_model_loaded_to_meta_then_materialised_computes_the_same():
    """torch.load(map_location="meta") + to_empty(device="cpu") + load_state_dict: the usual
    way to build a large model without allocating it twice. The pickled model carried the
    tables' (dtype, device) cache, whose CPU entry became meta tensors under the CPU key: the
    op then dispatched to its fake kernel and returned uninitialised outputs and gradients,
    silently. (The same mismatch, save on cuda:0 + map_location="cpu" + .cuda(), failed with
    'borders must be on cuda:0'.)"""
    model = _fewbit_model()
    x = torch.randn(5, 8)
    xa = x.clone().requires_grad_()
    model(xa).sum().backward()  # fills the cache on the CPU
    sd = model.state_dict()

    meta = _roundtrip(model, map_location="meta")
    for act in (meta[1], meta[3]):
        assert act.approximation._tensors == {}  # a cache, not state
    meta.to_empty(device="cpu")
    meta.load_state_dict(sd)

    xb = x.clone().requires_grad_()
    y = meta(xb)
    y.sum().backward()
    xa.grad = None
    y_ref = model(xa)
    y_ref.sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(xb.grad, xa.grad, rtol=0, atol=0)


def test_fewbit_copy_has_its_own_table_and_the_same_backward():
    model = _fewbit_model()
    x = torch.randn(4, 8, requires_grad=True)
    model(x).sum().backward()
    for twin in (copy.deepcopy(model), _roundtrip(model)):
        assert twin[1].approximation is not model[1].approximation
        assert twin[1].approximation.borders == model[1].approximation.borders
        assert twin[1].approximation.levels == model[1].approximation.levels
        x2 = x.detach().clone().requires_grad_()
        twin(x2).sum().backward()
        gx = x.grad.clone()
        x.grad = None
        model(x).sum().backward()
        torch.testing.assert_close(x2.grad, x.grad, rtol=0, atol=0)
        torch.testing.assert_close(gx, x.grad, rtol=0, atol=0)


def test_fewbit_ops_refuse_tables_on_another_device():
    """The fake kernel (the Meta dispatch of the op) checked shapes and dtypes but not devices:
    a CPU x with meta borders / levels ran it, and uninitialised memory came back as y."""
    approx = tables.approximation("gelu", 2)
    borders, levels = approx.tensors(torch.float32, "cpu")
    x = torch.randn(7)
    op = torch.ops.pypaper.fewbit_forward
    with pytest.raises(RuntimeError, match="borders must be on cpu, got meta"):
        op(x, "gelu", [], borders.to("meta"), levels, 2, False)
    with pytest.raises(RuntimeError, match="levels must be on cpu, got meta"):
        op(x, "gelu", [], borders, levels.to("meta"), 2, False)
    _, codes = op(x, "gelu", [], borders, levels, 2, False)
    back = torch.ops.pypaper.fewbit_backward
    with pytest.raises(RuntimeError, match="levels must be on cpu, got meta"):
        back(torch.ones(7), codes, levels.to("meta"), 2)
    with pytest.raises(RuntimeError, match="codes must be on cpu, got meta"):
        back(torch.ones(7), codes.to("meta"), levels, 2)
    # all on meta (shape inference) still works
    y, c = op(x.to("meta"), "gelu", [], borders.to("meta"), levels.to("meta"), 2, False)
    assert y.device.type == "meta" and c.shape == codes.shape


# ---- LocalSequential: the optimizer check is not inherited by copies -------------------------

def _local_net():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    return L.LocalSequential([model[0:2], model[2:4], model[4:]], "dgl", num_classes=3,
                             example_input=torch.randn(2, 8))


@pytest.mark.parametrize("how", ["deepcopy", "torch.load", "AveragedModel"])
def test_local_sequential_copy_checks_its_optimizer_again(how):
    """The net records the optimizer it checked (by id). A copy has Parameters of its own; with
    the record carried over, copy.train_step(x, y, original_optimizer) skipped the check and
    trained nothing of the copy (every backward ran, its .grad grew, no step touched it)."""
    net = _local_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x, y = torch.randn(6, 8), torch.randint(0, 3, (6,))
    net.train_step(x, y, opt)
    twin = {"deepcopy": copy.deepcopy, "torch.load": _roundtrip,
            "AveragedModel": lambda n: AveragedModel(n).module}[how](net)
    with pytest.raises(ValueError, match="optimizer does not hold"):
        twin.train_step(x, y, opt)
    # with its own optimizer the copy trains, and the original is untouched
    before = {k: v.clone() for k, v in net.state_dict().items()}
    own = torch.optim.SGD(twin.parameters(), lr=0.1)
    start = {k: v.clone() for k, v in twin.state_dict().items()}
    twin.train_step(x, y, own)
    assert any(not torch.equal(start[k], v) for k, v in twin.state_dict().items())
    for k, v in net.state_dict().items():
        assert torch.equal(before[k], v), k
    net.train_step(x, y, opt)  # the original's record still holds for the original


# ---- BitLinear under AveragedModel -----------------------------------------------------------

def _bit_model():
    torch.manual_seed(0)
    return nn.Sequential(Q.BitLinear(16, 8, bits=4), nn.BatchNorm1d(8), nn.ReLU(),
                         Q.BitLinear(8, 3, bits=2))


@pytest.mark.parametrize("ema", [False, True])
def test_bitlinear_model_under_averaged_model_with_buffers(ema):
    """AveragedModel(model, use_buffers=True) (SWA / EMA that averages the BatchNorm statistics
    too) subtracts every buffer: BitLinear's bool ``initial_bits`` made update_parameters raise
    'Subtraction ... with two bool tensors is not supported'."""
    model = _bit_model()
    kw = dict(multi_avg_fn=get_ema_multi_avg_fn(0.9)) if ema else {}
    avg = AveragedModel(model, use_buffers=True, **kw)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(12, 16)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        avg.update_parameters(model)
    for i in (0, 3):
        assert torch.equal(avg.module[i].initial_bits, model[i].initial_bits)
        assert set(avg.module[i].initial_bits.unique().tolist()) <= {0, 1}
    avg.eval()
    with torch.no_grad():
        assert torch.isfinite(avg(x)).all()
    report = Q.bits_report(avg.module, lambda m: 1.0)
    assert all(0.0 <= f <= 1.0 for f in report["flipped_fraction"])


def test_bitlinear_loads_a_bool_initial_bits_checkpoint():
    """Checkpoints written while the buffer was bool load into the 0/1 uint8 buffer, strictly,
    and report the same flipped fractions."""
    model = _bit_model()
    with torch.no_grad():
        model[0].bit_latents.neg_()  # every bit flipped from its start
    sd = model.state_dict()
    old = {k: (v.bool() if k.endswith("initial_bits") else v) for k, v in sd.items()}
    torch.manual_seed(1)
    fresh = _bit_model()
    fresh.load_state_dict(old, strict=True)
    for i in (0, 3):
        assert torch.equal(fresh[i].initial_bits, sd[f"{i}.initial_bits"])
    got = Q.bits_report(fresh, lambda m: 1.0)["flipped_fraction"]
    want = Q.bits_report(model, lambda m: 1.0)["flipped_fraction"]
    assert got == want and got[0] > 0.5


# ---- quantize_ on the meta device, then a quantized checkpoint with assign=True --------------

def _float_model():
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))


@pytest.mark.parametrize("cfg", [Q.PowerExponentConfig(4, 0.8), Q.PowerExponentConfig(4),
                                 Q.PowerExponentConfig(3, learn=True), Q.Int8DynamicConfig(),
                                 Q.Int4WeightOnlyConfig(group_size=32)],
                         ids=["power", "power-search", "power-learn", "int8-dyn", "int4"])
def test_quantize_on_meta_then_load_quantized_checkpoint_with_assign(cfg):
    """Build the quantized skeleton without memory (``with torch.device("meta")``), then
    load_state_dict(checkpoint, assign=True): the int8 / int4 layers did, PowerExponentConfig
    raised 'Tensor.item() cannot be called on meta tensors' (its range check and exponent
    search read values), and so did repr() of such a layer."""
    torch.manual_seed(0)
    real = Q.quantize_(_float_model(), cfg)
    sd = _roundtrip(real.state_dict())
    with torch.device("meta"):
        skeleton = Q.quantize_(_float_model(), cfg)
    repr(skeleton)
    skeleton.load_state_dict(sd, strict=True, assign=True)
    assert not any(t.is_meta for t in skeleton.state_dict().values())
    x = torch.randn(3, 64)
    torch.testing.assert_close(skeleton(x), real(x), rtol=0, atol=0)
    assert repr(skeleton) == repr(real)


# ---- DelayedLinear: sigma's tensor stays on the CPU through torch.load ------------------------

def test_delayed_linear_loaded_with_map_location_keeps_sigma_on_the_cpu(monkeypatch):
    """sigma is also kept as a 0-dim CPU tensor that the C++ op reads on the host (a plain
    attribute, which .to() leaves alone). torch.load(map_location=...) moved it with the
    parameters: a layer loaded with map_location="cuda" and then moved with .cpu() handed the
    C++ op a CUDA sigma ("sigma must be a CPU tensor, got cuda:0"), and one loaded with
    map_location="meta" held a meta sigma until something reset it. Here (no GPU) the invariant
    itself is checked after a meta load, then the materialised layer's outputs."""
    from pypaper.snn import DelayedLinear

    # the C++ op (which reads the tensor) on every CPU: AMD CPUs run large sigmas as a dense
    # convolution from the float, where the stale tensor went unseen (torch.compile reads it)
    monkeypatch.setenv("PYPAPER_DELAY_PATH", "gather")
    torch.manual_seed(0)
    layer = DelayedLinear(8, 6, max_delay=5)
    layer.set_sigma(1.25)
    x = torch.randn(6, 2, 8)
    layer(x).sum().backward()

    meta = _roundtrip(layer, map_location="meta")
    assert meta._sigma_t.device.type == "cpu" and float(meta._sigma_t) == 1.25
    meta.to_empty(device="cpu")
    meta.reset_parameters()
    assert torch.isfinite(meta(x)).all()  # re-initialised, not loaded: any finite output
    meta.load_state_dict(layer.state_dict())
    torch.testing.assert_close(meta(x), layer(x), rtol=0, atol=0)

    twin = _roundtrip(layer)
    assert twin._sigma_t is not layer._sigma_t and twin.sigma == 1.25
    twin.sigma = 0.75  # the twin's schedule does not reach the original
    assert float(layer._sigma_t) == 1.25
    torch.testing.assert_close(_roundtrip(layer)(x), layer(x), rtol=0, atol=0)
