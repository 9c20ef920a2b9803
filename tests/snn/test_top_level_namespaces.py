"""pypaper.nn and pypaper.ops hold every snn layer and op (README, "Families"): IFNode was missing
from pypaper.nn and delayed_linear from pypaper.ops until 2026-12-06."""
import inspect

import torch

import pypaper
import pypaper.nn
import pypaper.ops
from pypaper import snn
from pypaper.snn import delays


def test_every_snn_layer_is_in_pypaper_nn():
    layers = [n for n in snn.__all__
              if inspect.isclass(getattr(snn, n)) and issubclass(getattr(snn, n), torch.nn.Module)]
    assert {"IFNode", "LIFNode", "ParametricLIFNode", "DelayedLinear"} <= set(layers)
    for name in layers:
        assert getattr(pypaper.nn, name, None) is getattr(snn, name), name
        assert name in pypaper.nn.__all__


def test_every_snn_op_is_in_pypaper_ops():
    for name, fn in [("lif_multi_step", snn.lif_multi_step),
                     ("delayed_linear", delays.delayed_linear)]:
        assert getattr(pypaper.ops, name, None) is fn, name
        assert name in pypaper.ops.__all__
