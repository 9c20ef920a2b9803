"""The op contract of pypaper::hopfield_retrieve / hopfield_retrieve_backward: the fused C++ op
against the materialising reference loop (pypaper/hopfield/reference.py), gradcheck in fp64,
opcheck, torch.compile(fullgraph=True), odd / empty shapes, non-contiguous inputs, masks, the
per-head step limits and the in-op convergence check, and memory kept for backward.

Tolerances (against the float64 reference on the same inputs):
  float64: 1e-10 (forward and gradients);
  float32: 2e-5 forward, 1e-4 gradients (relative to the gradient's scale);
  bf16 / fp16: the fused op's error is at most 2x (+ a small floor) the error of the plain-PyTorch
      loop run in that dtype (DESIGN.md's rule for fused low-precision kernels).
"""
import pytest
import torch

import pypaper
from pypaper import _ext
from pypaper.hopfield import hopfield_retrieve, reference

pytestmark = pytest.mark.skipif(not (_ext.LOADED and hasattr(torch.ops.pypaper, "hopfield_retrieve")),
                                reason="pypaper._C with the hopfield op is not built")

OP = torch.ops.pypaper.hopfield_retrieve.default


def make(B=2, H=3, L=5, S=7, d=4, dv=3, dtype=torch.float64, scale=1.0):
    q = torch.randn(B, H, L, d, dtype=dtype) * scale
    k = torch.randn(B, H, S, d, dtype=dtype) * scale
    v = torch.randn(B, H, S, dv, dtype=dtype)
    return q, k, v


def ref(q, k, v, *a, **kw):
    return reference.retrieve(q.double(), k.double(), v.double(), *a, **kw)


STEP_CASES = [0, 1, 3, [0, 2, 5], None]


@pytest.mark.parametrize("steps", STEP_CASES)
def test_forward_matches_reference_fp64(steps):
    q, k, v = make()
    out, n = hopfield_retrieve(q, k, v, [0.7, 1.3, 0.2], steps, 1e-4, return_steps=True)
    want, n_want = ref(q, k, v, [0.7, 1.3, 0.2], steps, 1e-4)
    assert torch.equal(n, n_want)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)


def test_convergence_check_stops_heads_early_like_hflayers():
    # large beta: P is nearly one-hot after one update, so heads stop before their limit
    q, k, v = make(B=3, H=4, L=6, S=9, d=8)
    betas = [4.0, 2.0, 0.05, 1.0]
    out, n = hopfield_retrieve(q, k, v, betas, 50, 1e-3, return_steps=True)
    want, n_want = ref(q, k, v, betas, 50, 1e-3)
    assert torch.equal(n, n_want)
    assert int(n.max()) < 50 and int(n.min()) >= 1
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)


def test_unbounded_steps_run_until_converged():
    q, k, v = make()
    out, n = hopfield_retrieve(q, k, v, 1.0, None, 1e-6, return_steps=True)
    want, n_want = ref(q, k, v, 1.0, None, 1e-6)
    assert torch.equal(n, n_want)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    out2 = hopfield_retrieve(q, k, v, 1.0, -1, 1e-6)
    assert torch.equal(out, out2)


def test_per_head_steps_may_be_none_for_until_converged():
    q, k, v = make()
    H = q.shape[1]
    limits = [None if h % 2 else h for h in range(H)]
    out, n = hopfield_retrieve(q, k, v, 1.0, limits, 1e-6, return_steps=True)
    out2, n2 = hopfield_retrieve(q, k, v, 1.0, [-1 if s is None else s for s in limits], 1e-6,
                                 return_steps=True)
    assert torch.equal(out, out2) and torch.equal(n, n2)
    assert int(n[0]) == 0 and all(int(n[h]) <= h for h in range(0, H, 2))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5)])
@pytest.mark.parametrize("steps", [0, 3])
def test_forward_fp32(dtype, tol, steps):
    q, k, v = make(B=2, H=2, L=33, S=300, d=16, dv=8, dtype=dtype)
    out = hopfield_retrieve(q, k, v, 0.25, steps, 0.0)
    want, _ = ref(q, k, v, 0.25, steps, 0.0)
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("steps", [0, 2])
def test_low_precision_within_2x_of_plain_pytorch(dtype, steps):
    q, k, v = make(B=2, H=2, L=40, S=70, d=16, dv=8, dtype=torch.float64)
    want, _ = ref(q, k, v, 0.3, steps, 0.0)
    ql, kl, vl = q.to(dtype), k.to(dtype), v.to(dtype)
    fused = hopfield_retrieve(ql, kl, vl, 0.3, steps, 0.0)
    assert fused.dtype == dtype
    plain, _ = reference.retrieve(ql, kl, vl, 0.3, steps, 0.0)
    err_fused = (fused.double() - want).abs().max().item()
    err_plain = (plain.double() - want).abs().max().item()
    assert err_fused <= 2 * err_plain + 1e-3, (err_fused, err_plain)


