"""Second derivatives through the fused LIF op (pypaper/snn/second_order.py): double backward
(create_graph=True, then a backward through the gradient) and forward-over-reverse
(torch.func.hessian, jvp of grad).

Checked against two independent second derivatives:
- the reference backend, where autograd differentiates the plain loop twice (the surrogate
  derivative's own derivative at every spike, the reset's S * H products);
- SpikingJelly's LIFNode / ParametricLIFNode in their torch backend (their surrogate Functions'
  backward is written in differentiable torch ops), to the last bits in float64.
"""
import pytest
import torch
import torch.func as func

import pypaper
from pypaper import _ext
from pypaper.snn import lif_multi_step, neuron, op_flags, surrogate

from .helpers import CONFIGS, config_id, inputs

pytestmark = pytest.mark.skipif(not _ext.LOADED, reason="pypaper._C not built")

T, N, F = 5, 2, 4


def _params(seed=0, per_neuron=True):
    torch.manual_seed(seed)
    shape = (F,) if per_neuron else ()
    return {
        "x": inputs((T, N, F), torch.float64),
        "v": torch.rand(N, F, dtype=torch.float64) * 0.4,
        "tau": torch.rand(shape, dtype=torch.float64) * 1.5 + 1.5,
        "vth": torch.rand(shape, dtype=torch.float64) * 0.4 + 0.8,
    }


def _loss_fn(cfg):
    """A scalar of every output, with weights that make each output matter differently."""
    g = torch.Generator().manual_seed(7)
    ws = torch.randn(T, N, F, generator=g, dtype=torch.float64)
    wv = torch.randn(N, F, generator=g, dtype=torch.float64)
    wq = torch.randn(T, N, F, generator=g, dtype=torch.float64)

    def loss(x, v, tau, vth):
        s, v_last, v_seq = lif_multi_step(
            x, v, tau=tau, v_threshold=vth, v_reset=cfg["v_reset"],
            surrogate_function=getattr(surrogate, cfg["surrogate"])(),
            decay_input=cfg["decay_input"], detach_reset=cfg["detach_reset"],
            sltt=cfg.get("sltt", False), store_v_seq=True)
        return (s * ws).sum() + (v_last * wv).sum() + (v_seq * wq).sum()

    return loss


def _double_backward(loss, p, backend):
    """d/dp of sum(g * g * c) where g = dloss/dp (create_graph): every second-derivative block."""
    leaves = {k: v.clone().requires_grad_() for k, v in p.items()}
    with pypaper.use_backend(backend):
        grads = torch.autograd.grad(loss(**leaves), list(leaves.values()), create_graph=True,
                                    allow_unused=True, materialize_grads=True)
        c = torch.linspace(-1.0, 2.0, sum(g.numel() for g in grads), dtype=torch.float64)
        flat = torch.cat([g.reshape(-1) for g in grads])
        second = torch.autograd.grad((flat * flat * c).sum(), list(leaves.values()),
                                     allow_unused=True)
    return [g.detach() for g in grads], second


# hard resets to a nonzero potential (the helpers' configs reset to 0 or softly)
_VR = [dict(CONFIGS[0], v_reset=-0.3), dict(CONFIGS[3], v_reset=0.4)]


@pytest.mark.parametrize("cfg", CONFIGS + [dict(CONFIGS[2], sltt=True)] + _VR,
                         ids=[config_id(c) for c in CONFIGS] + ["sltt", "vr-0.3", "vr0.4"])
def test_double_backward_equals_the_reference(cfg):
    """Eager create_graph=True on the CPU backend: its backward reruns the reference loop with a
    graph (second_order.backward_with_graph, by design), so the second derivatives here check
    that wiring; the op's own derivative rule is test_hessian_equals_the_reference's. The first
    derivatives are also taken without create_graph, where the C++ backward runs."""
    p = _params()
    loss = _loss_fn(cfg)
    first, second = _double_backward(loss, p, "cpu")
    first_ref, second_ref = _double_backward(loss, p, "reference")
    leaves = [v.clone().requires_grad_() for v in p.values()]
    with pypaper.use_backend("cpu"):
        kernel = torch.autograd.grad(loss(*leaves), leaves, allow_unused=True,
                                     materialize_grads=True)
    for name, a, b, k in zip(p, first, first_ref, kernel):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
        torch.testing.assert_close(k, b, rtol=1e-10, atol=1e-12, msg=f"{name} (C++ backward)")
    for name, a, b in zip(p, second, second_ref):
        if b is None:  # no second-order path to this input (e.g. Rect: sigma'' = 0)
            assert a is None or not a.any(), name
            continue
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
    assert any(b is not None and b.abs().sum() > 0 for b in second_ref)


