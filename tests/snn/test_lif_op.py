"""The op contract of pypaper::lif_forward / lif_backward: opcheck, gradcheck in fp64,
torch.compile(fullgraph=True), odd and empty shapes, non-contiguous inputs, 16-bit accuracy."""
import pytest
import torch

import pypaper
from pypaper.snn import lif_multi_step, neuron, op_flags, reference

from .helpers import inputs, surrogate_of

OP = torch.ops.pypaper.lif_forward.default


def _args(x, v0=None, decay=None, vth=None, v_reset=0.0, sid=1, alpha=2.0, decay_input=True,
          decay_is_tau=True, detach_reset=False, sltt=False, store_v_seq=False, keep_h=True):
    mdt = reference.default_math_dtype(x.dtype)
    decay = torch.tensor(2.0, dtype=mdt) if decay is None else decay
    vth = torch.tensor(1.0, dtype=mdt) if vth is None else vth
    return (x, v0, decay, vth, v_reset, sid, alpha,
            op_flags.forward_flags(decay_input, decay_is_tau, detach_reset, sltt, store_v_seq,
                                   keep_h))


def _without_h(args):
    """The same call without the keep_h flag."""
    return (*args[:-1], args[-1] & ~op_flags.KEEP_H)


def _samples():
    for rg in (False, True):
        x = inputs((5, 3, 4)).requires_grad_(rg)
        yield _args(x)
        yield _args(inputs((4, 6)).requires_grad_(rg), v_reset=None, sid=0, alpha=4.0,
                    store_v_seq=True)
        v0 = torch.rand(2, 3, 2).requires_grad_(rg)
        k = (torch.rand(3, 2) * 0.5 + 0.2).requires_grad_(rg)
        vth = (torch.rand(3, 2) + 0.5).requires_grad_(rg)
        yield _args(inputs((3, 2, 3, 2)).requires_grad_(rg), v0, k, vth, decay_is_tau=False,
                    decay_input=False, detach_reset=True, sid=6)
        yield _args(inputs((4, 5), torch.float64).requires_grad_(rg), sid=7, sltt=True)
        yield _args(inputs((2, 5), torch.bfloat16).requires_grad_(rg), sid=2, alpha=1.0)


@pytest.mark.parametrize("args", list(_samples()))
def test_opcheck_lif_forward(args):
    torch.library.opcheck(OP, args)


@pytest.mark.parametrize("args", [a for a in _samples() if not a[0].requires_grad])
def test_opcheck_lif_forward_without_h(args):
    torch.library.opcheck(OP, _without_h(args))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("v_reset,store_v_seq", [(0.0, False), (None, True)])
def test_keep_h_false_writes_no_h_and_changes_nothing_else(dtype, v_reset, store_v_seq):
    """Without keep_h (a forward nothing will differentiate) the op returns an empty h_seq;
    spikes, v_last and v_seq are the keep_h forward's to the bit. Big enough for the streamed
    stores."""
    for shape in ((5, 3, 7), (4, 2, 1 << 20)):
        x = inputs(shape, dtype)
        v0 = torch.rand(shape[1:]).to(dtype)
        args = _args(x, v0, v_reset=v_reset, store_v_seq=store_v_seq)
        s1, v1, h1, q1 = OP(*args)
        s0, v0_, h0, q0 = OP(*_without_h(args))
        assert h1.shape == x.shape and h0.shape == (0,)
        assert torch.equal(s0, s1) and torch.equal(v0_, v1) and torch.equal(q0, q1)


@pytest.mark.parametrize("args", list(_samples()))
def test_opcheck_lif_forward_without_h_differentiated(args):
    """Without keep_h on the CPU: the backward reruns the forward from x (opcheck runs it)."""
    torch.library.opcheck(OP, _without_h(args))


