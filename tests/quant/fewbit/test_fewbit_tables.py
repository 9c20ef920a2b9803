"""The optimal derivative tables: the DP against brute force, and their properties."""
import itertools
import math

import numpy as np
import pytest
import torch

import pypaper
import pypaper.quant.fewbit as fb
from pypaper.quant.fewbit import tables


def _objective(grid, d, w, cuts):
    """sum_i w_i (d_i - level of i's segment)^2 with weighted-mean levels (computed directly)."""
    bounds = [0, *cuts, len(grid)]
    total = 0.0
    for a, b in zip(bounds[:-1], bounds[1:]):
        ws, ds = w[a:b], d[a:b]
        level = (ws * ds).sum() / ws.sum()
        total += (ws * (ds - level) ** 2).sum()
    return total


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("pieces", [2, 3, 4])
def test_dp_equals_brute_force(pieces, seed):
    rng = np.random.default_rng(seed)
    n = 12
    grid = np.sort(rng.uniform(-3, 3, n))
    d = rng.normal(size=n) if seed % 2 else np.tanh(grid) + 0.1 * rng.normal(size=n)
    w = rng.uniform(0.1, 1.0, n)
    best = min(_objective(grid, d, w, c) for c in itertools.combinations(range(1, n), pieces - 1))
    borders, levels, err = pypaper._C.fewbit_optimal_fit(grid, d, w, pieces)
    assert err == pytest.approx(best, rel=1e-12, abs=1e-14)
    # the borders the DP returns realise that optimum, with the weighted means as levels
    cuts = [int(np.searchsorted(grid, b)) for b in borders]
    assert _objective(grid, d, w, cuts) == pytest.approx(best, rel=1e-12, abs=1e-14)
    assert len(levels) == pieces and np.all(np.diff(borders) > 0)


@pytest.mark.parametrize("name,params", [("gelu", ()), ("silu", ()), ("tanh", ()),
                                         ("softplus", (1.0, 20.0)), ("hardswish", ())])
def test_error_decreases_with_bits(name, params):
    errs = [tables.approximation(name, b, params).error for b in (1, 2, 3, 4)]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < errs[0] / 10


def test_tables_match_the_derivative_they_approximate():
    """The table's error, recomputed on an independent fine grid in numpy, agrees with the DP's
    and beats the obvious 2-bit alternatives (uniform borders with their best levels)."""
    approx = tables.approximation("gelu", 2)
    x = np.linspace(-8, 8, 200001)
    w = np.exp(-x * x / 2) / math.sqrt(2 * math.pi) * (x[1] - x[0])
    d = tables.derivative("gelu", (), x)
    code = (x[:, None] > np.array(approx.borders)[None, :]).sum(axis=1)
    err = (w * (d - np.array(approx.levels)[code]) ** 2).sum()
    assert err == pytest.approx(approx.error, rel=0.02)
    for borders in ([-1.0, 0.0, 1.0], [-0.25, 0.0, 0.25], [-1.5, -0.5, 0.5]):
        c = (x[:, None] > np.array(borders)[None, :]).sum(axis=1)
        alt = sum(((w * (d - (w[c == k] * d[c == k]).sum() / w[c == k].sum()) ** 2)[c == k]).sum()
                  for k in range(4))
        assert err < alt


def test_density_changes_the_table():
    """Inputs centred at 1 (sd 0.5) move every border right of 0; samples of that density, fitted
    by fit_density, give nearly the same table; each table is optimal for its own density."""
    default = tables.approximation("gelu", 2)
    shifted_pdf = lambda x: np.exp(-((x - 1.0) ** 2) / 0.5)  # noqa: E731
    shifted = tables.approximation("gelu", 2, density=shifted_pdf, grid=(-8, 8, 2048))
    assert min(shifted.borders) > 0.05 and max(default.borders) == pytest.approx(0.5, abs=0.01)
    samples = torch.randn(20000) * 0.5 + 1.0
    fitted = tables.approximation("gelu", 2, density=samples)
    np.testing.assert_allclose(fitted.borders, shifted.borders, atol=0.05)
    m = fb.GELU(bits=2, density=samples)
    assert m.approximation.borders == fitted.borders

    x = np.linspace(-8, 8, 20001)
    w = shifted_pdf(x)
    w = w / w.sum()
    d = tables.derivative("gelu", (), x)

    def err(a):
        code = (x[:, None] > np.array(a.borders)[None, :]).sum(axis=1)
        return (w * (d - np.array(a.levels)[code]) ** 2).sum()

    assert err(shifted) < err(default) / 2


