"""CUDA kernels of the few-bit activation ops (kernels/cuda/fewbit_kernels.cu) against the
plain-PyTorch reference and the C++ CPU op.

Everything is compared bit for bit (NaN payloads aside): y is torch's own CUDA kernel on both
sides; a code is a count of strict compares in the math dtype (fp32, fp64 for fp64 input); the
backward is one multiply in the math dtype and one round-to-nearest-even to the storage dtype, as
in the reference and the CPU loop. Sizes cover the empty tensor, a lone partial block (1, 7, 31),
exactly one block (32), a block plus a partial one (33), several warps' tiles with a tail (129,
1000, 70001) and, once per dtype, more elements than one wave of the capped grid covers (the
grid-stride loops run several steps).

Calls torch.ops.pypaper.* and imports pypaper only inside tests and fixtures, so the file collects
on machines without a GPU, where every test is skipped.
"""
import pytest
import torch

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
SIZES = [0, 1, 7, 31, 32, 33, 129, 1000, 70001]
BIG = 3_000_017  # > 132 SMs x 2048 threads x 4 elements: several grid-stride steps on an H100
INT_VIEW = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16,
            torch.bfloat16: torch.int16}


@pytest.fixture(scope="module")
def ops():
    import pypaper

    info = pypaper.build_info()
    assert info.get("extension_loaded"), f"pypaper._C did not load: {info.get('error')}"
    assert info.get("cuda_kernels"), "a GPU is present but pypaper._C has no CUDA kernels"
    return torch.ops.pypaper


@pytest.fixture(scope="module")
def ref():
    from pypaper.quant.fewbit import reference

    return reference


def math_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def assert_bits_equal(got, want):
    """Same dtype, shape and bits, NaN positions equal (their payloads may differ)."""
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape, want.shape)
    got, want = got.reshape(-1), want.reshape(-1)
    nan_g, nan_w = torch.isnan(got), torch.isnan(want)
    assert torch.equal(nan_g, nan_w), "NaN positions differ"
    iv = INT_VIEW[got.dtype]
    g, w = got[~nan_g].contiguous().view(iv), want[~nan_w].contiguous().view(iv)
    bad = (g != w).nonzero()
    assert bad.numel() == 0, (f"{bad.numel()} elements differ, first at {int(bad[0])}: "
                              f"{got[~nan_g][bad[0]]} vs {want[~nan_w][bad[0]]}")


def random_borders(nb, dtype, device="cuda"):
    b, _ = torch.sort(torch.randn(nb, dtype=math_dtype(dtype)) * 1.5)
    return b.to(device)


def random_levels(bits, dtype, device="cuda"):
    return (torch.randn(2 ** bits, dtype=math_dtype(dtype)) * 0.7).to(device)


def inputs(n, dtype, borders, device="cuda", scale=2.0):
    """Normal values with, up front, NaN, +-inf, +-0, the ends of the exact tables (+-3, 6) and
    the borders themselves (x == border is below it: strict compare), in the storage dtype."""
    x = torch.randn(n, dtype=torch.float64) * scale
    specials = torch.cat([torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 6.0,
                                        -3.0, 3.0], dtype=torch.float64),
                          borders.cpu().to(torch.float64)])
    k = min(n, specials.numel())
    x[:k] = specials[:k]
    return x.to(dtype).to(device)


