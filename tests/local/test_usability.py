"""Wrapping real models and the edges of the local modules: a model that already ends in its
classifier, AugLocal across a Flatten, optimizers that miss the aux nets, mixed precision
(autocast, GradScaler), FF layers on [*, in_features] inputs, frozen parameters, and error
messages that name the argument at fault."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pypaper.local as L
from pypaper.local import reference as R
from pypaper.local.blocks import _map_to_vector
from pypaper.local.distributed import LocalPipeline

from .helpers import digits_split, mlp_blocks, one_thread  # noqa: F401 (autouse fixture)


def _cnn(side=8, classes=10):
    """The README's kind of model: conv-BN-ReLU(-pool) stages, then Flatten and the classifier."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * (side // 2) ** 2, classes))


def _stages(model):
    return [model[0:3], model[3:7], model[7:]]  # conv-BN-ReLU, conv-BN-ReLU-pool, classifier


# ---- 1. a model that ends in its own classifier -------------------------------------------------

@pytest.mark.parametrize("kind", ["dgl", "auglocal", "man"])
def test_model_ending_in_its_classifier_gets_no_extra_head(kind):
    torch.manual_seed(0)
    model = _cnn()
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    net = L.LocalSequential(_stages(model), kind, num_classes=10, example_input=x[:2])
    assert isinstance(net.head, nn.Identity)
    net.eval(), model.eval()
    torch.testing.assert_close(net(x), model(x), rtol=0, atol=0)
    # the last block is trained on the real loss of the model's own logits
    net.train(), model.train()
    h = x
    for i in range(len(net.blocks) - 1):
        h = net.blocks[i](h).detach()
    want = F.cross_entropy(net.blocks[-1](h), y)
    loss, _ = net.block_step(len(net.blocks) - 1, h, y)
    torch.testing.assert_close(loss, want.detach())


def test_wrapped_classifier_learns_the_task_itself():
    # The reviewer's case: before, the model's logits were features of an extra LinearHead, so
    # net(x) learnt the task and model(x) did not (79% vs 0.4% train accuracy).
    xtr, ytr, _, _ = digits_split(seed=0)
    x, y = xtr[:256].view(-1, 1, 8, 8), ytr[:256]
    torch.manual_seed(0)
    model = _cnn()
    net = L.LocalSequential(_stages(model), "dgl", num_classes=10, example_input=x[:2])
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(8):
        for idx in torch.randperm(256, generator=g).split(32):
            net.train_step(x[idx], y[idx], opt)
    net.recalibrate_batchnorm(x)
    model.eval()
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).float().mean())
    assert acc >= 0.8, acc


def test_a_block_with_num_classes_channels_on_a_map_or_an_explicit_head_keeps_the_head():
    x = torch.randn(2, 6)
    net = L.LocalSequential(mlp_blocks([6, 8, 4]), "dgl", num_classes=3, example_input=x)
    assert isinstance(net.head, L.LinearHead)  # 4 features, 3 classes: a head is needed
    head = L.LinearHead(3, 3)
    net = L.LocalSequential(mlp_blocks([6, 8, 3]), "dgl", head, num_classes=3, example_input=x)
    assert net.head is head
    maps = [nn.Conv2d(1, 10, 3, padding=1)]  # [N, 10, H, W]: a feature map, not logits
    net = L.LocalSequential(maps, "dgl", num_classes=10, example_input=torch.randn(2, 1, 4, 4))
    assert isinstance(net.head, L.LinearHead)


# ---- 2. the README's example: stages ------------------------------------------------------------

@pytest.mark.parametrize("kind", ["dgl", "auglocal", "man"])
def test_readme_stages_example_trains(kind):
    torch.manual_seed(0)
    model = _cnn(16)
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,))
    net = L.LocalSequential(_stages(model), kind, num_classes=10, example_input=x[:2])
    assert len(net.aux) == 2  # one aux net per stage, not per layer
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    w = model[0].weight.detach().clone()
    losses = net.train_step(x, y, opt)
    assert losses.shape == (3,) and torch.isfinite(losses).all()
    assert not torch.equal(w, model[0].weight)


# ---- 3. AugLocal across a Flatten ---------------------------------------------------------------

