"""Review of the online SLTT helper (sltt.train_step_online) and functional.checkpoint, driven as a
demanding user would (session 32). Each test is a scenario that was wrong before its fix:
the expectation is by definition (a hand-written per-step SLTT loop, or the argument rules the
docstring states)."""
import copy

import pytest
import torch
from torch import nn

import pypaper
from pypaper import _ext
from pypaper.snn import neuron, sltt, surrogate

pytestmark = pytest.mark.skipif(not _ext.LOADED, reason="pypaper._C not built")

T, N, D, H, C = 4, 3, 5, 6, 3
ce = nn.functional.cross_entropy


class _TwoHeads(nn.Module):
    """One step -> (logits, {"rate": spikes of the hidden layer}): a model whose output is a tuple
    holding a dict (an auxiliary output, as a model returning (logits, aux) does)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.n1 = nn.Linear(D, H), neuron.LIFNode(surrogate_function=surrogate.ATan())
        self.fc2, self.n2 = nn.Linear(H, C), neuron.LIFNode(v_reset=None)

    def forward(self, x):
        s1 = self.n1(self.fc1(x))
        return self.n2(self.fc2(s1)), {"rate": s1}


def _two_head_loss(out, y):
    logits, aux = out
    return ce(logits, y) + 0.1 * aux["rate"].mean()


def test_a_model_returning_a_tuple_trains_online_as_the_per_step_definition():
    """The loss_fn receives the model's output as it is (here a tuple holding a dict); before,
    the helper called out.detach() and raised AttributeError: 'tuple' object has no attribute
    'detach'. Gradients equal SLTT's per-step loop (neurons sltt=True, loss_t / T backpropagated
    at each step); the returned output is the time mean of every tensor in the structure."""
    torch.manual_seed(1)
    x, y = torch.randn(T, N, D) * 2, torch.randint(0, C, (N,))
    model = _TwoHeads()
    twin = copy.deepcopy(model)
    res = sltt.train_step_online(model, x, y, _two_head_loss)

    twin.n1.sltt = twin.n2.sltt = True
    logits_sum, rate_sum, loss = 0, 0, 0.0
    for t in range(T):
        out = twin(x[t])
        step = _two_head_loss(out, y) / T
        step.backward()
        loss += float(step.detach())
        logits_sum = logits_sum + out[0].detach()
        rate_sum = rate_sum + out[1]["rate"].detach()
    assert float(twin.fc1.weight.grad.abs().sum()) > 0
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    assert res.loss == pytest.approx(loss, rel=1e-6)
    logits, aux = res.output
    torch.testing.assert_close(logits, logits_sum / T)
    torch.testing.assert_close(aux["rate"], rate_sum / T)


@pytest.mark.parametrize("bad", ["per_sample", "not_a_tensor"])
def test_a_loss_fn_that_does_not_return_a_scalar_is_refused_naming_it(bad):
    """A loss_fn with reduction='none' returned [N] losses: autograd raised 'grad can be implicitly
    created only for scalar outputs', naming neither loss_fn nor the shape; a float raised
    AttributeError on .backward. Now a ValueError / TypeError naming loss_fn, and no parameter
    moved (the optimizer's step is not taken)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, C), neuron.LIFNode())
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(T, N, D), torch.randint(0, C, (N,))
    if bad == "per_sample":
        with pytest.raises(ValueError, match=r"loss_fn must return a scalar.*shape \(3,\)"):
            sltt.train_step_online(model, x, y, lambda o, t: ce(o, t, reduction="none"), opt)
    else:
        with pytest.raises(TypeError, match="loss_fn must return a tensor.*float"):
            sltt.train_step_online(model, x, y, lambda o, t: 1.0, opt)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert model[1].step_mode == "s" and not model[1].sltt  # restored after the error


@pytest.mark.parametrize("step_shape", [(N, D), (N, 2, D)])
def test_a_delayed_linear_is_refused_before_anything_runs(step_shape):
    """DelayedLinear's output at step t reads its inputs up to max_delay - 1 steps back, so it
    needs the whole [T, N, C] sequence. Stepped online it got one step: a [N, C] step raised its
    own 'x must have shape [T, N, C_in]', which does not say why; a [N, L, C] step (a token axis)
    was read as a sequence over the batch: the delays mixed different samples and the helper
    trained on that without a word. Now refused up front, naming the layer."""
    torch.manual_seed(0)
    feats = 1
    for d in step_shape[1:-1]:
        feats *= d
    model = nn.Sequential(pypaper.snn.DelayedLinear(D, H, max_delay=3), neuron.LIFNode(),
                          nn.Flatten(), nn.Linear(feats * H, C))
    x, y = torch.randn(T, *step_shape), torch.randint(0, C, (N,))
    with pytest.raises(ValueError, match=r"0 \(DelayedLinear\).*past time steps"):
        sltt.train_step_online(model, x, y, ce)
    assert all(p.grad is None for p in model.parameters())


def test_spikingjelly_modules_that_run_only_on_sequences_are_refused():
    """SpikingJelly 2.0 marks its sequence-only modules by supported_step_mode() == ('m',) (base.
    MultiStepModule: PSN, TemporalWiseAttention, the threshold-dependent BatchNorms,
    TemporalBinSum, ...); the helper matched only four container names. PSN (H = W X over the
    time axis, W [T, T]) has no step_mode to switch and, with a batch of T samples, mixed the
    samples of one step as if they were time steps, silently; the others raised SpikingJelly's
    'step_mode can only be ('m',)'. Now all are refused with the helper's message."""
    sn = pytest.importorskip("spikingjelly.activation_based.neuron")
    sl = pytest.importorskip("spikingjelly.activation_based.layer")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, H), sn.PSN(T=N), nn.Linear(H, C), neuron.LIFNode())
    x, y = torch.randn(T, N, D), torch.randint(0, C, (N,))
    with pytest.raises(ValueError, match=r"1 \(PSN\) runs only on \[T, N, \*\] sequences"):
        sltt.train_step_online(model, x, y, ce)
    assert all(p.grad is None for p in model.parameters())
    model = nn.Sequential(sl.TemporalWiseAttention(T=T, reduction=1, dimension=2),
                          nn.Linear(D, C), neuron.LIFNode())
    with pytest.raises(ValueError, match=r"0 \(TemporalWiseAttention\) runs only on"):
        sltt.train_step_online(model, torch.randn(T, N, D), y, ce)


