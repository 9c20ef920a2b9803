"""IFNode (integrate-and-fire: H = V + X, no leak) against SpikingJelly's IFNode, and the fused
op's k = 0 path behind it: every surrogate x hard/soft reset x detach_reset, spikes and membrane
to the bit in fp32, gradients to the fp32 tolerance; the C++ op against the plain-PyTorch
reference and float64 gradcheck; k = 0 refused with decay_input (a neuron that never charges)."""
import pytest
import torch

import pypaper
from pypaper import _ext
from pypaper.snn import lif_multi_step, neuron, op_flags

from .helpers import CONFIGS, assert_close, config_id, inputs, surrogate_of

IF_CONFIGS = [c for c in CONFIGS if not c["decay_input"]]  # IF has no decay_input


def _if_id(c):
    return config_id(c).replace("-nodi", "")


@pytest.mark.parametrize("cfg", IF_CONFIGS, ids=_if_id)
def test_matches_spikingjelly(cfg):
    sj_neuron = pytest.importorskip("spikingjelly.activation_based.neuron")
    from spikingjelly.activation_based import surrogate as sj_surrogate

    common = dict(v_threshold=1.0, v_reset=cfg["v_reset"], detach_reset=cfg["detach_reset"],
                  step_mode="m")
    ours = neuron.IFNode(surrogate_function=surrogate_of(cfg["surrogate"]), **common)
    theirs = sj_neuron.IFNode(surrogate_function=getattr(sj_surrogate, cfg["surrogate"])(),
                              **common)
    x = inputs(shift=0.3)
    g, gv = torch.randn_like(x), torch.randn(x.shape[1:])
    results = []
    for m in (ours, theirs):
        xx = x.clone().requires_grad_()
        s = torch.cat([m(xx[:4]), m(xx[4:])])  # the second call starts from the carried v
        ((s * g).sum() + (m.v * gv).sum()).backward()
        results.append((s.detach(), m.v.detach(), xx.grad))
    (s, v, gx), (s_sj, v_sj, gx_sj) = results
    assert torch.equal(s, s_sj), "spikes differ from SpikingJelly"
    assert torch.equal(v, v_sj), "membrane differs from SpikingJelly"
    assert 0.02 < float(s.mean()) < 0.98
    assert_close(gx, gx_sj, torch.float32, "grad x")


def test_integrates_without_leak():
    """No input after a charge: the membrane holds (LIF's would decay toward v_reset)."""
    m = neuron.IFNode(v_threshold=10.0, step_mode="m")
    x = torch.zeros(5, 3)
    x[0] = torch.tensor([0.5, 2.0, -1.5])
    assert not m(x).any()
    assert torch.equal(m.v, torch.tensor([0.5, 2.0, -1.5]))
    m = neuron.IFNode(v_reset=None, step_mode="s")  # soft reset keeps the overshoot
    assert float(m(torch.tensor([2.5]))) == 1.0 and float(m.v) == 1.5


@pytest.mark.parametrize("v_reset", [0.0, None])
@pytest.mark.parametrize("detach_reset", [False, True])
def test_cpp_op_matches_reference(v_reset, detach_reset):
    if not _ext.LOADED:
        pytest.skip("pypaper._C not built")
    x = inputs((9, 4, 17), shift=0.3)
    v0 = torch.rand(4, 17) * 0.5
    vth = torch.rand(17) * 0.5 + 0.75
    out = []
    for backend in ("cpu", "reference"):
        with pypaper.use_backend(backend):
            xx, vv, tt = (t.clone().requires_grad_() for t in (x, v0, vth))
            s, v_last, v_seq = lif_multi_step(xx, vv, k=0.0, v_threshold=tt, v_reset=v_reset,
                                              decay_input=False, detach_reset=detach_reset,
                                              store_v_seq=True,
                                              surrogate_function=surrogate_of("ATan"))
            (s * torch.linspace(-1, 1, 17)).sum().add((v_last ** 2).sum()).backward()
            out.append((s, v_last, v_seq, xx.grad, vv.grad, tt.grad))
    for a, b, name in zip(out[0], out[1], ("s", "v_last", "v_seq", "gx", "gv", "gvth")):
        if name in ("s", "v_last", "v_seq"):
            assert torch.equal(a, b), name
        else:
            assert_close(a, b, torch.float32, name)


