"""The CPU backward that reruns the forward from x (lif_forward without the keep_h flag,
lif_backward with the recompute flag) gives the gradients of the backward that reads a kept H, to
the bit: every surrogate x hard/soft reset x decay_input x detach_reset, SLTT, v_init, per-neuron
and learnable tau / k / threshold, store_v_seq with a gradient through V, fp64 inputs, T = 1,
chunk tails, many time steps, and the streamed-store sizes. With 16-bit inputs the rerun keeps H
in fp32 (a kept H is rounded to 16 bits, as GPUs keep it): its gradients are then the fp32
computation's on the same values, rounded once, to the bit."""
import pytest
import torch

import pypaper
from pypaper import snn
from pypaper.snn import op_flags, reference

from .helpers import CONFIGS, GRAD_TOL, config_id, inputs

FWD = torch.ops.pypaper.lif_forward.default
BWD = torch.ops.pypaper.lif_backward.default

pytestmark = pytest.mark.skipif(snn.ops.backend_for(torch.zeros(1, 1)) != "cpu",
                                reason="the C++ CPU kernel is not built")


def _grads(x, v0, decay, vth, keep_h, g_s, g_v, g_q, *, v_reset=0.0, sid=1, alpha=2.0,
           decay_input=True, decay_is_tau=True, detach_reset=False, sltt=False,
           store_v_seq=False):
    leaves = [t for t in (x, v0, decay, vth) if t is not None and t.requires_grad]
    s, v, _, q = FWD(x, v0, decay, vth, v_reset, sid, alpha,
                     op_flags.forward_flags(decay_input, decay_is_tau, detach_reset, sltt,
                                            store_v_seq, keep_h))
    outs, grads = [s, v], [g_s, g_v]
    if store_v_seq:
        outs.append(q)
        grads.append(g_q)
    return (s, v) + torch.autograd.grad(outs, leaves, grads)


def _compare(x, v0=None, decay=None, vth=None, **kw):
    mdt = reference.default_math_dtype(x.dtype)
    decay = torch.tensor(2.0, dtype=mdt) if decay is None else decay
    vth = torch.tensor(1.0, dtype=mdt) if vth is None else vth
    g = torch.Generator().manual_seed(3)
    g_s = torch.randn(x.shape, generator=g).to(x.dtype)
    g_v = torch.randn(x.shape[1:], generator=g).to(x.dtype)
    g_q = torch.randn(x.shape, generator=g).to(x.dtype)
    kept = _grads(x, v0, decay, vth, True, g_s, g_v, g_q, **kw)
    rerun = _grads(x, v0, decay, vth, False, g_s, g_v, g_q, **kw)
    assert len(kept) == len(rerun)
    for a, b in zip(kept, rerun):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("cfg", CONFIGS, ids=config_id)
@pytest.mark.parametrize("sltt", [False, True])
def test_every_configuration(cfg, sltt):
    sid = reference.SURROGATE_IDS[cfg["surrogate"]]
    x = inputs((7, 3, 45)).requires_grad_()
    v0 = (torch.rand(3, 45) * 0.5).requires_grad_()
    _compare(x, v0, v_reset=cfg["v_reset"], sid=sid, alpha=2.0,
             decay_input=cfg["decay_input"], detach_reset=cfg["detach_reset"], sltt=sltt)


@pytest.mark.parametrize("decay_is_tau,decay_value", [(True, 2.0), (True, 3.0), (False, 0.4)])
def test_learnable_per_neuron_parameters_and_v_seq(decay_is_tau, decay_value):
    x = inputs((6, 4, 3, 5)).requires_grad_()
    v0 = (torch.rand(4, 3, 5) * 0.5).requires_grad_()
    decay = torch.full((3, 5), decay_value).add_(torch.rand(3, 5) * 0.1).requires_grad_()
    vth = (torch.rand(3, 5) * 0.5 + 0.8).requires_grad_()
    _compare(x, v0, decay, vth, decay_is_tau=decay_is_tau, store_v_seq=True)
    _compare(x, v0, torch.tensor(decay_value, requires_grad=True),
             torch.tensor(1.0, requires_grad=True), decay_is_tau=decay_is_tau, v_reset=None,
             decay_input=False)


def test_fp64():
    x = inputs((9, 2, 70), torch.float64).requires_grad_()
    _compare(x, store_v_seq=True)
    _compare(x, v_reset=None, sid=0, alpha=4.0)


