"""Review s36 of pypaper.quant: regressions found as a demanding user (each failed before its fix).

* fake_quantize's CPU backward on an empty x with a learnable scale / zero point divided by the
  layout's inner size (0 for a per-tensor scale over 0 elements, or a zero-size dim after the
  channel axis): SIGFPE, the whole process killed. Run in a subprocess so that a crash reads as
  a failure, not as a dead test session.
* HAWQ's allocation named nn.MultiheadAttention's out_proj (the attention reads its weight
  directly), so ``quantize_(model, result.mapping)`` on any Transformer broke the attention's
  next call with "object has no attribute 'weight'"; quantize_ with that name or a filter_fn
  selecting it did the same. Now HAWQ leaves such layers out and quantize_ refuses them by name
  or filter_fn with a ValueError, before changing anything.
* quantize_ on nn.TransformerEncoderLayer / nn.TransformerEncoder: in eval mode torch runs its
  fused encoder kernel on linear1.weight / linear2.weight, read directly: AttributeError for the
  int8 / int4 / frozen power layers (inference, the point of quantizing, was broken), and for
  PowerExponentConfig(learn=True) the silently unquantized latent weight. quantize_ now sends the
  layers whose linears it swapped down torch's standard path.
"""
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import pypaper
import copy

from pypaper.quant import (Int4WeightOnlyConfig, Int8DynamicConfig, Int8DynamicLinear,
                           Int8WeightOnlyConfig, PowerExponentConfig, fake_quantize, hawq_allocate,
                           quantize_)
from pypaper.quant.hawq import select_layers

_EMPTY_LSQ = textwrap.dedent("""
    import sys, torch, pypaper
    from pypaper.quant import fake_quantize
    backend = sys.argv[1]
    cases = [((0, 4), None, ()), ((3, 0), 0, (3,)), ((0, 3, 5), 1, (3,)), ((2, 0, 4), 2, (4,)),
             ((0, 8), -1, (8,))]
    for shape, axis, pshape in cases:
        for sym in (True, False):
            for dt in (torch.float32, torch.float64, torch.bfloat16):
                x = torch.randn(shape, dtype=dt, requires_grad=True)
                mdt = torch.float64 if dt == torch.float64 else torch.float32
                s = torch.full(pshape, 0.1, dtype=mdt, requires_grad=True)
                z = torch.full(pshape, 0.0 if sym else 3.0, dtype=mdt, requires_grad=True)
                with pypaper.use_backend(backend):
                    y = fake_quantize(x, s, z, bits=8, axis=axis, symmetric=sym, grad_factor=0.5)
                    y.sum().backward()
                assert y.shape == x.shape and x.grad.shape == x.shape
                # the LSQ sums run over no element: both gradients are exactly zero
                assert s.grad is not None and s.grad.shape == s.shape and s.grad.dtype == s.dtype
                assert z.grad is not None and z.grad.shape == z.shape
                assert torch.count_nonzero(s.grad) == 0 and torch.count_nonzero(z.grad) == 0
    print("OK")
""")


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_fake_quantize_empty_input_learnable_scale_backward(backend):
    # before: "Floating point exception" (rc -8) in fake_quantize_backward_cpu's task split
    r = subprocess.run([sys.executable, "-c", _EMPTY_LSQ, backend], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, (r.returncode, r.stderr[-2000:])


def test_fake_quantize_empty_batch_lsq_in_a_model():
    # the everyday form: an LSQ-quantized activation fed an empty batch during training
    scale = nn.Parameter(torch.tensor(0.05))
    lin = nn.Linear(6, 4)
    x = torch.randn(0, 6)
    y = fake_quantize(lin(x), scale, 0, bits=4, grad_factor=0.1)
    y.sum().backward()
    assert scale.grad is not None and float(scale.grad) == 0.0
    assert lin.weight.grad is not None and torch.count_nonzero(lin.weight.grad) == 0


class _Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.enc = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.enc(x).mean(1))


def test_hawq_mapping_on_a_transformer_keeps_attention_working():
    model = _Encoder()
    x, y = torch.randn(4, 5, 16), torch.tensor([0, 1, 2, 0])
    res = hawq_allocate(model, nn.functional.cross_entropy, [(x, y)], avg_bits=4.5,
                        bits_options=(4, 8), n_probes=2)
    assert "enc.self_attn.out_proj" not in res.mapping
    assert set(res.mapping) == {"enc.linear1", "enc.linear2", "head"}
    # the budget counts only the layers it allocates
    assert sum(res.numels.values()) == 32 * 16 + 16 * 32 + 3 * 16
    ref = model.eval()(x)
    quantize_(model, res.mapping)  # before: out_proj swapped, the next call raised
    assert isinstance(model.enc.self_attn.out_proj, nn.modules.linear.NonDynamicallyQuantizableLinear)
    out = model(x)
    assert out.shape == ref.shape and torch.isfinite(out).all()


