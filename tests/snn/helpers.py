"""Shared inputs, configurations and tolerances of the snn tests."""
import itertools

import torch

from pypaper.snn import surrogate

# Surrogate classes with their SpikingJelly names (all eight exist in spikingjelly 2.0).
SURROGATES = ["Sigmoid", "ATan", "PiecewiseQuadratic", "Rect", "PiecewiseExp", "SoftSign",
              "SuperSpike", "Erf"]

# Every surrogate x hard/soft reset x decay_input x detach_reset.
CONFIGS = [
    dict(surrogate=s, v_reset=vr, decay_input=di, detach_reset=dr)
    for s, vr, di, dr in itertools.product(SURROGATES, [0.0, None], [True, False], [False, True])
]


def config_id(c):
    return (f"{c['surrogate']}-{'hard' if c['v_reset'] is not None else 'soft'}-"
            f"{'di' if c['decay_input'] else 'nodi'}-{'detach' if c['detach_reset'] else 'keep'}")


# Gradient tolerance against the reference's autograd, relative to the gradient's scale: the
# kernel runs the same recursion with the products in another order (fp32: a few ulp per step,
# growing with T through the carried gradient).
GRAD_TOL = {torch.float32: 2e-5, torch.float64: 1e-12}


def assert_close(got, want, dtype, what=""):
    tol = GRAD_TOL[dtype]
    scale = float(want.abs().max()) if want.numel() else 0.0
    err = float((got.double() - want.double()).abs().max()) if want.numel() else 0.0
    assert err <= tol * (scale + 1.0), f"{what}: max error {err:.3e}, scale {scale:.3e}"


def inputs(shape=(6, 4, 33), dtype=torch.float32, scale=1.0, shift=0.6):
    """Input currents that make a fair share of the neurons fire."""
    return (torch.randn(shape, dtype=torch.float64) * scale + shift).to(dtype)


def surrogate_of(name, alpha=None):
    cls = getattr(surrogate, name)
    return cls() if alpha is None else cls(alpha=alpha)
