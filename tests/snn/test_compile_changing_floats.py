"""A float attribute changed between calls of a compiled model: v_threshold / v_reset / tau set by
a schedule, a surrogate's alpha annealed. Once dynamo has seen two values of a float it passes it
as a SymFloat (torch._dynamo.config.specialize_float is False); math.isfinite refused one, so the
argument checks broke the graph (fullgraph=True failed with "torch.* op returned non-Tensor").
The compiled model must run under fullgraph=True and equal an eager twin given the same values.
Each new number compiles once more (the ops take numbers); a long schedule is a tensor's job."""
import fractions
import math

import numpy as np
import pytest
import spikingjelly.activation_based.surrogate as sj_surrogate
import torch
from torch import nn

import pypaper
from pypaper import _numbers
from pypaper.snn import neuron, surrogate


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # the recompile limit counts per code object, shared by every test's neurons
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _model(sur=surrogate.ATan):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), neuron.LIFNode(surrogate_function=sur(),
                                                         step_mode="m"))


def _set(model, attr, value):
    lif = model[1]
    if attr == "alpha":
        lif.surrogate_function.alpha = value
    else:
        setattr(lif, attr, value)


SCHEDULES = {
    "v_threshold": [1.0, 0.6, 0.8],
    "v_reset": [0.0, -0.2, None, 0.1],
    # 1.00005: above 1 in float32 (refused within half an ulp of 1), checked by comparison (read
    # back from a float32 tensor, it failed under compile as a data-dependent guard)
    "tau": [2.0, 3.0, 1.00005],
    "alpha": [2.0, 3.5, 1.0],
}


@pytest.mark.parametrize("backend,dynamic", [("cpu", None), ("cpu", True), ("reference", True)])
@pytest.mark.parametrize("attr", list(SCHEDULES))
def test_a_float_changed_between_compiled_calls_compiles_and_equals_eager(attr, backend, dynamic):
    _check_schedule(attr, SCHEDULES[attr], backend, dynamic, surrogate.ATan)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("sur", [surrogate.Sigmoid, surrogate.Erf, surrogate.PiecewiseQuadratic,
                                 lambda: surrogate.ATan(spiking=False), sj_surrogate.ATan],
                         ids=["Sigmoid", "Erf", "PiecewiseQuadratic", "ATan(spiking=False)",
                              "spikingjelly ATan"])
def test_an_annealed_alpha_of_any_surrogate_compiles_and_equals_eager(sur, backend):
    _check_schedule("alpha", [1.0, 2.5, 1.5], backend, True, sur)


def _check_schedule(attr, values, backend, dynamic, sur):
    eager, compiled_model = _model(sur), _model(sur)
    compiled = torch.compile(compiled_model, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    x = torch.randn(5, 3, 6) * 2
    with pypaper.use_backend(backend):
        for value in values:
            grads = _assert_twins_agree(eager, compiled_model, compiled, x,
                                        lambda model: _set(model, attr, value))
            assert all(g.abs().sum() > 0 for g in grads)


def _assert_twins_agree(eager, compiled_model, compiled, x, prepare):
    """prepare(model) on each twin, then forward and backward from rest: the compiled twin's
    spikes equal eager's, its membrane and gradients to rounding. Returns eager's gradients."""
    results = []
    for model, fn in ((eager, eager), (compiled_model, compiled)):
        prepare(model)
        pypaper.snn.reset_net(model)
        model.zero_grad()
        out = fn(x)
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        results.append((out.detach(), model[1].v.detach(),
                        [p.grad.clone() for p in model.parameters()]))
    (out_e, v_e, g_e), (out_c, v_c, g_c) = results
    assert 0 < out_e.sum() < out_e.numel()  # some spikes, not all
    torch.testing.assert_close(out_c, out_e, rtol=0, atol=0)
    torch.testing.assert_close(v_c, v_e, rtol=1e-6, atol=1e-6)
    for gc, ge in zip(g_c, g_e):
        torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-6)
    return g_e


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_a_long_schedule_on_tensors_needs_no_recompile(backend):
    """12 values (more than dynamo's recompile_limit of 8, which a number schedule would hit):
    a tensor alpha and a learnable threshold, each filled in place, compile at most twice (the
    first call, then once with automatic dynamic shapes at most) and equal eager."""
    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 8), neuron.LIFNode(
            surrogate_function=surrogate.ATan(alpha=torch.tensor(2.0)), step_mode="m",
            learnable_threshold=True, threshold_shape=()))
    frames = []

    def counting(gm, example_inputs):
        frames.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    eager, compiled_model = make(), make()
    compiled = torch.compile(compiled_model, fullgraph=True, backend=counting)
    x = torch.randn(5, 3, 6) * 2
    with pypaper.use_backend(backend):
        for i in range(12):
            def fill(model, i=i):
                with torch.no_grad():
                    model[1].v_threshold.fill_(0.5 + 0.05 * i)
                    model[1].surrogate_function.alpha.fill_(1.0 + 0.25 * i)
            _assert_twins_agree(eager, compiled_model, compiled, x, fill)
    assert 1 <= len(frames) <= 2


