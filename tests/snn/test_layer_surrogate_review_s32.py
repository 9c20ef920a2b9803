"""Review s32 of pypaper.snn.layer / surrogate / functional as drop-ins for SpikingJelly 2.0's
``activation_based.layer`` / ``.surrogate`` / ``.functional``: each test is a scenario a user
who swapped the import hit, checked against SpikingJelly itself."""
from __future__ import annotations

import inspect

import pytest
import torch

from pypaper.snn import layer

sj_layer = pytest.importorskip("spikingjelly.activation_based.layer")

_LAYERS = [("Conv2d", (1, 2, 3)), ("Linear", (4, 3)), ("BatchNorm2d", (2,)),
           ("MaxPool2d", (2,)), ("Flatten", ()), ("Upsample", (None, 2.0))]


@pytest.mark.parametrize("name,args", _LAYERS)
def test_an_instance_has_its_call_signature_not_its_constructors(name, args):
    """inspect.signature(cls) is the constructor's (torch's arguments + step_mode, for config
    tools); an instance is called as m(x), and inspect.signature(m) must describe that call.
    The class-level ``__signature__`` was inherited by instances (inspect reads
    obj.__signature__ first), so binding the call's arguments failed: e.g. torch's
    dynamo_graph_capture_for_export(conv)(x) raised 'Missing argument out_channels', where it
    runs for SpikingJelly's conv."""
    ours, theirs = getattr(layer, name)(*args), getattr(sj_layer, name)(*args)
    assert inspect.signature(ours) == inspect.signature(theirs)  # (*args, **kwargs): __call__
    inspect.signature(ours).bind(torch.zeros(1))  # raised TypeError: missing in_channels ...
    # the class keeps the constructor's signature
    assert "step_mode" in inspect.signature(type(ours)).parameters


def test_a_subclass_of_a_users_subclass_keeps_the_users_signature():
    """class MyConv(layer.Conv2d) with an __init__(c, step_mode) of its own, and a subclass of
    it that adds methods only: both are built as Sub(c). The layers set torch's signature on
    every subclass without an __init__ in its own __dict__, so Sub claimed Conv2d's
    (in_channels, out_channels, kernel_size, ...), where SpikingJelly's Sub shows (c, step_mode)
    (inspect follows the nearest __init__)."""
    sigs = []
    for lib in (sj_layer, layer):
        class MyConv(lib.Conv2d):
            def __init__(self, c, step_mode="s"):
                super().__init__(c, c, 3, step_mode=step_mode)

        class Sub(MyConv):
            pass

        sigs.append(inspect.signature(Sub))
        Sub(2)  # built as its signature says
    assert list(sigs[1].parameters) == list(sigs[0].parameters) == ["c", "step_mode"]
