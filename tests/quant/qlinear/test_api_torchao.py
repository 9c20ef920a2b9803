"""quantize_ against torchao's behaviour: casting a quantized model (.to(bf16), .half(),
.double()), Linear layers shared by two parents, nn.Linear subclasses with their own forward, the
hint of a config a layer cannot take, and torchao's API surface (the
Int8DynamicActivationInt8WeightConfig name, quantize_(..., device=), per-module mappings with
None / "_default" / "re:" keys, ModuleFqnToConfig / FqnToConfig).

New names are read as ``pq.<name>`` inside the tests so that each test fails on its own when its
feature is missing.
"""
import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pypaper.quant as pq
from pypaper.quant import (Int4WeightOnlyConfig, Int4WeightOnlyLinear, Int8DynamicConfig,
                           Int8DynamicLinear, Int8WeightOnlyConfig, Int8WeightOnlyLinear,
                           PowerExponentConfig, PowerQuantLinear, QuantConfig, quantize_)


def mlp():
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 96), nn.Tanh(),
                         nn.Linear(96, 10))


CAST_CONFIGS = [Int8DynamicConfig(), Int8WeightOnlyConfig(), Int4WeightOnlyConfig(group_size=32),
                PowerExponentConfig(bits=4), PowerExponentConfig(bits=4, exponent=0.7, learn=True)]
CASTS = {"to_bf16": (lambda m: m.to(torch.bfloat16), torch.bfloat16),
         "half": (lambda m: m.half(), torch.float16),
         "double": (lambda m: m.double(), torch.float64)}


def _float_state(module):
    return {k: v for k, v in module.state_dict().items() if v.is_floating_point()}


# ---- 1. casts of the quantized model ----------------------------------------------------------


