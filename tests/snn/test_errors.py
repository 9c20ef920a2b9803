"""Bad inputs raise exceptions whose messages name the argument (never a crash or wrong answer)."""
import pytest
import torch

from pypaper.snn import lif_multi_step, neuron, op_flags, sltt


@pytest.mark.parametrize("x", [torch.arange(12).reshape(3, 4), torch.ones(3, 4, dtype=torch.bool)])
def test_integer_and_boolean_inputs(x):
    """The op takes floating tensors only; the neurons, like SpikingJelly's (whose arithmetic
    promotes them), take integer and bool currents as the default float dtype."""
    with pytest.raises(TypeError, match="x_seq must be a floating tensor"):
        lif_multi_step(x)
    with pytest.raises(TypeError, match="x_seq must be a torch.Tensor"):
        lif_multi_step([[1.0]])
    xf = x.to(torch.get_default_dtype())
    assert torch.equal(neuron.LIFNode(step_mode="m")(x), neuron.LIFNode(step_mode="m")(xf))
    assert torch.equal(neuron.LIFNode(step_mode="s")(x[0]), neuron.LIFNode(step_mode="s")(xf[0]))


def test_rank_below_two():
    """The op needs [T, N, *]; a neuron in 'm' takes [T] as one neuron over time (its state 0-d,
    as SpikingJelly's loop leaves it) and carries it to the next call; 's' takes [N, *] or, as
    SpikingJelly's elementwise step does, a 0-d tensor (one neuron)."""
    with pytest.raises(ValueError, match=r"x_seq must have shape \[T, N, \*\]"):
        lif_multi_step(torch.randn(5))
    with pytest.raises(ValueError, match=r"x_seq must have shape \[T, N, \*\]"):
        neuron.LIFNode(step_mode="m")(torch.randn(()))
    assert neuron.LIFNode(step_mode="s")(torch.tensor(1.0)).shape == ()
    x = torch.rand(6) * 2
    lif, ref = neuron.LIFNode(step_mode="m", store_v_seq=True), neuron.LIFNode(step_mode="m")
    s = lif(x)
    assert s.shape == (6,) and lif.v.shape == () and lif.v_seq.shape == (6,)
    assert torch.equal(s, ref(x[:, None])[:, 0]) and torch.equal(lif.v, ref.v[0])
    assert torch.equal(lif(x), ref(x[:, None])[:, 0])  # the carried 0-d state


@pytest.mark.parametrize("tau", [1.0, 0.5, -2.0, float("inf"), float("nan")])
def test_tau_must_exceed_one_and_be_finite(tau):
    with pytest.raises(ValueError, match="tau must be a finite number > 1"):
        neuron.LIFNode(tau=tau)
    with pytest.raises(ValueError, match="init_tau must be a finite number > 1"):
        neuron.ParametricLIFNode(init_tau=tau)
    with pytest.raises(ValueError, match="tau must be finite"):
        lif_multi_step(torch.randn(3, 4), tau=tau)
    with pytest.raises(ValueError, match="tau must be finite and > 1"):
        lif_multi_step(torch.randn(3, 4, 2), tau=torch.tensor([2.0, tau]))
    with pytest.raises(ValueError, match="tau must be finite and > 1"):
        neuron.LIFNode(tau=torch.tensor([2.0, tau]))


def test_k_must_lie_in_zero_one():
    with pytest.raises(ValueError, match=r"k: k = 1/tau must lie in \(0, 1\]"):
        lif_multi_step(torch.randn(3, 4), k=1.5)
    with pytest.raises(ValueError, match="pass tau or k"):
        lif_multi_step(torch.randn(3, 4), tau=2.0, k=0.5)


@pytest.mark.parametrize("k", [1e-40, 3e-39, 1e-38])
def test_k_below_the_smallest_normal_with_its_gradient(k):
    """The backward forms dL/dk from (H - V) / k: 1/k overflowed float32 and the gradient was NaN
    without a word (k = 1e-40), or kept a few bits (subnormal d * k). Refused where k's gradient
    is wanted; without it, k only scales, and the call runs."""
    x = torch.randn(4, 8, requires_grad=True)
    kt = torch.tensor(k, requires_grad=True)
    with pytest.raises(ValueError, match=r"k: k = 1/tau below .* has no decay gradient"):
        lif_multi_step(x, k=kt)
    s, _, _ = lif_multi_step(x, k=kt.detach())
    s.sum().backward()
    assert torch.isfinite(x.grad).all()
    with torch.no_grad():
        lif_multi_step(x, k=kt)
    lif_multi_step(x, k=kt, decay_input=False)  # dH/dk = -(V - Vr): no division
    xd = x.detach().double()  # fp64 math: its own smallest normal
    kd = torch.tensor(k, dtype=torch.float64, requires_grad=True)
    lif_multi_step(xd, k=kd)[0].sum().backward()
    assert torch.isfinite(kd.grad)


