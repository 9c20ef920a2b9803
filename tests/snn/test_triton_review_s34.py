"""Review s34 of the Triton LIF twins (pypaper/snn/triton_kernels.py).

Regression: the Triton ops launched on the *current* CUDA device, not on their tensors' device
(Triton's launcher asks the driver for the current device and its current stream). A layer on
cuda:1 while cuda:0 is current - model.to("cuda:1") without torch.cuda.set_device - ran its
kernel on cuda:0 over cuda:1's memory. The launches now run with the tensors' device made
current (pypaper._triton.wrap_triton, for every family's launches), as the C++ CUDA op does
with its CUDAGuard. Without two GPUs the device switch is checked with torch.cuda's device
functions stubbed (tests/test_triton_launch_device.py; tests/test_backend.py checks that every
family launches through that wrapper), and the snn ops are checked to launch through it; with two
GPUs the ops run on cuda:1 against the C++ op.

Coverage the existing tests (tests/snn/test_lif_triton.py) do not reach, each against the C++
CPU op: surrogate derivatives exactly at their edges (H - Vth = 0, +-1/alpha, +-1/(2 alpha) and
the floats next to them), parameter-gradient reductions over several programs (more than 1024
neurons) with per-neuron parameters whose feature count is no power of two, and non-contiguous
arguments of every op. Tolerances as in test_lif_triton.py.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

pytest.importorskip("triton")

from pypaper import _ext  # noqa: E402
from pypaper.snn import _registration, op_flags  # noqa: E402

tk = _registration.load_triton()

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_OK, _WHY = tk.triton_available(DEVICE)

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not _OK, reason=_WHY),
    pytest.mark.skipif(not (_ext.LOADED and hasattr(torch.ops.pypaper, "lif_forward")),
                       reason="the C++ LIF op (pypaper._C) is the reference of these tests"),
]

ops = torch.ops.pypaper

EXP_SURROGATES = {0, 3, 6}  # Sigmoid, PiecewiseExp, Erf: Triton's exp against a polynomial
GRAD_TOL = {torch.float32: 2e-5, torch.float64: 1e-12, torch.float16: 2e-3,
            torch.bfloat16: 1.6e-2}


def _math(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _to(t, device):
    return t.to(device) if isinstance(t, torch.Tensor) else t


def _both(op_triton, op_cpp, args, device=DEVICE):
    got = op_triton(*[_to(a, device) for a in args])
    want = op_cpp(*[_to(a, "cpu") for a in args])
    return [g.cpu() for g in got], list(want)


def _assert_same(got, want, what=""):
    assert got.dtype == want.dtype and got.shape == want.shape, what
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True, msg=what)


def _assert_close(got, want, dtype, what=""):
    assert got.dtype == want.dtype and got.shape == want.shape, what
    assert torch.equal(got.isnan(), want.isnan()), what
    if want.numel() == 0:
        return
    g, w = got.double().nan_to_num(), want.double().nan_to_num()
    scale = float(w.abs().max())
    err = float((g - w).abs().max())
    assert err <= GRAD_TOL[dtype] * (scale + 1.0), f"{what}: error {err:.3e}, scale {scale:.3e}"


def _fwd_flags(di=True, div=True, detach=False, sltt=False, store_v=True):
    return op_flags.forward_flags(di, div, detach, sltt, store_v)


# ---- the launch device ---------------------------------------------------------------------------

def test_every_snn_launch_goes_through_the_wrapper(monkeypatch):
    """The forward, backward and tangent ops each launch their kernel through the module's
    wrap_triton (the guarded one, above) and still give the C++ op's results."""
    launched = []
    real_wrap = tk.wrap_triton

    def wrap(kernel):
        launched.append(kernel)
        return real_wrap(kernel)

    monkeypatch.setattr(tk, "wrap_triton", wrap)
    x = (torch.randn(4, 3, 5, dtype=torch.float64) + 0.7).float().to(DEVICE)
    tau, vth = torch.tensor(2.0, device=DEVICE), torch.tensor(1.0, device=DEVICE)
    fwd = (x, None, tau, vth, 0.0, 1, 2.0, _fwd_flags())
    got = ops.lif_forward_triton(*fwd)
    want = ops.lif_forward(*[_to(a, "cpu") for a in fwd])
    for g, w in zip(got, want):
        _assert_same(g.cpu(), w)
    h = got[2]
    bwd = (torch.randn_like(x), None, None, h, None, tau, vth, 0.0, 1, 2.0,
           op_flags.backward_flags(True, True, False, False, True, True))
    got_b = ops.lif_backward_triton(*bwd)
    want_b = ops.lif_backward(*[_to(a, "cpu") for a in bwd])
    for g, w in zip(got_b, want_b):
        _assert_close(g.cpu(), w, torch.float32)
    jvp = (x, torch.randn_like(x), None, None, tau, None, vth, None, 0.0, 1, 2.0,
           op_flags.forward_flags(True, True, False, False, False, False))
    got_j = ops.lif_forward_jvp_triton(*jvp)
    want_j = ops.lif_forward_jvp(*[_to(a, "cpu") for a in jvp])
    for g, w in zip(got_j, want_j):
        _assert_same(g.cpu(), w)
    assert launched == [tk._lif_forward_kernel, tk._lif_backward_kernel, tk._lif_jvp_kernel]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_ops_on_a_device_that_is_not_current_match_the_cpp_op():
    """x on cuda:1 while cuda:0 is current: every op runs there and gives the C++ op's results
    (it ran on cuda:0 over cuda:1's memory before)."""
    dev = torch.device("cuda", 1)
    torch.cuda.set_device(0)
    x = torch.randn(5, 3, 37, dtype=torch.float64).add(0.7).float()
    tau = torch.rand(37) + 1.5
    vth = torch.rand(37) * 0.4 + 0.8
    fwd = (x, None, tau, vth, 0.0, 1, 2.0, _fwd_flags())
    got, want = _both(ops.lif_forward_triton, ops.lif_forward, fwd, dev)
    for g, w in zip(got, want):
        _assert_same(g, w)
    bwd = (torch.randn_like(x), torch.randn(3, 37), None, want[2], None, tau, vth, 0.0, 1, 2.0,
           op_flags.backward_flags(True, True, False, False, True, True))
    got, want = _both(ops.lif_backward_triton, ops.lif_backward, bwd, dev)
    for g, w in zip(got, want):
        _assert_close(g, w, torch.float32)
    jvp = (x, torch.randn_like(x), None, None, tau, None, vth, None, 0.0, 1, 2.0,
           op_flags.forward_flags(True, True, False, False, False, False))
    got, want = _both(ops.lif_forward_jvp_triton, ops.lif_forward_jvp, jvp, dev)
    for g, w in zip(got, want):
        _assert_same(g, w)
    assert torch.cuda.current_device() == 0


