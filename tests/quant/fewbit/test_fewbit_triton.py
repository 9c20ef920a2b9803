"""Triton twins of the few-bit ops (pypaper/quant/fewbit/triton_kernels.py) against the
plain-PyTorch reference (pypaper/quant/fewbit/reference.py) and the C++ CPU op.

Without a GPU the kernels run under TRITON_INTERPRET=1 on CPU tensors (set below, before triton
or pypaper is imported; sizes stay small for the interpreter); with one, compiled on CUDA.

Tolerances: none. y, the packed codes and grad_x are bit-exact for every dtype: y is torch's own
kernel, the code is a count of exact compares (x widened exactly to fp32 / fp64), and grad_x is
one multiply in the math type rounded once to grad's dtype, as in the reference. NaN outputs are
compared as NaN (payloads may differ).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

pytest.importorskip("triton")

import pypaper  # noqa: E402
import pypaper.quant.fewbit as fb  # noqa: E402
from pypaper import _ext  # noqa: E402
from pypaper.quant.fewbit import _registration, reference  # noqa: E402

tk = _registration.load_triton()

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_OK, _WHY = tk.triton_available(DEVICE)

pytestmark = [pytest.mark.triton, pytest.mark.skipif(not _OK, reason=_WHY)]

ops = torch.ops.pypaper

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# 0: no launch; 1, 31: only the partial block; 32: one full block, no tail; 33, 100, 257: full
# blocks and a tail (257 = 8 blocks + 1: several rows of a program's tile).
SIZES = [0, 1, 31, 32, 33, 100, 257]
# (bits, fold): fold takes 2 or 3 borders (2 here; 3 in test_fewbit_nonfinite.py).
BITS_FOLD = [(1, False), (2, False), (3, False), (4, False), (1, True)]
_HAVE_CPP = _ext.LOADED and hasattr(ops, "fewbit_forward")


def _math(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _assert_same(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, want.dtype,
                                                                  got.shape, want.shape)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


def _borders(bits, fold, dtype):
    """Random sorted borders, representable in x's dtype (so x can equal one exactly): 2^b - 1
    of them (5 at 3 bits: a table that leaves codes unused), 2 with fold."""
    nb = 2 if fold else (5 if bits == 3 else 2**bits - 1)
    b = torch.sort(torch.randn(nb) * 1.5).values.to(dtype)
    return b.to(_math(dtype)).to(DEVICE)


def _levels(bits, dtype):
    return (torch.randn(2**bits, dtype=torch.float64) * 3).to(_math(dtype)).to(DEVICE)


def _x(n, dtype, borders):
    """Normal values, plus the borders themselves (x > t is strict), signed zeros, subnormals of
    the dtype, +-inf and NaN (above every border)."""
    x = torch.randn(n, dtype=torch.float64) * 2
    tiny = torch.finfo(dtype).tiny / 4  # subnormal in every dtype
    specials = torch.cat([borders.double().cpu(), torch.tensor(
        [0.0, -0.0, tiny, -tiny, float("inf"), -float("inf"), float("nan"), 6.0])])
    k = min(n, specials.numel())
    x[n - k:] = specials[:k]  # at the end: the tail block sees them too
    return x.to(dtype).to(DEVICE)


def _grad(n, dtype):
    g = torch.randn(n, dtype=torch.float64) * 2
    specials = torch.tensor([float("inf"), float("nan"), -0.0, torch.finfo(dtype).tiny / 4,
                             torch.finfo(dtype).max])
    k = min(n, specials.numel())
    g[:k] = specials[:k]
    return g.to(dtype).to(DEVICE)


# ---- forward -------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the interpreter, on NaN
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("bits,fold", BITS_FOLD)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_matches_reference(dtype, bits, fold, n):
    borders = _borders(bits, fold, dtype)
    levels = _levels(bits, dtype)
    x = _x(n, dtype, borders)
    y, codes = ops.fewbit_forward_triton(x, "gelu", [], borders, levels, bits, fold)
    ry, rcodes = reference.fewbit_forward(x, "gelu", [], borders, levels, bits, fold)
    _assert_same(y, ry)
    _assert_same(codes, rcodes)
    assert codes.numel() == (bits * n + 7) // 8
    if _HAVE_CPP and DEVICE.type == "cpu":
        _, ccodes = ops.fewbit_forward(x, "gelu", [], borders, levels, bits, fold)
        _assert_same(codes, ccodes)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("name,params,bits", [("gelu", [], 2), ("gelu", [], 4), ("silu", [], 3),
                                              ("hardtanh", [0.0, 6.0], 1)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tables_forward_and_backward(name, params, bits, dtype):
    """The real tables (DP-optimal; hardtanh's exact folded one): forward and the backward fed
    the Triton codes, against the reference."""
    approx = fb.approximation(name, bits, params)
    borders, levels = approx.tensors(dtype, DEVICE)
    n = 257
    x = _x(n, dtype, borders)
    y, codes = ops.fewbit_forward_triton(x, name, params, borders, levels, approx.bits,
                                         approx.fold)
    ry, rcodes = reference.fewbit_forward(x, name, params, borders, levels, approx.bits,
                                          approx.fold)
    _assert_same(y, ry)
    _assert_same(codes, rcodes)
    g = _grad(n, dtype)
    _assert_same(ops.fewbit_backward_triton(g, codes, levels, approx.bits),
                 reference.fewbit_backward(g, rcodes, levels, approx.bits))
    if name == "hardtanh":  # exact: torch's own backward, 0 at and outside [0, 6]
        g = torch.randn(n, device=DEVICE).to(dtype)
        xr = x.clone().requires_grad_()
        torch.nn.functional.hardtanh(xr, 0.0, 6.0).backward(g)
        want = xr.grad
        # NaN x: torch's formula (x <= min || x >= max ? 0 : g) passes g, as its CUDA and CPU
        # scalar paths do; its CPU vector path gives 0 (test_fewbit_nonfinite.py)
        want = torch.where(x.isnan(), g, want)
        _assert_same(ops.fewbit_backward_triton(g, codes, levels, 1), want)


def test_forward_non_contiguous_and_0d():
    borders = _borders(2, False, torch.float32)
    levels = _levels(2, torch.float32)
    base = torch.randn(9, 70, device=DEVICE)
    for x in (base[:, ::2], base.t(), base[3, 5]):
        y, codes = ops.fewbit_forward_triton(x, "silu", [], borders, levels, 2, False)
        ry, rcodes = reference.fewbit_forward(x.contiguous(), "silu", [], borders, levels, 2,
                                              False)
        _assert_same(y, ry)
        _assert_same(codes, rcodes)
        assert y.is_contiguous() and y.shape == x.shape


# ---- backward ------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy: inf * 0, fp16 max * level
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_matches_reference(dtype, bits, n):
    """Random codes packed by the reference, random grads (inf, NaN, subnormal, max) and levels
    (the products round differently in every dtype)."""
    levels = _levels(bits, dtype)
    levels[0] = 0.0  # 0 in both where grad is inf or NaN (a select, not inf * 0)
    codes = reference.pack(torch.randint(0, 2**bits, (n,)), bits).to(DEVICE)
    g = _grad(n, dtype)
    _assert_same(ops.fewbit_backward_triton(g, codes, levels, bits),
                 reference.fewbit_backward(g, codes, levels, bits))


def test_backward_shapes_and_unaligned_codes():
    """grad of any shape (non-contiguous too); codes a slice at an odd byte offset (the kernel
    loads bytes: no alignment needed)."""
    levels = _levels(3, torch.float32)
    g = torch.randn(7, 40, device=DEVICE)[:, ::3]  # 7 x 14 = 98 elements
    n = g.numel()
    buf = reference.pack(torch.randint(0, 8, (n + 8,)), 3).to(DEVICE)
    codes = buf[1:1 + (3 * n + 7) // 8]
    assert codes.storage_offset() % 4 == 1
    got = ops.fewbit_backward_triton(g, codes, levels, 3)
    _assert_same(got, reference.fewbit_backward(g.contiguous(), codes, levels, 3))
    assert got.shape == g.shape and got.is_contiguous()
    g0 = torch.tensor(2.5, device=DEVICE)
    c0 = torch.tensor([1], dtype=torch.uint8, device=DEVICE)
    _assert_same(ops.fewbit_backward_triton(g0, c0, levels, 3),
                 reference.fewbit_backward(g0, c0, levels, 3))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_int64_indexing_path(monkeypatch):
    """The IDX64 variant of both kernels (inputs of at least 2^31 elements), forced on a small
    input."""
    monkeypatch.setattr(tk, "_needs_int64", lambda programs, blocks: True)
    for dtype in (torch.bfloat16, torch.float64):
        borders = _borders(4, False, dtype)
        levels = _levels(4, dtype)
        x = _x(100, dtype, borders)
        y, codes = ops.fewbit_forward_triton(x, "gelu", [], borders, levels, 4, False)
        _, rcodes = reference.fewbit_forward(x, "gelu", [], borders, levels, 4, False)
        _assert_same(codes, rcodes)
        g = _grad(100, dtype)
        _assert_same(ops.fewbit_backward_triton(g, codes, levels, 4),
                     reference.fewbit_backward(g, codes, levels, 4))


# ---- autograd through the backend selection ------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_autograd_through_triton_backend(dtype):
    x = (torch.randn(5, 33, dtype=torch.float64) * 2).to(dtype).to(DEVICE)
    g = torch.randn(5, 33, dtype=torch.float64).to(dtype).to(DEVICE)
    grads = {}
    for backend in ("triton", "reference"):
        xr = x.clone().requires_grad_()
        with pypaper.use_backend(backend):
            assert fb.backend_for(xr) == backend
            y = fb.activation(xr, "gelu", 2)
            y.backward(g)
        grads[backend] = (y.detach(), xr.grad)
    _assert_same(grads["triton"][0], grads["reference"][0])
    _assert_same(grads["triton"][1], grads["reference"][1])


def test_double_backward_is_the_same_op():
    """grad_x = levels[code] * grad is linear in grad: its own gradient is levels[code] * gg."""
    approx = fb.approximation("silu", 2)
    borders, levels = approx.tensors(torch.float64, DEVICE)
    x = torch.randn(40, dtype=torch.float64, device=DEVICE, requires_grad=True)
    g = torch.randn(40, dtype=torch.float64, device=DEVICE, requires_grad=True)
    y, _ = ops.fewbit_forward_triton(x, "silu", [], borders, levels, 2, False)
    (gx,) = torch.autograd.grad(y, x, g, create_graph=True)
    gg = torch.randn(40, dtype=torch.float64, device=DEVICE)
    (ggrad,) = torch.autograd.grad(gx, g, gg)
    code = reference.codes_of(x.detach(), borders, False)
    _assert_same(gx.detach(), g.detach() * levels[code])
    _assert_same(ggrad, gg * levels[code])


# ---- errors, availability, heuristics, opcheck, schema -------------------------------------------


def test_bad_inputs_raise():
    b, lv = _borders(2, False, torch.float32), _levels(2, torch.float32)
    x = torch.randn(10, device=DEVICE)
    fwd = ops.fewbit_forward_triton
    with pytest.raises(TypeError, match="x must be float32"):
        fwd(x.int(), "gelu", [], b, lv, 2, False)
    with pytest.raises(ValueError, match="bits must be 1, 2, 3 or 4"):
        fwd(x, "gelu", [], b, lv, 5, False)
    with pytest.raises(ValueError, match="activation must be one of"):
        fwd(x, "swish", [], b, lv, 2, False)
    with pytest.raises(ValueError, match="activation 'hardtanh' takes 2 params, got 1"):
        fwd(x, "hardtanh", [1.0], b, lv, 2, False)
    with pytest.raises(ValueError, match="4 pieces do not fit in 1 bits"):
        fwd(x, "gelu", [], b, _levels(1, torch.float32), 1, False)
    with pytest.raises(ValueError, match="fold=True needs 2 or 3 borders"):
        fwd(x, "gelu", [], torch.arange(4.0, device=DEVICE), lv, 2, True)
    with pytest.raises(ValueError, match="fold=True needs 2 or 3 borders"):
        fwd(x, "gelu", [], b[:1], lv, 2, True)
    with pytest.raises(ValueError, match="borders must be a 1-D tensor of 1..15"):
        fwd(x, "gelu", [], torch.zeros(16, device=DEVICE), _levels(4, torch.float32), 4, False)
    with pytest.raises(TypeError, match="borders must be torch.float32 for torch.float16"):
        fwd(x.half(), "gelu", [], b.double(), lv, 2, False)
    with pytest.raises(ValueError, match="levels must be a 1-D tensor of 2\\^bits = 4"):
        fwd(x, "gelu", [], b, lv[:3], 2, False)
    codes = reference.pack(torch.randint(0, 4, (10,)), 2).to(DEVICE)
    bwd = ops.fewbit_backward_triton
    with pytest.raises(TypeError, match="codes must be uint8"):
        bwd(x, codes.int(), lv, 2)
    with pytest.raises(ValueError, match="codes must be a 1-D tensor of .* = 3 bytes"):
        bwd(x, codes[:2], lv, 2)
    with pytest.raises(TypeError, match="levels must be torch.float64 for torch.float64"):
        bwd(x.double(), codes, lv, 2)
    with pytest.raises(TypeError, match="grad must be float32"):
        bwd(x.long(), codes, lv, 2)


def test_triton_available():
    ok, why = tk.triton_available(DEVICE)
    assert ok and why == ""
    ok, why = tk.triton_available(torch.device("meta"))
    assert not ok and "CUDA" in why


def test_launch_heuristics():
    assert [tk.blocks_per_program(b) for b in (0, 1, 2, 3, 9, 128, 129, 10**6)] == \
        [1, 1, 2, 4, 16, 128, 128, 128]
    assert tk.num_warps_for(32) == 4 and tk.num_warps_for(2048) == 4
    assert tk.num_warps_for(4096) == 8
    assert not tk._needs_int64(2**24 // 128, 128) and tk._needs_int64(2**26 // 128 * 8, 128)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(requires_grad):
    """Schema, fake tensors and the autograd registration. test_aot_dispatch_dynamic is left out
    under the interpreter: it traces through functional tensors, and interpreted Triton kernels
    cannot be traced (the ops raise there, see pypaper/quant/triton_kernels.py::_launches); with
    a GPU the compiled kernels are traced too."""
    utils = ["test_schema", "test_faketensor", "test_autograd_registration"]
    if DEVICE.type == "cuda":
        utils.append("test_aot_dispatch_dynamic")
    approx = fb.approximation("gelu", 2)
    borders, levels = approx.tensors(torch.float32, DEVICE)
    x = torch.randn(3, 45, device=DEVICE, requires_grad=requires_grad)
    torch.library.opcheck(ops.fewbit_forward_triton.default,
                          (x, "gelu", [], borders, levels, 2, False), test_utils=utils)
    _, codes = reference.fewbit_forward(x.detach(), "gelu", [], borders, levels, 2, False)
    g = torch.randn(3, 45, device=DEVICE, requires_grad=requires_grad)
    torch.library.opcheck(ops.fewbit_backward_triton.default, (g, codes, levels, 2),
                          test_utils=utils)


def test_schemas_match_the_cpp_ops():
    """Same argument names, types and returns as csrc/schemas.cpp (when built). triton_op infers
    its schema from annotations and writes Python int as SymInt, which takes the same ints."""
    if not _HAVE_CPP:
        pytest.skip("pypaper._C is not built")
    for name in ("fewbit_forward", "fewbit_backward"):
        native = str(getattr(ops, name).default._schema)
        twin = str(getattr(ops, name + "_triton").default._schema)
        twin = twin.replace(f"pypaper::{name}_triton(", f"pypaper::{name}(")
        assert twin.replace("SymInt", "int") == native
