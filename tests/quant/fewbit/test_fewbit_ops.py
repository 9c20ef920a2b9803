"""The few-bit activation ops on the default CPU backend against torch and the reference."""
import pytest
import torch

import pypaper
import pypaper.quant.fewbit as fb
from pypaper.quant.fewbit import reference

from .helpers import APPROXIMATED, DTYPES, EXACT, inputs


def _pair(name, twin, kwargs, bits=2):
    cls = getattr(fb, name)
    ours = cls(**kwargs, bits=bits) if (name, twin, kwargs) in APPROXIMATED else cls(**kwargs)
    return ours, twin(**kwargs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", APPROXIMATED + EXACT, ids=lambda s: f"{s[0]}{s[2] or ''}")
def test_forward_bit_exact_with_torch(spec, dtype):
    ours, twin = _pair(*spec)
    for n in (0, 1, 7, 129, 70001):  # 70001: several chunks and a partial block
        x = inputs(n, dtype)
        assert torch.equal(ours(x), twin(x)), n  # no grad: torch's own call on x
        y = ours(x.clone().requires_grad_())  # the few-bit op: y is torch's own call too
        assert torch.equal(y.detach(), twin(x)), n


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("spec", APPROXIMATED, ids=lambda s: f"{s[0]}{s[2] or ''}")
def test_backward_is_level_times_grad(spec, bits, dtype):
    ours, _ = _pair(*spec, bits=bits)
    approx = ours.approximation
    x = inputs(333, dtype).requires_grad_()
    g = torch.randn(333, dtype=dtype)
    ours(x).backward(g)
    borders, levels = approx.tensors(dtype, "cpu")
    code = reference.codes_of(x.detach(), borders, approx.fold)
    want = (g.to(levels.dtype) * levels[code]).to(dtype)
    assert torch.equal(x.grad, want)
    assert int(code.max()) < 2 ** bits


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", EXACT, ids=lambda s: s[0])
def test_exact_ones_backward_equals_torch(spec, dtype):
    ours, twin = _pair(*spec)
    assert ours.bits == 1 and ours.approximation.exact
    x = inputs(4099, dtype)
    g = torch.randn(4099, dtype=dtype)
    xa = x.clone().requires_grad_()
    xb = x.clone().requires_grad_()
    ours(xa).backward(g)
    twin(xb).backward(g)
    assert torch.equal(xa.grad, xb.grad)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_saved_bytes_are_ceil_bits_n_over_8(bits):
    """Only the packed codes (and the 2^b levels) are saved: measured with saved-tensor hooks."""
    fb.approximation("gelu", bits)  # build the table (autograd on a grid) outside the hooks
    for n in (1, 13, 32, 1000, 4097):  # 13 * 3 bits is not a multiple of 8
        x = torch.randn(n, requires_grad=True)
        saved = []

        def pack(t):
            saved.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = fb.activation(x, "gelu", bits)
        codes = [t for t in saved if t.dtype == torch.uint8]
        others = [t for t in saved if t.dtype != torch.uint8]
        assert [c.numel() for c in codes] == [(bits * n + 7) // 8]
        assert sum(t.numel() for t in others) == 2 ** bits  # the levels
        y.sum().backward()


def test_odd_noncontiguous_and_broadcast_inputs():
    gelu = fb.GELU(bits=3)
    base = torch.randn(6, 40, dtype=torch.float64)
    for x in (base.t(), base[:, ::3], base[:1].expand(5, 40), torch.randn(3, 0, 2, dtype=torch.float64),
              torch.tensor(0.3, dtype=torch.float64)):
        xr = x.clone().requires_grad_()
        y = gelu(xr)
        # torch's own kernel takes a scalar path on some strided inputs (differing from its
        # vector path in the last bit); pypaper computes on the contiguous input
        assert y.shape == x.shape and torch.equal(y, torch.nn.functional.gelu(x.contiguous()))
        g = torch.randn_like(y)
        y.backward(g)
        borders, levels = gelu.approximation.tensors(x.dtype, "cpu")
        want = (g.reshape(-1) * levels[reference.codes_of(x, borders, False)]).reshape(x.shape)
        assert torch.equal(xr.grad, want)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("fold", [False, True])
def test_op_matches_reference_bit_for_bit(bits, fold):
    for dtype in DTYPES:
        mdt = torch.float64 if dtype == torch.float64 else torch.float32
        nb = 2 if fold else 2 ** bits - 1
        borders = torch.sort(torch.randn(nb, dtype=mdt))[0]
        levels = torch.randn(2 ** bits, dtype=mdt)
        for n in (0, 1, 31, 32, 33, 95, 1000, 70001):
            x = inputs(n, dtype, scale=1.0)
            y, codes = torch.ops.pypaper.fewbit_forward(x, "silu", [], borders, levels, bits, fold)
            y_ref, codes_ref = reference.fewbit_forward(x, "silu", [], borders, levels, bits,
                                                        fold)
            assert torch.equal(y, y_ref) and torch.equal(codes, codes_ref), (dtype, n)
            assert codes.numel() == (bits * n + 7) // 8
            assert torch.equal(reference.unpack(codes, n, bits),
                               reference.codes_of(x, borders, fold))
            g = torch.randn(n).to(dtype)
            assert torch.equal(torch.ops.pypaper.fewbit_backward(g, codes, levels, bits),
                               reference.fewbit_backward(g, codes, levels, bits))


def test_reference_backend_matches_cpu():
    x = inputs(5000, torch.float32).requires_grad_()
    g = torch.randn(5000)
    fb.activation(x, "mish", 3).backward(g)
    got = x.grad.clone()
    x.grad = None
    with pypaper.use_backend("reference"):
        assert fb.backend_for(x) == "reference"
        fb.activation(x, "mish", 3).backward(g)
    assert torch.equal(got, x.grad)


def _samples(dtype, requires_grad):
    out = []
    for name, bits, params in (("gelu", 2, ()), ("elu", 3, (0.5,)), ("hardtanh", 1, (0.0, 6.0))):
        approx = fb.approximation(name, bits, params)
        b, l = approx.tensors(dtype, "cpu")
        for shape in ((7,), (3, 33)):
            x = (torch.randn(shape, dtype=dtype) * 3).requires_grad_(requires_grad)
            out.append((x, name, list(params), b, l, bits, approx.fold))
    return out


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype, requires_grad):
    for args in _samples(dtype, requires_grad):
        torch.library.opcheck(torch.ops.pypaper.fewbit_forward, args)
        x, _, _, b, l, bits, _ = args
        _, codes = torch.ops.pypaper.fewbit_forward(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
        g = torch.randn(x.shape, dtype=dtype, requires_grad=requires_grad)
        torch.library.opcheck(torch.ops.pypaper.fewbit_backward, (g, codes, l, bits))


def test_gradcheck_exact_ones_float64():
    """Where the 1-bit table is exact the gradient is the true one: gradcheck away from kinks."""
    x = torch.randn(40, dtype=torch.float64) * 3
    x = x[(x.abs() > 0.05) & ((x - 6).abs() > 0.05) & ((x.abs() - 3).abs() > 0.05)]
    x = x.clone().requires_grad_()
    for m in (fb.ReLU(), fb.LeakyReLU(0.2), fb.ReLU6(), fb.Hardsigmoid(), fb.Hardtanh(-1.0, 1.5)):
        assert torch.autograd.gradcheck(m, (x,), eps=1e-6)


def test_double_backward_through_the_gradient():
    """grad_x is linear in grad_y (levels[code] * grad_y): its derivative w.r.t. grad_y is
    levels[code], checked by gradgradcheck-style autograd in float64."""
    gelu = fb.GELU(bits=2)
    x = torch.randn(50, dtype=torch.float64, requires_grad=True)
    g = torch.randn(50, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(gelu(x), x, g, create_graph=True)
    v = torch.randn(50, dtype=torch.float64)
    (gg,) = torch.autograd.grad(gx, g, v)
    b, l = gelu.approximation.tensors(torch.float64, "cpu")
    assert torch.equal(gg, v * l[reference.codes_of(x.detach(), b, False)])
    assert torch.autograd.gradcheck(lambda gy: torch.autograd.grad(gelu(x), x, gy, create_graph=True)[0], (g,))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), fb.GELU(bits=2), torch.nn.Linear(32, 4),
                                fb.ReLU())
    x = torch.randn(8, 16)
    want = model(x)
    want.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True)
    got = compiled(x)
    got.sum().backward()
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)
    for p, w in zip(model.parameters(), grads):
        assert torch.allclose(p.grad, w, rtol=1e-5, atol=1e-6)


