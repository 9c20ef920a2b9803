"""pypaper.local's modules: FFLinear, FFClassEmbeddingLinear, TargetProjectionLinear, the aux heads
(DGL, AugLocal, MAN) and LocalSequential's gradient-in-forward training step."""
import gc
import weakref

import pytest
import torch
from torch import nn

import pypaper.local as L
from pypaper.local import reference as R

from .helpers import cnn_blocks, mlp_blocks, one_thread  # noqa: F401 (autouse fixture)


def test_fflinear_local_step_accumulates_the_ff_gradient():
    torch.manual_seed(0)
    layer = L.FFLinear(10, 7, threshold=1.3)
    xp, xn = torch.randn(5, 10), torch.randn(4, 10)
    w = layer.weight.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()
    loss_ref, h_ref = R.ff_loss(torch.cat([xp, xn]), w, b, 5, 1.3)
    gw, gb = torch.autograd.grad(loss_ref, (w, b))
    loss, hp, hn = layer.local_step(xp, xn)
    assert not hp.requires_grad and not hn.requires_grad and hp.grad_fn is None
    torch.testing.assert_close(loss, loss_ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([hp, hn]), h_ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.weight.grad, gw, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.bias.grad, gb, rtol=1e-5, atol=1e-6)
    layer.local_step(xp, xn)  # accumulates, like loss.backward()
    torch.testing.assert_close(layer.weight.grad, 2 * gw, rtol=1e-5, atol=1e-6)
    out = layer(torch.randn(3, 10, requires_grad=True))
    assert out.grad_fn is None


def test_target_projection_linear_local_step():
    torch.manual_seed(0)
    layer = L.TargetProjectionLinear(12, 9, num_classes=4, activation="sigmoid", seed=3)
    x, y = torch.randn(6, 12), torch.tensor([0, 1, 2, 3, 1, 0])
    w = layer.weight.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()
    loss_ref, _ = R.tp_loss(x, w, b, layer.proj, y, 0)
    gw, gb = torch.autograd.grad(loss_ref, (w, b))
    loss, h = layer.local_step(x, y)
    assert h.grad_fn is None
    torch.testing.assert_close(loss, loss_ref.detach())
    torch.testing.assert_close((layer.weight.grad, layer.bias.grad), (gw, gb))
    # The target is a fixed column of P, the same for the same seed.
    again = L.TargetProjectionLinear(12, 9, num_classes=4, seed=3)
    torch.testing.assert_close(again.proj, layer.proj)
    assert L.TargetProjectionLinear(12, 9, 4, seed=4).proj.ne(layer.proj).any()


def test_ff_class_embedding_linear_local_step():
    torch.manual_seed(0)
    layer = L.FFClassEmbeddingLinear(8, 6, num_classes=3, temperature=0.5)
    x, y = torch.randn(5, 8), torch.tensor([0, 2, 1, 1, 0])
    w = layer.weight.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()
    loss_ref, _, e_ref = R.ff_sf_loss(x, layer.class_inputs, w, b, y, True, 1e-4, 0.5)
    gw, gb = torch.autograd.grad(loss_ref, (w, b))
    loss, h, e = layer.local_step(x, y)
    torch.testing.assert_close(e, e_ref.detach())
    torch.testing.assert_close((layer.weight.grad, layer.bias.grad), (gw, gb))