@pytest.mark.parametrize("vth,vr", [(1.0, 1.0), (0.5, 1.0), (-1.0, 0.0)])
def test_threshold_must_exceed_reset(vth, vr):
    with pytest.raises(ValueError, match="must be greater than v_reset"):
        neuron.LIFNode(v_threshold=vth, v_reset=vr)
    with pytest.raises(ValueError, match="must be greater than v_reset"):
        lif_multi_step(torch.randn(3, 4), v_threshold=vth, v_reset=vr)
    neuron.LIFNode(v_threshold=vth, v_reset=None)  # a soft reset has no such bound


def test_non_finite_threshold_and_reset():
    with pytest.raises(ValueError, match="v_threshold must be a finite number"):
        neuron.LIFNode(v_threshold=float("nan"))
    with pytest.raises(ValueError, match="v_reset must be a finite number or None"):
        neuron.LIFNode(v_reset=float("inf"))
    with pytest.raises(ValueError, match="v_threshold must be finite"):
        lif_multi_step(torch.randn(3, 4), v_threshold=float("inf"))


def test_per_neuron_parameters_of_the_wrong_shape():
    x = torch.randn(4, 2, 3, 5)
    # (5,) broadcasts to (3, 5) and is taken since 2026-12-07 (test_broadcast_params.py); (4,)
    # broadcasts to neither shape
    with pytest.raises(ValueError, match=r"w \(tau_shape\) has shape \(4,\), expected \(\) "
                                         r"\(one value\), the feature shape x.shape\[2:\] = "
                                         r"\(3, 5\) \(one per neuron\) or x.shape\[1:\] = "
                                         r"\(2, 3, 5\) \(one per sample and neuron\), or a "
                                         r"shape that broadcasts to one of them"):
        neuron.ParametricLIFNode(step_mode="m", tau_shape=(4,))(x)
    with pytest.raises(ValueError, match=r"v_threshold has shape \(3,\)"):
        neuron.LIFNode(step_mode="m", learnable_threshold=True, threshold_shape=(3,))(x)
    with pytest.raises(ValueError, match=r"tau has shape \(3, 3, 5\)"):
        neuron.LIFNode(step_mode="m", tau=torch.full((3, 3, 5), 2.0))(x)
    with pytest.raises(ValueError, match=r"v has shape \(3, 5\), expected x_seq.shape\[1:\]"):
        lif_multi_step(x, torch.zeros(3, 5))
    with pytest.raises(TypeError, match="tau_shape must be a tuple of ints"):
        neuron.ParametricLIFNode(tau_shape=3)
    with pytest.raises(TypeError, match="v_threshold must be a floating tensor"):
        lif_multi_step(x, v_threshold=torch.ones(3, 5, dtype=torch.int64))


def test_bad_step_mode():
    with pytest.raises(ValueError, match="step_mode must be 's' .* or 'm'"):
        neuron.LIFNode(step_mode="x")
    n = neuron.LIFNode()
    with pytest.raises(ValueError, match="step_mode must be"):
        n.step_mode = "multi"


def test_op_checks_in_cpp():
    """Direct torch.ops calls are checked in C++ (TORCH_CHECK), never a crash."""
    op = torch.ops.pypaper.lif_forward
    one = torch.tensor(1.0)
    f = op_flags.forward_flags(True, True, False, False, False)
    with pytest.raises(RuntimeError, match="x must be a float32, float64, float16 or bfloat16"):
        op(torch.ones(3, 4, dtype=torch.int32), None, one * 2, one, 0.0, 0, 4.0, f)
    with pytest.raises(RuntimeError, match=r"x must have shape \[T, N, \*\]"):
        op(torch.ones(4), None, one * 2, one, 0.0, 0, 4.0, f)
    with pytest.raises(RuntimeError, match="tau must be finite and > 1"):
        op(torch.ones(3, 4), None, one * 0.5, one, 0.0, 0, 4.0, f)
    # a threshold below v_reset is computed as defined (a learnable one can drift there): the
    # neuron fires at every step
    assert torch.all(op(torch.ones(3, 4), None, one * 2, one, 1.5, 0, 4.0, f)[0] == 1)
    with pytest.raises(RuntimeError, match="v_threshold must be finite"):
        op(torch.ones(3, 4), None, one * 2, one * float("nan"), 0.0, 0, 4.0, f)
    with pytest.raises(RuntimeError, match="surrogate must be an id in"):
        op(torch.ones(3, 4), None, one * 2, one, 0.0, 8, 4.0, f)
    with pytest.raises(RuntimeError, match="alpha must be positive"):
        op(torch.ones(3, 4), None, one * 2, one, 0.0, 1, -1.0, f)
    with pytest.raises(RuntimeError, match=r"v_threshold has shape \[3\], expected one element"):
        op(torch.ones(3, 2, 4), None, one * 2, torch.ones(3), 0.0, 1, 1.0, f)
    with pytest.raises(RuntimeError, match="v_init has dtype"):
        op(torch.ones(3, 4), torch.zeros(4, dtype=torch.float64), one * 2, one, 0.0, 1, 1.0, f)
    bf = op_flags.backward_flags(True, True, False, False, True, True)
    with pytest.raises(RuntimeError, match="grad_spikes must match h_seq"):
        torch.ops.pypaper.lif_backward(torch.ones(2, 4), None, None, torch.ones(3, 4), None,
                                       one * 2, one, 0.0, 1, 1.0, bf)


