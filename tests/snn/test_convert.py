"""pypaper.snn.convert / revert on models built with SpikingJelly's neurons: SpikingJelly's own
model zoo (parametric_lif_net's PLIF network, Spikformer with its default LIF neurons) gives the
same outputs and trains the same after the swap, with the optimizer built before it; the carried
state, reset value, hooks (and their handles), learnable thresholds and module sharing go over;
SpikingJelly's reset_net resets the new neurons; neurons holding state pypaper's would drop stay
SpikingJelly's; revert gives SpikingJelly's neurons back with the converted ones' state. SpikingJelly's model package imports h5py
(requirements/dev.txt)."""
import copy
import warnings

import pytest
import torch
from torch import nn

import pypaper.snn as ps
from pypaper import _ext
from pypaper.snn import neuron as pn

pytest.importorskip("spikingjelly.activation_based")
pytest.importorskip("h5py")
from spikingjelly.activation_based import functional as sf  # noqa: E402
from spikingjelly.activation_based import neuron as sn  # noqa: E402
from spikingjelly.activation_based import surrogate as ss  # noqa: E402
from spikingjelly.activation_based.model import parametric_lif_net, spikformer  # noqa: E402

pytestmark = pytest.mark.skipif(not _ext.LOADED, reason="pypaper._C not built")

_SJ = (sn.IFNode, sn.LIFNode, sn.ParametricLIFNode, sn.SimpleIFNode, sn.SimpleLIFNode)


def _kinds(model):
    """(SpikingJelly neurons of the converted classes, pypaper neurons) in model."""
    mods = list(model.modules())
    return (sum(type(m) in _SJ for m in mods), sum(pn._is_own(m) for m in mods))


def test_plif_network_of_the_model_zoo_trains_the_same():
    """parametric_lif_net.MNISTNet (Conv-BN-PLIF x2, Linear-PLIF x2, VotingLayer) with ATan and
    detach_reset, multi-step: 5 Adam steps with the optimizer built before convert give the same
    losses and the same trained time constants as the SpikingJelly twin."""
    torch.manual_seed(0)
    net = parametric_lif_net.MNISTNet(channels=4, spiking_neuron=sn.ParametricLIFNode,
                                      surrogate_function=ss.ATan(), detach_reset=True)
    sf.set_step_mode(net, "m")
    with torch.no_grad():  # at channels=4 the linear layers' default init never reaches v_th
        net.conv_fc[10].weight.mul_(8.0)
        net.conv_fc[13].weight.mul_(8.0)
    twin = copy.deepcopy(net)
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (net, twin)]
    keys = list(twin.state_dict())
    assert ps.convert(twin) is twin
    assert _kinds(net) == (4, 0) and _kinds(twin) == (0, 4)
    assert list(twin.state_dict()) == keys  # a checkpoint loads either way
    x = torch.rand(4, 8, 1, 28, 28) * 3
    y = torch.randint(0, 10, (8,))
    losses = {0: [], 1: []}
    for step in range(5):
        for i, (m, opt) in enumerate(zip((net, twin), opts)):
            torch.manual_seed(step)  # the same dropout masks
            loss = nn.functional.cross_entropy(m(x).mean(0), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sf.reset_net(m)
            losses[i].append(loss.item())
    assert len(set(round(v, 4) for v in losses[0])) > 1, "the network never fired: no test"
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    w_sj = {n: p for n, p in net.named_parameters() if n.endswith(".w")}
    w_pp = dict(twin.named_parameters())
    assert len(w_sj) == 4 and any(float(p.detach()) != 0.0 for p in w_sj.values())  # w trained
    for name, w in w_sj.items():
        torch.testing.assert_close(w_pp[name], w, rtol=1e-4, atol=1e-6)


def test_spikformer_with_its_default_neurons():
    """Spikformer builds its own LIF neurons (thresholds 1 and 0.5, detach_reset): all 11 are
    swapped; outputs equal SpikingJelly's and the gradients of every parameter agree."""
    torch.manual_seed(0)
    net = spikformer.Spikformer(T=2, img_size_h=16, img_size_w=16, patch_size=4,
                                num_classes=5, embed_dims=32, num_heads=2, depths=1)
    twin = copy.deepcopy(net)
    ps.convert(twin)
    assert _kinds(twin) == (0, _kinds(net)[0]) and _kinds(net)[0] >= 8
    x = torch.rand(3, 3, 16, 16)
    outs = []
    for m in (net, twin):
        out = m(x)
        out.sum().backward()
        sf.reset_net(m)
        outs.append(out)
    assert outs[0].abs().sum() > 0
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    for (name, a), (_, b) in zip(net.named_parameters(), twin.named_parameters()):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("kind", ["LIFNode", "IFNode", "ParametricLIFNode", "SimpleLIFNode",
                                  "SimpleIFNode"])
def test_converted_mid_sequence_goes_on_from_the_carried_state(kind):
    """Three single steps with SpikingJelly's neuron, then convert, then three more: the spikes
    and membranes are the twin's that was never converted, v_seq goes over, and the gradient
    flows back through the carried membrane across the swap."""
    make = {"SimpleLIFNode": lambda: sn.SimpleLIFNode(tau=3.0, decay_input=False, v_reset=0.2),
            "SimpleIFNode": lambda: sn.SimpleIFNode(v_threshold=0.8),
            "LIFNode": lambda: sn.LIFNode(tau=3.0, v_reset=None, store_v_seq=True,
                                          surrogate_function=ss.Erf()),
            "IFNode": lambda: sn.IFNode(detach_reset=True, store_v_seq=True),
            "ParametricLIFNode": lambda: sn.ParametricLIFNode(init_tau=4.0, store_v_seq=True)}
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(5, 6), make[kind]())
    twin = copy.deepcopy(net)
    xs = torch.randn(6, 4, 5) * 2
    outs = {0: [], 1: []}
    for t, x in enumerate(xs):
        if t == 3:
            torch.testing.assert_close(twin[1].v, net[1].v, rtol=0, atol=0)
            ps.convert(twin)
            assert pn._is_own(twin[1]) and twin[1].step_mode == "s"
        outs[0].append(net(x))
        outs[1].append(twin(x))
        torch.testing.assert_close(outs[1][-1], outs[0][-1], rtol=0, atol=1e-6)
        torch.testing.assert_close(twin[1].v, net[1].v, rtol=1e-6, atol=1e-6)
    if getattr(net[1], "store_v_seq", False):
        torch.testing.assert_close(twin[1].v_seq, net[1].v_seq, rtol=1e-6, atol=1e-6)
        assert twin[1].v_seq.shape[0] == 6
    for i, m in enumerate((net, twin)):
        (torch.stack(outs[i]) * torch.linspace(-1, 1, 6)[:, None, None]).sum().backward()
    assert net[0].weight.grad.abs().sum() > 0
    torch.testing.assert_close(twin[0].weight.grad, net[0].weight.grad, rtol=1e-5, atol=1e-6)


