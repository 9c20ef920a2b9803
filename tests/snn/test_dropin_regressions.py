"""Regressions from a review of the SpikingJelly drop-in (each failed before its fix): state and
cached parameters across torch.inference_mode and FakeTensorMode, a learnable threshold that
drifts below v_reset, SpikingJelly container subclasses under set_step_mode, multi-step-only
containers under set_step_mode(net, 's'), and surrogate subclasses that override forward."""
import pytest
import torch

from pypaper import _ext
from pypaper.snn import functional, layer, lif_multi_step, neuron, surrogate

pytestmark = pytest.mark.skipif(not _ext.LOADED, reason="pypaper._C not built")


def test_inference_mode_call_does_not_poison_later_training():
    """The 0-d tensors of number parameters are cached per value: one made under
    inference_mode was an inference tensor, which every later graph-building call then failed to
    save for backward ("Inference tensors cannot be saved for backward"), fresh neurons too."""
    x = torch.randn(4, 2, 3)
    lif = neuron.LIFNode(tau=2.75, v_threshold=0.625, step_mode="m")  # values no other test uses
    with torch.inference_mode():
        lif(x)
    functional.reset_net(lif)
    xr = x.clone().requires_grad_()
    neuron.LIFNode(tau=2.75, v_threshold=0.625, step_mode="m")(xr).sum().backward()
    assert xr.grad is not None


def test_fake_mode_call_does_not_poison_later_calls():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        neuron.LIFNode(tau=3.25, v_threshold=0.875, step_mode="m")(torch.randn(4, 2, 3))
    out = neuron.LIFNode(tau=3.25, v_threshold=0.875, step_mode="m")(torch.randn(4, 2, 3))
    assert type(out) is torch.Tensor


@pytest.mark.parametrize("step_mode", ["s", "m"])
def test_membrane_left_by_inference_mode_continues_into_training(step_mode):
    """SpikingJelly continues from the membrane an inference_mode call left; pypaper saved that
    inference tensor for the backward and failed."""
    lif = neuron.LIFNode(step_mode=step_mode)
    x = torch.rand(4, 2, 3)
    run = (lambda a: lif(a)) if step_mode == "m" else (lambda a: torch.stack([lif(s) for s in a]))
    with torch.inference_mode():
        run(x)
    xr = x.clone().requires_grad_()
    run(xr).sum().backward()
    assert xr.grad is not None and torch.isfinite(xr.grad).all()


def test_learnable_threshold_may_drift_below_v_reset():
    """A learnable threshold is checked when constructed, not on every call: training drove it
    below v_reset and the next forward raised mid-run."""
    lif = neuron.LIFNode(step_mode="m", learnable_threshold=True, threshold_shape=(4,))
    with torch.no_grad():
        lif.v_threshold[1] = -0.25  # where SGD took it
    x = torch.rand(3, 2, 4) * 0.3
    out = lif(x)
    out.sum().backward()
    assert torch.all(out[:, :, 1] == 1)  # H >= 0 > threshold: fires at every step
    with pytest.raises(ValueError, match="v_threshold"):
        neuron.LIFNode(v_threshold=-0.25, learnable_threshold=True)
    # ... nor when it is used detached: a frozen model, float64 inputs (the cast drops
    # requires_grad), torch.func.functional_call with detached parameters (all raised)
    lif.requires_grad_(False)
    assert torch.equal(lif(x), out)
    lif.requires_grad_(True)
    with torch.no_grad():
        lif(x.double())
    params = {k: v.detach() for k, v in lif.named_parameters()}
    assert torch.equal(torch.func.functional_call(lif, params, (x,)), out)
    fixed = neuron.LIFNode(step_mode="m", threshold_shape=(4,))  # a buffer: not learnable
    fixed.v_threshold[1] = -0.25
    with pytest.raises(ValueError, match="v_threshold must be greater than v_reset"):
        fixed(x)


def test_compiled_neurons_carry_their_membrane_and_check_numbers():
    """torch.compile(fullgraph=True) over calls that carry the membrane ('m' without a reset
    between calls, a single-step loop) and lif_multi_step(x, v): the functorch and
    inference-tensor probes on v broke the graph. While tracing, number arguments are still
    checked (a threshold at or below v_reset ran silently compiled)."""
    torch.manual_seed(0)
    x = torch.rand(3, 2, 5)
    for mode in ("m", "s"):
        eager, comp = neuron.LIFNode(step_mode=mode), neuron.LIFNode(step_mode=mode)
        if mode == "m":
            run = torch.compile(lambda a: comp(a), fullgraph=True)
            want = [eager(x), eager(x)]
            got = [run(x), run(x)]
        else:
            run = torch.compile(lambda a: torch.stack([comp(a[t]) for t in range(3)]),
                                fullgraph=True)
            want = [torch.stack([eager(x[t]) for t in range(3)]) for _ in range(2)]
            got = [run(x), run(x)]
        for g, w in zip(got, want):
            assert torch.equal(g, w), mode
        assert torch.equal(comp.v, eager.v), mode
    v0 = torch.rand(2, 5)
    f = torch.compile(lambda a, v: lif_multi_step(a, v)[0], fullgraph=True)
    assert torch.equal(f(x, v0), lif_multi_step(x, v0)[0])
    bad = torch.compile(lambda a: lif_multi_step(a, v_threshold=-0.5)[0], fullgraph=True)
    with pytest.raises(Exception, match="v_threshold must be greater than v_reset|Observed"):
        bad(x)


