"""SpikingJelly's own example scripts (spikingjelly/activation_based/examples/), run twice: as
written, and with the import line switched to pypaper.snn, as a user switches it.

Each test execs the example's model code (its classes and helper functions, read from the
installed script; never its main(), which downloads data sets) once with SpikingJelly's neuron /
layer / surrogate / functional modules and once with pypaper's, loads one model's weights into
the other, and runs the script's training step on synthetic inputs of the script's shapes
(small batches): outputs and spikes equal to the bit, losses and every parameter's gradient to
fp32 rounding, the same weights after the optimizer step, the state reset_net leaves, and the
script's own extra calls (encoders, monitors, STDP learners, hooks, set_step_mode).

Also: every example's import line, switched (test_every_examples_import_line_switches).

Found by this review (2026-12, SpikingJelly 2.0's examples):
- The import line of lif_fc_mnist.py / ilc_san / noisy_san (``encoding``), spiking_dqn_state.py
  (``monitor``), plasticity/* (``learning``), the LSTM examples (``rnn``) raised ImportError
  once switched, and pypaper.snn.base had no MemoryModule (plasticity/stdp_mnist.py); now
  forwarded to SpikingJelly (pypaper/snn/spikingjelly_fallback.py).
- memopt/ (SpikingJelly's optimize_memory / checkpoint_module) recomputes pypaper's neurons from
  the wrong membrane: ``from pypaper.snn import memopt`` is refused with the reason, and
  test_spikingjelly_memopt_chunks_give_pypapers_neurons_wrong_gradients shows why.
- Not tested here, by design: under autocast (the scripts' -amp) pypaper's neurons integrate in
  fp32 where SpikingJelly's round V to fp16 / bf16 every step, so spikes can differ there.
- SpikingJelly's own train_flexsn_compile.py fails in SpikingJelly (FlexSN refuses its core,
  which captures the surrogate module), and ilc_san's "last-mem" decoder too; lava / lynxi /
  dsqn / the RL scripts' gym environments are not installed.
"""
import ast
import copy
import itertools
import math
import os
import types
import warnings
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pypaper.snn as psnn
from pypaper.snn import functional as pf
from pypaper.snn import layer as pl
from pypaper.snn import neuron as pn
from pypaper.snn import surrogate as ps

sja = pytest.importorskip("spikingjelly.activation_based")
from spikingjelly.activation_based import base as sb  # noqa: E402
from spikingjelly.activation_based import encoding, learning, monitor  # noqa: E402
from spikingjelly.activation_based import functional as sf  # noqa: E402
from spikingjelly.activation_based import layer as sl  # noqa: E402
from spikingjelly.activation_based import neuron as sn  # noqa: E402
from spikingjelly.activation_based import surrogate as ss  # noqa: E402

EXAMPLES = os.path.join(sja.__path__[0], "examples")
if not os.path.isdir(EXAMPLES):
    pytest.skip("spikingjelly's examples are not installed", allow_module_level=True)

SJ = dict(neuron=sn, layer=sl, surrogate=ss, functional=sf)
PP = dict(neuron=pn, layer=pl, surrogate=ps, functional=pf)


def _parse(filename: str) -> ast.Module:
    with open(filename, encoding="utf-8") as f, warnings.catch_warnings():
        warnings.simplefilter("ignore", SyntaxWarning)  # the scripts' docstrings' "\\ "
        warnings.simplefilter("ignore", DeprecationWarning)
        return ast.parse(f.read(), filename)


def load_example(path: str, modules: dict, skip=("main",), extra=None):
    """The example's top-level classes and functions (not ``skip``), executed with ``modules``
    as the names its import line binds."""
    filename = os.path.join(EXAMPLES, path)
    tree = _parse(filename)
    body = [n for n in tree.body
            if isinstance(n, (ast.ClassDef, ast.FunctionDef)) and n.name not in skip]
    scope = {"torch": torch, "nn": nn, "F": F, "math": math, "__name__": "example"}
    scope.update(modules)
    scope.update(extra or {})
    exec(compile(ast.Module(body=body, type_ignores=[]), filename, "exec"), scope)
    return types.SimpleNamespace(**scope)


