"""torch.compile(fullgraph=True) over neurons whose surrogate alpha is a tensor.

SpikingJelly keeps a tensor alpha as given (annealed in place, or an nn.Parameter from a
state_dict); pypaper reads it at each eager call. Under torch.compile that read broke the graph,
so fullgraph=True raised (dynamo: "Could not guard on data-dependent expression"). While tracing,
lif_multi_step now passes the tensor to pypaper/snn/tensor_alpha.py's ops, which read it when the
graph runs, and the reference computes with it as a tensor.
"""
import pytest
import spikingjelly.activation_based.surrogate as sj_surrogate
import torch
from torch import nn
from torch._dynamo.backends.common import aot_autograd  # noqa: F401  (aot_eager is registered)

import pypaper
from pypaper.snn import neuron, ops, surrogate


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test's closures share code objects with the others': a fresh cache per test (the
    recompile limit counts per code object)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _recording_backend(graphs):
    """aot_eager (fake tensors, the ops' autograd traced into forward and backward graphs),
    recording the code of each graph dynamo hands over."""
    def backend(gm, example_inputs):
        graphs.append(gm.code)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)
    return backend


def _model(sur, step_mode="m"):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), neuron.LIFNode(surrogate_function=sur,
                                                         step_mode=step_mode))


def _step(model, x, step_mode):
    def run(x):
        pypaper.snn.reset_net(model)
        if step_mode == "m":
            return model(x)
        return torch.stack([model(x[t]) for t in range(x.shape[0])])
    return run


def _fwd_bwd(fn, model, x):
    model.zero_grad()
    out = fn(x)
    (out * torch.linspace(-1, 1, out.shape[-1], device=out.device)).sum().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()]


def _assert_same(a, b):
    (out_a, grads_a), (out_b, grads_b) = a, b
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=0)
    assert out_a.sum() > 0 and out_a.sum() < out_a.numel()  # some spikes, not all
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(ga, gb, rtol=1e-6, atol=1e-7)
        assert ga.abs().sum() > 0


SURROGATES = {
    "pypaper ATan": lambda a: surrogate.ATan(alpha=a),
    "pypaper Sigmoid": lambda a: surrogate.Sigmoid(alpha=a),
    "spikingjelly PiecewiseQuadratic": lambda a: sj_surrogate.PiecewiseQuadratic(alpha=a),
}


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("step_mode", ["m", "s"])
@pytest.mark.parametrize("sur", list(SURROGATES))
def test_fullgraph_compile_with_a_tensor_alpha_equals_eager_and_follows_annealing(
        backend, step_mode, sur):
    alpha = torch.tensor(3.0)
    model = _model(SURROGATES[sur](alpha), step_mode)
    x = torch.randn(5, 4, 6) * 2
    graphs = []
    eager = _step(model, x, step_mode)
    compiled = torch.compile(eager, fullgraph=True, backend=_recording_backend(graphs))
    with pypaper.use_backend(backend):
        got = _fwd_bwd(compiled, model, x)
        _assert_same(got, _fwd_bwd(eager, model, x))
        assert len(graphs) == 1
        if backend == "cpu":  # the kernels' op, not the reference, runs in the graph
            assert "lif_forward_alpha_tensor" in graphs[0]
        else:
            assert "lif_forward_alpha_tensor" not in graphs[0]
        # annealed in place: the compiled graph reads the new value, without a recompile
        with torch.no_grad():
            alpha.fill_(0.75)
        annealed = _fwd_bwd(compiled, model, x)
        _assert_same(annealed, _fwd_bwd(eager, model, x))
        assert len(graphs) == 1
        assert not torch.equal(annealed[1][0], got[1][0])  # alpha changed the gradient


def test_the_compiled_kernel_gradient_is_the_number_alphas():
    """The compiled model with alpha = tensor(2.5) gives the gradients of alpha = 2.5 (eager)."""
    x = torch.randn(5, 4, 6) * 2
    model = _model(surrogate.ATan(alpha=torch.tensor(2.5)))
    compiled = torch.compile(_step(model, x, "m"), fullgraph=True, backend="aot_eager")
    got = _fwd_bwd(compiled, model, x)
    model[1].surrogate_function = surrogate.ATan(alpha=2.5)
    _assert_same(got, _fwd_bwd(_step(model, x, "m"), model, x))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_a_bad_alpha_raises_when_the_compiled_graph_runs(backend):
    """As eager raises at the call: on the kernels' ops and on the reference (whose formulas
    would give NaN, zero or sign-flipped gradients silently)."""
    alpha = torch.tensor(3.0)
    model = _model(surrogate.ATan(alpha=alpha))
    x = torch.randn(5, 4, 6) * 2
    compiled = torch.compile(_step(model, x, "m"), fullgraph=True, backend="aot_eager")
    with pypaper.use_backend(backend):
        compiled(x)
        for bad in (-1.0, 0.0, float("inf"), float("nan")):
            alpha.fill_(bad)
            with pytest.raises(ValueError, match="ATan's alpha must be a positive finite number"):
                compiled(x)