# ---- no gradient wanted: torch's activation, nothing packed --------------------------------------


class _OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def _calls(fn, x):
    with _OpLog() as log:
        y = fn(x)
    return y, log.names


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_no_grad_runs_torchs_activation_and_packs_nothing(backend, monkeypatch):
    def no_pack(*a, **k):
        raise AssertionError("codes packed without a backward to use them")

    cases = [(fb.GELU(bits=3), torch.nn.GELU()), (fb.GELU("tanh"), torch.nn.GELU("tanh")),
             (fb.ReLU6(), torch.nn.ReLU6()), (fb.Softplus(2.0, 5.0), torch.nn.Softplus(2.0, 5.0)),
             (lambda t: fb.activation(t, "silu", 4), torch.nn.SiLU())]
    x = inputs(1000, torch.float32)[:999].reshape(27, 37).t()  # non-contiguous too
    with pypaper.use_backend(backend):
        for ours, twin in cases:
            y, names = _calls(ours, x.clone().requires_grad_())
            assert any("fewbit" in n for n in names) or backend == "reference"
            monkeypatch.setattr(reference, "pack", no_pack)
            for make_x, ctx in ((lambda: x.clone(), torch.enable_grad),
                                (lambda: x.clone().requires_grad_(), torch.no_grad),
                                (lambda: x.clone().requires_grad_(), torch.inference_mode)):
                saved = []
                with ctx(), torch.autograd.graph.saved_tensors_hooks(
                        lambda t: saved.append(t) or t, lambda t: t):
                    got, names = _calls(ours, make_x())
                assert not [n for n in names if "pypaper" in n or "fewbit" in n], names
                assert saved == [] and not got.requires_grad
                assert torch.equal(got, twin(x.contiguous()))  # the op's y, as with grad
                assert torch.equal(got, y.detach())
            monkeypatch.undo()


