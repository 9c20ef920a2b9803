"""Review (b) of the s36 quant changes: regressions those changes introduced."""
import warnings

import pytest
import torch
from torch import nn

from pypaper.quant.bitlinear import BitLinear, bits_report


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(BitLinear(4, 3, bits=4), nn.Linear(3, 2))


def test_partial_nonstrict_load_keeps_initial_bits_of_layers_not_loaded():
    # load_state_dict(strict=False) of a state_dict that does not hold the BitLinear at all (a
    # backbone / head loaded on its own) replaces none of its bits: its random start must stay,
    # not be wiped to "unknown" as if an old checkpoint lacking initial_bits had been loaded.
    m = _model()
    start = m[0].initial_bits.clone()
    head_only = {k: v for k, v in m.state_dict().items() if k.startswith("1.")}
    res = m.load_state_dict(head_only, strict=False)
    assert torch.equal(m[0].initial_bits, start)
    # torch still reports every key of the layer as missing (nothing hidden)
    assert set(res.missing_keys) >= {"0.bit_latents", "0.sign_latent", "0.initial_bits"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "loaded without their initial bits" warning
        rep = bits_report(m, lambda model: 1.0)
    assert all(f == f for f in rep["flipped_fraction"])  # no NaN: the start is known
    assert rep["flipped_fraction"] == [0.0] * 4


def test_partial_strict_load_still_reports_initial_bits_missing():
    m = _model()
    head_only = {k: v for k, v in m.state_dict().items() if k.startswith("1.")}
    with pytest.raises(RuntimeError, match=r"0\.initial_bits"):
        m.load_state_dict(head_only)


def test_legacy_checkpoint_still_marks_start_unknown():
    # control: the latents are loaded without their start (a checkpoint from before
    # initial_bits was persistent): the start is unknown, strict load accepted
    src = _model(seed=1)
    sd = {k: v for k, v in src.state_dict().items() if not k.endswith("initial_bits")}
    m = _model(seed=2)
    m.load_state_dict(sd)
    assert m[0].initial_bits.numel() == 0


def test_nupes_freeze_keeps_a_layer_under_two_names_one_frozen_module():
    # quantize_ gives an nn.Linear under two names one quantized module; freeze must keep that
    # tie: named_children() lists the module once per parent, so the second name stayed
    # learnable (float latent weight), and across two parents the tie became two copies.
    from pypaper.quant.nupes import PowerQuantLinear, freeze

    torch.manual_seed(0)
    q = PowerQuantLinear.from_linear(nn.Linear(4, 4), 4, 1.0, learnable=True)
    calls = []
    q.register_forward_hook(lambda mod, i, o: calls.append(1))
    same_parent = nn.Sequential(q, nn.ReLU(), q)
    freeze(same_parent)
    assert same_parent[0] is same_parent[2]
    assert not same_parent[2].learnable
    x = torch.randn(3, 4)
    same_parent(x)
    assert len(calls) == 2  # the hook fires once per call, on the one frozen module

    two_parents = nn.ModuleDict({"a": nn.Sequential(q), "b": nn.Sequential(q)})
    freeze(two_parents)
    assert two_parents.a[0] is two_parents.b[0]
    assert not two_parents.a[0].learnable
