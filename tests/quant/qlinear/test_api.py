"""pypaper.quant.quantize_ and the quantized modules: swapping, outputs against the dequantized
float model, dtypes, state_dict save / load, torch.compile(fullgraph=True), backends, errors.

Tolerances (module output vs the same model with the dequantized weights W_hat in fp32):
  weight-only: helpers.sum_bound (fp32 sums in another order); int4 plus helpers.split_act_bound
      (the SIMD kernels round the activations to 16-bit fixed point per group), int8 plus
      helpers.split8_act_bound (the VNNI kernel, per 64 inputs);
  int8 dynamic: exact against the reference op (same integers, same epilogue).
  16-bit inputs: the fp32 result cast to the input dtype, so compared after the same cast.
"""
import io

import pytest
import torch
from torch import nn

import pypaper
from pypaper.quant import (Int4WeightOnlyConfig, Int4WeightOnlyLinear, Int8DynamicConfig,
                           Int8DynamicLinear, Int8WeightOnlyConfig, Int8WeightOnlyLinear,
                           QuantConfig, model_bytes, quantize_)
from pypaper.quant import qlinear_reference as ref

from .helpers import split8_act_bound, split_act_bound, sum_bound

CONFIGS = [Int8DynamicConfig(), Int8DynamicConfig(act_bits=7), Int8WeightOnlyConfig(),
           Int8WeightOnlyConfig(group_size=32), Int4WeightOnlyConfig(group_size=32),
           Int4WeightOnlyConfig(group_size=64)]
CLASSES = {Int8DynamicConfig: Int8DynamicLinear, Int8WeightOnlyConfig: Int8WeightOnlyLinear,
           Int4WeightOnlyConfig: Int4WeightOnlyLinear}


def mlp(bias=True):
    return nn.Sequential(nn.Linear(64, 128, bias=bias), nn.ReLU(), nn.Linear(128, 128, bias=bias),
                         nn.Tanh(), nn.Linear(128, 10, bias=bias))


@pytest.mark.parametrize("cfg", CONFIGS, ids=repr)
@pytest.mark.parametrize("bias", [True, False])
def test_quantize_swaps_and_matches_dequantized(cfg, bias):
    m = mlp(bias)
    quantize_(m, cfg)
    layers = [m[0], m[2], m[4]]
    assert all(type(layer) is CLASSES[type(cfg)] for layer in layers)
    x = torch.randn(2, 3, 64)  # leading dims
    y = m(x)
    assert y.shape == (2, 3, 10)
    # layer by layer against the dequantized float layer
    h = x.reshape(-1, 64)
    for layer in layers:
        w_hat = layer.dequantized_weight()
        out = layer(h)
        if isinstance(layer, Int8DynamicLinear):
            want = ref.int8_dynamic_linear(h, layer.w_packed, layer.w_scale, layer.w_colsum,
                                           layer.bias, layer.act_qmax)
            assert torch.equal(out, want)
        else:
            want = h @ w_hat.t() + (layer.bias if layer.bias is not None else 0)
            bound = sum_bound(h, w_hat) + 1e-6
            if isinstance(layer, Int4WeightOnlyLinear):
                bound = bound + split_act_bound(h, w_hat, layer.group_size)
            else:  # int8 weight-only: the VNNI split kernel rounds x per 64 inputs
                bound = bound + split8_act_bound(h, w_hat)
            assert torch.all((out - want).abs() <= bound)
        h = torch.tanh(out)


@pytest.mark.parametrize("cfg", CONFIGS, ids=repr)
def test_close_to_float(cfg):
    torch.manual_seed(1)
    m = mlp()
    x = torch.randn(16, 64)
    y0 = m(x)
    quantize_(m, cfg)
    rel = ((m(x) - y0).norm() / y0.norm()).item()
    limit = 0.15 if isinstance(cfg, Int4WeightOnlyConfig) else 0.02  # uniform init: int4 ~ 1/15 of the range
    assert rel < limit


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cfg", [Int8DynamicConfig(), Int8WeightOnlyConfig(),
                                 Int4WeightOnlyConfig(32)], ids=repr)