@pytest.mark.parametrize("v_reset", [0.0, None])
def test_gradcheck_float64(v_reset):
    """With detach_reset the membrane is differentiable (see test_lif_op's gradcheck): the
    reverse scan with dH/dV = dH/dX = 1 against finite differences, in x, v_init and vth."""
    x = inputs((5, 2, 3), torch.float64, shift=0.3).requires_grad_()
    v0 = (torch.rand(2, 3, dtype=torch.float64) * 0.5).requires_grad_()
    vth = torch.tensor([0.9, 1.0, 1.1], dtype=torch.float64, requires_grad=True)

    def f(x, v0, vth):
        _, v_last, v_seq = lif_multi_step(x, v0, k=0.0, v_threshold=vth, v_reset=v_reset,
                                          decay_input=False, detach_reset=True, store_v_seq=True)
        return v_last, v_seq

    s = lif_multi_step(x.detach(), v0.detach(), k=0.0, v_threshold=vth.detach(),
                       v_reset=v_reset, decay_input=False)[0]
    assert 0 < float(s.mean()) < 1
    assert torch.autograd.gradcheck(f, (x, v0, vth), eps=1e-7, atol=1e-8)


def test_k_zero_needs_no_decay_input():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"k = 1/tau must lie in \(0, 1\]"):
        lif_multi_step(x, k=0.0)  # decay_input=True: H = V, the neuron would never charge
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\] \(0: no leak, IF\)"):
        lif_multi_step(x, k=-0.1, decay_input=False)
    if _ext.LOADED:
        one = torch.tensor(1.0)
        f = op_flags.forward_flags(True, False, False, False, False)
        with pytest.raises(RuntimeError, match=r"k = 1/tau must be in \(0, 1\]"):
            torch.ops.pypaper.lif_forward(torch.ones(3, 4), None, one * 0, one, 0.0, 0, 4.0, f)
        f = op_flags.forward_flags(False, False, False, False, False)
        s, v, _, _ = torch.ops.pypaper.lif_forward(torch.ones(3, 4) * 0.6, None, one * 0, one,
                                                   0.0, 0, 4.0, f)
        assert s[:, 0].tolist() == [0.0, 1.0, 0.0] and torch.equal(v, torch.full((4,), 0.6))