def _keep_h_of_call(fn):
    """The keep_h lif_multi_step passed to the op, seen through a dispatch mode."""
    seen = []

    class Spy(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is OP:
                full = func._schema.arguments
                bound = dict(zip((a.name for a in full), args))
                bound.update(kwargs or {})
                seen.append(bool(bound["flags"] & op_flags.KEEP_H))
            return func(*args, **(kwargs or {}))

    with Spy():
        fn()
    return seen


def test_lif_multi_step_never_keeps_h_on_the_cpu():
    """The CPU forward writes no H, differentiated or not: its backward reruns the forward."""
    x = inputs((4, 3, 5))
    assert _keep_h_of_call(lambda: lif_multi_step(x)) == [False]
    with torch.no_grad():
        assert _keep_h_of_call(lambda: lif_multi_step(x.requires_grad_())) == [False]
    x.requires_grad_()
    assert _keep_h_of_call(lambda: lif_multi_step(x)) == [False]
    vth = torch.tensor(1.0, requires_grad=True)
    assert _keep_h_of_call(lambda: lif_multi_step(x.detach(), v_threshold=vth)) == [False]


def test_opcheck_lif_backward():
    x = inputs((4, 3, 5))
    _, _, h, _ = OP(*_args(x, v_reset=None))
    v0 = torch.rand(3, 5)
    args = (torch.randn(4, 3, 5), torch.randn(3, 5), torch.randn(4, 3, 5), h, v0,
            torch.full((5,), 0.4), torch.full((5,), 1.0), None, 1, 2.0,
            op_flags.backward_flags(True, False, False, False, True, True))
    torch.library.opcheck(torch.ops.pypaper.lif_backward.default, args)


@pytest.mark.parametrize("v_reset,decay_input,div", [(0.0, True, True), (None, False, False),
                                                      (-0.2, False, True), (None, True, False)])
def test_gradcheck_float64(v_reset, decay_input, div):
    """The surrogate gradient of a spike is no derivative, but with detach_reset the membrane is
    differentiable in x, v_init, tau/k and the threshold (piecewise smooth, no spike flips under
    gradcheck's eps): gradcheck checks the reverse scan, the carried gradient and the parameter
    reductions (per-neuron and per-layer) against finite differences."""
    x = inputs((4, 2, 3), torch.float64).requires_grad_()
    v0 = (torch.rand(2, 3, dtype=torch.float64) * 0.5).requires_grad_()
    decay = (torch.tensor([1.7, 2.5, 3.1], dtype=torch.float64) if div else
             torch.tensor(0.45, dtype=torch.float64)).requires_grad_()
    vth = torch.tensor([0.9, 1.0, 1.1], dtype=torch.float64, requires_grad=True)

    def f(x, v0, decay, vth):
        kw = {"tau": decay} if div else {"k": decay}
        s, v_last, v_seq = lif_multi_step(x, v0, v_threshold=vth, v_reset=v_reset,
                                          decay_input=decay_input, detach_reset=True,
                                          store_v_seq=True, **kw)
        return v_last, v_seq

    s = lif_multi_step(x.detach(), v0.detach(), v_threshold=vth.detach(), v_reset=v_reset,
                       decay_input=decay_input,
                       **({"tau": decay.detach()} if div else {"k": decay.detach()}))[0]
    assert 0 < float(s.mean()) < 1  # spikes happen: the reset path is part of the check
    assert torch.autograd.gradcheck(f, (x, v0, decay, vth), eps=1e-7, atol=1e-8)


def test_double_backward_is_the_reference_one():
    """create_graph=True, then a backward through the gradient (tests/snn/test_second_order.py
    covers every configuration)."""
    def second(backend):
        x = inputs((3, 4), torch.float64).requires_grad_()
        with pypaper.use_backend(backend):
            s, v, _ = lif_multi_step(x)
            (g,) = torch.autograd.grad((v * v).sum() + s.sum(), x, create_graph=True)
            (h,) = torch.autograd.grad((g * g).sum(), x)
        return h

    torch.manual_seed(3)
    got = second("cpu")
    torch.manual_seed(3)
    want = second("reference")
    assert want.abs().sum() > 0
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_torch_compile_fullgraph_training_step():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 16),
        neuron.ParametricLIFNode(step_mode="m", surrogate_function=surrogate_of("ATan"),
                                 tau_shape=(16,), learnable_threshold=True),
        torch.nn.Linear(16, 4))
    x = torch.randn(5, 3, 8)

    def step(x):
        pypaper.snn.reset_net(model)
        return model(x).mean(0)

    compiled = torch.compile(step, fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ref = step(x)
    ref.sum().backward()
    assert torch.allclose(out, ref, atol=1e-6)
    for a, p in zip(got, model.parameters()):
        assert torch.allclose(a, p.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(1, 1), (7, 7), (3, 129), (1, 129, 7), (2, 0), (0, 5),
                                   (4, 3, 0, 2), (2, 1025)])