def test_reset_value_train_mode_sltt_and_hooks_go_over():
    node = sn.LIFNode(tau=2.5, decay_input=False, v_threshold=1.5, v_reset=-0.5,
                      step_mode="m")
    node.set_reset_value("v", 0.25)
    node.eval()
    calls = []
    node.register_forward_hook(lambda m, i, o: calls.append(float(o.sum())))
    net = nn.Sequential(node)
    ps.convert(net, sltt=True)
    new = net[0]
    assert type(new) is pn.LIFNode and new.sltt and not new.training
    assert (new.tau, new.decay_input, new.v_threshold, new.v_reset) == (2.5, False, 1.5, -0.5)
    assert new.surrogate_function is node.surrogate_function
    new.reset()
    assert new.v == 0.25
    out = net(torch.full((2, 3), 2.0))
    assert calls == [float(out.sum())] and out.sum() > 0


def test_one_neuron_under_two_names_stays_one_and_the_filter_and_subclasses_are_respected():
    class MyLIF(sn.LIFNode):
        pass

    shared = sn.LIFNode()
    net = nn.Sequential(nn.Linear(3, 3), shared, nn.Linear(3, 3), shared, MyLIF(),
                        sn.QIFNode(), sn.IFNode())
    # left with a warning (the README says so; until 2026-12-05 silently); filtered out: not said
    with pytest.warns(UserWarning, match=r"4 \(MyLIF\), 5 \(QIFNode\) left as SpikingJelly's"):
        ps.convert(net, filter_fn=lambda m, name: name != "6")
    assert isinstance(net[1], pn.LIFNode) and net[1] is net[3]
    assert type(net[4]) is MyLIF and type(net[5]) is sn.QIFNode and type(net[6]) is sn.IFNode


