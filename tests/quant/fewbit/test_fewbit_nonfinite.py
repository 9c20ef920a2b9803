"""Non-finite values through the few-bit backward, on every backend: the exact 1-bit activations
(ReLU, LeakyReLU, ReLU6, Hardtanh, Hardsigmoid) give torch's backward bit for bit for x in
{NaN, +-inf, +-0, the kinks} and incoming gradients in {NaN, +-inf, +-0, negative}; the
approximated ones give a NaN input the top piece's level.

Backends: the C++ CPU op (AVX2 blocks and the scalar tail), the plain-PyTorch reference, Triton
(under TRITON_INTERPRET=1 without a GPU, set before triton is imported, as test_fewbit_triton.py
does) and CUDA (skipped without a GPU).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

import pypaper  # noqa: E402
import pypaper.quant.fewbit as fb  # noqa: E402
from pypaper import _ext  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
INT_VIEW = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16,
            torch.float16: torch.int16}
INF, NAN = float("inf"), float("nan")
XS = [NAN, INF, -INF, 0.0, -0.0, 1.0, -1.0, 3.0, -3.0, 6.0, -0.5, 2.0, 0.25, -7.0]
GS = [NAN, INF, -INF, -1.5, -0.0, 0.0, 2.5]

# (name, module, torch twin); Hardtanh/ReLU6 take the third border +inf
EXACT = [
    ("relu", lambda: fb.ReLU(), torch.nn.ReLU()),
    ("leaky_relu", lambda: fb.LeakyReLU(0.2), torch.nn.LeakyReLU(0.2)),
    ("relu6", lambda: fb.ReLU6(), torch.nn.ReLU6()),
    ("hardtanh", lambda: fb.Hardtanh(-0.5, 2.0), torch.nn.Hardtanh(-0.5, 2.0)),
    ("hardsigmoid", lambda: fb.Hardsigmoid(), torch.nn.Hardsigmoid()),
]


def _triton_ok():
    try:
        from pypaper.quant.fewbit import _registration

        tk = _registration.load_triton()
    except Exception as e:  # noqa: BLE001
        return False, str(e)
    if not tk.HAVE_TRITON:
        return False, "triton is not installed"
    return tk.triton_available(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def _backends():
    out = [pytest.param("reference", "cpu", id="reference")]
    out.append(pytest.param("cpu", "cpu", id="cpu", marks=pytest.mark.skipif(
        not _ext.LOADED, reason="pypaper._C is not built")))
    ok, why = _triton_ok()
    out.append(pytest.param("triton", "cuda" if torch.cuda.is_available() else "cpu", id="triton",
                            marks=[pytest.mark.triton, pytest.mark.skipif(not ok, reason=why)]))
    out.append(pytest.param("cuda", "cuda", id="cuda", marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs an NVIDIA GPU")))
    return out


def _grid(dtype, reps):
    """Every (x, g) pair of XS x GS, ``reps`` times over (so that the CPU op's 32-element blocks,
    its AVX2 lanes and its scalar tail all see every pair), then a few random pairs."""
    x = torch.tensor(XS, dtype=torch.float64).repeat_interleave(len(GS)).repeat(reps)
    g = torch.tensor(GS, dtype=torch.float64).repeat(len(XS)).repeat(reps)
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([x, torch.randn(37, generator=gen, dtype=torch.float64) * 4])
    g = torch.cat([g, torch.randn(37, generator=gen, dtype=torch.float64)])
    return x.to(dtype), g.to(dtype)


def assert_bits_equal(got, want):
    """Same bits (so +0 is not -0), NaN positions equal (their payloads may differ)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    nan_g, nan_w = got.isnan(), want.isnan()
    assert torch.equal(nan_g, nan_w), f"NaN at {nan_g.nonzero().flatten().tolist()[:8]} vs " \
                                      f"{nan_w.nonzero().flatten().tolist()[:8]}"
    iv = INT_VIEW[got.dtype]
    g, w = got[~nan_g].view(iv), want[~nan_w].view(iv)
    bad = (g != w).nonzero().flatten()
    assert bad.numel() == 0, (f"{bad.numel()} differ, first: {got[~nan_g][bad[0]]} vs "
                              f"{want[~nan_w][bad[0]]}")


def torch_backward(twin, x, g, name):
    """torch's own backward. Hardtanh (ReLU6) and a NaN x: torch's formula (x <= min or
    x >= max ? 0 : g) passes g - its CUDA kernel and its CPU scalar loop do - while its CPU
    vector loop ((x > min) & (x < max) & g) gives 0, so a NaN's gradient depends on where it
    sits. pypaper follows the formula (and ReLU, which passes g for NaN on every path)."""
    xr = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad(twin(xr), xr, g)
    if name in ("hardtanh", "relu6"):
        gx = torch.where(x.isnan(), g, gx)
    return gx