def _rerun_16_bit_is_fp32_rounded_once(x16, v0=None, decay=None, vth=None, **kw):
    """The 16-bit rerun's outputs and gradients against the fp32 op's on the same (exactly
    widened) values: x and state gradients rounded to the 16-bit dtype, parameter gradients
    (fp32, the math type) equal as they are."""
    dtype = x16.dtype
    decay = torch.tensor(2.0) if decay is None else decay
    vth = torch.tensor(1.0) if vth is None else vth
    g = torch.Generator().manual_seed(5)
    g_s, g_q = (torch.randn(x16.shape, generator=g).to(dtype) for _ in range(2))
    g_v = torch.randn(x16.shape[1:], generator=g).to(dtype)

    def leaf(t, dt=None):
        return None if t is None else t.detach().to(dt or t.dtype).requires_grad_(t.requires_grad)

    got = _grads(leaf(x16), leaf(v0, dtype), leaf(decay), leaf(vth), False, g_s, g_v, g_q, **kw)
    want = _grads(leaf(x16, torch.float32), leaf(v0, torch.float32), leaf(decay), leaf(vth),
                  False, g_s.float(), g_v.float(), g_q.float(), **kw)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert torch.equal(a, b.to(a.dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_rerun_keeps_h_in_fp32(dtype):
    x = inputs((9, 2, 70), dtype).requires_grad_()
    _rerun_16_bit_is_fp32_rounded_once(x, store_v_seq=True)
    _rerun_16_bit_is_fp32_rounded_once(x, v_reset=None, sid=0, alpha=4.0)
    x = inputs((6, 4, 3, 5), dtype).requires_grad_()
    v0 = (torch.rand(4, 3, 5) * 0.5).to(dtype).requires_grad_()
    decay = (torch.full((3, 5), 3.0) + torch.rand(3, 5) * 0.1).requires_grad_()
    vth = (torch.rand(3, 5) * 0.5 + 0.8).requires_grad_()
    _rerun_16_bit_is_fp32_rounded_once(x, v0, decay, vth, store_v_seq=True, sid=6)
    k = torch.tensor(0.4, requires_grad=True)
    _rerun_16_bit_is_fp32_rounded_once(x, v0, k, torch.tensor(1.0, requires_grad=True),
                                       decay_is_tau=False, decay_input=False, v_reset=None)
    # the kept H is rounded to 16 bits: the same spikes and membrane, gradients that differ
    g = torch.Generator().manual_seed(3)
    g_s = torch.randn(x.shape, generator=g).to(dtype)
    g_v = torch.randn(x.shape[1:], generator=g).to(dtype)
    kept = _grads(x, None, torch.tensor(30.0), torch.tensor(1.0), True, g_s, g_v, None)
    rerun = _grads(x, None, torch.tensor(30.0), torch.tensor(1.0), False, g_s, g_v, None)
    assert torch.equal(kept[0], rerun[0]) and torch.equal(kept[1], rerun[1])
    assert not torch.equal(kept[2], rerun[2])


# (the rerun's H buffer is N rounded up to 16 wide where N < 128: 17, 33 and 1 neurons too)
@pytest.mark.parametrize("shape", [(1, 3), (2, 1), (3, 129), (40, 2, 130), (200, 5), (50, 17),
                                   (7, 3, 11), (300, 1)])
def test_shapes(shape):
    _compare(inputs(shape).requires_grad_())


@pytest.mark.parametrize("steps", [3, 6, 11])
def test_pipelined_rerun_across_many_chunks(steps):
    """The backward reruns chunk c + 1's forward while it scans chunk c: many chunks per task,
    tasks on several threads, fewer and more steps than the prefetch distance, per-neuron
    parameters that differ from chunk to chunk, a v_init, and a chunk tail."""
    feat = 12000  # 2 x 12000 neurons: 188 chunks of 128, the last one partial; 2-4 tasks
    x = inputs((steps, 2, feat)).requires_grad_()
    v0 = (torch.rand(2, feat) * 0.5).requires_grad_()
    decay = (torch.rand(feat) * 2 + 1.5).requires_grad_()
    vth = (torch.rand(feat) * 0.5 + 0.8).requires_grad_()
    threads = torch.get_num_threads()
    try:
        for n in sorted({1, 2, threads}):
            torch.set_num_threads(n)
            _compare(x, v0, decay, vth)
            _compare(x, v0, decay.detach(), vth.detach(), v_reset=None, sid=3)
    finally:
        torch.set_num_threads(threads)
    # and the gradients against the plain-PyTorch loop
    leaves = (x, v0, decay, vth)
    got = torch.autograd.grad(snn.lif_multi_step(x, v0, tau=decay, v_threshold=vth)[0].sum(),
                              leaves)
    with pypaper.use_backend("reference"):
        want = torch.autograd.grad(
            snn.lif_multi_step(x, v0, tau=decay, v_threshold=vth)[0].sum(), leaves)
    for a, b in zip(got, want):
        tol = GRAD_TOL[torch.float32]
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_streamed_sizes():
    # [T, N] outputs of 512 KiB and more take the streamed stores in both passes (2 MiB here).
    _compare(inputs((4, 1 << 17)).requires_grad_(), v0=torch.rand(1 << 17))


def test_a_model_trains_the_same():
    """The neuron layers (lif_multi_step: no H kept on the CPU) against the op with H kept."""
    torch.manual_seed(0)
    x = inputs((8, 16, 20))
    lin = torch.nn.Linear(20, 20)
    plif = snn.neuron.ParametricLIFNode(step_mode="m")
    out = plif(lin(x))
    out.sum().backward()
    got = [p.grad.clone() for p in (*lin.parameters(), *plif.parameters())]
    for p in (*lin.parameters(), *plif.parameters()):
        p.grad = None
    h = lin(x)
    k = torch.sigmoid(plif.w)
    s = FWD(h, None, k, torch.tensor(1.0), 0.0, 0, 4.0,
            op_flags.forward_flags(True, False, False, False, False, True))[0]
    s.sum().backward()
    want = [p.grad for p in (*lin.parameters(), *plif.parameters())]
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_the_rerun_needs_x_unchanged():
    """x is what the backward reruns the forward from: changing it in place is caught."""
    x = inputs((4, 3)).requires_grad_()
    y = x * 1.0
    s = snn.lif_multi_step(y)[0]
    y.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        s.sum().backward()


def test_direct_backward_op_call_with_recompute():
    x = inputs((5, 2, 3))
    decay, vth = torch.tensor(2.0), torch.tensor(1.0)
    s, v, h, _ = FWD(x, None, decay, vth, 0.0, 1, 2.0,
                     op_flags.forward_flags(True, True, False, False, False, True))
    g = torch.randn_like(x)
    args = (None, decay, vth, 0.0, 1, 2.0)
    flags = op_flags.backward_flags(True, True, False, False, False, False)
    from_h = BWD(g, None, None, h, *args, flags)
    from_x = BWD(g, None, None, x, *args, flags | op_flags.RECOMPUTE)
    for a, b in zip(from_h, from_x):
        assert torch.equal(a, b)
