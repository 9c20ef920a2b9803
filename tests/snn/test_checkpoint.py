"""functional.checkpoint: activation checkpointing of blocks with stateful neurons. The expectation
is by definition: the same calls without checkpointing give the same outputs, gradients and
final state, to the bit. torch.utils.checkpoint alone recomputes from the membrane the forward
left, and is checked to differ here, so each scenario is one that needs the restore."""
import pytest
import torch
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from pypaper import _ext
from pypaper.snn import functional, layer, neuron, surrogate

pytestmark = pytest.mark.skipif(not _ext.LOADED, reason="pypaper._C not built")

T, N, C = 5, 3, 6


def _block(neurons=neuron, step_mode="m"):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        layer.Linear(C, C, step_mode=step_mode),
        neurons.LIFNode(tau=2.0, surrogate_function=surrogate.ATan(), step_mode=step_mode),
        layer.Dropout(0.3, step_mode=step_mode),
        layer.Linear(C, C, step_mode=step_mode),
        neurons.ParametricLIFNode(v_reset=None, step_mode=step_mode, store_v_seq=True),
    )


def _state(block):
    return [m.v for m in block if hasattr(m, "v")] + [block[2].mask, block[4].v_seq]


def _run(block, calls, how, reset_between=False):
    """Sequences through the block, without reset in between (the second starts from the
    membrane the first left; dropout keeps its mask) or with one (a new mask), one loss over
    all; returns outputs, grads and final state."""
    torch.manual_seed(1)
    xs = [(torch.randn(T, N, C) * 1.5).requires_grad_() for _ in range(calls)]
    functional.reset_net(block)
    torch.manual_seed(2)  # dropout's masks
    outs = []
    for x in xs:
        if reset_between:
            functional.reset_net(block)
        outs.append(how(block, x))
    torch.manual_seed(3)
    loss = sum((o * torch.randn(o.shape)).sum() for o in outs) + block[4].v.sum()
    params = list(block.parameters())
    grads = torch.autograd.grad(loss, xs + params)
    return outs, grads, _state(block)


def _equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def _needs_the_restore(grads_of_torch_checkpoint, want):
    """torch.utils.checkpoint alone on the same scenario: its recompute starts from the membrane
    the forward left, and either saves other tensors than the forward did (a membrane where the
    forward had none: CheckpointError) or gives other gradients without a word."""
    try:
        got = grads_of_torch_checkpoint()
    except torch.utils.checkpoint.CheckpointError:
        return
    assert not _equal(got, want)


def test_torch_checkpoint_alone_is_silently_wrong_from_a_carried_membrane():
    """The silent case: the block's first call starts from a membrane already (a warm-up call)."""
    block = _block()

    def run(how):
        functional.reset_net(block)
        torch.manual_seed(1)
        with torch.no_grad():
            block(torch.randn(T, N, C))
        x = (torch.randn(T, N, C) * 1.5).requires_grad_()
        torch.manual_seed(2)
        return torch.autograd.grad(how(block, x).sum(), x)[0]

    want = run(_plain)
    assert torch.equal(run(_ours), want)
    assert not torch.equal(run(_torch_ck), want)


def _plain(block, x):
    return block(x)


def _torch_ck(block, x):
    return torch_checkpoint(block, x, use_reentrant=False)


def _ours(block, x):
    return functional.checkpoint(block, x)


@pytest.mark.parametrize("early_stop", [True, False])
@pytest.mark.parametrize("reset_between", [False, True])
@pytest.mark.parametrize("neurons", ["pypaper", "spikingjelly"])
def test_multi_step_block_called_twice(neurons, reset_between, early_stop):
    """early_stop=False: torch's recompute runs the whole block (it stops once it has every
    tensor it needs, by default, before the last neuron stores its v_seq), so v_seq must be
    restored too. reset_between: the membranes restart, the dropout draws a new mask."""
    mod = neuron
    if neurons == "spikingjelly":
        mod = pytest.importorskip("spikingjelly.activation_based.neuron")
    block = _block(mod)
    with torch.utils.checkpoint.set_checkpoint_early_stop(early_stop):
        want = _run(block, 2, _plain, reset_between)
        got = _run(block, 2, _ours, reset_between)
        assert _equal(got[0], want[0]) and _equal(got[1], want[1])
        assert _equal(got[2], want[2])
        _needs_the_restore(lambda: _run(block, 2, _torch_ck, reset_between)[1], want[1])


def test_single_step_loop_checkpointed_per_step():
    block = _block(step_mode="s")

    def loop(how):
        torch.manual_seed(1)
        x = (torch.randn(T, N, C) * 1.5).requires_grad_()
        functional.reset_net(block)
        torch.manual_seed(2)
        out = torch.stack([how(block, x[t]) for t in range(T)])
        torch.manual_seed(3)
        grads = torch.autograd.grad((out * torch.randn(out.shape)).sum(),
                                    [x] + list(block.parameters()))
        return out, grads, _state(block), block[4].v_seq

    want, got = loop(_plain), loop(_ours)
    assert torch.equal(got[0], want[0]) and _equal(got[1], want[1])
    assert _equal(got[2], want[2]) and torch.equal(got[3], want[3])
    _needs_the_restore(lambda: loop(_torch_ck)[1], want[1])


