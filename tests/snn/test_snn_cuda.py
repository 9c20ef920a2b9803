"""The LIF op on CUDA tensors: the automatic choice serves them (the CUDA kernel once it is
registered, else Triton, else the plain-PyTorch reference) and agrees with the CPU kernel.
Every test is skipped on machines without a GPU."""
import pytest
import torch

import pypaper
from pypaper.snn import backend_for, lif_multi_step, neuron, surrogate

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]


@pytest.mark.parametrize("v_reset", [0.0, None])
def test_cuda_matches_cpu(v_reset):
    x = torch.randn(8, 4, 33, dtype=torch.float64) + 0.6
    xc = x.cuda().requires_grad_()
    xh = x.clone().requires_grad_()
    kw = dict(tau=1.7, v_reset=v_reset, surrogate_function=surrogate.ATan(), store_v_seq=True)
    got = lif_multi_step(xc, **kw)
    want = lif_multi_step(xh, **kw)
    # the CUDA kernel where this build has it (the file's claim), else the Triton twin, else
    # the reference: named, so that a silent fallback cannot pass as the kernel
    from pypaper._triton import HAVE_TRITON
    from pypaper.snn import ops

    want_backend = "cuda" if ops._KERNELS["CUDA"] else "triton" if HAVE_TRITON else "reference"
    assert backend_for(xc) == want_backend, (backend_for(xc), want_backend)
    for a, b in zip(got, want):
        assert torch.equal(a.cpu(), b)
    got[0].sum().backward()
    want[0].sum().backward()
    assert torch.allclose(xc.grad.cpu(), xh.grad, rtol=1e-10, atol=1e-12)


def test_reference_backend_runs_a_module_on_cuda():
    node = neuron.ParametricLIFNode(step_mode="m", tau_shape=(5,)).cuda()
    with pypaper.use_backend("reference"):
        s = node(torch.randn(3, 2, 5, device="cuda") + 1)
    s.sum().backward()
    assert s.device.type == "cuda" and node.w.grad.shape == (5,)
    # the same module's gradient on the CPU, from the same weights and inputs
    cpu = neuron.ParametricLIFNode(step_mode="m", tau_shape=(5,))
    cpu.load_state_dict(node.state_dict())
    torch.manual_seed(0)
    x = torch.randn(3, 2, 5) + 1
    for m, xx in ((node, x.cuda()), (cpu, x)):
        m.reset()
        m.w.grad = None
        with pypaper.use_backend("reference"):
            m(xx).sum().backward()
    torch.testing.assert_close(node.w.grad.cpu(), cpu.w.grad)