def test_constructor_matches_spikingjelly():
    sj_neuron = pytest.importorskip("spikingjelly.activation_based.neuron")
    import inspect
    ours = inspect.signature(neuron.IFNode).parameters
    theirs = inspect.signature(sj_neuron.IFNode).parameters
    positional = [n for n, p in ours.items() if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert positional == list(theirs)
    for name in ("v_threshold", "v_reset", "detach_reset", "step_mode", "store_v_seq"):
        assert ours[name].default == theirs[name].default, name
    assert type(neuron.IFNode().surrogate_function).__name__ == "Sigmoid"


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_an_infinite_membrane_keeps_firing_as_in_spikingjelly(backend, dtype):
    """A soft-reset IF membrane that passes the dtype's range (fp16: 65504, here after two steps
    of 6e4) or takes an infinite input is inf and keeps firing, as SpikingJelly's V + X does; the
    op ran IF as V - (V - Vr) * 0 + X, and inf * 0 made it NaN, silent from then on (before
    2026-12-04). The backward stays finite where SpikingJelly's does."""
    sj_neuron = pytest.importorskip("spikingjelly.activation_based.neuron")
    if backend == "cpu" and not _ext.LOADED:
        pytest.skip("needs the C++ extension")
    big = 6e4 if dtype == torch.float16 else 3e38  # twice that is past the range
    x = torch.tensor([[big, 0.5, float("inf"), 0.3]], dtype=dtype).repeat(6, 1)
    x[0, 2] = 0.2  # inf from the second step
    theirs = sj_neuron.IFNode(v_reset=None, step_mode="m")
    ours = neuron.IFNode(v_reset=None, step_mode="m")
    xs = x.float().clone().requires_grad_()
    want = theirs(xs)
    want.sum().backward()
    xo = x.clone().requires_grad_()
    with pypaper.use_backend(backend):
        got = ours(xo)
        got.sum().backward()
    assert torch.equal(got.float(), want.to(dtype).float())
    assert got[1:, [0, 2]].eq(1).all()  # fires at every step once the membrane is inf
    assert torch.equal(ours.v.float(), theirs.v.to(dtype).float())
    assert torch.isinf(ours.v[[0, 2]]).all() and torch.isfinite(ours.v[[1, 3]]).all()
    assert torch.isfinite(xo.grad).all() and torch.isfinite(xs.grad).all()
    assert torch.allclose(xo.grad.float(), xs.grad, atol=2e-3)


@pytest.mark.skipif(not _ext.LOADED, reason="needs the C++ extension")
@pytest.mark.parametrize("detach_reset", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_hard_reset_infinite_membrane_gives_finite_gradients(dtype, detach_reset):
    """A hard-reset IF membrane at -inf (one that overflowed in an earlier call): the backward's
    reset term (Vr - H) sg is inf * 0 there. The op multiplied it by dr = 0 (detach_reset) or by
    a zero gV (the last step) and gave NaN where the reference's graph has no such term (0).
    Now absent: equal to the reference with detach_reset; without it the reference's autograd
    still forms 0 * inf at a zero gV (NaN), the op gives 0 there and the reference's value
    everywhere else. Forward mode (jvp) likewise."""
    x = torch.tensor([[-3.0, 0.5], [-3.0, 0.7]], dtype=dtype)
    v0 = torch.tensor([-float("inf"), 0.0], dtype=dtype)

    def run(backend):
        xs = x.clone().requires_grad_()
        with pypaper.use_backend(backend):
            s, v, _ = lif_multi_step(xs, v0, k=0.0, decay_input=False, detach_reset=detach_reset)
        s.float().sum().backward()
        return xs.grad

    got, want = run("cpu"), run("reference")
    assert torch.isfinite(got).all(), got
    where = torch.isfinite(want)
    torch.testing.assert_close(got[where], want[where])
    assert where.all() == detach_reset
    if detach_reset:
        def f(backend):
            def g(xx):
                with pypaper.use_backend(backend):
                    return lif_multi_step(xx, v0.float(), k=0.0, decay_input=False,
                                          detach_reset=True)[:2]
            return torch.func.jvp(g, (x.float(),), (torch.ones_like(x.float()),))[1]

        (ds, dv), (ds_ref, dv_ref) = f("cpu"), f("reference")
        assert torch.isfinite(ds).all() and torch.isfinite(dv).all()
        torch.testing.assert_close(ds, ds_ref)
        torch.testing.assert_close(dv, dv_ref)


@pytest.mark.parametrize("v_reset", [0.0, -0.2, None], ids=["hard", "hard-vr", "soft"])
@pytest.mark.parametrize("per_neuron", [False, True], ids=["k", "k-per-neuron"])
def test_a_learnable_k_at_zero_gets_the_same_gradient_on_every_backend(v_reset, per_neuron):
    """k = 0 without decay_input (the IF neuron) with k itself trained: dH/dk = -(V - Vr) at
    k = 0 as anywhere else. The reference computed V + X there through a where, which gave k no
    gradient (0 against the C++ op's -sum (V - Vr) gH) until 2026-12-06."""
    x = inputs(shift=0.3).double()
    shape = x.shape[2:] if per_neuron else ()
    got = {}
    for backend in ("reference", "cpu"):
        if backend == "cpu" and not _ext.LOADED:
            continue
        k = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
        xx = x.clone().requires_grad_()
        with pypaper.use_backend(backend):
            s, v, _ = lif_multi_step(xx, k=k, decay_input=False, v_reset=v_reset)
        (s.sum() + (v * v).sum()).backward()
        got[backend] = (s.detach(), v.detach(), xx.grad, k.grad)
    want = got["reference"]
    assert want[3].abs().sum() > 0
    for name, g in got.items():
        for a, b in zip(g, want):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
    # against a one-sided finite difference (k < 0 is refused): (-3 f(0) + 4 f(e) - f(2e)) / 2e
    # of a loss on v with S detached in the reset, whose gradient then holds no surrogate (so
    # small a k moves no spike: x sits 0.3 off the threshold's grid)
    eps = 1e-6
    f = []
    for kv in (0.0, eps, 2 * eps):
        k = torch.full(shape, kv, dtype=torch.float64, requires_grad=kv == 0.0)
        with pypaper.use_backend("reference"):
            _, v, _ = lif_multi_step(x, k=k, decay_input=False, v_reset=v_reset,
                                     detach_reset=True)
        loss = (v * v).sum()
        if kv == 0.0:
            loss.backward()
            grad = k.grad.sum().item()
        f.append(loss.item())
    fd = (-3 * f[0] + 4 * f[1] - f[2]) / (2 * eps)
    assert abs(fd - grad) < 1e-5 * max(1.0, abs(fd))


def test_reference_keeps_an_infinite_membrane_at_k_zero():
    """The where that keeps V + X at k = 0 for an infinite V (inf * 0 would be NaN) is still
    there: only the infinite entries leave out the k term."""
    x = torch.tensor([[float("inf"), 0.5], [1.0, 0.25]], dtype=torch.float64)
    k = torch.zeros((), dtype=torch.float64, requires_grad=True)
    with pypaper.use_backend("reference"):
        s, v, _ = lif_multi_step(x, k=k, decay_input=False, v_reset=None)
    assert torch.isinf(v[0]) and not torch.isnan(v).any()
    assert s[:, 0].eq(1).all()