def test_module_bad_arguments():
    with pytest.raises(ValueError, match="threshold must be finite"):
        L.FFLinear(4, 3, threshold=float("nan"))
    with pytest.raises(ValueError, match="activation must be one of"):
        L.TargetProjectionLinear(4, 3, 2, activation="softmax")
    layer = L.TargetProjectionLinear(4, 3, 2)
    with pytest.raises(ValueError, match=r"y must hold class labels in \[0, 2\)"):
        layer.local_step(torch.randn(3, 4), torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="y must be an int64 tensor"):
        layer.local_step(torch.randn(3, 4), torch.tensor([0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="x_neg must have shape"):
        L.FFLinear(4, 3).local_step(torch.randn(2, 4), torch.randn(2, 5))


# ---- AugLocal / MAN definitions ------------------------------------------------------------------

def test_auglocal_layer_selection_follows_the_paper():
    # Uniformly spaced later layers, round(i + (L - i - 1) / d * j), j = 1..d; every later layer
    # when d >= L - 1 - i; the last layer always included.
    assert L.auglocal_indices(0, 16, 3) == [5, 10, 15]
    assert L.auglocal_indices(4, 16, 2) == [10, 15]  # round(4 + 5.5) = round(9.5) = 10 (even)
    assert L.auglocal_indices(12, 16, 3) == [13, 14, 15]
    assert L.auglocal_indices(13, 16, 5) == [14, 15]
    assert L.auglocal_indices(2, 9, 1) == [8]


def test_auglocal_depth_decreases_linearly():
    # d_i = max(1, round(d (1 - i c / (K - 2)) + i c / (K - 2))), i = 0 .. K - 2
    d = L.auglocal_depths(10, 5, coeff=1.0)
    assert d == [5, 4, 4, 4, 3, 2, 2, 2, 1]  # Python's round: half to even
    d = L.auglocal_depths(6, 4, coeff=0.5)
    assert d == [4, 4, 3, 3, 2]
    assert all(a >= b for a, b in zip(d, d[1:]))


def test_auglocal_heads_copy_the_selected_later_blocks_with_fresh_weights():
    torch.manual_seed(0)
    blocks = mlp_blocks([6, 8, 9, 10, 11, 12])
    net = L.LocalSequential(blocks, "auglocal", num_classes=3, example_input=torch.randn(2, 6),
                            aux_depth=2, auglocal_coeff=1.0)
    assert net.aux_depths == [2, 2, 1, 1]  # round(2 - i/3), half to even
    for i, head in enumerate(net.aux):
        idx = L.auglocal_indices(i, 5, net.aux_depths[i])
        assert head.indices == idx
        copies = [m for m in head.body if isinstance(m, nn.Sequential)]
        assert len(copies) == len(idx)
        for copy_, j in zip(copies, idx):
            assert copy_[0].weight.shape == blocks[j][0].weight.shape
            assert not torch.equal(copy_[0].weight, blocks[j][0].weight)
        assert head.head.in_channels == blocks[idx[-1]][0].out_features


def test_man_ema_update_follows_the_definition():
    torch.manual_seed(0)
    blocks = mlp_blocks([5, 6, 7])
    net = L.LocalSequential(blocks, "man", num_classes=3, example_input=torch.randn(2, 5))
    man = net.aux[0]
    assert man.momentum == 0.995
    ema_w = man.ema[0].weight
    assert not ema_w.requires_grad
    torch.testing.assert_close(ema_w, blocks[1][0].weight)  # starts as a copy of the next block
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    before = ema_w.clone()
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    net.train_step(x, y, opt)
    nxt = blocks[1][0].weight.detach()
    assert not torch.equal(nxt, before)
    torch.testing.assert_close(ema_w, 0.995 * before + 0.005 * nxt)
    assert man.bias.bias.grad is None  # zeroed by the step; it did get a gradient:
    net.block_step(0, x, y)
    assert man.bias.bias.grad is not None and man.bias.bias.grad.abs().sum() > 0
    assert man.ema[0].weight.grad is None


# ---- gradient-in-forward training: nothing of an earlier block stays alive ----------------------

def test_no_tensor_of_an_earlier_block_stays_alive():
    torch.manual_seed(0)
    net = L.LocalSequential(cnn_blocks(8), "dgl", num_classes=10,
                            example_input=torch.randn(2, 1, 8, 8))
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    meter = L.SavedTensorMeter(exclude=list(net.parameters()))
    outputs = []
    with meter:
        h = x
        for i in range(len(net.blocks)):
            n_before = len(meter.handles)
            loss, h = net.block_step(i, h, y)
            assert len(meter.handles) > n_before  # the block did save tensors for its backward
            gc.collect()
            assert meter.alive() == 0, f"block {i} left saved tensors alive"
            assert meter.live_bytes == 0
            outputs.append(weakref.ref(h))
    # Only the last block's output is referenced: earlier ones are gone.
    del h
    gc.collect()
    assert all(r() is None for r in outputs)


def _mlp(depth, width=64):
    return mlp_blocks([32] + [width] * depth)


def test_saved_activation_memory_is_independent_of_depth():
    x, y = torch.randn(64, 32), torch.randint(0, 10, (64,))
    local, bp = {}, {}
    for depth in (4, 8):
        torch.manual_seed(0)
        blocks = _mlp(depth)
        net = L.LocalSequential(blocks, "dgl", num_classes=10, example_input=x[:2], aux_depth=1)
        params = list(net.parameters())
        local[depth] = L.peak_saved_bytes(lambda: net.train_step(x, y), exclude=params)
        model = nn.Sequential(*blocks, nn.Linear(64, 10))
        bp[depth] = L.peak_saved_bytes(lambda: L.backprop_step(model, x, y),
                                       exclude=list(model.parameters()))
    assert local[4] == local[8]
    assert bp[8] > 1.8 * bp[4] - 64 * 64 * 4
    assert local[8] < 0.6 * bp[8]


# ---- wrapping an existing network, bad heads ------------------------------------------------------

def test_local_block_wraps_an_existing_block():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
    lb = L.LocalBlock(block, L.dgl_head((1, 4, 8, 8), 10, depth=1))
    loss, out = lb.local_step(torch.randn(5, 1, 8, 8), torch.randint(0, 10, (5,)))
    assert out.grad_fn is None and loss.grad_fn is None
    assert block[0].weight.grad is not None and block[0].weight.grad.abs().sum() > 0


def test_block_output_that_does_not_fit_its_head_raises():
    blocks = mlp_blocks([6, 8, 9])

    def bad_aux(i, blocks, shapes, num_classes):
        return L.AuxHead(nn.Identity(), 5, num_classes)  # block 0 gives 8 channels

    with pytest.raises(ValueError, match="block 0's output of shape .* does not fit aux"):
        L.LocalSequential(blocks, bad_aux, num_classes=3, example_input=torch.randn(2, 6))
    with pytest.raises(ValueError, match="does not fit head"):
        L.LocalSequential(blocks, "dgl", L.LinearHead(4, 3), num_classes=3,
                          example_input=torch.randn(2, 6))
    with pytest.raises(ValueError, match="aux must be"):
        L.LocalSequential(blocks, "nope", num_classes=3, example_input=torch.randn(2, 6))
    head = L.LinearHead(8, 3)
    with pytest.raises(ValueError, match="block output feat has 9 channels"):
        head.loss(torch.randn(4, 9), torch.zeros(4, dtype=torch.long))
    net = L.LocalSequential(blocks, "dgl", num_classes=3, example_input=torch.randn(2, 6))
    with pytest.raises(TypeError, match="y must be an int64 tensor"):
        net.train_step(torch.randn(4, 6), torch.zeros(4, dtype=torch.int32))


class _Basic(nn.Module):
    """A ResNet basic block (two 3x3 convs, BN, identity or 1x1 strided shortcut)."""

    def __init__(self, c_in, c_out, stride=1):
        super().__init__()
        self.c1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(c_out)
        self.c2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(c_out)
        self.short = (nn.Sequential() if stride == 1 and c_in == c_out else
                      nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                    nn.BatchNorm2d(c_out)))

    def forward(self, x):
        out = torch.relu(self.b1(self.c1(x)))
        return torch.relu(self.b2(self.c2(out)) + self.short(x))


@pytest.mark.parametrize("kind", ["dgl", "auglocal", "man"])
def test_wraps_resnet_stages(kind):
    torch.manual_seed(0)
    stages = [nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
              _Basic(8, 8), _Basic(8, 16, 2), _Basic(16, 16), _Basic(16, 32, 2)]
    x, y = torch.randn(6, 3, 16, 16), torch.randint(0, 5, (6,))
    net = L.LocalSequential(stages, kind, num_classes=5, example_input=x[:2], aux_depth=2)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.05)
    before = [p.detach().clone() for p in net.blocks.parameters()]
    losses = net.train_step(x, y, opt)
    assert losses.shape == (5,) and torch.isfinite(losses).all()
    after = list(net.blocks.parameters())
    assert all(not torch.equal(a, b) for a, b in zip(before, after) if a.dim() > 1)
    assert net(x).shape == (6, 5)


def test_man_heads_take_aux_depth():
    """LocalSequential(..., "man", aux_depth=k) built every MAN head with MANHead's default depth,
    ignoring k silently (2026-12-07); None keeps that default."""
    torch.manual_seed(0)
    x = torch.randn(4, 32)

    def linears(net):
        return [sum(isinstance(m, nn.Linear) for m in head.modules()) for head in net.aux]

    default = L.LocalSequential(_mlp(3), "man", num_classes=10, example_input=x[:2])
    deeper = L.LocalSequential(_mlp(3), "man", num_classes=10, example_input=x[:2], aux_depth=2)
    explicit = [L.MANHead(b, 64, (2, 64), 10, aux_depth=2) for b in list(deeper.blocks)[1:]]
    assert linears(deeper) == [sum(isinstance(m, nn.Linear) for m in h.modules())
                               for h in explicit]
    assert linears(deeper) != linears(default)
