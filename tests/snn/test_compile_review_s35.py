"""Review s35: torch.compile / torch.export of whole spiking training loops (CSNN of pypaper's
layers and neurons)."""
import copy
import warnings

import pytest
import torch
from torch import nn
from torch.export import Dim, export

from pypaper.snn import functional, layer, neuron


def _csnn() -> nn.Sequential:
    """SpikingJelly's CSNN shape: Conv -> BN -> neuron -> pool -> Flatten -> Linear -> neuron."""
    torch.manual_seed(0)
    net = nn.Sequential(
        layer.Conv2d(1, 4, 3, padding=1), layer.BatchNorm2d(4),
        neuron.ParametricLIFNode(tau_shape=(4, 8, 8)), layer.MaxPool2d(2), layer.Flatten(),
        layer.Linear(4 * 4 * 4, 10), neuron.LIFNode())
    functional.set_step_mode(net, "m")
    return net.eval()


@pytest.mark.parametrize("dims", ["batch", "steps and batch"])
def test_export_of_a_csnn_ending_in_flatten_with_a_dynamic_batch(dims):
    # layer.Flatten in step_mode 'm' flattened [T, N, *] to [T * N, *], flattened and split it
    # back: three chained views, for which torch guards N * min(F, F * N) == F * N with a
    # symbolic N; torch.export cannot prove that over a Dim's range and refused the whole model
    # ("Constraints violated (N)"), so no CSNN with Flatten exported with a dynamic batch
    net = _csnn()
    shapes = {1: Dim("N", min=2, max=64)}
    if dims == "steps and batch":
        shapes[0] = Dim("T", min=2, max=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the neurons' state attributes assigned during export
        program = export(net, (torch.rand(4, 3, 1, 8, 8) * 3,), dynamic_shapes=(shapes,))
    for steps, batch in ((4, 5), (4, 2), (6, 17) if dims != "batch" else (4, 17)):
        x = torch.rand(steps, batch, 1, 8, 8) * 3
        functional.reset_net(net)
        want = net(x)
        functional.reset_net(net)
        got = program.module()(x)
        assert got.shape == want.shape == (steps, batch, 10)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("args", [(), (1,), (2,), (1, 2), (2, 3), (-2,), (-3, -2), (1, -1),
                                  (2, 2), (3,)])
def test_flatten_multi_step_equals_flatten_of_the_merged_batch(args):
    # the definition: nn.Flatten(*args) on [T * N, *], split back to [T, N, *'] (SpikingJelly's
    # seq_to_ann_forward), values, shape and gradient
    x = torch.randn(3, 2, 4, 5, 6, requires_grad=True)
    got = layer.Flatten(*args, step_mode="m")(x)
    want = nn.Flatten(*args)(x.flatten(0, 1))
    want = want.unflatten(0, (3, 2))
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    g = torch.randn_like(want)
    (gx,) = torch.autograd.grad(got, x, g)
    (wx,) = torch.autograd.grad(want, x, g)
    torch.testing.assert_close(gx, wx, rtol=0, atol=0)


@pytest.mark.parametrize("args", [(0,), (0, 1), (-4,), (3, 1)])
def test_flatten_multi_step_over_the_merged_batch_dim_still_raises(args):
    # a start or end at the merged T * N dim (or start after end) is not a flatten of the
    # features: the same error as before (and as SpikingJelly's)
    with pytest.raises(RuntimeError, match="unflatten|start_dim cannot come after end_dim"):
        layer.Flatten(*args, step_mode="m")(torch.randn(3, 2, 4, 5, 6))


@pytest.mark.parametrize("step_mode", ["m", "s"])
def test_default_compiled_training_continues_from_an_inference_mode_membrane(step_mode):
    # streaming validation under torch.inference_mode, then training on from that membrane (no
    # reset): the traced copy of the inference-tensor membrane was a clone, which inductor's
    # partitioner recomputes in the backward, saving the inference tensor itself: "Inference
    # tensors cannot be saved for backward" with the default backend (aot_eager ran)
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = nn.Sequential(layer.Linear(4, 6), neuron.ParametricLIFNode(),
                        layer.Linear(6, 3), neuron.LIFNode())
    functional.set_step_mode(net, step_mode)
    ref = copy.deepcopy(net)
    compiled = torch.compile(net, fullgraph=True)
    shape = (5, 2, 4) if step_mode == "m" else (2, 4)
    for _ in range(2):
        x = torch.rand(shape) * 3
        with torch.inference_mode():
            torch.testing.assert_close(compiled(x), ref(x), rtol=0, atol=0)
        x = torch.rand(shape) * 3
        y, y_ref = compiled(x), ref(x)
        (y.sum() + net[1].v.sum()).backward()
        (y_ref.sum() + ref[1].v.sum()).backward()
        torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
        for p, q in zip(net.parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad)
        functional.detach_net(net)
        functional.detach_net(ref)
    torch._dynamo.reset()


def test_membrane_copy_op():
    from pypaper.snn import _registration
    v = torch.randn(3, 4)
    for requires_grad in (False, True):
        torch.library.opcheck(_registration.membrane_copy,
                              (v.clone().requires_grad_(requires_grad),))
    with torch.inference_mode():
        inf = torch.randn(3, 4)
    out = _registration.membrane_copy(inf)
    assert not out.is_inference() and torch.equal(out, inf)


def test_first_lif_call_compiled_does_not_recompile_on_the_second(monkeypatch):
    """The process's first LIF call compiled: the trace read ops.backend_for's empty per-device
    cache and filled it, so its guard (the cache has no entry for cpu) failed on the next call:
    one extra graph per process, per neuron frame under net.compile()."""
    from torch._dynamo.utils import counters

    from pypaper.snn import ops

    monkeypatch.setattr(ops, "_DEFAULTS", {})
    torch._dynamo.reset()
    counters.clear()
    net = nn.Sequential(nn.Linear(4, 6), neuron.LIFNode(step_mode="m"))
    f = torch.compile(net, backend="eager", fullgraph=True)
    x = torch.randn(3, 2, 4)
    try:
        for _ in range(3):
            functional.reset_net(net)
            f(x)
        assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    finally:
        torch._dynamo.reset()
