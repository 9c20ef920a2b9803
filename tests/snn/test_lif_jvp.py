"""Forward-mode AD of the fused LIF op (pypaper/snn/jvp_rule.py, registered with
pypaper._autograd.register_jvp): torch.autograd.forward_ad, torch.func.jvp and jacfwd.

Two independent checks of the rule's tangent J v:
- the adjoint identity against the op's own backward: <J v, u> = <v, J^T u> for random v, u
  over every input with a tangent (x, v_init, tau / k, v_threshold, per neuron where they can be);
- the reference backend's forward AD, where torch differentiates the plain loop itself (the
  surrogate's jvp at the spike, pypaper/snn/reference.py's SpikeFunction), to the last bits in
  float64.
"""
import itertools

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.func as func

import pypaper
from pypaper import _ext
from pypaper.snn import lif_multi_step, neuron, surrogate

from .helpers import CONFIGS, config_id, inputs

pytestmark = pytest.mark.skipif(not _ext.LOADED, reason="pypaper._C not built")

T, N, F = 5, 2, 4


def _primals(cfg, per_neuron, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    x = inputs((T, N, F), dtype)
    shape = (F,) if per_neuron else ()
    params = {
        "x": x,
        "v": (torch.rand(N, F, dtype=torch.float64) * 0.4).to(dtype),
        # tau in (1.5, 3), or k = 1/tau; one threshold per neuron near the inputs' range
        "decay": (torch.rand(shape, dtype=torch.float64) * 1.5 + 1.5).to(dtype),
        "vth": (torch.rand(shape, dtype=torch.float64) * 0.4 + 0.8).to(dtype),
    }
    if cfg.get("use_k"):
        params["decay"] = 1.0 / params["decay"]
    return params


def _call(cfg, p):
    decay = {"k": p["decay"]} if cfg.get("use_k") else {"tau": p["decay"]}
    fn = getattr(surrogate, cfg["surrogate"])()
    spikes, v_last, v_seq = lif_multi_step(
        p["x"], p["v"], **decay, v_threshold=p["vth"], v_reset=cfg["v_reset"],
        surrogate_function=fn, decay_input=cfg["decay_input"],
        detach_reset=cfg["detach_reset"], sltt=cfg.get("sltt", False), store_v_seq=True)
    return spikes, v_last, v_seq


def _tangents(p, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g, dtype=torch.float64).to(v.dtype)
            for k, v in p.items()}


def _jvp(cfg, p, t):
    names = list(p)
    _, tangent = func.jvp(lambda *a: _call(cfg, dict(zip(names, a))),
                          tuple(p[k] for k in names), tuple(t[k] for k in names))
    return tangent


def _dot(a, b):
    return sum((x.double() * y.double()).sum() for x, y in zip(a, b))


@pytest.mark.parametrize("cfg", CONFIGS, ids=config_id)
@pytest.mark.parametrize("per_neuron", [False, True], ids=["shared", "per_neuron"])
def test_adjoint_of_backward(cfg, per_neuron):
    """<J v, u> = <v, J^T u>: the rule's tangent against the op's backward (the CPU kernel's
    reverse scan), every surrogate x reset x decay_input x detach_reset."""
    p = _primals(cfg, per_neuron)
    v = _tangents(p)
    jv = _jvp(cfg, p, v)
    out, vjp_fn = func.vjp(lambda *a: _call(cfg, dict(zip(p, a))), *p.values())
    g = torch.Generator().manual_seed(2)
    u = tuple(torch.randn(o.shape, generator=g, dtype=torch.float64) for o in out)
    jtu = vjp_fn(u)
    lhs, rhs = _dot(jv, u), _dot(v.values(), jtu)
    assert abs(float(lhs)) > 1e-3
    torch.testing.assert_close(lhs, rhs, rtol=1e-10, atol=1e-10)


_FLAGS = [dict(surrogate="ATan", v_reset=vr, decay_input=di, detach_reset=dr, sltt=sl, use_k=k)
          for vr, di, dr, sl, k in itertools.product([0.0, None], [True, False], [False, True],
                                                     [False, True], [False, True])]


def _flags_id(c):
    return config_id(c) + ("-sltt" if c["sltt"] else "") + ("-k" if c["use_k"] else "-tau")


@pytest.mark.parametrize("cfg", _FLAGS, ids=_flags_id)
def test_matches_reference_forward_ad(cfg):
    """The rule (on the C++ op's outputs) equals torch's forward AD of the reference loop, SLTT
    and k = 1/tau (PLIF's multiply) included; and the adjoint identity holds there too."""
    p = _primals(cfg, per_neuron=True)
    v = _tangents(p)
    got = _jvp(cfg, p, v)
    with pypaper.use_backend("reference"):
        want = _jvp(cfg, p, v)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert got[0].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_tangents(dtype):
    """Tangents come back in x's dtype, computed in fp32 like the kernels' math."""
    cfg = dict(surrogate="Sigmoid", v_reset=0.0, decay_input=True, detach_reset=False)
    p64 = _primals(cfg, per_neuron=False)
    t64 = _tangents(p64)
    p = {k: v.to(dtype) for k, v in p64.items()}
    t = {k: v.to(dtype) for k, v in t64.items()}
    got = _jvp(cfg, p, t)
    with pypaper.use_backend("reference"):
        want = _jvp(cfg, {k: v.float() for k, v in p.items()},
                    {k: v.float() for k, v in t.items()})
    for a, b in zip(got, want):
        assert a.dtype == dtype
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(a.float(), b, rtol=tol, atol=tol)