def test_map_to_vector_adapter_matches_the_expected_width():
    kinds = lambda layers: [type(m).__name__ for m in layers]  # noqa: E731
    assert kinds(_map_to_vector((2, 8, 16, 16), 2048)) == ["Flatten"]  # a skipped bare Flatten
    a = _map_to_vector((2, 8, 16, 16), 512)
    assert kinds(a) == ["AdaptiveAvgPool2d", "Flatten"] and a[0].output_size == (8, 8)
    a = _map_to_vector((2, 8, 16, 16), 1000)
    assert kinds(a) == ["AdaptiveAvgPool2d", "Flatten", "Linear"]
    assert a[0].output_size == (8, 8) and (a[2].in_features, a[2].out_features) == (512, 1000)
    a = _map_to_vector((2, 64, 4, 4), 16)  # wider than the vector even at 1 x 1
    assert kinds(a) == ["AdaptiveAvgPool2d", "Flatten", "Linear"] and a[2].in_features == 64
    for shape, width in (((2, 8, 16, 16), 512), ((2, 8, 16, 16), 1000), ((2, 3, 10), 12)):
        out = nn.Sequential(*_map_to_vector(shape, width))(torch.randn(shape))
        assert out.shape == (shape[0], width)


def test_auglocal_on_list_of_a_cnn_with_a_separate_flatten():
    # list(model): the selection jumps from a conv map to the Linear after the Flatten block
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 16 * 16, 16), nn.ReLU(), nn.Linear(16, 10))
    x, y = torch.randn(4, 1, 16, 16), torch.randint(0, 10, (4,))
    net = L.LocalSequential(list(model), "auglocal", num_classes=10, example_input=x[:2])
    assert any(isinstance(m, nn.Flatten) for m in net.aux[0].body)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    losses = net.train_step(x, y, opt)
    assert torch.isfinite(losses).all()


def test_auglocal_vector_to_map_selection_is_a_clear_error():
    blocks = [nn.Linear(4, 16), nn.Unflatten(1, (1, 4, 4)), nn.Conv2d(1, 2, 3, padding=1),
              nn.Conv2d(2, 2, 3, padding=1)]
    with pytest.raises(ValueError, match="AugLocal aux net of block 0.*cannot adapt"):
        L.LocalSequential(blocks, "auglocal", num_classes=2, example_input=torch.randn(2, 4),
                          aux_depth=1)


# ---- 4. the optimizer must hold the aux nets and the head ----------------------------------------