def test_hawq_select_layers_skips_unswappable():
    class Custom(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(nn.Linear(4, 4), Custom(4, 4))
    model.attn = nn.MultiheadAttention(4, 1)
    assert list(select_layers(model)) == ["0"]
    assert list(select_layers(model, lambda m, fqn: True)) == ["0"]
    with pytest.raises(ValueError, match="quantize_ can swap"):
        select_layers(nn.Sequential(Custom(4, 4)))


def test_quantize_refuses_explicit_out_proj_and_leaves_model_untouched():
    model = _Encoder()
    x = torch.randn(2, 5, 16)
    with pytest.raises(ValueError, match="out_proj.*MultiheadAttention|MultiheadAttention.*out_proj"):
        quantize_(model, {"enc.self_attn.out_proj": Int8DynamicConfig(), "head": Int8DynamicConfig()})
    with pytest.raises(ValueError, match="NonDynamicallyQuantizableLinear"):
        quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: fqn.startswith("enc"))
    # nothing was swapped by the refused calls
    assert type(model.head) is nn.Linear and type(model.enc.linear1) is nn.Linear
    model(x)
    # filter_fn leaving it out, the default selection and patterns keep working
    quantize_(model, Int8DynamicConfig(),
              filter_fn=lambda m, fqn: fqn.startswith("enc") and not fqn.endswith("out_proj"))
    quantize_(model, {"re:.*": Int8DynamicConfig()})
    assert isinstance(model.head, Int8DynamicLinear) and isinstance(model.enc.linear1, Int8DynamicLinear)
    assert model(x).shape == (2, 3)


_CONFIGS = [Int8DynamicConfig(), Int8WeightOnlyConfig(), Int4WeightOnlyConfig(32),
            PowerExponentConfig(bits=8, exponent=1.0), PowerExponentConfig(bits=2, learn=True)]


@pytest.mark.parametrize("cfg", _CONFIGS, ids=lambda c: repr(c))
@pytest.mark.parametrize("norm_first", [False, True])
def test_quantized_transformer_encoder_eval_runs_the_quantized_layers(cfg, norm_first):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True,
                                       norm_first=norm_first)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=not norm_first)
    ref = copy.deepcopy(model).eval()
    quantize_(model, cfg)
    x = torch.randn(3, 5, 32)
    mask = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] * 4 + [True]])
    # training mode takes torch's standard path: it calls the quantized modules (dropout is 0,
    # so it is the eval function too)
    with torch.no_grad():
        want = model.train()(x)
        want_masked = model(x, src_key_padding_mask=mask)
        model.eval()
        got = model(x)  # before: AttributeError ... has no attribute 'weight' (or, learn=True,
        got_masked = model(x, src_key_padding_mask=mask)  # the unquantized latent weight)
        full = ref(x)
    assert not got_masked.is_nested and got_masked.shape == x.shape
    tol = 1e-4 if isinstance(cfg, Int4WeightOnlyConfig) else 1e-5  # int4: split activations
    torch.testing.assert_close(got, want, rtol=0, atol=tol)
    torch.testing.assert_close(got_masked, want_masked, rtol=0, atol=tol)
    # it is the quantized model, not the float one
    assert (got - full).abs().max() > 1e-4
    # the layer alone (no encoder around it), with grad enabled
    single = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True).eval()
    quantize_(single, cfg)
    assert single(x).shape == x.shape


def test_transformer_fast_path_kept_where_nothing_was_swapped():
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), nn.Linear(16, 4))
    quantize_(model, Int8DynamicConfig(), filter_fn=lambda m, fqn: fqn == "1")
    assert model[0].activation_relu_or_gelu == 1  # untouched: its linears are float
    assert model.eval()(torch.randn(2, 3, 16)).shape == (2, 3, 4)


@pytest.mark.parametrize("cfg", [Int8DynamicConfig(), Int4WeightOnlyConfig(32),
                                 PowerExponentConfig(bits=4, exponent=1.0)], ids=repr)
def test_quantizing_twice_says_so(cfg):
    # before: "no layer of model matched config/filter_fn (the model has 0 nn.Linear layers)",
    # which reads as if the model had no linear layers at all
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    quantize_(model, cfg)
    x = torch.randn(2, 64)
    y = model(x)
    with pytest.raises(ValueError, match="2 layers already quantized.*cannot be quantized again"):
        quantize_(model, cfg)
    with pytest.raises(TypeError, match="'0'.*already quantized"):
        quantize_(model, {"0": cfg})
    torch.testing.assert_close(model(x), y, rtol=0, atol=0)  # untouched


@pytest.mark.parametrize("cfg", [Int8WeightOnlyConfig(), PowerExponentConfig(bits=4, exponent=1.0)],
                         ids=repr)
def test_quantize_keeps_eval_mode(cfg):
    # before: the quantized layers of a model in eval mode came back in training mode
    model = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 4))).eval()
    quantize_(model, cfg)
    assert not any(m.training for m in model.modules())
    model = nn.Sequential(nn.Linear(8, 8)).train()
    quantize_(model, cfg)
    assert all(m.training for m in model.modules())


def test_power_freeze_and_fewbit_convert_keep_eval_mode():
    import pypaper.quant.fewbit as fb
    from pypaper.quant import freeze

    model = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 4)).eval()
    model.act = nn.functional.silu  # a function attribute: converted to a module too
    fb.convert(model, bits=2)
    assert not any(m.training for m in model.modules())
    fb.convert(model, bits=3)  # rebuilt with other bits
    assert not any(m.training for m in model.modules())
    quantize_(model, PowerExponentConfig(bits=4, learn=True))
    freeze(model)
    assert not any(m.training for m in model.modules())
