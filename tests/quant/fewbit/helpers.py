"""Shared inputs of the few-bit tests."""
import torch

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]

# (module name in pypaper.quant.fewbit, torch.nn twin, kwargs)
APPROXIMATED = [
    ("GELU", torch.nn.GELU, {}),
    ("GELU", torch.nn.GELU, {"approximate": "tanh"}),
    ("SiLU", torch.nn.SiLU, {}),
    ("Mish", torch.nn.Mish, {}),
    ("ELU", torch.nn.ELU, {"alpha": 0.7}),
    ("SELU", torch.nn.SELU, {}),
    ("Softplus", torch.nn.Softplus, {"beta": 2.0, "threshold": 5.0}),
    ("Sigmoid", torch.nn.Sigmoid, {}),
    ("Tanh", torch.nn.Tanh, {}),
    ("LogSigmoid", torch.nn.LogSigmoid, {}),
    ("Hardswish", torch.nn.Hardswish, {}),
]
EXACT = [
    ("ReLU", torch.nn.ReLU, {}),
    ("LeakyReLU", torch.nn.LeakyReLU, {"negative_slope": 0.05}),
    ("ReLU6", torch.nn.ReLU6, {}),
    ("Hardtanh", torch.nn.Hardtanh, {"min_val": -0.5, "max_val": 2.0}),
    ("Hardsigmoid", torch.nn.Hardsigmoid, {}),
]


def inputs(n, dtype, scale=3.0):
    """Values that hit every piece, the borders of the exact ones, and the kinks exactly."""
    x = torch.randn(n, dtype=torch.float64) * scale
    specials = torch.tensor([0.0, -0.0, 6.0, -3.0, 3.0, -0.5, 2.0, 1e-8, -1e-8, 30.0, -30.0],
                            dtype=torch.float64)
    k = min(n, specials.numel())
    x[:k] = specials[:k]
    return x.to(dtype)
