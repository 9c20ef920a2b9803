"""Review of the training-side quantizers (BitLinear, NUPES calibrate, HAWQ): regressions for
state_dict reloads, 16-bit dtypes, unused layers, train-mode and frozen models."""
import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from pypaper.quant import PowerExponentConfig, calibrate, quantize_
from pypaper.quant.bitlinear import BitLinear, bits_report
from pypaper.quant.hawq import hawq, hutchinson_trace, top_eigenvalue
from pypaper.quant.nupes import PowerQuantLinear


# ---- BitLinear -----------------------------------------------------------------------------------

def _trained_bitlinear_model(seed=0):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(BitLinear(12, 16, bits=4, generator=g), nn.ReLU(),
                          BitLinear(16, 3, bits=4, generator=g))
    torch.manual_seed(seed)
    x, y = torch.randn(64, 12), torch.randint(0, 3, (64,))
    opt = torch.optim.Adam(model.parameters(), lr=0.1)  # big steps: many bits flip
    for _ in range(10):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, x, y


def _evaluate(x, y):
    return lambda m: float((m(x).argmax(1) == y).float().mean())


def test_bitlinear_reload_into_fresh_module_keeps_flipped_fraction():
    """initial_bits is part of the state_dict: a checkpoint loaded into a fresh BitLinear (other
    random start) reports the bits flipped from the checkpoint's own start."""
    model, x, y = _trained_bitlinear_model()
    want = bits_report(model, _evaluate(x, y))
    assert 0.0 < max(want["flipped_fraction"]) < 1.0
    fresh, _, _ = _trained_bitlinear_model(seed=1)  # other random start and other bits
    fresh.load_state_dict(model.state_dict())  # strict
    got = bits_report(fresh, _evaluate(x, y))
    assert got == want
    assert torch.equal(fresh[0].initial_bits, model[0].initial_bits)


def test_bitlinear_loads_a_checkpoint_without_initial_bits_and_says_so():
    """An older checkpoint (no initial_bits) loads strictly; its start is unknown, so
    flipped_fraction is NaN (with a warning), not counted against the fresh module's random
    start; a new checkpoint loaded afterwards brings the start back."""
    model, x, y = _trained_bitlinear_model()
    legacy = {k: v for k, v in model.state_dict().items() if not k.endswith("initial_bits")}
    fresh, _, _ = _trained_bitlinear_model(seed=1)
    res = fresh.load_state_dict(legacy)
    assert res.missing_keys == [] and res.unexpected_keys == []
    with pytest.warns(UserWarning, match="without their initial bits"):
        rep = bits_report(fresh, _evaluate(x, y))
    assert all(math.isnan(f) for f in rep["flipped_fraction"])
    assert rep["top_k_accuracy"] == bits_report(model, _evaluate(x, y))["top_k_accuracy"]
    # unknown survives a save / load round trip, and a full checkpoint restores the start
    again, _, _ = _trained_bitlinear_model(seed=2)
    again.load_state_dict(copy.deepcopy(fresh.state_dict()))
    assert again[0].initial_bits.numel() == 0
    again.load_state_dict(model.state_dict())
    assert torch.equal(again[2].initial_bits, model[2].initial_bits)
    assert bits_report(again, _evaluate(x, y)) == bits_report(model, _evaluate(x, y))


def test_bitlinear_meta_device_construction_then_assign_load():
    """The accelerate-style big-model load: build on the meta device, load_state_dict(assign=True)
    then run. Nothing may stay on meta (a non-persistent buffer used to)."""
    src, x, _ = _trained_bitlinear_model()
    with torch.device("meta"):
        model = nn.Sequential(BitLinear(12, 16, bits=4), nn.ReLU(), BitLinear(16, 3, bits=4))
    model.load_state_dict(src.state_dict(), assign=True)
    assert all(t.device.type == "cpu" for t in (*model.parameters(), *model.buffers()))
    assert torch.equal(model(x), src(x))
    legacy = {k: v for k, v in src.state_dict().items() if not k.endswith("initial_bits")}
    with torch.device("meta"):
        model = nn.Sequential(BitLinear(12, 16, bits=4), nn.ReLU(), BitLinear(16, 3, bits=4))
    model.load_state_dict(legacy, assign=True)
    model.to(torch.float64)  # nothing left on meta to copy out of
    assert torch.allclose(model(x.double()).float(), src(x), atol=1e-6)


@pytest.mark.parametrize("bits,dtype", [(16, torch.float16), (12, torch.float16),
                                        (16, torch.bfloat16), (9, torch.bfloat16)])
