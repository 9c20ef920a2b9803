"""The C++ CPU ops of pypaper.snn (lif_forward / lif_backward / lif_forward_jvp, delay_linear) at
their edges, against the plain-PyTorch references (pypaper/snn/reference.py,
delays_reference.py) and against themselves:

- flush-to-zero / denormals-are-zero (torch.set_flush_denormal(True)) with a power-of-two tau whose
  reciprocal is subnormal: the forward multiplies by k = 1/tau only where that equals dividing by
  tau, which under DAZ needs k normal (the regression);
- neuron counts around the chunk (kLifChunk = 128) with 1 and 2 threads: the same bits,
  parameter-gradient reductions included;
- the streamed-store path (outputs >= 512 KiB) on an x that is an odd-offset slice of a bigger
  tensor, 16-bit outputs of odd rows: the same bits as the small, unstreamed call on a column slice;
- T = 1, T = 0, N = 0, and a long T with few neurons, against the reference;
- the delay op at max_delay 1, max_delay > T, sigma 0 / tiny, positions on and past the clamp
  edges, N = 0, T = 1.
"""
import pytest
import torch

import pypaper
from pypaper.snn import delays_reference, op_flags, reference

from .helpers import assert_close

HAVE_OPS = pypaper._ext.LOADED and hasattr(torch.ops.pypaper, "lif_forward")
pytestmark = pytest.mark.skipif(not HAVE_OPS, reason="pypaper._C is not built")

FWD = torch.ops.pypaper.lif_forward.default if HAVE_OPS else None
BWD = torch.ops.pypaper.lif_backward.default if HAVE_OPS else None
JVP = torch.ops.pypaper.lif_forward_jvp.default if HAVE_OPS else None


def _op(x, v0, decay, vth, *, v_reset=0.0, sid=1, alpha=2.0, decay_input=True,
        decay_is_tau=True, detach_reset=False, sltt=False, gs=None, gvl=None, gvs=None):
    """Forward (no H kept) and the recompute backward, as autograd runs them on the CPU;
    store_v_seq on, every parameter gradient asked for."""
    ff = op_flags.forward_flags(decay_input, decay_is_tau, detach_reset, sltt, True, False)
    s, vl, _, vs = FWD(x, v0, decay, vth, v_reset, sid, alpha, ff)
    bf = op_flags.backward_flags(decay_input, decay_is_tau, detach_reset, sltt, True, True, True)
    gs = torch.zeros_like(x) if gs is None else gs
    gx, gv, gd, gt = BWD(gs, gvl, gvs, x, v0, decay, vth, v_reset, sid, alpha, bf)
    return dict(s=s, vl=vl, vs=vs, gx=gx, gv=gv, gd=gd, gt=gt)


def _ref(x, v0, decay, vth, *, v_reset=0.0, sid=1, alpha=2.0, decay_input=True,
         decay_is_tau=True, detach_reset=False, sltt=False, gs=None, gvl=None, gvs=None):
    leaves = [None if t is None else t.detach().clone().requires_grad_()
              for t in (x, v0, decay, vth)]
    xr, v0r, dr, tr = leaves
    s, vl, vs = reference.lif_multi_step(xr, v0r, dr, tr, v_reset, sid, alpha, decay_input,
                                         decay_is_tau, detach_reset, sltt, True)
    outs, grads = [s, vl, vs], [gs, gvl, gvs]
    keep = [i for i, g in enumerate(grads) if g is not None]
    used = [t for t in leaves if t is not None]
    g = iter(torch.autograd.grad([outs[i] for i in keep], used, [grads[i] for i in keep],
                                 allow_unused=True))
    g = [None if t is None else next(g) for t in leaves]
    g = [a if a is not None or t is None else torch.zeros_like(t) for a, t in zip(g, leaves)]
    return dict(s=s.detach(), vl=vl.detach(), vs=vs.detach(), gx=g[0], gv=g[1], gd=g[2],
                gt=g[3])