def test_revert_gives_spikingjellys_neurons_back_with_the_current_state():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(4, 5), sn.ParametricLIFNode(store_v_seq=True), nn.Linear(5, 2),
                        sn.IFNode())
    w = net[1].w
    ps.convert(net)
    ps.set_step_mode(net, "m")
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    net(torch.randn(3, 2, 4) * 3).sum().backward()
    opt.step()
    assert ps.revert(net) is net
    assert type(net[1]) is sn.ParametricLIFNode and type(net[3]) is sn.IFNode
    assert net[1].w is w and float(w.detach()) != 0.0
    assert net[1].step_mode == "m" and net[3].step_mode == "m"
    assert isinstance(net[1].v, torch.Tensor) and net[1].v.shape == (2, 5)
    assert net[1].v_seq.shape == (3, 2, 5)
    torch.testing.assert_close(net[1].v_seq[-1], net[1].v)
    assert _kinds(net) == (2, 0)
    net(torch.randn(3, 2, 4))  # SpikingJelly's neurons run on from the carried state


def test_a_neuron_as_the_whole_model_and_no_spikingjelly_neurons():
    node = sn.LIFNode(tau=4.0)
    new = ps.convert(node)
    assert type(new) is pn.LIFNode and new.tau == 4.0
    back = ps.revert(new)
    assert type(back) is sn.LIFNode and back.tau == 4.0
    plain = nn.Sequential(nn.Linear(2, 2), pn.LIFNode())
    assert ps.convert(plain) is plain and ps.revert(plain) is plain
    assert type(plain[1]) is pn.LIFNode


def test_a_configuration_pypaper_refuses_raises_naming_the_module_and_changes_nothing():
    net = nn.Sequential(sn.LIFNode(), nn.Sequential(sn.LIFNode(v_threshold=0.0, v_reset=0.0)))
    with pytest.raises(ValueError, match=r"1\.0 \(LIFNode\).*v_threshold"):
        ps.convert(net)
    assert _kinds(net) == (2, 0)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        ps.convert(lambda x: x)
    with pytest.raises(TypeError, match="sltt must be a bool"):
        ps.convert(net, sltt=1)


def test_a_reduced_precision_neuron_is_left_with_a_warning():
    node = sn.LIFNode()
    node._neuron_precision = ("bf16", "fp32", "fp32")  # what SpikingJelly's precision module sets
    net = nn.Sequential(node, sn.LIFNode())
    with pytest.warns(UserWarning, match=r"0 \(LIFNode\) is left as SpikingJelly's: .*precision"):
        ps.convert(net)
    assert net[0] is node and type(net[1]) is pn.LIFNode
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ps.convert(nn.Sequential(sn.LIFNode()))