def test_torch_hardtanh_nan_formula_is_the_scalar_path():
    """What torch_backward relies on: one element (the scalar loop) passes g for a NaN x."""
    for dtype in DTYPES:
        x = torch.tensor([NAN], dtype=dtype, requires_grad=True)
        (gx,) = torch.autograd.grad(torch.nn.Hardtanh(-0.5, 2.0)(x), x,
                                    torch.tensor([2.5], dtype=dtype))
        assert gx.item() == 2.5


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the Triton interpreter
@pytest.mark.parametrize("backend,device", _backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("spec", EXACT, ids=lambda s: s[0])
def test_exact_backward_equals_torch_on_nonfinite(spec, dtype, backend, device):
    name, make, twin = spec
    reps = 1 if backend == "triton" and device == "cpu" else 3
    x, g = _grid(dtype, reps)
    x, g = x.to(device), g.to(device)
    want = torch_backward(twin, x, g, name)
    xr = x.clone().requires_grad_()
    with pypaper.use_backend(backend):
        assert fb.backend_for(xr) == backend
        y = make()(xr)
    (got,) = torch.autograd.grad(y, xr, g)
    assert_bits_equal(y.detach(), twin(x))
    assert_bits_equal(got, want)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("backend,device", _backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_approximated_nan_input_gets_the_top_level(dtype, backend, device):
    """A NaN x has no code of its own at b bits: it is above every border, so its gradient is g
    times the last level (torch's is NaN)."""
    for name, bits in (("gelu", 2), ("silu", 4), ("tanh", 1)):
        _, levels = fb.approximation(name, bits).tensors(dtype, device)
        x = torch.tensor([NAN, NAN, 0.3], dtype=dtype, device=device)
        g = torch.tensor([2.0, -1.0, 1.0], dtype=dtype, device=device)
        xr = x.clone().requires_grad_()
        with pypaper.use_backend(backend):
            y = fb.activation(xr, name, bits)
        (got,) = torch.autograd.grad(y, xr, g)
        top = levels[-1]
        assert_bits_equal(got[:2], (torch.tensor([2.0, -1.0], dtype=top.dtype,
                                                 device=device) * top).to(dtype))


def _ops(backend):
    from pypaper.quant.fewbit import reference

    if backend == "reference":
        return reference.fewbit_forward, reference.fewbit_backward
    if backend == "triton":
        return torch.ops.pypaper.fewbit_forward_triton, torch.ops.pypaper.fewbit_backward_triton
    return torch.ops.pypaper.fewbit_forward, torch.ops.pypaper.fewbit_backward


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("backend,device", _backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zero_level_gives_positive_zero_for_any_grad(dtype, backend, device):
    """The backward op: a zero level gives +0 for g in {NaN, +-inf, negative, -0} (a select, as
    torch's ReLU backward), a nonzero one g * level; at every bit width, in full blocks and in the
    partial last one."""
    from pypaper.quant.fewbit import reference

    _, backward = _ops(backend)
    mdt = torch.float64 if dtype == torch.float64 else torch.float32
    for bits in (1, 2, 3, 4):
        levels = torch.linspace(-1.0, 2.0, 2 ** bits, dtype=mdt)
        levels[0] = 0.0
        levels[-1] = -0.0
        n = 2 ** bits * len(GS) * 5 + 3
        code = torch.arange(n) % 2 ** bits
        g = torch.tensor(GS, dtype=torch.float64).repeat_interleave(2 ** bits).repeat(n)[:n]
        codes = reference.pack(code, bits).to(device)
        got = backward(g.to(dtype).to(device), codes, levels.to(device), bits)
        lv = levels[code].double()
        prod = (g.to(dtype).to(mdt) * lv.to(mdt)).to(dtype)
        want = torch.where(lv == 0, torch.zeros((), dtype=dtype), prod)
        assert_bits_equal(got.cpu(), want)


@pytest.mark.parametrize("backend,device", _backends())
def test_fold_with_three_borders(backend, device):
    """The op's contract: fold takes 2 or 3 borders; NaN counts all three (parity 1)."""
    from pypaper.quant.fewbit import reference

    forward, _ = _ops(backend)
    borders = torch.tensor([-1.0, 1.0, INF], device=device)
    levels = torch.tensor([0.0, 1.0], device=device)
    x = torch.tensor([NAN, INF, -INF, 0.0, -1.0, 1.0, 2.0] * 7, device=device)
    _, codes = forward(x, "relu", [], borders, levels, 1, True)
    assert reference.unpack(codes.cpu(), x.numel(), 1)[:7].tolist() == [1, 0, 0, 1, 0, 1, 0]
    _, codes2 = forward(x, "relu", [], borders[:2], levels, 1, True)
    assert reference.unpack(codes2.cpu(), x.numel(), 1)[:7].tolist() == [0, 0, 0, 1, 0, 1, 0]
