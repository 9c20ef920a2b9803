"""The C++ kernel against the plain-PyTorch reference (autograd through its time loop), for every
surrogate x hard/soft reset x decay_input x detach_reset, per-layer and per-neuron parameters:
forward to the bit, every gradient (x, v_init, tau or k, threshold) to the tolerance table."""
import pytest
import torch

import pypaper
from pypaper.snn import lif_multi_step

from .helpers import CONFIGS, assert_close, config_id, inputs, surrogate_of


def run(backend, cfg, dtype, per_neuron, div, sltt=False, store_v_seq=True, shape=(7, 3, 5, 4)):
    """Forward and all gradients of one configuration on one backend."""
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) + 0.6).to(dtype)
    feat = shape[2:] if per_neuron else ()
    v0 = (torch.rand(shape[1:], generator=gen, dtype=torch.float64) * 0.8).to(dtype)
    tau = (1.3 + torch.rand(feat, generator=gen, dtype=torch.float64) * 3).to(dtype)
    decay = tau if div else 1.0 / tau
    vth = (0.8 + torch.rand(feat, generator=gen, dtype=torch.float64) * 0.4).to(dtype)
    g_s = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    g_v = torch.randn(shape[1:], generator=gen, dtype=torch.float64).to(dtype)
    g_seq = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    leaves = [t.clone().requires_grad_() for t in (x, v0, decay, vth)]
    xx, vv, dd, tt = leaves
    kw = {"tau": dd} if div else {"k": dd}
    with pypaper.use_backend(backend):
        s, v_last, v_seq = lif_multi_step(
            xx, vv, v_threshold=tt, v_reset=cfg["v_reset"],
            surrogate_function=surrogate_of(cfg["surrogate"]), decay_input=cfg["decay_input"],
            detach_reset=cfg["detach_reset"], sltt=sltt, store_v_seq=store_v_seq, **kw)
    loss = (s * g_s).sum() + (v_last * g_v).sum()
    if store_v_seq:
        loss = loss + (v_seq * g_seq).sum()
    loss.backward()
    return (s.detach(), v_last.detach(), v_seq.detach() if store_v_seq else None), \
        [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("per_neuron,div", [(False, True), (True, False)])
@pytest.mark.parametrize("cfg", CONFIGS, ids=config_id)
def test_kernel_matches_reference(cfg, per_neuron, div, dtype):
    (s, v, vs), grads = run("cpu", cfg, dtype, per_neuron, div)
    (rs, rv, rvs), rgrads = run("reference", cfg, dtype, per_neuron, div)
    assert torch.equal(s, rs) and torch.equal(v, rv) and torch.equal(vs, rvs)
    assert 0.02 < float(s.float().mean()) < 0.98
    for name, a, b in zip(("x", "v_init", "decay", "v_threshold"), grads, rgrads):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert_close(a, b, dtype, name)


@pytest.mark.parametrize("cfg", CONFIGS[::3], ids=config_id)
def test_sltt_gradients_match_the_definition(cfg):
    """SLTT's definition, written out in plain autograd: the charge reads V.detach()."""
    (s, v, vs), grads = run("cpu", cfg, torch.float64, True, False, sltt=True)
    gen = torch.Generator().manual_seed(1)  # the inputs run() drew
    x = torch.randn((7, 3, 5, 4), generator=gen, dtype=torch.float64) + 0.6
    v0 = torch.rand((3, 5, 4), generator=gen, dtype=torch.float64) * 0.8
    tau = 1.3 + torch.rand((5, 4), generator=gen, dtype=torch.float64) * 3
    k = 1.0 / tau
    vth = 0.8 + torch.rand((5, 4), generator=gen, dtype=torch.float64) * 0.4
    g_s = torch.randn((7, 3, 5, 4), generator=gen, dtype=torch.float64)
    g_v = torch.randn((3, 5, 4), generator=gen, dtype=torch.float64)
    g_seq = torch.randn((7, 3, 5, 4), generator=gen, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (x, v0, k, vth)]
    xx, v, kk, th = leaves
    fn = surrogate_of(cfg["surrogate"])
    hard = cfg["v_reset"] is not None
    vr = cfg["v_reset"] if hard else 0.0
    loss = 0
    for t in range(7):
        vp = v.detach()  # SLTT: no gradient through the membrane carried from step t-1
        h = vp + (xx[t] - (vp - vr)) * kk if cfg["decay_input"] else vp - (vp - vr) * kk + xx[t]
        spk = fn(h - th)
        sr = spk.detach() if cfg["detach_reset"] else spk
        v = sr * vr + (1 - sr) * h if hard else h - sr * th
        loss = loss + (spk * g_s[t]).sum() + (v * g_seq[t]).sum()
    loss = loss + (v * g_v).sum()
    loss.backward()
    assert grads[1].abs().max() == 0  # nothing flows into the initial membrane
    for name, a, b in zip(("x", "v_init", "k", "v_threshold"), grads, [t.grad for t in leaves]):
        if b is None:
            b = torch.zeros_like(a)
        assert_close(a, b, torch.float64, name)


def test_sltt_spatial_gradient_is_the_surrogate_only():
    """Without v outputs in the loss, SLTT's dL/dX[t] = dL/dS[t] sigma'(H[t] - Vth) k."""
    x = inputs((5, 2, 9), torch.float64).requires_grad_()
    s, v, _ = lif_multi_step(x, tau=2.0, surrogate_function=surrogate_of("ATan"), sltt=True,
                             v_reset=None)
    g = torch.randn_like(s)
    (s * g).sum().backward()
    # recompute H with the reference forward (the forward does not change under SLTT)
    h = []
    vv = torch.zeros(2, 9, dtype=torch.float64)
    for t in range(5):
        ht = vv + (x.detach()[t] - vv) / 2.0
        st = (ht >= 1.0).double()
        vv = ht - st
        h.append(ht)
    h = torch.stack(h)
    want = g * surrogate_of("ATan").derivative(h - 1.0) / 2.0
    assert torch.allclose(x.grad, want, rtol=1e-12, atol=1e-14)


def test_gradients_are_deterministic_across_thread_counts():
    cfg = CONFIGS[5]
    shape = (4, 64, 37)  # several 512-neuron chunks, per-neuron and scalar reductions
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run("cpu", cfg, torch.float32, True, False, shape=shape)[1]
        one_s = run("cpu", cfg, torch.float32, False, True, shape=shape)[1]
        torch.set_num_threads(2)
        two = run("cpu", cfg, torch.float32, True, False, shape=shape)[1]
        two_s = run("cpu", cfg, torch.float32, False, True, shape=shape)[1]
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one + one_s, two + two_s):
        assert torch.equal(a, b)