# ---- the regression: denormals-are-zero and the reciprocal of a power-of-two tau ----------------

@pytest.mark.parametrize("dtype,log2_tau", [(torch.float32, 127), (torch.float64, 1023)])
def test_flush_denormal_with_a_power_of_two_tau_whose_reciprocal_is_subnormal(dtype, log2_tau):
    """tau = 2^127 (fp32) is a power of two, so the forward charged with k = 1/tau = 2^-127 to
    save the divide; that k is subnormal, and under torch.set_flush_denormal(True) (DAZ) the CPU
    reads it as 0: H = V + (X - V) * 0 = V, where the reference's (X - V) / tau = 2^-117 for
    X = 2^10. Before the fix v_last was 0 here, against the reference's 2^-117 (fp64 likewise at
    tau = 2^1023). Valid without DAZ as well (the same bits either way)."""
    x = torch.full((3, 5), 2.0 ** 10, dtype=dtype)
    tau = torch.tensor(2.0 ** log2_tau, dtype=dtype)
    vth = torch.tensor(1e30, dtype=dtype)  # never fires: V accumulates (X - V) / tau
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # set_flush_denormal sets the calling thread's MXCSR only
    try:
        if not torch.set_flush_denormal(True):
            pytest.skip("this CPU has no flush-denormal mode")
        got = _op(x, None, tau, vth, v_reset=None, gs=torch.ones_like(x))
        want = _ref(x, None, tau, vth, v_reset=None, gs=torch.ones_like(x))
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(old)
    assert float(want["vl"][0]) > 0
    for key in ("s", "vl", "vs"):
        assert torch.equal(got[key], want[key]), key


def test_tau_two_to_the_126_still_takes_the_multiply_and_matches():
    """The largest fp32 power of two whose reciprocal is normal (2^-126) keeps the cheap path:
    the same bits as the reference, with and without flush-denormal."""
    x = torch.full((2, 3), 2.0 ** 10)
    tau = torch.tensor(2.0 ** 126)
    vth = torch.tensor(1e30)
    for ftz in (False, True):
        old = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            if ftz and not torch.set_flush_denormal(True):
                continue
            got = _op(x, None, tau, vth, v_reset=None)
            want = _ref(x, None, tau, vth, v_reset=None)
        finally:
            torch.set_flush_denormal(False)
            torch.set_num_threads(old)
        assert torch.equal(got["vl"], want["vl"]) and float(want["vl"][0]) > 0


# ---- chunk edges and the thread split ----------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n", [1, 15, 16, 17, 127, 128, 129, 255, 257, 1000])
def test_chunk_edges_against_the_reference(dtype, n):
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(6, n, generator=g, dtype=torch.float64) + 0.6).to(dtype)
    v0 = (torch.rand(n, generator=g, dtype=torch.float64) * 0.5).to(dtype)
    grads = dict(gs=torch.randn(x.shape, generator=g).to(dtype),
                 gvl=torch.randn(v0.shape, generator=g).to(dtype),
                 gvs=torch.randn(x.shape, generator=g).to(dtype))
    for kw in (dict(), dict(v_reset=None, sid=0, decay_is_tau=False, detach_reset=True),
               dict(v_reset=-0.2, sid=7, decay_input=False, sltt=True)):
        decay = torch.tensor(0.4 if kw.get("decay_is_tau") is False else 3.0, dtype=dtype)
        vth = torch.tensor(0.9, dtype=dtype)
        got = _op(x, v0, decay, vth, **kw, **grads)
        want = _ref(x, v0, decay, vth, **kw, **grads)
        for key in ("s", "vl", "vs"):
            assert torch.equal(got[key], want[key]), key
        for key in ("gx", "gv", "gd", "gt"):
            assert_close(got[key], want[key], dtype, key)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,per_neuron", [((9, 1, 128 * 130 + 3), False),
                                              ((4, 300, 77), True), ((2, 40000, 5), True)])
