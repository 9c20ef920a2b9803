"""pypaper.snn.layer against SpikingJelly's activation_based.layer (installed) and against its own
definition (step mode 'm' == step mode 's' applied to every step): constructor signatures and
positional step_mode, state_dict names, outputs and gradients, rank checks, Dropout's mask held
over time, the containers and set_step_mode's rule for them, and a SpikingJelly convolutional
SNN (its tutorial's CSNN) run with pypaper's imports only."""
import inspect

import pytest
import torch
from torch import nn

from pypaper.snn import functional, layer, neuron, surrogate

# (class name, constructor args, input [T, N, ...]) for the stateless wrappers
CASES = [
    ("Linear", (6, 4), (3, 2, 6)),
    ("Flatten", (), (3, 2, 2, 3, 4)),
    ("Conv1d", (2, 3, 3), (3, 2, 2, 9)),
    ("Conv2d", (2, 3, 3), (3, 2, 2, 6, 5)),
    ("Conv3d", (2, 3, 2), (2, 2, 2, 3, 4, 4)),
    ("ConvTranspose1d", (2, 3, 3), (3, 2, 2, 5)),
    ("ConvTranspose2d", (2, 3, 2, 2), (3, 2, 2, 4, 3)),
    ("ConvTranspose3d", (2, 1, 2), (2, 2, 2, 2, 3, 2)),
    ("BatchNorm1d", (4,), (3, 5, 4)),
    ("BatchNorm2d", (2,), (3, 4, 2, 3, 3)),
    ("BatchNorm3d", (2,), (2, 3, 2, 2, 3, 2)),
    ("GroupNorm", (2, 4), (3, 2, 4, 5)),
    ("MaxPool1d", (2,), (3, 2, 2, 8)),
    ("MaxPool2d", (2,), (3, 2, 2, 6, 4)),
    ("MaxPool3d", (2,), (2, 2, 1, 4, 4, 2)),
    ("AvgPool1d", (2,), (3, 2, 2, 8)),
    ("AvgPool2d", (2,), (3, 2, 2, 6, 4)),
    ("AvgPool3d", (2,), (2, 2, 1, 4, 4, 2)),
    ("AdaptiveAvgPool1d", (3,), (3, 2, 2, 7)),
    ("AdaptiveAvgPool2d", ((2, 3),), (3, 2, 2, 5, 7)),
    ("AdaptiveAvgPool3d", (2,), (2, 2, 1, 4, 3, 5)),
    ("Upsample", (None, 2.0), (3, 2, 2, 3, 4)),
    ("VotingLayer", (3,), (3, 2, 12)),
]
IDS = [c[0] for c in CASES]


