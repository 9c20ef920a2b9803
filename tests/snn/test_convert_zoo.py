"""pypaper.snn.convert over SpikingJelly 2.0's whole model zoo (activation_based.model), built
offline at the smallest sizes its constructors take, with each neuron class they take
(IFNode / LIFNode / ParametricLIFNode, with a surrogate and detach_reset; and the model's own
paper neurons where it has defaults), multi-step and, where the model runs it, single-step.

Each case builds the model twice from one seed, converts one, and checks: every neuron's spikes
and the output equal to the bit; parameter gradients within fp32 rounding after one backward
(the fused kernel computes the surrogate's derivative and sums the reverse scan and PLIF's dL/dw in
another order than SpikingJelly's autograd graph); after an SGD step and reset_net (SpikingJelly's
and pypaper's), the second forward equal again; the converted model's state_dict loads strictly
into an unconverted build and back; revert gives back SpikingJelly's neurons of the original
classes with the trained values and their outputs. Neurons convert does not take (the zoo's OTTT
and SpikeDHS neurons, other neuron classes passed in) are left with a warning naming them.

The zoo's spiking_resnet / sew_resnet / spiking_vgg modules import torchvision only for
load_state_dict_from_url (pretrained weights); without torchvision they are imported with a stub
of that one function (which refuses), removed again right after. spiking_vgg's classifier is fixed
at 512*7*7 -> 4096 -> 4096 (120M parameters), SNASNet's and SpikeDHS's widths are fixed too: those
three are marked slow."""
import copy
import functools
import sys
import types
import warnings

import pytest
import torch

import pypaper.snn as ps
from pypaper import _ext
from pypaper.snn import neuron as pn

pytest.importorskip("spikingjelly.activation_based")
pytest.importorskip("h5py")
from spikingjelly.activation_based import functional as sf  # noqa: E402
from spikingjelly.activation_based import layer as sl  # noqa: E402
from spikingjelly.activation_based import neuron as sn  # noqa: E402
from spikingjelly.activation_based import surrogate as ss  # noqa: E402

pytestmark = pytest.mark.skipif(not _ext.LOADED, reason="pypaper._C not built")


def _import_zoo():
    """The zoo modules; those that import torchvision's load_state_dict_from_url get a stub of
    it when torchvision is absent (pretrained=False never calls it)."""
    names = ["torchvision", "torchvision.models", "torchvision.models.utils"]
    stubbed = False
    try:
        import torchvision  # noqa: F401
    except ImportError:
        tv, models, utils = (types.ModuleType(n) for n in names)

        def load_state_dict_from_url(*args, **kwargs):
            raise RuntimeError("no torchvision: pretrained weights are not available offline")

        utils.load_state_dict_from_url = load_state_dict_from_url
        tv.models, models.utils = models, utils
        sys.modules.update(zip(names, (tv, models, utils)))
        stubbed = True
    try:
        from spikingjelly.activation_based.model import (
            masnn, maxformer, ms_resnet, parametric_lif_net, qkformer, sew_resnet, snas_net,
            spike_dhs, spike_driven_transformer, spikformer, spiking_resnet, spiking_vgg,
            spiking_vggws_ottt)
    finally:
        if stubbed:
            for n in names:
                sys.modules.pop(n, None)
    return types.SimpleNamespace(**{m.__name__.rsplit(".", 1)[1]: m for m in (
        masnn, maxformer, ms_resnet, parametric_lif_net, qkformer, sew_resnet, snas_net,
        spike_dhs, spike_driven_transformer, spikformer, spiking_resnet, spiking_vgg,
        spiking_vggws_ottt)})


Z = _import_zoo()
T = 2
NEURONS = {"IF": sn.IFNode, "LIF": sn.LIFNode, "PLIF": sn.ParametricLIFNode}
_SJ = (sn.IFNode, sn.LIFNode, sn.ParametricLIFNode, sn.SimpleIFNode, sn.SimpleLIFNode)
# SpikingJelly's plain-PyTorch neurons, converted as well: on one model (each mode) only
SIMPLE = {"SimpleIF": sn.SimpleIFNode,
          "SimpleLIF": functools.partial(sn.SimpleLIFNode, tau=2.0, decay_input=True)}