def test_input_dtypes(cfg, dtype):
    layer = quantize_(mlp(), cfg)[0]
    x = torch.randn(5, 64).to(dtype)
    y = layer(x)
    assert y.dtype == dtype
    torch.testing.assert_close(y, layer(x.float()).to(dtype), rtol=0, atol=0)


@pytest.mark.parametrize("cfg", CONFIGS, ids=repr)
def test_state_dict_roundtrip(cfg):
    m = quantize_(mlp(), cfg)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    fresh = quantize_(mlp(), cfg)  # other random weights, same shapes
    x = torch.randn(4, 64)
    assert not torch.equal(fresh(x), m(x))
    fresh.load_state_dict(torch.load(buf))
    assert torch.equal(fresh(x), m(x))
    # also into modules built from shapes alone
    layer = m[2]
    blank = type(layer)(128, 128, **({"act_bits": layer.act_bits} if hasattr(layer, "act_bits")
                                    else {"group_size": layer.group_size}))
    blank.load_state_dict(layer.state_dict())
    h = torch.randn(3, 128)
    assert torch.equal(blank(h), layer(h))


@pytest.mark.parametrize("cfg", [Int8DynamicConfig(), Int8WeightOnlyConfig(32),
                                 Int4WeightOnlyConfig(32)], ids=repr)
def test_torch_compile_fullgraph(cfg):
    torch._dynamo.reset()
    m = quantize_(mlp(), cfg)
    x = torch.randn(7, 64)
    c = torch.compile(m, fullgraph=True)
    torch.testing.assert_close(c(x), m(x), rtol=1e-5, atol=1e-5)
    xg = x.clone().requires_grad_()
    c(xg).sum().backward()
    xr = x.clone().requires_grad_()
    m(xr).sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cfg", [Int8DynamicConfig(), Int8WeightOnlyConfig(32),
                                 Int4WeightOnlyConfig(32)], ids=repr)
def test_reference_backend_matches(cfg):
    m = quantize_(mlp(), cfg)
    x = torch.randn(6, 64)
    y = m(x)
    with pypaper.use_backend("reference"):
        y_ref = m(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)


def test_filter_fn_and_mapping():
    m = mlp()
    quantize_(m, Int8DynamicConfig(), filter_fn=lambda mod, fqn: fqn != "4")
    assert isinstance(m[0], Int8DynamicLinear) and type(m[4]) is nn.Linear
    m = mlp()
    mapping = {"0": Int8WeightOnlyConfig(), "2": Int4WeightOnlyConfig(32), "4": Int8DynamicConfig()}
    quantize_(m, mapping)
    assert [type(m[i]) for i in (0, 2, 4)] == [Int8WeightOnlyLinear, Int4WeightOnlyLinear,
                                                Int8DynamicLinear]
    nested = nn.Sequential(nn.Sequential(nn.Linear(8, 8)), nn.Linear(8, 4))
    quantize_(nested, {"0.0": Int8DynamicConfig()})
    assert isinstance(nested[0][0], Int8DynamicLinear) and type(nested[1]) is nn.Linear


def test_multihead_attention_out_proj_is_kept():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
            self.ff = nn.Linear(32, 32)

        def forward(self, x):
            return self.ff(self.attn(x, x, x)[0])

    b = Block()
    quantize_(b, Int8DynamicConfig())
    assert isinstance(b.ff, Int8DynamicLinear)
    assert isinstance(b.attn.out_proj, nn.modules.linear.NonDynamicallyQuantizableLinear)
    assert b(torch.randn(2, 5, 32)).shape == (2, 5, 32)