def test_odd_and_empty_shapes(shape):
    x = inputs(shape).requires_grad_()
    v0 = torch.rand(shape[1:])
    got = lif_multi_step(x, v0, tau=1.9, v_reset=None, store_v_seq=True)
    with pypaper.use_backend("reference"):
        xr = x.detach().clone().requires_grad_()
        want = lif_multi_step(xr, v0, tau=1.9, v_reset=None, store_v_seq=True)
    for a, b in zip(got, want):
        assert a.shape == b.shape and torch.equal(a, b)
    (got[0].sum() + got[1].sum()).backward()
    (want[0].sum() + want[1].sum()).backward()
    assert x.grad.shape == x.shape and torch.allclose(x.grad, xr.grad, atol=1e-6)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_per_neuron_parameters_over_zero_features(backend):
    """Per-neuron tau and threshold over an empty feature shape: empty outputs and gradients
    (the CPU backward once failed reshaping its scalar accumulator to shape [0])."""
    tau = torch.full((0,), 2.5, requires_grad=True)
    vth = torch.full((0,), 0.7, requires_grad=True)
    x = torch.randn(4, 3, 0, requires_grad=True)
    with pypaper.use_backend(backend):
        s, v, _ = lif_multi_step(x, tau=tau, v_threshold=vth)
    (s.sum() + v.sum()).backward()
    assert s.shape == x.shape and v.shape == (3, 0)
    assert x.grad.shape == x.shape and tau.grad.shape == (0,) and vth.grad.shape == (0,)


def test_large_outputs_take_the_streamed_store_path():
    """Outputs of 512 KiB and more are written with non-temporal stores (rows here are not
    32-byte aligned): the same values as the reference."""
    x = inputs((8, 255, 131)).requires_grad_()  # 1 MiB per [T, N] tensor
    s, v, _ = lif_multi_step(x, tau=1.5, surrogate_function=surrogate_of("ATan"))
    g = torch.randn_like(s)
    (s * g).sum().backward()
    xr = x.detach().clone().requires_grad_()
    with pypaper.use_backend("reference"):
        sr, vr, _ = lif_multi_step(xr, tau=1.5, surrogate_function=surrogate_of("ATan"))
    (sr * g).sum().backward()
    assert torch.equal(s, sr) and torch.equal(v, vr)
    assert torch.allclose(x.grad, xr.grad, rtol=1e-5, atol=1e-6)


def test_empty_time_returns_the_initial_state():
    v0 = torch.rand(3, 4)
    s, v, _ = lif_multi_step(torch.empty(0, 3, 4), v0)
    assert s.shape == (0, 3, 4) and torch.equal(v, v0) and v.data_ptr() != v0.data_ptr()
    s, v, _ = lif_multi_step(torch.empty(0, 3, 4), v_reset=-0.3, v_threshold=0.5)
    assert torch.equal(v, torch.full((3, 4), -0.3))