def test_double_backward_has_a_nonzero_second_derivative_in_x():
    """The x-x block through the op's own rules (jacrev of jacrev: lif_backward, then its
    derivative) is non-zero: this fails if the C++ backward answered zeros."""
    p = _params()
    loss = _loss_fn(CONFIGS[2])
    with pypaper.use_backend("cpu"):
        h = func.jacrev(func.jacrev(lambda x: loss(x, p["v"], p["tau"], p["vth"])))(p["x"])
    assert h.abs().sum() > 1e-3


@pytest.mark.parametrize("cfg", CONFIGS + [dict(CONFIGS[2], sltt=True)] + _VR,
                         ids=[config_id(c) for c in CONFIGS] + ["sltt", "vr-0.3", "vr0.4"])
def test_hessian_equals_the_reference(cfg):
    """torch.func.hessian (jacfwd over jacrev: the jvp rule of lif_backward) and jacrev over
    jacrev (its double backward) agree with the reference's Hessian over x."""
    p = _params(per_neuron=False)
    loss = _loss_fn(cfg)

    def f(x):
        return loss(x, p["v"], p["tau"], p["vth"])

    got_fwd = func.hessian(f)(p["x"])
    got_rev = func.jacrev(func.jacrev(f))(p["x"])
    with pypaper.use_backend("reference"):
        want = func.jacrev(func.jacrev(f))(p["x"])
    # Rect's sigma'' is 0: with no path through the reset's S * H product the block is zero
    assert want.abs().sum() > 0 or cfg["surrogate"] == "Rect"
    torch.testing.assert_close(got_fwd, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_rev, want, rtol=1e-10, atol=1e-12)


def test_hessian_vector_product_over_parameters():
    """Forward-over-reverse HVP over tau and the thresholds (jvp of grad) equals the double
    backward's (reverse-over-reverse) and the reference's."""
    cfg = CONFIGS[8]
    p = _params()
    loss = _loss_fn(cfg)

    def grad_params(tau, vth):
        return func.grad(lambda a, b: loss(p["x"], p["v"], a, b), argnums=(0, 1))(tau, vth)

    vt = (torch.randn(F, dtype=torch.float64), torch.randn(F, dtype=torch.float64))
    _, hvp_fwd = func.jvp(grad_params, (p["tau"], p["vth"]), vt)
    tau, vth = p["tau"].clone().requires_grad_(), p["vth"].clone().requires_grad_()
    g = torch.autograd.grad(loss(p["x"], p["v"], tau, vth), (tau, vth), create_graph=True)
    hvp_rev = torch.autograd.grad(sum((a * b).sum() for a, b in zip(g, vt)), (tau, vth))
    with pypaper.use_backend("reference"):
        _, hvp_ref = func.jvp(grad_params, (p["tau"], p["vth"]), vt)
    for a, b, c in zip(hvp_fwd, hvp_rev, hvp_ref):
        assert c.abs().sum() > 0
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(b, c, rtol=1e-10, atol=1e-12)


def test_third_derivative_through_the_double_backward():
    """The double backward is itself differentiable (it is torch ops over the saved inputs)."""
    cfg = CONFIGS[0]
    p = _params()
    loss = _loss_fn(cfg)

    def third(backend):
        x = p["x"].clone().requires_grad_()
        with pypaper.use_backend(backend):
            (g,) = torch.autograd.grad(loss(x, p["v"], p["tau"], p["vth"]), x, create_graph=True)
            (h,) = torch.autograd.grad((g * g).sum(), x, create_graph=True)
            (k,) = torch.autograd.grad((h * h).sum(), x)
        return k

    want = third("reference")
    assert want.abs().sum() > 0
    torch.testing.assert_close(third("cpu"), want, rtol=1e-9, atol=1e-12)