def test_model_bytes_shrink():
    m = nn.Sequential(nn.Linear(256, 256, bias=False), nn.Linear(256, 256, bias=False))
    fp32 = model_bytes(m)
    sizes = {}
    for cfg in (Int8DynamicConfig(), Int8WeightOnlyConfig(), Int4WeightOnlyConfig(128)):
        sizes[type(cfg).__name__] = model_bytes(quantize_(
            nn.Sequential(nn.Linear(256, 256, bias=False), nn.Linear(256, 256, bias=False)), cfg))
    assert sizes["Int8DynamicConfig"] < fp32 / 3.8
    assert sizes["Int8WeightOnlyConfig"] < fp32 / 3.8
    assert sizes["Int4WeightOnlyConfig"] < fp32 / 7.0
    assert Int4WeightOnlyConfig(128).weight_bits == 4.5
    assert Int8WeightOnlyConfig(32).weight_bits == 9.0


# ---- bad inputs -------------------------------------------------------------------------------


def test_no_matching_layer_raises():
    with pytest.raises(ValueError, match="no layer of model matched"):
        quantize_(nn.Sequential(nn.ReLU(), nn.Conv2d(1, 1, 3)), Int8DynamicConfig())
    with pytest.raises(ValueError, match="no layer of model matched"):
        quantize_(mlp(), Int8DynamicConfig(), filter_fn=lambda m, fqn: False)


def test_group_size_errors_name_the_argument():
    m = nn.Sequential(nn.Linear(784, 10))
    with pytest.raises(ValueError, match=r"group_size=128 does not divide in_features=784 of layer '0'"):
        quantize_(m, Int4WeightOnlyConfig(128))
    assert type(m[0]) is nn.Linear  # untouched
    with pytest.raises(ValueError, match="group_size=64 does not divide in_features=784"):
        quantize_(m, Int8WeightOnlyConfig(64))
    with pytest.raises(ValueError, match=r"group_size must be one of \(32, 64, 128, 256\)"):
        Int4WeightOnlyConfig(48)
    with pytest.raises(ValueError, match="group_size must be one of"):
        Int4WeightOnlyConfig(None)
    with pytest.raises(ValueError, match="group_size must be positive"):
        Int8WeightOnlyConfig(0)
    with pytest.raises(ValueError, match="act_bits must be 8 or 7"):
        Int8DynamicConfig(act_bits=4)


def test_config_and_mapping_errors():
    with pytest.raises(TypeError, match="config must be a QuantConfig"):
        quantize_(mlp(), "int8")
    with pytest.raises(KeyError, match="not in the model"):
        quantize_(mlp(), {"fc9": Int8DynamicConfig()})
    with pytest.raises(TypeError, match="'1', a ReLU, not an nn.Linear"):
        quantize_(mlp(), {"1": Int8DynamicConfig()})
    with pytest.raises(TypeError, match="to QuantConfig"):
        quantize_(mlp(), {"0": 8})
    with pytest.raises(ValueError, match="model is itself an nn.Linear"):
        quantize_(nn.Linear(4, 4), Int8DynamicConfig())
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        quantize_(object(), Int8DynamicConfig())


def test_module_input_errors():
    layer = Int8DynamicLinear.from_float(nn.Linear(16, 4))
    with pytest.raises(ValueError, match="in_features=16"):
        layer(torch.randn(3, 15))
    with pytest.raises(TypeError, match="floating tensor"):
        layer(torch.ones(3, 16, dtype=torch.int64))


