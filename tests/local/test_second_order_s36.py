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
