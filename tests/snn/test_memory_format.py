"""Inputs whose memory is a permutation of a contiguous tensor (channels_last steps; a
channels_last convolution's [T*N, C, H, W] output viewed as [T, N, C, H, W]) run on their memory
as it lies, and the spikes and membranes come back with the input's strides, as torch's own
elementwise ops (and so SpikingJelly's neurons) give them. Before, the op copied such an input to
the standard layout and returned that layout, and the next channels_last convolution copied it
back. The expectation is by definition: the same call on the contiguous copy, to the bit, with
the layout of the input."""
import pytest
import torch

from pypaper import _ext, use_backend
from pypaper.snn import lif_multi_step, neuron, surrogate
from pypaper._layout import storage_order


def _storage_order(x):
    return storage_order(x, fixed=1)

pytestmark = pytest.mark.skipif(not _ext.LOADED, reason="pypaper._C not built")

CL = torch.channels_last
T, N, C, H, W = 3, 2, 5, 4, 3


def _conv_like(requires_grad=True, scale=1.5):
    """[T, N, C, H, W] with the strides of a channels_last [T*N, C, H, W] viewed as 5-d."""
    torch.manual_seed(0)
    x = (torch.randn(T * N, C, H, W) * scale + 0.5).to(memory_format=CL).view(T, N, C, H, W)
    assert not x.is_contiguous() and x.stride()[2] == 1
    return x.detach().requires_grad_(requires_grad)


def _same_strides(a, b):
    return a.shape == b.shape and all(s == t for s, t, n in zip(a.stride(), b.stride(), a.shape)
                                      if n != 1)


def test_storage_order():
    assert _storage_order(torch.randn(2, 3, 4)) is None  # contiguous
    assert _storage_order(_conv_like()) == [0, 1, 3, 4, 2]
    step = torch.randn(N, C, H, W).to(memory_format=CL)[None]
    assert _storage_order(step) == [0, 1, 3, 4, 2]
    assert _storage_order(torch.randn(4, 3, 2).transpose(0, 1)) is None  # time not outermost
    assert _storage_order(torch.randn(2, 3, 8)[:, :, ::2]) is None  # gaps
    assert _storage_order(torch.randn(2, 3, 1)) is None
    # size-1 dims keep their place (their strides mean nothing)
    assert _storage_order(torch.randn(2, 4, 1, 3).permute(0, 3, 2, 1)) == [0, 3, 2, 1]


@pytest.mark.parametrize("v_reset", [0.0, None])
@pytest.mark.parametrize("store_v_seq", [False, True])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_conv_layout_multi_step(v_reset, store_v_seq, backend):
    """Per-neuron tau and threshold that require grad, a carried membrane: outputs, membrane
    and every gradient equal the contiguous call's; outputs have x's strides."""
    x = _conv_like()
    xc = x.detach().contiguous().requires_grad_()
    tau = (torch.rand(C, H, W) * 3 + 1.5).requires_grad_()
    vth = (torch.rand(C, H, W) * 0.5 + 0.75).requires_grad_()
    v0 = torch.randn(N, C, H, W).to(memory_format=CL).requires_grad_()
    outs, grads = [], []
    with use_backend(backend):
        for xx in (x, xc):
            s, v, vs = lif_multi_step(xx, v0, tau=tau, v_threshold=vth, v_reset=v_reset,
                                      surrogate_function=surrogate.ATan(), store_v_seq=store_v_seq)
            torch.manual_seed(3)
            loss = (s * torch.randn(s.shape)).sum() + (v * torch.randn(v.shape)).sum()
            if store_v_seq:
                loss = loss + (vs * torch.randn(vs.shape)).sum()
            gs = torch.autograd.grad(loss, (xx, tau, vth, v0))
            outs.append((s, v, vs))
            grads.append(gs)
    (s, v, vs), (sc, vc, vsc) = outs
    assert 0.1 < s.mean() < 0.9
    assert torch.equal(s, sc) and torch.equal(v, vc)
    assert _same_strides(s, x) and _same_strides(v, x[0])
    if store_v_seq:
        assert torch.equal(vs, vsc) and _same_strides(vs, x)
    for g, gc in zip(*grads):
        assert torch.equal(g, gc)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_standard_layout_membrane_beside_a_channels_last_input(backend):
    """A membrane in the standard layout (a zeros(...) v_init) beside a channels_last x: every
    backend returns v_last and v_seq in x's layout, as it returns the spikes (the reference
    returned v's layout before 2026-12-05; values were equal)."""
    x = _conv_like(requires_grad=False)
    v0 = torch.randn(N, C, H, W) * 0.5
    assert v0.is_contiguous()
    with use_backend(backend):
        s, v, vs = lif_multi_step(x, v0, store_v_seq=True)
    want = lif_multi_step(x.contiguous(), v0, store_v_seq=True)
    assert torch.equal(s, want[0]) and torch.equal(v, want[1]) and torch.equal(vs, want[2])
    assert _same_strides(s, x) and _same_strides(v, x[0]) and _same_strides(vs, x)


