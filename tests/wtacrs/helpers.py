"""Shared inputs and tolerances of the WTA-CRS tests."""
import torch

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]

# Row norms: the kernels sum squares with 16 (8 for fp64) partial sums, torch with its own
# blocking: relative error of a few ulps of the math type, per dtype of x.
NORM_RTOL = {torch.float32: 1e-5, torch.float64: 1e-13, torch.bfloat16: 1e-5,
             torch.float16: 1e-5}
# grad_W of the kept rows: one GEMM in the dtype of grad_y (fp32 accumulation in 16-bit).
GEMM_TOL = {torch.float32: (1e-5, 1e-5), torch.float64: (1e-12, 1e-12),
            torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-3, 2e-3)}


def heavy_rows(n, d, dtype=torch.float32, alpha=1.5, generator=None):
    """Rows with heavy-tailed norms (Pareto(alpha) scales), as token activations have."""
    g = generator
    scale = torch.rand(n, 1, generator=g, dtype=torch.float64).clamp_min(1e-6) ** (-1.0 / alpha)
    return (torch.randn(n, d, generator=g, dtype=torch.float64) * scale).to(dtype)


def saved_storage_bytes(fn, exclude=()):
    """Bytes autograd keeps for backward by one call (each storage once), via saved-tensor hooks,
    and the result of the call."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out