def _run(m, x, step_mode):
    """Output and input gradient of m on x [T, N, ...], in step mode 'm' or step by step."""
    m.step_mode = step_mode
    xx = x.clone().requires_grad_()
    y = m(xx) if step_mode == "m" else torch.stack([m(xt) for xt in xx])
    (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    return y.detach(), xx.grad


@pytest.mark.parametrize("name,args,shape", CASES, ids=IDS)
def test_multi_step_is_every_step_at_once(name, args, shape):
    torch.manual_seed(0)
    m = getattr(layer, name)(*args)
    x = torch.randn(shape)
    if name.startswith("BatchNorm"):  # 'm' normalises over T * N: compare in eval mode
        m.eval()
    y_m, g_m = _run(m, x, "m")
    y_s, g_s = _run(m, x, "s")
    assert y_m.shape[:2] == x.shape[:2]
    torch.testing.assert_close(y_m, y_s)
    torch.testing.assert_close(g_m, g_s)


@pytest.mark.parametrize("name,args,shape", CASES, ids=IDS)
def test_matches_spikingjelly(name, args, shape):
    sj_layer = pytest.importorskip("spikingjelly.activation_based.layer")
    torch.manual_seed(0)
    ours = getattr(layer, name)(*args, step_mode="m")
    theirs = getattr(sj_layer, name)(*args, step_mode="m")
    theirs.load_state_dict(ours.state_dict())  # the same names: a SpikingJelly checkpoint loads
    assert list(ours.state_dict()) == list(theirs.state_dict())
    x = torch.randn(shape)
    for m in (ours, theirs):  # BatchNorm in training mode: statistics over T * N, both
        m.train()
    (y, g), (y_sj, g_sj) = (_run(m, x, "m") for m in (ours, theirs))
    torch.testing.assert_close(y, y_sj, rtol=0, atol=0)
    torch.testing.assert_close(g, g_sj, rtol=0, atol=0)
    for a, b in zip(ours.buffers(), theirs.buffers()):  # running statistics updated alike
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_subclass_with_its_own_init_keeps_its_signature():
    """Every layer declares torch's signature plus step_mode; a user's subclass with an __init__
    of its own showed that one too (config tools that read signatures build it wrongly)."""
    class MyConv(layer.Conv2d):
        def __init__(self, c, step_mode="s"):
            super().__init__(c, c, 3, padding=1, step_mode=step_mode)

    class Plain(layer.Conv2d):
        pass

    assert list(inspect.signature(MyConv).parameters) == ["c", "step_mode"]
    assert inspect.signature(Plain) == inspect.signature(layer.Conv2d)
    assert "in_channels" in inspect.signature(layer.Conv2d).parameters
    assert MyConv(2, step_mode="m")(torch.randn(3, 1, 2, 4, 4)).shape == (3, 1, 2, 4, 4)


def test_constructor_arguments_match_spikingjelly():
    """SpikingJelly's wrappers take torch's arguments, then step_mode, in that order: ours
    declare the same signature (names, order, defaults), and built from SpikingJelly's whole
    positional argument list (step_mode 'm' last) they are the same layer (same repr)."""
    sj_layer = pytest.importorskip("spikingjelly.activation_based.layer")
    args_of = {name: args for name, args, _ in CASES}
    args_of.update(Dropout=(), Dropout2d=())
    checked = 0
    for name in layer._OWN_NAMES:
        if name == "StepModule" or not hasattr(sj_layer, name):
            continue
        theirs = inspect.signature(getattr(sj_layer, name)).parameters
        ours = inspect.signature(getattr(layer, name)).parameters
        positional = [n for n, p in ours.items()
                      if p.kind in (p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
        assert positional == list(theirs), name
        for arg in theirs:
            assert ours[arg].default == theirs[arg].default, (name, arg)
        if name not in args_of:
            continue  # the containers: checked in test_containers
        given = args_of[name]
        rest = [p.default for p in list(theirs.values())[len(given):-1]]
        full = (*given, *rest, "m")
        a, b = getattr(layer, name)(*full), getattr(sj_layer, name)(*full)
        assert a.step_mode == b.step_mode == "m", name
        if isinstance(a, layer._SeqToANN):  # torch's repr of the arguments, plus step_mode
            ra, rb = (repr(m).replace(" ", "").replace(",step_mode=m", "") for m in (a, b))
            assert ra == rb, (name, repr(a), repr(b))
        else:
            for attr in ("p", "voting_size"):
                assert getattr(a, attr, None) == getattr(b, attr, None), (name, attr)
        checked += 1
    assert checked == len(CASES) + 2


def test_positional_step_mode_and_extra_positionals():
    assert layer.Linear(3, 4, True, "m").step_mode == "m"
    assert layer.Conv2d(1, 2, 3, 1, 0, 1, 1, True, "zeros", "m").step_mode == "m"
    assert layer.MaxPool2d(2, 2, 0, 1, False, False, "m").step_mode == "m"
    assert layer.Flatten(1, -1, "m").step_mode == "m"
    with pytest.raises(TypeError, match="takes at most 4 positional arguments"):
        layer.Linear(3, 4, True, "m", "extra")
    lin = layer.Linear(3, 4, device="cpu", dtype=torch.float64, step_mode="m")  # torch's keywords
    assert lin.weight.dtype == torch.float64


def test_bad_step_mode_and_rank_raise_clear_errors():
    with pytest.raises(ValueError, match="step_mode must be one of"):
        layer.Conv2d(1, 2, 3, step_mode="x")
    conv = layer.Conv2d(1, 2, 3, step_mode="m")
    with pytest.raises(ValueError, match=r"expects x of shape \[T, N, C, H, W\], got shape"):
        conv(torch.randn(2, 1, 5, 5))
    bn = layer.BatchNorm1d(3, step_mode="m")
    with pytest.raises(ValueError, match=r"\[T, N, C\] or \[T, N, C, L\]"):
        bn(torch.randn(2, 3))
    v = layer.VotingLayer(4)(torch.arange(12.0).view(2, 6))  # leftovers dropped, as in SJ
    assert torch.equal(v, torch.tensor([[1.5], [7.5]]))
    with pytest.raises(ValueError, match="x_seq must be a tensor"):
        layer.Flatten(step_mode="m")(torch.randn(5))


def test_seq_to_ann_forward_takes_tuples_as_spikingjelly_does():
    x = torch.randn(3, 2, 1, 4, 4)
    pooled, idx = functional.seq_to_ann_forward(x, nn.MaxPool2d(2, return_indices=True))
    assert pooled.shape == idx.shape == (3, 2, 1, 2, 2)
    y = functional.seq_to_ann_forward((pooled, idx), [nn.MaxUnpool2d(2), nn.Flatten()])
    assert y.shape == (3, 2, 16)
    want = torch.stack([nn.MaxUnpool2d(2)(p, i).flatten(1) for p, i in zip(pooled, idx)])
    assert torch.equal(y, want)
    sj = pytest.importorskip("spikingjelly.activation_based.functional")
    assert torch.equal(sj.seq_to_ann_forward((pooled, idx), [nn.MaxUnpool2d(2), nn.Flatten()]), y)
    with pytest.raises(ValueError, match="must share their"):
        functional.seq_to_ann_forward((pooled, idx[:2]), nn.MaxUnpool2d(2))


def test_dropout_mask_is_state_not_a_buffer():
    """The mask appears at the first step: as a buffer it would change the buffer list between
    copies of a model (AveragedModel(use_buffers=True), DDP) and land in state_dicts."""
    net = nn.Sequential(layer.Linear(4, 4), layer.Dropout(0.5), layer.BatchNorm1d(4))
    avg = torch.optim.swa_utils.AveragedModel(net, use_buffers=True)
    net(torch.randn(2, 4))
    assert net[1].mask is not None and "1.mask" not in dict(net.named_buffers())
    avg.update_parameters(net)
    net.double()
    assert net[1].mask.dtype == torch.float64  # follows .to() like a neuron's membrane
    assert list(net.state_dict()) == list(avg.module.state_dict())


def test_dropout_mask_is_held_over_time_until_reset():
    torch.manual_seed(0)
    d = layer.Dropout(0.5)
    x = torch.ones(4, 64)
    y0, y1 = d(x), d(x)  # two steps of one sequence: one mask
    assert torch.equal(y0, y1) and set(y0.unique().tolist()) == {0.0, 2.0}
    d.reset()
    assert not torch.equal(d(x), y0)  # a new sequence draws a new mask
    d.step_mode = "m"
    functional.reset_net(d)
    y = d(torch.ones(5, 4, 64))
    assert all(torch.equal(y[t], y[0]) for t in range(5))
    assert "mask" not in d.state_dict()
    d.eval()
    assert torch.equal(d(torch.ones(5, 4, 64)), torch.ones(5, 4, 64))
    d2 = layer.Dropout2d(0.5, step_mode="m").train()
    y = d2(torch.ones(3, 2, 8, 4, 4))
    per_channel = y.flatten(3)
    assert torch.equal(per_channel.amax(-1), per_channel.amin(-1))  # whole channels dropped
    with pytest.raises(ValueError, match=r"p must be a number in \[0, 1\)"):
        layer.Dropout(1.0)
    assert layer.Dropout(torch.tensor(0.25)).p == 0.25 and layer.VotingLayer(torch.tensor(3).item()).voting_size == 3


@pytest.mark.parametrize("name,p", [("Dropout", 0.5), ("Dropout2d", 0.2)])
def test_dropout_draws_what_spikingjelly_draws(name, p):
    sj_layer = pytest.importorskip("spikingjelly.activation_based.layer")
    x = torch.randn(3, 4, 5, 6, 6)
    outs = []
    for m in (getattr(layer, name)(step_mode="m"), getattr(sj_layer, name)(step_mode="m")):
        assert m.p == p
        torch.manual_seed(3)
        outs.append(m(x))
    assert torch.equal(outs[0], outs[1])


def test_containers():
    x = torch.randn(4, 3, 2, 6, 6)
    conv = nn.Conv2d(2, 3, 3)
    seq = layer.SeqToANNContainer(conv, nn.BatchNorm2d(3).eval())
    want = torch.stack([seq[1](conv(xt)) for xt in x])
    torch.testing.assert_close(seq(x), want)
    lif = neuron.LIFNode()
    ms = layer.MultiStepContainer(nn.Flatten(), lif)
    y = ms(x)
    functional.reset_net(ms)
    ref = neuron.LIFNode(step_mode="m")(x.flatten(2))
    assert torch.equal(y, ref)
    smc = layer.StepModeContainer(False, "m", nn.Flatten())
    assert smc(x).shape == (4, 3, 72)
    smc_stateful = layer.StepModeContainer(True, "m", neuron.LIFNode())
    assert torch.equal(smc_stateful(x), neuron.LIFNode(step_mode="m")(x))
    # set_step_mode sets the containers, never their children
    net = nn.Sequential(seq, ms, smc, neuron.LIFNode())
    functional.set_step_mode(net, "m")
    assert lif.step_mode == "s" and net[3].step_mode == "m" and smc.step_mode == "m"
    # A SeqToANNContainer runs sequences only: set_step_mode(net, 's') leaves it in 'm' (as
    # SpikingJelly's rule skips its containers), a direct assignment refuses.
    functional.set_step_mode(net, "s")
    assert seq.step_mode == "m" and ms.step_mode == "m" and net[3].step_mode == "s"
    with pytest.raises(ValueError, match="step_mode must be 'm'"):
        seq.step_mode = "s"
    with pytest.raises(ValueError, match="inside SeqToANNContainer must have step_mode 's'"):
        layer.SeqToANNContainer(layer.Conv2d(2, 3, 3, step_mode="m"))


def test_containers_match_spikingjelly():
    sj_layer = pytest.importorskip("spikingjelly.activation_based.layer")
    x = torch.randn(4, 3, 2, 6, 6)
    torch.manual_seed(0)
    ours = layer.SeqToANNContainer(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3))
    theirs = sj_layer.SeqToANNContainer(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3))
    theirs.load_state_dict(ours.state_dict())
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)
    ours = layer.MultiStepContainer(nn.Flatten(), neuron.LIFNode())
    theirs = sj_layer.MultiStepContainer(nn.Flatten(), neuron.LIFNode())
    assert torch.equal(ours(x), theirs(x))


