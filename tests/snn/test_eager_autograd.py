"""lif_multi_step's eager autograd (_registration.call_with_grad): in plain eager mode a call that
builds a graph goes through a torch.autograd.Function of its own instead of the op's Autograd key
(torch.library's wrapper costs ~4x the op's fixed cost per call). Both must be the same autograd:
same outputs, same gradients to the bit, same saved tensors; and every setting the Function cannot
serve (a dispatch mode, torch.compile, functorch, tensor subclasses) must keep the registered
one."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import pypaper
from pypaper.snn import lif_multi_step, neuron, surrogate

from .helpers import inputs


class PassThrough(TorchDispatchMode):
    """A dispatch mode that changes nothing (as FakeTensorMode or make_fx's mode would be there)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _case(name, dtype):
    torch.manual_seed(0)
    x = inputs((6, 3, 5), dtype).requires_grad_()
    if name == "lif":
        return x, dict(tau=2.0, surrogate_function=surrogate.ATan()), {}
    if name == "soft_detach_v_seq":
        v0 = torch.rand(3, 5, dtype=dtype).requires_grad_()
        return x, dict(v=v0, tau=3.0, v_reset=None, detach_reset=True, store_v_seq=True,
                       surrogate_function=surrogate.Sigmoid()), {"v": v0}
    if name == "per_neuron_k_vth":
        k = (torch.rand(5, dtype=torch.float64) * 0.5 + 0.2).to(dtype).float().requires_grad_()
        vth = (torch.rand(5) + 0.5).requires_grad_()
        return x, dict(k=k, v_threshold=vth, decay_input=False,
                       surrogate_function=surrogate.Erf()), {"k": k, "vth": vth}
    assert name == "sltt"
    return x, dict(tau=2.0, sltt=True, surrogate_function=surrogate.PiecewiseQuadratic()), {}


def _run(x, kw, leaves, mode):
    """Outputs, grad_fn name and the gradients of x and the leaves, under ``mode`` (or none)."""
    for t in (x, *leaves.values()):
        t.grad = None
    kw = dict(kw)
    v = kw.pop("v", None)
    if mode is None:
        spikes, v_last, v_seq = lif_multi_step(x, v, **kw)
    else:
        with mode:
            spikes, v_last, v_seq = lif_multi_step(x, v, **kw)
    gen = torch.Generator().manual_seed(1)
    outs = [spikes, v_last] + ([v_seq] if v_seq is not None else [])
    grads = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype) for o in outs]
    torch.autograd.backward(outs, grads)
    got = [o.detach().clone() for o in outs]
    got += [t.grad.clone() for t in (x, *leaves.values())]
    return got, type(spikes.grad_fn).__name__


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["lif", "soft_detach_v_seq", "per_neuron_k_vth", "sltt"])
def test_eager_function_equals_registered_autograd(name, dtype, backend):
    if backend == "triton":
        pytest.importorskip("triton")
    x, kw, leaves = _case(name, dtype)
    with pypaper.use_backend(backend):
        eager, eager_fn = _run(x, kw, leaves, None)
        registered, registered_fn = _run(x, kw, leaves, PassThrough())
    assert eager_fn == "LifMultiStepBackward"
    assert registered_fn.startswith("pypaper_lif_forward")  # pypaper/_autograd.py's Function
    assert len(eager) == len(registered)
    for a, b in zip(eager, registered):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_eager_function_saves_what_the_registered_autograd_saves():
    """x (the CPU backward reruns the forward from it), the two parameters, v_init: the same
    tensors, so memory kept for backward is unchanged."""
    x, kw, leaves = _case("soft_detach_v_seq", torch.float32)

    def saved(mode):
        packed = []

        def pack(t):
            packed.append((tuple(t.shape), t.data_ptr() == x.data_ptr()))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            _run(x, kw, leaves, mode)
        return packed

    got = saved(None)
    assert got == saved(PassThrough())
    assert got[0] == (tuple(x.shape), True)


