"""The Triton twin of the Hopfield retrieval (pypaper/hopfield/triton_kernels.py) against the
C++ op and the float64 reference. Without a GPU the kernels run under TRITON_INTERPRET=1 on CPU
tensors (set below, before triton or pypaper is imported; small sizes for the interpreter); with
one, compiled on CUDA.

Tolerances: float64 1e-10 (forward and gradients); float32 2e-5 forward, 1e-4 relative
gradients (tl.dot in IEEE fp32 accumulates in another order than MKL); per-head step counts equal.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

pytest.importorskip("triton")

import pypaper  # noqa: E402
from pypaper.hopfield import _registration, hopfield_retrieve, reference  # noqa: E402

tk = _registration.load_triton()
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_OK, _WHY = tk.triton_available(DEVICE)

pytestmark = [pytest.mark.triton, pytest.mark.skipif(not _OK, reason=_WHY)]


def make(B=2, H=3, L=5, S=7, d=4, dv=3, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(*s, generator=g, dtype=dtype).to(DEVICE)
            for s in ((B, H, L, d), (B, H, S, d), (B, H, S, dv))]


def _run(backend, q, k, v, *args, **kw):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    with pypaper.use_backend(backend):
        out, n = hopfield_retrieve(q, k, v, *args, return_steps=True, **kw)
    g = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).view_as(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    return out, n, grads


@pytest.mark.parametrize("steps", [0, 2, [0, 2, 5], None])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_triton_matches_reference_with_masks(steps, dtype):
    q, k, v = make(dtype=dtype)
    am = (torch.rand(5, 7, generator=torch.Generator().manual_seed(1)) < 0.3).to(DEVICE)
    am[:, 0] = False
    pm = torch.zeros(2, 7, dtype=torch.bool, device=DEVICE)
    pm[1, -2:] = True
    args = ([0.7, 1.3, 0.2], steps, 1e-3 if steps is None else 1e-4, am, pm)
    o_t, n_t, g_t = _run("triton", q, k, v, *args)
    o_r, n_r, g_r = _run("reference", q.double(), k.double(), v.double(), *args)
    assert torch.equal(n_t.cpu(), n_r.cpu())
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(o_t.double(), o_r, rtol=tol, atol=tol)
    for a, b in zip(g_t, g_r):
        scale = b.abs().max().item()
        gtol = 1e-10 if dtype == torch.float64 else 1e-4
        assert (a.double() - b).abs().max().item() <= gtol * max(scale, 1.0)


def test_triton_odd_shapes_and_low_precision():
    for shape in ((1, 1, 1, 1), (1, 2, 17, 40), (2, 1, 0, 5)):
        B, H, L, S = shape
        q, k, v = make(B, H, L, S, d=5, dv=3)
        o_t = _run("triton", q, k, v, 0.5, 1, 1e-4)[0]
        o_r = _run("reference", q, k, v, 0.5, 1, 1e-4)[0]
        torch.testing.assert_close(o_t, o_r, rtol=1e-10, atol=1e-10)
    q, k, v = make(1, 2, 9, 20, d=8, dv=8)
    want = reference.retrieve(q, k, v, 0.4, 2, 0.0)[0]
    for dt in (torch.bfloat16, torch.float16):
        with pypaper.use_backend("triton"):
            fused = hopfield_retrieve(q.to(dt), k.to(dt), v.to(dt), 0.4, 2, 0.0)
        plain = reference.retrieve(q.to(dt), k.to(dt), v.to(dt), 0.4, 2, 0.0)[0]
        assert fused.dtype == dt
        ef = (fused.double() - want).abs().max().item()
        ep = (plain.double() - want).abs().max().item()
        assert ef <= 2 * ep + 1e-3


def test_triton_opcheck():
    q, k, v = make()
    torch.library.opcheck(torch.ops.pypaper.hopfield_retrieve_triton.default,
                          (q, k, v, [0.5, 1.0, 2.0], [0, 1, 2], [1e-4], None, None),
                          test_utils=("test_schema", "test_faketensor"))