def test_non_contiguous_and_broadcast_inputs():
    base = torch.randn(6, 9, 5) + 0.6
    x = base.transpose(1, 2)  # [6, 5, 9], non-contiguous
    v0 = torch.rand(9, 5).t()  # non-contiguous state
    vth = torch.linspace(0.8, 1.2, 18)[::2]  # strided per-neuron threshold of shape (9,)
    got = lif_multi_step(x, v0, v_threshold=vth, store_v_seq=True)
    want = lif_multi_step(x.contiguous(), v0.contiguous(), v_threshold=vth.contiguous(),
                          store_v_seq=True)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    xb = torch.randn(1, 3, 4).expand(5, 3, 4)  # the same input at every step (zero stride)
    assert torch.equal(lif_multi_step(xb)[0], lif_multi_step(xb.contiguous())[0])


def test_single_step_equals_multi_step():
    x = inputs((6, 3, 4))
    a = neuron.ParametricLIFNode(step_mode="s", v_reset=None)
    b = neuron.ParametricLIFNode(step_mode="m", v_reset=None)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    sa = torch.stack([a(xt) for xt in xa])
    sb = b(xb)
    assert torch.equal(sa, sb) and torch.equal(a.v, b.v)
    (sa.sum() + a.v.sum()).backward()
    (sb.sum() + b.v.sum()).backward()
    assert torch.allclose(xa.grad, xb.grad, rtol=1e-5, atol=1e-6)
    assert torch.allclose(a.w.grad, b.w.grad, rtol=1e-5, atol=1e-5)


def test_state_carries_across_calls_and_modes_until_reset():
    x = inputs((7, 2, 5))
    whole = neuron.LIFNode(step_mode="m")
    xw = x.clone().requires_grad_()
    s_whole = whole(xw)
    (s_whole.sum() + whole.v.sum()).backward()
    split = neuron.LIFNode(step_mode="s")
    xs = x.clone().requires_grad_()
    parts = [split(xs[0]), split(xs[1])]
    split.step_mode = "m"
    parts.append(split(xs[2:5]))
    split.step_mode = "s"
    parts += [split(xs[5]).unsqueeze(0), split(xs[6]).unsqueeze(0)]
    s_split = torch.cat([p if p.dim() == 3 else p.unsqueeze(0) for p in parts])
    assert torch.equal(s_split, s_whole) and torch.equal(split.v, whole.v)
    (s_split.sum() + split.v.sum()).backward()  # BPTT through the carried membrane
    assert torch.allclose(xs.grad, xw.grad, rtol=1e-5, atol=1e-6)
    pypaper.snn.reset_net(torch.nn.Sequential(split))
    assert split.v == 0.0 and split.v_seq is None
    split.step_mode = "m"
    assert torch.equal(split(x), s_whole)


def test_time_steps_one():
    x = inputs((1, 4, 3)).requires_grad_()
    s, v, _ = lif_multi_step(x, tau=2.0)
    h = x.detach()[0] / 2
    assert torch.equal(s[0], (h >= 1).float())
    s.sum().backward()
    assert x.grad.shape == x.shape


# ---- 16-bit accuracy: error vs the fp64 reference at most 2x plain PyTorch's in that dtype ----

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("v_reset", [0.0, None])
def test_half_precision_error_is_within_twice_plain_pytorch(dtype, v_reset):
    x64 = inputs((16, 64, 32), torch.float64, scale=0.5, shift=0.3)
    x = x64.to(dtype)
    g = torch.randn(16, 64, 32, dtype=torch.float64).to(dtype).double()  # exact in every dtype

    def run(backend, inp, math_dtype=None):
        xx = inp.clone().requires_grad_()
        kw = dict(tau=1.7, v_reset=v_reset, surrogate_function=surrogate_of("Sigmoid"),
                  store_v_seq=True)
        if math_dtype is not None:  # plain PyTorch, every operation in that dtype
            mdt = math_dtype
            out = reference.lif_multi_step(xx, None, torch.tensor(1.7, dtype=mdt),
                                           torch.tensor(1.0, dtype=mdt), v_reset, 0, 4.0, True,
                                           True, False, False, True, math_dtype=mdt)
        else:
            with pypaper.use_backend(backend):
                out = lif_multi_step(xx, **kw)
        s, v, vs = out
        (s * g.to(s.dtype)).sum().backward()
        return [t.detach().double() for t in (s, v, vs)] + [xx.grad.double()]

    want = run("reference", x.double())  # fp64 reference on the same (rounded) inputs
    ours = run("cpu", x)
    plain = run(None, x, math_dtype=dtype)
    for name, o, p, w in zip(("spikes", "v_last", "v_seq", "grad_x"), ours, plain, want):
        err_ours = float((o - w).abs().mean())
        err_plain = float((p - w).abs().mean())
        print(f"{dtype} {v_reset} {name}: ours {err_ours:.3e}, plain {err_plain:.3e}")
        assert err_ours <= 2 * err_plain + 1e-6, f"{name}: {err_ours:.3e} vs plain {err_plain:.3e}"