def both(path, skip=("main",), extra=None, sj=None, pp=None):
    """The example loaded with SpikingJelly's modules and with pypaper's."""
    return (load_example(path, {**SJ, **(sj or {})}, skip, extra),
            load_example(path, {**PP, **(pp or {})}, skip, extra))


def grads(net):
    return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


def assert_same(want, got, what, exact=False, tol=2e-5):
    assert want.shape == got.shape and want.dtype == got.dtype, what
    want, got = want.detach(), got.detach()
    if exact:
        assert torch.equal(want, got), f"{what}: differs"
        return
    err = float((want.double() - got.double()).abs().max()) if want.numel() else 0.0
    scale = float(want.abs().max()) if want.numel() else 0.0
    assert err <= tol * (scale + 1e-3), f"{what}: max error {err:.3e}, scale {scale:.3e}"


def assert_same_grads(want, got):
    assert want.keys() == got.keys()
    for name in want:
        assert_same(want[name], got[name], f"grad of {name}")


def assert_same_state_dict(want, got, tol=2e-5):
    assert list(want.state_dict()) == list(got.state_dict())
    for (name, a), b in zip(want.state_dict().items(), got.state_dict().values()):
        assert_same(a, b, name, exact=not a.is_floating_point(), tol=tol)


def membranes(net):
    return [m.v for m in net.modules() if hasattr(m, "v")]


# ---- the import line ----------------------------------------------------------------------------

def _example_import_lines():
    """(script, names) of every `from spikingjelly.activation_based import ...` in the examples
    (``from .. import ...`` in examples/, ``from ... import`` one folder down, too)."""
    out = []
    for root, _, files in os.walk(EXAMPLES):
        depth = os.path.relpath(root, EXAMPLES).count(os.sep) + (root != EXAMPLES)
        for f in sorted(files):
            if not f.endswith(".py"):
                continue
            tree = _parse(os.path.join(root, f))
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and (
                        node.module == "spikingjelly.activation_based"
                        or (node.level == 2 + depth and node.module is None)):
                    out.append((os.path.relpath(os.path.join(root, f), EXAMPLES),
                                tuple(a.name for a in node.names)))
    return out


IMPORT_LINES = _example_import_lines()


@pytest.mark.parametrize("script,names", IMPORT_LINES,
                         ids=[f"{s}:{','.join(n)}" for s, n in IMPORT_LINES])
def test_every_examples_import_line_switches(script, names):
    """``from spikingjelly.activation_based import neuron, encoding, functional, surrogate,
    layer`` (lif_fc_mnist.py) raised ImportError once switched to pypaper.snn: pypaper.snn had
    no encoding (nor monitor, learning, rnn, model), and pypaper.snn.base no MemoryModule
    (plasticity/stdp_mnist.py subclasses it). SpikingJelly's modules pypaper has none of now
    come from SpikingJelly; memopt is refused with the reason (it cannot restore pypaper's
    neurons for its recompute: test_spikingjelly_memopt_is_refused_with_the_reason)."""
    assert names, script
    scope = {}
    if "memopt" in names:
        with pytest.raises(ImportError, match="functional.checkpoint"):
            exec(f"from pypaper.snn import {', '.join(names)}", scope)
        return
    exec(f"from pypaper.snn import {', '.join(names)}", scope)
    for name in names:
        own = name in ("neuron", "layer", "surrogate", "functional", "base")
        want = f"pypaper.snn.{name}" if own else f"spikingjelly.activation_based.{name}"
        assert scope[name].__name__ == want


def test_the_import_lines_were_found():
    scripts = {s for s, _ in IMPORT_LINES}
    assert {"lif_fc_mnist.py", "conv_fashion_mnist.py", "plasticity/stdp_mnist.py",
            "memopt/train.py", "spiking_dqn_state.py"} <= scripts
    assert ("lif_fc_mnist.py", ("neuron", "encoding", "functional", "surrogate", "layer")) \
        in IMPORT_LINES


