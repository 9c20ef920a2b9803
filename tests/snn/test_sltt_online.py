"""The online SLTT helper: its accumulated gradients equal SLTT's definition written out in plain
autograd (a time loop whose charge reads the membrane detached), for SLTT and SLTT-K."""
import copy

import pytest
import torch

import pypaper
from pypaper.snn import neuron, sltt, surrogate

T, N, D, H, C = 6, 5, 10, 16, 4


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(D, H),
        neuron.ParametricLIFNode(init_tau=1.8, surrogate_function=surrogate.ATan()),
        torch.nn.Linear(H, C),
        neuron.LIFNode(tau=1.5, v_reset=None, decay_input=False,
                       surrogate_function=surrogate.PiecewiseQuadratic()))


def _definition(model, x, y, steps):
    """SLTT by hand: per step, H = V.detach() decayed + input; loss summed over `steps`, / T."""
    lin1, plif, lin2, lif = model
    k1 = plif.w.sigmoid()
    v1 = torch.zeros(N, H)
    v2 = torch.zeros(N, C)
    sg1 = surrogate.ATan()
    sg2 = surrogate.PiecewiseQuadratic()
    loss = 0
    for t in range(T):
        a = lin1(x[t])
        h1 = v1.detach() + (a - v1.detach()) * k1  # hard reset at 0: V_reset = 0
        s1 = sg1(h1 - 1.0)
        v1 = s1 * 0.0 + (1 - s1) * h1
        b = lin2(s1)
        h2 = v2.detach() - v2.detach() / 1.5 + b  # decay_input=False, soft reset
        s2 = sg2(h2 - 1.0)
        v2 = h2 - s2 * 1.0
        if t in steps:
            loss = loss + torch.nn.functional.cross_entropy(s2, y) / T
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("k", [None, 3])
def test_online_gradients_equal_the_definition(k):
    x = torch.randn(T, N, D) * 2
    y = torch.randint(0, C, (N,))
    model = _model()
    twin = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(5)
    res = sltt.train_step_online(model, x, y, torch.nn.functional.cross_entropy, k=k,
                                 generator=gen)
    steps = list(range(T)) if k is None else res.trained_steps
    assert len(steps) == (T if k is None else k)
    want = _definition(twin, x, y, set(steps))
    for p, w in zip(model.parameters(), want):
        assert torch.allclose(p.grad, w, rtol=1e-5, atol=1e-6)
    assert any(float(w.abs().sum()) > 0 for w in want)
    # neurons restored to their modes, reset, and SLTT off again
    assert all(m.step_mode == "s" and not m.sltt and m.v == m.rest_value
               for m in model if isinstance(m, neuron.BaseNode))
    assert res.output.shape == (N, C) and res.loss > 0


@pytest.mark.parametrize("k", [None, 3])
def test_online_input_gradients_equal_the_definition(k):
    """Input gradients (a leaf x_seq that requires grad; each step backpropagates into its own
    row, not through x_seq[t]) and a static input expanded over time (a non-leaf x_seq): both
    equal the definition's, and add to a gradient already there."""
    x = torch.randn(T, N, D) * 2
    y = torch.randint(0, C, (N,))
    model = _model()
    twin = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(5)
    xl = x.clone().requires_grad_()
    xl.grad = torch.ones_like(x)
    # one accumulation into the [T, ...] leaf, not one per step (each a whole zero-filled
    # gradient); its hooks run as autograd runs them
    accumulated, hooked = [], []
    xl.register_post_accumulate_grad_hook(lambda t: accumulated.append(1))
    xl.register_hook(lambda g: hooked.append(g.shape))
    res = sltt.train_step_online(model, xl, y, torch.nn.functional.cross_entropy, k=k,
                                 generator=gen)
    assert len(accumulated) == 1 and hooked == [x.shape]
    xd = x.clone().requires_grad_()
    _definition(twin, xd, y, set(res.trained_steps))
    assert xd.grad.abs().sum() > 0
    torch.testing.assert_close(xl.grad, xd.grad + 1, rtol=1e-5, atol=1e-6)
    if k is not None:  # untrained steps get no gradient
        skipped = [t for t in range(T) if t not in res.trained_steps]
        assert torch.equal(xl.grad[skipped], torch.ones_like(x[skipped]))

    x0 = x[0].clone().requires_grad_()
    model, twin = _model(), _model()
    sltt.train_step_online(model, x0.expand(T, N, D), y, torch.nn.functional.cross_entropy)
    x0d = x[0].clone().requires_grad_()
    _definition(twin, x0d.expand(T, N, D), y, set(range(T)))
    torch.testing.assert_close(x0.grad, x0d.grad, rtol=1e-5, atol=1e-6)