def check_forward(ops, ref, x, name, params, borders, levels, bits, fold):
    y, codes = ops.fewbit_forward(x, name, list(params), borders, levels, bits, fold)
    y_ref, codes_ref = ref.fewbit_forward(x, name, params, borders, levels, bits, fold)
    assert codes.device == x.device and codes.dtype == torch.uint8
    assert codes.shape == ((x.numel() * bits + 7) // 8,)
    assert torch.equal(codes, codes_ref), f"codes differ for n={x.numel()}"
    assert_bits_equal(y, y_ref)
    return codes


# ---- forward ------------------------------------------------------------------------------------

@pytest.mark.parametrize("fold", [False, True])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_random_borders_matches_reference(ops, ref, dtype, bits, fold):
    """Every border count the op allows (2 or 3 with fold, else 1 .. 2^b - 1: padded borders,
    which a NaN x must not count)."""
    counts = [2, 3] if fold else sorted({1, 2 ** bits - 1, max(1, 2 ** bits - 2)})
    for nb in counts:
        borders = random_borders(nb, dtype)
        levels = random_levels(bits, dtype)
        for n in SIZES:
            x = inputs(n, dtype, borders)
            check_forward(ops, ref, x, "gelu", (), borders, levels, bits, fold)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,params", [("gelu", ()), ("silu", ()), ("hardtanh", (0.0, 6.0))])
def test_forward_tables_match_reference(ops, ref, name, params, dtype, bits):
    """The tables users get: DP-optimal ones (gelu, silu), the exact folded one (relu6)."""
    import pypaper.quant.fewbit as fb

    approx = fb.approximation(name, bits, params)
    borders, levels = approx.tensors(dtype, "cuda")
    for n in SIZES:
        x = inputs(n, dtype, borders, scale=4.0)  # reaches past 6 for hardtanh
        check_forward(ops, ref, x, name, params, borders, levels, approx.bits, approx.fold)


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_many_grid_strides(ops, ref, dtype):
    for bits, fold in [(1, True), (3, False), (4, False)]:
        nb = 2 if fold else 2 ** bits - 1
        borders = random_borders(nb, dtype)
        x = inputs(BIG, dtype, borders)
        check_forward(ops, ref, x, "silu", (), borders, random_levels(bits, dtype), bits, fold)


def test_forward_noncontiguous_and_shaped(ops, ref):
    borders = random_borders(3, torch.float32)
    levels = random_levels(2, torch.float32)
    base = torch.randn(37, 41, device="cuda")
    for x in (base.t(), base[:, ::3], base.unsqueeze(0).expand(3, 37, 41), base[5:6, 7:8]):
        y, codes = ops.fewbit_forward(x, "gelu", [], borders, levels, 2, False)
        # the op runs torch's kernel on x.contiguous(); codes follow x's logical order
        y_ref, codes_ref = ref.fewbit_forward(x.contiguous(), "gelu", (), borders, levels, 2, False)
        assert y.shape == x.shape and y.is_contiguous()
        assert torch.equal(codes, codes_ref)
        assert_bits_equal(y, y_ref)


@pytest.mark.parametrize("fold", [False, True])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_codes_equal_cpu_op(ops, dtype, bits, fold):
    """The CUDA and C++ kernels share kernels/common/fewbit_pack.h: same bytes, same gradient."""
    borders = random_borders(2 if fold else 2 ** bits - 1, dtype, "cpu")
    levels = random_levels(bits, dtype, "cpu")
    for n in SIZES + [BIG]:
        x = inputs(n, dtype, borders, "cpu")
        _, codes_cpu = ops.fewbit_forward(x, "gelu", [], borders, levels, bits, fold)
        _, codes_gpu = ops.fewbit_forward(x.cuda(), "gelu", [], borders.cuda(), levels.cuda(),
                                          bits, fold)
        assert torch.equal(codes_gpu.cpu(), codes_cpu), n
        g = torch.randn(n, dtype=dtype)
        gx_cpu = ops.fewbit_backward(g, codes_cpu, levels, bits)
        gx_gpu = ops.fewbit_backward(g.cuda(), codes_gpu, levels.cuda(), bits)
        assert_bits_equal(gx_gpu.cpu(), gx_cpu)


# ---- backward -----------------------------------------------------------------------------------

def grads(n, dtype):
    """Normal values plus +-0, +-inf, NaN, subnormal and huge ones (rounding and overflow)."""
    g = torch.randn(n, dtype=torch.float64) * 3
    specials = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40, -3e-39,
                             1e-310, 3e38, -6e4, 7e4, 1e-7], dtype=torch.float64)
    k = min(n, specials.numel())
    g[:k] = specials[:k]
    return g.to(dtype).cuda()


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_matches_reference(ops, ref, dtype, bits):
    levels = random_levels(bits, dtype)
    levels[0] = 0.0  # a zero level: 0 for every grad (inf, NaN and negative ones too)
    for n in SIZES + [BIG]:
        g = grads(n, dtype)
        nbytes = (n * bits + 7) // 8
        codes = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device="cuda")
        assert_bits_equal(ops.fewbit_backward(g, codes, levels, bits),
                          ref.fewbit_backward(g, codes, levels, bits))