def test_bitlinear_half_precision_weights_are_the_float32_weights_rounded_once(bits, dtype):
    """After .half() / .to(bfloat16) the integer sum Σ b_i 2^i stays exact (float32 math): at
    16 bits in float16 it used to overflow to inf (65535 -> 65536 > 65504)."""
    layer = BitLinear(64, 8, bits=bits, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer.bit_latents[:, :4].fill_(0.5)  # rows 0..3: every bit set, M = 2^bits - 1
    low = copy.deepcopy(layer).to(dtype)
    assert float(low.magnitude().detach().max()) == 2 ** bits - 1
    w = low.weight()
    assert w.dtype == dtype and bool(torch.isfinite(w).all())
    assert torch.equal(w, layer.weight().to(dtype))
    x = torch.randn(5, 64)
    y = low(x.to(dtype))
    assert bool(torch.isfinite(y).all())
    torch.testing.assert_close(y.float(), F.linear(x.to(dtype), layer.weight().to(dtype),
                                                   layer.bias.to(dtype)).float())
    y.float().sum().backward()  # the straight-through gradients reach the 16-bit latents
    assert low.bit_latents.grad.dtype == dtype and bool(torch.isfinite(low.bit_latents.grad).all())


def test_bitlinear_keep_top_bits_out_of_range_raises():
    layer = BitLinear(6, 4, bits=3)
    x = torch.randn(2, 6)
    for bad in (-1, 4, 1.5, True):
        layer.keep_top_bits = bad
        with pytest.raises(ValueError, match="keep_top_bits"):
            layer(x)
    layer.keep_top_bits = 0
    assert torch.equal(layer(x), layer.bias.expand(2, 4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bitlinear_cpu_generator_with_cuda_device():
    """A CPU generator draws on the CPU and the draw moves: same init as on the CPU."""
    a = BitLinear(6, 4, bits=3, generator=torch.Generator().manual_seed(0), device="cuda")
    b = BitLinear(6, 4, bits=3, generator=torch.Generator().manual_seed(0))
    assert a.bit_latents.device.type == "cuda"
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p.cpu(), q), n


# ---- NUPES calibrate -----------------------------------------------------------------------------

class _WithAuxHead(nn.Module):
    """A model with an auxiliary head its forward does not use (a training-only head)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.aux = nn.Linear(5, 6), nn.Linear(6, 3), nn.Linear(6, 2)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_calibrate_learns_the_layers_that_run_and_leaves_an_unused_one():
    torch.manual_seed(0)
    model = _WithAuxHead()
    quantize_(model, PowerExponentConfig(bits=3, learn=True))
    aux_before = copy.deepcopy(model.aux.state_dict())
    fc1_before = model.fc1.weight.detach().clone()
    losses = calibrate(model, [torch.randn(32, 5)], steps=20, lr=1e-3, exponent_lr=1e-2)
    assert len(losses) == 20 and all(math.isfinite(v) for v in losses)
    assert not torch.equal(model.fc1.weight, fc1_before)
    for k, v in model.aux.state_dict().items():
        assert torch.equal(v, aux_before[k]), k


def test_calibrate_with_no_learnable_layer_running_names_the_problem():
    model = nn.Sequential(nn.Linear(4, 4))
    quantize_(model, PowerExponentConfig(bits=3, learn=True))
    model.forward = lambda x: x  # nothing runs
    with pytest.raises(ValueError, match="no learnable PowerQuantLinear ran"):
        calibrate(model, [torch.randn(2, 4)], steps=1)


def test_learnable_power_linear_repr_does_not_convert_a_grad_tensor(monkeypatch):
    """print(model) of a learnable layer read float(exponent) of a Parameter: torch's
    "Converting a tensor with requires_grad=True to a scalar" warning (once per process, so
    the conversion itself is watched here)."""
    layer = PowerQuantLinear.from_linear(nn.Linear(4, 3), 4, 0.7, learnable=True)
    to_float = torch.Tensor.__float__
    seen = []

    def spy(t):
        seen.append(t.requires_grad)
        return to_float(t)

    monkeypatch.setattr(torch.Tensor, "__float__", spy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "exponent=0.7000" in repr(layer)
    assert seen and not any(seen)


# ---- HAWQ ----------------------------------------------------------------------------------------

def _exact_trace(model, data, name):
    """tr(∂²L/∂W²) from the dense Hessian (torch.autograd.functional.hessian), model as is."""
    x, y = data
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_of(p):
        return F.cross_entropy(functional_call(model, {**params, name: p}, (x,)), y)

    h = torch.autograd.functional.hessian(loss_of, params[name])
    n = params[name].numel()
    return float(torch.trace(h.reshape(n, n)))


def test_hawq_on_a_model_with_an_unused_layer():
    """A layer the loss does not depend on has a zero Hessian: trace 0, eigenvalue 0, the
    smallest width; the used layers' traces match the dense Hessian."""
    torch.manual_seed(0)
    model = _WithAuxHead().double()
    data = (torch.randn(256, 5, dtype=torch.float64), torch.randint(0, 3, (256,)))
    params = {n: m.weight for n, m in model.named_children()}
    est = hutchinson_trace(model, F.cross_entropy, data, params, n_probes=800, seed=0,
                           joint=False)
    assert est["aux"] == 0.0
    for name in ("fc1", "fc2"):
        exact = _exact_trace(model, data, name + ".weight")
        assert abs(est[name] - exact) <= 0.05 * abs(exact), (name, est[name], exact)
    # the per-probe path (probe_batch=1) agrees with the vectorized one
    a = hutchinson_trace(model, F.cross_entropy, data, params, n_probes=6, seed=3, probe_batch=3)
    b = hutchinson_trace(model, F.cross_entropy, data, params, n_probes=6, seed=3, probe_batch=1)
    for n in params:
        assert a[n] == pytest.approx(b[n], rel=1e-10, abs=1e-12)
    assert top_eigenvalue(model, F.cross_entropy, data, model.aux.weight) == 0.0
    res = hawq(model, F.cross_entropy, data, avg_bits=4, bits_options=(2, 4, 8), n_probes=8)
    assert res.bits["aux"] == 2 and res.size_bits <= res.budget_bits


def _bn_dropout_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3),
                          nn.Linear(8, 3)).double()
    x = torch.randn(128, 5, dtype=torch.float64)
    with torch.no_grad():  # non-trivial running statistics
        model(x * 2 + 1)
    return model, (x, torch.randint(0, 3, (128,)))