@pytest.mark.parametrize("flags", [op_flags.NEED_DECAY_GRAD, op_flags.RECOMPUTE, 1 << 9, -1])
def test_lif_forward_rejects_flags_it_does_not_take(flags):
    one = torch.tensor(1.0)
    bad = op_flags.DECAY_IS_TAU | flags
    with pytest.raises(RuntimeError, match=f"lif_forward: flags {bad} has bits this op does not "
                                           "take"):
        torch.ops.pypaper.lif_forward(torch.ones(3, 4), None, one * 2, one, 0.0, 1, 2.0, bad)


@pytest.mark.parametrize("flags", [op_flags.KEEP_H, op_flags.STORE_V_SEQ, 1 << 9])
def test_lif_backward_rejects_flags_it_does_not_take(flags):
    one = torch.tensor(1.0)
    bad = op_flags.DECAY_IS_TAU | flags
    with pytest.raises(RuntimeError, match=f"lif_backward: flags {bad} has bits this op does not "
                                           "take"):
        torch.ops.pypaper.lif_backward(torch.ones(3, 4), None, None, torch.ones(3, 4), None,
                                       one * 2, one, 0.0, 1, 2.0, bad)


def test_online_helper_arguments():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), neuron.LIFNode())
    x, y = torch.randn(5, 2, 4), torch.randint(0, 3, (2,))
    loss = torch.nn.functional.cross_entropy
    with pytest.raises(ValueError, match=r"k must be an integer in 1..T \(5\)"):
        sltt.train_step_online(model, x, y, loss, k=6)
    with pytest.raises(ValueError, match="model has no pypaper.snn neurons"):
        sltt.train_step_online(torch.nn.Linear(4, 3), x, y, loss)
    with pytest.raises(ValueError, match=r"x_seq must be a tensor of shape \[T, N, \*\]"):
        sltt.train_step_online(model, torch.randn(4), y, loss)


@pytest.mark.parametrize("hook", ["neuronal_charge", "neuronal_fire", "neuronal_reset",
                                  "single_step_functional_forward"])
def test_subclass_with_spikingjelly_dynamics_hook_is_refused(hook):
    """SpikingJelly's per-step hooks would be silently ignored by the fused op: a subclass that
    defines one fails at class definition, naming the hook."""
    with pytest.raises(TypeError, match=f"defines {hook}: pypaper's LIFNode runs the fused"):
        type("MyLIF", (neuron.LIFNode,), {hook: lambda self, *a: None})


def test_subclass_with_a_hook_from_a_mixin_is_refused():
    class ChargeMixin:
        def neuronal_charge(self, x):
            pass

    with pytest.raises(TypeError, match="defines neuronal_charge: pypaper's LIFNode runs the"):
        type("Mixed", (ChargeMixin, neuron.LIFNode), {})


def test_subclass_calling_its_own_hook_from_its_step_forward_is_accepted():
    class Own(neuron.LIFNode):
        def neuronal_charge(self, x):
            return 2 * x

        def single_step_forward(self, x):
            return super().single_step_forward(self.neuronal_charge(x))

    x = torch.full((3, 4), 0.6)
    assert torch.equal(Own()(x), neuron.LIFNode()(2 * x))


def test_subclass_overriding_the_step_forward_still_works():
    class Scaled(neuron.LIFNode):
        def single_step_forward(self, x):
            return super().single_step_forward(2 * x)

    x = torch.full((3, 4), 0.6)
    assert torch.equal(Scaled()(x), neuron.LIFNode()(2 * x))