def test_forward_over_reverse_with_dual_tensors():
    """Eager forward AD over a backward (a dual x, autograd.grad with create_graph=False): the
    gradient's tangent is the Hessian times the tangent, not dropped by the backward op."""
    cfg = CONFIGS[0]
    p = _params(per_neuron=False)
    loss = _loss_fn(cfg)
    t = torch.randn_like(p["x"])

    def f(x):
        return loss(x, p["v"], p["tau"], p["vth"])

    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        x = fwAD.make_dual(p["x"].clone(), t).requires_grad_()
        (g,) = torch.autograd.grad(f(x), x)
        got = fwAD.unpack_dual(g).tangent
    with pypaper.use_backend("reference"):
        want = func.jvp(func.grad(f), (p["x"],), (t,))[1]
    assert got is not None
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_kept_h_backward_refuses_a_second_derivative():
    """A backward that reads the kept H[t] (the GPU backends'; forced here with the KEEP_H flag)
    has no graph back to x: the second derivative raises, naming the remedy."""
    x = inputs((T, N, F), torch.float64).requires_grad_()
    flags = op_flags.forward_flags(True, True, False, False, False, keep_h=True)
    tau = torch.tensor(2.0, dtype=torch.float64)
    vth = torch.tensor(1.0, dtype=torch.float64)
    spikes = torch.ops.pypaper.lif_forward(x, None, tau, vth, 0.0, 1, 2.0, flags)[0]
    (g,) = torch.autograd.grad((spikes * torch.randn_like(spikes)).sum(), x, create_graph=True)
    with pytest.raises(NotImplementedError, match=r"kept H.*use_backend\('reference'\)"):
        (g * g).sum().backward()
    with pytest.raises(NotImplementedError, match="kept H"):
        func.hessian(lambda a: torch.ops.pypaper.lif_forward(a, None, tau, vth, 0.0, 1, 2.0,
                                                             flags)[0].sum())(x.detach())


