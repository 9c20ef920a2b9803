"""The derivative approximations: exact two-level tables and the DP-optimal few-bit ones.

For an activation f, b bits and an input density w, the table is the piecewise-constant q with
2^b pieces minimising  integral (f'(x) - q(x))^2 w(x) dx  (Novikov et al., "Few-Bit Backward",
ICML 2023). It is computed at first use by the exact dynamic program of csrc/quant/fewbit_dp.h
(pypaper._C.fewbit_optimal_fit) on a fine grid, with f' taken from torch's own autograd formula of
the activation in float64, and cached per (activation, params, bits) for the default density
(standard normal, the paper's choice for inputs after a normalisation layer).

The 1-bit exact ones need no DP: their derivative takes two values, so one bit per element gives
torch's backward bit for bit: ReLU (0 | 1 above 0), LeakyReLU (slope | 1 above 0), Hardtanh/ReLU6
(1 on the open interval (min, max), else 0), Hardsigmoid (1/6 on (-3, 3), else 0). A NaN input
counts as above every border (kernels/common/fewbit_pack.h), and the borders are chosen so that
NaN gets torch's gradient too: ReLU and Hardtanh pass it, LeakyReLU multiplies it by the slope,
Hardsigmoid gives 0 (a +inf border after the interval, with ``fold``, moves NaN to the parity
torch uses). The approximated ones give NaN the top piece's level (torch's gradient is NaN there:
b bits have no spare code for it).
"""
from __future__ import annotations

import contextlib
import functools
import math
import numbers
import sys
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from . import reference

# name -> number of scalar params (the same table as csrc/quant/fewbit_args.h)
PARAMS = {
    "gelu": 0, "gelu_tanh": 0, "silu": 0, "mish": 0, "elu": 1, "selu": 0, "softplus": 2,
    "sigmoid": 0, "tanh": 0, "logsigmoid": 0, "hardswish": 0,
    "relu": 0, "leaky_relu": 1, "hardtanh": 2, "hardsigmoid": 0,
}
EXACT = ("relu", "leaky_relu", "hardtanh", "hardsigmoid")
DEFAULT_BITS = 2
APPROXIMATED = tuple(n for n in PARAMS if n not in EXACT)

# The default grid: the standard normal puts 1e-15 of its mass outside [-8, 8]; 2048 points
# resolve the borders to 0.008 (the DP is O(2^b * n^2): 0.1 s at 4 bits).
DEFAULT_GRID = (-8.0, 8.0, 2048)

# torch's hardsigmoid backward multiplies by 1/6 rounded to float32, for float64 inputs too.
_ONE_SIXTH_F32 = float(np.float32(1.0) / np.float32(6.0))

DensityLike = Union[None, Callable[[np.ndarray], np.ndarray], torch.Tensor, np.ndarray]


def check_name(name: str, params: Sequence[float]) -> tuple:
    if name not in PARAMS:
        raise ValueError(f"activation must be one of {sorted(PARAMS)}, got {name!r}")
    params = tuple(float(p) for p in params)
    if len(params) != PARAMS[name]:
        raise ValueError(f"activation {name!r} takes {PARAMS[name]} params, got {len(params)}")
    if not all(math.isfinite(p) for p in params):
        raise ValueError(f"params of {name!r} must be finite, got {params}")
    return params


def check_bits(bits) -> int:
    """bits as an int in 1..4; None means the default (2). Any integral number is taken (numpy's
    from a sweep or a config file: np.int64(2) was refused as "not an int"); bools are not."""
    if bits is None:
        return DEFAULT_BITS
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or not 1 <= bits <= 4:
        raise ValueError(f"bits must be an int in 1..4, got {bits!r}")
    return int(bits)