def test_multi_step_sltt_equals_online():
    """The fused kernel with sltt=True over the whole sequence gives the online gradients."""
    x = torch.randn(T, N, D) * 2
    y = torch.randint(0, C, (N,))
    model = _model()
    twin = copy.deepcopy(model)
    sltt.train_step_online(model, x, y, torch.nn.functional.cross_entropy)
    pypaper.snn.set_step_mode(twin, "m")
    for m in twin:
        if isinstance(m, neuron.BaseNode):
            m.sltt = True
    out = twin(x)
    loss = sum(torch.nn.functional.cross_entropy(out[t], y) for t in range(T)) / T
    loss.backward()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-6)


def test_sltt_k_is_reproducible_with_a_generator():
    x = torch.randn(T, N, D)
    y = torch.randint(0, C, (N,))
    runs = []
    for seed in (3, 3, 4):
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        r = sltt.train_step_online(model, x, y, torch.nn.functional.cross_entropy, opt, k=2,
                                   generator=torch.Generator().manual_seed(seed))
        runs.append((r.trained_steps, [p.detach().clone() for p in model.parameters()]))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    assert len(set(runs[2][0])) == 2


class _RunningSum(torch.nn.Module):
    """State outside the neurons: each step sees the sum of the inputs so far, so a later step's
    backward reaches earlier rows of x_seq."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.lin = torch.nn.Linear(D, C)
        self.lif = neuron.LIFNode(surrogate_function=surrogate.ATan())
        self.acc = None

    def forward(self, x):
        self.acc = x if self.acc is None else self.acc + x
        return self.lif(self.lin(self.acc))

    def reset(self):
        self.acc = None


def test_online_input_gradient_reaches_earlier_steps_through_model_state():
    """A later step's backward that reaches an earlier row (here through a running sum the model
    keeps) lands in x_seq's gradient: the helper's gradient equals one backward of the summed
    per-step losses through one graph over all steps (SLTT neurons, 's' mode), for a leaf x_seq
    and for a view of one (a non-leaf)."""
    x = torch.randn(4, N, D)
    y = torch.randint(0, C, (N,))
    ce = torch.nn.functional.cross_entropy

    def run(view):
        model = _RunningSum()
        leaf = x.clone().requires_grad_()
        sltt.train_step_online(model, leaf[:] if view else leaf, y, ce)
        return leaf.grad

    model = _RunningSum()
    model.lif.sltt = True
    leaf = x.clone().requires_grad_()
    sum(ce(model(leaf[t]), y) for t in range(4)).div(4).backward()
    want = leaf.grad
    assert want[0].abs().sum() > 0
    for view in (False, True):
        torch.testing.assert_close(run(view), want)


def test_online_input_gradient_through_an_encoder():
    """x_seq an encoder's output (a non-leaf whose graph saved tensors): one backward through the
    encoder after the loop, with the steps' summed row gradients; through x_seq[t] the first
    step's backward freed the encoder's graph and the second raised autograd's error."""
    x = torch.randn(T, N, 7)
    y = torch.randint(0, C, (N,))
    ce = torch.nn.functional.cross_entropy
    torch.manual_seed(2)
    enc = torch.nn.Linear(7, D)
    enc_twin = copy.deepcopy(enc)
    model, twin = _model(), _model()
    calls = []
    enc.weight.register_hook(lambda g: calls.append(1))
    sltt.train_step_online(model, enc(x), y, ce)
    assert len(calls) == 1  # the encoder's backward ran once, not once per step
    _definition(twin, enc_twin(x), y, set(range(T)))
    assert enc_twin.weight.grad.abs().sum() > 0
    torch.testing.assert_close(enc.weight.grad, enc_twin.weight.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(enc.bias.grad, enc_twin.bias.grad, rtol=1e-5, atol=1e-6)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)