def test_a_surrogate_called_alone_checks_its_tensor_alpha_when_compiled():
    alpha = torch.tensor(3.0)
    sur = surrogate.Sigmoid(alpha=alpha)
    compiled = torch.compile(lambda t: sur(t), fullgraph=True, backend="aot_eager")
    compiled(torch.zeros(3, requires_grad=True))
    alpha.fill_(-2.0)
    with pytest.raises(ValueError, match="alpha must be a positive finite number"):
        compiled(torch.zeros(3, requires_grad=True))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_alpha_annealed_between_forward_and_backward(backend):
    """The backward uses the forward's alpha, as eager (which read it as a number): the graph
    keeps a checked copy (tensor_alpha.checked_alpha). Saving the live tensor raised autograd's
    'modified by an inplace operation' error."""
    alpha = torch.tensor(3.0)
    model = _model(surrogate.ATan(alpha=alpha))
    x = torch.randn(5, 4, 6) * 2
    eager = _step(model, x, "m")
    compiled = torch.compile(eager, fullgraph=True, backend="aot_eager")

    def grads(fn):
        alpha.fill_(3.0)
        model.zero_grad()
        out = fn(x)
        alpha.fill_(0.5)
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    with pypaper.use_backend(backend):
        _assert_same(grads(compiled), grads(eager))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("alpha_dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_compiled_equals_eager_for_any_alpha_and_input_dtype(backend, alpha_dtype, x_dtype):
    """Eager reads alpha as a Python number (float64): the compiled graph computes with a
    float64 copy, so the constants made of alpha round the same (computed in a 16-bit alpha's
    own dtype they were up to 0.5% off); output and gradient dtypes are x's."""
    alpha = torch.tensor(2.7, dtype=alpha_dtype)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), neuron.LIFNode(
        surrogate_function=surrogate.ATan(alpha=alpha), step_mode="m")).to(x_dtype)
    x = (torch.randn(5, 4, 6) * 2).to(x_dtype)
    eager = _step(model, x, "m")
    compiled = torch.compile(eager, fullgraph=True, backend="aot_eager")
    with pypaper.use_backend(backend):
        got, want = _fwd_bwd(compiled, model, x), _fwd_bwd(eager, model, x)
    assert got[0].dtype == x_dtype and got[1][0].dtype == x_dtype
    _assert_same(got, want)
    sur = surrogate.ATan(alpha=alpha)
    x0 = torch.tensor(0.3, dtype=x_dtype)
    got = torch.compile(lambda t: sur.derivative(t), fullgraph=True, backend="aot_eager")(x0)
    want = sur.derivative(x0)
    assert got.dtype == want.dtype == x_dtype
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("transform", ["grad", "vmap(grad)", "jacrev", "jacfwd"])
def test_torch_func_transforms_inside_torch_compile(backend, transform):
    """Under a torch.func transform the calls keep their eager form (a graph break): traced,
    the transform's wrappers reached the ops' storage and the compile failed, with a tensor
    alpha, or with a number alpha on the reference (its spike Function without vmap support)."""
    for alpha in (torch.tensor(3.0), 3.0):
        node = neuron.LIFNode(surrogate_function=surrogate.ATan(alpha=alpha), step_mode="m")

        def loss(x):
            pypaper.snn.reset_net(node)
            return node(x).mul(torch.linspace(-1, 1, 6)).sum()

        fn = torch.func.grad(loss)
        if transform == "vmap(grad)":
            fn = torch.func.vmap(fn, in_dims=1, out_dims=1)
        elif transform.startswith("jac"):
            fn = getattr(torch.func, transform)(lambda x: (pypaper.snn.reset_net(node), node(x))[1])
        x = torch.randn(5, 4, 6) * 2
        with pypaper.use_backend(backend):
            want = fn(x)
            got = torch.compile(fn, backend="aot_eager")(x)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        assert want.abs().sum() > 0
        torch._dynamo.reset()


def test_a_number_alpha_surrogate_under_vmap_of_grad_compiles():
    sur = surrogate.ATan(alpha=2.0)
    w, x = torch.randn(6, 6), torch.randn(4, 6)
    fn = torch.func.vmap(torch.func.grad(lambda w, x: sur(x @ w).sum()), in_dims=(None, 0))
    torch.testing.assert_close(torch.compile(fn, backend="aot_eager")(w, x), fn(w, x))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("alpha", [3.0, torch.tensor(3.0)], ids=["number", "tensor"])