@pytest.mark.parametrize("steps", [0, 1])
def test_short_sequences(steps):
    x = inputs((steps, 3), torch.float64)
    v0 = torch.full((3,), 0.3, dtype=torch.float64)
    tx, tv = torch.ones_like(x), torch.ones_like(v0)
    with fwAD.dual_level():
        spikes, v_last, _ = lif_multi_step(fwAD.make_dual(x, tx), fwAD.make_dual(v0, tv),
                                           surrogate_function=surrogate.ATan())
        ts, tl = fwAD.unpack_dual(spikes).tangent, fwAD.unpack_dual(v_last).tangent
    with pypaper.use_backend("reference"), fwAD.dual_level():
        rs, rl, _ = lif_multi_step(fwAD.make_dual(x, tx), fwAD.make_dual(v0, tv),
                                   surrogate_function=surrogate.ATan())
        want_s, want_l = fwAD.unpack_dual(rs).tangent, fwAD.unpack_dual(rl).tangent
    assert ts.shape == x.shape
    torch.testing.assert_close(ts, want_s if want_s is not None else torch.zeros_like(x))
    torch.testing.assert_close(tl, want_l)


def test_jacfwd_over_parameters_of_a_model():
    """jacfwd over every parameter of Linear -> PLIF (learnable per-neuron threshold) equals
    jacrev: the tangents of w (k = sigmoid(w)) and of the threshold reach the op."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 4),
        neuron.ParametricLIFNode(surrogate_function=surrogate.ATan(), step_mode="m",
                                 tau_shape=(4,), learnable_threshold=True)).double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(6, 2, 3, dtype=torch.float64) + 0.5

    def run(p):
        pypaper.snn.reset_net(model)
        return func.functional_call(model, p, (x,))

    fwd, rev = func.jacfwd(run)(params), func.jacrev(run)(params)
    assert set(fwd) == set(params)
    for k in params:
        assert rev[k].abs().sum() > 0, k
        torch.testing.assert_close(fwd[k], rev[k], rtol=1e-10, atol=1e-12)


def test_single_step_mode_carries_tangents_across_calls():
    """step_mode 's': the membrane's tangent crosses the calls, as the primal does."""
    x = inputs((T, N, F), torch.float64)
    t = _tangents({"x": x})["x"]
    lif = neuron.LIFNode(surrogate_function=surrogate.ATan())

    def stepped(a):
        lif.reset()
        return torch.stack([lif(a[i]) for i in range(a.shape[0])])

    def fused(a):
        return lif_multi_step(a, surrogate_function=surrogate.ATan())[0]

    torch.testing.assert_close(func.jvp(stepped, (x,), (t,))[1], func.jvp(fused, (x,), (t,))[1])


def test_triton_twin():
    """The Triton twin (under TRITON_INTERPRET on CPU tensors) has the same rule."""
    pytest.importorskip("triton")
    from pypaper.snn import _registration

    if not getattr(_registration.load_triton(), "HAVE_TRITON", False):
        pytest.skip("no Triton")
    cfg = dict(surrogate="Erf", v_reset=None, decay_input=False, detach_reset=True)
    p = {k: v.float() for k, v in _primals(cfg, per_neuron=True).items()}
    t = {k: v.float() for k, v in _tangents(p).items()}
    want = _jvp(cfg, p, t)
    with pypaper.use_backend("triton"):
        got = _jvp(cfg, p, t)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---- the C++ tangent kernel (pypaper::lif_forward_jvp, kernels/cpu/snn_jvp_cpu.h) --------------

JVP_OP = torch.ops.pypaper.lif_forward_jvp.default


def _jvp_op_args(cfg, p, t, store_v_seq=True, drop=()):
    from pypaper.snn import op_flags

    flags = op_flags.forward_flags(cfg["decay_input"], not cfg.get("use_k"), cfg["detach_reset"],
                                   cfg.get("sltt", False), store_v_seq, keep_h=False)
    sid, alpha = pypaper.snn.surrogate.surrogate_spec(getattr(surrogate, cfg["surrogate"])())
    tan = {k: (None if k in drop else v) for k, v in t.items()}
    return (p["x"], tan["x"], p["v"], tan["v"], p["decay"], tan["decay"], p["vth"], tan["vth"],
            cfg["v_reset"], sid, alpha, flags)


def _as_rule_call(args):
    x, dx, v, dv, decay, ddecay, vth, dvth, v_reset, sid, alpha, flags = args
    return (x, v, decay, vth, v_reset, sid, alpha, flags), (dx, dv, ddecay, dvth)


