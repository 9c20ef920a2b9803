"""Module hooks follow the layers pypaper's quantizers swap in (quantize_, nupes.freeze,
fewbit.convert / revert), as they do with torchao's in-place weight swap and with pypaper's
snn / wtacrs converters (pypaper/_module_swap.py). Before, a forward hook on an nn.Linear or an
nn.GELU (activation statistics, a profiler, a monitor) silently stopped firing after the swap."""
import copy

import pytest
import torch
from torch import nn

from pypaper.quant import (Int4WeightOnlyConfig, Int8DynamicConfig, Int8WeightOnlyConfig,
                           PowerExponentConfig, calibrate, freeze, quantize_)
from pypaper.quant import fewbit as fb


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 8))


@pytest.mark.parametrize("config", [Int8DynamicConfig(), Int8WeightOnlyConfig(),
                                    Int4WeightOnlyConfig(group_size=32),
                                    PowerExponentConfig(bits=4)], ids=type)
def test_forward_hooks_of_a_linear_fire_after_quantize(config):
    model = _model()
    seen = []
    pre = model[0].register_forward_pre_hook(lambda m, a: seen.append(("pre", type(m).__name__)))
    post = model[2].register_forward_hook(lambda m, a, y: seen.append(("post", tuple(y.shape))))
    quantize_(model, config)
    model(torch.randn(4, 32))
    assert seen == [("pre", type(model[0]).__name__), ("post", (4, 8))]
    pre.remove()
    post.remove()  # the handles given for the float layers remove the hooks from the new ones
    seen.clear()
    model(torch.randn(4, 32))
    assert seen == []


def test_hooks_follow_nupes_freeze():
    model = _model()
    seen = []
    model[0].register_forward_hook(lambda m, a, y: seen.append(type(m).__name__))
    quantize_(model, PowerExponentConfig(bits=4, learn=True))
    calibrate(model, [torch.randn(8, 32)], steps=2)
    seen.clear()
    freeze(model)
    model(torch.randn(2, 32))
    assert seen == [type(model[0]).__name__]


def test_activation_hooks_follow_fewbit_convert_and_revert():
    model = _model()
    stats = []
    handle = model[1].register_forward_hook(lambda m, a, y: stats.append(float(y.mean())))
    ref = model(torch.randn(3, 32))
    fb.convert(model, bits=2)
    assert type(model[1]) is not nn.GELU
    x = torch.randn(3, 32)
    model(x)
    assert len(stats) == 2  # fired on the few-bit twin
    fb.convert(model, bits=3)  # converted again: rebuilt with new bits, hooks kept
    model(x)
    assert len(stats) == 3
    fb.revert(model)
    assert type(model[1]) is nn.GELU
    model(x)
    assert len(stats) == 4  # and on the original after revert
    handle.remove()
    model(x)
    assert len(stats) == 4
    del ref


def test_numpy_integer_bits_are_taken():
    """bits from a numpy sweep or a config file (np.int64(2)) was refused as 'not an int'."""
    np = pytest.importorskip("numpy")
    model = _model()
    fb.convert(model, bits=np.int64(3))
    assert model[1].bits == 3 and type(model[1].bits) is int
    assert fb.GELU(bits=np.int32(2)).bits == 2
    with pytest.raises(ValueError, match="bits"):
        fb.GELU(bits=np.bool_(True))
