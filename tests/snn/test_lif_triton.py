"""Triton twins of the LIF ops (pypaper/snn/triton_kernels.py) against the C++ CPU op.

Without a GPU the kernels run under TRITON_INTERPRET=1 on CPU tensors (set below, before triton
or pypaper is imported; sizes stay small for the interpreter: T <= 6, at most ~200 neurons);
with one, compiled on CUDA, compared with the C++ op run on CPU copies of the same inputs.

Tolerances:
  forward (spikes, H, V, v_last): none, every dtype - the same operations in the same order,
      products and quotients IEEE-rounded one by one (PTX mul.rn / div.rn when compiled), 16-bit
      stores rounded to nearest even, H nudged off the threshold the same way as the C++ op.
  backward, grad_x / grad_v_init: none for the surrogates without exp (ATan, PiecewiseQuadratic,
      SoftSign, SuperSpike, Rect); Sigmoid, PiecewiseExp and Erf use Triton's / numpy's exp,
      the C++ op a polynomial (<= 2 ulp apart): relative GRAD_TOL below.
  parameter gradients: relative GRAD_TOL (the sums over batch and neurons run in another order).
"""
import itertools
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch.func as func  # noqa: E402

pytest.importorskip("triton")

import pypaper  # noqa: E402
from pypaper import _ext  # noqa: E402
from pypaper.snn import _registration, backend_for, lif_multi_step, op_flags  # noqa: E402

from .helpers import inputs, surrogate_of  # noqa: E402

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

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SURROGATE_NAMES = ["Sigmoid", "ATan", "PiecewiseQuadratic", "PiecewiseExp", "SoftSign",
                   "SuperSpike", "Erf", "Rect"]  # ids 0..7
EXP_SURROGATES = {0, 3, 6}
GRAD_TOL = {torch.float32: 2e-5, torch.float64: 1e-12, torch.float16: 2e-3,
            torch.bfloat16: 1.6e-2}


def _math(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _to(t, device):
    return t.to(device) if isinstance(t, torch.Tensor) else t


def _both(op_triton, op_cpp, args):
    """The Triton op on DEVICE and the C++ op on CPU copies of the same arguments."""
    got = op_triton(*[_to(a, DEVICE) for a in args])
    want = op_cpp(*[_to(a, "cpu") for a in args])
    # an op returns tensors of its own, never views (the check tests/conftest.py adds to every
    # opcheck, which cannot trace interpreted Triton kernels)
    assert not any(t._is_view() for t in (*got, *want)), "an op returned a view"
    return [g.cpu() for g in got], list(want)


def _assert_same(got, want, what=""):
    assert got.dtype == want.dtype and got.shape == want.shape, (what, got.dtype, want.dtype,
                                                                 got.shape, want.shape)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True, msg=what)


def _assert_close(got, want, dtype, what=""):
    assert got.dtype == want.dtype and got.shape == want.shape, what
    if want.numel() == 0:
        return
    scale = float(want.double().abs().max())
    err = float((got.double() - want.double()).abs().max())
    assert err <= GRAD_TOL[dtype] * (scale + 1.0), f"{what}: error {err:.3e}, scale {scale:.3e}"


def _params(shape, dtype, per_neuron, div):
    """decay (tau in (1.5, 3) or k in (0.3, 0.7)) and threshold, one value or one per feature."""
    mt = _math(dtype)
    feat = shape[2:] if per_neuron else ()
    if div:
        decay = torch.rand(feat, dtype=torch.float64) * 1.5 + 1.5
    else:
        decay = torch.rand(feat, dtype=torch.float64) * 0.4 + 0.3
    vth = torch.rand(feat, dtype=torch.float64) * 0.5 + 0.75
    return decay.to(mt), vth.to(mt)


def _fwd_args(x, v0, decay, vth, v_reset, sid=1, alpha=2.0, di=True, div=True, detach=False,
              sltt=False, store_v=True):
    return (x, v0, decay, vth, v_reset, sid, alpha,
            op_flags.forward_flags(di, div, detach, sltt, store_v))


# ---- forward: bit for bit ------------------------------------------------------------------------

