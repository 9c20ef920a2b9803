"""Review s34: higher-order and forward-mode AD through the fused LIF op (and delay_linear).

1. Forward over forward (torch.func.jacfwd(jacfwd(f)), jvp of a jvp): torch runs a custom op's
   forward-mode rule with forward AD off for the levels around it (pytorch#197867), so the outer
   level took the inner tangents as constants - a second derivative of zero, or missing its
   sigma'' terms, without an error. Now refused (pypaper/_autograd.py, refuse_nested_forward);
   the mixes with reverse mode stay and equal the reference.
2. Reverse over forward as a transform (torch.func.grad / jacrev / vjp over torch.func.jvp):
   the CPU tangent kernel took the call (the grad level's wrappers hide requires_grad) and its
   backward-less op raised NotImplementedError telling the user to use jacrev - which they were.
   Now the composite rule runs there (pypaper/snn/jvp_rule.py, _fusable).
3. A backward that reads the kept H (the GPU backends'; forced here with the KEEP_H flag on the
   C++ op): its second derivative along x's paths through H is not available, and was dropped
   silently wherever autograd saw no path from the gradient to x: jacrev(jacrev(f)) and
   grad(grad(f)) in x gave zero, autograd.grad(penalty, x) said x was unused (None with
   allow_unused=True), a MAML meta-gradient autograd.grad(meta_loss, W) missed the terms
   through H. Now refused (second_order.kept_h_anchor ties the guard to x and v_init; the
   forward's setup makes the tie: pypaper/snn/_registration.py).
"""
import pytest
import torch
import torch.func as func
from torch import nn

import pypaper
from pypaper import _ext
from pypaper.snn import lif_multi_step, neuron, op_flags, surrogate
from pypaper.snn.delays import delayed_linear

pytestmark = pytest.mark.skipif(not _ext.LOADED, reason="pypaper._C not built")

DT = torch.float64
NESTED = "nested forward-mode AD"


def _inputs(seed=0, shape=(4, 2, 3)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=DT) * 0.8 + 0.7


def _lif(x, tau=None, vth=None, v=None, sur="ATan", **kw):
    tau = torch.tensor([1.7, 2.2, 3.0], dtype=DT) if tau is None else tau
    vth = torch.tensor([0.8, 0.9, 1.1], dtype=DT) if vth is None else vth
    return lif_multi_step(x, v, tau=tau, v_threshold=vth, surrogate_function=getattr(
        surrogate, sur)(), store_v_seq=True, **kw)


def _loss(outs):
    return sum((o * torch.linspace(-1, 1, o.numel(), dtype=DT).reshape(o.shape)).sum()
               + 0.3 * (o * o).sum() for o in outs)


def _both(fn):
    """fn() on the default (C++) backend and on the plain-PyTorch reference."""
    got = fn()
    with pypaper.use_backend("reference"):
        want = fn()
    return got, want


# ---- 1. forward over forward ---------------------------------------------------------------

@pytest.mark.parametrize("kw", [dict(), dict(v_reset=None, decay_input=False),
                                dict(detach_reset=True, sur="PiecewiseQuadratic"),
                                dict(sltt=True, sur="Sigmoid")],
                         ids=["hard", "soft-nodi", "detach-pwq", "sltt-sigmoid"])
def test_jacfwd_of_jacfwd_is_refused_and_the_reverse_mixes_equal_the_reference(kw):
    x = _inputs()

    def loss(x):
        return _loss(_lif(x, **kw))

    # before: ran, and differed from the true Hessian by the order of the Hessian itself
    with pytest.raises(NotImplementedError, match=NESTED):
        func.jacfwd(func.jacfwd(loss))(x)
    want = func.jacrev(func.jacrev(loss))(x)
    for name, fn in {"hessian": func.hessian(loss), "jacrev(jacfwd)": func.jacrev(
            func.jacfwd(loss))}.items():
        got, ref = _both(lambda: fn(x))
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-10, msg=name)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10, msg=name)
    assert want.abs().max() > 0.1


def test_jvp_of_jvp_is_refused_in_the_primal_and_in_the_tangent():
    """d/dy J(x) y = J(x) came out 0 (the tangent taken as a constant), and d/dx J(x) u missed
    its second-derivative terms."""
    x, u, w = _inputs(0), _inputs(1), _inputs(2)

    def spikes(x):
        return _lif(x)[0]

    with pytest.raises(NotImplementedError, match=NESTED):
        func.jvp(lambda y: func.jvp(spikes, (x,), (y,))[1], (u,), (w,))
    with pytest.raises(NotImplementedError, match=NESTED):
        func.jvp(lambda z: func.jvp(spikes, (z,), (u,))[1], (x,), (w,))
    # the reverse-mode routes to the same numbers run: d/dy J(x) y . w = J(x) w
    torch.testing.assert_close(
        func.jvp(lambda y: func.vjp(spikes, x)[1](y)[0], (u,), (w,))[1],
        func.vjp(spikes, x)[1](w)[0])


