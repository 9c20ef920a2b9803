"""convert / revert on torch and HuggingFace models."""
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
    assert isinstance(model[0].act_fn, fb.SiLU) and isinstance(model[0].out_act, fb.Tanh)
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