def _img(*shape, scale=3.0):
    return lambda: torch.rand(*shape) * scale


# name -> (build(spiking_neuron or None, neuron kwargs), input, step modes, paper-default neurons)
# Inputs: [T, N, C, H, W] in 'm'; in 's' the same fed one step at a time. The models that repeat
# a static image or hold their own time loop take [N, C, H, W].
PLN = Z.parametric_lif_net
MODELS = {
    "plif_MNISTNet": (lambda n, kw: PLN.MNISTNet(channels=4, spiking_neuron=n, **kw),
                      _img(T, 2, 1, 28, 28), "ms", False),
    "plif_FashionMNISTNet": (lambda n, kw: PLN.FashionMNISTNet(channels=4, spiking_neuron=n,
                                                               **kw),
                             _img(T, 2, 1, 28, 28), "m", False),
    "plif_NMNISTNet": (lambda n, kw: PLN.NMNISTNet(channels=4, spiking_neuron=n, **kw),
                       _img(T, 2, 2, 34, 34), "ms", False),
    "plif_CIFAR10Net": (lambda n, kw: PLN.CIFAR10Net(channels=4, spiking_neuron=n, **kw),
                        _img(T, 2, 3, 32, 32), "ms", False),
    "plif_CIFAR10DVSNet": (lambda n, kw: PLN.CIFAR10DVSNet(channels=2, spiking_neuron=n, **kw),
                           _img(T, 1, 2, 128, 128), "m", False),
    "plif_DVSGestureNet": (lambda n, kw: PLN.DVSGestureNet(channels=2, spiking_neuron=n, **kw),
                           _img(T, 1, 2, 128, 128), "m", False),
    "spiking_resnet": (lambda n, kw: Z.spiking_resnet.SpikingResNet(
        Z.spiking_resnet.BasicBlock, [1, 1, 1, 1], num_classes=5, spiking_neuron=n, **kw),
        _img(T, 2, 3, 16, 16), "ms", False),
    "spiking_resnet_bottleneck": (lambda n, kw: Z.spiking_resnet.SpikingResNet(
        Z.spiking_resnet.Bottleneck, [1, 1, 1, 1], num_classes=5, width_per_group=16,
        spiking_neuron=n, **kw), _img(T, 2, 3, 16, 16), "m", False),
    "sew_resnet_ADD": (lambda n, kw: Z.sew_resnet.SEWResNet(
        Z.sew_resnet.BasicBlock, [1, 1, 1, 1], num_classes=5, cnf="ADD", spiking_neuron=n,
        **kw), _img(T, 2, 3, 16, 16), "ms", False),
    "sew_resnet_IAND_bottleneck": (lambda n, kw: Z.sew_resnet.SEWResNet(
        Z.sew_resnet.Bottleneck, [1, 1, 1, 1], num_classes=5, width_per_group=16, cnf="IAND",
        spiking_neuron=n, **kw), _img(T, 2, 3, 16, 16), "m", False),
    "ottt_vggws": (lambda n, kw: Z.spiking_vggws_ottt.OTTTSpikingVGG(
        cfg=[8, "M", 512, "M"], num_classes=5, spiking_neuron=n, **kw),
        _img(T, 2, 3, 16, 16), "s", False),
    "MSResNet": (lambda n, kw: Z.ms_resnet.MSResNet(
        T=T, num_classes=5, layers=(1, 1, 1), base_channels=8, spiking_neuron=n, **kw),
        _img(T, 2, 3, 16, 16), "m", True),
    "MaxResNet": (lambda n, kw: Z.ms_resnet.MaxResNet(
        T=T, num_classes=5, layers=(1, 1, 1), base_channels=8, spiking_neuron=n, **kw),
        _img(T, 2, 3, 16, 16), "m", True),
    "AttMSResNet": (lambda n, kw: Z.masnn.AttMSResNet(
        T=T, num_classes=5, layers=(1, 1, 1), base_channels=8, reduction_c=4,
        spiking_neuron=n, **kw), _img(T, 2, 3, 16, 16), "m", True),
    "MASNN": (lambda n, kw: Z.masnn.MASNN(
        T=4, num_classes=5, input_size=(16, 16), channels=(8, 8), pools=(1, 2), fc_hidden=16,
        reduction_t=2, reduction_c=4, spiking_neuron=n, **kw),
        _img(4, 2, 2, 16, 16, scale=6.0), "m", True),
    "MaxFormer": (lambda n, kw: Z.maxformer.MaxFormer(
        T=T, num_classes=5, embed_dims=64, depths=(1, 1, 1), mlp_ratio=2.0, spiking_neuron=n,
        **kw), _img(T, 1, 3, 32, 32), "m", True),
    "MaxFormer_cifar": (lambda n, kw: Z.maxformer.MaxFormer(
        T=T, num_classes=5, embed_dims=64, depths=(1, 1, 1), mlp_ratio=2.0, cifar=True,
        spiking_neuron=n, **kw), _img(T, 1, 3, 32, 32), "m", True),
    "QKFormer": (lambda n, kw: Z.qkformer.QKFormer(
        T=T, num_classes=5, embed_dims=32, num_heads=(1, 2, 2), depths=(1, 1, 1),
        mlp_ratio=2.0, spiking_neuron=n, **kw), _img(T, 1, 3, 32, 32), "m", True),
    "SpikeDrivenTransformer": (lambda n, kw: Z.spike_driven_transformer.SpikeDrivenTransformer(
        T=T, num_classes=5, embed_dims=32, num_heads=2, depths=1, mlp_ratio=2.0,
        spiking_neuron=n, **kw), _img(T, 1, 3, 32, 32), "m", True),
    "Spikformer": (lambda n, kw: Z.spikformer.Spikformer(
        T=T, img_size_h=16, img_size_w=16, patch_size=4, num_classes=5, embed_dims=32,
        num_heads=2, depths=1, spiking_neuron=n, **kw), _img(2, 3, 16, 16, scale=1.0), "m",
        True),
}