def _csnn(neuron_mod, layer_mod, surrogate_mod, channels=8):
    """SpikingJelly's convolutional SNN tutorial model (conv_fashion_mnist's CSNN), shrunk to
    8x8 digits: written once, built from either library's modules."""
    torch.manual_seed(0)
    c = channels
    net = nn.Sequential(
        layer_mod.Conv2d(1, c, kernel_size=3, padding=1, bias=False),
        layer_mod.BatchNorm2d(c),
        neuron_mod.IFNode(surrogate_function=surrogate_mod.ATan()),
        layer_mod.MaxPool2d(2, 2),                                     # 4x4
        layer_mod.Conv2d(c, c, kernel_size=3, padding=1, bias=False),
        layer_mod.BatchNorm2d(c),
        neuron_mod.IFNode(surrogate_function=surrogate_mod.ATan()),
        layer_mod.MaxPool2d(2, 2),                                     # 2x2
        layer_mod.Flatten(),
        layer_mod.Dropout(0.2),
        layer_mod.Linear(c * 2 * 2, 32, bias=False),
        neuron_mod.LIFNode(tau=2.0, surrogate_function=surrogate_mod.ATan()),
        layer_mod.Linear(32, 10, bias=False),
        neuron_mod.IFNode(surrogate_function=surrogate_mod.ATan()),
    )
    return net


