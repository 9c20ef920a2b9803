"""Triton twins of the qlinear ops (pypaper/quant/qlinear_triton.py) against the plain-PyTorch
reference. Without a GPU they run under TRITON_INTERPRET=1 on CPU tensors (set before triton or
pypaper is imported; small sizes for the interpreter); with one, compiled on CUDA.

Tolerances: int8 dynamic: codes, scales and int32 accumulators exact; y exact (the epilogue is
launched without FMA contraction). Weight-only: helpers.sum_bound (fp32 tl.dot, another order).
"""
import copy
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

pytest.importorskip("triton")

import pypaper  # noqa: E402
from pypaper.quant import Int4WeightOnlyConfig, Int8DynamicConfig, quantize_  # noqa: E402
from pypaper.quant import qlinear_ops as ops  # noqa: E402
from pypaper.quant import qlinear_reference as ref  # noqa: E402
from pypaper.quant import qlinear_registration  # noqa: E402

from .helpers import heavy_tailed, sum_bound  # noqa: E402

tk = qlinear_registration.load_triton()
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_OK, _WHY = tk.triton_available(DEVICE)
pytestmark = [pytest.mark.triton, pytest.mark.skipif(not _OK, reason=_WHY)]
T = torch.ops.pypaper


@pytest.mark.parametrize("act_qmax", [127, 63])
@pytest.mark.parametrize("M,K,N", [(1, 7, 5), (5, 33, 17), (20, 130, 40), (0, 8, 4)])
def test_int8_dynamic(M, K, N, act_qmax):
    x = (torch.randn(M, K) * 2).to(DEVICE)
    wp, sw, cs = [t.to(DEVICE) for t in ops.prepare_int8_dynamic(heavy_tailed((N, K)))]
    b = torch.randn(N, device=DEVICE)
    acc, sa = T.int8_dynamic_linear_int32_triton(x, wp, cs, N, act_qmax)
    acc_r, sa_r = ref.int8_dynamic_linear_int32(x, wp, cs, N, act_qmax)
    assert torch.equal(acc, acc_r) and torch.equal(sa, sa_r)
    y = T.int8_dynamic_linear_triton(x, wp, sw, cs, b, act_qmax)
    assert torch.equal(y, ref.int8_dynamic_linear(x, wp, sw, cs, b, act_qmax))
    assert not any(t._is_view() for t in (acc, sa, y))  # an op returns no views


@pytest.mark.parametrize("M,K,N,G", [(1, 64, 7, 32), (6, 128, 33, 64), (17, 96, 20, 32)])
def test_weight_only(M, K, N, G):
    x = torch.randn(M, K, device=DEVICE)
    w = heavy_tailed((N, K))
    b = torch.randn(N, device=DEVICE)
    p4, s4, z4 = [t.to(DEVICE) for t in ops.prepare_int4_weight_only(w, G)]
    y4 = T.int4_weight_only_linear_triton(x, p4, s4, z4, b)
    r4 = ref.int4_weight_only_linear(x, p4, s4, z4, b)
    assert torch.all((y4 - r4).abs() <= sum_bound(x, ref.dequantize_int4_weight(p4, s4, z4)))
    q8, s8 = [t.to(DEVICE) for t in ops.prepare_int8_weight_only(w, G)]
    y8 = T.int8_weight_only_linear_triton(x, q8, s8, None)
    r8 = ref.int8_weight_only_linear(x, q8, s8, None)
    assert not y4._is_view() and not y8._is_view()  # an op returns no views
    assert torch.all((y8 - r8).abs() <= sum_bound(x, ref.dequantize_int8_weight(q8, s8)))


def test_modules_on_the_triton_backend():
    m = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16)).to(DEVICE)
    x = torch.randn(3, 64, device=DEVICE, requires_grad=True)
    for cfg in (Int8DynamicConfig(), Int4WeightOnlyConfig(32)):
        q = quantize_(copy.deepcopy(m), cfg)
        with pypaper.use_backend("reference"):
            want = q(x)
        with pypaper.use_backend("triton"):
            got = q(x)
            got.sum().backward()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert x.grad is not None and x.grad.shape == x.shape
        x.grad = None


def test_errors():
    wp, sw, cs = [t.to(DEVICE) for t in ops.prepare_int8_dynamic(torch.randn(8, 16))]
    with pytest.raises(ValueError, match="act_qmax must be 127 or 63"):
        T.int8_dynamic_linear_triton(torch.randn(2, 16, device=DEVICE), wp, sw, cs, None, 5)
    with pytest.raises(ValueError, match="does not hold N=8"):
        T.int8_dynamic_linear_triton(torch.randn(2, 40, device=DEVICE), wp, sw, cs, None, 127)
    with pytest.raises(TypeError, match="x must be a 2-D float32"):
        T.int8_dynamic_linear_triton(torch.randn(2, 16, device=DEVICE).double(), wp, sw, cs, None, 127)