@pytest.mark.parametrize("used", ["spikes", "v_last", "v_seq", "spikes+v_last", "none"])
def test_gradients_when_only_some_outputs_are_used(used):
    """The backward gets None (not zero tensors) for the outputs a loss does not use; every
    combination gives the reference's gradients (x, v_init, tau, threshold)."""
    x0 = inputs((6, 4, 5), torch.float64, scale=0.6, shift=0.4)
    v00 = torch.randn(4, 5, dtype=torch.float64) * 0.3

    def grads(backend):
        x = x0.clone().requires_grad_()
        v0 = v00.clone().requires_grad_()
        tau = torch.tensor(1.8, dtype=torch.float64, requires_grad=True)
        vth = torch.full((5,), 0.9, dtype=torch.float64, requires_grad=True)
        with pypaper.use_backend(backend):
            s, v_last, v_seq = lif_multi_step(x, v0, tau=tau, v_threshold=vth,
                                              surrogate_function=surrogate_of("ATan"),
                                              store_v_seq=True)
        terms = {"spikes": (s * torch.linspace(-1, 1, s.numel(), dtype=s.dtype).view_as(s)).sum(),
                 "v_last": v_last.square().sum(), "v_seq": (0.5 * v_seq).sum()}
        if used == "none":  # a loss on nothing the op made: autograd never calls its backward
            loss = (x * 0).sum() + (v0 * 0).sum() + tau * 0 + vth.sum() * 0
        else:
            loss = sum(terms[k] for k in used.split("+"))
        return torch.autograd.grad(loss, (x, v0, tau, vth), allow_unused=True)

    for o, r in zip(grads("cpu"), grads("reference")):
        if r is None:
            assert o is None or torch.all(o == 0)
        else:
            torch.testing.assert_close(o, r, rtol=1e-9, atol=1e-10)


def test_number_parameters_are_cached_per_value():
    """lif_multi_step makes the tensor of a number tau / v_threshold once per value: the same
    results as fresh tensors, a new value gets its own, -0.0 stays apart from 0.0."""
    from pypaper.snn import ops

    x = inputs((5, 3, 4))
    for tau, vth in ((2.0, 1.0), (3.0, 0.5), (2.0, 1.0), (4, 1)):
        got = lif_multi_step(x, tau=tau, v_threshold=vth)[0]
        with pypaper.use_backend("reference"):
            want = lif_multi_step(x, tau=tau, v_threshold=vth)[0]
        assert torch.equal(got, want)
    cpu = x.device
    a = ops._param(0.0, "v_threshold", x, torch.float32, cpu, False)
    b = ops._param(-0.0, "v_threshold", x, torch.float32, cpu, False)
    assert a is not b and torch.signbit(b) and not torch.signbit(a)
    assert ops._param(0.0, "v_threshold", x, torch.float32, cpu, False) is a
    assert ops._param(0.0, "v_threshold", x, torch.float64, cpu, False) is not a
    assert ops._param(0.0, "v_threshold", x, torch.float32, cpu, True) is not a  # traced