@pytest.mark.parametrize("bits", [1, 3, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_unaligned_buffers(ops, ref, dtype, bits):
    """codes at an odd byte offset (byte-wise word loads) and grad / out off 16 bytes (the
    one-element path) give the same values as the aligned paths."""
    levels = random_levels(bits, dtype)
    for n in (33, 1000, 70001):
        nbytes = (n * bits + 7) // 8
        codes_buf = torch.randint(0, 256, (nbytes + 3,), dtype=torch.uint8, device="cuda")
        g_buf = grads(n + 1, dtype)
        for off in (1, 2, 3):
            codes = codes_buf[off:off + nbytes]
            want = ref.fewbit_backward(g_buf[:n], codes, levels, bits)
            assert_bits_equal(ops.fewbit_backward(g_buf[:n], codes, levels, bits), want)
        g = g_buf[1:]  # storage offset of one element: not 16-byte aligned
        codes = codes_buf[:nbytes]
        assert_bits_equal(ops.fewbit_backward(g, codes, levels, bits),
                          ref.fewbit_backward(g, codes, levels, bits))


def test_backward_shaped_noncontiguous_grad(ops, ref):
    levels = random_levels(2, torch.float32)
    g = torch.randn(41, 37, device="cuda").t()
    codes = torch.randint(0, 256, ((g.numel() * 2 + 7) // 8,), dtype=torch.uint8, device="cuda")
    got = ops.fewbit_backward(g, codes, levels, 2)
    assert got.shape == g.shape
    assert_bits_equal(got, ref.fewbit_backward(g, codes, levels, 2))


# ---- the user-facing function and the op contract ----------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_activation_backward_matches_cpu(ops, dtype):
    import pypaper
    import pypaper.quant.fewbit as fb

    x = torch.randn(4099, dtype=dtype) * 2
    g = torch.randn(4099, dtype=dtype)
    xc = x.clone().requires_grad_()
    xg = x.cuda().requires_grad_()
    with pypaper.use_backend("cuda"):
        assert fb.backend_for(xg) == "cuda"
        yg = fb.activation(xg, "gelu", 2)
    with pypaper.use_backend("cpu"):
        fb.activation(xc, "gelu", 2).backward(g)
    yg.backward(g.cuda())
    assert_bits_equal(xg.grad.cpu(), xc.grad)
    assert_bits_equal(yg.detach(), torch.nn.functional.gelu(x.cuda()))


def _samples(dtype, requires_grad):
    import pypaper.quant.fewbit as fb

    out = []
    for name, params, bits, n in [("gelu", (), 2, 129), ("silu", (), 4, 33), ("gelu", (), 1, 0),
                                  ("hardtanh", (0.0, 6.0), 1, 70)]:
        approx = fb.approximation(name, bits, params)
        b, lv = approx.tensors(dtype, "cuda")
        x = (torch.randn(n, dtype=dtype, device="cuda") * 4).requires_grad_(requires_grad)
        out.append((x, name, list(params), b, lv, approx.bits, approx.fold))
    return out


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_cuda(ops, dtype, requires_grad):
    for args in _samples(dtype, requires_grad):
        torch.library.opcheck(ops.fewbit_forward, args)
        x, _, _, b, lv, bits, _ = args
        plain = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
        _, codes = ops.fewbit_forward(*plain)
        g = torch.randn(x.shape, dtype=dtype, device="cuda", requires_grad=requires_grad)
        torch.library.opcheck(ops.fewbit_backward, (g, codes, lv, bits))


def test_gradcheck_float64_cuda():
    """Exact 1-bit table (ReLU6): the op's gradient is torch's; gradcheck holds off the kinks."""
    import pypaper
    import pypaper.quant.fewbit as fb

    x = torch.rand(40, dtype=torch.float64, device="cuda") * 8 - 1
    x = x[x.abs().gt(1e-3) & (x - 6).abs().gt(1e-3)].requires_grad_()
    with pypaper.use_backend("cuda"):
        relu6 = lambda t: fb.activation(t, "hardtanh", 1, params=(0.0, 6.0))  # noqa: E731
        assert torch.autograd.gradcheck(relu6, (x,))


def test_errors_name_the_argument(ops):
    x = torch.randn(10, device="cuda")
    borders = torch.tensor([-1.0, 1.0], device="cuda")
    levels = torch.tensor([0.0, 1.0], device="cuda")
    with pytest.raises(RuntimeError, match="borders must be on"):
        ops.fewbit_forward(x, "gelu", [], borders.cpu(), levels, 1, True)
    with pytest.raises(RuntimeError, match="levels must be on"):
        ops.fewbit_forward(x, "gelu", [], borders, levels.cpu(), 1, True)
    with pytest.raises(TypeError, match="borders must be"):
        ops.fewbit_forward(x, "gelu", [], borders.double(), levels, 1, True)
    with pytest.raises(ValueError, match="bits must be"):
        ops.fewbit_forward(x, "gelu", [], borders, levels, 5, True)
    with pytest.raises(ValueError, match="activation must be one of"):
        ops.fewbit_forward(x, "swish", [], borders, levels, 1, True)
    codes = torch.zeros(2, dtype=torch.uint8, device="cuda")
    with pytest.raises(RuntimeError, match="codes must be on"):
        ops.fewbit_backward(x, codes.cpu(), levels, 1)
    with pytest.raises(ValueError, match="codes must be a 1-D tensor"):
        ops.fewbit_backward(x, codes[:1], levels, 1)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device(ops, ref):
    """The device guard: tensors on cuda:1 while cuda:0 is current."""
    borders = random_borders(3, torch.float32, "cuda:1")
    levels = random_levels(2, torch.float32, "cuda:1")
    x = torch.randn(1000, device="cuda:1")
    y, codes = ops.fewbit_forward(x, "gelu", [], borders, levels, 2, False)
    assert codes.device == x.device
    assert torch.equal(codes, ref.fewbit_forward(x, "gelu", (), borders, levels, 2, False)[1])