def test_double_backward_through_the_eager_function():
    """The eager Function's backward under create_graph goes through the backward op's autograd
    (its double backward, pypaper/snn/second_order.py): the reference's second derivative."""
    x0 = inputs((4, 3), torch.float64)

    def second(backend):
        x = x0.clone().requires_grad_()
        with pypaper.use_backend(backend):
            spikes, _, _ = lif_multi_step(x, surrogate_function=surrogate.ATan())
            (g,) = torch.autograd.grad((spikes * torch.arange(12.0).reshape(4, 3)).sum(), x,
                                       create_graph=True)
            # eager create_graph: the gradient is autograd over the reference loop (its graph
            # plain torch ops), not a lif_backward node whose rule nests torch.func (~3x slower)
            assert "lif_backward" not in type(g.grad_fn).__name__
            (h,) = torch.autograd.grad((g * g).sum(), x)
        return spikes, h

    spikes, got = second("cpu")
    assert type(spikes.grad_fn).__name__ == "LifMultiStepBackward"
    _, want = second("reference")
    assert want.abs().sum() > 0
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_single_step_loop_equals_multi_step():
    """SpikingJelly's default step_mode 's' driven step by step (the eager Function per step, the
    membrane carried as a graph edge) gives the multi-step call's spikes and gradients."""
    x = inputs((8, 4, 6)).requires_grad_()
    g = torch.randn(8, 4, 6)
    single = neuron.LIFNode(surrogate_function=surrogate.ATan())
    out_s = torch.stack([single(xt) for xt in x.unbind(0)])
    out_s.backward(g)
    gx_s, x.grad = x.grad.clone(), None
    multi = neuron.LIFNode(surrogate_function=surrogate.ATan(), step_mode="m")
    out_m = multi(x)
    out_m.backward(g)
    assert torch.equal(out_s, out_m)
    torch.testing.assert_close(gx_s, x.grad, rtol=1e-6, atol=1e-6)


def test_jit_trace_records_the_op():
    """torch.jit.trace keeps the registered autograd: the trace holds pypaper::lif_forward (a
    Python autograd.Function would be an opaque PythonOp), and the traced module trains."""
    lif = neuron.LIFNode(surrogate_function=surrogate.ATan(), step_mode="m")
    x = inputs((4, 2, 3)).requires_grad_()
    traced = torch.jit.trace(lambda t: lif(t), (x,), check_trace=False)
    assert "pypaper::lif_forward" in str(traced.graph)
    lif.reset()
    out = traced(x)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("requires_grad", [False, True])
def test_forward_mode_ad_takes_the_ops_jvp(requires_grad):
    """A dual input leaves the eager fast path for the op's Autograd kernel, which runs its jvp
    rule (pypaper/snn/jvp_rule.py): the outputs carry the tangent the reference's forward AD
    gives (torch's own derivatives of the plain loop, the surrogate's jvp at the spike); inputs
    without tangents under a dual level run as usual."""
    import torch.autograd.forward_ad as fw

    x = inputs((4, 3)).double().requires_grad_(requires_grad)
    t = inputs((4, 3)).double().flip(0)
    kw = dict(surrogate_function=surrogate.ATan(), store_v_seq=True)
    tangents = {}
    for backend in ("cpu", "reference"):
        with pypaper.use_backend(backend), fw.dual_level():
            spikes, v_last, v_seq = lif_multi_step(fw.make_dual(x, t), **kw)
            tangents[backend] = [fw.unpack_dual(o).tangent for o in (spikes, v_last, v_seq)]
    assert all(g is not None for g in tangents["cpu"])
    assert tangents["cpu"][0].abs().sum() > 0
    for got, want in zip(tangents["cpu"], tangents["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    with fw.dual_level():
        spikes, _, _ = lif_multi_step(x.detach(), surrogate_function=surrogate.ATan())
    assert torch.equal(spikes, lif_multi_step(x.detach(), surrogate_function=surrogate.ATan())[0])