def test_pypaper_base_forwards_spikingjellys_memory_module():
    assert psnn.base.MemoryModule is sb.MemoryModule
    assert psnn.base.extract_memories.__module__ == "pypaper.snn.base"
    names = psnn.base.__all__
    assert names[:len(psnn.base._OWN_NAMES)] == psnn.base._OWN_NAMES and "MemoryModule" in names
    # pypaper's own submodules stay pypaper's, imported or not
    scope = {}
    exec("from pypaper.snn import delays_reference, neuron, encoding", scope)
    assert scope["delays_reference"].__name__ == "pypaper.snn.delays_reference"
    assert scope["encoding"] is encoding
    with pytest.raises(ImportError):
        exec("from pypaper.snn import no_such_module", {})
    assert not hasattr(psnn, "no_such_module")


def test_without_spikingjelly_the_package_says_so(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec

    def missing(name, *args):
        if name.startswith("spikingjelly"):
            raise ModuleNotFoundError("No module named 'spikingjelly'")
        return find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", missing)
    assert not hasattr(psnn, "encoding")
    with pytest.raises(AttributeError, match="spikingjelly.activation_based .*failed to import"):
        psnn.encoding
    assert psnn.delays_reference.__name__ == "pypaper.snn.delays_reference"


# ---- conv_fashion_mnist.py: CSNN, set_step_mode 'm', SGD, MSE on the firing rate ---------------

def _csnn_pair(mods_b=None):
    a = load_example("conv_fashion_mnist.py", SJ)
    b = load_example("conv_fashion_mnist.py", mods_b or PP)
    torch.manual_seed(0)
    na, nb = a.CSNN(T=4, channels=8), b.CSNN(T=4, channels=8)
    with torch.no_grad():  # more drive: the output layer spikes
        for m in na.modules():
            if isinstance(m, nn.Linear):
                m.weight.mul_(4)
    nb.load_state_dict(na.state_dict())
    return na, nb


def _fmnist_step(net, opt, img, label, reset):
    opt.zero_grad()
    out_fr = net(img)
    loss = F.mse_loss(out_fr, F.one_hot(label, 10).float())
    loss.backward()
    g = grads(net)
    opt.step()
    reset(net)
    return out_fr, loss, g


def _assert_same_step(want, got, na, nb):
    """(firing rate, loss, gradients) of one training step of SpikingJelly's model na and of
    pypaper's nb: firing rates equal (and not all zero), loss and gradients to fp32 rounding,
    parameters and buffers after the step."""
    assert want[0].sum() > 0
    assert_same(want[0], got[0], "firing rate", exact=True)
    assert_same(want[1], got[1], "loss")
    assert_same_grads(want[2], got[2])
    assert_same_state_dict(na, nb)


def _assert_fmnist_steps_match(na, nb, oa, ob, img, label):
    _assert_same_step(_fmnist_step(na, oa, img, label, sf.reset_net),
                      _fmnist_step(nb, ob, img, label, pf.reset_net), na, nb)


def test_conv_fashion_mnist_trains_as_spikingjelly():
    na, nb = _csnn_pair()
    assert type(nb.conv_fc[2]) is pn.IFNode and nb.conv_fc[2].step_mode == "m"
    oa = torch.optim.SGD(na.parameters(), lr=0.1, momentum=0.9)
    ob = torch.optim.SGD(nb.parameters(), lr=0.1, momentum=0.9)
    torch.manual_seed(1)
    for _ in range(2):
        img, label = torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
        _assert_fmnist_steps_match(na, nb, oa, ob, img, label)
        assert membranes(nb) == membranes(na) == [0.0] * 4  # reset_net
    na.eval(), nb.eval()
    with torch.no_grad():
        img = torch.rand(3, 1, 28, 28)
        assert_same(na(img), nb(img), "eval firing rate", exact=True)
        # -save-es: the spiking encoder, a slice of the Sequential, reset on its own
        enc_a, enc_b = na.spiking_encoder(), nb.spiking_encoder()
        x_seq = img.unsqueeze(0).expand(4, -1, -1, -1, -1)
        assert_same(enc_a(x_seq), enc_b(x_seq), "encoder spikes", exact=True)
        sf.reset_net(enc_a), pf.reset_net(enc_b)
        assert membranes(enc_b) == [0.0]


@pytest.mark.parametrize("combo", list(itertools.product("sp", repeat=4))[1:],
                         ids=lambda c: "".join(c))
def test_conv_fashion_mnist_with_any_of_the_four_modules_switched(combo):
    """A user switching some of the four modules only (combo: neuron, layer, surrogate,
    functional, each s for SpikingJelly's or p for pypaper's)."""
    mods = {k: (SJ if c == "s" else PP)[k]
            for k, c in zip(("neuron", "layer", "surrogate", "functional"), combo)}
    na, nb = _csnn_pair(mods)
    torch.manual_seed(2)
    img, label = torch.rand(2, 1, 28, 28), torch.randint(0, 10, (2,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SpikingJelly's reset_net on modules not its own
        want = _fmnist_step(na, torch.optim.SGD(na.parameters(), lr=0.1), img, label,
                            sf.reset_net)
        got = _fmnist_step(nb, torch.optim.SGD(nb.parameters(), lr=0.1), img, label,
                           mods["functional"].reset_net)
    assert_same(want[0], got[0], "firing rate", exact=True)
    assert_same_grads(want[2], got[2])


# ---- lif_fc_mnist.py: single-step LIF, Poisson encoder, T steps in a Python loop, Adam --------

def test_lif_fc_mnist_single_step_loop_and_its_plotting_hooks():
    a, b = both("lif_fc_mnist.py", pp={"encoding": psnn.encoding})
    torch.manual_seed(0)
    na, nb = a.SNN(tau=2.0), b.SNN(tau=2.0)
    with torch.no_grad():
        na.layer[1].weight.mul_(8)
    nb.load_state_dict(na.state_dict())
    oa, ob = torch.optim.Adam(na.parameters(), 1e-3), torch.optim.Adam(nb.parameters(), 1e-3)
    encoder, T = psnn.encoding.PoissonEncoder(), 12
    for _ in range(2):
        img, label = torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
        seed = int(torch.randint(0, 2 ** 31, ()))
        res = []
        for net, opt, reset in ((na, oa, sf.reset_net), (nb, ob, pf.reset_net)):
            torch.manual_seed(seed)  # the same Poisson spikes for both
            opt.zero_grad()
            out_fr = 0.0
            for _t in range(T):
                out_fr += net(encoder(img))
            out_fr = out_fr / T
            loss = F.mse_loss(out_fr, F.one_hot(label, 10).float())
            loss.backward()
            res.append((out_fr, loss, grads(net), net.layer[-1].v.clone()))
            opt.step()
            reset(net)
        _assert_same_step(res[0], res[1], na, nb)
        assert_same(res[0][3], res[1][3], "membrane before reset", tol=1e-6)
    # the end of main(): v_seq and s_seq lists filled by a forward hook, one unbatched image
    for net in (na, nb):
        net.eval()
        out = net.layer[-1]
        out.v_seq, out.s_seq = [], []
        out.register_forward_hook(lambda m, x, y: (m.v_seq.append(m.v.unsqueeze(0)),
                                                   m.s_seq.append(y.unsqueeze(0))))
        torch.manual_seed(5)
        with torch.no_grad():
            img = torch.rand(1, 28, 28)
            for _t in range(T):
                net(encoder(img))
        out.v_seq, out.s_seq = torch.cat(out.v_seq), torch.cat(out.s_seq)
    assert_same(na.layer[-1].s_seq, nb.layer[-1].s_seq, "plotted spikes", exact=True)
    assert_same(na.layer[-1].v_seq, nb.layer[-1].v_seq, "plotted membrane", tol=1e-6)
    assert nb.layer[-1].v_seq.shape == (T, 1, 10)


# ---- rsnn_sequential_fmnist.py: plain, stateful synapse, linear recurrent container ------------

@pytest.mark.parametrize("model", ["PlainNet", "StatefulSynapseNet", "FeedBackNet"])
def test_rsnn_sequential_fmnist(model):
    """SynapseFilter and LinearRecurrentContainer are SpikingJelly's (pypaper's layer forwards
    them), around pypaper's IF neurons; set_step_mode leaves the container's neuron in 's'."""
    a, b = both("rsnn_sequential_fmnist.py")
    torch.manual_seed(0)
    na, nb = getattr(a, model)(), getattr(b, model)()
    nb.load_state_dict(na.state_dict())
    sf.set_step_mode(na, step_mode="m")
    pf.set_step_mode(nb, step_mode="m")
    assert ([getattr(m, "step_mode", None) for m in na.modules()]
            == [getattr(m, "step_mode", None) for m in nb.modules()])
    oa, ob = torch.optim.Adam(na.parameters(), 1e-3), torch.optim.Adam(nb.parameters(), 1e-3)
    torch.manual_seed(1)
    for _ in range(2):
        img, label = torch.rand(4, 1, 28, 28) * 2, torch.randint(0, 10, (4,))
        img = img.squeeze(1).permute(2, 0, 1)  # [W, N, H] as [T, N, H]
        _assert_fmnist_steps_match(na, nb, oa, ob, img, label)
        assert membranes(nb) == membranes(na)


# ---- classify_dvsg.py: the model zoo's DVSGestureNet built with pypaper's LIFNode --------------

def test_classify_dvsg_zoo_net_with_pypapers_neuron():
    from spikingjelly.activation_based.model import parametric_lif_net

    def build(neuron, surrogate, functional):
        net = parametric_lif_net.DVSGestureNet(channels=4, spiking_neuron=neuron.LIFNode,
                                               surrogate_function=surrogate.ATan(),
                                               detach_reset=True)
        functional.set_step_mode(net, "m")
        return net

    torch.manual_seed(0)
    na, nb = build(sn, ss, sf), build(pn, ps, pf)
    with torch.no_grad():
        for m in na.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.mul_(6)
    nb.load_state_dict(na.state_dict())
    assert sum(type(m) is pn.LIFNode and m.step_mode == "m" for m in nb.modules()) == 7
    oa, ob = torch.optim.Adam(na.parameters(), 1e-3), torch.optim.Adam(nb.parameters(), 1e-3)
    torch.manual_seed(1)
    frame = (torch.rand(2, 3, 2, 128, 128) < 0.2).float()  # [N, T, C, H, W]
    label = torch.randint(0, 11, (2,))
    res = []
    for net, opt, reset in ((na, oa, sf.reset_net), (nb, ob, pf.reset_net)):
        torch.manual_seed(2)  # the same dropout masks
        opt.zero_grad()
        out_fr = net(frame.transpose(0, 1)).mean(0)
        loss = F.mse_loss(out_fr, F.one_hot(label, 11).float())
        loss.backward()
        res.append((out_fr, loss, grads(net)))
        opt.step()
        reset(net)
    _assert_same_step(res[0], res[1], na, nb)


# ---- speech_commands.py: LIFWrapper over transposed (non-contiguous) [T, C, N, mel] ------------

def test_speech_commands_net():
    from typing import Optional

    extra = dict(delta_order=0, label_cnt=12, n_mels=40, Optional=Optional,
                 Tensor=torch.Tensor)
    a, b = both("speech_commands.py", extra=extra)
    torch.manual_seed(0)
    na, nb = a.Net(), b.Net()
    with torch.no_grad():
        for m in na.conv:
            if isinstance(m, nn.Conv2d):
                m.weight.mul_(3)
    nb.load_state_dict(na.state_dict())
    oa, ob = torch.optim.Adam(na.parameters(), 1e-3), torch.optim.Adam(nb.parameters(), 1e-3)
    criterion = nn.CrossEntropyLoss()
    audios, labels = torch.rand(2, 1, 101, 40) * 2, torch.tensor([3, 11])
    spikes, res = [], []
    for net, opt, reset in ((na, oa, sf.reset_net), (nb, ob, pf.reset_net)):
        seen = []
        hook = net.conv[-1].module.register_forward_hook(lambda m, x, y: seen.append(y))
        opt.zero_grad()
        out = net(audios)
        loss = criterion(out, labels)
        loss.backward()
        hook.remove()
        spikes.append(seen[0])
        res.append((out, loss, grads(net)))
        opt.step()
        reset(net)
    assert spikes[0].sum() > 0
    assert_same(spikes[0], spikes[1], "last LIF's spikes", exact=True)
    assert_same(res[0][0], res[1][0], "logits")
    assert_same(res[0][1], res[1][1], "loss")
    assert_same_grads(res[0][2], res[1][2])
    assert_same_state_dict(na, nb)


# ---- spiking_dqn_state.py: single-step IF + SpikingJelly's SimpleLIFNode subclass, monitor -----

def test_spiking_dqn_state_optimize_model_and_play_monitor():
    skip = ("main", "train", "play")
    a, b = both("spiking_dqn_state.py", skip=skip, sj={"monitor": monitor},
                pp={"monitor": psnn.monitor})
    torch.manual_seed(0)
    pa, pb = a.DQSN(4, 32, 2, T=16), b.DQSN(4, 32, 2, T=16)
    pb.load_state_dict(pa.state_dict())
    assert type(pb.fc[1]) is pn.IFNode and type(pb.fc[3]).__mro__[1] is sn.SimpleLIFNode
    ta, tb = copy.deepcopy(pa).eval(), copy.deepcopy(pb).eval()
    oa, ob = torch.optim.Adam(pa.parameters()), torch.optim.Adam(pb.parameters())
    torch.manual_seed(1)
    for _ in range(2):
        state = torch.randn(1, 4)
        sb_, ab_, rb_ = torch.randn(16, 4) * 2, torch.randint(0, 2, (16, 1)), torch.rand(16)
        nonfinal = torch.rand(16) > 0.2
        nxt = torch.randn(int(nonfinal.sum()), 4) * 2
        res = []
        for pol, tgt, opt, fn in ((pa, ta, oa, sf), (pb, tb, ob, pf)):
            with torch.no_grad():  # select_action
                action = pol(state).max(1)[1].view(1, 1)
                fn.reset_net(pol)
            sav = pol(sb_).gather(1, ab_)  # optimize_model
            nsv = torch.zeros(16)
            nsv[nonfinal] = tgt(nxt).max(1)[0].detach()
            fn.reset_net(tgt)
            loss = F.smooth_l1_loss(sav, (nsv * 0.999 + rb_).unsqueeze(1))
            opt.zero_grad()
            loss.backward()
            for p in pol.parameters():
                p.grad.data.clamp_(-1, 1)
            res.append((action, sav, loss, grads(pol)))
            opt.step()
            fn.reset_net(pol)
        assert_same(res[0][0], res[1][0], "action", exact=True)
        assert_same(res[0][1], res[1][1], "Q values")
        assert_same(res[0][2], res[1][2], "loss")
        assert_same_grads(res[0][3], res[1][3])
        assert_same_state_dict(pa, pb)
    # play(): OutputMonitor on the IF neurons, given by class
    records = []
    for net, neuron_module, fn in ((pa, sn, sf), (pb, pn, pf)):
        with torch.no_grad():
            mon = monitor.OutputMonitor(net, neuron_module.IFNode)
            torch.manual_seed(9)
            for _ in range(2):
                v = net(torch.randn(1, 4) * 3)
                fn.reset_net(net)
        assert mon.monitored_layers == ["fc.1"]
        records.append((torch.stack(mon.records), v))
        mon.remove_hooks()
    assert records[0][0].shape == (32, 1, 32) and records[0][0].sum() > 0
    assert_same(records[0][0], records[1][0], "monitored spikes", exact=True)
    assert_same(records[0][1], records[1][1], "readout membrane")


# ---- cifar10_r11_enabling_spikebased_backpropagation.py: layer.Dropout kept over time ---------

def test_cifar10_r11_dropout_masks_and_reset():
    """The script's own neurons (plain nn.Modules with reset()) and layer.Dropout, whose mask
    is drawn at the first step and kept until reset_net, as in SpikingJelly."""
    a, b = both("cifar10_r11_enabling_spikebased_backpropagation.py")
    torch.manual_seed(0)
    na = a.ResNet11()
    torch.manual_seed(0)
    nb = b.ResNet11()
    with torch.no_grad():  # more drive: the deep layers spike within T = 2 steps
        for m in na.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.mul_(3)
    nb.load_state_dict(na.state_dict())
    assert sum(type(m) is pl.Dropout for m in nb.modules()) == 10
    T, img = 2, torch.randn(1, 3, 32, 32) * 4
    label = F.one_hot(torch.tensor([7]), 10).float()
    res = []
    for net, lif in ((na, a.LIFNode), (nb, b.LIFNode)):
        torch.manual_seed(1)
        opt = torch.optim.SGD(net.parameters(), lr=0.0025, weight_decay=5e-4)
        opt.zero_grad()
        for _t in range(T - 1):
            poisson = (img.abs() > torch.rand_like(img)).float() * img.sign()
            net(poisson)
        output = net(poisson)
        for m in net.modules():
            if isinstance(m, lif) and m.fire:
                m.v_acc += (m.v_acc < 1e-3).float()
                m.new_grad = (m.v_acc_l > 1e-3).float() + math.log(1 - 1 / m.tau) * torch.div(
                    m.v_acc_l, m.v_acc)
        loss = nn.MSELoss(reduction="sum")(output / T, label)
        loss.backward()
        masks = [m.mask.clone() for m in net.modules() if isinstance(m, (sl.Dropout, pl.Dropout))]
        res.append((output, loss, grads(net), masks))
        opt.step()
        net.reset_()
        assert all(m.mask is None for m in net.modules() if isinstance(m, (sl.Dropout,
                                                                            pl.Dropout)))
        assert all(m.v == 0.0 for m in net.modules() if isinstance(m, lif))
    assert len(res[1][3]) == 10 and res[0][0].abs().sum() > 0
    for i, (want, got) in enumerate(zip(res[0][3], res[1][3])):
        assert_same(want, got, f"dropout mask {i}", exact=True)
    assert_same(res[0][0], res[1][0], "output membrane", exact=True)
    assert_same(res[0][1], res[1][1], "loss")
    assert_same_grads(res[0][2], res[1][2])


# ---- plasticity/: STDP with pypaper's IF neuron; stdp_mnist's MemoryModule through base ---------

@pytest.mark.parametrize("step_mode", ["s", "m"])
def test_stdp_trace_learner_on_pypapers_if_neuron(step_mode):
    def run(neuron, layer, functional):
        torch.manual_seed(0)
        net = nn.Sequential(layer.Linear(4, 3, bias=False), neuron.IFNode())
        nn.init.constant_(net[0].weight.data, 0.4)
        functional.set_step_mode(net, step_mode)
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.0)
        in_spike = (torch.rand([32, 2, 4]) > 0.7).float()
        learner = learning.STDPLearner(step_mode=step_mode, synapse=net[0], sn=net[1],
                                       tau_pre=2.0, tau_post=2.0,
                                       f_pre=lambda w: torch.clamp(w, -1, 1.0),
                                       f_post=lambda w: torch.clamp(w, -1, 1.0))
        out = []
        with torch.no_grad():
            for x in (in_spike.unbind(0) if step_mode == "s" else in_spike.split(8)):
                opt.zero_grad()
                out.append(net(x))
                learner.step(on_grad=True)
                opt.step()
                net[0].weight.data.clamp_(-1, 1)
                out += [learner.trace_pre, learner.trace_post, net[0].weight.data.clone()]
        learner.close()
        return out

    want, got = run(sn, sl, sf), run(pn, pl, pf)
    assert sum(float(t.sum()) for t in want[::4]) > 0
    for i, (w, g) in enumerate(zip(want, got)):
        assert_same(w, g, f"spikes / traces / weight {i}", exact=True)


def test_stdp_mnist_memory_module_through_pypapers_base():
    a = load_example("plasticity/stdp_mnist.py", {**SJ, "base": sb, "learning": learning})
    b = load_example("plasticity/stdp_mnist.py", {**PP, "base": psnn.base,
                                                  "learning": psnn.learning})
    res = []
    for ex in (a, b):
        torch.manual_seed(0)
        pixels = torch.randint(0, 256, (20, 28, 28))
        cov = ex._training_covariance(pixels, torch.arange(20))
        model = ex._SNN(16, 0.1, 0.5, steps=10, covariance=cov, device="cpu")
        learner = learning.STDPLearner("s", model.synapse, model.sn, 20.0, 20.0,
                                       f_pre=lambda w: 0.01 * w, f_post=lambda w: 0.01 * (1 - w))
        generator = torch.Generator().manual_seed(1)
        counts = [ex._run_batch(model, pixels[i:i + 4].float() / 255, 10, generator,
                                learner=learner)[0] for i in (0, 4)]  # reset_net between
        res.append((torch.stack(counts), model.synapse.weight.clone()))
    assert res[0][0].sum() > 0
    assert_same(res[0][0], res[1][0], "spike counts", exact=True)
    assert_same(res[0][1], res[1][1], "weights after STDP", exact=True)


# ---- ilc_san/ilc_san.py: SpikingJelly's CUBA neurons with pypaper's layers and surrogate -------

def test_ilc_san_pop_spike_actor():
    extra = {"OrderedDict": OrderedDict}
    a, b = both("ilc_san/ilc_san.py", extra=extra, sj={"encoding": encoding},
                pp={"encoding": psnn.encoding})
    res = []
    for ex, fn in ((a, sf), (b, pf)):
        torch.manual_seed(0)
        actor = ex.PopSpikeActor(3, 2, 5, 4, [16, 16], (-3, 3), 0.15, 5, "pop-det", "fr-mlp", 1.0)
        if res:
            actor.load_state_dict(res[0][2])
        y = actor(torch.randn(4, 3, generator=torch.Generator().manual_seed(1)))
        y.square().sum().backward()
        fn.reset_net(actor)
        res.append((y, grads(actor), actor.state_dict()))
    assert type(b.PopSpikeActor(3, 2, 5, 4, [8], (-3, 3), 0.15, 5, "pop-det", "fr-mlp", 1.0)
                .snn.hidden_layers.Linear0) is pl.Linear
    assert_same(res[0][0], res[1][0], "actions")
    assert_same_grads(res[0][1], res[1][1])


# ---- memopt/: SpikingJelly's memopt cannot restore pypaper's neurons ---------------------------

def test_spikingjelly_memopt_is_refused_with_the_reason():
    with pytest.raises(ImportError, match="restores only SpikingJelly's MemoryModule state"):
        exec("from pypaper.snn import memopt, neuron", {})


def test_spikingjelly_memopt_chunks_give_pypapers_neurons_wrong_gradients():
    """Why memopt is refused: memopt/train.py chunks every leaf with
    ``can_chunk=lambda module: isinstance(module, neuron.BaseNode)`` (level 3). Its checkpoint
    carries and restores SpikingJelly's MemoryModule state only; pypaper's neuron is recomputed
    from the membrane the forward left, and the input gradient is wrong, silently. (A
    SpikingJelly neuron gets it right.) If this starts to pass, memopt works with pypaper's
    neurons and the refusal in pypaper/snn/spikingjelly_fallback.py can go."""
    from spikingjelly.activation_based import memopt as sj_memopt

    x = torch.rand(4, 2, 6) * 2
    wrong = []
    for neuron in (sn, pn):
        lif = neuron.LIFNode(tau=1.333, decay_input=False, detach_reset=True,
                             surrogate_function=ss.ATan(), step_mode="m")
        ref = copy.deepcopy(lif)
        wrapped = sj_memopt.checkpoint_module(lif, compressor=None, chunks=2)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1, y2 = ref(x1), wrapped(x2)
        assert torch.equal(y1, y2)
        w = torch.randn_like(y1, generator=torch.Generator().manual_seed(0))
        (y1 * w).sum().backward()
        (y2 * w).sum().backward()
        wrong.append(not torch.allclose(x1.grad, x2.grad, atol=1e-6))
    assert wrong == [False, True]