def test_maml_meta_gradient_of_a_spiking_mlp():
    """MAML (Finn et al., 2017) on a spiking MLP: one inner SGD step with create_graph, the
    meta-gradient through it equals the reference backend's, and a few meta-steps lower the
    query loss."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 16),
        neuron.ParametricLIFNode(step_mode="m", surrogate_function=surrogate.ATan(),
                                 learnable_threshold=True, tau_shape=(16,)),
        torch.nn.Linear(16, 3)).double()
    xs, ys = torch.randn(4, 8, 6, dtype=torch.float64) + 0.5, torch.randint(0, 3, (8,))
    xq, yq = torch.randn(4, 8, 6, dtype=torch.float64) + 0.5, torch.randint(0, 3, (8,))

    def loss_at(params, x, y):
        pypaper.snn.reset_net(model)
        out = func.functional_call(model, params, (x,)).mean(0)
        return torch.nn.functional.cross_entropy(out, y)

    def meta_loss(params):
        grads = torch.autograd.grad(loss_at(params, xs, ys), list(params.values()),
                                    create_graph=True)
        adapted = {k: v - 0.5 * g for (k, v), g in zip(params.items(), grads)}
        return loss_at(adapted, xq, yq)

    params = dict(model.named_parameters())
    got = torch.autograd.grad(meta_loss(params), list(params.values()))
    with pypaper.use_backend("reference"):
        want = torch.autograd.grad(meta_loss(params), list(params.values()))
    for name, a, b in zip(params, got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)
    # the second-order part is there: it differs from the first-order approximation (FOMAML)
    first_order = torch.autograd.grad(
        loss_at({k: v - 0.5 * g.detach() for (k, v), g in zip(
            params.items(), torch.autograd.grad(loss_at(params, xs, ys), list(params.values())))},
            xq, yq), list(params.values()))
    assert any((a - b).abs().max() > 1e-6 for a, b in zip(got, first_order))

    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    start = float(meta_loss(params).detach())
    for _ in range(15):
        opt.zero_grad()
        meta_loss(dict(model.named_parameters())).backward()
        opt.step()
    assert float(meta_loss(dict(model.named_parameters())).detach()) < start - 0.05


SJ_SURROGATES = ["Sigmoid", "ATan", "PiecewiseQuadratic", "PiecewiseExp", "SoftSign",
                 "SuperSpike", "Erf"]


@pytest.mark.parametrize("kind", ["LIFNode", "ParametricLIFNode"])
@pytest.mark.parametrize("name", SJ_SURROGATES)
def test_double_backward_matches_spikingjelly(kind, name):
    """SpikingJelly's torch-backend neurons under create_graph (their surrogate backward in
    differentiable torch ops): the same second derivatives in x and, for PLIF, in w."""
    sj_neuron = pytest.importorskip("spikingjelly.activation_based.neuron")
    sj_surrogate = pytest.importorskip("spikingjelly.activation_based.surrogate")
    torch.manual_seed(1)
    x = inputs((6, 3, 5), torch.float64)
    w = torch.randn_like(x)
    results = []
    for mod, surr in ((sj_neuron, sj_surrogate), (neuron, surrogate)):
        node = getattr(mod, kind)(v_reset=None if name == "Erf" else 0.0, step_mode="m",
                                  detach_reset=name == "ATan",
                                  surrogate_function=getattr(surr, name)()).double()
        xr = x.clone().requires_grad_()
        params = [xr] + list(node.parameters())
        grads = torch.autograd.grad((node(xr) * w).sum(), params, create_graph=True)
        flat = torch.cat([g.reshape(-1) for g in grads])
        results.append(torch.autograd.grad((flat * flat).sum(), params))
    for a, b in zip(*results):
        assert a.abs().sum() > 0
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


def test_kept_h_refuses_eager_forward_over_reverse_but_not_reverse_inside_a_dual_level():
    """Dual tensors into a kept-H forward, then a backward whose gradient would need x's tangent:
    refused. A backward inside the dual level over inputs without tangents is plain reverse mode
    and runs."""
    import torch.autograd.forward_ad as fwAD

    flags = op_flags.forward_flags(True, True, False, False, False, keep_h=True)
    tau = torch.tensor(2.0, dtype=torch.float64)
    vth = torch.tensor(1.0, dtype=torch.float64)
    x = inputs((T, N, F), torch.float64)

    def op(a):
        return torch.ops.pypaper.lif_forward(a, None, tau, vth, 0.0, 1, 2.0, flags)[0]

    with fwAD.dual_level():
        dual = fwAD.make_dual(x.clone(), torch.randn_like(x)).requires_grad_()
        with pytest.raises(NotImplementedError, match="kept H"):
            torch.autograd.grad(op(dual).sum(), dual)
        plain = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(op(plain).sum(), plain)
    x2 = x.clone().requires_grad_()
    (want,) = torch.autograd.grad(op(x2).sum(), x2)
    assert want.abs().sum() > 0
    torch.testing.assert_close(g, want)


@pytest.mark.parametrize("cfg", CONFIGS[:4] + CONFIGS[8:12] + [dict(CONFIGS[2], sltt=True)],
                         ids=[config_id(c) for c in CONFIGS[:4] + CONFIGS[8:12]] + ["sltt"])
def test_reverse_over_forward_equals_the_reference(cfg):
    """jacrev over jacfwd (reverse mode through the jvp rule's tangents) and an eager backward of
    a dual call's tangent: the reference's second derivatives. The tangents then come from the
    rule's composite, whose primal steps carry the surrogate at the spike (the fused tangent
    kernel has no backward)."""
    import torch.autograd.forward_ad as fwAD

    p = _params(per_neuron=False)
    loss = _loss_fn(cfg)

    def f(x):
        return loss(x, p["v"], p["tau"], p["vth"])

    with pypaper.use_backend("reference"):
        want = func.jacrev(func.jacrev(f))(p["x"])
    # Rect's sigma'' is 0: with no path through the reset's S * H product the block is zero
    assert want.abs().sum() > 0 or cfg["surrogate"] == "Rect"
    torch.testing.assert_close(func.jacrev(func.jacfwd(f))(p["x"]), want, rtol=1e-10,
                               atol=1e-12)
    t = torch.randn_like(p["x"])
    x = p["x"].clone().requires_grad_()
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(f(fwAD.make_dual(x, t))).tangent
        (got,) = torch.autograd.grad(tangent, x)
    torch.testing.assert_close(got, (want.reshape(x.numel(), -1) @ t.reshape(-1)).reshape(
        x.shape), rtol=1e-10, atol=1e-12)


def test_a_hessian_first_leaves_later_calls_working():
    """The number parameters' tensor cache (ops._scalar) is not filled inside a torch.func
    transform: a tensor made there is wrapped for that level, and a process whose first LIF call
    was a hessian failed every later jacrev / grad with functorch's "escaped?" assert."""
    from pypaper.snn import ops

    ops._scalar.cache_clear()
    x = torch.randn(4, 3, 5, dtype=torch.float64) + 0.6
    w = torch.linspace(-1.0, 1.0, x.numel(), dtype=x.dtype).reshape(x.shape)

    def loss(a):
        return (lif_multi_step(a, tau=2.5, v_threshold=0.9)[0] * w).sum()

    h = torch.func.hessian(loss)(x)
    torch.testing.assert_close(torch.func.jacrev(torch.func.jacrev(loss))(x), h)
    xr = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(loss(xr), xr)
    torch.testing.assert_close(torch.func.grad(loss)(x), g)


def test_membrane_left_by_a_transform_gives_a_clear_error():
    """A neuron called inside torch.func.vmap keeps the transform's wrapped membrane; calling it
    after the transform exited raised functorch's internal assert. Now a clear error naming the
    remedy, and after reset_net it runs."""
    m = neuron.LIFNode(step_mode="m")
    xb = torch.randn(2, 4, 3, 5) + 0.6
    torch.func.vmap(m)(xb)
    with pytest.raises(RuntimeError, match="reset_net"):
        m(xb[0])
    pypaper.snn.reset_net(m)
    m(xb[0]).sum()