def test_one_and_two_threads_give_the_same_bits(dtype, shape, per_neuron):
    """Large enough that at::parallel_for splits the chunks (at least ~64K neuron-steps per
    task): every output, the reduced parameter gradients included, is the same bits."""
    g = torch.Generator().manual_seed(1)
    mdt = reference.default_math_dtype(dtype)
    x = (torch.randn(shape, generator=g) + 0.6).to(dtype)
    v0 = (torch.rand(shape[1:], generator=g) * 0.5).to(dtype)
    feat = shape[2:] if per_neuron else ()
    decay = torch.rand(feat, generator=g).to(mdt) + 1.5
    vth = torch.rand(feat, generator=g).to(mdt) * 0.5 + 0.8
    grads = dict(gs=torch.randn(shape, generator=g).to(dtype),
                 gvl=torch.randn(shape[1:], generator=g).to(dtype),
                 gvs=torch.randn(shape, generator=g).to(dtype))
    old = torch.get_num_threads()
    try:
        runs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            runs.append(_op(x, v0, decay, vth, **grads))
    finally:
        torch.set_num_threads(old)
    for key in runs[0]:
        assert torch.equal(runs[0][key], runs[1][key]), key


# ---- the streamed-store path on unaligned storage ----------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("offset", [0, 1, 3])
def test_streamed_outputs_on_an_odd_offset_slice_equal_the_unstreamed_columns(dtype, offset):
    """x [65, 4099] (>= 512 KiB in every dtype: non-temporal stores) viewed at an odd element
    offset of a bigger tensor, so every row and the staging copies start unaligned; the neurons
    are independent, so each column slice run alone (small: normal stores) must give the same
    bits, and so must the forward-mode tangents."""
    steps, n = 65, 4099
    g = torch.Generator().manual_seed(offset)
    big = (torch.randn(steps * n + offset + 5, generator=g) * 0.7 + 0.4).to(dtype)
    x = big[offset:offset + steps * n].view(steps, n)
    assert x.is_contiguous() and x.numel() * x.element_size() >= 512 << 10
    mdt = reference.default_math_dtype(dtype)
    v0 = (torch.rand(n, generator=g) * 0.5).to(dtype)
    gs = torch.randn(steps, n, generator=g).to(dtype)
    gvl = torch.randn(n, generator=g).to(dtype)
    gvs = torch.randn(steps, n, generator=g).to(dtype)
    dx = torch.randn(steps, n, generator=g).to(dtype)
    decay, vth = torch.tensor(3.0, dtype=mdt), torch.tensor(1.0, dtype=mdt)
    whole = _op(x, v0, decay, vth, v_reset=None, gs=gs, gvl=gvl, gvs=gvs)
    flags = op_flags.forward_flags(True, True, False, False, True, False)
    tangents = JVP(x, dx, v0, None, decay, None, vth, None, None, 1, 2.0, flags)
    for cols in (slice(0, 100), slice(n - 77, n), slice(n // 2 - 3, n // 2 + 130)):
        part = _op(x[:, cols].contiguous(), v0[cols].contiguous(), decay, vth, v_reset=None,
                   gs=gs[:, cols].contiguous(), gvl=gvl[cols].contiguous(),
                   gvs=gvs[:, cols].contiguous())
        for key in ("s", "vl", "vs", "gx", "gv"):
            assert torch.equal(whole[key][..., cols], part[key]), (key, cols)
        part_t = JVP(x[:, cols].contiguous(), dx[:, cols].contiguous(), v0[cols].contiguous(),
                     None, decay, None, vth, None, None, 1, 2.0, flags)
        for a, b in zip(tangents, part_t):
            assert torch.equal(a[..., cols], b), cols


# ---- degenerate sizes --------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 5), (0, 5), (5, 0), (0, 2, 3), (3, 2, 0), (4, 0, 3),
                                   (3000, 3)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_degenerate_and_long_sequences_against_the_reference(shape, dtype):
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 0.5 + 0.3).to(dtype)
    v0 = (torch.rand(shape[1:], generator=g, dtype=torch.float64) * 0.5).to(dtype)
    feat = shape[2:]
    decay = torch.rand(feat, generator=g, dtype=torch.float64).to(dtype) + 1.5
    vth = torch.rand(feat, generator=g, dtype=torch.float64).to(dtype) * 0.5 + 0.8
    grads = dict(gs=torch.randn(shape, generator=g).to(dtype),
                 gvl=torch.randn(shape[1:], generator=g).to(dtype),
                 gvs=torch.randn(shape, generator=g).to(dtype))
    for v_reset in (0.0, None):
        got = _op(x, v0, decay, vth, v_reset=v_reset, **grads)
        want = _ref(x, v0, decay, vth, v_reset=v_reset, **grads)
        for key in got:
            assert got[key].shape == want[key].shape, key
            if key in ("s", "vl", "vs"):
                assert torch.equal(got[key], want[key]), key
            else:
                # a long T in fp32: the carried gradient grows and its rounding with it
                tol_dtype = torch.float64 if dtype == torch.float64 else torch.float32
                if shape[0] > 100 and dtype == torch.float32:
                    scale = float(want[key].abs().max()) + 1.0
                    err = float((got[key].double() - want[key].double()).abs().max())
                    assert err <= 1e-4 * scale, key
                else:
                    assert_close(got[key], want[key], tol_dtype, key)


# ---- the delay op at its edges -----------------------------------------------------------------

@pytest.mark.parametrize("path", ["gather", "dense"])
@pytest.mark.parametrize("dims", [(1, 3, 4, 5), (7, 0, 3, 4), (4, 2, 3, 33)])
@pytest.mark.parametrize("max_delay", [1, 2, 12])
@pytest.mark.parametrize("sigma", [0.0, 1e-30, 1e-7, 1 / 3, 2.0, 1e300])
def test_delay_op_edges_against_the_reference(monkeypatch, path, dims, max_delay, sigma):
    if not hasattr(torch.ops.pypaper, "delay_linear"):
        pytest.skip("pypaper._C without the delay ops")
    monkeypatch.setenv("PYPAPER_DELAY_PATH", path)
    steps, n, c_in, c_out = dims
    g = torch.Generator().manual_seed(max_delay)
    dt = torch.float64
    x = torch.randn(steps, n, c_in, generator=g, dtype=dt)
    w = torch.randn(c_out, c_in, generator=g, dtype=dt)
    # positions spread past both ends, and on them: 0, K - 1, just outside, far outside
    p = torch.rand(c_out, c_in, generator=g, dtype=dt) * (max_delay + 2) - 1
    edges = torch.tensor([0.0, max_delay - 1.0, -1e-9, max_delay - 1 + 1e-9, max_delay + 5.0,
                          -3.0], dtype=dt)
    p.view(-1)[:edges.numel()] = edges[:p.numel()]
    b = torch.randn(c_out, generator=g, dtype=dt)
    st = torch.tensor(sigma, dtype=torch.float64)
    y = torch.ops.pypaper.delay_linear(x, w, p, b, max_delay, st)
    leaves = [t.clone().requires_grad_() for t in (x, w, p, b)]
    y_ref = delays_reference.delayed_linear(*leaves, max_delay, sigma)
    gy = torch.randn(y_ref.shape, generator=g, dtype=dt)
    want = torch.autograd.grad(y_ref, leaves, gy, allow_unused=True)
    got = torch.ops.pypaper.delay_linear_backward(gy, x, w, p, max_delay, st, True, True, True,
                                                  True)
    assert_close(y, y_ref.detach(), dt, "y")
    for name, a, r, leaf in zip(("x", "weight", "position", "bias"), got, want, leaves):
        r = torch.zeros_like(leaf) if r is None else r
        assert a.shape == r.shape, name
        assert_close(a, r, dt, name)
