"""Neuron parameters that broadcast against a step, by torch's rules.

Conv SNNs train one time constant (or threshold) per channel: ``tau_shape=(C, 1, 1)`` for steps
[N, C, H, W]. Before 2026-12-07 pypaper refused every per-neuron shape other than the full
feature shape (``ParametricLIFNode(tau_shape=(C, 1, 1))`` raised "must equal the feature shape"
at its first call, and ``convert`` left a SpikingJelly PLIF whose ``w`` had such a shape
unconverted), although SpikingJelly's neurons multiply their parameters into each step's tensors
and so take any broadcastable shape. Now the op expands such a parameter to the feature shape (a
view) and autograd sums its gradient back: the result must equal, bit for bit in the forward, a
twin whose parameter holds the expanded values, and its gradient the twin's gradient summed over
the broadcast dims. Shapes that do not broadcast, and declared per-neuron shapes that would only
broadcast as one value per sample, are still refused."""
import pytest
import torch
from torch import nn

from pypaper import _ext
from pypaper.snn import functional, layer, lif_multi_step, neuron, surrogate

pytestmark = pytest.mark.skipif(not _ext.LOADED, reason="pypaper._C not built")

C, H, W = 3, 4, 5


def _x(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) + 0.7


def _pair(step_mode, small_shape, full_shape):
    """A PLIF with per-channel w and threshold (small_shape) and its twin holding the same
    values expanded to the feature shape."""
    kw = dict(step_mode=step_mode, learnable_threshold=True, surrogate_function=surrogate.ATan(),
              detach_reset=False)
    small = neuron.ParametricLIFNode(tau_shape=small_shape, threshold_shape=small_shape, **kw)
    full = neuron.ParametricLIFNode(tau_shape=full_shape, threshold_shape=full_shape, **kw)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        small.w.copy_(torch.randn(small_shape, generator=g))
        small.v_threshold.copy_(torch.rand(small_shape, generator=g) * 0.6 + 0.6)
        full.w.copy_(small.w.expand(full_shape))
        full.v_threshold.copy_(small.v_threshold.expand(full_shape))
    return small, full


def _reduce_to(g_full, small_shape):
    """The gradient of the expanded values summed back onto small_shape."""
    return g_full.sum_to_size(small_shape)


@pytest.mark.parametrize("step_mode", ["m", "s"])
@pytest.mark.parametrize("small_shape,x_shape", [((C, 1, 1), (6, 2, C, H, W)),
                                                 ((1, W), (6, 2, H, W)),  # [N, L, C] tokens
                                                 ((C, 1), (6, 2, C, H))], ids=str)
def test_per_channel_tau_and_threshold_equal_the_expanded_twin(step_mode, small_shape, x_shape):
    full_shape = x_shape[2:]
    small, full = _pair(step_mode, small_shape, full_shape)
    x = _x(*x_shape)
    grads, outs = [], []
    for node in (small, full):
        xr = x.clone().requires_grad_()
        if step_mode == "m":
            out = node(xr)
        else:
            out = torch.stack([node(xr[t]) for t in range(x.shape[0])])
        (out * _x(*out.shape, seed=9)).sum().backward()
        outs.append(out.detach())
        grads.append((xr.grad, node.w.grad, node.v_threshold.grad))
        assert node.v.shape == x_shape[1:]
    assert outs[0].sum() > 0 and outs[0].mean() < 1  # spikes, not a constant
    assert torch.equal(outs[0], outs[1])
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-6, atol=1e-7)
    for g_small, g_full in zip(grads[0][1:], grads[1][1:]):
        assert g_small.shape == small_shape
        torch.testing.assert_close(g_small, _reduce_to(g_full, small_shape), rtol=1e-5, atol=1e-6)
    assert small.w.shape == small_shape  # the state_dict keeps the declared shape
    assert small.state_dict()["w"].shape == small_shape


