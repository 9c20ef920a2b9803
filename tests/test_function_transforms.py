"""torch.func transforms and forward-mode AD over every family's ops (pypaper/_autograd.py).

- torch.func.grad over an op equals torch.autograd.grad through the same op;
- vmap(grad(...)) (per-sample gradients) equals a loop of torch.autograd.grad over the samples;
- vmap over vjp and jacrev (per-sample vjps and Jacobians) equal autograd per sample;
- forward-mode AD (forward_ad dual tensors, torch.func.jvp, jacfwd): ops with a jvp rule
  (register_jvp: the LIF op) give J t, the Jacobian autograd builds times the tangent; the
  others raise NotImplementedError naming the op and the argument, where torch.library's
  autograd kernel returned the outputs without a tangent (a jvp of zero, silently).
"""
import importlib
import importlib.util

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.func as func

import pypaper
from pypaper import _ext

pytestmark = pytest.mark.skipif(not _ext.LOADED, reason="pypaper._C not built")


def _fq(x):
    return pypaper.ops.fake_quantize(x, 0.05, 0, 8)


def _power(x):
    return pypaper.ops.power_fake_quantize(x, 2.0, 4, 3.0)


def _fewbit(x):
    return pypaper.ops.fewbit_activation(x, "gelu")


_KV = torch.Generator().manual_seed(1)
_K = torch.randn(1, 2, 6, 8, generator=_KV)
_V = torch.randn(1, 2, 6, 8, generator=_KV)


def _hopfield(q):  # q: [L, d] -> the op's [B, H, L, d]
    q4 = q.reshape(1, 1, *q.shape).expand(1, 2, *q.shape)
    return pypaper.ops.hopfield_retrieve(q4, _K, _V, beta=0.5)


_W = torch.randn(5, 8, generator=_KV)
_B = torch.randn(5, generator=_KV)


def _wtacrs(x):  # x: [N, 8]; every row kept: the sampled grad_W is then exact
    n = x.shape[0]
    idx = torch.arange(n)
    return pypaper.ops.wtacrs_linear(x, _W, _B, x.detach(), idx)


def _lif(x):  # x: [T, N]
    return pypaper.snn.lif_multi_step(x * 2.0, tau=2.0)[0]


_POS = torch.tensor([[0.5, 2.0, 1.2, 0.0, 3.0, 2.5, 1.0, 0.2],
                     [1.5, 0.0, 2.2, 1.0, 0.7, 3.1, 2.0, 1.4],
                     [2.5, 1.0, 0.1, 3.0, 2.0, 0.4, 1.7, 2.9],
                     [0.0, 0.5, 1.5, 2.5, 3.5, 1.2, 0.8, 2.2],
                     [3.0, 2.0, 1.0, 0.0, 0.6, 1.6, 2.6, 3.6]])


def _delay(x):  # x: [T, N, 8] -> [T, N, 5]
    return pypaper.snn.delays.delayed_linear(x, _W, _POS, _B, max_delay=4, sigma=0.3)


_XFF = torch.randn(6, 8, generator=_KV)


def _ff(w):  # the Forward-Forward layer learns from its local loss: a function of its weight
    return pypaper.ops.local_ff_linear(_XFF, w, _B, num_pos=3)[1]


# name, function of one tensor, shape of the tensor (the per-sample shape for vmap)
CASES = [
    ("fake_quantize", _fq, (4, 7)),
    ("power_fake_quantize", _power, (4, 7)),
    ("fewbit_activation", _fewbit, (4, 7)),
    ("hopfield_retrieve", _hopfield, (3, 8)),
    ("wtacrs_linear", _wtacrs, (3, 8)),
    ("lif_multi_step", _lif, (6, 5)),
    ("delayed_linear", _delay, (6, 2, 8)),
    ("local_ff_linear", _ff, (5, 8)),
]
IDS = [c[0] for c in CASES]


def _data(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tuple(shape), generator=g)


def _loss_fn(f, shape):
    out_w = None

    def loss(x):
        nonlocal out_w
        y = f(x)
        if out_w is None:
            out_w = _data(y.shape, seed=7)  # a fixed, non-uniform upstream gradient
        return (y * out_w).sum()

    return loss


