"""The CPU forward multiplies by 1/tau instead of dividing when every tau is a power of two
(csrc/snn/snn_cpu.cpp: all_powers_of_two): the results must stay SpikingJelly's "/ tau" to the bit,
for scalar and per-neuron tau, subnormal and huge currents included, and tau that are not powers
of two must keep dividing."""
import pytest
import torch

from pypaper import snn
from pypaper.snn import reference

pytestmark = pytest.mark.skipif(snn.ops.backend_for(torch.zeros(1, 1)) != "cpu",
                                reason="the C++ CPU kernel is not built")


def _currents(dtype, shape=(9, 5, 64)):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 0.6
    flat = x.view(-1)
    tiny = torch.finfo(dtype).tiny
    flat[:8] = torch.tensor([tiny * 0.75, -tiny * 0.25, tiny, 1e30, -1e30, 0.0, -0.0, 1.5])
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tau", [2.0, 4.0, 2.0 ** 20, 3.0, 1.5])
@pytest.mark.parametrize("v_reset", [0.0, None])
def test_forward_equals_the_dividing_reference(dtype, tau, v_reset):
    x = _currents(dtype)
    mdt = reference.default_math_dtype(dtype)
    s, v, vs = snn.lif_multi_step(x, tau=tau, v_reset=v_reset, store_v_seq=True)
    rs, rv, rvs = reference.lif_multi_step(x, None, torch.tensor(tau, dtype=mdt),
                                           torch.tensor(1.0, dtype=mdt), v_reset, 1, 2.0, True,
                                           True, False, False, True)
    assert torch.equal(s, rs) and torch.equal(v, rv) and torch.equal(vs, rvs)


@pytest.mark.parametrize("taus", [[2.0, 4.0, 8.0, 2.0], [2.0, 4.0, 3.0, 2.0]])
def test_per_neuron_tau(taus):
    x = _currents(torch.float32, (7, 3, 4))
    tau = torch.tensor(taus)
    s, v, _ = snn.lif_multi_step(x, tau=tau, decay_input=False)
    rs, rv, _ = reference.lif_multi_step(x, None, tau, torch.tensor(1.0), 0.0, 1, 2.0, False, True,
                                         False, False, False)
    assert torch.equal(s, rs) and torch.equal(v, rv)


def test_gradients_unchanged_by_the_multiply():
    x = _currents(torch.float32, (6, 4, 16)).clamp(-5, 5).requires_grad_()
    g = torch.randn_like(x)
    sur = snn.surrogate.ATan()
    gx, = torch.autograd.grad(snn.lif_multi_step(x, tau=2.0, surrogate_function=sur)[0], x, g)
    xr = x.detach().clone().requires_grad_()
    out = reference.lif_multi_step(xr, None, torch.tensor(2.0), torch.tensor(1.0), 0.0, 1, 2.0,
                                   True, True, False, False, False)[0]
    gr, = torch.autograd.grad(out, xr, g)
    torch.testing.assert_close(gx, gr, rtol=2e-5, atol=1e-6)