# ---- coverage: surrogate edges, multi-program reductions, non-contiguous arguments ---------------

def _edge_h(dtype, vth, alpha):
    """H where H - Vth is 0, +-1/alpha, +-1/(2 alpha), 2/alpha, +-inf, and the floats next to
    each (in the storage type): the surrogates' piecewise edges (PiecewiseQuadratic's |x| > 1/a,
    Rect's |x| < 1/(2a)) and the spike's own (x >= 0)."""
    offs = [0.0, 1 / alpha, -1 / alpha, 0.5 / alpha, -0.5 / alpha, 2 / alpha, float("inf"),
            -float("inf")]
    h = torch.tensor([vth + o for o in offs], dtype=torch.float64).to(dtype)
    up = torch.nextafter(h, torch.full_like(h, 1e4))
    down = torch.nextafter(h, torch.full_like(h, -1e4))
    return torch.cat([h, up, down])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16],
                         ids=str)
@pytest.mark.parametrize("sid", range(8))
def test_surrogate_edges_match_the_cpp_op(dtype, sid):
    alpha, vth = 4.0, 1.0
    h = _edge_h(dtype, vth, alpha)
    h = h.view(1, -1).repeat(3, 1)  # T = 3: the carried gradient crosses the edges too
    n = h.shape[1]
    mt = _math(dtype)
    for vr, detach, sltt in [(0.0, False, False), (None, True, False), (-0.25, False, True),
                             (None, False, True)]:
        args = (torch.ones_like(h), torch.ones(n, dtype=dtype), torch.ones_like(h), h,
                torch.zeros(n, dtype=dtype), torch.tensor(2.0, dtype=mt),
                torch.tensor(vth, dtype=mt), vr, sid, alpha,
                op_flags.backward_flags(True, True, detach, sltt, True, True))
        got, want = _both(ops.lif_backward_triton, ops.lif_backward, args)
        what = f"sid {sid} vr {vr} detach {detach} sltt {sltt}"
        for g, w, name in zip(got[:2], want[:2], ("grad_x", "grad_v_init")):
            if sid in EXP_SURROGATES:
                _assert_close(g, w, dtype, f"{name} {what}")
            else:
                _assert_same(g, w, f"{name} {what}")
        for g, w, name in zip(got[2:], want[2:], ("grad_tau", "grad_v_threshold")):
            _assert_close(g, w, mt, f"{name} {what}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64],
                         ids=str)