def _assert_per_sample_grads(f, shape, samples=3):
    """vmap(grad(loss)) over `samples` inputs equals one torch.autograd.grad per input."""
    batch = torch.stack([_data(shape, seed=s) for s in range(samples)])
    loss = _loss_fn(f, shape)
    loss(batch[0])  # fixes the upstream gradient's shape outside vmap
    got = func.vmap(func.grad(loss))(batch)
    for s in range(samples):
        xr = batch[s].clone().requires_grad_()
        (expected,) = torch.autograd.grad(loss(xr), xr)
        torch.testing.assert_close(got[s], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,f,shape", CASES, ids=IDS)
def test_func_grad_equals_autograd(name, f, shape):
    x = _data(shape)
    loss = _loss_fn(f, shape)
    xr = x.clone().requires_grad_()
    (expected,) = torch.autograd.grad(loss(xr), xr)
    got = func.grad(loss)(x)
    assert expected.abs().sum() > 0, "a zero gradient would not test anything"
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,f,shape", CASES, ids=IDS)
def test_vjp_and_jacrev(name, f, shape):
    x = _data(shape)
    xr = x.clone().requires_grad_()
    y = f(xr)
    v = _data(y.shape, seed=3)
    (expected,) = torch.autograd.grad(y, xr, v)
    out, vjp_fn = func.vjp(f, x)
    torch.testing.assert_close(out, y.detach())
    torch.testing.assert_close(vjp_fn(v)[0], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,f,shape", [c for c in CASES if c[0] in
                                          ("fake_quantize", "lif_multi_step", "hopfield_retrieve")],
                         ids=["fake_quantize", "hopfield_retrieve", "lif_multi_step"])