@pytest.mark.parametrize("steps", [0, 2, [0, 1, 3]])
def test_gradcheck_fp64_with_masks(steps):
    q, k, v = (t.requires_grad_() for t in make(B=2, H=3, L=3, S=5, d=3, dv=2))
    am = torch.rand(3, 5) < 0.3
    am[:, 0] = False
    pm = torch.zeros(2, 5, dtype=torch.bool)
    pm[1, -2:] = True
    f = lambda q, k, v: hopfield_retrieve(q, k, v, [0.7, 1.3, 0.2], steps, 1e-4, am, pm)  # noqa
    assert torch.autograd.gradcheck(f, (q, k, v))


@pytest.mark.parametrize("steps", [0, 3])
def test_fp32_gradients_match_reference(steps):
    q, k, v = make(B=2, H=2, L=70, S=260, d=16, dv=8, dtype=torch.float32)
    qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    g = torch.randn(2, 2, 70, 8)
    out = hopfield_retrieve(q, k, v, 0.3, steps, 0.0)
    gs = torch.autograd.grad(out, (q, k, v), g)
    want, _ = reference.retrieve(qd, kd, vd, 0.3, steps, 0.0)
    ws = torch.autograd.grad(want, (qd, kd, vd), g.double())
    for a, b in zip(gs, ws):
        scale = b.abs().max().item()
        assert (a.double() - b).abs().max().item() <= 1e-4 * scale + 1e-6


def test_additive_and_3d_masks_and_uint8():
    q, k, v = make(B=2, H=3, L=5, S=7)
    am3 = torch.randn(6, 5, 7)  # hflayers' [B*H, L, S] float mask
    out = hopfield_retrieve(q, k, v, 1.0, 2, 1e-4, am3)
    want, _ = ref(q, k, v, 1.0, 2, 1e-4, am3.view(2, 3, 5, 7))
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    pm8 = torch.zeros(2, 7, dtype=torch.uint8)
    pm8[0, :3] = 1
    out8 = hopfield_retrieve(q, k, v, 1.0, 2, 1e-4, pad_mask=pm8)
    outb = hopfield_retrieve(q, k, v, 1.0, 2, 1e-4, pad_mask=pm8.bool())
    assert torch.equal(out8, outb)
    # padded stored patterns change nothing when masked
    kx = torch.cat([k, torch.randn(2, 3, 4, 4, dtype=k.dtype)], 2)
    vx = torch.cat([v, torch.randn(2, 3, 4, 3, dtype=v.dtype)], 2)
    pad = torch.zeros(2, 11, dtype=torch.bool)
    pad[:, 7:] = True
    torch.testing.assert_close(hopfield_retrieve(q, kx, vx, 1.0, 3, 1e-4, pad_mask=pad),
                               hopfield_retrieve(q, k, v, 1.0, 3, 1e-4), rtol=1e-12, atol=1e-12)


def test_fully_masked_row_is_nan_like_softmax():
    q, k, v = make(B=1, H=1, L=2, S=3)
    am = torch.zeros(2, 3, dtype=torch.bool)
    am[0] = True
    out = hopfield_retrieve(q, k, v, 1.0, 0, 1e-4, am)
    want, _ = ref(q, k, v, 1.0, 0, 1e-4, am)
    assert torch.isnan(out[0, 0, 0]).all() and torch.isnan(want[0, 0, 0]).all()
    torch.testing.assert_close(out[0, 0, 1], want[0, 0, 1])


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 2, 7, 129), (2, 1, 129, 7), (3, 2, 0, 5),
                                   (2, 2, 4, 0)])
def test_odd_and_empty_shapes(shape):
    B, H, L, S = shape
    q, k, v = make(B, H, L, S, d=5, dv=3, dtype=torch.float64)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = hopfield_retrieve(q, k, v, 0.5, 2, 1e-4)
    want, _ = reference.retrieve(q, k, v, 0.5, 2, 1e-4)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    if out.numel():
        g = torch.randn_like(out)
        a = torch.autograd.grad(out, (q, k, v), g)
        b = torch.autograd.grad(want, (q, k, v), g)
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-9)