def test_no_grad_under_torch_compile():
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), fb.GELU(bits=2), fb.ReLU())
    x = torch.randn(8, 16)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        want = model(x)
        assert torch.allclose(compiled(x), want, rtol=1e-6, atol=1e-6)
    compiled(x).sum().backward()
    assert model[0].weight.grad is not None


# ---- the functional form under torch.compile(fullgraph=True) -------------------------------------


def test_functional_form_compiles_fullgraph():
    torch._dynamo.reset()

    def f(x, bits):
        return (fb.activation(x, "gelu", bits) + fb.activation(x, "gelu", 3)
                + fb.activation(x, "leaky_relu", params=(0.2,))
                + fb.activation(x, "hardtanh", 1, params=(-1.0, 2.0)))

    compiled = torch.compile(f, fullgraph=True)
    for dtype, bits in ((torch.float32, 2), (torch.float32, 4), (torch.float32, 1),
                        (torch.float64, 3), (torch.float32, None)):
        # a changing int argument becomes dynamic (a SymInt): still one constant table
        x = inputs(300, dtype).requires_grad_()
        y = compiled(x, bits)
        (g,) = torch.autograd.grad(y.sum(), x)
        y_eager = f(x, bits)
        (g_eager,) = torch.autograd.grad(y_eager.sum(), x)
        assert torch.allclose(y, y_eager, rtol=1e-6, atol=1e-6), (dtype, bits)  # fused adds
        assert torch.allclose(g, g_eager, rtol=0, atol=0), (dtype, bits)
    with torch.no_grad():
        x = torch.randn(40)
        assert torch.allclose(compiled(x, 2), f(x, 2), rtol=1e-6, atol=1e-6)


# ---- repr, bits= on the exact ones, bits=None ----------------------------------------------------


def test_repr_shows_tanh_gelu():
    assert "approximate='tanh'" in repr(fb.GELU("tanh", bits=3))
    assert repr(fb.GELU("tanh", bits=3)) == "GELU(approximate='tanh', bits=3)"
    assert repr(fb.GELU(bits=3)) == "GELU(bits=3)"


@pytest.mark.parametrize("cls", [fb.ReLU, fb.LeakyReLU, fb.ReLU6, fb.Hardtanh, fb.Hardsigmoid])
def test_exact_modules_accept_and_ignore_bits(cls):
    x = inputs(100, torch.float32).requires_grad_()
    want = cls()(x)
    for bits in (None, 1, 2, 3, 4):
        m = cls(bits=bits)
        assert m.bits == 1 and m.approximation.exact
        assert torch.equal(m(x), want)
    for bad in (0, 5, 2.0, True):
        with pytest.raises(ValueError, match="bits"):
            cls(bits=bad)


def test_bits_none_means_the_default():
    x = inputs(100, torch.float32).requires_grad_()
    assert fb.GELU(bits=None).bits == 2 and fb.SiLU(bits=None).bits == 2
    assert fb.approximation("gelu", None) is fb.approximation("gelu", 2)
    g1, g2 = (torch.autograd.grad(fb.activation(x, "mish", b), x, torch.ones(100))[0]
              for b in (None, 2))
    assert torch.equal(g1, g2)