# Fixed widths (see the module docstring): name -> as in MODELS; mode "S" is a model that runs
# its own time loop over single-step neurons on an [N, C, H, W] input.
SNAS_CON = torch.tensor([[0, 2, 3, 2], [0, 0, 2, 3], [0, 0, 0, 2], [0, 0, 0, 0]])


def _snas(celltype):
    args = types.SimpleNamespace(timestep=2, second_avgpooling=2, dataset="cifar100",
                                 celltype=celltype, threshold=0.5, tau=4 / 3)
    return lambda n, kw: Z.snas_net.SNASNet(args, SNAS_CON)


SLOW_MODELS = {
    "spiking_vgg": (lambda n, kw: Z.spiking_vgg.SpikingVGG(
        cfg=[8, "M", 512, "M"], batch_norm=True, norm_layer=sl.BatchNorm2d,
        num_classes=5, spiking_neuron=n, **kw), _img(T, 2, 3, 16, 16), "ms", False),
    "SNASNet_forward": (_snas("forward"), _img(1, 3, 32, 32), "S", True),
    "SNASNet_backward": (_snas("backward"), _img(1, 3, 32, 32), "S", True),
}
ALL_MODELS = {**MODELS, **SLOW_MODELS}


_ANY_NODE = (sn.BaseNode, sn.SimpleBaseNode, pn.BaseNode)


def _nodes(model):
    """{name: neuron} for SpikingJelly's (its plain-PyTorch SimpleBaseNode ones too) and
    pypaper's neurons."""
    return {n: m for n, m in model.named_modules() if isinstance(m, _ANY_NODE)}


def _run(model, x, mode, seed):
    """The model's output (and every neuron's output, by name) for x, with a fixed seed for its
    dropout masks; single-step feeds x one step at a time."""
    spikes = {}
    handles = [m.register_forward_hook(
        lambda mod, i, o, n=n: spikes.setdefault(n, []).append(
            (o[0] if isinstance(o, (list, tuple)) else o).detach().clone()))  # OTTT: [s, trace]
        for n, m in _nodes(model).items()]
    try:
        torch.manual_seed(seed)
        if mode in "mS":
            out = model(x)
        else:
            out = torch.stack([model(x_t) for x_t in x])
    finally:
        for h in handles:
            h.remove()
    return out, {n: torch.cat(v) for n, v in spikes.items()}