def test_non_contiguous_and_broadcast_inputs():
    base = torch.randn(2, 6, 3, 8, dtype=torch.float64)
    q = base.transpose(1, 2)  # [2, 3, 6, 8] non-contiguous
    k = torch.randn(2, 9, 3, 8, dtype=torch.float64).transpose(1, 2)
    v = torch.randn(1, 3, 9, 4, dtype=torch.float64).expand(2, 3, 9, 4)  # broadcast over batch
    mask = torch.zeros(1, 1, 1, 9, dtype=torch.bool)
    mask[..., 2] = True
    got = hopfield_retrieve(q, k, v, 0.4, 2, 1e-4, mask)
    want = hopfield_retrieve(q.contiguous(), k.contiguous(), v.contiguous(), 0.4, 2, 1e-4,
                             mask.expand(2, 3, 6, 9).contiguous())
    assert torch.equal(got, want)


def _samples():
    q, k, v = make()
    am = torch.zeros(1, 1, 5, 7)
    am[..., 1] = float("-inf")
    pm = torch.zeros(2, 7)
    pm[1, 0] = float("-inf")
    yield (q, k, v, [0.5], [2], [1e-4], None, None)
    yield (q, k, v, [0.5, 1.0, 2.0], [0, 1, 3], [1e-4, 1e-3, 1e-4], am, pm)
    q, k, v = make(dtype=torch.float32)
    yield (q, k, v, [0.5], [1], [0.0], None, None)


@pytest.mark.parametrize("grad", [False, True])
def test_opcheck(grad):
    for args in _samples():
        args = list(args)
        if grad:
            args[:3] = [t.clone().requires_grad_() for t in args[:3]]
        torch.library.opcheck(OP, tuple(args))


def test_opcheck_backward():
    q, k, v = make()
    out, states, lse, n = OP(q, k, v, [0.5], [2], [1e-4], None, None)
    torch.library.opcheck(torch.ops.pypaper.hopfield_retrieve_backward.default,
                          (torch.randn_like(out), q, k, v, out, states, lse, n, [0.5], None, None))


def test_torch_compile_fullgraph_training_step():
    torch._dynamo.reset()
    proj = torch.nn.Linear(8, 8 * 3)

    def step(x):
        q, k, v = proj(x).view(2, 5, 3, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)
        out = hopfield_retrieve(q, k, v, 0.5, 2, 1e-4)
        return out.square().mean()

    x = torch.randn(2, 5, 8)
    compiled = torch.compile(step, fullgraph=True)
    with torch._inductor.config.patch(fx_graph_cache=False):  # no stale graphs from other builds
        loss = compiled(x)
        loss.backward()
    g_c = proj.weight.grad.clone()
    proj.weight.grad = None
    step(x).backward()
    torch.testing.assert_close(loss, step(x))
    torch.testing.assert_close(g_c, proj.weight.grad, rtol=1e-5, atol=1e-6)


def test_saved_bytes_grow_with_steps_by_L_d_only():
    """Autograd keeps the states (O(steps L d)) and lse (O(steps L)), never an L x S matrix."""
    B, H, L, S, d = 2, 2, 64, 512, 16

    def saved_bytes(steps):
        q, k, v = (t.float().requires_grad_() for t in make(B, H, L, S, d, d))
        total = []

        def pack(t):
            total.append(t.numel() * t.element_size() if t.data_ptr() not in
                         (q.data_ptr(), k.data_ptr(), v.data_ptr()) else 0)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            hopfield_retrieve(q, k, v, 0.25, steps, 0.0)
        return sum(total)

    b0, b1, b4 = saved_bytes(0), saved_bytes(1), saved_bytes(4)
    per_step = B * H * L * d * 4 + B * H * L * 4  # one state + one lse row set (fp32)
    assert b1 - b0 == per_step and b4 - b0 == 4 * per_step
    assert b4 < B * H * L * S * 4  # less than ONE association matrix


def test_reference_backend_is_selectable():
    q, k, v = make()
    with pypaper.use_backend("reference"):
        a = hopfield_retrieve(q, k, v, 0.5, 2, 1e-4)
    b = hopfield_retrieve(q, k, v, 0.5, 2, 1e-4)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