def test_tau_that_rounds_to_one_is_refused_clearly():
    """tau = 1 + 1e-8 passes the constructor (> 1) but is 1 in float32, the kernels' math type:
    a ValueError naming tau and the rounding, not the C++ check's RuntimeError."""
    lif = neuron.LIFNode(tau=1 + 1e-8, step_mode="m")
    with pytest.raises(ValueError, match="tau must be > 1 in torch.float32.*rounds to 1"):
        lif(torch.rand(2, 3))
    lif(torch.rand(2, 3, dtype=torch.float64))  # float64 math keeps it above 1


def test_set_step_mode_respects_subclasses_of_spikingjelly_containers():
    sjl = pytest.importorskip("spikingjelly.activation_based.layer")
    sjn = pytest.importorskip("spikingjelly.activation_based.neuron")

    class MyBlock(sjl.MultiStepContainer):
        pass

    inner = sjn.LIFNode()
    net = torch.nn.Sequential(sjl.Linear(3, 4), MyBlock(inner))
    functional.set_step_mode(net, "m")
    assert inner.step_mode == "s" and net[0].step_mode == "m"


def test_set_step_mode_single_leaves_multi_step_only_containers():
    """SpikingJelly's SeqToANNContainer has no step_mode and set_step_mode(net, 's') skips it;
    pypaper's raised, leaving the net half switched."""
    net = torch.nn.Sequential(layer.SeqToANNContainer(torch.nn.Linear(3, 4)),
                              neuron.LIFNode(step_mode="m"),
                              layer.MultiStepContainer(neuron.IFNode()))
    functional.set_step_mode(net, "s")
    assert net[0].step_mode == "m" and net[1].step_mode == "s" and net[2].step_mode == "m"
    with pytest.raises(ValueError, match="step_mode must be 'm'"):
        net[0].step_mode = "s"


def test_surrogate_subclass_overriding_forward_is_called():
    class Shifted(surrogate.ATan):
        def forward(self, x):
            return super().forward(x - 0.5)

    x = torch.full((3, 1, 1), 1.2)
    got = neuron.LIFNode(step_mode="m", surrogate_function=Shifted())(x)
    want = neuron.LIFNode(step_mode="m", surrogate_function=surrogate.ATan(),
                          v_threshold=1.5)(x)
    assert torch.equal(got, want) and got.flatten().tolist() == [0.0, 0.0, 0.0]
    assert surrogate.surrogate_spec(Shifted()) is None
    assert surrogate.surrogate_spec(surrogate.ATan()) is not None


def test_register_memory_api():
    """SpikingJelly's MemoryModule API on pypaper's neurons: a subclass's own state variable,
    reset with the neuron, moved by .to(), detached by detach()."""
    class CountingLIF(neuron.LIFNode):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.register_memory("count", 0.0)

        def forward(self, x):
            out = super().forward(x)
            self.count = self.count + out.sum()
            return out

    lif = CountingLIF(step_mode="m")
    lif(torch.ones(4, 2, 3) * 1.5)
    assert float(lif.count) > 0 and dict(lif.named_memories()).keys() == {"v", "count"}
    assert len(list(lif.memories())) == 2
    lif.double()
    assert lif.count.dtype == torch.float64
    lif.detach()
    functional.reset_net(lif)
    assert lif.count == 0.0 and lif.v == 0.0
    lif.set_reset_value("count", 5.0)
    assert lif.get_reset_value("count") == 5.0 and lif.get_reset_value("v") == 0.0
    lif.reset()
    assert lif.count == 5.0
    with pytest.raises(ValueError, match="already an attribute"):
        lif.register_memory("v", 1.0)
    with pytest.raises(AttributeError, match="no memory 'trace'"):
        lif.get_reset_value("trace")
    assert lif.supported_step_mode() == ("s", "m")


def test_zero_dim_input_single_step():
    lif = neuron.LIFNode()
    outs = [lif(torch.tensor(1.5)) for _ in range(3)]
    sj = neuron.LIFNode(step_mode="m")(torch.full((3, 1), 1.5))[:, 0]
    assert all(o.shape == () for o in outs) and torch.equal(torch.stack(outs), sj)
    assert lif.v.shape == ()