def _same_spikes(a, b, what):
    assert a.keys() == b.keys(), what
    for n in a:
        torch.testing.assert_close(b[n], a[n], rtol=0, atol=0, msg=f"{what}: {n}")


def _build(name, neuron, kw, mode, seed=0):
    build = ALL_MODELS[name][0]
    torch.manual_seed(seed)
    model = build(neuron, dict(kw))
    sf.set_step_mode(model, mode.lower())
    return model


def _cases():
    for name, (_, _, modes, defaults) in ALL_MODELS.items():
        kinds = list(NEURONS) + (["default"] if defaults else [])
        if name == "plif_MNISTNet":
            kinds += list(SIMPLE)
        if name == "ottt_vggws":
            kinds = ["LIF"]  # its own OTTTLIFNode: test_neurons_convert_does_not_take_...
        if name.startswith("SNASNet"):
            kinds = ["default"]  # builds its own LIF neurons
        for kind in kinds:
            for mode in modes:
                marks = [pytest.mark.slow] if name in SLOW_MODELS else []
                yield pytest.param(name, kind, mode, id=f"{name}-{kind}-{mode}", marks=marks)


@pytest.mark.parametrize("name,kind,mode", list(_cases()))
def test_zoo_model_converted_runs_trains_resets_saves_and_reverts_like_spikingjelly(
        name, kind, mode):
    neuron = {**NEURONS, **SIMPLE}.get(kind)
    # MASNN's attention gates scale its currents down: a lower threshold makes it fire
    kw = {} if kind == "default" else dict(v_threshold=0.1 if name == "MASNN" else 0.5,
                                           surrogate_function=ss.ATan(), detach_reset=True)
    sj = _build(name, neuron, kw, mode)
    pp = _build(name, neuron, kw, mode)
    kinds = {n: type(m) for n, m in _nodes(pp).items()}
    assert kinds and all(c in _SJ for c in kinds.values()), kinds
    keys = list(pp.state_dict())
    # the optimizers are built before convert: the converted neurons must hold the model's own
    # Parameters (PLIF's w, a learnable threshold), or the step below would not reach them
    sgd = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (sj, pp)]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="snn.convert")
        assert ps.convert(pp) is pp
    assert {n: type(m) for n, m in _nodes(pp).items()}.keys() == kinds.keys()
    assert all(pn._is_own(m) for m in _nodes(pp).values())
    assert list(pp.state_dict()) == keys
    x = ALL_MODELS[name][1]()

    # 1. forward: every neuron's spikes and the output to the bit
    out_sj, spk_sj = _run(sj, x, mode, seed=1)
    out_pp, spk_pp = _run(pp, x, mode, seed=1)
    _same_spikes(spk_sj, spk_pp, "first forward")
    fired = sum(bool(s.any()) for s in spk_sj.values())
    assert fired >= (len(spk_sj) + 1) // 2, f"only {fired} of {len(spk_sj)} neurons fired"
    # nor fire at every step everywhere: spikes all 1 would agree whatever the dynamics
    saturated = [n for n, s in spk_sj.items() if bool((s == 1).all())]
    assert len(saturated) <= len(spk_sj) // 2, f"{saturated} fire at every neuron-step"
    assert all(bool(((s == 0) | (s == 1)).all()) for s in spk_pp.values())
    torch.testing.assert_close(out_pp, out_sj, rtol=0, atol=0)

    # 2. backward: the gradients of every parameter within fp32 rounding
    g = torch.randn_like(out_sj)
    (out_sj * g).sum().backward()
    (out_pp * g).sum().backward()
    # a bias before a training-mode BatchNorm has a true gradient of 0: both give rounding
    # noise there, so the absolute tolerance is scaled by the model's largest gradient
    scale = max(p.grad.abs().max().item() for p in sj.parameters() if p.grad is not None)
    assert scale > 0
    for (n, a), (_, b) in zip(sj.named_parameters(), pp.named_parameters()):
        if a.grad is None:
            assert b.grad is None or not b.grad.any(), n
            continue
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5 * scale, msg=n)

    # 3. an SGD step, reset_net (SpikingJelly's on the SpikingJelly model and, in turn, on the
    # converted one and pypaper's), and a second forward that agrees again
    for opt in sgd:
        opt.step()
        opt.zero_grad()
    # the step reached the converted model's parameters (the gradients' tolerance times lr)
    for (n, a), (_, b) in zip(sj.named_parameters(), pp.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6 * scale, msg=n)
    sf.reset_net(sj)
    sf.reset_net(pp)
    rest = {n: m.v for n, m in _nodes(pp).items()}
    assert all(isinstance(v, float) for v in rest.values()), rest
    out2_sj, spk2_sj = _run(sj, x, mode, seed=2)
    out2_pp, spk2_pp = _run(pp, x, mode, seed=2)
    _same_spikes(spk2_sj, spk2_pp, "after a step")
    torch.testing.assert_close(out2_pp, out2_sj, rtol=1e-5, atol=1e-5)
    ps.reset_net(pp)
    assert all(isinstance(m.v, float) for m in _nodes(pp).values())
    sf.reset_net(sj)

    # 4. the converted model's state_dict loads into an unconverted build, and back
    sj.eval()
    pp.eval()
    fresh = _build(name, neuron, kw, mode, seed=7)
    fresh.load_state_dict(pp.state_dict(), strict=True)
    fresh.eval()
    out_f, spk_f = _run(fresh, x, mode, seed=3)
    out_e, spk_e = _run(sj, x, mode, seed=3)
    _same_spikes(spk_e, spk_f, "SpikingJelly build loaded from the converted model")
    torch.testing.assert_close(out_f, out_e, rtol=1e-5, atol=1e-5)
    back = _build(name, neuron, kw, mode, seed=8)
    ps.convert(back)
    back.load_state_dict(sj.state_dict(), strict=True)
    back.eval()
    sf.reset_net(sj)
    out_b, spk_b = _run(back, x, mode, seed=3)
    _same_spikes(spk_e, spk_b, "converted build loaded from SpikingJelly's")
    torch.testing.assert_close(out_b, out_e, rtol=1e-5, atol=1e-5)

    # 5. revert: SpikingJelly's neurons of the original classes, with the trained values
    ps.reset_net(pp)
    trained = {n: p.detach().clone() for n, p in pp.named_parameters()}
    assert ps.revert(pp) is pp
    assert {n: type(m) for n, m in _nodes(pp).items()} == kinds
    for n, p in pp.named_parameters():
        torch.testing.assert_close(p, trained[n], rtol=0, atol=0, msg=n)
    sf.reset_net(sj)
    out_r, spk_r = _run(pp, x, mode, seed=3)
    out_e, spk_e = _run(sj, x, mode, seed=3)
    _same_spikes(spk_e, spk_r, "reverted")
    torch.testing.assert_close(out_r, out_e, rtol=1e-5, atol=1e-5)