@pytest.mark.parametrize("cfg", _FLAGS, ids=_flags_id)
@pytest.mark.parametrize("per_neuron", [False, True], ids=["shared", "per_neuron"])
def test_fused_kernel_equals_composite(cfg, per_neuron):
    """The C++ loop against the torch-op composite of the same formulas (float64: only the
    order of a few products differs)."""
    from pypaper.snn import jvp_rule

    p = _primals(cfg, per_neuron)
    t = _tangents(p)
    for drop in ((), ("x",), ("v", "decay"), ("vth",)):
        args = _jvp_op_args(cfg, p, t, drop=drop)
        got = JVP_OP(*args)
        want = jvp_rule.composite(*_as_rule_call(args))
        for a, b in zip(got, (want[0], want[1], want[3])):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_kernel_streamed_and_chunked(dtype):
    """Shapes past one chunk of 128 neurons and past the streamed-store size, not multiples of
    either; 16-bit storage with fp32 math."""
    from pypaper.snn import jvp_rule

    cfg = dict(surrogate="ATan", v_reset=0.0, decay_input=True, detach_reset=False)
    for shape in ((3, 2, 333), (4, 1, (1 << 17) + 77)):
        torch.manual_seed(0)
        p = {"x": inputs(shape, dtype), "v": (torch.rand(shape[1:]) * 0.3).to(dtype),
             "decay": torch.tensor(2.0), "vth": torch.tensor(1.0)}
        t = {k: torch.randn(v.shape).to(v.dtype) for k, v in p.items()}
        args = _jvp_op_args(cfg, p, t)
        got = JVP_OP(*args)
        want = jvp_rule.composite(*_as_rule_call(args))
        for a, b in zip(got, (want[0], want[1], want[3])):
            assert a.dtype == dtype
            torch.testing.assert_close(a.float(), b.float(), rtol=1e-5, atol=1e-5)


def test_which_path_runs(monkeypatch):
    """Dual tensors and torch.func.jvp on CPU tensors take the fused kernel; jacfwd (a vmap over
    jvp) the batched composite, once for all its tangents."""
    from pypaper.snn import jvp_rule

    calls = []
    composite = jvp_rule.composite
    monkeypatch.setattr(jvp_rule, "composite", lambda *a: (calls.append(1), composite(*a))[1])
    x = inputs((4, 2, 3), torch.float64)
    t = torch.ones_like(x)

    def f(a):
        return lif_multi_step(a, surrogate_function=surrogate.ATan())[0]

    with fwAD.dual_level():
        f(fwAD.make_dual(x, t))
    func.jvp(f, (x,), (t,))
    assert calls == []
    func.jacfwd(f)(x)
    assert calls == [1]


def test_opcheck_fused_kernel():
    cfg = dict(surrogate="Sigmoid", v_reset=None, decay_input=False, detach_reset=True)
    p = _primals(cfg, per_neuron=True, dtype=torch.float32)
    t = _tangents(p)
    torch.library.opcheck(JVP_OP, _jvp_op_args(cfg, p, t))
    torch.library.opcheck(JVP_OP, _jvp_op_args(cfg, p, t, store_v_seq=False, drop=("v", "vth")))


def test_fused_kernel_checks_arguments():
    cfg = dict(surrogate="ATan", v_reset=0.0, decay_input=True, detach_reset=False)
    p = _primals(cfg, per_neuron=True, dtype=torch.float32)
    t = _tangents(p)
    args = list(_jvp_op_args(cfg, p, t))
    bad = list(args)
    bad[1] = t["x"][:-1]
    with pytest.raises(RuntimeError, match="x_tangent"):
        JVP_OP(*bad)
    bad = list(args)
    bad[5] = torch.ones(F + 1)
    with pytest.raises(RuntimeError, match="decay_tangent"):
        JVP_OP(*bad)
    bad = list(args)
    bad[-1] = args[-1] | pypaper.snn.op_flags.KEEP_H
    with pytest.raises(RuntimeError, match="flags"):
        JVP_OP(*bad)


def test_fused_kernel_non_contiguous_and_compiled():
    """Non-contiguous x and tangent (a transposed view) give the contiguous inputs' tangents;
    the op traces under torch.compile(fullgraph=True) through its fake kernel."""
    from pypaper.snn import op_flags

    torch.manual_seed(0)
    x = inputs((3, 5, 4)).transpose(1, 2)  # [T, 5, 4] viewed as [T, 4, 5]
    t = torch.randn(3, 5, 4).transpose(1, 2)
    assert not x.is_contiguous() and not t.is_contiguous()
    tau, vth = torch.tensor(2.0), torch.tensor(1.0)
    flags = op_flags.forward_flags(True, True, False, False, True, False)

    def call(a, b):
        return JVP_OP(a, b, None, None, tau, None, vth, None, 0.0, 1, 2.0, flags)

    want = call(x.contiguous(), t.contiguous())
    for got in (call(x, t), torch.compile(call, fullgraph=True)(x, t)):
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