@pytest.mark.parametrize("value,finite", [
    (1.0, True), (-3, True), (float("inf"), False), (float("-inf"), False), (float("nan"), False),
    (10**400, False), (np.float32(3.0), True), (np.float16("inf"), False),
    # finite in its own type, inf as a float (where long double is wider than double)
    (np.finfo(np.longdouble).max,
     bool(np.finfo(np.longdouble).max == np.finfo(np.float64).max)),
    (fractions.Fraction(1, 3), True)])
def test_is_finite_is_math_isfinite_of_the_float_the_ops_take(value, finite):
    assert _numbers.is_finite(value) is finite


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("attr,bad,message", [
    ("tau", 0.9, "tau must be finite and > 1, got min 0.9"),
    ("v_threshold", -0.5, r"v_threshold must be greater than v_reset \(0.0\), got min -0.5"),
    ("v_reset", math.inf, "v_reset must be a finite number or None, got inf"),
    ("alpha", -1.0, "ATan's alpha must be a positive finite number, got -1.0")])
def test_a_bad_value_in_a_schedule_is_named_under_fullgraph(attr, bad, message, backend):
    """The third value is bad: the compiled model refuses it with the argument's message (under
    fullgraph=True inside dynamo's error, which quotes the ValueError). Formatting the SymFloat
    into the message failed first ("BUILD_STRING type error", the argument unnamed)."""
    model = _model()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(5, 3, 6)
    with pypaper.use_backend(backend):
        for value in SCHEDULES[attr][:2]:
            _set(model, attr, value)
            pypaper.snn.reset_net(model)
            compiled(x)
        _set(model, attr, bad)
        pypaper.snn.reset_net(model)
        with pytest.raises((ValueError, RuntimeError), match=message):
            compiled(x)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_a_schedule_computed_with_numpy_compiles_and_equals_eager(backend):
    """Values taken from numpy arrays (np.float32 / np.float64 scalars): dynamo traces a numpy
    scalar as an ndarray, which the checks refused under compile (TypeError "tau must be a number
    or a tensor, got ndarray"; eager took it). Assigned to a neuron's tau / v_threshold / v_reset
    or a built-in surrogate's alpha, it is stored as the float it equals."""
    eager, compiled_model = _model(), _model()
    compiled = torch.compile(compiled_model, fullgraph=True, dynamic=True, backend="aot_eager")
    x = torch.randn(5, 3, 6) * 2
    taus, thresholds = np.linspace(1.5, 3.0, 3), np.linspace(0.6, 1.0, 3, dtype=np.float32)
    with pypaper.use_backend(backend):
        for tau, vth in zip(taus, thresholds):
            def assign(model, tau=tau, vth=vth):
                lif = model[1]
                lif.tau, lif.v_threshold, lif.v_reset = tau, vth, np.float64(-0.1)
                lif.surrogate_function.alpha = np.float32(2 * vth)
                assert type(lif.tau) is float and type(lif.v_threshold) is float
                assert type(lif.surrogate_function.alpha) is float
            _assert_twins_agree(eager, compiled_model, compiled, x, assign)