class _MySimpleLIF(sn.SimpleLIFNode):
    """A user's subclass of SpikingJelly's plain-PyTorch LIF (a SimpleBaseNode, not a
    BaseNode)."""


# (model, spiking_neuron, its kwargs, step mode, names of the neurons the warning gives)
LEFT = {
    "ottt_vggws-OTTTLIFNode": ("ottt_vggws", sn.OTTTLIFNode, {}, "s",
                               ["features.1 (OTTTLIFNode)", "features.5 (OTTTLIFNode)"]),
    "MSResNet-KLIFNode": ("MSResNet", sn.KLIFNode, dict(v_threshold=0.5), "m",
                          ["layer1.0.spike1 (KLIFNode)", "head_lif (KLIFNode)"]),
    # not BaseNodes: convert said nothing about these (they were left silently)
    "MSResNet-SimpleLIF-subclass": ("MSResNet", _MySimpleLIF,
                                    dict(tau=2.0, decay_input=True, v_threshold=0.5), "m",
                                    ["layer1.0.spike1 (_MySimpleLIF)", "head_lif (_MySimpleLIF)"]),
    "plif_MNISTNet-PSN": ("plif_MNISTNet", sn.PSN, dict(T=T), "m",
                          ["conv_fc.2 (PSN)", "conv_fc.6 (PSN)"]),
    "spiking_resnet-DSRIFNode": ("spiking_resnet", sn.DSRIFNode, dict(T=T), "m",
                                 ["sn1 (DSRIFNode)"]),
}


