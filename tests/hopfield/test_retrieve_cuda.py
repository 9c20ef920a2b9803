"""CUDA kernels of the Hopfield retrieval (kernels/cuda/hopfield_kernels.cu,
csrc/hopfield/hopfield_cuda.cpp) against the C++ CPU op on CPU copies of the same inputs.

Tolerances: float64 1e-10; float32 1e-5 forward, 1e-4 relative gradients (another summation
order: per-thread partial sums and atomics); per-head step counts equal.
Imports pypaper only inside the tests, so the file collects on machines without a GPU, where
every test is skipped."""
import pytest
import torch

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]


def _run(backend, device, q, k, v, *args):
    import pypaper
    from pypaper.hopfield import hopfield_retrieve

    q, k, v = (t.detach().to(device).requires_grad_() for t in (q, k, v))
    mask = args[3].to(device) if len(args) > 3 and args[3] is not None else None
    args = args[:3] + ((mask,) if len(args) > 3 else ())
    with pypaper.use_backend(backend):
        out, n = hopfield_retrieve(q, k, v, *args, return_steps=True)
    g = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=device).view_as(out)
    return [t.cpu() for t in (out, n, *torch.autograd.grad(out, (q, k, v), g))]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("steps", [0, 3, [0, 2, 5], None])
def test_cuda_matches_cpu(dtype, steps):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 37, 16, generator=g, dtype=dtype)
    k = torch.randn(2, 3, 300, 16, generator=g, dtype=dtype)
    v = torch.randn(2, 3, 300, 8, generator=g, dtype=dtype)
    am = torch.rand(37, 300, generator=g) < 0.2
    am[:, 0] = False
    args = ([0.3, 0.6, 1.2], steps, 1e-4, am)
    got = _run("cuda", "cuda", q, k, v, *args)
    want = _run("cpu", "cpu", q, k, v, *args)
    assert torch.equal(got[1], want[1])
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got[0], want[0], rtol=tol, atol=tol)
    for a, b in zip(got[2:], want[2:]):
        gt = 1e-10 if dtype == torch.float64 else 1e-4
        assert (a - b).abs().max().item() <= gt * max(b.abs().max().item(), 1.0)


def test_cuda_16bit_and_layer():
    from pypaper.hopfield import Hopfield, hopfield_retrieve

    q, k, v = (torch.randn(2, 2, 9, 32, device="cuda") for _ in range(3))
    for dt in (torch.float16, torch.bfloat16):
        out = hopfield_retrieve(q.to(dt), k.to(dt), v.to(dt), 0.2, 2, 1e-4)
        want = hopfield_retrieve(q.cpu().double(), k.cpu().double(), v.cpu().double(), 0.2, 2,
                                 1e-4)
        assert out.dtype == dt
        assert (out.cpu().double() - want).abs().max() < 5e-2
    m = Hopfield(input_size=32, num_heads=4, update_steps_max=2).cuda()
    x = torch.randn(3, 7, 32, device="cuda")
    ref = Hopfield(input_size=32, num_heads=4, update_steps_max=2)
    ref.load_state_dict({k_: t.cpu() for k_, t in m.state_dict().items()})
    torch.testing.assert_close(m(x).cpu(), ref(x.cpu()), rtol=1e-4, atol=1e-5)