@pytest.mark.parametrize("per_neuron", [False, True])
def test_parameter_gradients_over_several_programs(dtype, per_neuron):
    """N = 37 x 37 = 1369 neurons: two programs of 1024 (the second ragged); the scalar
    parameters' per-program fp64 partials and the per-neuron sums over the batch (F = 37, no
    power of two) against the C++ op's chunk sums."""
    torch.manual_seed(3)
    shape = (3, 37, 37)
    feat = shape[2:] if per_neuron else ()
    mt = _math(dtype)
    x = (torch.randn(shape, dtype=torch.float64) + 0.7).to(dtype)
    v0 = (torch.rand(shape[1:], dtype=torch.float64) * 0.8).to(dtype)
    for di, div, vr in [(True, True, 0.0), (False, False, None), (True, False, -0.2)]:
        decay = (torch.rand(feat, dtype=torch.float64) * 1.5 + 1.5 if div
                 else torch.rand(feat, dtype=torch.float64) * 0.4 + 0.3).to(mt)
        vth = (torch.rand(feat, dtype=torch.float64) * 0.5 + 0.75).to(mt)
        fwd = (x, v0, decay, vth, vr, 5, 2.0, _fwd_flags(di, div))
        got, want = _both(ops.lif_forward_triton, ops.lif_forward, fwd)
        for g, w in zip(got, want):
            _assert_same(g, w)
        bwd = (torch.randn(shape, dtype=torch.float64).to(dtype),
               torch.randn(shape[1:], dtype=torch.float64).to(dtype),
               torch.randn(shape, dtype=torch.float64).to(dtype), want[2], v0, decay, vth, vr,
               5, 2.0, op_flags.backward_flags(di, div, False, False, True, True))
        got, want = _both(ops.lif_backward_triton, ops.lif_backward, bwd)
        for g, w in zip(got[:2], want[:2]):
            _assert_same(g, w)
        for g, w, name in zip(got[2:], want[2:], ("grad_decay", "grad_v_threshold")):
            assert g.shape == decay.shape
            _assert_close(g, w, mt, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_non_contiguous_arguments_of_every_op(dtype):
    """Transposed x, v_init, per-neuron parameters, gradients and tangents: each op reads them
    in their logical order (the C++ op's results, in the logical shapes)."""
    torch.manual_seed(4)
    mt = _math(dtype)
    t = lambda *s: torch.randn(*s, dtype=torch.float64).to(dtype).transpose(-1, -2)  # noqa: E731
    x = t(4, 7, 3, 5) + 0.7
    v0 = (torch.rand(7, 3, 5) * 0.5).to(dtype).transpose(1, 2)
    tau = (torch.rand(3, 5, dtype=torch.float64) + 1.5).to(mt).t()
    vth = (torch.rand(3, 5, dtype=torch.float64) * 0.4 + 0.8).to(mt).t()
    assert not (x.is_contiguous() or v0.is_contiguous() or tau.is_contiguous())
    fwd = (x, v0, tau, vth, 0.0, 1, 2.0, _fwd_flags())
    got, want = _both(ops.lif_forward_triton, ops.lif_forward, fwd)
    for g, w in zip(got, want):
        _assert_same(g, w)
    h = want[2].transpose(2, 3).contiguous().transpose(2, 3)
    bwd = (t(4, 7, 3, 5), t(7, 3, 5), t(4, 7, 3, 5), h, v0, tau, vth, 0.0, 1, 2.0,
           op_flags.backward_flags(True, True, False, False, True, True))
    got, want = _both(ops.lif_backward_triton, ops.lif_backward, bwd)
    for g, w in zip(got[:2], want[:2]):
        _assert_same(g, w)
    for g, w in zip(got[2:], want[2:]):
        _assert_close(g, w, mt)
    jvp = (x, t(4, 7, 3, 5), v0, t(7, 3, 5), tau, tau * 0.1, vth, vth * 0.5, 0.0, 1, 2.0,
           op_flags.forward_flags(True, True, False, False, True, False))
    got, want = _both(ops.lif_forward_jvp_triton, ops.lif_forward_jvp, jvp)
    for g, w in zip(got, want):
        _assert_same(g, w)
