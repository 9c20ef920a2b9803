"""Parameters with one value per sample and neuron (shape x.shape[1:]): SpikingJelly's
functional.set_threshold_margin assigns an output layer's v_threshold = [N, C] tensor (threshold1
at the label, threshold0 elsewhere) while training. pypaper refused it (the op takes one value or
one per neuron); lif_multi_step now runs such a call as one batch row of N * C neurons. The
expectation is by definition: sample i's result is the call on sample i alone with its row of
the parameter as a per-neuron one."""
import pytest
import torch

from pypaper import _ext
from pypaper.snn import functional, lif_multi_step, neuron, surrogate

pytestmark = pytest.mark.skipif(not _ext.LOADED, reason="pypaper._C not built")

N, C, T = 4, 3, 7


def _labels():
    return torch.nn.functional.one_hot(torch.tensor([1, 0, 2, 1]), C).float()


def _margin(lab, lo=0.9, hi=1.1):
    return torch.where(lab == 1, hi, lo)


@pytest.mark.parametrize("step_mode", ["s", "m"])
@pytest.mark.parametrize("v_reset", [0.0, None])
def test_set_threshold_margin(step_mode, v_reset):
    torch.manual_seed(0)
    x = torch.rand(T, N, C) * 1.6
    tau = torch.tensor([2.0, 3.0, 1.5])  # per neuron, broadcast over the batch
    lif = neuron.LIFNode(tau=tau, v_reset=v_reset, step_mode=step_mode)
    functional.set_threshold_margin(lif, _labels())
    assert tuple(lif.v_threshold.shape) == (N, C)
    xx = x.clone().requires_grad_()
    s = torch.stack([lif(a) for a in xx]) if step_mode == "s" else lif(xx)
    g = torch.randn_like(s)
    ((s * g).sum() + lif.v.sum()).backward()
    assert 0.1 < s.mean() < 0.9  # the thresholds decide spikes
    th = _margin(_labels())
    for i in range(N):
        one = neuron.LIFNode(tau=tau, v_reset=v_reset, step_mode="m")
        one.v_threshold = th[i]  # per neuron
        xi = x[:, i:i + 1].clone().requires_grad_()
        si = one(xi)
        ((si * g[:, i:i + 1]).sum() + one.v.sum()).backward()
        assert torch.equal(si, s[:, i:i + 1])
        assert torch.equal(one.v, lif.v[i:i + 1])
        assert torch.equal(xi.grad, xx.grad[:, i:i + 1])
    lif.eval()
    functional.set_threshold_margin(lif, _labels(), eval_threshold=1.0)
    assert lif.v_threshold == 1.0


@pytest.mark.parametrize("which", ["tau", "k", "v_threshold"])
def test_per_sample_parameter_gradients(which):
    """A per-sample tau, k or threshold that requires grad gets its own [N, C] gradient; the
    per-neuron tau beside a per-sample threshold gets the batch's sum (through the broadcast)."""
    torch.manual_seed(1)
    x = (torch.rand(T, N, C) * 2).requires_grad_()
    vals = {"tau": 2.0 + torch.rand(N, C), "k": 0.3 + 0.5 * torch.rand(N, C),
            "v_threshold": 0.8 + 0.4 * torch.rand(N, C)}
    p = vals[which].clone().requires_grad_()
    tau_n = torch.tensor([2.0, 3.0, 1.5], requires_grad=True)
    kw = {which: p}
    if which == "v_threshold":
        kw["tau"] = tau_n
    sur = surrogate.ATan()
    s, v, vs = lif_multi_step(x, surrogate_function=sur, store_v_seq=True, **kw)
    g = torch.randn_like(s)
    ((s * g).sum() + v.sum() + vs.sum()).backward()
    assert p.grad.shape == (N, C) and p.grad.abs().sum() > 0
    tau_sum = torch.zeros(C)
    for i in range(N):
        xi = x.detach()[:, i:i + 1].clone().requires_grad_()
        pi = p.detach()[i].clone().requires_grad_()
        ti = tau_n.detach().clone().requires_grad_()
        kwi = {which: pi}
        if which == "v_threshold":
            kwi["tau"] = ti
        si, vi, vsi = lif_multi_step(xi, surrogate_function=sur, store_v_seq=True, **kwi)
        ((si * g[:, i:i + 1]).sum() + vi.sum() + vsi.sum()).backward()
        assert torch.equal(si, s[:, i:i + 1]) and torch.equal(vsi, vs[:, i:i + 1])
        assert torch.equal(xi.grad, x.grad[:, i:i + 1])
        torch.testing.assert_close(pi.grad, p.grad[i], rtol=0, atol=0)
        if which == "v_threshold":
            tau_sum += ti.grad
    if which == "v_threshold":
        torch.testing.assert_close(tau_n.grad, tau_sum, rtol=1e-6, atol=1e-6)


def test_per_sample_matches_the_reference_backend():
    import pypaper

    torch.manual_seed(2)
    x = torch.rand(T, N, C, 2) * 2
    th = 0.8 + 0.4 * torch.rand(N, C, 2)
    v0 = torch.rand(N, C, 2) * 0.5
    got = lif_multi_step(x, v0, tau=1.7, v_threshold=th, store_v_seq=True)
    with pypaper.use_backend("reference"):
        want = lif_multi_step(x, v0, tau=1.7, v_threshold=th, store_v_seq=True)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_per_sample_under_torch_compile():
    x = torch.rand(T, N, C) * 2
    th = _margin(_labels())

    def step(x, th):
        s, v, _ = lif_multi_step(x, v_threshold=th)
        return s.sum() + v.sum()

    want = step(x, th)
    got = torch.compile(step, fullgraph=True)(x, th)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_per_sample_shape_errors_name_the_argument():
    x = torch.rand(T, N, C)
    with pytest.raises(ValueError, match=r"v_threshold has shape \(4, 2\), expected .* x.shape"
                                         r"\[1:\] = \(4, 3\) \(one per sample and neuron\)"):
        lif_multi_step(x, v_threshold=torch.ones(N, 2))
    with pytest.raises(ValueError, match=r"tau has shape \(2,\)"):
        lif_multi_step(x, tau=torch.full((2,), 2.0), v_threshold=torch.ones(N, C))
    with pytest.raises(ValueError, match=r"v has shape \(4, 2\)"):
        lif_multi_step(x, torch.zeros(N, 2), v_threshold=torch.ones(N, C))
    with pytest.raises(ValueError, match="tau must be finite and > 1"):
        lif_multi_step(x, tau=torch.full((N, C), 0.5))
    lif = neuron.LIFNode(step_mode="m")
    lif.v_threshold = torch.ones(N + 1, C)  # a batch of another size
    with pytest.raises(ValueError, match=r"v_threshold has shape \(5, 3\)"):
        lif(x)


def test_a_learnable_threshold_below_v_reset_with_a_per_sample_tau():
    """A threshold nn.Parameter may have trained to v_reset or below (then the neuron fires at
    every step); under no_grad (an eval pass) the per-sample call's reshaped view of it is no
    Parameter and does not require grad, and it was then refused."""
    x = torch.rand(T, N, C)
    vth = torch.nn.Parameter(torch.tensor([0.5, -0.25, 1.0]))
    tau = 2.0 + torch.rand(N, C)
    with torch.no_grad():
        s, _, _ = lif_multi_step(x, tau=tau, v_threshold=vth)
    assert torch.all(s[:, :, 1] == 1)
    with pytest.raises(ValueError, match="must be greater than v_reset"):
        lif_multi_step(x, tau=tau, v_threshold=vth.detach())
