"""Shared inputs and instruction-path helpers of the qlinear tests."""
import contextlib
import os

import torch

from pypaper.quant import qlinear_ops as ops

ISAS = ("scalar", "avx2", "vnni")


@contextlib.contextmanager
def isa(name):
    """Run the C++ qlinear kernels on one instruction path (PYPAPER_QLINEAR_ISA)."""
    old = os.environ.get("PYPAPER_QLINEAR_ISA")
    os.environ["PYPAPER_QLINEAR_ISA"] = name
    try:
        yield
    finally:
        if old is None:
            del os.environ["PYPAPER_QLINEAR_ISA"]
        else:
            os.environ["PYPAPER_QLINEAR_ISA"] = old


def compiled_isas():
    """The instruction paths pypaper._C was built with (scalar always)."""
    out = []
    x = torch.randn(1, 4)
    w = ops.prepare_int8_dynamic(torch.randn(3, 4))
    for name in ISAS:
        with isa(name):
            try:
                torch.ops.pypaper.int8_dynamic_linear(x, *w, None, 127)
            except RuntimeError:
                continue
        out.append(name)
    return out


def heavy_tailed(shape, generator=None):
    """Student-t-like weights (outliers, as in trained layers): normal / sqrt(chi2_3 / 3)."""
    z = torch.randn(shape, generator=generator)
    chi = torch.randn(3, *shape, generator=generator).pow(2).mean(0)
    return z / chi.sqrt().clamp_min(0.05)


def sum_bound(x, w_hat, rel=2e-6):
    """Error bound of an fp32 dot product in another summation order: rel * sum_k |x_k w_k|
    (rel ~ K^(1/2) ulp for random orders; 2e-6 covers K up to ~4096 with margin)."""
    return rel * (x.abs().double() @ w_hat.abs().double().t()).float() + 1e-7


def split_act_bound(x, w_hat, group_size):
    """The extra error of the SIMD int4 paths (kernels/cpu/qlinear_int4_split.h): x rounded per
    group to 16-bit fixed point, |x~_k - x_k| <= 0.51 sx_g with sx_g = max_{k in g} |x_k| / 32639,
    so |y - y_exact| grows by sum_k |w_k| 0.51 sx_g."""
    m, k = x.shape
    sx = x.abs().reshape(m, k // group_size, group_size).amax(-1) / 32639
    per_k = sx.repeat_interleave(group_size, dim=1).double()
    return (0.51 * per_k @ w_hat.abs().double().t()).float()


def int4_bound(isa_name, x, w_hat, group_size):
    """The tolerance of the int4 weight-only op on one path: an fp32 summation bound, plus the
    activation split on the SIMD paths (the scalar path keeps fp32 activations)."""
    bound = sum_bound(x, w_hat)
    if isa_name != "scalar" and 0 < x.shape[0] <= 128:  # the split kernels serve M <= 128
        bound = bound + split_act_bound(x, w_hat, group_size)
    return bound


def split8_act_bound(x, w_hat, group_size=None):
    """The extra error of the int8 weight-only fixed-point kernels (AVX-512 VNNI at M <= 32:
    kernels/cpu/qlinear_int8_split.h; AVX2 at M <= 8: qlinear_int8_madd.h; groups of a multiple of
    64 or per channel): x rounded to 16-bit fixed point per chunk of 64 inputs,
    |x~_k - x_k| <= 0.51 max_chunk |x| / 32639."""
    m, k = x.shape
    kp = (k + 63) // 64 * 64
    xp = torch.nn.functional.pad(x.abs(), (0, kp - k))
    sx = xp.reshape(m, kp // 64, 64).amax(-1) / 32639
    per_k = sx.repeat_interleave(64, dim=1)[:, :k].double()
    return (0.51 * per_k @ w_hat.abs().double().t()).float()


def int8_wo_bound(isa_name, x, w_hat, group_size=None):
    """Tolerance of the int8 weight-only op on one path (helpers.sum_bound, plus the activation
    rounding of the VNNI / AVX2 fixed-point kernels where they apply)."""
    m, k = x.shape
    bound = sum_bound(x, w_hat)
    g = k if group_size is None else group_size
    rows = {"vnni": 32, "avx2": 8}.get(isa_name, 0)
    if 0 < m <= rows and k > 0 and (g == k or g % 64 == 0):
        bound = bound + split8_act_bound(x, w_hat)
    return bound
