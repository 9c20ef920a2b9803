"""Shared inputs and tolerances of the quant tests."""
import torch

# Tolerance table (rtol, atol) per dtype, against the plain-PyTorch reference in the same dtype.
# Forward values and codes: the kernels and the reference do the same fp32 (fp64) operations in
# the same order, so they must agree to the bit: exact for every dtype.
# Reduced gradients (grad_scale, grad_zero_point) are sums of per-element terms such as
# dy * ((q - z) * s - x) / s, whose operands are of size |dy| * (|x| / s + |q - z|) while the term
# itself may cancel to almost nothing, and whose summation order differs (vector lanes, tasks).
# Bound: |got - want| <= tol * sum over the channel of |dy| * (|x| / s + 2^bits).
GRAD_SUM_TOL = {
    torch.float32: 1e-6,
    torch.bfloat16: 1e-6,  # math is fp32 for 16-bit inputs too
    torch.float16: 1e-6,
    torch.float64: 1e-14,
}

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]

# (shape, axis, group_size)
GRANULARITIES = [
    ((64, 33), None, None),
    ((64, 33), 0, None),
    ((64, 33), 1, None),
    ((5, 6, 7), 1, None),
    ((16, 64), None, 16),
    ((3, 4, 32), None, 8),
]


def params_for(shape, axis, group_size, symmetric=True, dtype=torch.float32, device="cpu"):
    """A scale of sensible magnitude and a zero point, one per channel."""
    if group_size is not None:
        pshape = (*shape[:-1], shape[-1] // group_size)
    elif axis is not None:
        pshape = (shape[axis],)
    else:
        pshape = ()
    scale = (torch.rand(pshape, dtype=dtype, device=device) * 0.05 + 0.02)
    zp = torch.zeros(pshape, dtype=dtype, device=device) if symmetric else \
        torch.randint(100, 156, pshape, device=device).to(dtype)
    return scale, zp


def operand_sum(g, x, s, axis, group_size, bits=8):
    """Per-channel sum of |dy| * (|x| / s + 2^bits): the size of what a grad_scale sum adds up."""
    from pypaper.quant.layout import layout_of

    layout = layout_of(x.shape, axis, group_size)
    g3 = g.double().abs().reshape(layout)
    x3 = x.double().abs().reshape(layout)
    s3 = s.double().reshape(1, -1, 1)
    return (g3 * (x3 / s3 + 2 ** bits)).sum(dim=(0, 2)).reshape(s.shape)


def close_sum(a, b, terms, dtype):
    """|a - b| <= tol * sum of |terms| (per channel), the error bound of a reordered sum."""
    tol = GRAD_SUM_TOL[dtype]
    bound = tol * terms + 1e-30
    return bool(((a.double() - b.double()).abs() <= bound.double()).all())