@pytest.mark.parametrize("step_mode", ["s", "m"])
def test_neuron_channels_last(step_mode):
    """A LIFNode on channels_last steps: spikes and membrane stay channels_last across calls,
    equal to the contiguous run and to SpikingJelly's layout."""
    torch.manual_seed(1)
    xs = [torch.randn(N, C, H, W).to(memory_format=CL) * 1.5 + 0.4 for _ in range(4)]
    a, b = (neuron.LIFNode(tau=3.0, step_mode=step_mode) for _ in range(2))
    if step_mode == "s":
        got = [a(x) for x in xs]
        want = [b(x.contiguous()) for x in xs]
    else:
        seq = torch.stack(xs)  # stack keeps channels_last strides per step
        got, want = [a(seq)], [b(seq.contiguous())]
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    assert a.v.is_contiguous(memory_format=CL) and torch.equal(a.v, b.v)
    if step_mode == "s":
        assert all(g.is_contiguous(memory_format=CL) for g in got)


def test_per_sample_threshold_channels_last():
    """A per-sample threshold (x.shape[1:]) beside a channels_last input."""
    x = _conv_like(requires_grad=False)
    vth = torch.rand(N, C, H, W) + 0.5
    s, v, _ = lif_multi_step(x, v_threshold=vth)
    sc, vc, _ = lif_multi_step(x.contiguous(), v_threshold=vth)
    assert torch.equal(s, sc) and torch.equal(v, vc) and _same_strides(s, x)


def test_batch_not_outermost_with_per_neuron_parameter():
    """x [T, N, F] whose batch is innermost in memory: with one tau per neuron the op runs on a
    contiguous copy (a per-neuron value cannot follow the interleaved order); with one tau, on
    the memory as it lies."""
    torch.manual_seed(2)
    x = (torch.randn(T, 6, N) * 1.5 + 0.5).transpose(1, 2)
    assert _storage_order(x) == [0, 2, 1]
    tau = torch.rand(6) * 3 + 1.5
    for t in (tau, 2.5):
        s, v, _ = lif_multi_step(x, tau=t)
        sc, vc, _ = lif_multi_step(x.contiguous(), tau=t)
        assert torch.equal(s, sc) and torch.equal(v, vc)
    assert _same_strides(s, x)


def test_shape_errors_name_the_users_shapes():
    x = _conv_like(requires_grad=False)
    with pytest.raises(ValueError, match=r"v has shape \(2, 5, 4\), expected x_seq.shape\[1:\] = "
                                         r"\(2, 5, 4, 3\)"):
        lif_multi_step(x, torch.zeros(N, C, H))
    with pytest.raises(ValueError, match=r"v_threshold has shape \(5, 4\)"):
        lif_multi_step(x, v_threshold=torch.ones(C, H))


def test_compile_fullgraph_channels_last():
    x = _conv_like(requires_grad=False)
    f = torch.compile(lambda a: lif_multi_step(a, tau=2.0)[0] * 1.0, fullgraph=True,
                      backend="aot_eager")
    s = f(x)
    assert torch.equal(s, lif_multi_step(x.contiguous(), tau=2.0)[0]) and _same_strides(s, x)


def test_compile_dynamic_shapes_channels_last():
    """A second spatial size makes torch.compile recompile with symbolic strides; the storage
    order is found by comparisons it can guard on (sorted() with symbolic keys could not be
    traced: fullgraph failed)."""
    f = torch.compile(lambda a: lif_multi_step(a, tau=2.0)[0] * 1.0, fullgraph=True,
                      backend="aot_eager")
    for hw in (5, 6, 7):
        x = (torch.randn(8, 3, hw, hw) * 2).to(memory_format=CL).view(4, 2, 3, hw, hw)
        s = f(x)
        assert torch.equal(s, lif_multi_step(x.contiguous(), tau=2.0)[0]) and _same_strides(s, x)