# (v_reset, decay_input, decay_is_tau, per-neuron params, v_init given, shape)
FWD_CASES = [
    (vr, di, div, pn, v0, shape)
    for (vr, di, div), (pn, v0, shape) in zip(
        itertools.product([0.0, None], [True, False], [True, False]),
        itertools.cycle([(True, True, (6, 5, 33)), (False, False, (1, 7)),
                         (True, False, (4, 3, 2, 5)), (False, True, (5, 199))]))
] + [(-0.3, True, True, True, True, (3, 2, 65))]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vr,di,div,pn,v0,shape", FWD_CASES)
def test_forward_matches_cpp_bit_for_bit(dtype, vr, di, div, pn, v0, shape):
    x = inputs(shape, dtype, scale=1.0, shift=0.7)
    decay, vth = _params(shape, dtype, pn, div)
    if vr is not None:
        vth = vth.clamp_min(vr + 0.25)
    v_init = (torch.rand(shape[1:], dtype=torch.float64) * 0.8).to(dtype) if v0 else None
    args = _fwd_args(x, v_init, decay, vth, vr, di=di, div=div, store_v=(len(shape) != 4))
    got, want = _both(ops.lif_forward_triton, ops.lif_forward, args)
    spikes = want[0]
    assert 0 < float(spikes.float().mean()) < 1  # neurons fire and rest: the reset matters
    for g, w, name in zip(got, want, ("spikes", "v_last", "h_seq", "v_seq")):
        _assert_same(g, w, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_if_neuron_keeps_an_infinite_membrane_as_the_cpp_op(dtype):
    """k = 0 without decay_input (IFNode) charges V + X: an infinite soft-reset membrane stays
    inf and fires, where V - (V - Vr) * 0 + X gave NaN (tests/snn/test_if_node.py has the
    SpikingJelly side)."""
    big = 6e4 if dtype == torch.float16 else 3e38
    x = torch.tensor([[big, 0.5, float("inf"), 0.3]], dtype=dtype).repeat(5, 1)
    k, vth = torch.tensor(0.0), torch.tensor(1.0)
    args = _fwd_args(x, None, k, vth, None, di=False, div=False)
    got, want = _both(ops.lif_forward_triton, ops.lif_forward, args)
    for g, w, name in zip(got, want, ("spikes", "v_last", "h_seq", "v_seq")):
        _assert_same(g, w, name)
    assert torch.isinf(got[1][[0, 2]]).all() and got[0][1:, [0, 2]].eq(1).all()


@pytest.mark.parametrize("store_v", [False, True])
def test_forward_without_keep_h(store_v):
    """Without the keep_h flag the Triton forward writes no H (h_seq has shape [0]) and returns
    the C++ op's spikes, v_last and v_seq to the bit."""
    x = inputs((5, 3, 33), scale=1.0, shift=0.7)
    args = _fwd_args(x, None, torch.tensor(2.0), torch.tensor(1.0), 0.0, store_v=store_v)
    args = (*args[:-1], args[-1] & ~op_flags.KEEP_H)
    got, want = _both(ops.lif_forward_triton, ops.lif_forward, args)
    assert got[2].shape == (0,) and want[2].shape == (0,)
    for g, w, name in zip(got, want, ("spikes", "v_last", "h_seq", "v_seq")):
        _assert_same(g, w, name)


def test_ops_reject_flags_they_do_not_take():
    x = inputs((3, 4)).to(DEVICE)
    one = torch.tensor(1.0, device=DEVICE)
    f = op_flags.forward_flags(True, True, False, False, False)
    with pytest.raises(ValueError, match="lif_forward_triton: flags .* has bits"):
        ops.lif_forward_triton(x, None, one * 2, one, 0.0, 1, 2.0, f | op_flags.RECOMPUTE)
    _, _, h, _ = ops.lif_forward_triton(x, None, one * 2, one, 0.0, 1, 2.0, f)
    b = op_flags.backward_flags(True, True, False, False, False, False)
    with pytest.raises(ValueError, match="lif_backward_triton: flags .* has bits"):
        ops.lif_backward_triton(x, None, None, h, None, one * 2, one, 0.0, 1, 2.0,
                                b | op_flags.KEEP_H)
    with pytest.raises(ValueError, match="recompute flag .* has no Triton kernel"):
        ops.lif_backward_triton(x, None, None, h, None, one * 2, one, 0.0, 1, 2.0,
                                b | op_flags.RECOMPUTE)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_16bit_h_never_crosses_the_threshold(dtype):
    """H just below Vth whose 16-bit rounding is Vth itself is stored one ulp below it, as the C++
    op does: the backward's Theta(H_stored - Vth) always equals the forward's S. With tau = 5,
    v on the 16-bit grid and x = 5 - 4v one ulp off, H = v + (x - v) / 5 = 1 -+ ulp(x) / 5, within
    half an ulp of 1 = Vth: about half of the H below Vth would round onto it."""
    n = 64
    v = (torch.rand(n) * 0.4 + 0.6).to(dtype)
    xb = (5.0 - 4 * v.float()).to(dtype).view(torch.int16).clone()
    xb[: n // 2] -= 1  # x one ulp lower: H just below 1
    xb[n // 2:] += 1
    x = xb.view(dtype).view(1, n)
    args = _fwd_args(x, v, torch.tensor(5.0), torch.tensor(1.0), 0.0, store_v=False)
    got, want = _both(ops.lif_forward_triton, ops.lif_forward, args)
    for g, w, name in zip(got, want, ("spikes", "v_last", "h_seq", "v_seq")):
        _assert_same(g, w, name)
    s, h_seq = got[0], got[2]
    h32 = v.float() + (x.float() - v.float()) / 5.0
    assert int((h32.to(dtype) != h_seq).sum()) > 0  # some H were nudged off the threshold
    assert torch.equal((h_seq.float() - 1.0 >= 0).to(dtype), s)


@pytest.mark.skipif(DEVICE.type == "cuda", reason="interpreter only: compiled kernels are wrapped")
def test_interpreted_kernels_launch_where_wrap_triton_refuses_them(monkeypatch):
    """torch 2.11's torch.library.wrap_triton refuses a kernel that TRITON_INTERPRET=1 made an
    InterpretedFunction; pypaper._triton.wrap_triton launches those as they are (every family
    imports it: tests/test_backend.py), so the interpreted ops run on that release too."""
    def refuse(kernel):
        if type(kernel).__name__ == "InterpretedFunction":
            raise RuntimeError("wrap_triton only works on functions annotated with triton.jit "
                               "or triton.autotune")
        return kernel

    # the module's own binding too, where it took torch's function at import
    if tk.wrap_triton is torch.library.wrap_triton:
        monkeypatch.setattr(tk, "wrap_triton", refuse)
    monkeypatch.setattr(torch.library, "wrap_triton", refuse)
    x = inputs((3, 2, 5))
    args = _fwd_args(x, None, torch.tensor(2.0), torch.tensor(1.0), 0.0)
    got, want = _both(ops.lif_forward_triton, ops.lif_forward, args)
    for g, w in zip(got, want):
        _assert_same(g, w)


@pytest.mark.parametrize("shape", [(0, 3, 4), (3, 0, 4), (2, 3, 0), (1, 1), (1, 129)])
def test_empty_and_single_step(shape):
    x = inputs(shape)
    v0 = torch.rand(shape[1:])
    args = _fwd_args(x, v0, torch.tensor(2.0), torch.tensor(1.0), 0.0)
    got, want = _both(ops.lif_forward_triton, ops.lif_forward, args)
    for g, w in zip(got, want):
        _assert_same(g, w)
    h = want[2]
    bargs = (torch.randn(shape), torch.randn(shape[1:]), torch.randn(shape), h, v0,
             torch.tensor(2.0), torch.tensor(1.0), 0.0, 1, 2.0,
             op_flags.backward_flags(True, True, False, False, True, True))
    got, want = _both(ops.lif_backward_triton, ops.lif_backward, bargs)
    for g, w in zip(got, want):
        _assert_close(g, w, torch.float32)


# ---- backward ------------------------------------------------------------------------------------

def _backward_case(dtype, shape, sid, vr, di, div, detach, sltt, per_neuron, with_v_seq,
                   alpha=2.0):
    x = inputs(shape, dtype, scale=1.0, shift=0.7)
    decay, vth = _params(shape, dtype, per_neuron, div)
    v0 = (torch.rand(shape[1:], dtype=torch.float64) * 0.8).to(dtype)
    _, _, h, _ = ops.lif_forward(*_fwd_args(x, v0, decay, vth, vr, sid, alpha, di, div, detach,
                                            sltt, with_v_seq))
    gs = torch.randn(shape, dtype=torch.float64).to(dtype)
    gvl = torch.randn(shape[1:], dtype=torch.float64).to(dtype)
    gvs = torch.randn(shape, dtype=torch.float64).to(dtype) if with_v_seq else None
    return (gs, gvl, gvs, h, v0, decay, vth, vr, sid, alpha,
            op_flags.backward_flags(di, div, detach, sltt, True, True))


def _check_backward(args, dtype):
    sid = args[8]
    got, want = _both(ops.lif_backward_triton, ops.lif_backward, args)
    for g, w, name in zip(got[:2], want[:2], ("grad_x", "grad_v_init")):
        if sid in EXP_SURROGATES:
            _assert_close(g, w, dtype, name)
        else:
            _assert_same(g, w, name)
    for g, w, name in zip(got[2:], want[2:], ("grad_decay", "grad_v_threshold")):
        _assert_close(g, w, _math(dtype), name)


@pytest.mark.parametrize("sid", range(8), ids=SURROGATE_NAMES)
@pytest.mark.parametrize("vr", [0.0, None], ids=["hard", "soft"])
def test_backward_every_surrogate(sid, vr):
    args = _backward_case(torch.float32, (5, 3, 37), sid, vr, di=True, div=True, detach=False,
                          sltt=False, per_neuron=(sid % 2 == 0), with_v_seq=(sid % 3 == 0))
    _check_backward(args, torch.float32)


# (dtype, v_reset, decay_input, div, detach_reset, sltt, per-neuron, surrogate)
BWD_CASES = [
    (torch.float32, 0.0, False, False, True, False, True, 2),
    (torch.float32, None, False, True, False, True, False, 4),
    (torch.float32, -0.2, True, False, True, True, True, 7),
    (torch.float64, 0.0, True, True, False, False, True, 1),
    (torch.float64, None, False, False, True, False, False, 6),
    (torch.float64, 0.0, True, False, False, True, True, 0),
    (torch.float16, 0.0, True, True, False, False, True, 1),
    (torch.float16, None, False, False, True, False, False, 3),
    (torch.bfloat16, 0.0, True, True, True, False, False, 5),
    (torch.bfloat16, None, True, False, False, True, True, 2),
]


@pytest.mark.parametrize("dtype,vr,di,div,detach,sltt,pn,sid", BWD_CASES,
                         ids=lambda v: str(v).replace("torch.", ""))
def test_backward_flags_and_dtypes(dtype, vr, di, div, detach, sltt, pn, sid):
    args = _backward_case(dtype, (6, 2, 3, 11), sid, vr, di, div, detach, sltt, pn,
                          with_v_seq=True)
    _check_backward(args, dtype)


@pytest.mark.parametrize("detach", [True, False])
def test_an_infinite_membrane_gives_the_cpp_ops_finite_gradients(detach):
    """A hard-reset membrane at -inf: the reset term (Vr - H) sg is inf * 0; absent when the
    reset is detached or gV is zero, as in the C++ op (snn::step_grad): finite, and the same."""
    h = torch.tensor([[-float("inf"), 0.3], [-float("inf"), 1.5]])
    v0 = torch.tensor([-float("inf"), 0.0])
    args = (torch.ones(2, 2), None, None, h, v0, torch.tensor(0.0), torch.tensor(1.0), 0.0, 1,
            2.0, op_flags.backward_flags(False, False, detach, False, False, False))
    got, want = _both(ops.lif_backward_triton, ops.lif_backward, args)
    assert torch.isfinite(want[0]).all() and torch.isfinite(want[1]).all()
    _assert_same(got[0], want[0], "grad_x")
    _assert_same(got[1], want[1], "grad_v_init")


@pytest.mark.parametrize("vr", [0.0, None], ids=["hard", "soft"])
def test_integrate_and_fire_k_zero(vr):
    """IFNode's case: k = 0 without decay_input (H = V + X). Forward to the bit; grad_x and
    grad_v_init to the bit (ATan has no exp), the parameter sums to GRAD_TOL."""
    shape = (6, 3, 21)
    x = inputs(shape, scale=1.0, shift=0.3)
    v0 = torch.rand(shape[1:]) * 0.5
    zero, vth = torch.tensor(0.0), torch.rand(21) * 0.5 + 0.75
    fwd = _fwd_args(x, v0, zero, vth, vr, di=False, div=False)
    got, want = _both(ops.lif_forward_triton, ops.lif_forward, fwd)
    assert 0 < float(want[0].mean()) < 1
    for g, w, name in zip(got, want, ("spikes", "v_last", "h_seq", "v_seq")):
        _assert_same(g, w, name)
    bwd = (torch.randn(shape), torch.randn(shape[1:]), None, want[2], v0, zero, vth, vr, 1, 2.0,
           op_flags.backward_flags(False, False, False, False, True, True))
    _check_backward(bwd, torch.float32)


def test_backward_fp64_scalars_are_not_rounded_to_fp32():
    """alpha = 0.3 and v_reset = -0.1 have no exact fp32 value: passed as fp64 bits, the fp64
    gradients equal the C++ op's to the bit."""
    args = _backward_case(torch.float64, (4, 3, 5), 1, -0.1, True, True, False, False, False,
                          with_v_seq=False, alpha=0.3)
    got, want = _both(ops.lif_backward_triton, ops.lif_backward, args)
    _assert_same(got[0], want[0], "grad_x")
    _assert_same(got[1], want[1], "grad_v_init")


@pytest.mark.parametrize("v_reset,alpha", [(-1e39, 2.0), (0.0, 1e39), (-3.4028235e38, 2.0)],
                         ids=["vr-beyond-fp32", "alpha-beyond-fp32", "vr-rounds-to-max"])
def test_fp32_scalars_beyond_its_range_round_as_the_cpp_op(v_reset, alpha):
    """A double v_reset / alpha beyond fp32's range is inf in fp32 math, as the C++ op's
    float(v) makes it (Python's struct raised OverflowError); one that rounds to FLT_MAX stays
    finite. Forward and backward equal the C++ op's bits, NaN and inf included."""
    shape = (4, 3, 9)
    x = inputs(shape, scale=1.0, shift=0.7)
    decay, vth = torch.tensor(2.0), torch.rand(9) * 0.5 + 0.75
    fwd = _fwd_args(x, None, decay, vth, v_reset, 1, alpha)
    got, want = _both(ops.lif_forward_triton, ops.lif_forward, fwd)
    for g, w, name in zip(got, want, ("spikes", "v_last", "h_seq", "v_seq")):
        _assert_same(g, w, name)
    bwd = (torch.randn(shape), torch.randn(shape[1:]), None, want[2], None, decay, vth, v_reset,
           1, alpha, op_flags.backward_flags(True, True, False, False, True, True))
    got, want = _both(ops.lif_backward_triton, ops.lif_backward, bwd)
    for g, w, name in zip(got, want, ("grad_x", "grad_v_init", "grad_decay", "grad_v_threshold")):
        _assert_same(g, w, name)


def test_backward_without_optional_gradients():
    """grad_v_last / grad_v_seq / v_init None and no parameter gradients: zeros for those."""
    x = inputs((4, 3, 6))
    decay, vth = torch.tensor(2.0), torch.full((6,), 1.0)
    _, _, h, _ = ops.lif_forward(*_fwd_args(x, None, decay, vth, 0.0))
    args = (torch.randn(4, 3, 6), None, None, h, None, decay, vth, 0.0, 2, 1.0,
            op_flags.backward_flags(True, True, False, False, False, False))
    got, want = _both(ops.lif_backward_triton, ops.lif_backward, args)
    for g, w in zip(got, want):
        _assert_same(g, w)
    assert torch.equal(got[2], torch.zeros(())) and torch.equal(got[3], torch.zeros(6))


# ---- forward-mode tangents (lif_forward_jvp_triton) ---------------------------------------------

def _jvp_args(dtype, shape, sid, vr, di, div, detach, sltt, per_neuron, store_v,
              drop=(), alpha=2.0):
    """lif_forward_jvp's arguments: primals as the forward tests', tangents of every input
    (``drop``: the ones left None)."""
    x = inputs(shape, dtype, scale=1.0, shift=0.7)
    decay, vth = _params(shape, dtype, per_neuron, div)
    if vr is not None:
        vth = vth.clamp_min(vr + 0.25)
    v0 = (torch.rand(shape[1:], dtype=torch.float64) * 0.8).to(dtype)
    tan = {"x": torch.randn(shape, dtype=torch.float64).to(dtype),
           "v": torch.randn(shape[1:], dtype=torch.float64).to(dtype),
           "decay": torch.randn(decay.shape, dtype=torch.float64).to(decay.dtype),
           "vth": torch.randn(vth.shape, dtype=torch.float64).to(vth.dtype)}
    tan = {k: (None if k in drop else t) for k, t in tan.items()}
    return (x, tan["x"], v0, tan["v"], decay, tan["decay"], vth, tan["vth"], vr, sid, alpha,
            op_flags.forward_flags(di, div, detach, sltt, store_v, keep_h=False))


def _check_jvp(args, dtype):
    """The Triton tangents against the C++ loop's: to the bit where the surrogate has no exp
    (the same operations in the same order), else within GRAD_TOL."""
    got, want = _both(ops.lif_forward_jvp_triton, ops.lif_forward_jvp, args)
    assert float(want[0].abs().sum()) > 0
    for g, w, name in zip(got, want, ("spikes_tangent", "v_last_tangent", "v_seq_tangent")):
        if args[9] in EXP_SURROGATES:
            _assert_close(g, w, dtype, name)
        else:
            _assert_same(g, w, name)


@pytest.mark.parametrize("sid", range(8), ids=SURROGATE_NAMES)
@pytest.mark.parametrize("vr", [0.0, None], ids=["hard", "soft"])
def test_jvp_every_surrogate(sid, vr):
    _check_jvp(_jvp_args(torch.float32, (5, 3, 37), sid, vr, di=True, div=True, detach=False,
                         sltt=False, per_neuron=(sid % 2 == 0), store_v=(sid % 3 == 0)),
               torch.float32)


@pytest.mark.parametrize("dtype,vr,di,div,detach,sltt,pn,sid", BWD_CASES,
                         ids=lambda v: str(v).replace("torch.", ""))
def test_jvp_flags_and_dtypes(dtype, vr, di, div, detach, sltt, pn, sid):
    _check_jvp(_jvp_args(dtype, (6, 2, 3, 11), sid, vr, di, div, detach, sltt, pn,
                         store_v=True), dtype)


@pytest.mark.parametrize("drop", [("x",), ("v", "decay"), ("vth",), ("x", "v", "decay", "vth")],
                         ids=lambda d: "-".join(d))
def test_jvp_without_some_tangents(drop):
    """A tangent left None is zero, as for the C++ op (all None: every tangent zero)."""
    args = _jvp_args(torch.float32, (4, 3, 10), 1, 0.0, True, True, False, False, True,
                     store_v=True, drop=drop)
    got, want = _both(ops.lif_forward_jvp_triton, ops.lif_forward_jvp, args)
    for g, w in zip(got, want):
        _assert_same(g, w)
    if len(drop) == 4:
        assert all(not bool(g.any()) for g in got)


def test_jvp_through_torch_func_takes_the_triton_kernel(monkeypatch):
    """torch.func.jvp of lif_multi_step under use_backend('triton') runs the Triton tangent
    kernel (not the torch-op composite) and gives the C++ backend's tangents; jacfwd (a vmap
    over jvp) still takes the batched composite."""
    from pypaper.snn import jvp_rule

    calls = []
    composite = jvp_rule.composite
    monkeypatch.setattr(jvp_rule, "composite", lambda *a: (calls.append(1), composite(*a))[1])
    x = inputs((5, 2, 9))
    t = torch.randn(x.shape)
    tau = torch.rand(9) + 1.5
    dtau = torch.randn(9)

    def f(a, tau):
        s, v_last, _ = lif_multi_step(a, tau=tau, surrogate_function=surrogate_of("ATan"))
        return s, v_last

    def run(device, backend):
        with pypaper.use_backend(backend):
            return func.jvp(f, (x.to(device), tau.to(device)), (t.to(device), dtau.to(device)))

    (s_t, v_t), (ds_t, dv_t) = run(DEVICE, "triton")
    assert calls == []
    (s_c, v_c), (ds_c, dv_c) = run("cpu", "cpu")
    assert calls == []
    for g, w in zip((s_t, v_t, ds_t, dv_t), (s_c, v_c, ds_c, dv_c)):
        _assert_same(g.cpu(), w)
    assert float(ds_c.abs().sum()) > 0
    with pypaper.use_backend("triton"):
        func.jacfwd(lambda a: f(a, tau.to(DEVICE))[0])(x[:2, :1].contiguous().to(DEVICE))
    assert calls == [1]


def test_jvp_bad_arguments_raise_and_name_the_argument():
    args = list(_jvp_args(torch.float32, (3, 2, 4), 1, 0.0, True, True, False, False, True,
                          store_v=False))
    bad = list(args)
    bad[1] = args[1][:-1]
    with pytest.raises(ValueError, match="x_tangent must match x"):
        ops.lif_forward_jvp_triton(*[_to(a, DEVICE) for a in bad])
    bad = list(args)
    bad[5] = torch.ones(5)
    with pytest.raises(ValueError, match=r"decay_tangent has shape \(5,\)"):
        ops.lif_forward_jvp_triton(*[_to(a, DEVICE) for a in bad])
    bad = list(args)
    bad[-1] = args[-1] | op_flags.KEEP_H
    with pytest.raises(ValueError, match="lif_forward_jvp_triton: flags .* has bits"):
        ops.lif_forward_jvp_triton(*[_to(a, DEVICE) for a in bad])


# ---- autograd through the public op ------------------------------------------------------------

@pytest.mark.parametrize("per_neuron,v_reset,sid", [(True, 0.0, 1), (False, None, 0),
                                                    (True, None, 7)])
def test_autograd_through_use_backend_triton(per_neuron, v_reset, sid):
    """lif_multi_step under pypaper.use_backend('triton') runs the triton_op and its registered
    backward (lif_backward_triton): outputs and every gradient against the C++ backend."""
    shape = (5, 4, 9)
    x = inputs(shape)
    feat = shape[2:] if per_neuron else ()
    tau = torch.rand(feat) + 1.5
    vth = torch.rand(feat) * 0.4 + 0.8
    v0 = torch.rand(shape[1:]) * 0.5
    sg = surrogate_of(SURROGATE_NAMES[sid])

    def run(device, backend):
        leaves = [t.detach().to(device).clone().requires_grad_() for t in (x, v0, tau, vth)]
        with pypaper.use_backend(backend):
            assert backend_for(leaves[0]) == backend
            s, v_last, v_seq = lif_multi_step(leaves[0], leaves[1], tau=leaves[2],
                                              v_threshold=leaves[3], v_reset=v_reset,
                                              surrogate_function=sg, store_v_seq=True)
        w = torch.linspace(-1, 1, s.numel()).reshape(s.shape).to(device)
        ((s * w).sum() + v_last.square().sum() + 0.5 * v_seq.sum()).backward()
        return ([t.detach().cpu().clone() for t in (s, v_last, v_seq)],
                [t.grad.cpu().clone() for t in leaves])

    out_t, grads_t = run(DEVICE, "triton")
    out_c, grads_c = run("cpu", "cpu")
    for g, w in zip(out_t, out_c):
        _assert_same(g, w)
    for g, w, name in zip(grads_t, grads_c, ("x", "v", "tau", "v_threshold")):
        _assert_close(g, w, torch.float32, name)


_COMPILED_ONLY = pytest.mark.skipif(DEVICE.type != "cuda",
                                    reason="interpreted Triton kernels cannot be traced")


@_COMPILED_ONLY
def test_compile_fullgraph_triton():
    """The triton_ops (forward and the registered backward) inside one compiled graph."""
    x = inputs((5, 3, 8)).to(DEVICE)
    tau0 = (torch.rand(8) + 1.5).to(DEVICE)
    w = torch.linspace(-1, 1, x.numel()).reshape(x.shape).to(DEVICE)

    def f(x, tau):
        s, v_last, _ = lif_multi_step(x, tau=tau, surrogate_function=surrogate_of("ATan"))
        return (s * w).sum() + v_last.square().sum()

    def grads(fn):
        xs, tau = x.clone().requires_grad_(), tau0.clone().requires_grad_()
        with pypaper.use_backend("triton"):
            out = fn(xs, tau)
        out.backward()
        return out.detach(), xs.grad, tau.grad

    torch._dynamo.reset()
    got = grads(torch.compile(f, fullgraph=True))
    want = grads(f)
    for g, e in zip(got, want):
        _assert_close(g.cpu(), e.cpu(), torch.float32)


@_COMPILED_ONLY
@pytest.mark.parametrize("rg", [False, True])
def test_opcheck_triton(rg):
    x = inputs((4, 3, 5)).to(DEVICE).requires_grad_(rg)
    k = (torch.rand(5) * 0.5 + 0.2).to(DEVICE).requires_grad_(rg)
    vth = (torch.rand(5) + 0.5).to(DEVICE).requires_grad_(rg)
    torch.library.opcheck(ops.lif_forward_triton.default,
                          _fwd_args(x, None, k, vth, None, sid=6, di=False, div=False))


@_COMPILED_ONLY
def test_opcheck_triton_jvp():
    args = _jvp_args(torch.float32, (4, 3, 5), 6, None, False, False, True, False, True,
                     store_v=True)
    torch.library.opcheck(ops.lif_forward_jvp_triton.default, [_to(a, DEVICE) for a in args])


# ---- errors --------------------------------------------------------------------------------------

def test_bad_arguments_raise_and_name_the_argument():
    x = inputs((3, 2, 4)).to(DEVICE)
    one = torch.tensor(1.0, device=DEVICE)
    two = torch.tensor(2.0, device=DEVICE)
    with pytest.raises(ValueError, match="surrogate must be an id"):
        ops.lif_forward_triton(*_fwd_args(x, None, two, one, 0.0, sid=8))
    with pytest.raises(ValueError, match="alpha must be positive"):
        ops.lif_forward_triton(*_fwd_args(x, None, two, one, 0.0, alpha=0.0))
    with pytest.raises(ValueError, match=r"v_init has shape \(2, 5\)"):
        ops.lif_forward_triton(*_fwd_args(x, torch.zeros(2, 5, device=DEVICE), two, one, 0.0))
    with pytest.raises(ValueError, match=r"v_threshold has shape \(3,\)"):
        ops.lif_forward_triton(*_fwd_args(x, None, two, torch.ones(3, device=DEVICE), 0.0))
    with pytest.raises(TypeError, match="x must be a float32"):
        ops.lif_forward_triton(*_fwd_args(x.to(torch.int32), None, two, one, 0.0))
    with pytest.raises(ValueError, match=r"x must have shape \[T, N, \*\]"):
        ops.lif_forward_triton(*_fwd_args(x[0, 0], None, two, one, 0.0))
    _, _, h, _ = ops.lif_forward_triton(*_fwd_args(x, None, two, one, 0.0))
    with pytest.raises(ValueError, match="grad_spikes must match h_seq"):
        ops.lif_backward_triton(h[:2], None, None, h, None, two, one, 0.0, 1, 2.0,
                                op_flags.backward_flags(True, True, False, False, True, True))


def test_cpu_tensors_without_the_interpreter_say_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ok, why = tk.triton_available(torch.device("cpu"))
    assert not ok and "CUDA tensors" in why


# ---- launch heuristics ---------------------------------------------------------------------------

def test_block_heuristics():
    assert tk.block_for(1) == 16 and tk.block_for(33) == 64 and tk.block_for(10**6) == 1024
    # On a GPU the block shrinks (not below 128) until every SM has two programs.
    assert tk.block_for(10**6, sms=132) == 1024
    assert tk.block_for(40_000, sms=132) == 128
    assert tk.block_for(100, sms=132) == 128
    assert tk.num_warps_for(16) == 1 and tk.num_warps_for(256) == 4
    assert tk.num_warps_for(1024) == 8
    assert not tk._needs_int64(100, 10**6, 1024)
    assert tk._needs_int64(3000, 10**6, 1024)


def test_channels_last_input_keeps_its_strides():
    """A channels_last step ([1, N, C, H, W] view) runs the Triton kernel on its memory as it
    lies (pypaper/snn/ops.py _lif_in_storage_order): outputs and gradients equal the C++ op's,
    with the input's strides."""
    torch.manual_seed(0)
    x = (torch.randn(2, 3, 4, 5) * 2).to(device=DEVICE).to(memory_format=torch.channels_last)
    vth = (torch.rand(3, 4, 5, device=DEVICE) + 0.5).requires_grad_()
    got = []
    for backend in ("triton", "cpu"):
        xx = (x if backend == "triton" else x.cpu())[None].detach().requires_grad_()
        th = vth if backend == "triton" else vth.detach().cpu().requires_grad_()
        with pypaper.use_backend(backend):
            s, v, _ = lif_multi_step(xx, v_threshold=th, surrogate_function=surrogate_of("ATan"))
        g = torch.autograd.grad(s.sum() + v.sum(), (xx, th))
        got.append((s, v, g))
    (s, v, g), (sc, vc, gc) = got
    assert s.stride() == x[None].stride() and v.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(s.cpu(), sc) and torch.equal(v.cpu(), vc)
    assert torch.equal(g[0].cpu(), gc[0])
    torch.testing.assert_close(g[1].cpu(), gc[1], rtol=GRAD_TOL[torch.float32], atol=1e-6)


# ---- alpha as a tensor (torch.compile over a tensor alpha: pypaper/snn/tensor_alpha.py) ----------

def test_tensor_alpha_ops_run_the_triton_twins():
    """lif_forward_alpha_tensor / lif_backward_alpha_tensor with backend 'triton' give the
    Triton ops' results for alpha's value, bit for bit (one element, any floating dtype)."""
    from pypaper.snn import tensor_alpha

    fwd, bwd = tensor_alpha.ops("triton")
    x = inputs((5, 3, 7), torch.float32).to(DEVICE)
    decay, vth = torch.tensor(2.0, device=DEVICE), torch.tensor(1.0, device=DEVICE)
    flags = op_flags.forward_flags(True, True, False, False, False, True)
    alpha = torch.tensor([1.5], dtype=torch.float64, device=DEVICE)
    got = fwd(x, None, decay, vth, 0.0, 1, alpha, flags, "triton")
    want = ops.lif_forward_triton(x, None, decay, vth, 0.0, 1, 1.5, flags)
    assert not any(t._is_view() for t in got)
    for g, w in zip(got, want):
        _assert_same(g.cpu(), w.cpu())
    h = want[2]
    gs = torch.randn_like(h)
    bflags = op_flags.backward_flags(True, True, False, False, False, True)
    args = (gs, None, None, h, None, decay, vth, 0.0, 1)
    got = bwd(*args, alpha, bflags, "triton")
    want = ops.lif_backward_triton(*args, 1.5, bflags)
    assert not any(t._is_view() for t in got)
    for g, w in zip(got, want):
        _assert_same(g.cpu(), w.cpu())
    assert got[0].abs().sum() > 0