def test_zero_dim_steps_store_every_membrane_and_a_shape_change_restarts():
    """0-d steps with store_v_seq keep one membrane per step, v_seq of shape [steps] as
    SpikingJelly's (it held only the last step: the [steps] sequence looked like another
    shape to the [1] call). A [1] state left by a [1] input is not a 0-d input's: the 0-d step
    (or a [T] sequence) restarts from rest, as SpikingJelly does (it continued from it)."""
    lif = neuron.LIFNode(store_v_seq=True)
    for _ in range(3):
        lif(torch.tensor(0.8))
    want = neuron.LIFNode(step_mode="m", store_v_seq=True)
    want(torch.full((3, 1), 0.8))
    assert lif.v_seq.shape == (3,) and torch.equal(lif.v_seq, want.v_seq[:, 0])
    for mode, second in (("s", torch.tensor(0.8)), ("m", torch.full((2,), 0.8))):
        node = neuron.LIFNode(step_mode=mode)
        node(torch.full((1,) if mode == "s" else (2, 1), 0.8))  # a [1] state, 0.4 or 0.6
        node(second)
        fresh = neuron.LIFNode(step_mode=mode)
        fresh(second)
        assert node.v.shape == () and torch.equal(node.v, fresh.v), mode


def test_tensor_alpha_and_complex_input():
    assert surrogate.Sigmoid(alpha=torch.tensor(2.0)).alpha == 2.0
    with pytest.raises(TypeError, match="real tensor"):
        neuron.LIFNode(step_mode="m")(torch.ones(2, 3, dtype=torch.complex64))


def test_membrane_reset_value_is_spikingjellys():
    """reset() puts v where SpikingJelly's registered memory does: v_reset as constructed (a
    later change of v_reset moves only the reset after a spike), or set_reset_value('v', value)
    (SpikingJelly's HalfThresholdIFNode trick; pypaper raised). pypaper followed the current
    v_reset: the next sample started from another membrane."""
    x = torch.rand(4, 3, 5)
    lif = neuron.LIFNode(step_mode="m")
    lif.v_reset = -0.5
    functional.reset_net(lif)
    assert lif.v == 0.0 and lif.get_reset_value("v") == 0.0
    start_at_zero = neuron.LIFNode(step_mode="m", v_reset=-0.5, v_threshold=1.0)
    start_at_zero.v = 0.0
    assert torch.equal(lif(x), start_at_zero(x))  # from 0, hard reset to -0.5 after a spike
    half = neuron.IFNode(step_mode="m")
    half.set_reset_value("v", 0.5)
    half.reset()
    assert half.v == 0.5 and half.get_reset_value("v") == 0.5
    want = neuron.IFNode(step_mode="m")
    want.v = 0.5
    assert torch.equal(half(x), want(x))
    with pytest.raises(ValueError, match="reset value of v must be a finite number"):
        half.set_reset_value("v", float("nan"))


@pytest.mark.parametrize("dtype,w0", [(torch.float32, -90.0), (torch.float32, -88.0),
                                      (torch.bfloat16, -90.0), (torch.float16, -18.0)])
@pytest.mark.parametrize("v_reset", [0.0, None])
def test_plif_whose_k_rounds_to_zero_trains_on(dtype, w0, v_reset):
    """k = sigmoid(w) rounds to 0 (w <= -88.72 in fp32 and bf16, -17.34 in fp16) or to a
    subnormal (-88 in fp32): the first stopped with the op's range error and the second kept a
    NaN-prone 1/k, where SpikingJelly's neuron stops integrating and trains on with w's gradient
    0. Now the same spikes, the membrane within k_min * |X - V + Vr| per step, w's gradient 0."""
    from spikingjelly.activation_based import neuron as sj_neuron

    torch.manual_seed(0)
    ours = neuron.ParametricLIFNode(step_mode="m", v_reset=v_reset).to(dtype)
    theirs = sj_neuron.ParametricLIFNode(step_mode="m", v_reset=v_reset).to(dtype)
    warm = (torch.rand(3, 4, 8) * 1.5).to(dtype)  # a membrane away from rest (tau = 2)
    x = (torch.randn(5, 4, 8) * 2).to(dtype)
    g = torch.randn(5, 4, 8).to(dtype)
    with torch.no_grad():
        ours(warm)
    res = []
    for m in (ours, theirs):
        with torch.no_grad():
            m.v = ours.v.clone()  # the same start (16-bit math differs from SpikingJelly's)
            m.w.fill_(w0)
        xx = x.clone().requires_grad_()
        s = m(xx)
        ((s * g).sum() + m.v.float().sum()).backward()
        res.append((s, m.v.detach(), xx.grad, m.w.grad))
        torch.optim.SGD(m.parameters(), lr=1.0).step()
        assert torch.isfinite(m.w).all()
    (s1, v1, gx1, gw1), (s2, v2, gx2, gw2) = res
    assert torch.equal(s1, s2)
    tol = 1e-5 if dtype == torch.float16 else 1e-30  # k_min: 2^-24 in fp16, else 2^-126
    torch.testing.assert_close(v1.float(), v2.float(), rtol=0, atol=tol)
    torch.testing.assert_close(gx1.float(), gx2.float(), rtol=0, atol=tol)
    assert gw1.item() == 0 and abs(gw2.item()) < 1e-30
