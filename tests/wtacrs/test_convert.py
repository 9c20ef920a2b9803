"""convert / revert on built models: a HuggingFace BERT (random weights from a config, nothing
downloaded) trains converted and its state_dict loads into the unconverted model; LoRA-style
adapters keep their frozen base layer exact."""
import pytest
import torch

from pypaper import wtacrs as W

from .helpers import saved_storage_bytes

transformers = pytest.importorskip("transformers")


def _bert(num_labels=3):
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64,
                                  max_position_embeddings=32, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, num_labels=num_labels)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(cfg)


def test_bert_converts_trains_and_loads_back():
    model = _bert()
    linears = {n for n, m in model.named_modules() if type(m) is torch.nn.Linear}
    keys = list(model.state_dict())
    W.convert(model, keep_ratio=0.3, min_k=4)
    converted = {n for n, m in model.named_modules() if isinstance(m, W.WTACRSLinear)}
    assert converted == linears and len(converted) == 2 * 6 + 2  # q k v o i o, pooler, classifier
    att = model.bert.encoder.layer[0].attention.self
    assert att.query.sample_group is att.key.sample_group is att.value.sample_group
    assert list(model.state_dict()) == keys
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (16, 24), generator=g)
    labels = ids[:, 0] % 3  # learnable from the first token
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for step in range(30):
        out = model(input_ids=ids, labels=labels)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
    plain = _bert()
    plain.load_state_dict(model.state_dict())
    model.eval()
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, plain(input_ids=ids).logits)
    W.revert(model)
    assert not any(isinstance(m, W.WTACRSLinear) for m in model.modules())
    assert type(model.bert.encoder.layer[0].attention.self.query) is torch.nn.Linear


def test_bert_keeps_fewer_bytes_for_backward():
    ids = torch.randint(0, 64, (8, 32))
    full_model = _bert()
    params = list(full_model.parameters())
    full, _ = saved_storage_bytes(lambda: full_model(input_ids=ids).logits.sum(), params)
    W.convert(full_model, keep_ratio=0.3, min_k=1)
    sampled, _ = saved_storage_bytes(lambda: full_model(input_ids=ids).logits.sum(), params)
    assert sampled < 0.8 * full, (sampled, full)


def test_filter_fn_and_sample_ids_in_a_model():
    model = _bert()
    W.convert(model, filter_fn=lambda m, name: "intermediate" in name, min_k=1)
    kinds = {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {n for n, t in kinds.items() if t == "WTACRSLinear"} == {
        "bert.encoder.layer.0.intermediate.dense", "bert.encoder.layer.1.intermediate.dense"}
    ids = torch.randint(0, 64, (4, 20))
    with W.sample_ids(torch.tensor([5, 6, 7, 8])):
        model(input_ids=ids).logits.sum().backward()
    cache = model.bert.encoder.layer[0].intermediate.dense.grad_norms
    assert cache.lookup(torch.tensor([5, 6, 7, 8]), 80, "cpu") is not None


def test_lora_adapter_base_stays_exact():
    class LoRALinear(torch.nn.Module):
        def __init__(self, d, r=4):
            super().__init__()
            self.base = torch.nn.Linear(d, d)
            self.base.requires_grad_(False)
            self.lora_A = torch.nn.Linear(d, r, bias=False)
            self.lora_B = torch.nn.Linear(r, d, bias=False)

        def forward(self, x):
            return self.base(x) + self.lora_B(self.lora_A(x))

    torch.manual_seed(0)
    m = LoRALinear(64)
    x = torch.randn(8, 50, 64, requires_grad=True)
    gy = torch.randn(8, 50, 64)
    m(x).backward(gy)
    want_x = x.grad.clone()
    want_b = m.lora_B.weight.grad.clone()
    x.grad = None
    m.zero_grad()
    W.convert(m, keep_ratio=0.3, min_k=1)
    assert isinstance(m.base, W.WTACRSLinear)
    # the frozen base keeps nothing for its weight; lora_A keeps 30% of x's rows (shared sample
    # group with base, which does not sample: base has no trainable weight)
    kept, y = saved_storage_bytes(lambda: m(x), list(m.parameters()))
    assert kept < 0.5 * x.numel() * 4
    y.backward(gy)
    torch.testing.assert_close(x.grad, want_x)  # grad_input is exact
    assert m.lora_A.weight.grad is not None and m.base.weight.grad is None
    # lora_B's input (r = 4 features per row) is sampled too; its grad is an unbiased estimate
    assert m.lora_B.weight.grad.shape == want_b.shape
