"""convert / revert on torch and HuggingFace models."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pypaper.quant.fewbit as fb


def _mlp():
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 16), nn.ReLU6(inplace=True),
                         nn.Linear(16, 16), nn.ELU(0.5), nn.Linear(16, 16), nn.Hardtanh(-2.0, 2.0),
                         nn.Linear(16, 4), nn.LeakyReLU(0.1))


def test_convert_swaps_every_activation_and_keeps_the_forward():
    torch.manual_seed(0)
    model = _mlp()
    x = torch.randn(32, 8)
    want = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert fb.convert(model, bits=3) is model
    kinds = [type(m).__name__ for m in model if not isinstance(m, nn.Linear)]
    assert kinds == ["GELU", "ReLU6", "ELU", "Hardtanh", "LeakyReLU"]
    assert all(isinstance(m, fb.FewBitActivation) for m in model if not isinstance(m, nn.Linear))
    assert model[1].bits == 3 and model[3].bits == 1 and model[5].approximation.params == (0.5,)
    assert model[7].approximation.params == (-2.0, 2.0)
    assert torch.equal(model(x), want)
    assert model.state_dict().keys() == state.keys()
    fb.revert(model)
    assert [type(m) for m in model] == [type(m) for m in _mlp()]
    assert torch.equal(model(x), want)


def test_converted_model_trains_like_the_original():
    x, y = torch.randn(64, 8), torch.randint(0, 4, (64,))

    def train(convert):
        torch.manual_seed(0)
        model = _mlp()
        if convert:
            fb.convert(model, bits=2)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        losses = []
        for _ in range(150):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    plain, few = train(False), train(True)
    assert few[0] == plain[0]  # same forward
    assert few[-1] < 0.5 * few[0]
    assert few[-1] < plain[-1] + 0.2


def test_filter_fn_and_function_attributes():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.act_fn = F.silu  # older model code keeps the function itself
            self.out_act = nn.Tanh()

        def forward(self, x):
            return self.out_act(self.act_fn(self.fc(x)))

    model = nn.Sequential(Block(), Block())
    x = torch.randn(3, 4)
    want = model(x)
    fb.convert(model, filter_fn=lambda m, name: name.startswith("0."))
    assert isinstance(model[0].act_fn, fb.FunctionActivation) and model[0].act_fn.fn is F.silu
    assert model[0].act_fn.approximation.name == "silu" and isinstance(model[0].out_act, fb.Tanh)
    assert model[1].act_fn is F.silu and isinstance(model[1].out_act, nn.Tanh)
    assert torch.equal(model(x), want)
    fb.revert(model)
    assert model[0].act_fn is F.silu and type(model[0].out_act) is nn.Tanh
    assert "act_fn" not in model[0]._modules


def test_bad_arguments():
    with pytest.raises(ValueError, match="bits must be an int in 1..4"):
        fb.convert(_mlp(), bits=5)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        fb.convert([nn.GELU()])


def test_huggingface_bert_from_config():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, vocab_size=100)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg).eval()
    ids = torch.randint(0, 100, (4, 9))
    want = model(ids).logits
    fb.convert(model, bits=2)
    acts = [m for m in model.modules() if isinstance(m, fb.FewBitActivation)]
    assert len(acts) == 2 + 1 and all(type(a) in (fb.GELU, fb.Tanh) for a in acts)  # + pooler tanh
    assert torch.equal(model(ids).logits, want)
    model.train()
    labels = torch.tensor([0, 1, 0, 1])
    out = model(ids, labels=labels)
    out.loss.backward()
    assert all(p.grad is not None for p in model.bert.encoder.parameters())
    fb.revert(model)
    assert not any(isinstance(m, fb.FewBitActivation) for m in model.modules())
    model.eval()
    assert torch.equal(model(ids).logits, want)


# ---- function attributes take the function's own arguments ---------------------------------------


class _Calls(nn.Module):
    """self.act = fn, called as ``call(self.act, h)`` (older model code)."""

    def __init__(self, fn, call):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.act = fn
        self.call = call

    def forward(self, x):
        return self.call(self.act, self.fc(x))


def _saves_codes(model, x):
    """(y, grad of x, whether autograd saved uint8 codes: the few-bit backward ran)."""
    saved = []

    def pack(t):
        saved.append(t.dtype)
        return t

    xr = x.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = model(xr)
    (gx,) = torch.autograd.grad(y, xr, torch.ones_like(y))
    return y, gx, torch.uint8 in saved


# (function, call, (name, params) the few-bit op must use, or None: the original function runs)
_FUNCTION_CALLS = [
    (F.gelu, lambda a, h: a(h), ("gelu", ())),
    (F.gelu, lambda a, h: a(h, approximate="tanh"), ("gelu_tanh", ())),
    (F.gelu, lambda a, h: a(h, approximate="none"), ("gelu", ())),
    (F.gelu, lambda a, h: a(input=h, approximate="tanh"), ("gelu_tanh", ())),
    (F.leaky_relu, lambda a, h: a(h, negative_slope=0.2), ("leaky_relu", (0.2,))),
    (F.leaky_relu, lambda a, h: a(h, 0.2), ("leaky_relu", (0.2,))),
    (F.leaky_relu, lambda a, h: a(h, 0.2, False), ("leaky_relu", (0.2,))),
    (F.elu, lambda a, h: a(h, alpha=0.5), ("elu", (0.5,))),
    (F.softplus, lambda a, h: a(h, 2, 10), ("softplus", (2.0, 10.0))),
    (F.hardtanh, lambda a, h: a(h, -2.0, max_val=2.0), ("hardtanh", (-2.0, 2.0))),
    (F.relu6, lambda a, h: a(h, inplace=False), ("hardtanh", (0.0, 6.0))),
    (F.silu, lambda a, h: a(h, False), ("silu", ())),
    (torch.tanh, lambda a, h: a(h), ("tanh", ())),
    # not implemented by the few-bit op: torch's own function, forward and backward
    (F.relu, lambda a, h: a(h, inplace=True), None),
    (F.elu, lambda a, h: a(h, 0.5, True), None),
    (F.hardtanh, lambda a, h: a(h, -2.0, 2.0, True), None),
    (F.leaky_relu, lambda a, h: a(h, torch.tensor(0.2)), None),
    (F.hardtanh, lambda a, h: a(h, 2.0, 2.0), None),
]


@pytest.mark.parametrize("fn,call,want", _FUNCTION_CALLS,
                         ids=[f"{i}-{f.__name__}" for i, (f, _, _) in enumerate(_FUNCTION_CALLS)])
def test_function_attribute_takes_the_functions_arguments(fn, call, want):
    torch.manual_seed(0)
    model = _Calls(fn, call)
    x = torch.randn(16, 8) * 2
    y_torch, g_torch, _ = _saves_codes(model, x)
    fb.convert(model, bits=3)
    assert isinstance(model.act, fb.FunctionActivation) and model.act.fn is fn
    y, g, few = _saves_codes(model, x)
    assert torch.equal(y, y_torch)  # the forward is torch's either way
    if want is None:
        assert not few and torch.equal(g, g_torch)  # the original function ran
    else:
        assert few
        h = model.fc(x).detach().requires_grad_()
        name, params = want
        (gh,) = torch.autograd.grad(fb.activation(h, name, 3, params=params), h,
                                    torch.ones(16, 8))
        xr = x.clone().requires_grad_()
        (gx,) = torch.autograd.grad(model.fc(xr), xr, gh)
        assert torch.equal(g, gx)
    fb.revert(model)
    assert model.act is fn


def test_function_attribute_passes_errors_through():
    """A call the original function rejects raises what it raises."""
    model = _Calls(F.gelu, lambda a, h: a(h, approximate="fast"))
    x = torch.randn(2, 8)
    with pytest.raises(Exception) as plain:
        model(x)
    fb.convert(model)
    with pytest.raises(type(plain.value)):
        model(x)
    model2 = _Calls(F.gelu, lambda a, h: a(h, "tanh"))  # approximate is keyword-only
    fb.convert(model2)
    with pytest.raises(TypeError):
        model2(x)
    model3 = _Calls(torch.sigmoid, lambda a, h: a(h, out=torch.empty_like(h)))
    fb.convert(model3)
    with torch.no_grad():
        assert torch.equal(model3(x), torch.sigmoid(model3.fc(x)))  # out= runs torch.sigmoid


# ---- HuggingFace activations: converted only when their forward is torch's function --------------


def test_every_hf_activation_keeps_its_forward_bit_for_bit():
    activations = pytest.importorskip("transformers.activations")
    converted = set()
    for key in activations.ACT2CLS:
        torch.manual_seed(0)
        try:
            act = activations.ACT2FN[key]
        except Exception:  # noqa: BLE001 - an optional dependency of one activation
            continue
        model = nn.Sequential(nn.Linear(8, 8), act)
        for dtype in (torch.float32, torch.bfloat16):
            model.to(dtype)
            x = (torch.randn(64, 8) * 3).to(dtype)
            model.zero_grad()
            want = model(x.clone().requires_grad_())
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # convert warns for the ones it leaves alone
                fb.convert(model, bits=2)
            got = model(x.clone().requires_grad_())
            assert torch.equal(got, want), key
            if isinstance(model[1], fb.FewBitActivation):
                converted.add(key)
            fb.revert(model)
    assert {"gelu", "gelu_pytorch_tanh", "silu", "mish", "relu", "tanh"} <= converted
    assert not converted & {"gelu_python", "gelu_python_tanh", "gelu_new", "gelu_fast",
                            "quick_gelu", "gelu_accurate"}


def test_hf_gelu_tanh_python_is_left_alone():
    activations = pytest.importorskip("transformers.activations")
    if "gelu_python_tanh" not in activations.ACT2CLS:
        pytest.skip("this transformers has no GELUTanh(use_gelu_tanh_python=True)")
    model = nn.Sequential(activations.ACT2FN["gelu_python_tanh"],
                          activations.ACT2FN["gelu_pytorch_tanh"])
    fb.convert(model)
    assert not isinstance(model[0], fb.FewBitActivation)
    assert isinstance(model[1], fb.GELU) and model[1].approximate == "tanh"


# ---- nothing to convert; converting again --------------------------------------------------------


def test_convert_warns_when_nothing_was_converted():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50, n_positions=16)
    model = transformers.GPT2LMHeadModel(cfg)  # NewGELUActivation: a hand-written formula
    with pytest.warns(UserWarning, match="written out by hand"):
        fb.convert(model)
    assert not any(isinstance(m, fb.FewBitActivation) for m in model.modules())
    with pytest.warns(UserWarning, match="no activation of Sequential was converted"):
        fb.convert(nn.Sequential(nn.Linear(2, 2)))
    with pytest.warns(UserWarning, match="no activation"):
        fb.convert(_mlp(), filter_fn=lambda m, name: False)


def test_convert_again_rebuilds_with_the_new_bits():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.seq = _mlp()
            self.act_fn = F.silu

        def forward(self, x):
            return self.act_fn(self.seq(x))

    torch.manual_seed(0)
    model = Block()
    x = torch.randn(8, 8)
    want = model(x)
    fb.convert(model, bits=2)
    assert model.seq[1].bits == 2 and model.act_fn.bits == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # already-converted activations count: no warning
        fb.convert(model, bits=4)
    assert model.seq[1].bits == 4 and model.seq[5].bits == 4 and model.act_fn.bits == 4
    assert model.seq[3].bits == 1 and model.seq[5].approximation.params == (0.5,)
    assert model.act_fn.fn is F.silu
    relu6 = model.seq[3]
    fb.convert(model, bits=3, filter_fn=lambda m, name: not name.startswith("seq.1"))
    assert model.seq[1].bits == 4 and model.seq[5].bits == 3 and model.act_fn.bits == 3
    assert model.seq[3] is relu6  # exact: nothing to rebuild
    assert torch.equal(model(x), want)
    fb.revert(model)
    assert type(model.seq[1]) is nn.GELU and model.act_fn is F.silu
    assert [type(m) for m in model.seq] == [type(m) for m in _mlp()]
    assert torch.equal(model(x), want)


def test_convert_bits_none_is_the_default():
    model = fb.convert(_mlp(), bits=None)
    assert model[1].bits == 2


def test_function_attributes_compile_fullgraph():
    """Tables for non-default arguments are first needed while tracing: they enter as constants."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.act = F.gelu
            self.act2 = F.leaky_relu

        def forward(self, x):
            h = self.fc(x)
            return self.act(h, approximate="tanh") + self.act2(h, 0.2) + self.act(h)

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = fb.convert(Block(), bits=3)
    x = torch.randn(4, 8)
    y = torch.compile(model, fullgraph=True)(x)
    y.sum().backward()
    grad = model.fc.weight.grad.clone()
    model.zero_grad()
    want = model(x)
    want.sum().backward()
    assert torch.allclose(y, want, rtol=1e-6, atol=1e-6)
    assert torch.allclose(grad, model.fc.weight.grad, rtol=1e-5, atol=1e-6)