class Approximation:
    """A piecewise-constant derivative: ``borders`` (ascending), ``levels`` (2^bits values),
    ``fold`` (code = parity of the piece: a two-level derivative on an open interval; borders 1
    and 2, when there, are the interval's end and +inf), and its
    weighted L2 ``error`` against f' under the density it was fitted for (0 when exact)."""

    def __init__(self, name: str, params: tuple, bits: int, borders: Sequence[float],
                 levels: Sequence[float], fold: bool = False, error: float = 0.0,
                 exact: bool = False):
        self.name, self.params, self.bits = name, tuple(params), int(bits)
        self.borders = tuple(float(b) for b in borders)
        self.levels = tuple(float(v) for v in levels)
        self.fold, self.error, self.exact = bool(fold), float(error), bool(exact)
        self._tensors: dict = {}

    # The (dtype, device) -> tensors cache is not part of the table: a pickled / torch.save'd
    # model kept it, and torch.load(map_location=...) moved its tensors without changing their
    # keys. A model saved on cuda:0 and loaded with map_location="cpu" then moved back with
    # .cuda() found CPU tables under the cuda:0 key (the op refused them); one loaded with
    # map_location="meta" and materialised with to_empty(device="cpu") got meta tables under
    # the CPU key, so the op dispatched to its fake kernel and returned uninitialised outputs.
    # The cache is rebuilt from borders / levels (plain floats) on first use.
    def __getstate__(self):
        state = dict(self.__dict__)
        state["_tensors"] = {}
        return state

    def __repr__(self) -> str:
        return (f"Approximation({self.name!r}, params={self.params}, bits={self.bits}, "
                f"borders={tuple(round(b, 4) for b in self.borders)}, "
                f"levels={tuple(round(v, 4) for v in self.levels)}, error={self.error:.3g})")

    def tensors(self, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(borders, levels) in the math dtype of inputs of ``dtype`` (fp64 for fp64, else fp32)
        on ``device``. With ``fold`` a finite second border (the interval's end) becomes the
        largest value of that dtype below it, so that ``x > border`` means x >= end."""
        mdt = torch.float64 if dtype == torch.float64 else torch.float32
        if not torch.compiler.is_compiling():
            fake = torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE)
            if fake is not None:
                # eager code under a FakeTensorMode (shape / memory estimation): the op refuses
                # real tensors among fake ones, so the (real, cached) CPU table enters as fake
                # constants, moved to the input's device inside the mode
                return tuple(fake.from_tensor(t).to(device) for t in self._real(mdt, "cpu"))
        return self._real(mdt, device)

    def _real(self, mdt: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (mdt, torch.device(device))
        hit = self._tensors.get(key)
        if hit is None:
            with _outside_transforms():
                # device="cpu" spelled out: under torch.set_default_device / `with
                # torch.device("meta")` a bare factory call would build the table elsewhere
                b = torch.tensor(self.borders, dtype=mdt, device="cpu")
                if self.fold and math.isfinite(self.borders[1]):
                    b[1] = torch.nextafter(b[1], torch.tensor(-math.inf, dtype=mdt, device="cpu"))
                hit = (b.to(device),
                       torch.tensor(self.levels, dtype=mdt, device="cpu").to(device))
            if not torch.compiler.is_compiling():
                self._tensors[key] = hit
        return hit


def exact_approximation(name: str, params: tuple) -> Approximation:
    """The 1-bit table of an activation whose derivative has two values. A NaN input counts as
    above every border: relu's lands on level 1 (torch passes the gradient: x <= 0 is false);
    leaky_relu's on the slope (torch: x > 0 is false) by a +inf border folded back to code 0;
    hardtanh's on level 1 (torch: x <= min or x >= max is false) by a +inf border folded to
    code 1; hardsigmoid's on 0 (torch: -3 < x < 3 is false), the folded parity of 2 borders."""
    inf = math.inf
    if name == "relu":
        return Approximation(name, params, 1, (0.0,), (0.0, 1.0), exact=True)
    if name == "leaky_relu":
        return Approximation(name, params, 1, (0.0, inf), (params[0], 1.0), fold=True,
                             exact=True)
    if name == "hardtanh":
        lo, hi = params
        if not lo < hi:
            raise ValueError(f"hardtanh needs min_val < max_val, got {lo} and {hi}")
        return Approximation(name, params, 1, (lo, hi, inf), (0.0, 1.0), fold=True, exact=True)
    if name == "hardsigmoid":
        return Approximation(name, params, 1, (-3.0, 3.0), (0.0, _ONE_SIXTH_F32), fold=True,
                             exact=True)
    raise ValueError(f"{name!r} has no exact 1-bit table")


@contextlib.contextmanager
def _outside_transforms():
    """Runs the block as if no torch.func transform and no dispatch mode were active: what a
    table builds there (numpy of an autograd gradient, tensors cached for later calls) must be
    plain tensors, not wrapped ones (a tensor without storage for numpy; a cached tensor that
    outlives its transform)."""
    if torch.compiler.is_compiling():  # dynamo traces the block as it is
        yield
        return
    from torch._functorch.pyfunctorch import temporarily_clear_interpreter_stack
    from torch.utils._python_dispatch import _disable_current_modes

    with temporarily_clear_interpreter_stack(), _disable_current_modes():
        yield


def derivative(name: str, params: tuple, x: np.ndarray) -> np.ndarray:
    """f'(x) in float64 from torch's own autograd formula of the activation. A table is built on
    the first call that needs it, which may be inside torch.no_grad or inference_mode (this small
    autograd runs with grad enabled), a torch.func transform (see _outside_transforms), or a
    default-device context (a model built or converted under ``with torch.device("meta")`` or
    ``torch.set_default_device("cuda")``): the grid lives on the CPU, where numpy reads it."""
    with _outside_transforms(), torch.inference_mode(False), torch.enable_grad():
        t = torch.tensor(x, dtype=torch.float64, device="cpu", requires_grad=True)
        (g,) = torch.autograd.grad(reference.activation(t, name, params).sum(), t)
        return g.numpy()


def standard_normal(x: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def fit_density(samples, bandwidth: Optional[float] = None) -> Callable[[np.ndarray], np.ndarray]:
    """A density fitted to observed inputs: a Gaussian kernel density estimate (Scott's rule
    bandwidth unless given), evaluated through a 4096-bin histogram so it costs O(grid) per call.
    Use it as ``density=`` of the activations to fit the table to your layer's inputs."""
    s = torch.as_tensor(samples).detach().reshape(-1).double().cpu().numpy()
    s = s[np.isfinite(s)]
    if s.size < 2:
        raise ValueError(f"density samples must hold at least 2 finite values, got {s.size}")
    std = float(s.std())
    if not std > 0:
        raise ValueError("density samples are all equal: no density to fit")
    h = float(bandwidth) if bandwidth is not None else 1.06 * std * s.size ** (-0.2)
    if not (math.isfinite(h) and h > 0):
        raise ValueError(f"bandwidth must be a positive number, got {bandwidth!r}")
    counts, edges = np.histogram(s, bins=4096)
    centers = 0.5 * (edges[:-1] + edges[1:])
    weights = counts / counts.sum()
    lo, hi = float(s.min() - 4 * h), float(s.max() + 4 * h)

    def density(x: np.ndarray) -> np.ndarray:
        z = (x[:, None] - centers[None, :]) / h
        return (np.exp(-0.5 * z * z) * weights[None, :]).sum(axis=1) / (h * math.sqrt(2 * math.pi))

    density.grid_range = (lo, hi)  # where the table should be fitted
    return density


def _grid_and_weights(density: DensityLike, grid) -> tuple[np.ndarray, np.ndarray]:
    if density is not None and not callable(density):
        density = fit_density(density)
    fn = standard_normal if density is None else density
    if grid is None:
        lo, hi = getattr(fn, "grid_range", DEFAULT_GRID[:2])
        n = DEFAULT_GRID[2]
    else:
        lo, hi, n = grid
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi) or int(n) < 16:
        raise ValueError(f"grid must be (lo, hi, n) with finite lo < hi and n >= 16, got {grid}")
    x = np.linspace(lo, hi, int(n))
    dx = x[1] - x[0]
    w = np.asarray(fn(x), dtype=np.float64).reshape(-1)
    if w.shape != x.shape:
        raise ValueError(f"density must return one value per grid point, got shape {w.shape}")
    if not np.all(np.isfinite(w)):
        raise ValueError("density must be finite on the grid")
    if np.any(w < 0):
        raise ValueError(f"density must be non-negative, got {w.min():.3g} at "
                         f"x = {x[np.argmin(w)]:.3g}")
    mass = float(w.sum() * dx)
    if not (math.isfinite(mass) and mass > 0):
        raise ValueError(f"density does not integrate to a positive finite mass on [{lo}, {hi}] "
                         f"(got {mass})")
    return x, w * dx / mass


def optimal_approximation(name: str, bits: int, params: Sequence[float] = (),
                          density: DensityLike = None, grid=None) -> Approximation:
    """The DP-optimal 2^bits-level approximation of f' for inputs of ``density`` (standard normal
    when None; a callable on numpy arrays; or samples, fitted by ``fit_density``)."""
    from ... import _ext

    params = check_name(name, params)
    bits = check_bits(bits)
    x, w = _grid_and_weights(density, grid)
    d = derivative(name, params, x)
    if not _ext.LOADED:
        raise RuntimeError(f"the few-bit DP needs pypaper._C ({_ext.LOAD_ERROR})")
    borders, levels, err = _ext._C.fewbit_optimal_fit(x, d, w, 2 ** bits)
    return Approximation(name, params, bits, borders, levels, error=err)


@functools.lru_cache(maxsize=None)
def _default_table(name: str, params: tuple, bits: int) -> Approximation:
    return optimal_approximation(name, bits, params)


def table_constants(name: str, bits: int, params: tuple, math64: bool) -> tuple:
    """(bits, fold, borders, levels) of ``approximation(name, bits, params)`` as Python numbers,
    the borders as ``Approximation.tensors`` holds them for the math dtype (fp64 when ``math64``,
    else fp32). Marked a constant result for torch.compile: dynamo runs it once while tracing
    instead of tracing the cached numpy DP behind it (which it cannot), so the functional form
    ``activation(x, name, bits)`` compiles with fullgraph=True."""
    approx = approximation(name, bits, params)
    mdt = torch.float64 if math64 else torch.float32
    borders, levels = approx.tensors(mdt, "cpu")
    return approx.bits, approx.fold, tuple(borders.tolist()), tuple(levels.tolist())


# torch.compiler.assume_constant_result(table_constants), without importing torch._dynamo at
# import time (it pulls in triton: seconds, and tests/test_backend.py keeps `import pypaper` free
# of it). The decorator only sets this attribute (torch/_dynamo/decorators.py); the fullgraph
# test of the functional form (tests/quant/fewbit) fails if that ever stops being enough.
if "torch._dynamo" in sys.modules:
    table_constants = torch.compiler.assume_constant_result(table_constants)
else:
    table_constants._dynamo_marked_constant = True


def approximation(name: str, bits: Optional[int] = DEFAULT_BITS, params: Sequence[float] = (),
                  density: DensityLike = None, grid=None) -> Approximation:
    """The table an activation uses: exact (1 bit) for ReLU, LeakyReLU, Hardtanh (ReLU6) and
    Hardsigmoid, whatever ``bits`` says; otherwise the DP optimum for ``bits`` and ``density``
    (cached for the default density and grid). ``bits=None`` means the default, 2."""
    params = check_name(name, params)
    bits = check_bits(bits)
    if name in EXACT:
        return exact_approximation(name, params)
    if density is None and grid is None:
        return _default_table(name, params, bits)
    return optimal_approximation(name, bits, params, density, grid)
