"""Real training runs on scikit-learn's handwritten digits (1797 8x8 images, held-out split):
a spiking MLP with 128 LIF neurons and direct input encoding over T = 6 steps, trained with BPTT
through the fused kernel and with online SLTT; and the SpikingJelly drop-in: the same model
written with SpikingJelly's imports, switched to pypaper's, computes the same and trains."""
import pytest
import torch
from torch import nn

datasets = pytest.importorskip("sklearn.datasets")

import pypaper  # noqa: E402
from pypaper.snn import functional, neuron, sltt, surrogate  # noqa: E402

T = 6


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matrices: one thread is as fast, and immune to oversubscribed shared machines."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _digits():
    d = datasets.load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    return x[perm[:1400]], y[perm[:1400]], x[perm[1400:]], y[perm[1400:]]


def _mlp(step_mode):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128),
                         neuron.LIFNode(tau=2.0, surrogate_function=surrogate.ATan(),
                                        step_mode=step_mode),
                         nn.Linear(128, 10))


def _accuracy(model, x, y):
    """Direct encoding: the same input current at every step; the mean logits decide."""
    functional.set_step_mode(model, "m")
    with torch.no_grad():
        functional.reset_net(model)
        out = model(x.expand(T, *x.shape)).mean(0)
        functional.reset_net(model)
    return float((out.argmax(1) == y).float().mean())


def _train(method, epochs=12, batch=64):
    xtr, ytr, xte, yte = _digits()
    model = _mlp("m" if method == "bptt" else "s")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    ce = nn.functional.cross_entropy
    for _ in range(epochs):
        perm = torch.randperm(len(ytr), generator=gen)
        for i in range(0, len(ytr), batch):
            idx = perm[i:i + batch]
            xs = xtr[idx].expand(T, len(idx), 64)
            if method == "bptt":
                functional.set_step_mode(model, "m")
                functional.reset_net(model)
                out = model(xs)  # [T, B, 10]: the same per-step loss as the online run
                loss = sum(ce(out[t], ytr[idx]) for t in range(T)) / T
                opt.zero_grad()
                loss.backward()
                opt.step()
            else:
                sltt.train_step_online(model, xs, ytr[idx], ce, opt)
    return _accuracy(model, xte, yte)


def test_spiking_mlp_learns_digits_with_bptt_and_sltt():
    acc_bptt = _train("bptt")
    acc_sltt = _train("sltt")
    print(f"held-out accuracy: BPTT {acc_bptt:.3f}, SLTT {acc_sltt:.3f}")
    assert acc_bptt >= 0.92, acc_bptt
    assert acc_sltt >= 0.92 and abs(acc_sltt - acc_bptt) <= 0.02, (acc_sltt, acc_bptt)


def test_bptt_and_sltt_train_with_different_gradients():
    """The accuracy comparison above compares two methods, not one twice: on the first batch the
    BPTT gradient (temporal path through the kernel's reverse scan) and the online SLTT gradient
    differ, and the online one is the kernel's sltt=True gradient of a multi-step call."""
    xtr, ytr, _, _ = _digits()
    xs, y = xtr[:64].expand(T, 64, 64), ytr[:64]
    ce = nn.functional.cross_entropy

    def multi_step(sltt_flag):
        model = _mlp("m")
        model[1].sltt = sltt_flag
        out = model(xs)
        (sum(ce(out[t], y) for t in range(T)) / T).backward()
        return [p.grad for p in model.parameters()]

    online_model = _mlp("s")
    sltt.train_step_online(online_model, xs, y, ce)
    online = [p.grad for p in online_model.parameters()]
    bptt, kernel_sltt = multi_step(False), multi_step(True)
    for a, b in zip(online, kernel_sltt):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    rel = (torch.cat([g.flatten() for g in bptt]) - torch.cat([g.flatten() for g in online])).norm()
    rel = float(rel / torch.cat([g.flatten() for g in bptt]).norm())
    assert rel > 0.02, rel
    print(f"first-batch gradient, |BPTT - SLTT| / |BPTT| = {rel:.3f}")


def _written_for_spikingjelly(neuron_mod, surrogate_mod):
    """A model as a SpikingJelly user writes it; only the imports change."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 96),
        neuron_mod.ParametricLIFNode(init_tau=2.0, surrogate_function=surrogate_mod.Sigmoid(),
                                     detach_reset=True, step_mode="m"),
        nn.Linear(96, 10),
        neuron_mod.LIFNode(tau=2.0, v_threshold=0.5, v_reset=None,
                           surrogate_function=surrogate_mod.ATan(), step_mode="m"))


def test_spikingjelly_model_switched_to_pypaper_computes_the_same_and_trains():
    from spikingjelly.activation_based import functional as sj_functional
    from spikingjelly.activation_based import neuron as sj_neuron
    from spikingjelly.activation_based import surrogate as sj_surrogate

    xtr, ytr, xte, yte = _digits()
    xtr, xte = xtr * 4, xte * 4  # input currents that make the output layer fire at init
    sj_model = _written_for_spikingjelly(sj_neuron, sj_surrogate)
    pp_model = _written_for_spikingjelly(neuron, surrogate)
    xs = xtr[:128].expand(T, 128, 64)
    outs = []
    for model, fn in ((sj_model, sj_functional), (pp_model, functional)):
        fn.reset_net(model)
        rate = model(xs).mean(0)
        nn.functional.mse_loss(rate, nn.functional.one_hot(ytr[:128], 10).float()).backward()
        outs.append((rate.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.equal(outs[0][0], outs[1][0]) and float(outs[0][0].sum()) > 0
    for a, b in zip(outs[0][1], outs[1][1]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    # the switched model trains (firing-rate MSE, SpikingJelly's tutorial loss)
    opt = torch.optim.Adam(pp_model.parameters(), lr=5e-3)
    gen = torch.Generator().manual_seed(2)
    for _ in range(8):
        perm = torch.randperm(len(ytr), generator=gen)
        for i in range(0, len(ytr), 64):
            idx = perm[i:i + 64]
            functional.reset_net(pp_model)
            rate = pp_model(xtr[idx].expand(T, len(idx), 64)).mean(0)
            loss = nn.functional.mse_loss(rate, nn.functional.one_hot(ytr[idx], 10).float())
            opt.zero_grad()
            loss.backward()
            opt.step()
    functional.reset_net(pp_model)
    with torch.no_grad():
        acc = float((pp_model(xte.expand(T, *xte.shape)).mean(0).argmax(1) == yte).float().mean())
    print(f"drop-in accuracy {acc:.3f}")
    assert acc >= 0.85, acc
    assert float(pp_model[1].w.detach()) != 0.0  # tau was learned (w starts at 0 for tau = 2)