@pytest.mark.parametrize("case", list(LEFT))
def test_neurons_convert_does_not_take_are_left_with_a_warning_naming_them(case):
    """Zoo models built with neurons pypaper has no kernel for: convert leaves every one as it
    is and says so, naming them (the first eight), and the model still computes what it did."""
    name, neuron, kw, mode, named = LEFT[case]
    sj = _build(name, neuron, kw, mode)
    pp = _build(name, neuron, kw, mode)
    before = [(n, id(m)) for n, m in pp.named_modules()]
    with pytest.warns(UserWarning, match="snn.convert") as record:
        assert ps.convert(pp) is pp
    said = " | ".join(str(w.message) for w in record if "snn.convert" in str(w.message))
    assert all(n in said for n in named), said
    assert "left as SpikingJelly's" in said
    assert [(n, id(m)) for n, m in pp.named_modules()] == before
    x = ALL_MODELS[name][1]()
    out_sj, spk_sj = _run(sj, x, mode, seed=1)
    out_pp, spk_pp = _run(pp, x, mode, seed=1)
    torch.testing.assert_close(out_pp, out_sj, rtol=0, atol=0)


@pytest.mark.slow
def test_spike_dhs_converts_its_lif_neurons_and_leaves_its_save_v_subclass_with_a_warning():
    """SpikeDHS (fixed widths: slow) builds LIFNodes with its own DSpike surrogate (pypaper's
    Python loop runs it) and save_v_LIFNode, a subclass that records the membrane before the
    spike: the first are converted, the second are left and named; outputs and gradients agree."""
    def build():
        torch.manual_seed(0)
        args = types.SimpleNamespace(fea_step=3, fea_num_layers=8, fea_block_multiplier=3,
                                     fea_filter_multiplier=48)
        model = Z.spike_dhs.SpikeDHS(init_channels=3, args=args)
        sf.set_step_mode(model, "m")
        return model

    sj, pp = build(), build()
    with pytest.warns(UserWarning, match=r"spike_m \(save_v_LIFNode\).* and \d+ more left"):
        ps.convert(pp)
    kinds = {type(m) for m in pp.modules() if isinstance(m, _ANY_NODE)}
    assert kinds == {pn.LIFNode, Z.spike_dhs.save_v_LIFNode}
    x = torch.rand(1, 3, 32, 32)
    outs = []
    for m in (sj, pp):
        torch.manual_seed(1)
        logits, aux = m(x)
        (logits.sum() + aux.sum()).backward()
        outs.append(logits)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    scale = max(p.grad.abs().max().item() for p in sj.parameters() if p.grad is not None)
    for (n, a), (_, b) in zip(sj.named_parameters(), pp.named_parameters()):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5 * scale, msg=n)


def test_torch_compile_of_a_converted_zoo_model():
    """torch.compile (inductor) of a converted MS-ResNet with PLIF neurons: the output and the
    parameter gradients, PLIF's w included, are the uncompiled SpikingJelly model's."""
    kw = dict(v_threshold=0.5, surrogate_function=ss.ATan(), detach_reset=True)
    sj = _build("MSResNet", sn.ParametricLIFNode, kw, "m")
    pp = _build("MSResNet", sn.ParametricLIFNode, kw, "m")
    ps.convert(pp)
    compiled = torch.compile(pp)
    x = MODELS["MSResNet"][1]()
    out_sj = sj(x)
    out_pp = compiled(x)
    torch.testing.assert_close(out_pp, out_sj, rtol=1e-5, atol=1e-5)
    out_sj.sum().backward()
    out_pp.sum().backward()
    scale = max(p.grad.abs().max().item() for p in sj.parameters() if p.grad is not None)
    ws = 0
    for (n, a), (_, b) in zip(sj.named_parameters(), pp.named_parameters()):
        if a.grad is not None:
            ws += n.endswith(".w")
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5 * scale, msg=n)
    assert ws == 7
    sf.reset_net(sj)
    sf.reset_net(pp)
    torch.testing.assert_close(compiled(x), sj(x), rtol=1e-5, atol=1e-5)
