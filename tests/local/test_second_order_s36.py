"""Second derivatives through the fused local ops: refused, never silently zero.

The ops compute their parameter gradients inside the forward (gradient-in-forward), so autograd's
backward only scales tensors without a graph. Before, a backward with create_graph=True treated
them as constants: d(grad_weight)/d(weight) came out as 0 (a gradient penalty or a Hessian trace
missed the local loss's whole curvature, with no error), and torch.func.hessian stopped with a bare
KeyError naming the op. Both now raise NotImplementedError naming the op.
"""
import pytest
import torch

from pypaper.local import ops


def _cases():
    torch.manual_seed(0)
    x = torch.randn(6, 5, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    proj = torch.randn(3, 4, dtype=torch.float64)
    cx = torch.randn(3, 5, dtype=torch.float64)
    feat = torch.randn(6, 5, 2, 2, dtype=torch.float64)
    return {
        "local_ff_linear": (lambda w, b: ops.ff_linear(x, w, b, 3)[1], (4, 5)),
        "local_tp_linear": (lambda w, b: ops.tp_linear(x, w, b, proj, y)[1], (4, 5)),
        "local_ff_sf_linear": (lambda w, b: ops.ff_sf_linear(x, cx, w, b, y)[2], (4, 5)),
        "local_head": (lambda w, b: ops.head_loss(feat, w, b, y)[0], (3, 5)),
    }


@pytest.mark.parametrize("op", list(_cases()))
def test_double_backward_raises_instead_of_dropping_the_local_curvature(op):
    loss_fn, shape = _cases()[op]
    w = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    b = torch.randn(shape[0], dtype=torch.float64, requires_grad=True)
    # the first derivative is unchanged by create_graph=True
    g_plain, = torch.autograd.grad(loss_fn(w, b), w)
    g, = torch.autograd.grad(loss_fn(w, b) + (w ** 3).sum(), w, create_graph=True)
    torch.testing.assert_close(g, g_plain + 3 * w.detach() ** 2)
    with pytest.raises(NotImplementedError, match=op):
        torch.autograd.grad(g.sum(), w)


def test_a_frozen_weight_still_refuses_through_the_bias():
    loss_fn, shape = _cases()["local_ff_linear"]
    w = torch.randn(shape, dtype=torch.float64)
    b = torch.randn(shape[0], dtype=torch.float64, requires_grad=True)
    g_plain, = torch.autograd.grad(loss_fn(w, b), b)
    g, = torch.autograd.grad(loss_fn(w, b), b, create_graph=True)
    torch.testing.assert_close(g, g_plain)
    with pytest.raises(NotImplementedError, match="local_ff_linear"):
        torch.autograd.grad(g.sum(), b)


def test_parameters_updated_in_place_between_forward_and_backward():
    # the anchors are referred to, not saved: an optimizer / EMA step between forward and
    # backward stays allowed, as before the refusal existed
    loss_fn, shape = _cases()["local_ff_linear"]
    w = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    b = torch.randn(shape[0], dtype=torch.float64, requires_grad=True)
    loss = loss_fn(w, b)
    with torch.no_grad():
        w.mul_(0.9)
        b.add_(0.1)
    loss.backward()
    assert w.grad is not None and b.grad is not None


def test_func_hessian_names_the_op():
    loss_fn, shape = _cases()["local_ff_linear"]
    w = torch.randn(shape, dtype=torch.float64)
    b = torch.randn(shape[0], dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="local_ff_linear has no forward-mode AD"):
        torch.func.hessian(lambda w: loss_fn(w, b))(w)


def test_func_grad_of_grad_raises_and_first_order_func_grad_is_unchanged():
    loss_fn, shape = _cases()["local_ff_linear"]
    w = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    b = torch.randn(shape[0], dtype=torch.float64)
    g_eager, = torch.autograd.grad(loss_fn(w, b), w)
    w0 = w.detach()
    torch.testing.assert_close(torch.func.grad(lambda w: loss_fn(w, b))(w0), g_eager)
    with pytest.raises(NotImplementedError, match="local_ff_linear"):
        torch.func.jacrev(torch.func.jacrev(lambda w: loss_fn(w, b)))(w0)
    with pytest.raises(NotImplementedError, match="local_ff_linear"):
        torch.func.grad(lambda w: torch.func.grad(lambda v: loss_fn(v, b))(w).sum())(w0)


# ---- the head's input gradient (2026-12-07) ------------------------------------------------------

def _penalty_setup(head_trainable):
    torch.manual_seed(1)
    x = torch.randn(6, 3, 2, 2, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    scale = torch.randn(5, 3, 1, 1, dtype=torch.float64, requires_grad=True)  # "the block"
    w = torch.randn(3, 5, dtype=torch.float64, requires_grad=head_trainable)
    b = torch.randn(3, dtype=torch.float64, requires_grad=head_trainable)

    def feat_of(scale):
        return torch.tanh((x.unsqueeze(1) * scale).sum(2))  # [6, 5, 2, 2]

    return feat_of, scale, w, b, y


@pytest.mark.parametrize("head_trainable", [False, True], ids=["frozen head", "trained head"])
def test_an_input_gradient_penalty_on_the_block_raises_instead_of_zero(head_trainable):
    """R = |dL/dfeat|^2 differentiated w.r.t. the block's parameters: the head's input gradient
    is formed without a graph. With the head's weight and bias frozen there was no anchor at
    all, and dR/dscale came back without an error (failed before 2026-12-07); with a trained
    head the weight's anchor already refused (a control). The plain-autograd reference gives a
    nonzero dR/dscale."""
    feat_of, scale, w, b, y = _penalty_setup(head_trainable)
    from pypaper.local import reference

    feat = feat_of(scale)
    loss = reference.head_loss(feat, w, b, y)[0]
    gfeat, = torch.autograd.grad(loss, feat, create_graph=True)
    want, = torch.autograd.grad(gfeat.pow(2).sum(), scale)
    assert want.abs().max() > 1e-6  # the true derivative is not zero

    feat = feat_of(scale)
    loss = ops.head_loss(feat, w, b, y)[0]
    gfeat_fused, = torch.autograd.grad(loss, feat, create_graph=True)
    torch.testing.assert_close(gfeat_fused, gfeat.detach())  # first order unchanged
    with pytest.raises(NotImplementedError, match="local_head"):
        torch.autograd.grad(gfeat_fused.pow(2).sum(), scale)


def test_the_head_keeps_no_feature_map_for_the_anchor():
    """The anchor is one element copied out: the [N, C, H, W] input is not kept alive by the
    head's graph (the point of the fused head)."""
    import weakref

    feat_of, scale, w, b, y = _penalty_setup(True)
    x = torch.randn(6, 5, 4, 4, dtype=torch.float64)
    feat = x * scale.reshape(1, 5, 3, 1)[..., :1, :]  # MulBackward keeps x and scale, not feat
    ref = weakref.ref(feat)
    loss = ops.head_loss(feat, w, b, y)[0]
    del feat
    assert ref() is None
    loss.backward()
    assert scale.grad is not None and scale.grad.abs().sum() > 0


def test_per_sample_input_gradients_still_work():
    """vmap over torch.func.grad runs the backward with a graph (create_graph): a first-order
    per-sample input gradient must not raise."""
    from torch import func

    feat_of, scale, w, b, y = _penalty_setup(False)
    feat = feat_of(scale).detach()

    t = y[1:2]  # one label for every sample (the label checks read values: not vmapped)

    def loss_one(f):
        return ops.head_loss(f.unsqueeze(0), w, b, t)[0]

    per_sample = func.vmap(func.grad(loss_one))(feat)
    for i in range(feat.shape[0]):
        f = feat[i:i + 1].clone().requires_grad_()
        want, = torch.autograd.grad(ops.head_loss(f, w, b, t)[0], f)
        torch.testing.assert_close(per_sample[i], want[0])