def test_spikingjelly_csnn_with_pypaper_imports_computes_the_same():
    """The model code unchanged, SpikingJelly's imports swapped for pypaper's: the same
    state_dict loads, spikes equal and gradients agree, in training mode (BatchNorm over T * N,
    Dropout's mask from the same seed)."""
    pytest.importorskip("spikingjelly.activation_based.layer")
    from spikingjelly.activation_based import functional as sj_functional
    from spikingjelly.activation_based import layer as sj_layer
    from spikingjelly.activation_based import neuron as sj_neuron
    from spikingjelly.activation_based import surrogate as sj_surrogate

    ours = _csnn(neuron, layer, surrogate)
    with torch.no_grad():  # larger weights than at init: every spiking layer fires
        for m in ours:
            if isinstance(m, nn.Linear):
                m.weight.mul_(6)
    theirs = _csnn(sj_neuron, sj_layer, sj_surrogate)
    theirs.load_state_dict(ours.state_dict())
    functional.set_step_mode(ours, "m")
    sj_functional.set_step_mode(theirs, "m")
    x = torch.rand(4, 16, 1, 8, 8) * 3  # [T, N, C, H, W]
    outs = []
    for m in (ours, theirs):
        torch.manual_seed(7)
        y = m(x)
        (y.mean(0) * torch.linspace(-1, 1, 10)).sum().backward()
        outs.append((y.detach(), [p.grad for p in m.parameters()]))
    assert 0.05 < float(outs[0][0].mean()) < 0.95
    assert torch.equal(outs[0][0], outs[1][0])
    for a, b in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_csnn_trains_on_digits():
    """The same model, pypaper only, learns scikit-learn's 8x8 digits (held-out split) with
    BPTT through the fused IF / LIF kernels: T = 4, direct encoding, firing-rate MSE (the
    tutorial's loss)."""
    datasets = pytest.importorskip("sklearn.datasets")
    d = datasets.load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    xtr, ytr, xte, yte = x[perm[:1400]], y[perm[:1400]], x[perm[1400:]], y[perm[1400:]]
    net = _csnn(neuron, layer, surrogate, channels=16)
    functional.set_step_mode(net, "m")
    opt = torch.optim.Adam(net.parameters(), lr=5e-3)
    gen = torch.Generator().manual_seed(1)
    T = 4
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(6):
            net.train()
            order = torch.randperm(len(ytr), generator=gen)
            for i in range(0, len(ytr), 64):
                idx = order[i:i + 64]
                functional.reset_net(net)
                rate = net(xtr[idx].expand(T, *xtr[idx].shape) * 2).mean(0)
                loss = nn.functional.mse_loss(rate, nn.functional.one_hot(ytr[idx], 10).float())
                opt.zero_grad()
                loss.backward()
                opt.step()
        net.eval()
        functional.reset_net(net)
        with torch.no_grad():
            pred = net(xte.expand(T, *xte.shape) * 2).mean(0).argmax(1)
    finally:
        torch.set_num_threads(n_threads)
    acc = float((pred == yte).float().mean())
    print(f"CSNN held-out accuracy {acc:.3f}")
    assert acc >= 0.9, acc


