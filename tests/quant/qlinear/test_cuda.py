"""CUDA kernels of the qlinear ops (kernels/cuda/qlinear_kernels.cu, csrc/quant/qlinear_cuda.cpp)
against the plain-PyTorch reference and the C++ CPU ops on CPU copies of the same inputs.

Tolerances: int8 dynamic: codes, scales, int32 accumulators exact; y exact (the epilogue of
kernels/common/qlinear_math.h with __fmul_rn / __fadd_rn). Weight-only: helpers.sum_bound.
Imports pypaper only inside the tests, so the file collects on machines without a GPU.
"""
import pytest
import torch

from .helpers import heavy_tailed, sum_bound

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]


@pytest.mark.parametrize("act_qmax", [127, 63])
@pytest.mark.parametrize("M,K,N", [(1, 7, 5), (7, 129, 33), (129, 256, 70), (0, 8, 16)])
def test_int8_dynamic_cuda(M, K, N, act_qmax):
    from pypaper.quant import qlinear_ops as ops
    from pypaper.quant import qlinear_reference as ref

    x = torch.randn(M, K) * 2
    wp, sw, cs = ops.prepare_int8_dynamic(heavy_tailed((N, K)))
    b = torch.randn(N)
    acc, sa = torch.ops.pypaper.int8_dynamic_linear_int32(x.cuda(), wp.cuda(), cs.cuda(), N, act_qmax)
    acc_r, sa_r = ref.int8_dynamic_linear_int32(x, wp, cs, N, act_qmax)
    assert torch.equal(acc.cpu(), acc_r) and torch.equal(sa.cpu(), sa_r)
    y = torch.ops.pypaper.int8_dynamic_linear(x.cuda(), wp.cuda(), sw.cuda(), cs.cuda(), b.cuda(),
                                              act_qmax)
    assert torch.equal(y.cpu(), torch.ops.pypaper.int8_dynamic_linear(x, wp, sw, cs, b, act_qmax))


@pytest.mark.parametrize("M,K,N,G", [(1, 64, 7, 32), (5, 256, 33, 128), (40, 128, 20, 64)])
def test_weight_only_cuda(M, K, N, G):
    from pypaper.quant import qlinear_ops as ops
    from pypaper.quant import qlinear_reference as ref

    x = torch.randn(M, K)
    w = heavy_tailed((N, K))
    b = torch.randn(N)
    p4, s4, z4 = ops.prepare_int4_weight_only(w, G)
    y4 = torch.ops.pypaper.int4_weight_only_linear(x.cuda(), p4.cuda(), s4.cuda(), z4.cuda(), b.cuda())
    r4 = ref.int4_weight_only_linear(x, p4, s4, z4, b)
    assert torch.all((y4.cpu() - r4).abs() <= sum_bound(x, ref.dequantize_int4_weight(p4, s4, z4)))
    q8, s8 = ops.prepare_int8_weight_only(w)
    y8 = torch.ops.pypaper.int8_weight_only_linear(x.cuda(), q8.cuda(), s8.cuda(), None)
    r8 = ref.int8_weight_only_linear(x, q8, s8, None)
    assert torch.all((y8.cpu() - r8).abs() <= sum_bound(x, ref.dequantize_int8_weight(q8, s8)))


def test_quantized_model_on_cuda():
    from pypaper.quant import Int4WeightOnlyConfig, Int8DynamicConfig, quantize_

    for cfg in (Int8DynamicConfig(), Int4WeightOnlyConfig(32)):
        m = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
        q = quantize_(m, cfg)
        x = torch.randn(4, 64)
        y_cpu = q(x)
        y_gpu = q.cuda()(x.cuda()).cpu()
        torch.testing.assert_close(y_gpu, y_cpu, rtol=1e-5, atol=1e-5)