def test_dual_tensors_through_a_compiled_model(backend, alpha):
    """Forward-mode AD with dual tensors through a compiled model gives eager's tangent. On the
    reference it came out None (dynamo traced the spike Function and dropped its jvp without a
    word, pytorch#187284): the Function now runs outside the graph there. (aot_eager: torch
    2.13's inductor drops the tangents of any graph, x.sin() included, pytorch#187284.)"""
    import torch.autograd.forward_ad as fwAD

    node = neuron.LIFNode(surrogate_function=surrogate.ATan(alpha=alpha), step_mode="m")

    def f(x):
        pypaper.snn.reset_net(node)
        return node(x).mul(1.5).tanh()

    x, t = torch.randn(5, 4, 6) * 2, torch.randn(5, 4, 6)
    compiled = torch.compile(f, backend="aot_eager")
    with pypaper.use_backend(backend), fwAD.dual_level():
        got = fwAD.unpack_dual(compiled(fwAD.make_dual(x, t))).tangent
        want = fwAD.unpack_dual(f(fwAD.make_dual(x, t))).tangent
    assert got is not None
    torch.testing.assert_close(got, want)
    assert want.abs().sum() > 0


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("alpha", [3.0, torch.tensor(3.0)], ids=["number", "tensor"])
def test_torch_func_jvp_inside_torch_compile(backend, alpha):
    node = neuron.LIFNode(surrogate_function=surrogate.ATan(alpha=alpha), step_mode="m")

    def f(x, t):
        pypaper.snn.reset_net(node)
        return torch.func.jvp(node, (x,), (t,))[1]

    x, t = torch.randn(5, 4, 6) * 2, torch.randn(5, 4, 6)
    with pypaper.use_backend(backend):
        want = f(x, t)
        got = torch.compile(f, backend="aot_eager")(x, t)
    torch.testing.assert_close(got, want)
    assert want.abs().sum() > 0


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_a_parameter_alpha_gets_no_gradient_as_in_eager(backend):
    """SpikingJelly's built-in spiking functions give alpha no gradient; nor does the compiled
    graph (alpha enters it detached, through tensor_alpha.checked_alpha)."""
    alpha = nn.Parameter(torch.tensor(2.0))
    model = _model(surrogate.ATan(alpha=alpha))
    x = torch.randn(5, 4, 6) * 2
    compiled = torch.compile(_step(model, x, "m"), fullgraph=True, backend="aot_eager")
    with pypaper.use_backend(backend):
        compiled(x).sum().backward()
    assert alpha.grad is None and model[0].weight.grad.abs().sum() > 0


def test_inductor_compiles_the_tensor_alpha_ops():
    """The default backend (inductor), forward and backward."""
    alpha = torch.tensor(3.0)
    model = _model(surrogate.Sigmoid(alpha=alpha))
    x = torch.randn(5, 4, 6) * 2
    eager = _step(model, x, "m")
    compiled = torch.compile(eager, fullgraph=True)
    _assert_same(_fwd_bwd(compiled, model, x), _fwd_bwd(eager, model, x))