def test_jacfwd_of_jacfwd_through_parametric_lif_parameters_is_refused():
    """Through a module (ParametricLIFNode, learnable threshold, 's' mode over two calls)."""
    node = neuron.ParametricLIFNode(tau_shape=(3,), learnable_threshold=True,
                                    threshold_shape=(3,), surrogate_function=surrogate.ATan())
    node = node.to(DT)
    x = _inputs()
    params = {n: p.detach().clone() for n, p in node.named_parameters()}

    def loss(params):
        node.reset()
        out = torch.stack([func.functional_call(node, params, (xt,)) for xt in x.unbind(0)])
        out2 = torch.stack([func.functional_call(node, params, (xt,)) for xt in x.unbind(0)])
        v = node.v
        node.reset()
        return _loss((out, out2, v))

    with pytest.raises(NotImplementedError, match=NESTED):
        func.jacfwd(func.jacfwd(loss))(params)
    got, want = _both(lambda: func.hessian(loss)(params))
    for k in got:
        for j in got[k]:
            torch.testing.assert_close(got[k][j], want[k][j], rtol=1e-9, atol=1e-10)


def test_jacfwd_of_jacfwd_of_delay_linear_is_refused():
    """The same for the other op with a forward-mode rule: the Hessian in the delay positions
    (the op is nonlinear there) came out wrong by its own size."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 1, 2, generator=g, dtype=DT)
    w = torch.randn(2, 2, generator=g, dtype=DT)
    p = torch.rand(2, 2, generator=g, dtype=DT) * 2

    def loss(p):
        return (delayed_linear(x, w, p, None, max_delay=3, sigma=0.5) ** 2).sum()

    with pytest.raises(NotImplementedError, match=NESTED):
        func.jacfwd(func.jacfwd(loss))(p)
    h = func.hessian(loss)(p)
    torch.testing.assert_close(h, func.jacrev(func.jacrev(loss))(p))


# ---- 2. reverse over forward through torch.func.jvp -----------------------------------------

def test_grad_of_func_jvp_equals_the_reference():
    """grad / jacrev / vjp of a function that calls torch.func.jvp on the op (reverse-over-
    forward Hessian-vector products, tangent-based losses): raised 'lif_forward_jvp has no
    backward: ... differentiate the LIF op with torch.func.jacrev'."""
    x, u = _inputs(0), _inputs(1)
    tau = torch.tensor([1.7, 2.2, 3.0], dtype=DT)
    vth = torch.tensor([0.8, 0.9, 1.1], dtype=DT)
    du = (torch.tensor([0.3, -0.2, 0.1], dtype=DT), torch.tensor([-0.1, 0.4, 0.2], dtype=DT))

    def tangent(x, tau, vth):
        return func.jvp(lambda *a: _lif(a[0], a[1], a[2], v_reset=None, sur="Sigmoid"),
                        (x, tau, vth), (u, *du))[1]

    cases = {
        "grad": lambda: func.grad(lambda *a: _loss(tangent(*a)), argnums=(0, 1, 2))(x, tau, vth),
        "jacrev": lambda: func.jacrev(lambda *a: tangent(*a)[1], argnums=(0, 1, 2))(x, tau, vth),
        "vjp": lambda: func.vjp(lambda *a: _loss(tangent(*a)), x, tau, vth)[1](
            torch.tensor(1.0, dtype=DT)),
    }
    for name, fn in cases.items():
        got, want = _both(fn)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=name)
        assert any(a.abs().max() > 0 for a in got)


def test_grad_of_func_jvp_through_a_module_with_state_over_two_calls():
    node = neuron.LIFNode(tau=2.5, step_mode="m", learnable_threshold=True,
                          surrogate_function=surrogate.ATan()).to(DT)
    x1, x2, u = _inputs(0), _inputs(1), _inputs(2)

    def run(x, vth):
        node.reset()
        out = (func.functional_call(node, {"v_threshold": vth}, (x,)),
               func.functional_call(node, {"v_threshold": vth}, (x2,)), node.v)
        node.reset()
        return out

    vth = torch.tensor(0.9, dtype=DT)

    def f(vth):
        return _loss(func.jvp(lambda x: run(x, vth), (x1,), (u,))[1])

    got, want = _both(lambda: func.grad(f)(vth))
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


# ---- 3. the kept-H backward ------------------------------------------------------------------

KEEP_H = op_flags.forward_flags(True, True, False, False, False, keep_h=True)
TAU = torch.tensor(2.0, dtype=DT)
VTH = torch.tensor(1.0, dtype=DT)
KEPT_H = "kept H"