def test_jacrev_rows_are_vjps(name, f, shape):
    x = _data(shape)
    jac = func.jacrev(f)(x)  # [*y.shape, *x.shape]
    xr = x.clone().requires_grad_()
    y = f(xr)
    flat = jac.reshape(y.numel(), x.numel())
    for i in (0, y.numel() // 2, y.numel() - 1):
        e = torch.zeros(y.numel())
        e[i] = 1.0
        (row,) = torch.autograd.grad(y, xr, e.reshape(y.shape), retain_graph=True)
        torch.testing.assert_close(flat[i], row.reshape(-1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,f,shape", CASES, ids=IDS)
def test_per_sample_grads(name, f, shape):
    """vmap(grad(loss)) over a batch of samples: the per-sample gradients equal one
    torch.autograd.grad per sample (the op itself runs once per sample)."""
    _assert_per_sample_grads(f, shape)


# Ops whose call without requires_grad is torch's own composite, which has a forward-mode rule: the
# few-bit activation without grad is torch's activation (the few-bit codes only shape its
# backward), so its jvp is the exact derivative's.
_EXACT_JVP = {"fewbit_activation": lambda x: torch.nn.functional.gelu(x)}
# Ops with a forward-mode rule (register_jvp): their jvp is the Jacobian of their backward,
# transposed (the surrogate derivative where a spike fires; DelayedLinear's exact derivative).
_JVP_RULE = {"lif_multi_step", "delayed_linear"}
# ... and whose backward op has rules too (second derivatives)
_SECOND_ORDER = {"lif_multi_step", "delayed_linear"}
REFUSED = [c for c in CASES if c[0] not in _EXACT_JVP and c[0] not in _JVP_RULE]
WITH_RULE = [c for c in CASES if c[0] in _JVP_RULE]
# delayed_linear is linear in x (its Hessian in x is 0): its second derivatives in the positions
# are checked in tests/snn/test_delays.py
SECOND_ORDER = [c for c in CASES if c[0] in _SECOND_ORDER and c[0] != "delayed_linear"]


def _jacobian_times(f, x, t):
    """J t from the Jacobian reverse mode builds, [*y.shape]."""
    jac = torch.autograd.functional.jacobian(f, x)
    y_shape = jac.shape[:jac.dim() - x.dim()]
    return (jac.reshape(-1, x.numel()) @ t.reshape(-1)).reshape(y_shape)


@pytest.mark.parametrize("name,f,shape", WITH_RULE, ids=[c[0] for c in WITH_RULE])
def test_jvp_rule_is_jacobian_times_tangent(name, f, shape):
    """Dual tensors (with and without requires_grad), torch.func.jvp and jacfwd agree with the
    Jacobian autograd builds; the reverse-mode gradient of a call with tangents is unchanged."""
    x, t = _data(shape), _data(shape, seed=5)
    want = _jacobian_times(f, x, t)
    assert want.abs().sum() > 0
    xr = x.clone().requires_grad_()
    with fwAD.dual_level():
        y_plain = f(fwAD.make_dual(x, t))
        y_graph = f(fwAD.make_dual(xr, t))
        got_plain = fwAD.unpack_dual(y_plain).tangent
        got_graph = fwAD.unpack_dual(y_graph).tangent
        if name in _SECOND_ORDER:
            y_graph.sum().backward()
        else:  # its backward op has no jvp rule: refused, not a gradient missing its tangent
            with pytest.raises(NotImplementedError, match="no forward-mode AD rule"):
                y_graph.sum().backward()
    torch.testing.assert_close(got_plain, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_graph, want, rtol=1e-5, atol=1e-6)
    if name in _SECOND_ORDER:
        torch.testing.assert_close(xr.grad, func.grad(lambda a: f(a).sum())(x))
    out, got = func.jvp(f, (x,), (t,))
    torch.testing.assert_close(out, f(x))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(func.jacfwd(f)(x), func.jacrev(f)(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,f,shape", SECOND_ORDER, ids=[c[0] for c in SECOND_ORDER])
def test_hessian_forward_over_reverse(name, f, shape):
    """torch.func.hessian (jacfwd over jacrev: the jvp rule of the backward op) equals jacrev over
    jacrev (its double backward) and the reference backend's Hessian (before the backward op had
    rules: NotImplementedError)."""
    x = _data(shape).double()

    def loss(a):
        return (f(a) * torch.linspace(-1.0, 1.0, f(a).numel(), dtype=a.dtype).reshape(
            f(a).shape)).sum()

    got = func.hessian(loss)(x)
    with pypaper.use_backend("reference"):
        want = func.jacrev(func.jacrev(loss))(x)
    assert want.abs().sum() > 0
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(func.jacrev(func.jacrev(loss))(x), want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name,f,shape", CASES, ids=IDS)
def test_per_sample_vjp_and_jacrev(name, f, shape):
    """vmap over vjp / jacrev: the tensors the inner grad level saved reach the ops' vmap kernel
    wrapped by that level, which has exited by then (before pypaper/_autograd.py took such
    wrappers off, seven of these eight ops failed here with functorch's "tensor may have escaped"
    error or an internal assert)."""
    batch = torch.stack([_data(shape, seed=s) for s in range(2)])

    def cotangent(out):
        return torch.linspace(-1.0, 1.0, out.numel()).reshape(out.shape)

    def per_vjp(x):
        out, fn = func.vjp(f, x)
        return fn(cotangent(out))[0]

    got = func.vmap(per_vjp)(batch)
    jac = func.vmap(func.jacrev(f))(batch)
    for s in range(2):
        x = batch[s].clone().requires_grad_()
        y = f(x)
        (want,) = torch.autograd.grad(y, x, cotangent(y))
        torch.testing.assert_close(got[s], want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(jac[s], torch.autograd.functional.jacobian(f, batch[s]),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,f,shape", REFUSED, ids=[c[0] for c in REFUSED])
def test_forward_ad_refused(name, f, shape):
    x = _data(shape)
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, torch.ones_like(x))
        with pytest.raises(NotImplementedError, match="no forward-mode AD rule"):
            f(dual)
        # with requires_grad too (then the call builds a graph as well)
        dual = fwAD.make_dual(x.clone().requires_grad_(), torch.ones_like(x))
        with pytest.raises(NotImplementedError, match="no forward-mode AD rule"):
            f(dual)


@pytest.mark.parametrize("name,f,shape", REFUSED, ids=[c[0] for c in REFUSED])
def test_func_jvp_refused(name, f, shape):
    x = _data(shape)
    with pytest.raises(NotImplementedError, match="no forward-mode AD rule"):
        func.jvp(f, (x,), (torch.ones_like(x),))


@pytest.mark.parametrize("name", sorted(_EXACT_JVP))
def test_jvp_of_plain_path_is_exact(name):
    f = dict((c[0], c[1]) for c in CASES)[name]
    x, t = _data((4, 7)), _data((4, 7), seed=5)
    _, got = func.jvp(f, (x,), (t,))
    _, expected = func.jvp(_EXACT_JVP[name], (x,), (t,))
    torch.testing.assert_close(got, expected)


def test_refusal_names_op_and_argument():
    x = _data((4, 7))
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, torch.ones_like(x))
        with pytest.raises(NotImplementedError, match=r"pypaper::fake_quantize .*'x'"):
            _fq(dual)
    with pytest.raises(NotImplementedError, match=r"jacfwd|jvp"):
        func.jacfwd(_hopfield)(_data((3, 8)))


def _models():
    torch.manual_seed(0)
    q = pypaper.quant.Int8DynamicLinear.from_float(torch.nn.Linear(6, 8))
    return {
        "int8_dynamic_linear": (torch.nn.Sequential(torch.nn.Linear(6, 6), q), (4, 6)),
        "delayed_linear": (torch.nn.Sequential(torch.nn.Linear(6, 8),
                                               pypaper.snn.DelayedLinear(8, 4, 3)), (5, 1, 6)),
        "lif_node": (torch.nn.Sequential(torch.nn.Linear(6, 8),
                                         pypaper.snn.LIFNode(step_mode="m")), (5, 2, 6)),
        "hopfield_layer": (torch.nn.Sequential(pypaper.hopfield.HopfieldLayer(6, quantity=4)),
                           (1, 3, 6)),
    }


MODELS = sorted(_models())


@pytest.mark.parametrize("name", MODELS)
def test_module_per_sample_grads(name):
    """functional_call + vmap(grad) over a model with a pypaper layer, as per-sample-gradient
    code (DP-SGD, influence functions) writes it: every parameter's gradient per sample equals
    a loop of autograd over single samples."""
    model, shape = _models()[name]
    params = {k: v.detach() for k, v in model.named_parameters()}
    xs = torch.randn(3, *shape)

    def loss(p, x):
        pypaper.snn.reset_net(model)  # a neuron's membrane state must not cross samples
        y = func.functional_call(model, p, (x,))
        # a fixed weighting of the outputs (spikes: y.square() has a zero gradient wherever no
        # neuron fires)
        return (y * torch.linspace(-1.0, 2.0, y.numel()).reshape(y.shape)).sum()

    got = func.vmap(func.grad(loss), in_dims=(None, 0))(params, xs)
    pypaper.snn.reset_net(model)
    for s in range(xs.shape[0]):
        model.zero_grad()
        loss(dict(model.named_parameters()), xs[s]).backward()
        for k, p in model.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, k
            torch.testing.assert_close(got[k][s], p.grad, rtol=1e-5, atol=1e-5)


# DelayedLinear's op has a jvp rule (its exact derivative; on AMD CPUs its default width runs
# as torch's dense convolution, no pypaper op in the call): the true directional derivative.
_MODEL_EXACT_JVP = {"delayed_linear"}
# Layers whose op has a jvp rule: their tangent is J t of the Jacobian autograd builds.
_MODEL_JVP_RULE = {"lif_node"}


@pytest.mark.parametrize("name", MODELS)
def test_module_forward_ad(name):
    model, shape = _models()[name]
    x = torch.randn(*shape)
    t = torch.randn(*shape)
    if name in _MODEL_JVP_RULE:
        def run(a):
            pypaper.snn.reset_net(model)
            return model(a)

        want = _jacobian_times(run, x, t)
        assert want.abs().sum() > 0
        pypaper.snn.reset_net(model)
        with fwAD.dual_level():
            tangent = fwAD.unpack_dual(model(fwAD.make_dual(x, t))).tangent
        torch.testing.assert_close(tangent, want, rtol=1e-5, atol=1e-6)
        return
    if name not in _MODEL_EXACT_JVP:
        with fwAD.dual_level():
            with pytest.raises(NotImplementedError, match="no forward-mode AD rule"):
                model(fwAD.make_dual(x, t))
        return
    model = model.double()
    x, t = x.double(), t.double()
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(model(fwAD.make_dual(x, t))).tangent
    eps = 1e-6
    fd = (model(x + eps * t) - model(x - eps * t)) / (2 * eps)
    torch.testing.assert_close(tangent, fd, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("transform", ["grad", "vmap_grad"])
def test_fewbit_table_built_inside_transform(transform):
    """A few-bit table is built (autograd of torch's activation, then numpy) on the first call
    that needs it, which may come inside a torch.func transform."""
    from pypaper.quant.fewbit import tables

    tables._default_table.cache_clear()
    x = _data((4, 7))

    def loss(a):
        return (pypaper.ops.fewbit_activation(a, "silu", 3) * a).sum()

    g = func.grad(loss)
    got = g(x) if transform == "grad" else func.vmap(g)(x)
    assert tables._default_table.cache_info().currsize == 1
    xr = x.clone().requires_grad_()
    (expected,) = torch.autograd.grad(loss(xr), xr)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("name", ["fake_quantize", "hopfield_retrieve", "lif_multi_step"])
def test_triton_twin_under_grad_and_vmap(name):
    """The Triton twins are torch.library.triton_ops (CustomOpDef): their Autograd kernel is
    replaced after the fact (pypaper/_autograd.py); under the interpreter on CPU tensors."""
    pytest.importorskip("triton")
    f, shape = {c[0]: (c[1], c[2]) for c in CASES}[name]
    with pypaper.use_backend("triton"):
        y = f(_data(shape).requires_grad_())
        assert "triton" in type(y.grad_fn).__name__ or name == "lif_multi_step"
        _assert_per_sample_grads(f, shape, samples=2)
        x = _data(shape)
        if name in _JVP_RULE:  # the twin has the same rule
            t = _data(shape, seed=5)
            with fwAD.dual_level():
                got = fwAD.unpack_dual(f(fwAD.make_dual(x, t))).tangent
            torch.testing.assert_close(got, _jacobian_times(f, x, t), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(func.jvp(f, (x,), (t,))[1], got)
            # its backward reads the kept H[t], which has no graph back to x: second
            # derivatives are refused (the CPU op's rerun-from-x backward has them)
            with pytest.raises(NotImplementedError, match="kept H"):
                func.hessian(lambda a: f(a).sum())(x)
            xg = x.clone().requires_grad_()
            (g,) = torch.autograd.grad(f(xg).sum() + (xg ** 3).sum(), xg, create_graph=True)
            with pytest.raises(NotImplementedError, match="kept H"):
                g.sum().backward()
            return
        with fwAD.dual_level():
            with pytest.raises(NotImplementedError, match="no forward-mode AD rule"):
                f(fwAD.make_dual(x, torch.ones_like(x)))


def test_every_triton_op_has_the_functorch_kernel():
    """A triton_op's own Autograd kernel fails under any torch.func transform, even for an op
    without a backward: each of pypaper's gets pypaper/_autograd.py's kernel when defined."""
    pytest.importorskip("triton")
    from torch._library import custom_ops

    from pypaper import _autograd

    with pypaper.use_backend("triton"):  # imports Triton modules (the others' tests do more)
        _fq(_data((2, 3)))
        pypaper.ops.wtacrs_row_norms(_data((2, 3)))
    ours = [n for n in custom_ops.OPDEFS if n.startswith("pypaper::")]
    assert ours and set(ours) <= _autograd._COVERED


def test_op_without_backward_under_vmap_and_grad():
    """wtacrs_select (the sampler's choice of rows: a constant) inside a transformed function
    gives the gradient of the rows it picks, per sample under vmap; wtacrs_row_norms has no
    backward, and differentiating through it raises instead of giving zero."""
    x = _data((3, 6, 7))
    seed = torch.tensor([3], dtype=torch.int64)

    def loss(a):
        idx, _ = torch.ops.pypaper.wtacrs_select(a.detach().norm(dim=1), 3, True, seed)
        return (a[idx] * a[idx]).sum()

    got = func.vmap(func.grad(loss))(x)
    for s in range(3):
        xr = x[s].clone().requires_grad_()
        (expected,) = torch.autograd.grad(loss(xr), xr)
        torch.testing.assert_close(got[s], expected)
        assert (expected != 0).any(dim=1).sum() == 3  # the 3 rows picked
    t = _data((6, 7), seed=9)  # jvp through it: the constant op runs one level down
    _, tangent = func.jvp(loss, (x[0],), (t,))
    torch.testing.assert_close(tangent, (func.grad(loss)(x[0]) * t).sum())
    xr = x[0].clone().requires_grad_()
    norms = pypaper.ops.wtacrs_row_norms(xr)
    with pytest.raises(NotImplementedError, match="wtacrs_row_norms has no backward"):
        norms.sum().backward()
    with pytest.raises(NotImplementedError, match="wtacrs_row_norms has no backward"):
        func.grad(lambda a: pypaper.ops.wtacrs_row_norms(a).sum())(x[0])


def test_compiled_grad():
    """torch.compile(torch.func.grad(f), fullgraph=True) over an op equals the eager transform."""
    x = _data((6, 5))

    def f(a):
        return (pypaper.ops.fake_quantize(a, 0.05, 0, 8) * a).sum()

    torch._dynamo.reset()
    got = torch.compile(func.grad(f), fullgraph=True)(x)
    torch.testing.assert_close(got, func.grad(f)(x))


# The local family's reference computes its layer gradients with torch.autograd.grad on detached
# leaves inside the forward: it does not compose with torch.func (its C++ / Triton ops do).
REFERENCE_CASES = [c for c in CASES if c[0] != "local_ff_linear"]


@pytest.mark.parametrize("name,f,shape", REFERENCE_CASES, ids=[c[0] for c in REFERENCE_CASES])
def test_reference_backend_per_sample_grads(name, f, shape):
    """The plain-PyTorch reference (PYPAPER_BACKEND=reference, or no pypaper._C) keeps its
    autograd.Functions in the form torch.func accepts (setup_context, generate_vmap_rule)."""
    with pypaper.use_backend("reference"):
        _assert_per_sample_grads(f, shape, samples=2)


def test_bitlinear_per_sample_grads():
    """BitLinear's straight-through step (an autograd.Function in every backend) under
    functional_call + vmap(grad)."""
    torch.manual_seed(0)
    model = pypaper.quant.BitLinear(6, 4, bits=3)
    params = {k: v.detach() for k, v in model.named_parameters()}
    xs = torch.randn(3, 2, 6)

    def loss(p, x):
        y = func.functional_call(model, p, (x,))
        return (y * torch.linspace(-1.0, 2.0, y.numel()).reshape(y.shape)).sum()

    got = func.vmap(func.grad(loss), in_dims=(None, 0))(params, xs)
    for s in range(3):
        model.zero_grad()
        loss(dict(model.named_parameters()), xs[s]).backward()
        for k, p in model.named_parameters():
            torch.testing.assert_close(got[k][s], p.grad, rtol=1e-5, atol=1e-5)


def test_every_functional_op_has_an_explicit_autograd():
    """Each functional pypaper op (C++ / CUDA, and the Triton twins) has pypaper's Autograd
    kernel: a backward, a constant (integer codes, the sampler's choice) or one that refuses to be
    differentiated. None is left to torch's fallback for C++ ops without autograd (a deprecated
    path that warns and gives zeros) or to a triton_op's own kernel. The local family's *_out
    ops write into their arguments and are called with explicit gradients."""
    from pypaper import _autograd

    if importlib.util.find_spec("triton") is not None:  # define every family's Triton twins
        for module in ("quant._registration", "quant.fewbit._registration", "quant.power",
                       "quant.qlinear_registration", "wtacrs._registration",
                       "hopfield._registration", "snn._registration"):
            importlib.import_module(f"pypaper.{module}").load_triton()
        importlib.import_module("pypaper.local.triton_kernels")
    names = {n for n in torch._C._dispatch_get_all_op_names() if n.startswith("pypaper::")}
    def writes_an_argument(name):
        schema = torch._library.utils.lookup_op(name)._schema
        return any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)

    mutating = {n for n in names if writes_an_argument(n)}
    assert {n.removesuffix("_triton") for n in mutating} == {
        "pypaper::local_ff_linear_out", "pypaper::local_ff_sf_linear_out",
        "pypaper::local_tp_linear_out"}
    missing = names - mutating - set(_autograd._RULES) - _autograd._CONSTANT
    assert not missing, sorted(missing)


def _tangent_of_compiled(f, x, t):
    """f's tangent along t from a compiled function that opens its own dual level."""
    def g(a):
        with fwAD.dual_level():
            return fwAD.unpack_dual(f(fwAD.make_dual(a, t))).tangent

    torch._dynamo.reset()
    try:
        return torch.compile(g, backend="aot_eager")(x)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("name,f,shape", WITH_RULE, ids=[c[0] for c in WITH_RULE])
def test_dual_level_opened_inside_a_compiled_function(name, f, shape):
    """AOT autograd traces such a function with the level open in C++ only (the Python
    forward_ad._current_level stays -1) and tangents hidden behind its functional wrappers: the
    ops' Autograd kernel took the no-grad path and the tangent came out None, without a word.
    (aot_eager: torch 2.13's inductor drops the tangents of any graph, pytorch#187284.)"""
    x, t = _data(shape), _data(shape, seed=5)
    got = _tangent_of_compiled(f, x, t)
    assert got is not None
    torch.testing.assert_close(got, _jacobian_times(f, x, t), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,f,shape", REFUSED, ids=[c[0] for c in REFUSED])
def test_dual_level_opened_inside_a_compiled_function_is_refused(name, f, shape):
    """... and an op without a jvp rule refuses the tangent there as in eager (it was dropped)."""
    x = _data(shape)
    with pytest.raises(Exception, match="no forward-mode AD rule"):
        _tangent_of_compiled(f, x, torch.ones_like(x))