def test_a_surrogate_module_called_alone_compiles_with_a_tensor_alpha():
    """The surrogate's spiking function (the reference's Heaviside with the surrogate gradient),
    as a neuron of one's own calls it."""
    sur = surrogate.ATan(alpha=torch.tensor(3.0))
    x = torch.linspace(-1, 1, 11, requires_grad=True)
    compiled = torch.compile(lambda t: sur(t), fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.backward(torch.ones_like(out))
    want = surrogate.ATan(alpha=3.0).derivative(x.detach())
    torch.testing.assert_close(x.grad, want)
    torch.testing.assert_close(out, (x >= 0).float())


def test_tensor_alpha_ops_follow_the_op_contract():
    x = torch.randn(4, 3, 5) * 2
    decay, vth = torch.tensor(2.0), torch.tensor(1.0)
    alpha = torch.tensor(2.0)
    fwd, bwd = pypaper.snn.tensor_alpha.ops("cpu")
    from pypaper.snn import op_flags

    flags = op_flags.forward_flags(True, True, False, False, False, False)
    torch.library.opcheck(fwd, (x.clone().requires_grad_(), None, decay, vth, 0.0, 1, alpha,
                                flags, "cpu"))
    want = torch.ops.pypaper.lif_forward(x, None, decay, vth, 0.0, 1, 2.0, flags)
    got = fwd(x, None, decay, vth, 0.0, 1, alpha, flags, "cpu")
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    gs = torch.randn_like(x)
    bflags = op_flags.backward_flags(True, True, False, False, False, False) | op_flags.RECOMPUTE
    args = (gs, None, None, x, None, decay, vth, 0.0, 1)
    torch.library.opcheck(bwd, (*args, alpha, bflags, "cpu"))
    want = torch.ops.pypaper.lif_backward(*args, 2.0, bflags)
    got = bwd(*args, alpha, bflags, "cpu")
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    with pytest.raises(ValueError, match="backend must be"):
        fwd(x, None, decay, vth, 0.0, 1, alpha, flags, "tpu")
    with pytest.raises(NotImplementedError, match="lif_backward_alpha_tensor has no backward"):
        xg = x.clone().requires_grad_()
        bwd(gs, None, None, xg, None, decay, vth, 0.0, 1, alpha, bflags, "cpu")[0].sum().backward()


def test_eager_calls_still_read_the_number():
    """Outside torch.compile a tensor alpha is read at the call: the float ops run."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    spec = surrogate.surrogate_spec(surrogate.ATan(alpha=torch.tensor(3.0)))
    assert spec == (1, 3.0) and type(spec[1]) is float
    node = neuron.LIFNode(surrogate_function=surrogate.ATan(alpha=torch.tensor(3.0)),
                          step_mode="m")
    x = (torch.randn(4, 2, 3) * 2).requires_grad_()
    with Record() as rec:
        node(x).sum().backward()
    assert "pypaper.lif_forward.default" in rec.ops and "pypaper.lif_backward.default" in rec.ops
    assert not any("alpha" in op for op in rec.ops)


def test_the_reference_backend_compiles_fullgraph_with_a_number_alpha_too():
    """The reference's spike Function had a jvp, which dynamo refuses ("Unsupported custom
    jvp"): use_backend('reference') under fullgraph=True failed for any alpha. Tracing runs it
    without the jvp; eager forward mode keeps it."""
    model = _model(surrogate.ATan(alpha=2.0))
    x = torch.randn(5, 4, 6) * 2
    eager = _step(model, x, "m")
    with pypaper.use_backend("reference"):
        compiled = torch.compile(eager, fullgraph=True, backend="aot_eager")
        _assert_same(_fwd_bwd(compiled, model, x), _fwd_bwd(eager, model, x))
        xs = torch.randn(3, 2, 8) * 2
        node = neuron.LIFNode(surrogate_function=surrogate.ATan(alpha=2.0), step_mode="m")
        tangent = torch.randn_like(xs)
        _, jvp = torch.func.jvp(lambda t: node(t), (xs,), (tangent,))
        assert jvp.abs().sum() > 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_fullgraph_compile_with_a_tensor_alpha_on_cuda():
    """The default CUDA backend (the CUDA kernel, or Triton), inductor, alpha on the GPU."""
    alpha = torch.tensor(3.0, device="cuda")
    model = _model(surrogate.ATan(alpha=alpha)).cuda()
    x = torch.randn(5, 4, 6, device="cuda") * 2
    eager = _step(model, x, "m")
    compiled = torch.compile(eager, fullgraph=True)
    got, want = _fwd_bwd(compiled, model, x), _fwd_bwd(eager, model, x)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    alpha.fill_(1.0)
    torch.testing.assert_close(_fwd_bwd(compiled, model, x)[1][0],
                               _fwd_bwd(eager, model, x)[1][0], rtol=1e-5, atol=1e-6)


def test_the_tensor_alpha_ops_are_kept_out_of_cuda_graphs():
    """They read alpha on the host when they run: a CUDA graph would replay the value read at
    capture (annealing silently ignored), or fail the capture on the read's synchronization."""
    if not hasattr(torch.Tag, "cudagraph_unsafe"):
        pytest.skip("this torch has no cudagraph_unsafe tag")
    for op in pypaper.snn.tensor_alpha.ops("cpu"):
        assert torch.Tag.cudagraph_unsafe in op.tags


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("alpha_device", ["cuda", "cpu"])
def test_reduce_overhead_follows_an_annealed_alpha_on_cuda(alpha_device):
    alpha = torch.tensor(3.0, device=alpha_device)
    model = _model(surrogate.ATan(alpha=alpha)).cuda()
    x = torch.randn(5, 4, 6, device="cuda") * 2
    eager = _step(model, x, "m")
    compiled = torch.compile(eager, fullgraph=True, mode="reduce-overhead")
    for value in (3.0, 1.0, 0.5):
        alpha.fill_(value)
        for _ in range(3):  # past cudagraph trees' warm-up runs
            got = _fwd_bwd(compiled, model, x)
        want = _fwd_bwd(eager, model, x)
        torch.testing.assert_close(got[1][0], want[1][0], rtol=1e-5, atol=1e-6)