def test_an_empty_sequence_is_refused_before_anything_runs():
    """T = 0 ran optimizer.step() on zero gradients and then failed on out_sum / T (a TypeError
    about None); now refused first, the parameters untouched."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), neuron.LIFNode())
    opt = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9, weight_decay=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="no time steps"):
        sltt.train_step_online(model, torch.zeros(0, 2, 4), torch.zeros(2, dtype=torch.long),
                               torch.nn.functional.cross_entropy, opt)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


@pytest.mark.parametrize("container", ["pypaper", "spikingjelly"])
@pytest.mark.parametrize("kind", ["MultiStepContainer", "SeqToANNContainer"])
def test_containers_that_run_only_on_sequences_are_refused(container, kind):
    """Stepped one [N, *] step at a time, a multi-step-only container read the batch dim as time
    (a MultiStepContainer's neurons shared one membrane across the batch, silently)."""
    if container == "pypaper":
        from pypaper.snn import layer
    else:
        layer = pytest.importorskip("spikingjelly.activation_based.layer")
    wrapped = neuron.LIFNode() if kind == "MultiStepContainer" else torch.nn.Linear(H, H)
    model = torch.nn.Sequential(torch.nn.Linear(D, H), getattr(layer, kind)(wrapped),
                                neuron.LIFNode(), torch.nn.Linear(H, C))
    x, y = torch.randn(T, N, D), torch.randint(0, C, (N,))
    with pytest.raises(ValueError, match=rf"\b1 \({kind}\) runs only on \[T, N, \*\] sequences"):
        sltt.train_step_online(model, x, y, torch.nn.functional.cross_entropy)
    assert all(p.grad is None for p in model.parameters())


class _Readout(torch.nn.Module):
    """A membrane readout: the output layer never fires, the loss reads its .v."""

    def __init__(self, node):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.n1, self.fc2 = torch.nn.Linear(D, H), node(), torch.nn.Linear(H, C)
        self.out = node(v_threshold=1e4)

    def forward(self, x):
        self.out(self.fc2(self.n1(self.fc1(x))))
        return self.out.v


def test_a_loss_on_the_membrane_trains_online_as_spikingjellys_sltt_node():
    """sltt=True keeps the stored membrane attached (SpikingJelly's SLTTLIFNode does): a loss
    on .v backpropagated into the layers; with it detached train_step_online raised."""
    online = pytest.importorskip("spikingjelly.activation_based.neuron.online_learning")
    x, y = torch.randn(T, N, D), torch.randint(0, C, (N,))
    ours = _Readout(neuron.LIFNode)
    r = sltt.train_step_online(ours, x, y, torch.nn.functional.cross_entropy)
    theirs = _Readout(lambda **kw: online.SLTTLIFNode(**kw))
    loss = 0.0
    for t in range(T):
        step = torch.nn.functional.cross_entropy(theirs(x[t]), y) / T
        step.backward()
        loss += float(step.detach())
    assert r.loss == pytest.approx(loss, rel=1e-5)
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert float(ours.fc1.weight.grad.abs().sum()) > 0


def test_spikingjelly_stateful_modules_are_detached_between_steps():
    """A SpikingJelly neuron beside pypaper's (one convert() left, a QIFNode): its state held the
    previous step's freed graph, and the second step's backward raised. Detached after each step,
    it trains as a per-step loop that detaches it does."""
    sj = pytest.importorskip("spikingjelly.activation_based.neuron")

    def build():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(D, H), neuron.LIFNode(),
                                   torch.nn.Linear(H, H), sj.QIFNode(), torch.nn.Linear(H, C))

    x, y = torch.randn(T, N, D), torch.randint(0, C, (N,))
    model = build()
    sltt.train_step_online(model, x, y, torch.nn.functional.cross_entropy)
    manual = build()
    manual[1].sltt = True
    for t in range(T):
        (torch.nn.functional.cross_entropy(manual(x[t]), y) / T).backward()
        manual[3].detach()
    for (name, a), b in zip(model.named_parameters(), manual.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    assert float(model[0].weight.grad.abs().sum()) > 0