def _kept_h_spikes(x, v=None):
    """The op as the GPU backends run it: the forward keeps H, the backward reads it."""
    return torch.ops.pypaper.lif_forward(x, v, TAU, VTH, 0.0, 1, 2.0, KEEP_H)[0]


def _weights(seed):
    return _inputs(seed) - 0.7  # a fixed readout: the loss is linear in the spikes


def test_kept_h_jacrev_of_jacrev_in_x_is_refused_not_zero():
    x, c = _inputs(), _weights(5)

    def loss(x):
        return (_kept_h_spikes(x) * c).sum()

    with pytest.raises(NotImplementedError, match=KEPT_H):  # before: a Hessian of zeros
        func.jacrev(func.jacrev(loss))(x)
    with pytest.raises(NotImplementedError, match=KEPT_H):
        func.grad(lambda x: (func.grad(loss)(x) ** 2).sum())(x)


def test_kept_h_gradient_penalty_in_x_is_refused():
    x, c = _inputs(), _weights(5)
    for allow_unused in (False, True):
        xx = x.clone().requires_grad_()
        (g,) = torch.autograd.grad((_kept_h_spikes(xx) * c).sum(), xx, create_graph=True)
        # before: "appears to not have been used in the graph", or None with allow_unused
        with pytest.raises(NotImplementedError, match=KEPT_H):
            torch.autograd.grad((g * g).sum(), xx, allow_unused=allow_unused)


def test_kept_h_maml_meta_gradient_is_refused_not_wrong():
    """One inner SGD step on W (before the neuron), the meta-gradient taken with
    autograd.grad(meta_loss, W): it skipped the guard and missed every term through H."""
    inp, inp2 = _inputs(3) - 0.7, _inputs(4) - 0.7
    w0 = torch.randn(3, 3, generator=torch.Generator().manual_seed(6), dtype=DT) * 0.7
    c, c2 = _weights(5), _weights(7)
    w = w0.clone().requires_grad_()
    (g,) = torch.autograd.grad((_kept_h_spikes(inp @ w + 0.6) * c).sum(), w, create_graph=True)
    meta = (_kept_h_spikes(inp2 @ (w - 0.5 * g) + 0.6) * c2).sum()
    with pytest.raises(NotImplementedError, match=KEPT_H):
        torch.autograd.grad(meta, w)


def test_kept_h_create_graph_without_a_second_derivative_through_it_still_runs():
    """create_graph=True where the penalty is on a later layer's gradient only: nothing
    differentiates the neuron's backward, nothing is refused (and first-order training too)."""
    inp = _inputs(3) - 0.7
    w = (torch.randn(3, 3, generator=torch.Generator().manual_seed(6), dtype=DT)
         * 0.7).requires_grad_()
    readout = nn.Linear(3, 2).to(DT)
    s = _kept_h_spikes(inp @ w + 0.6)
    loss = (readout(s) ** 2).sum()
    gw, gr = torch.autograd.grad(loss, (w, readout.weight), create_graph=True)
    (pen,) = torch.autograd.grad((gr ** 2).sum(), readout.weight)
    assert pen.abs().max() > 0 and gw.abs().max() > 0
    w.grad = None
    (_kept_h_spikes(inp @ w + 0.6).sum()).backward()
    assert w.grad.abs().max() > 0


def test_jacfwd_of_jacfwd_of_the_reference_spike_is_refused_not_zero():
    """The reference's spike Function (the reference backend, custom surrogates' loop, a
    surrogate module called on a tensor) had the same blind spot as the fused ops: jacfwd over
    jacfwd gave 0 for sigma''. Refused now; the reverse-mode mixes give sigma''."""
    from pypaper.snn import reference, surrogate

    def f(x):
        return reference.spike(x, 1, 2.0).sum()

    x = torch.tensor([0.1, -0.3, 0.45], dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="nested forward-mode"):
        func.jacfwd(func.jacfwd(f))(x)
    with pytest.raises(NotImplementedError, match="nested forward-mode"):
        func.jacfwd(func.jacfwd(lambda x: surrogate.ATan()(x).sum()))(x)
    want = func.jacrev(func.jacrev(f))(x)
    assert want.abs().sum() > 0
    torch.testing.assert_close(func.hessian(f)(x), want)
    torch.testing.assert_close(func.jacrev(func.jacfwd(f))(x), want)
    # one forward level is untouched
    torch.testing.assert_close(func.jacfwd(f)(x), func.jacrev(f)(x))


def test_jacfwd_of_jacfwd_on_the_reference_backend_is_refused():
    x = torch.randn(4, 2, 3, dtype=torch.float64) + 0.5

    def loss(x):
        with pypaper.use_backend("reference"):
            s, v, _ = lif_multi_step(x, tau=2.0)
        return s.sum() + (v * v).sum()

    with pytest.raises(NotImplementedError, match="nested forward-mode"):
        func.jacfwd(func.jacfwd(loss))(x)