def test_state_after_backward_is_the_forwards():
    """The recompute (stopped early by torch once it has what it needs) leaves every membrane
    where the forward left it, also after later calls moved it on."""
    block = _block()
    functional.reset_net(block)
    x = (torch.randn(T, N, C) * 1.5).requires_grad_()
    y = functional.checkpoint(block, x)
    with torch.no_grad():
        block(x)  # the state moves on before the backward
    before = _state(block)
    y.sum().backward()
    assert _equal(_state(block), before) and all(a is b for a, b in zip(_state(block), before))


def test_a_function_with_modules():
    block = _block()
    want = _run(block, 2, _plain)
    got = _run(block, 2, lambda b, x: functional.checkpoint(lambda a: b(a) * 2.0, x,
                                                            modules=b.modules()) / 2.0)
    assert _equal(got[1], want[1])


def test_errors():
    block = _block()
    x = torch.randn(T, N, C)
    with pytest.raises(ValueError, match="use_reentrant=True"):
        functional.checkpoint(block, x, use_reentrant=True)
    with pytest.raises(ValueError, match="context_fn"):
        functional.checkpoint(block, x, context_fn=None)
    with pytest.raises(TypeError, match="pass modules="):
        functional.checkpoint(lambda a: block(a), x)


@pytest.mark.parametrize("sigma_after", [0.5, 0.0])
def test_delay_sigma_set_between_forward_and_backward(sigma_after):
    """DelayedLinear's backward keeps the forward's sigma (test_delays.py::
    test_sigma_set_between_forward_and_backward); under checkpoint the recompute reads the layer's
    sigma, so a schedule stepped before the backward gave the gradients of the new sigma (0.5:
    0.585 off in the weight gradient) or, where the new sigma picks another path (0: the integer
    gather), a CheckpointError. It is recorded as state since 2026-12-04."""
    from pypaper.snn import DelayedLinear

    torch.manual_seed(0)
    block = torch.nn.Sequential(DelayedLinear(4, 3, 21, sigma_init=1.0),
                                neuron.LIFNode(step_mode="m")).double()
    x = torch.randn(8, 2, 4, dtype=torch.float64)
    weights = torch.arange(8 * 2 * 3, dtype=torch.float64).reshape(8, 2, 3)

    def grads(checkpointed):
        block[0].set_sigma(1.0)
        functional.reset_net(block)
        block.zero_grad()
        y = functional.checkpoint(block, x) if checkpointed else block(x)
        block[0].set_sigma(sigma_after)
        (y * weights).sum().backward()
        return [p.grad.clone() for p in block[0].parameters()]

    plain, checkpointed = grads(False), grads(True)
    for a, b in zip(plain, checkpointed):
        assert torch.equal(a, b)
    assert block[0].sigma == sigma_after  # the backward leaves the layer's own sigma alone


def test_a_second_backward_recomputes_again():
    """retain_graph and a double backward recompute the block once more each: the same
    gradients as without checkpointing (torch's own checkpoint allows both)."""
    block = _block()
    torch.manual_seed(1)
    x = (torch.randn(T, N, C) * 1.5).requires_grad_()

    def grads(how):
        functional.reset_net(block)
        torch.manual_seed(2)
        y = (how(block, x) * torch.linspace(0.5, 1.5, C)).sum() + block[4].v.sum()
        first = torch.autograd.grad(y, x, retain_graph=True)[0]
        (g,) = torch.autograd.grad(y, x, create_graph=True)
        second = torch.autograd.grad((g * g).sum(), x, allow_unused=True)[0]
        return first, g, second, _state(block)

    want, got = grads(_plain), grads(_ours)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert (got[2] is None) == (want[2] is None)
    if want[2] is not None:
        assert torch.equal(got[2], want[2])
    assert _equal(got[3], want[3])


@pytest.mark.parametrize("momentum", [0.1, None])  # None: the cumulative average
def test_batch_norm_running_stats_count_the_forward_once(momentum):
    """A Conv-BN-LIF block checkpointed: the recompute ran BatchNorm in training mode again and
    updated its running statistics a second time (num_batches_tracked 2, not 1; eval outputs
    drifted). They now equal the plain run's, and the gradients too."""
    def block():
        torch.manual_seed(0)
        return torch.nn.Sequential(
            layer.Conv2d(2, 3, 3, padding=1, step_mode="m"),
            layer.BatchNorm2d(3, momentum=momentum, step_mode="m"),
            neuron.LIFNode(step_mode="m"))

    x = torch.randn(4, 2, 2, 5, 5)
    plain, ckpt = block(), block()
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    plain(xa).sum().backward()
    functional.checkpoint(ckpt, xb).sum().backward()
    for (name, a), b in zip(plain[1].named_buffers(), ckpt[1].buffers()):
        assert torch.equal(a, b), name
    assert int(ckpt[1].num_batches_tracked) == 1
    torch.testing.assert_close(xa.grad, xb.grad)
    for a, b in zip(plain.parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad)