def test_optimizer_without_the_aux_parameters_raises():
    torch.manual_seed(0)
    model = _cnn()
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # built before wrapping
    net = L.LocalSequential(_stages(model), "dgl", num_classes=10, example_input=x[:2])
    with pytest.raises(ValueError, match=r"aux\.0\..*net\.parameters\(\)"):
        net.train_step(x, y, opt)
    net.train_step(x, y, torch.optim.SGD(net.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="net.parameters()"):  # another optimizer: checked again
        net.train_step(x, y, opt)
    # a missing network head is named too
    net = L.LocalSequential(mlp_blocks([6, 8]), "dgl", num_classes=3,
                            example_input=torch.randn(2, 6))
    opt = torch.optim.SGD(net.blocks.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"head\.linear\.weight"):
        net.train_step(torch.randn(4, 6), torch.zeros(4, dtype=torch.long), opt)
    # fixed aux nets on purpose: frozen, then the model's optimizer is enough
    net = L.LocalSequential(_stages(model), "dgl", num_classes=10, example_input=x[:2])
    net.aux.requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    net.train_step(x, y, opt)
    assert all(p.grad is None for p in net.aux.parameters())


def test_optimizer_check_in_the_pipeline():
    torch.manual_seed(0)
    net = L.LocalSequential(mlp_blocks([6, 8, 8]), "dgl", num_classes=3,
                            example_input=torch.randn(2, 6))
    pipe = LocalPipeline(net, 0, 1)  # one rank: no messages
    x, y = torch.randn(4, 6), torch.tensor([0, 1, 2, 0])
    with pytest.raises(ValueError, match="net.parameters()"):
        pipe.train_step(x, y, torch.optim.SGD(net.blocks.parameters(), lr=0.1))
    pipe.train_step(x, y, torch.optim.SGD(pipe.parameters(), lr=0.1))


# ---- 5. mixed precision -----------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["dgl", "auglocal", "man"])
def test_train_step_under_cpu_autocast_bf16(kind):
    torch.manual_seed(0)
    model = _cnn()
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    net = L.LocalSequential(_stages(model)[:2], kind, num_classes=10, example_input=x[:2])
    ref = L.LocalSequential(_stages(_cnn())[:2], kind, num_classes=10, example_input=x[:2])
    ref.load_state_dict(net.state_dict())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = net.train_step(x, y)
    assert torch.isfinite(losses).all()
    ref.train_step(x, y)
    def linear_heads(n):
        return [[m for m in n.aux[0].modules() if isinstance(m, L.LinearHead)][-1].linear,
                n.head.linear]

    for p in net.parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32 and p.grad is not None
            assert p.grad.dtype == torch.float32
    for mine, theirs in zip(linear_heads(net), linear_heads(ref)):
        g, r = mine.weight.grad.flatten(), theirs.weight.grad.flatten()
        assert F.cosine_similarity(g, r, dim=0) > 0.95  # bf16 features, fp32 master grads
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        net.train_step(x, y, opt)


def test_head_loss_under_autocast_grads_reach_fp32_parameters():
    torch.manual_seed(0)
    feat = torch.randn(5, 4, 3, 3).bfloat16()
    w = torch.randn(3, 4, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    y = torch.tensor([0, 1, 2, 1, 0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = L.head_loss(feat, w, b, y)
    loss.backward()
    want = R.head_loss(feat.float(), w.detach(), b.detach(), y)[0]
    assert abs(float(loss.detach()) - float(want)) < 0.05
    assert w.grad.dtype == torch.float32 and b.grad.dtype == torch.float32
    with pytest.raises(TypeError, match="weight dtype"):  # outside autocast: still strict
        L.head_loss(feat, w, b, y)


def test_grad_scaler_gives_the_unscaled_step():
    torch.manual_seed(0)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    nets, opts = [], []
    for _ in range(2):
        torch.manual_seed(1)
        net = L.LocalSequential(mlp_blocks([6, 8, 8]), "dgl", num_classes=3, example_input=x[:2])
        nets.append(net)
        opts.append(torch.optim.SGD(net.parameters(), lr=0.1))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    a = nets[0].train_step(x, y, opts[0], scaler=scaler)
    b = nets[1].train_step(x, y, opts[1])
    torch.testing.assert_close(a, b)  # the returned losses are unscaled
    for p, q in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(p, q)
    assert scaler.get_scale() == 2.0 ** 12  # no inf found: the scale stays (growth after 2000)
    with pytest.raises(TypeError, match="optimizer is a gradient scaler"):
        nets[0].train_step(x, y, scaler)
    with pytest.raises(ValueError, match="scaler needs an optimizer"):
        nets[0].train_step(x, y, scaler=scaler)
    with pytest.raises(TypeError, match="scaler must be a torch.amp.GradScaler"):
        nets[0].train_step(x, y, opts[0], scaler=opts[0])


# ---- 6. FF / TP layers on [*, in_features] ------------------------------------------------------

@pytest.mark.parametrize("cls", ["ff", "sf", "tp"])
def test_layer_forward_takes_the_last_dim_as_features(cls):
    torch.manual_seed(0)
    layer = {"ff": lambda: L.FFLinear(8, 5), "sf": lambda: L.FFClassEmbeddingLinear(8, 5, 3),
             "tp": lambda: L.TargetProjectionLinear(8, 5, 3)}[cls]()
    x = torch.randn(2, 3, 8)
    out = layer(x)
    assert out.shape == (2, 3, 5)
    torch.testing.assert_close(out, layer(x.reshape(6, 8)).reshape(2, 3, 5))
    torch.testing.assert_close(layer(x[0, 0]), layer(x[0, 0:1])[0])  # 1-D: one row
    with pytest.raises(ValueError, match=r"x must have shape \[\*, 8\]"):
        layer(torch.randn(8, 2))
    with pytest.raises(ValueError, match=r"x must have shape \[\*, 8\]"):
        layer(torch.tensor(1.0))


def test_ff_goodness_per_row_of_any_leading_shape():
    torch.manual_seed(0)
    layer = L.FFLinear(8, 5)
    x = torch.randn(2, 3, 8)
    g = layer.goodness(x)
    assert g.shape == (2, 3)
    torch.testing.assert_close(g, layer.goodness(x.reshape(6, 8)).reshape(2, 3))
    assert layer.goodness(x[0, 0]).shape == ()


def test_local_steps_want_2d_and_name_the_argument():
    with pytest.raises(ValueError, match=r"x_pos must have shape \[N, 8\]"):
        L.FFLinear(8, 5).local_step(torch.randn(2, 3, 8), torch.randn(2, 8))
    y = torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"x must have shape \[N, 8\]"):
        L.FFClassEmbeddingLinear(8, 5, 3).local_step(torch.randn(2, 3, 8), y)
    with pytest.raises(ValueError, match=r"class_x must have shape \[N, 8\]"):
        L.FFClassEmbeddingLinear(8, 5, 3).local_step(torch.randn(2, 8), y, torch.randn(3, 7))


# ---- 7. frozen parameters get no .grad ----------------------------------------------------------

def _step(layer, x, y):
    if isinstance(layer, L.FFLinear):
        return layer.local_step(x[:3], x[3:])
    return layer.local_step(x, y)


@pytest.mark.parametrize("cls", ["ff", "sf", "tp"])
@pytest.mark.parametrize("frozen", ["weight", "bias", "both"])
def test_local_step_leaves_frozen_parameters_without_grad(cls, frozen):
    torch.manual_seed(0)
    make = {"ff": lambda: L.FFLinear(8, 5), "sf": lambda: L.FFClassEmbeddingLinear(8, 5, 3),
            "tp": lambda: L.TargetProjectionLinear(8, 5, 3)}[cls]
    full, layer = make(), make()
    layer.load_state_dict(full.state_dict())
    x, y = torch.randn(6, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    names = ["weight", "bias"] if frozen == "both" else [frozen]
    for n in names:
        getattr(layer, n).requires_grad_(False)
    for _ in range(2):  # the second step accumulates into the live .grad
        lo, *_ = _step(layer, x, y)
        lf, *_ = _step(full, x, y)
        torch.testing.assert_close(lo, lf)
    for n in ("weight", "bias"):
        p, q = getattr(layer, n), getattr(full, n)
        if n in names:
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad, q.grad)
    opt = torch.optim.SGD(layer.parameters(), lr=1.0)
    w = layer.weight.detach().clone()
    opt.step()
    if "weight" in names:
        assert torch.equal(layer.weight, w)


# ---- 8. errors name the argument ----------------------------------------------------------------

def test_local_sequential_bad_arguments_are_named():
    model = _cnn()
    with pytest.raises(ValueError, match=r"example_input of shape \(2, 3, 8, 8\).*block 0"):
        L.LocalSequential(_stages(model), "dgl", num_classes=10,
                          example_input=torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"example_input .* block 2 .*block 1's output"):
        L.LocalSequential(_stages(model), "dgl", num_classes=10,
                          example_input=torch.randn(2, 1, 6, 6))  # the Linear wants 16 * 4 * 4
    assert all(m.training for m in model)  # modes restored after the failed probe
    with pytest.raises(TypeError, match="example_input must be a torch.Tensor"):
        L.LocalSequential(_stages(model), "dgl", num_classes=10, example_input=[1, 2])
    for bad in (0, -1, 2.5, True, "10"):
        with pytest.raises(ValueError, match="num_classes must be a positive int"):
            L.LocalSequential(_stages(model), "dgl", num_classes=bad,
                              example_input=torch.randn(2, 1, 8, 8))


def test_tp_local_step_blames_x_not_the_weight():
    layer = L.TargetProjectionLinear(4, 3, 2)
    with pytest.raises(ValueError, match=r"x must have shape \[N, 4\], got \(3, 5\)"):
        layer.local_step(torch.randn(3, 5), torch.tensor([0, 1, 1]))