@pytest.mark.parametrize("density,match", [
    (lambda x: -np.ones_like(x), "non-negative"),
    (lambda x: np.zeros_like(x), "does not integrate"),
    (lambda x: np.full_like(x, np.inf), "finite"),
    (lambda x: np.ones(3), "one value per grid point"),
])
def test_bad_density_raises(density, match):
    with pytest.raises(ValueError, match=match):
        tables.approximation("silu", 2, density=density)


def test_dp_rejects_bad_arrays():
    g = np.linspace(-1, 1, 10)
    with pytest.raises(ValueError, match="at least as many points as pieces"):
        pypaper._C.fewbit_optimal_fit(g[:3], g[:3], np.ones(3), 4)
    with pytest.raises(ValueError, match="strictly increasing"):
        pypaper._C.fewbit_optimal_fit(g[::-1].copy(), g, np.ones(10), 4)
    with pytest.raises(ValueError, match="weights must be finite and >= 0"):
        pypaper._C.fewbit_optimal_fit(g, g, -np.ones(10), 2)
    with pytest.raises(ValueError, match="one length"):
        pypaper._C.fewbit_optimal_fit(g, g[:5], np.ones(10), 2)


@pytest.mark.parametrize("bits", [0, 5, 2.0, True, "2"])
def test_bad_bits_raise(bits):
    with pytest.raises(ValueError, match="bits"):
        fb.GELU(bits=bits)
    with pytest.raises(ValueError, match="bits"):
        fb.activation(torch.randn(4), "gelu", bits)


def test_unknown_activation_and_bad_inputs_raise():
    with pytest.raises(ValueError, match="activation must be one of"):
        fb.activation(torch.randn(4), "swish", 2)
    with pytest.raises(ValueError, match="takes 1 params"):
        fb.activation(torch.randn(4), "elu", 2, params=())
    with pytest.raises(TypeError, match="x must be float32"):
        fb.activation(torch.arange(4), "gelu", 2)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        fb.GELU()([1.0, 2.0])
    with pytest.raises(ValueError, match="min_val must be below max_val"):
        fb.Hardtanh(1.0, -1.0)
    with pytest.raises(ValueError, match="approximate"):
        fb.GELU("fast")
    # the op's own checks (what a direct torch.ops caller sees)
    b, l = fb.approximation("gelu", 2).tensors(torch.float32, "cpu")
    op = torch.ops.pypaper
    with pytest.raises(ValueError, match="activation must be one of"):
        op.fewbit_forward(torch.randn(4), "swish", [], b, l, 2, False)
    with pytest.raises(ValueError, match="bits must be 1, 2, 3 or 4"):
        op.fewbit_forward(torch.randn(4), "gelu", [], b, l, 5, False)
    with pytest.raises(ValueError, match="levels must be a 1-D tensor of 2"):
        op.fewbit_forward(torch.randn(4), "gelu", [], b, l[:3], 2, False)
    with pytest.raises(TypeError, match="borders must be Float"):
        op.fewbit_forward(torch.randn(4), "gelu", [], b.double(), l, 2, False)
    with pytest.raises(ValueError, match="fold=True needs 2 or 3 borders"):
        op.fewbit_forward(torch.randn(4), "gelu", [], torch.arange(4.0), l, 2, True)
    with pytest.raises(ValueError, match="do not fit in 1 bits"):
        op.fewbit_forward(torch.randn(4), "gelu", [], b, l[:2], 1, False)
    with pytest.raises(ValueError, match="codes must be a 1-D tensor of ceil"):
        op.fewbit_backward(torch.randn(9), torch.zeros(2, dtype=torch.uint8), l, 2)
    with pytest.raises(TypeError, match="codes must be uint8"):
        op.fewbit_backward(torch.randn(8), torch.zeros(2, dtype=torch.int32), l, 2)