def test_op_argument_errors():
    from pypaper.quant import qlinear_ops as ops

    wp, sw, cs = ops.prepare_int8_dynamic(torch.randn(8, 16))
    x = torch.randn(2, 16)
    with pytest.raises(ValueError, match="act_qmax must be 127"):
        ops.int8_dynamic_linear(x, wp, sw, cs, None, 100)
    with pytest.raises(TypeError, match="x must be float32"):
        ops.int8_dynamic_linear(x.double(), wp, sw, cs)
    with pytest.raises(ValueError, match="x must be 2-D"):
        ops.int8_dynamic_linear(torch.randn(16), wp, sw, cs)
    with pytest.raises(ValueError, match=r"bias must be float32 \[8\]"):
        ops.int8_dynamic_linear(x, wp, sw, cs, torch.zeros(7))
    with pytest.raises(RuntimeError, match="does not hold N=8"):
        torch.ops.pypaper.int8_dynamic_linear(torch.randn(2, 20), wp, sw, cs, None, 127)
    with pytest.raises(RuntimeError, match="act_qmax must be 127"):
        torch.ops.pypaper.int8_dynamic_linear(x, wp, sw, cs, None, 5)
    wq, s = ops.prepare_int8_weight_only(torch.randn(8, 16))
    with pytest.raises(ValueError, match="in_features=16"):
        ops.int8_weight_only_linear(torch.randn(2, 15), wq, s)
    with pytest.raises(RuntimeError, match="w must be int8"):
        torch.ops.pypaper.int8_weight_only_linear(x, wq.to(torch.uint8), s, None)
    w4, s4, z4 = ops.prepare_int4_weight_only(torch.randn(8, 64), 32)
    with pytest.raises(RuntimeError, match="zero must be float32"):
        torch.ops.pypaper.int4_weight_only_linear(torch.randn(2, 64), w4, s4, z4[:, :1], None)
    with pytest.raises(RuntimeError, match="PYPAPER_QLINEAR_ISA must be"):
        from .helpers import isa

        with isa("sse9"):
            torch.ops.pypaper.int8_weight_only_linear(x, wq, s, None)


def test_custom_config_plugs_in():
    """The QuantConfig protocol: any subclass with apply() works with quantize_."""
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class Half(QuantConfig):
        def apply(self, module, fqn=""):
            return Int8WeightOnlyLinear.from_float(module) if fqn == "0" else module

        @property
        def weight_bits(self):
            return 8.0

    m = quantize_(mlp(), Half())
    assert isinstance(m[0], Int8WeightOnlyLinear) and type(m[2]) is nn.Linear


@pytest.mark.parametrize("cfg", CONFIGS, ids=repr)
def test_lean_cpu_path_equals_the_general_path(cfg, monkeypatch):
    """The modules' lean CPU path (2-D float32 x on the default backend: the C++ op called from
    the module, below the autograd layer when nothing needs a gradient) gives the general path's
    output to the bit, and gradients where they are needed."""
    m = quantize_(mlp(), cfg)
    layer = m[0]
    x = torch.randn(5, 64)
    calls = []
    real = layer._fast_cpu
    monkeypatch.setattr(layer, "_fast_cpu", lambda t: calls.append(1) or real(t))
    with torch.no_grad():
        y_fast = layer(x)
        y_general = layer._linear(x)
    assert calls and torch.equal(y_fast, y_general)
    assert layer._fast_cpu(x) is not None  # the lean path served it
    with torch.no_grad():  # any leading shape (decoding: [batch, 1, features])
        y3 = layer._fast_cpu(x.reshape(5, 1, 64))
    assert y3.shape == (5, 1, layer.out_features) and torch.equal(y3.reshape(5, -1), y_general)
    assert layer._fast_cpu(x.double()) is None and layer._fast_cpu(x[:, :32]) is None
    with pypaper.use_backend("reference"):
        assert layer._fast_cpu(x) is None
    monkeypatch.setenv("PYPAPER_BACKEND", "reference")
    assert layer._fast_cpu(x) is None
    monkeypatch.delenv("PYPAPER_BACKEND")
    # with grad enabled: the autograd layer stays (x and the bias get their gradients)
    xg = x.clone().requires_grad_()
    layer(xg).square().sum().backward()
    assert layer.bias.grad is not None
    xr = x.clone().requires_grad_()
    layer._linear(xr).square().sum().backward()
    assert xg.grad is not None and torch.allclose(xg.grad, xr.grad, rtol=1e-5, atol=1e-5)
