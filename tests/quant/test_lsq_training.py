"""Drop-in: an MLP whose weights and activations are fake-quantized with learnable LSQ scales
trains on real data (scikit-learn's handwritten digits) to the accuracy of its float twin."""
import math

import pytest
import torch

from pypaper.quant import fake_quantize

datasets = pytest.importorskip("sklearn.datasets")


class LSQLinear(torch.nn.Linear):
    """nn.Linear with 4-bit per-output-channel weights and 8-bit activations, LSQ step sizes."""

    def __init__(self, in_features, out_features, w_bits=4, a_bits=8):
        super().__init__(in_features, out_features)
        self.w_bits, self.a_bits = w_bits, a_bits
        qmax_w = 2 ** (w_bits - 1) - 1
        self.w_scale = torch.nn.Parameter(self.weight.detach().abs().amax(1) / qmax_w)
        self.a_scale = torch.nn.Parameter(torch.tensor(4.0 / 2 ** (a_bits - 1)))

    def forward(self, x):
        g_w = 1.0 / math.sqrt(self.weight[0].numel() * (2 ** (self.w_bits - 1) - 1))
        g_a = 1.0 / math.sqrt(x.numel() * (2 ** (self.a_bits - 1) - 1))
        w = fake_quantize(self.weight, self.w_scale, torch.zeros_like(self.w_scale), self.w_bits,
                          axis=0, grad_factor=g_w)
        x = fake_quantize(x, self.a_scale, 0, self.a_bits, grad_factor=g_a)
        return torch.nn.functional.linear(x, w, self.bias)


def _train(make_linear, steps=200):
    torch.manual_seed(0)
    digits = datasets.load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(y))
    tr, te = perm[:1400], perm[1400:]
    model = torch.nn.Sequential(make_linear(64, 64), torch.nn.ReLU(), make_linear(64, 10))
    # Adam moves every parameter by about lr per step: step sizes of ~0.03 need a smaller lr
    scales = [p for n, p in model.named_parameters() if n.endswith("_scale")]
    others = [p for n, p in model.named_parameters() if not n.endswith("_scale")]
    opt = torch.optim.Adam([{"params": others, "lr": 1e-2}, {"params": scales, "lr": 1e-3}])
    for _ in range(steps):
        idx = tr[torch.randint(0, len(tr), (128,))]
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = (model(x[te]).argmax(1) == y[te]).float().mean().item()
    return model, acc


def test_lsq_quantized_mlp_trains_like_float():
    model, acc_q = _train(LSQLinear)
    _, acc_f = _train(torch.nn.Linear)
    assert acc_f > 0.9
    assert acc_q > 0.9 and acc_q > acc_f - 0.04
    # the step sizes were learned (moved from their initial values) and stay positive. (The
    # first layer's activation step does not move: digit pixels are multiples of 1/16, exactly
    # on its initial grid, so LSQ's round(x/s) - x/s is 0 there.)
    first, last = model[0], model[2]
    assert first.w_scale.grad is not None and bool((first.w_scale > 0).all())
    assert float(last.a_scale.detach()) != pytest.approx(4.0 / 128)