def test_a_declared_shape_of_another_rank_is_refused():
    """A declared (C,) is one value per neuron of (C,) features; against [N, L, C] steps it would
    broadcast, but such a step is also what a sequence [T, N, C] fed in step_mode 's' looks like
    (set_step_mode forgotten): refused, naming the step mode; (1, C) says it."""
    node = neuron.ParametricLIFNode(tau_shape=(W,))
    with pytest.raises(ValueError, match=r"step_mode 's' got x of shape \(2, 4, 5\).*dim by dim"):
        node(_x(2, H, W))
    assert neuron.ParametricLIFNode(tau_shape=(1, W))(_x(2, H, W)).shape == (2, H, W)


@pytest.mark.parametrize("shape", [(W,), (1, W), (H, 1), (1, 1, W), (1, C, 1, 1)],
                         ids=str)
def test_op_takes_any_shape_broadcasting_to_the_features(shape):
    """lif_multi_step with tau, k or v_threshold of a broadcastable shape equals the call with
    the values expanded to the feature shape (1, C, 1, 1) too: a batch dim of 1 is the same for
    every sample."""
    x = _x(4, 2, C, H, W)
    g = torch.Generator().manual_seed(5)
    k = (torch.rand(shape, generator=g) * 0.5 + 0.3).requires_grad_()
    vth = (torch.rand(shape, generator=g) * 0.5 + 0.7).requires_grad_()
    feat = (C, H, W)
    k_full = k.detach().expand(1, *feat).reshape(feat).clone().requires_grad_() \
        if len(shape) == 4 else k.detach().expand(feat).clone().requires_grad_()
    vth_full = vth.detach().expand(1, *feat).reshape(feat).clone().requires_grad_() \
        if len(shape) == 4 else vth.detach().expand(feat).clone().requires_grad_()
    gy = _x(4, 2, C, H, W, seed=7)
    s, v, _ = lif_multi_step(x, k=k, v_threshold=vth, surrogate_function=surrogate.Sigmoid())
    s2, v2, _ = lif_multi_step(x, k=k_full, v_threshold=vth_full,
                               surrogate_function=surrogate.Sigmoid())
    assert torch.equal(s, s2) and torch.equal(v, v2)
    (s * gy).sum().backward()
    (s2 * gy).sum().backward()
    torch.testing.assert_close(k.grad, k_full.grad.reshape(k_full.shape).sum_to_size(
        k.shape[-3:] if len(shape) == 4 else shape).reshape(shape), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(vth.grad, vth_full.grad.sum_to_size(
        shape[-3:] if len(shape) == 4 else shape).reshape(shape), rtol=1e-5, atol=1e-6)


def test_a_per_sample_value_that_broadcasts_over_the_features():
    """[N, 1, 1, 1]: one threshold per sample (a margin per example), constant over its
    neurons, equals the [N, C, H, W] tensor of the same values."""
    x = _x(4, 3, C, H, W)
    vth = torch.tensor([0.6, 1.0, 1.5]).reshape(3, 1, 1, 1)
    s, v, _ = lif_multi_step(x, tau=2.0, v_threshold=vth)
    s2, v2, _ = lif_multi_step(x, tau=2.0, v_threshold=vth.expand(3, C, H, W).clone())
    assert torch.equal(s, s2) and torch.equal(v, v2)
    # the per-sample thresholds differ, so the samples' firing rates do
    rates = s.mean(dim=(0, 2, 3, 4))
    assert rates[0] > rates[1] > rates[2]


def test_shapes_that_do_not_broadcast_are_refused():
    x = _x(4, 2, C, H, W)
    with pytest.raises(ValueError, match=r"tau has shape \(4,\), expected \(\) \(one value\), "
                                         r"the feature shape x.shape\[2:\] = \(3, 4, 5\)"):
        lif_multi_step(x, tau=torch.full((4,), 2.0))
    with pytest.raises(ValueError, match=r"v_threshold has shape \(3, 1, 1, 1\)"):
        lif_multi_step(x, v_threshold=torch.ones(3, 1, 1, 1))  # 3 is neither N = 2 nor 1
    with pytest.raises(ValueError, match=r"w \(tau_shape\) has shape \(2, 3, 4, 5, 1\)"):
        neuron.ParametricLIFNode(step_mode="m", tau_shape=(2, 3, 4, 5, 1))(x)


def test_a_declared_shape_is_never_taken_per_sample():
    """tau_shape=(2, 1) declares one value per neuron; for x [T, 2, 6] it broadcasts only as
    one value per sample ([N, 1] with N = 2), which it does not mean: refused by the neuron,
    as an undeclared tensor of that shape is taken per sample by the op."""
    x = _x(4, 2, 6)
    node = neuron.ParametricLIFNode(step_mode="m", tau_shape=(2, 1))
    with pytest.raises(ValueError, match=r"must match the feature shape x.shape\[2:\] = "
                                         r"\(6,\) dim by dim"):
        node(x)
    # the same tensor passed to the op is one tau per sample (the op's documented reading)
    s, _, _ = lif_multi_step(x, tau=torch.tensor([[2.0], [50.0]]))
    s_first, _, _ = lif_multi_step(x[:, :1], tau=2.0)
    assert torch.equal(s[:, :1], s_first)


def test_per_channel_conv_snn_trains_compiled_as_eager():
    """A Conv-BN-PLIF network with one learnable time constant and threshold per channel: a few
    SGD steps under torch.compile(fullgraph=True) give the eager run's losses and parameters,
    and the per-channel time constants move apart (they are trained, per channel)."""
    def build():
        torch.manual_seed(0)
        return nn.Sequential(
            layer.Conv2d(1, 4, 3, padding=1), layer.BatchNorm2d(4),
            neuron.ParametricLIFNode(tau_shape=(4, 1, 1), learnable_threshold=True,
                                     threshold_shape=(4, 1, 1),
                                     surrogate_function=surrogate.ATan()),
            layer.Flatten(), layer.Linear(4 * 6 * 6, 3))

    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 8, 1, 6, 6, generator=g)
    y = torch.randint(0, 3, (8,), generator=g)
    runs = []
    for compiled in (False, True):
        net = build()
        functional.set_step_mode(net, "m")
        run = torch.compile(net, fullgraph=True, backend="aot_eager") if compiled else net
        opt = torch.optim.SGD(net.parameters(), lr=0.5)
        losses = []
        for _ in range(4):
            functional.reset_net(net)
            loss = nn.functional.cross_entropy(run(x).mean(0), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        plif = net[2]
        runs.append((losses, plif.w.detach().clone(), plif.v_threshold.detach().clone()))
    (l0, w0, t0), (l1, w1, t1) = runs
    torch.testing.assert_close(torch.tensor(l0), torch.tensor(l1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w0, w1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(t0, t1, rtol=1e-5, atol=1e-6)
    assert w0.shape == (4, 1, 1) and w0.flatten().unique().numel() == 4
    assert l0[-1] < l0[0]


def test_convert_takes_a_spikingjelly_plif_with_a_per_channel_w():
    """A SpikingJelly PLIF whose w was made per channel ((C, 1, 1), broadcast by its charge)
    now converts (it was left as SpikingJelly's) and gives SpikingJelly's spikes and w
    gradient."""
    pytest.importorskip("spikingjelly.activation_based")
    from spikingjelly.activation_based import functional as sf
    from spikingjelly.activation_based import neuron as sn
    from spikingjelly.activation_based import surrogate as ss

    from pypaper.snn import convert

    sj = sn.ParametricLIFNode(surrogate_function=ss.ATan(), step_mode="m")
    sj.w = nn.Parameter(torch.tensor([-0.5, 0.0, 1.0]).reshape(C, 1, 1))
    model = convert(nn.Sequential(sj))
    assert neuron._is_own(model[0]) and model[0].w is sj.w
    x = _x(5, 2, C, H, W)
    ref_node = sn.ParametricLIFNode(surrogate_function=ss.ATan(), step_mode="m")
    ref_node.w = nn.Parameter(sj.w.detach().clone())
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    sf.reset_net(ref_node)
    want = ref_node(xa)
    got = model(xb)
    gy = _x(*x.shape, seed=4)
    (want * gy).sum().backward()
    (got * gy).sum().backward()
    assert torch.equal(got, want)
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model[0].w.grad, ref_node.w.grad, rtol=1e-5, atol=1e-6)