def test_csnn_under_torch_compile_fullgraph():
    """The CSNN (conv, BatchNorm, IF and LIF neurons, Dropout with its held mask) compiled whole:
    one graph, the same spikes and gradients as eager. The compiled graph draws its dropout mask
    from its own generator, so eager reruns with the mask the compiled step left in the layer."""
    net = _csnn(neuron, layer, surrogate)
    with torch.no_grad():
        for m in net:
            if isinstance(m, nn.Linear):
                m.weight.mul_(6)
    functional.set_step_mode(net, "m")
    x = torch.rand(4, 8, 1, 8, 8) * 3
    dropout = net[9]

    def step(x):
        functional.reset_net(net)
        return net(x).mean(0)

    def eager_with_that_mask(x):
        for m in net.modules():
            if isinstance(m, neuron.BaseNode):
                m.reset()
        return net(x).mean(0)

    outs = []
    for fn in (torch.compile(step, fullgraph=True), eager_with_that_mask):
        y = fn(x)
        (y * torch.linspace(-1, 1, 10)).sum().backward()
        outs.append((y.detach(), [p.grad.clone() for p in net.parameters()]))
        net.zero_grad()
        with torch.no_grad():  # BatchNorm's running statistics moved: undo for the rerun
            for m in net:
                if isinstance(m, nn.BatchNorm2d):
                    m.reset_running_stats()
    mask = dropout.mask
    assert mask is not None and mask.shape == (8, 32)  # [N, features] after Flatten
    assert set(mask.unique().tolist()) <= {0.0, 1.25} and 0 < float((mask == 0).float().mean()) < 1
    assert float(outs[1][0].sum()) > 0
    torch.testing.assert_close(outs[0][0], outs[1][0])
    for a, b in zip(outs[0][1], outs[1][1]):  # inductor sums BatchNorm's backward in its order
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