def test_spikingjellys_reset_net_resets_the_new_neurons():
    """SpikingJelly 2.0's reset_net caches the modules it resets per model; after a reset_net
    before convert (a validation pass), and with the replaced neuron still referenced, it must
    reset pypaper's neurons: else the membrane leaks across batches and the second training
    step backpropagates through the first one's freed graph."""
    lif = sn.LIFNode(step_mode="m")
    net = nn.Sequential(nn.Linear(4, 4), lif)
    x = torch.randn(3, 2, 4) * 3
    with torch.no_grad():
        net(x)
    sf.reset_net(net)
    ps.convert(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(2):
        loss = net(x).sum() + net[0].weight.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sf.reset_net(net)
        assert net[1].v == 0.0
    ps.revert(net)
    net(x)
    sf.reset_net(net)
    assert type(net[1]) is sn.LIFNode and net[1].v == 0.0


def test_hook_handles_keep_removing_and_state_dict_pre_hooks_get_the_module_in_the_model():
    node = sn.LIFNode()
    net = nn.Sequential(node)
    calls, loaded = [], []
    handle = node.register_forward_hook(lambda m, i, o: calls.append(type(m).__module__))
    node.register_load_state_dict_pre_hook(lambda m, *a: loaded.append(m))
    ps.convert(net)
    net(torch.ones(2, 3) * 2)
    assert calls == ["pypaper.snn.neuron"]
    net.load_state_dict(net.state_dict())
    assert loaded == [net[0]]
    ps.revert(net)
    net.load_state_dict(net.state_dict())
    assert loaded[-1] is net[0] and type(net[0]) is sn.LIFNode
    handle.remove()
    net(torch.ones(2, 3) * 2)
    ps.convert(net)
    net(torch.ones(2, 3) * 2)
    assert calls == ["pypaper.snn.neuron"]


def test_a_learnable_threshold_goes_over_as_the_same_parameter():
    """A SimpleLIFNode (SpikingJelly's plain-PyTorch neuron) whose threshold was made a
    Parameter trains it; converted, it is pypaper's learnable threshold: the same Parameter,
    the same state_dict keys, the same gradients."""
    torch.manual_seed(3)
    node = sn.SimpleLIFNode(tau=2.0, decay_input=True, step_mode="m")
    node.v_threshold = nn.Parameter(torch.full((5,), 0.9))
    net = nn.Sequential(nn.Linear(4, 5), node)
    twin = copy.deepcopy(net)
    keys = list(twin.state_dict())
    ps.convert(twin)
    assert twin[1].v_threshold is twin.state_dict(keep_vars=True)["1.v_threshold"]
    assert list(twin.state_dict()) == keys and isinstance(twin[1], pn.LIFNode)
    x = torch.randn(6, 3, 4) * 2
    for m in (net, twin):
        (m(x) * torch.arange(6.0)[:, None, None]).sum().backward()
    assert net[1].v_threshold.grad.abs().sum() > 0
    torch.testing.assert_close(twin[1].v_threshold.grad, net[1].v_threshold.grad,
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(twin[0].weight.grad, net[0].weight.grad, rtol=1e-5, atol=1e-6)


def test_neurons_holding_what_pypapers_would_drop_stay_with_a_warning():
    a, b, c = sn.LIFNode(), sn.LIFNode(), sn.SimpleLIFNode(tau=2.0, decay_input=True)
    d = sn.SimpleLIFNode(tau=2.0, decay_input=True)
    a.gain = nn.Parameter(torch.ones(()))
    b.register_buffer("scale", torch.ones(3))
    c.tau = nn.Parameter(torch.tensor(2.0))
    d.tau = torch.full((3,), 3.0)  # a plain attribute: pypaper's would make it a buffer
    net = nn.Sequential(a, b, c, d, sn.LIFNode())
    keys = list(net.state_dict())
    with pytest.warns(UserWarning) as record:
        ps.convert(net)
    text = " | ".join(str(w.message) for w in record)
    assert all(f"{i} (" in text for i in range(4)) and "4 (" not in text
    assert "Parameter gain" in text and "buffer scale" in text and "Parameter tau" in text
    assert "tau is a tensor" in text
    assert (net[0], net[1], net[2], net[3]) == (a, b, c, d) and type(net[4]) is pn.LIFNode
    assert list(net.state_dict()) == keys


def test_a_one_neuron_state_reverted_detaches_as_spikingjellys():
    net = nn.Sequential(sn.LIFNode())
    ps.convert(net)
    net(torch.tensor(1.5, requires_grad=True))
    ps.revert(net)
    sf.detach_net(net)
    assert not net[0].v.requires_grad


def test_a_block_shared_at_every_level_is_walked_once():
    """convert / revert visit each parent once (a walk over every path would take 2^depth)."""
    block = nn.Sequential(nn.Linear(2, 2), sn.LIFNode())
    for _ in range(24):
        block = nn.Sequential(block, block)
    ps.convert(block)
    ps.revert(block)
    assert sum(type(m) is sn.LIFNode for m in block.modules()) == 1


def test_a_tensor_reset_value_and_an_int_threshold():
    node = sn.LIFNode(v_reset=None)
    node.v_threshold = 2
    node.set_reset_value("v", torch.tensor(0.25))
    new = ps.convert(node)
    assert new.v_threshold == 2.0 and new.v_reset is None and new.rest_value == 0.25


def test_a_plif_whose_w_broadcasts_over_the_features_converts():
    """SpikingJelly broadcasts a PLIF w of shape (C, 1, 1). Until 2026-12-07 pypaper's neuron took
    one value or one per feature position, so such a PLIF was left SpikingJelly's with a warning;
    now the op broadcasts it the same way: converted, with the same Parameter and the same
    spikes (gradients: tests/snn/test_broadcast_params.py)."""
    sj = pytest.importorskip("spikingjelly.activation_based.neuron")
    plif = sj.ParametricLIFNode(step_mode="m")
    plif.w = torch.nn.Parameter(torch.tensor([-0.5, 0.0, 1.0]).reshape(3, 1, 1))
    twin = copy.deepcopy(plif)
    model = torch.nn.Sequential(plif)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ps.convert(model)
    assert pn._is_own(model[0]) and model[0].w is plif.w
    x = torch.randn(2, 2, 3, 4, 4) + 0.7
    assert torch.equal(model(x), twin(x))