def test_hawq_leaves_a_train_mode_model_unchanged_and_probes_it_in_eval_mode():
    """hawq on a model still in train mode: BatchNorm's running statistics and every module's
    mode are left as they were, and the traces are those of the deterministic (eval-mode)
    loss, checked against its dense Hessian."""
    model, data = _bn_dropout_model()
    model.train()
    before = copy.deepcopy(model.state_dict())
    params = {"0": model[0].weight, "4": model[4].weight}
    est = hutchinson_trace(model, F.cross_entropy, data, params, n_probes=800, seed=0,
                           joint=False)
    res = hawq(model, F.cross_entropy, data, avg_bits=4, bits_options=(2, 4, 8), n_probes=16)
    top_eigenvalue(model, F.cross_entropy, data, model[4].weight, iters=5)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # running_mean / running_var / num_batches_tracked
    assert all(m.training for m in model.modules())
    # same probes on the model put in eval mode by hand: the very same estimate
    ev = copy.deepcopy(model).eval()
    est_eval = hutchinson_trace(ev, F.cross_entropy, data, {"0": ev[0].weight, "4": ev[4].weight},
                                n_probes=800, seed=0, joint=False)
    assert est == est_eval
    for name in ("0", "4"):
        exact = _exact_trace(ev, data, name + ".weight")
        assert abs(est[name] - exact) <= 0.05 * abs(exact), (name, est[name], exact)
    assert res.size_bits <= res.budget_bits


def test_hawq_on_a_frozen_model():
    """A model frozen for post-training quantization (requires_grad_(False), or called under
    no_grad) still has a Hessian; the flags are restored."""
    model, data = _bn_dropout_model()
    model.eval()
    want = hawq(model, F.cross_entropy, data, avg_bits=4, bits_options=(2, 4, 8), n_probes=8)
    model.requires_grad_(False)
    got = hawq(model, F.cross_entropy, data, avg_bits=4, bits_options=(2, 4, 8), n_probes=8)
    with torch.no_grad():
        got2 = hawq(model, F.cross_entropy, data, avg_bits=4, bits_options=(2, 4, 8), n_probes=8)
        lam = top_eigenvalue(model, F.cross_entropy, data, model[0].weight, iters=5)
    assert got.traces == want.traces == got2.traces and got.bits == want.bits
    assert math.isfinite(lam) and lam != 0.0
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("kw", [dict(avg_bits=float("nan")), dict(avg_bits="4"),
                                dict(budget_bits=float("inf"))])
def test_hawq_bad_budget_is_refused_before_any_probe(kw):
    calls = []

    def loss_fn(out, y):
        calls.append(1)
        return F.cross_entropy(out, y)

    model = nn.Sequential(nn.Linear(4, 3))
    data = (torch.randn(8, 4), torch.randint(0, 3, (8,)))
    with pytest.raises(ValueError, match=next(iter(kw))):
        hawq(model, loss_fn, data, **kw)
    assert calls == []