def test_a_spikingjelly_sliding_psn_has_its_queue_detached_between_steps():
    """SpikingJelly's SlidingPSN (single-step mode) keeps its last k inputs in a list memory,
    which SpikingJelly's detach() leaves alone (it detaches tensor memories only): the second
    step's backward went through the first step's freed graph and raised autograd's 'backward
    through the graph a second time'. The helper now detaches the tensors in list memories too,
    dropping the temporal path as SLTT drops the neurons': the gradients of a per-step loop that
    detaches the queue after each step."""
    sn = pytest.importorskip("spikingjelly.activation_based.neuron")

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(D, H), sn.SlidingPSN(k=2), nn.Linear(H, C),
                             neuron.LIFNode())

    x, y = torch.randn(T, N, D) * 2, torch.randint(0, C, (N,))
    model = build()
    sltt.train_step_online(model, x, y, ce)
    manual = build()
    manual[3].sltt = True
    for t in range(T):
        (ce(manual(x[t]), y) / T).backward()
        manual[1].queue = [q.detach() for q in manual[1].queue]
    assert float(manual[0].weight.grad.abs().sum()) > 0
    for (name, a), b in zip(model.named_parameters(), manual.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


# ---- functional.checkpoint ----------------------------------------------------------------------

def _nested_block():
    """A neuron one level down (a block of blocks, as a model of stages is built)."""
    from pypaper.snn import layer

    torch.manual_seed(0)
    return nn.Sequential(
        nn.Sequential(layer.Linear(H, H, step_mode="m"), neuron.LIFNode(step_mode="m")),
        layer.Linear(H, H, step_mode="m"), neuron.LIFNode(step_mode="m", v_reset=None))


@pytest.mark.parametrize("given", ["module", "list_of_it"])
def test_checkpoint_modules_given_as_a_module_covers_its_submodules(given):
    """modules= names the modules whose state the block moves; given the block itself
    (modules=block, or [block]), list(modules) took a Sequential's direct children (or the block
    alone) and missed the neuron nested one level down: its recompute started from the membrane
    the later calls had left, and the gradients were silently wrong (here every call starts from
    a carried membrane, so the saved tensors keep their metadata and torch does not notice).
    Each module given now counts with its submodules."""
    from pypaper.snn import functional

    def grads(how):
        block = _nested_block()
        functional.reset_net(block)
        torch.manual_seed(1)
        xs = [(torch.randn(T, N, H) * 2).requires_grad_() for _ in range(3)]
        with torch.no_grad():
            block(xs[0])  # every call below starts from a carried membrane
        outs = [how(block, x) for x in xs[1:]]
        loss = sum((o * torch.linspace(-1, 1, o.numel()).reshape(o.shape)).sum() for o in outs)
        return torch.autograd.grad(loss, xs[1:] + list(block.parameters()))

    want = grads(lambda b, x: b(x))
    assert float(want[0].abs().sum()) > 0
    got = grads(lambda b, x: functional.checkpoint(
        lambda z: b(z), x, modules=b if given == "module" else [b]))
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name,value", [("tau", 3.0), ("v_threshold", 0.7), ("v_reset", -0.2)])
def test_checkpoint_recomputes_with_the_neuron_configuration_of_the_forward(name, value):
    """A schedule that sets a neuron's tau / v_threshold / v_reset (floats that may change
    between calls) between a checkpointed forward and its backward: the plain op's backward
    keeps the forward's values, the recompute read the new ones, so the gradients were silently
    wrong (tau, v_threshold) or torch raised a CheckpointError (v_reset: the op saves other
    tensors). They are recorded with the state now, as DelayedLinear's sigma is; the neuron
    keeps the new value after the backward."""
    from pypaper.snn import functional, layer

    def grads(checkpointed):
        torch.manual_seed(0)
        block = nn.Sequential(layer.Linear(H, H, step_mode="m"),
                              neuron.LIFNode(tau=2.0, step_mode="m"),
                              layer.Linear(H, H, step_mode="m"),
                              neuron.ParametricLIFNode(step_mode="m"))
        torch.manual_seed(1)
        x = (torch.randn(T, N, H) * 2).requires_grad_()
        y = functional.checkpoint(block, x) if checkpointed else block(x)
        setattr(block[1], name, value)
        loss = (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum()
        got = torch.autograd.grad(loss, [x] + list(block.parameters()))
        assert getattr(block[1], name) == value
        return got

    want, got = grads(False), grads(True)
    assert float(want[0].abs().sum()) > 0
    for a, b in zip(got, want):
        assert torch.equal(a, b)
