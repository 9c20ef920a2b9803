"""Review s36 of pypaper.quant.fewbit: regressions found by using the converter and modules as a
demanding PyTorch user would (default-device contexts, autocast rules of torch, revert after
eval(), FakeTensorMode)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pypaper.quant.fewbit as fb
from pypaper.quant.fewbit import reference


def _model(alpha):
    return nn.Sequential(nn.Linear(6, 12), nn.ELU(alpha), nn.Linear(12, 12), nn.GELU("tanh"),
                         nn.Linear(12, 3), nn.Hardtanh(-0.25, 0.75))


# ---- tables built under a default-device context -------------------------------------------------


def test_convert_inside_a_meta_device_context():
    """Big models are built on the meta device (``with torch.device("meta")``), converted, then
    materialised with to_empty. The first use of a table runs the DP, whose f' came from a grid
    tensor that followed the default device: numpy then refused the meta tensor (TypeError)."""
    alpha = 0.3711  # parameters no other test uses: the DP runs here, under the context
    with torch.device("meta"):
        model = _model(alpha)
        fb.convert(model, bits=3)
        lone = fb.Softplus(1.37, 7.0, bits=3)
    assert model[0].weight.device.type == "meta"
    assert isinstance(model[1], fb.ELU) and model[1].approximation.params == (alpha,)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    for p in model.parameters():
        nn.init.normal_(p, std=0.5)
    twin = _model(alpha)
    twin.load_state_dict(model.state_dict())
    x = torch.randn(16, 6)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = model(xa)
    yb = fb.convert(twin, bits=3)(xb)
    assert torch.equal(ya, yb)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    assert torch.equal(xa.grad, xb.grad)
    assert lone.approximation.borders == fb.approximation("softplus", 3, (1.37, 7.0)).borders


def test_cpu_input_inside_a_meta_device_context():
    """The (borders, levels) tensors of a table built for a CPU input while a meta default-device
    context is active: they were made on meta and could not be copied to the CPU."""
    act = fb.Hardtanh(-0.3125, 0.6875)  # a fresh Approximation: no cached tensors yet
    gelu = fb.GELU(bits=3, density=torch.linspace(-2.0, 2.0, 101))
    x = (torch.randn(50) * 2).requires_grad_()
    with torch.device("meta"):
        y = act(x) + gelu(x)
    assert y.device.type == "cpu"
    y.backward(torch.ones(50))
    want = F.hardtanh(x.detach(), -0.3125, 0.6875) + F.gelu(x.detach())
    assert torch.equal(y.detach(), want)
    b, lv = gelu.approximation.tensors(torch.float32, "cpu")
    exact = ((x.detach() > -0.3125) & (x.detach() < 0.6875)).float()
    assert torch.equal(x.grad, exact + lv[reference.codes_of(x.detach(), b, False)])


# ---- torch's autocast rules ----------------------------------------------------------------------


@pytest.fixture
def softplus_autocast_fp32_on_cpu():
    """CPU stand-in for torch's CUDA (XPU, MPS) autocast rule of aten::softplus, which is on its
    float32 list there: a float16/bfloat16 input is cast to float32 and the result is float32.
    (CPU autocast has no such entry, and these machines have no GPU; the kernel is removed after
    the test.)"""
    lib = torch.library.Library("aten", "IMPL")

    def softplus_fp32(x, beta=1, threshold=20):
        with torch.autocast("cpu", enabled=False):
            if x.dtype in (torch.float16, torch.bfloat16):
                x = x.float()
            return torch.ops.aten.softplus.default(x, beta, threshold)

    lib.impl("softplus", softplus_fp32, "AutocastCPU")
    yield
    lib._destroy()


def _softplus_grad(x, g, act):
    b, lv = act.approximation.tensors(torch.float32, "cpu")
    return (g.float() * lv[reference.codes_of(x.float(), b, False)]).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_float32_rule_of_torch_is_followed(softplus_autocast_fp32_on_cpu, dtype):
    """Under an autocast that runs softplus in float32, nn.Softplus returns float32; the few-bit
    op (no autocast kernel of its own) ran in the input's dtype: float16/bfloat16 out, other
    values, and float32 again in its own no-grad path."""
    torch.manual_seed(0)
    x = (torch.randn(300) * 4).to(dtype)
    ours, twin = fb.Softplus(2.0, 5.0, bits=3), nn.Softplus(2.0, 5.0)
    with torch.autocast("cpu", dtype=dtype):
        want = twin(x)
        xr = x.clone().requires_grad_()
        got = ours(xr)
        plain = ours(x)
    assert want.dtype == torch.float32  # the stand-in rule is active
    assert got.dtype == plain.dtype == torch.float32
    assert torch.equal(got, want) and torch.equal(plain, want)
    g = torch.randn(300)
    got.backward(g)
    assert xr.grad.dtype == dtype  # through the cast, as torch's
    assert torch.equal(xr.grad, _softplus_grad(x, g, ours))

    # a converted model, and F.softplus held as an attribute
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.act = F.softplus
            self.out = nn.Softplus()

        def forward(self, h):
            return self.out(self.act(self.fc(h), 2.0))

    model = Head()
    h = torch.randn(4, 8)
    with torch.autocast("cpu", dtype=dtype):
        ref = model(h)
        fb.convert(model, bits=2)
        y = model(h)
    assert isinstance(model.act, fb.FunctionActivation) and isinstance(model.out, fb.Softplus)
    assert ref.dtype == y.dtype == torch.float32 and torch.equal(y, ref)
    y.sum().backward()
    assert model.fc.weight.grad.dtype == torch.float32


def test_autocast_without_such_a_rule_keeps_the_input_dtype():
    """CPU autocast has no entry for the activations: torch's and the few-bit ones stay in the
    input's dtype (the cast above applies only where torch's autocast casts)."""
    x = torch.randn(64, dtype=torch.bfloat16)
    for ours, twin in ((fb.Softplus(), nn.Softplus()), (fb.GELU(bits=3), nn.GELU())):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want = twin(x)
            got = ours(x.clone().requires_grad_())
        assert want.dtype == got.dtype == torch.bfloat16 and torch.equal(got, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_autocast_softplus_matches_torch():
    x = (torch.randn(4096, device="cuda") * 4).half()
    ours, twin = fb.Softplus(bits=3), nn.Softplus()
    with torch.autocast("cuda", dtype=torch.float16):
        want = twin(x)
        xr = x.clone().requires_grad_()
        got = ours(xr)
    assert got.dtype == want.dtype and torch.equal(got, want)
    g = torch.randn(4096, device="cuda")
    got.backward(g)
    b, lv = ours.approximation.tensors(torch.float32, "cuda")
    want_g = (g * lv[reference.codes_of(x.float(), b, False)]).half()
    assert xr.grad.dtype == torch.float16 and torch.equal(xr.grad, want_g)


# ---- revert after train() / eval() ---------------------------------------------------------------


def test_revert_restores_the_models_mode():
    """The originals sit outside the model while it is converted, so model.eval() did not reach
    them: revert put train-mode activations back into an eval-mode model."""
    model = _model(0.5)
    fb.convert(model, bits=2)
    model.eval()
    fb.revert(model)
    assert type(model[1]) is nn.ELU and type(model[5]) is nn.Hardtanh
    assert not any(m.training for m in model.modules())
    fb.convert(model, bits=2)
    model.train()
    fb.revert(model)
    assert all(m.training for m in model.modules())


# ---- FakeTensorMode ------------------------------------------------------------------------------


def test_fake_tensor_mode_forward_and_backward():
    """Eager code under FakeTensorMode (shape and memory estimation of a training step): the
    cached real (borders, levels) met fake inputs and the op refused them."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    model = fb.convert(_model(0.5), bits=3)
    act = fb.SiLU(bits=4)
    act(torch.randn(3, requires_grad=True))  # its real tables are cached before the mode
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.randn(5, 6, requires_grad=True)
        y = model(x)
        y.sum().backward()
        assert isinstance(y, FakeTensor) and y.shape == (5, 3) and x.grad.shape == (5, 6)
    with FakeTensorMode():
        x = torch.randn(7, 2, requires_grad=True, dtype=torch.bfloat16)
        y = act(x)
        y.sum().backward()
        assert y.dtype == torch.bfloat16 and x.grad.shape == (7, 2)
    x = torch.randn(5, 6, requires_grad=True)  # the real tables are untouched
    y = model(x)
    assert not isinstance(y, FakeTensor)
    y.sum().backward()
    assert x.grad.shape == (5, 6)