@pytest.mark.parametrize("cast", list(CASTS))
@pytest.mark.parametrize("cfg", CAST_CONFIGS, ids=repr)
def test_cast_quantized_model_keeps_working(cfg, cast):
    torch.manual_seed(0)
    m = quantize_(mlp(), cfg)
    ref = copy.deepcopy(m)  # the float32 quantized model
    do_cast, dtype = CASTS[cast]
    assert do_cast(m) is m
    for name, t in _float_state(m).items():
        want = _float_state(ref)[name]
        if dtype == torch.float64 and isinstance(cfg, PowerExponentConfig):
            assert t.dtype == torch.float64  # the power ops take float64: .double() converts
            assert torch.equal(t, want.double())
        else:  # kept in float32, values unchanged (not rounded through the cast)
            assert t.dtype == want.dtype, name
            assert torch.equal(t, want), name
    x = torch.randn(6, 64)
    y = m(x.to(dtype))
    assert y.dtype == dtype and y.shape == (6, 10)
    y_ref = ref(x)
    rel = ((y.float() - y_ref).norm() / y_ref.norm()).item()
    assert rel < (1e-5 if dtype == torch.float64 else 3e-2)
    # the state_dict still loads into a freshly quantized float32 model and gives ref's output
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    fresh = quantize_(mlp(), cfg)
    fresh.load_state_dict(torch.load(buf))
    torch.testing.assert_close(fresh(x), y_ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cfg", CAST_CONFIGS, ids=repr)
def test_cast_with_device_move_still_moves(cfg):
    m = quantize_(mlp(), cfg)
    m.to("meta", torch.bfloat16)
    for name, t in list(m.named_parameters()) + list(m.named_buffers()):
        assert t.device.type == "meta", name
        if t.is_floating_point():
            assert t.dtype == torch.float32, name


def test_cast_keeps_gradients_in_float32():
    m = quantize_(mlp(), Int8WeightOnlyConfig())
    m(torch.randn(3, 64, requires_grad=True)).sum().backward()
    m.half()
    assert m[0].bias.dtype == m[0].bias.grad.dtype == torch.float32
    assert m(torch.randn(3, 64).half()).dtype == torch.float16


# ---- 2. a Linear shared by two parents ---------------------------------------------------------


@pytest.mark.parametrize("cfg", [Int8DynamicConfig(), Int4WeightOnlyConfig(32),
                                 PowerExponentConfig(4, exponent=0.7)], ids=repr)
def test_shared_linear_is_replaced_everywhere_by_one_module(cfg):
    lin = nn.Linear(32, 32)
    m = nn.Sequential(lin, nn.ReLU(), lin)
    quantize_(m, cfg)
    assert m[0] is m[2] and type(m[0]) is not nn.Linear
    x = torch.randn(5, 32)
    q = m[0]
    assert torch.equal(m(x), q(torch.relu(q(x))))


def test_shared_linear_under_two_parents_and_by_mapping():
    lin = nn.Linear(32, 32)
    m = nn.Sequential(nn.Sequential(lin), nn.ReLU(), nn.Sequential(nn.Tanh(), lin))
    quantize_(m, {"2.1": Int8WeightOnlyConfig()})  # named under its second parent only
    assert isinstance(m[0][0], Int8WeightOnlyLinear) and m[0][0] is m[2][1]
    lin = nn.Linear(32, 32)
    m = nn.Sequential(lin, nn.ReLU(), lin)
    with pytest.raises(ValueError, match="shared under the names"):
        quantize_(m, {"0": Int8WeightOnlyConfig(), "2": Int8DynamicConfig()})
    assert m[0] is lin and m[2] is lin  # untouched
    quantize_(m, {"0": Int8DynamicConfig(), "2": Int8DynamicConfig()})  # the same config: fine
    assert isinstance(m[0], Int8DynamicLinear) and m[0] is m[2]


# ---- 3. nn.Linear subclasses that override forward --------------------------------------------


class Doubled(nn.Linear):
    def forward(self, x):
        return 2 * F.linear(x, self.weight, self.bias)


class Plain(nn.Linear):
    pass


def test_forward_overriding_subclass_is_skipped_with_a_warning():
    m = nn.Sequential(Doubled(16, 16), nn.ReLU(), Plain(16, 8))
    x = torch.randn(4, 16)
    y0 = m[0](x)
    with pytest.warns(UserWarning, match=r"'0' \(.*Doubled\).*overrides forward"):
        quantize_(m, Int8WeightOnlyConfig())
    assert type(m[0]) is Doubled and torch.equal(m[0](x), y0)  # custom forward kept
    assert isinstance(m[2], Int8WeightOnlyLinear)  # a subclass keeping nn.Linear.forward is taken
    m = nn.Sequential(Doubled(16, 16), nn.ReLU(), nn.Linear(16, 8))
    with pytest.warns(UserWarning, match="Doubled"):
        quantize_(m, {"_default": Int8DynamicConfig()})
    assert type(m[0]) is Doubled and isinstance(m[2], Int8DynamicLinear)
    with pytest.warns(UserWarning, match="Doubled"):  # nothing else to quantize: the usual error
        with pytest.raises(ValueError, match="no layer of model matched"):
            quantize_(nn.Sequential(Doubled(4, 4)), Int8DynamicConfig())


def test_forward_overriding_subclass_selected_explicitly_raises():
    m = nn.Sequential(Doubled(16, 16), nn.ReLU(), nn.Linear(16, 8))
    with pytest.raises(ValueError, match=r"'0' \(.*Doubled\).*custom forward would be lost"):
        quantize_(m, Int8DynamicConfig(), filter_fn=lambda mod, fqn: True)
    with pytest.raises(ValueError, match="custom forward would be lost"):
        quantize_(m, {"0": Int8DynamicConfig()})
    assert type(m[0]) is Doubled and type(m[2]) is nn.Linear
    with warnings.catch_warnings():  # filter_fn declining it: silently left alone
        warnings.simplefilter("error")
        quantize_(m, Int8DynamicConfig(), filter_fn=lambda mod, fqn: fqn == "2")
    assert type(m[0]) is Doubled and isinstance(m[2], Int8DynamicLinear)


def test_wtacrs_layers_are_left_alone():
    import pypaper.wtacrs as wtacrs

    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    wtacrs.convert(m, keep_ratio=0.3, min_k=4)
    assert isinstance(m[0], wtacrs.WTACRSLinear)
    with pytest.warns(UserWarning, match="WTACRSLinear"):
        with pytest.raises(ValueError, match="no layer of model matched"):
            quantize_(m, Int8DynamicConfig())
    assert isinstance(m[0], wtacrs.WTACRSLinear) and isinstance(m[2], wtacrs.WTACRSLinear)


# ---- 4. a layer that cannot take the config ---------------------------------------------------


def test_rejected_layer_error_says_how_to_exclude_it():
    m = nn.Sequential(nn.Linear(100, 64), nn.ReLU(), nn.Linear(64, 10))
    with pytest.raises(ValueError, match=r"group_size=32 does not divide in_features=100 of layer "
                                         r"'0'; exclude it with filter_fn or a per-module mapping"):
        quantize_(m, Int4WeightOnlyConfig(32))
    assert type(m[0]) is nn.Linear and type(m[2]) is nn.Linear  # untouched
    quantize_(m, Int4WeightOnlyConfig(32), filter_fn=lambda mod, fqn: fqn != "0")
    assert type(m[0]) is nn.Linear and isinstance(m[2], Int4WeightOnlyLinear)
    m = nn.Sequential(nn.Linear(100, 64), nn.ReLU(), nn.Linear(64, 10))
    quantize_(m, {"0": None, "_default": Int4WeightOnlyConfig(32)})
    assert type(m[0]) is nn.Linear and isinstance(m[2], Int4WeightOnlyLinear)


# ---- 5. torchao's API surface -------------------------------------------------------------------


def test_int8_dynamic_activation_int8_weight_config_alias():
    alias = pq.Int8DynamicActivationInt8WeightConfig
    assert alias is Int8DynamicConfig and alias() == Int8DynamicConfig()
    m = quantize_(mlp(), alias())
    assert isinstance(m[0], Int8DynamicLinear)


class _Record(QuantConfig):
    """Records the device of the module it is given and returns it unchanged."""

    def __init__(self):
        self.seen = []

    def apply(self, module, fqn=""):
        self.seen.append((fqn, module.weight.device.type, module.bias.device.type))
        return module

    @property
    def weight_bits(self):
        return 32.0


def test_device_moves_each_selected_module_before_quantizing():
    m = mlp()
    original = m[0]
    rec = _Record()
    quantize_(m, rec, filter_fn=lambda mod, fqn: fqn in ("0", "4"), device="meta")
    assert rec.seen == [("0", "meta", "meta"), ("4", "meta", "meta")]
    assert m[0] is not original and m[0].weight.device.type == "meta"
    assert original.weight.device.type == "cpu"  # a moved copy: the original is not changed
    assert m[2].weight.device.type == "cpu"      # not selected, not moved
    m = quantize_(mlp(), Int8WeightOnlyConfig(), device="cpu")
    assert isinstance(m[0], Int8WeightOnlyLinear) and m(torch.randn(2, 64)).shape == (2, 10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_cuda():
    m = quantize_(mlp(), Int8WeightOnlyConfig(), device="cuda")
    assert m[0].weight_codes.is_cuda and m[0].weight_scale.is_cuda
    assert m(torch.randn(2, 64, device="cuda")).shape == (2, 10)


def test_mapping_none_default_and_regex():
    a, b, c = Int8WeightOnlyConfig(), Int4WeightOnlyConfig(32), Int8DynamicConfig()
    kinds = lambda m: [type(m[i]).__name__ for i in (0, 2, 4)]  # noqa: E731
    # None leaves a named layer in float (was a TypeError)
    m = quantize_(mlp(), {"0": None, "2": a})
    assert kinds(m) == ["Linear", "Int8WeightOnlyLinear", "Linear"]
    # _default: every selected Linear not named otherwise
    m = quantize_(mlp(), {"2": a, "_default": b})
    assert kinds(m) == ["Int4WeightOnlyLinear", "Int8WeightOnlyLinear", "Int4WeightOnlyLinear"]
    # re: patterns, re.fullmatch (a partial match does not count)
    m = quantize_(mlp(), {"re:[04]": c})
    assert kinds(m) == ["Int8DynamicLinear", "Linear", "Int8DynamicLinear"]
    with pytest.raises(ValueError, match="no layer of model matched"):
        quantize_(nn.Sequential(nn.Sequential(nn.Linear(4, 4))), {"re:0": c})  # '0.0' unmatched
    # a name beats a pattern, a pattern beats _default, the first matching pattern wins
    m = quantize_(mlp(), {"re:.*": a, "re:[24]": c, "4": None, "_default": b})
    assert kinds(m) == ["Int8WeightOnlyLinear", "Int8WeightOnlyLinear", "Linear"]
    m = quantize_(mlp(), {"_default": b, "re:[24]": c, "2": a})
    assert kinds(m) == ["Int4WeightOnlyLinear", "Int8WeightOnlyLinear", "Int8DynamicLinear"]
    # None from a pattern or _default also keeps float; an all-float mapping changes nothing
    m = quantize_(mlp(), {"re:[24]": None, "_default": c})
    assert kinds(m) == ["Int8DynamicLinear", "Linear", "Linear"]
    m = quantize_(mlp(), {"_default": None})
    assert kinds(m) == ["Linear", "Linear", "Linear"]
    # unknown plain names still raise; a bad pattern names its key
    with pytest.raises(KeyError, match="not in the model"):
        quantize_(mlp(), {"fc9": a, "_default": b})
    with pytest.raises(KeyError, match="not in the model"):
        quantize_(mlp(), {"fc9": None})
    with pytest.raises(ValueError, match=r"'re:\(' is not a valid regular expression"):
        quantize_(mlp(), {"re:(": a})


def test_mapping_patterns_skip_multihead_out_proj():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
            self.out_proj = nn.Linear(32, 32)

        def forward(self, x):
            return self.out_proj(self.attn(x, x, x)[0])

    b = Block()
    quantize_(b, {"re:.*out_proj": Int8DynamicConfig()})
    assert isinstance(b.out_proj, Int8DynamicLinear)
    assert isinstance(b.attn.out_proj, nn.modules.linear.NonDynamicallyQuantizableLinear)
    assert b(torch.randn(2, 5, 32)).shape == (2, 5, 32)


@pytest.mark.parametrize("wrapper", ["ModuleFqnToConfig", "FqnToConfig"])
def test_fqn_to_config_wrappers(wrapper):
    cls = getattr(pq, wrapper)
    mapping = {"0": Int8WeightOnlyConfig(), "re:[24]": Int4WeightOnlyConfig(32), "4": None}
    wrapped = cls(mapping)
    attr = "module_fqn_to_config" if wrapper == "ModuleFqnToConfig" else "fqn_to_config"
    assert getattr(wrapped, attr) is mapping
    m = quantize_(mlp(), wrapped)
    assert [type(m[i]) for i in (0, 2, 4)] == [Int8WeightOnlyLinear, Int4WeightOnlyLinear,
                                                nn.Linear]
    with pytest.raises(KeyError, match="not in the model"):
        quantize_(mlp(), cls({"fc9": Int8WeightOnlyConfig()}))
    with pytest.raises(ValueError, match="no layer of model matched"):
        quantize_(mlp(), cls())  # empty


def test_power_config_in_mapping_and_shared_cast():
    """PowerQuantLinear through the new mapping rules, shared, then cast."""
    lin = nn.Linear(16, 16)
    m = nn.Sequential(lin, nn.ReLU(), lin, nn.ReLU(), nn.Linear(16, 4))
    quantize_(m, {"_default": PowerExponentConfig(4, exponent=0.7), "4": None})
    assert isinstance(m[0], PowerQuantLinear) and m[0] is m[2] and type(m[4]) is nn.Linear
    x = torch.randn(3, 16)
    y = m(x)
    m.half()
    assert m[0].max_abs.dtype == torch.float32
    torch.testing.assert_close(m(x.half()).float(), y, rtol=2e-2, atol=2e-2)
