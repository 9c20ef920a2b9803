"""The README's snn claims that a newcomer runs or reads as facts (documentation review, s35).

- The `### pypaper.snn` code block is what a user pastes first; until this review it named
  `x_seq`, `model`, `y`, `loss_fn`, `opt` and `block` without defining them (NameError on its
  seventh line). It is run here exactly as the README holds it.
- The torch.func section's per-sample-gradient snippet, run the same way.
- `functional.checkpoint`: "Four Conv-BN-LIF blocks at T = 8, batch 8, 32 channels, 32x32,
  checkpointed per block: 32 MiB saved for backward instead of 96" (no test held that number).
- The snn benchmark header names the last measured Xeon run; it named dd6bdda (2026-12-05) after
  two later sessions had appended their runs to bench/results/snn.csv.
"""
import csv
import os
import re

import pytest
import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
README = os.path.join(ROOT, "README.md")


def _readme():
    with open(README, encoding="utf-8") as f:
        return f.read()


def _first_python_block_after(text, heading):
    """The first ```python block after the line `heading` (the README's own text, unchanged)."""
    start = text.index("\n" + heading + "\n")
    m = re.compile(r"```python\n(.*?)```", re.S).search(text, start)
    assert m is not None, f"no python block after {heading!r}"
    return m.group(1)


def test_the_snn_section_snippet_runs_as_written():
    pytest.importorskip("spikingjelly")  # its convert line builds a SpikingJelly model
    code = _first_python_block_after(_readme(), "### pypaper.snn")
    torch.manual_seed(0)
    ns = {"__name__": "readme_snn"}
    exec(compile(code, "README.md#pypaper.snn", "exec"), ns)
    import pypaper.snn as snn
    # what the comments say: [T, N, 10] spikes out, SpikingJelly's LIF swapped for pypaper's
    assert ns["spikes"].shape == (4, 2, 10)
    assert set(ns["spikes"].unique().tolist()) <= {0.0, 1.0}
    assert type(ns["model"][1]) is snn.LIFNode
    assert isinstance(ns["delayed"], snn.DelayedLinear)
    assert ns["y"].shape == ns["spikes"].shape


def test_the_torch_func_snippet_gives_per_sample_gradients():
    code = _first_python_block_after(_readme(), "## torch.func and forward-mode AD")
    ns = {"__name__": "readme_func"}
    exec(compile(code, "README.md#torch.func", "exec"), ns)
    g = ns["per_sample"]
    assert g["0.weight"].shape == (4, 8, 6) and g["0.bias"].shape == (4, 8)


def test_checkpoint_per_block_keeps_a_third_of_the_saved_tensors():
    from pypaper.snn import functional, layer, neuron

    blocks = nn.ModuleList(
        nn.Sequential(layer.Conv2d(32, 32, 3, padding=1, bias=False), layer.BatchNorm2d(32),
                      neuron.LIFNode()) for _ in range(4))
    for b in blocks:
        functional.set_step_mode(b, "m")
    x = torch.randn(8, 8, 32, 32, 32, requires_grad=True)  # T = 8, batch 8, 32 channels, 32x32

    def saved_mib(checkpointed):
        storages = {}

        def pack(t):  # each storage once: a view saved twice is one allocation
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            h = x
            for b in blocks:
                h = functional.checkpoint(b, h) if checkpointed else b(h)
        for b in blocks:
            functional.reset_net(b)
        return sum(storages.values()) / 2 ** 20

    plain, ckpt = saved_mib(False), saved_mib(True)
    # per block: the conv's, BatchNorm's and LIF's 8 MiB inputs; checkpointed, the block input
    assert 95 <= plain <= 97, plain
    assert ckpt == 32, ckpt


def test_the_snn_benchmark_header_names_the_last_xeon_run():
    path = os.path.join(ROOT, "bench", "results", "snn.csv")
    with open(path, newline="") as f:
        runs = [r for r in csv.DictReader(f)
                if r["kernel"] == "LIF multi-step T=32" and r["provider"] == "pypaper"
                and r["mode"] == "fwd+bwd" and "Xeon" in r["device_name"]
                and r["shape"] == "32x16x16384" and r["dtype"] == "float32"]
    last = max(runs, key=lambda r: r["timestamp"])["commit"]
    text = _readme()
    header = re.search(r"\*\*snn\*\* \(commit \w+, .*?last measured at (\w+) on a Xeon", text, re.S)
    assert header is not None
    assert header.group(1) == last, (header.group(1), last)
    # and the machine table has a row for that run
    assert re.search(r"^\|[^\n]*\| " + last + r" \|", text, re.M), last


def test_sigmoid_surrogate_tail_is_the_exact_value_where_spikingjellys_loses_digits():
    """README: a = 1, x = 16.6: 6.18e-8 (exact) against SpikingJelly's 1.19e-7 (its a s (1 - s)
    with s rounded to 1 - 2^-24 in fp32); the README said 5.96e-8 until this review."""
    import math

    from pypaper.snn import neuron, surrogate

    exact = math.exp(-16.6) / (1 + math.exp(-16.6)) ** 2
    # tau = 2, from rest: H = X / 2 = 17.6, H - v_threshold = 16.6, dS/dX = sigma'(16.6) / 2
    n = neuron.LIFNode(surrogate_function=surrogate.Sigmoid(alpha=1.0))
    x = torch.tensor([35.2], requires_grad=True)
    n(x).sum().backward()
    assert abs(2 * x.grad.item() / exact - 1) < 1e-4
    assert f"{2 * x.grad.item():.2e}" == "6.18e-08"
    sj_neuron = pytest.importorskip("spikingjelly.activation_based.neuron")
    sj_surrogate = pytest.importorskip("spikingjelly.activation_based.surrogate")
    m = sj_neuron.LIFNode(surrogate_function=sj_surrogate.Sigmoid(alpha=1.0))
    x = torch.tensor([35.2], requires_grad=True)
    m(x).sum().backward()
    assert f"{2 * x.grad.item():.2e}" == "1.19e-07"
