"""A seeded randomized differential sweep of the fused LIF op's implementations against each other.

Implementations: the C++ CPU op (torch.ops.pypaper.lif_forward / lif_backward, the default on
CPU), its Triton twins (pypaper/snn/triton_kernels.py; here interpreted, TRITON_INTERPRET=1 on
CPU tensors, as in test_lif_triton.py), the plain-PyTorch reference (pypaper/snn/reference.py),
the forward-mode rule (jvp_rule.py: the C++ and Triton tangent kernels and the torch-op
composite), the vmap rule (vmap_rule.py) and the second-order rules (second_order.py).

The configuration space is sampled jointly (gen_config: every axis drawn for every
configuration, not one axis at a time): surrogate (all 8, random alpha), hard reset to 0 or
-0.3 or soft reset, decay_input, tau or k, k = 0 without decay_input (IF), detach_reset, SLTT,
store_v_seq, the decay and the threshold each a number, a 0-d tensor, one element of another
rank ((1,) * r, also more dims than x has features), one per neuron, one per neuron as an
expanded view, or one per sample and neuron; learnable (requires_grad) or not; v_init none,
given, or given as a strided view; fp32 / fp64 / fp16 / bf16; T in 0..5, N = 0, odd sizes,
rank 2..5; contiguous, strided or channels_last x; inputs normal, large, or on a dyadic grid
that puts H exactly on the threshold (H - Vth == 0 at some steps: a spike, every backend).
A fixed sample of configurations (seeded) runs; PYPAPER_SWEEP_N=<n> draws n per test instead
(a larger ad hoc sweep).

Tolerances:
- forward (spikes, v_last, v_seq): none between the C++ op, Triton and the reference run in the
  same math dtype (fp32 for fp32/16-bit, fp64 for fp64): the same operations in the same order,
  for every dtype (16-bit outputs are the fp32 values rounded once). Strides: Triton's equal the
  C++ op's (dims of size 1 aside).
- gradients, same math dtype: relative GRAD_TOL of the gradient's largest magnitude (the
  reverse scan runs the products in another order than autograd of the reference loop; the exp
  surrogates use another exp). 16-bit: the C++ backward reruns the forward in fp32 (its
  gradient is the fp32 computation's rounded once): within 16-bit rounding of the reference's.
  The Triton backward reads H kept in 16 bits (the surrogate at a rounded H; the decay
  gradient from (H - V) / k with a rounded H), so its 16-bit gradients are compared, exactly as
  they are computed, with the C++ op's kept-H backward (lif_backward without RECOMPUTE: the same
  stored H), test_ops_kept_h_and_triton; through the public op only its forward is compared
  in 16 bits.
- fp32 against the reference in fp64 (test_fp32_against_the_fp64_reference): a neuron whose H
  at some step lies within fp32 rounding of the threshold (|H - Vth| <= 3e-6 (T + 1) (|H| +
  |V| + |X| + |Vth| + 1), from an fp64 recomputation of H), or of a kink of the surrogate's
  derivative (PiecewiseQuadratic at |H - Vth| = 1/a, Rect at 1/(2a)), may legitimately spike
  (or take a gradient) differently: it is excluded from the comparison of outputs and of x's /
  v_init's gradients, and a configuration with any excluded neuron skips the parameter
  gradients (summed over all neurons). Spikes that differ on a neuron not excluded fail.
"""
import math
import os
import random

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch.autograd.forward_ad as fwAD  # noqa: E402
import torch.func as func  # noqa: E402

pytest.importorskip("triton")

import pypaper  # noqa: E402
from pypaper import _ext  # noqa: E402
from pypaper.snn import _registration, lif_multi_step, op_flags, surrogate  # noqa: E402

tk = _registration.load_triton()
_OK, _WHY = tk.triton_available(torch.device("cpu"))

pytestmark = [
    pytest.mark.skipif(not (_ext.LOADED and hasattr(torch.ops.pypaper, "lif_forward")),
                       reason="the C++ LIF op (pypaper._C) is one of the implementations"),
]
needs_triton = pytest.mark.skipif(not _OK or torch.cuda.is_available(),
                                  reason=_WHY or "interpreted on CPU tensors only")

SURROGATES = ["Sigmoid", "ATan", "PiecewiseQuadratic", "PiecewiseExp", "SoftSign", "SuperSpike",
              "Erf", "Rect"]  # the op's ids 0..7
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
PARAM_KINDS = ["num", "t0", "one", "neuron", "neuron_exp", "sample"]
HALF = (torch.float16, torch.bfloat16)
GRAD_TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 2e-2,
            torch.bfloat16: 5e-2}
_SWEEP_N = int(os.environ.get("PYPAPER_SWEEP_N", "0"))


def _math(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- configurations ------------------------------------------------------------------------------

def gen_config(rng: random.Random) -> dict:
    c = {"surr": rng.choice(SURROGATES), "alpha": round(rng.uniform(0.5, 6.0), 3),
         "v_reset": rng.choice([None, 0.0, -0.3]), "di": rng.random() < 0.5,
         "tau": rng.random() < 0.5}
    c["if"] = (not c["di"]) and (not c["tau"]) and rng.random() < 0.4
    c["detach"] = rng.random() < 0.5
    c["sltt"] = rng.random() < 0.3
    c["store"] = rng.random() < 0.5
    c["dtype"] = rng.choice(DTYPES)
    steps = 0 if rng.random() < 0.04 else rng.choice([1, 1, 2, 3, 5])
    rank = rng.choice([2, 3, 4, 5])
    batch = rng.choice([0, 1, 2, 3]) if rng.random() < 0.15 else rng.choice([1, 2, 3])
    c["shape"] = (steps, batch, *[rng.choice([1, 2, 3, 5]) for _ in range(rank - 2)])
    c["layout"] = rng.choice(["contig", "contig", "strided",
                              "channels_last" if rank == 5 else "strided"])
    c["dparam"] = rng.choice(PARAM_KINDS)
    c["tparam"] = rng.choice(PARAM_KINDS)
    c["one_rank"] = rng.choice([1, 4])  # "one": (1,) * max(1, features) or (1, 1, 1, 1)
    c["learn_d"] = rng.random() < 0.6
    c["learn_t"] = rng.random() < 0.6
    c["v0"] = rng.choice([None, "given", "given_strided"])
    c["values"] = rng.choice(["normal", "normal", "threshold", "large"])
    c["seed"] = rng.randrange(1 << 30)
    if c["values"] == "threshold" and c["surr"] in ("Rect", "PiecewiseQuadratic"):
        # a dyadic alpha (no draw: the rest of the sample stays as it was), so that the dyadic
        # H - Vth also lands exactly on the derivative's kink (Rect's |x| < 1/(2a), PQ's 1/a)
        c["alpha"] = 2.0 if c["seed"] % 2 else 1.0
    return c


def configs(n: int, seed: int) -> list:
    rng = random.Random(seed)
    return [gen_config(rng) for _ in range(max(n, _SWEEP_N))]


def config_id(c) -> str:
    return (f"{c['surr']}-{'soft' if c['v_reset'] is None else 'vr' + str(c['v_reset'])}"
            f"-{'di' if c['di'] else 'nodi'}-{'if' if c['if'] else ('tau' if c['tau'] else 'k')}"
            f"{'-detach' if c['detach'] else ''}{'-sltt' if c['sltt'] else ''}"
            f"{'-vseq' if c['store'] else ''}-{str(c['dtype'])[6:]}"
            f"-{'x'.join(map(str, c['shape']))}"
            f"-{c['layout']}-d{c['dparam']}{'L' if c['learn_d'] else ''}"
            f"-t{c['tparam']}{'L' if c['learn_t'] else ''}-v0{c['v0']}-{c['values']}-{c['seed']}")


def _pshape(c, kind):
    shape = c["shape"]
    if kind in ("num", "t0"):
        return ()
    if kind == "one":
        return (1,) * max(1, len(shape) - 2) if c["one_rank"] == 1 else (1, 1, 1, 1)
    if kind in ("neuron", "neuron_exp"):
        return tuple(shape[2:])
    return tuple(shape[1:])


def build(c) -> dict:
    """The configuration's inputs (float64 draws, then cast), loss weights included."""
    g = torch.Generator().manual_seed(c["seed"])
    dt, shape, vr = c["dtype"], c["shape"], c["v_reset"]
    grid = c["values"] == "threshold"

    def rnd(s):
        return torch.rand(s, generator=g, dtype=torch.float64)

    def pick(choices, s):
        ch = torch.tensor(choices, dtype=torch.float64)
        return ch[(rnd(s) * len(choices)).long().clamp(max=len(choices) - 1)]

    def decay(s):
        if c["if"]:
            return torch.zeros(s, dtype=torch.float64)
        if grid:
            return pick([2.0, 4.0] if c["tau"] else [0.5, 0.25], s)
        return rnd(s) * 3.0 + 1.2 if c["tau"] else rnd(s) * 0.8 + 0.15

    def threshold(s):
        if grid:
            return pick([0.5, 1.0], s)
        return rnd(s) * 0.8 + max(0.3, -0.1 if vr is None else vr + 0.2)

    def param(kind, values, learn):
        ps = _pshape(c, kind)
        if kind == "num":
            return float(values(())), False
        if kind == "neuron_exp":  # a leaf of one value per dim, expanded to x.shape[2:]
            return values((1,) * len(ps)).to(_math(dt)).requires_grad_(learn), True
        return values(ps).to(_math(dt)).requires_grad_(learn), False

    d, d_exp = param(c["dparam"], decay, c["learn_d"] and not c["if"])
    t, t_exp = param(c["tparam"], threshold, c["learn_t"])
    z = torch.randn(shape, generator=g, dtype=torch.float64)
    if grid:  # dyadic values: H is exact, and lands on the threshold at some steps
        x = torch.round(z * 4 + 3) / 4 / (2 if c["if"] else 1)
    elif c["values"] == "large":
        x = z * {torch.float16: 2e3, torch.bfloat16: 1e5, torch.float32: 1e6,
                 torch.float64: 1e9}[dt]
    else:
        x = z + 0.6
    v0 = None
    if c["v0"]:
        v0 = torch.round(rnd(shape[1:]) * 4) / 4 if grid else rnd(shape[1:]) * 0.8 - 0.2
        v0 = v0.to(dt)

    def w(s):
        return torch.randn(s, generator=g, dtype=torch.float64).to(dt)

    return dict(x=x.to(dt), v0=v0, d=d, d_exp=d_exp, t=t, t_exp=t_exp, ws=w(shape),
                wl=w(shape[1:]), wv=w(shape) if c["store"] else None)


def _layout(x, kind):
    if kind == "contig" or x.numel() == 0:
        return x
    if kind == "channels_last":  # a channels_last [T*N, C, H, W] viewed as [T, N, C, H, W]
        steps, batch = x.shape[:2]
        y = x.reshape(steps * batch, *x.shape[2:]).contiguous(memory_format=torch.channels_last)
        return y.view(x.shape)
    big = x.new_zeros((*x.shape[:-1], x.shape[-1] * 2))  # every other element of a bigger one
    big[..., ::2] = x
    return big[..., ::2]


def _call(c, x, v0, d, t):
    kw = {"tau": d} if c["tau"] else {"k": d}
    out = lif_multi_step(x, v0, **kw, v_threshold=t, v_reset=c["v_reset"],
                         surrogate_function=getattr(surrogate, c["surr"])(alpha=c["alpha"]),
                         decay_input=c["di"], detach_reset=c["detach"], sltt=c["sltt"],
                         store_v_seq=c["store"])
    return out[:2] + ((out[2],) if c["store"] else ())


def run(c, inp, backend, dtype=None):
    """({output name: tensor}, {gradient name: tensor}) of the configuration's loss on backend
    (``dtype``: everything cast to it first)."""
    cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
    x = _layout(cast(inp["x"]).clone(), c["layout"]).requires_grad_()
    v0 = None
    if inp["v0"] is not None:
        v0 = cast(inp["v0"]).clone()
        if c["v0"] == "given_strided" and v0.dim() > 0:
            v0 = _layout(v0[None], "strided")[0]
        v0.requires_grad_()

    def param(val, expand):
        if not isinstance(val, torch.Tensor):
            return val, None
        leaf = val.detach().to(dtype or val.dtype).clone().requires_grad_(val.requires_grad)
        return (leaf.expand(c["shape"][2:]) if expand else leaf), leaf

    d, d_leaf = param(inp["d"], inp["d_exp"])
    t, t_leaf = param(inp["t"], inp["t_exp"])
    with pypaper.use_backend(backend):
        outs = _call(c, x, v0, d, t)
    weights = (inp["ws"], inp["wl"], inp["wv"])
    loss = sum((o * cast(w)).sum() for o, w in zip(outs, weights))
    named = [("x", x), ("v0", v0), ("decay", d_leaf), ("vth", t_leaf)]
    named = [(n, leaf) for n, leaf in named if leaf is not None and leaf.requires_grad]
    grads = torch.autograd.grad(loss, [leaf for _, leaf in named], allow_unused=True,
                                materialize_grads=True)
    names = ("spikes", "v_last", "v_seq")
    return ({n: o.detach() for n, o in zip(names, outs)},
            {n: g for (n, _), g in zip(named, grads)})


# ---- comparisons ---------------------------------------------------------------------------------

def assert_close(got, want, rtol, what, atol=0.0):
    """|got - want| <= rtol * max|want| + atol over the finite values; NaN and inf where want
    has them."""
    assert got.shape == want.shape and got.dtype == want.dtype, (
        what, tuple(got.shape), got.dtype, tuple(want.shape), want.dtype)
    if want.numel() == 0:
        return
    g, w = got.detach().double(), want.detach().double()
    assert torch.equal(torch.isnan(g), torch.isnan(w)), f"{what}: NaN where the other has none"
    inf = torch.isinf(g) | torch.isinf(w)
    assert torch.equal(g[inf], w[inf]), f"{what}: infinities differ"
    fin = ~torch.isnan(w) & ~inf
    if fin.any():
        scale = float(w[fin].abs().max())
        err = float((g[fin] - w[fin]).abs().max())
        assert err <= rtol * scale + atol, f"{what}: error {err:.3e}, scale {scale:.3e}"


def assert_same(got, want, what):
    assert got.shape == want.shape and got.dtype == want.dtype, what
    assert torch.equal(torch.isnan(got), torch.isnan(want)), what
    assert torch.equal(got.nan_to_num(), want.nan_to_num()), (
        f"{what}: max difference "
        f"{float((got.double() - want.double()).abs().nan_to_num(0).max()):.3e}")


def _strides(t):
    return [s for s, n in zip(t.stride(), t.shape) if n > 1]


SWEEP = configs(150, seed=20261205)


def test_the_sample_covers_the_space():
    """The fixed sample draws every value of every axis (with the seed, the check that this
    sweep still reaches each combination's ingredients), and some H exactly on a threshold."""
    seen = {k: {repr(c[k]) for c in SWEEP} for k in
            ("surr", "v_reset", "di", "tau", "if", "detach", "sltt", "store", "dtype",
             "layout", "dparam", "tparam", "learn_d", "learn_t", "v0", "values", "one_rank")}
    assert len(seen["surr"]) == 8 and len(seen["dtype"]) == 4 and len(seen["v_reset"]) == 3
    assert len(seen["dparam"]) == len(seen["tparam"]) == len(PARAM_KINDS)
    assert len(seen["layout"]) == 3 and len(seen["values"]) == 3 and len(seen["v0"]) == 3
    assert all(len(v) >= 2 for v in seen.values())
    assert any(c["shape"][0] == 0 for c in SWEEP) and any(c["shape"][0] == 1 for c in SWEEP)
    assert any(c["shape"][1] == 0 for c in SWEEP) and {len(c["shape"]) for c in SWEEP} == {
        2, 3, 4, 5}
    on = kink = 0
    for c in SWEEP:
        if c["values"] == "threshold" and 0 not in c["shape"]:
            h, _, th = h_seq64(c, build(c))
            on += int((h == th).sum())
            if c["surr"] == "Rect":  # Rect's derivative is a at |x| < 1/(2a), 0 on the kink
                kink += int(((h - th).abs() == 0.5 / c["alpha"]).sum())
    assert on > 20 and kink > 0


# ---- the public op on each backend ---------------------------------------------------------------

@needs_triton
@pytest.mark.parametrize("c", SWEEP, ids=config_id)
def test_backends_agree(c):
    """Forward bit for bit between the C++ op, Triton and the reference (same math dtype), Triton's
    strides the C++ op's; every gradient (x, v_init, tau / k, threshold) of the reference and,
    in fp32 / fp64, of Triton within GRAD_TOL of the C++ op's."""
    inp = build(c)
    dt = c["dtype"]
    outs, grads = run(c, inp, "cpu")
    for backend in ("triton", "reference"):
        o, g = run(c, inp, backend)
        for k in outs:
            assert_same(o[k], outs[k], f"{k}: {backend} against the C++ op")
            if backend == "triton" and o[k].numel():
                assert _strides(o[k]) == _strides(outs[k]), (k, o[k].stride(),
                                                             outs[k].stride())
        if backend == "triton" and dt in HALF:
            continue  # its 16-bit backward reads a 16-bit H: test_ops_kept_h_and_triton
        for k in grads:
            tol = GRAD_TOL[dt] if k in ("x", "v0") else max(GRAD_TOL[dt], 1e-4)
            assert_close(g[k], grads[k], tol, f"grad {k}: {backend} against the C++ op",
                         atol=1e-12 if dt == torch.float64 else 1e-6)


def _op_args(c, inp):
    """(x, v0, decay, threshold) as lif_multi_step hands them to the ops: contiguous, math-type
    parameters, per-sample ones flattened into one batch row."""
    x, v0, mt, shape = inp["x"].contiguous(), inp["v0"], _math(c["dtype"]), c["shape"]

    def param(val, expand):
        if not isinstance(val, torch.Tensor):
            return torch.tensor(val, dtype=mt)
        v = val.detach().to(mt)
        return v.expand(shape[2:]).contiguous() if expand else v

    d, t = param(inp["d"], inp["d_exp"]), param(inp["t"], inp["t_exp"])
    if any(p.numel() != 1 and tuple(p.shape) == tuple(shape[1:]) for p in (d, t)):
        m = math.prod(shape[1:])

        def flat(p):
            return p if p.numel() == 1 else p.expand(shape[1:]).reshape(m)

        x, d, t = x.reshape(shape[0], 1, m), flat(d), flat(t)
        v0 = None if v0 is None else v0.reshape(1, m)
    return x, v0, d, t


@needs_triton
@pytest.mark.parametrize("c", SWEEP[:100], ids=config_id)
def test_ops_kept_h_and_triton(c):
    """The ops themselves: the C++ forward with and without keep_h, and Triton's, bit for bit
    (the kept H too: 16-bit H nudged off the threshold alike); the backward from the kept H
    (C++ and Triton: the same stored values, every dtype) and the C++ rerun from x (fp32 / fp64:
    the 16-bit rerun keeps H in fp32, test_backends_agree compares it) within tolerance."""
    inp = build(c)
    x, v0, d, t = _op_args(c, inp)
    ops = torch.ops.pypaper
    scalars = (c["v_reset"], SURROGATES.index(c["surr"]), float(c["alpha"]))
    ff = op_flags.forward_flags(c["di"], c["tau"], c["detach"], c["sltt"], c["store"], True)
    bf = op_flags.backward_flags(c["di"], c["tau"], c["detach"], c["sltt"], True, True)
    fc = ops.lif_forward(x, v0, d, t, *scalars, ff)
    ft = ops.lif_forward_triton(x, v0, d, t, *scalars, ff)
    fr = ops.lif_forward(x, v0, d, t, *scalars, ff & ~op_flags.KEEP_H)
    for k, name in enumerate(("spikes", "v_last", "h_seq", "v_seq")):
        assert_same(ft[k], fc[k], f"{name}: Triton against C++")
        if name != "h_seq":
            assert_same(fr[k], fc[k], f"{name}: C++ without keep_h against with it")
    g = torch.Generator().manual_seed(c["seed"] + 5)

    def w(s):
        return torch.randn(s, generator=g, dtype=torch.float64).to(x.dtype)

    grads = (w(x.shape), w(x.shape[1:]), w(x.shape) if c["store"] else None)
    bc = ops.lif_backward(*grads, fc[2], v0, d, t, *scalars, bf)
    bt = ops.lif_backward_triton(*grads, ft[2], v0, d, t, *scalars, bf)
    br = ops.lif_backward(*grads, x, v0, d, t, *scalars, bf | op_flags.RECOMPUTE)
    tol = {torch.float64: 1e-11, torch.float32: 2e-5, torch.float16: 4e-3,
           torch.bfloat16: 2e-2}[c["dtype"]]
    for k, name in enumerate(("grad_x", "grad_v_init", "grad_decay", "grad_threshold")):
        assert_close(bt[k], bc[k], tol, f"{name}: Triton against C++ (kept H)", atol=1e-6)
        if c["dtype"] not in HALF:
            assert_close(br[k], bc[k], tol, f"{name}: C++ rerun against kept H", atol=1e-6)


# ---- fp32 against fp64 ---------------------------------------------------------------------------

def h_seq64(c, inp):
    """(H[t], V[t-1], threshold) in float64 from the inputs cast to fp64 (the reference's
    formulas), for the exclusion of neuron-steps within rounding of the threshold."""
    x, shape = inp["x"].double(), c["shape"]

    def param(val, expand):
        if not isinstance(val, torch.Tensor):
            return torch.tensor(val, dtype=torch.float64)
        v = val.detach().double()
        return v.reshape(()) if v.numel() == 1 else (v.expand(shape[2:]) if expand else v)

    d, th = param(inp["d"], inp["d_exp"]), param(inp["t"], inp["t_exp"])
    vr = 0.0 if c["v_reset"] is None else c["v_reset"]
    v = (inp["v0"].double() if inp["v0"] is not None
         else torch.full(shape[1:], vr, dtype=torch.float64))
    hs, vs = [], []
    for xt in x.unbind(0):
        if c["di"]:
            h = v + ((xt - (v - vr)) / d if c["tau"] else (xt - (v - vr)) * d)
        elif c["tau"]:
            h = v - (v - vr) / d + xt
        else:
            h = torch.where(d == 0, v + xt, v - (v - vr) * d + xt)
        s = (h - th >= 0).double()
        hs.append(h)
        vs.append(v)
        v = s * vr + (1 - s) * h if c["v_reset"] is not None else h - s * th
    return torch.stack(hs), torch.stack(vs), th


FP32 = [c for c in configs(400, seed=7) if c["dtype"] == torch.float32
        and 0 not in c["shape"]][:max(60, _SWEEP_N)]


def excluded_neurons(c, inp):
    """[N, *]: the neurons with a step within fp32 rounding of the threshold or of a surrogate
    kink (module doc), from an fp64 recomputation of H."""
    steps = c["shape"][0]
    h, vp, th = h_seq64(c, inp)
    z = h - th
    tol = 3e-6 * (steps + 1) * (h.abs() + vp.abs() + inp["x"].double().abs() + th.abs() + 1.0)
    near = z.abs() <= tol
    if c["surr"] == "PiecewiseQuadratic":
        near |= (z.abs() - 1.0 / c["alpha"]).abs() <= tol
    if c["surr"] == "Rect":
        near |= (z.abs() - 0.5 / c["alpha"]).abs() <= tol
    return near.any(0)


def test_the_fp64_comparison_excludes_few_neurons():
    """The exclusion cannot swallow the comparison: over the fp32 sample it drops at most 3 % of
    the neurons (1.4 % when written), and the parameter gradients (skipped in a configuration
    with any excluded neuron) are still compared in at least 3/4 of the configurations that
    have one (35 of 41)."""
    excluded = total = with_params = compared = 0
    for c in FP32:
        inp = build(c)
        e = excluded_neurons(c, inp)
        excluded, total = excluded + int(e.sum()), total + e.numel()
        if any(isinstance(inp[k], torch.Tensor) and inp[k].requires_grad for k in ("d", "t")):
            with_params += 1
            compared += int(not e.any())
    assert total > 500 and excluded <= 0.03 * total, (excluded, total)
    assert with_params >= 30 and compared >= 0.75 * with_params, (compared, with_params)


@pytest.mark.parametrize("c", FP32, ids=config_id)
def test_fp32_against_the_fp64_reference(c):
    """The C++ op in fp32 against the reference run on the same inputs in fp64, neurons with a
    step within fp32 rounding of the threshold or of a surrogate kink excluded (module doc)."""
    inp = build(c)
    outs, grads = run(c, inp, "cpu")
    outs64, grads64 = run(c, inp, "reference", dtype=torch.float64)
    steps = c["shape"][0]
    excluded = excluded_neurons(c, inp)
    keep = ~excluded
    differ = (outs["spikes"].double() != outs64["spikes"]).any(0)
    assert not (differ & keep).any(), "spikes differ on neurons never near the threshold"
    for k in outs:
        m = keep.expand(outs[k].shape)
        assert_close(outs[k].double()[m], outs64[k][m], 1e-5 * (steps + 1), k, atol=1e-5)
    for k in grads:
        if k in ("x", "v0"):
            m = keep.expand(grads[k].shape)
            assert_close(grads[k].double()[m], grads64[k][m], 1e-4, f"grad {k}", atol=1e-5)
        elif not excluded.any():
            assert_close(grads[k].double(), grads64[k], 1e-4, f"grad {k}", atol=1e-5)


# ---- forward mode, vmap, second order ------------------------------------------------------------

def _primals(c, inp, dtype=None):
    """[x, v0, decay, threshold] (numbers stay numbers; an expanded parameter as its leaf) and
    f(x, v0, decay, threshold) -> the outputs."""
    cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
    x = _layout(cast(inp["x"]).clone(), c["layout"])
    v0 = cast(inp["v0"]).clone() if inp["v0"] is not None else None

    def param(val):
        return val.detach().to(dtype or val.dtype).clone() if isinstance(val, torch.Tensor) else val

    def f(x, v0, d, t):
        d = d.expand(c["shape"][2:]) if inp["d_exp"] else d
        t = t.expand(c["shape"][2:]) if inp["t_exp"] else t
        return _call(c, x, v0, d, t)

    return [x, v0, param(inp["d"]), param(inp["t"])], f


def _differentiable(c, prim):
    """Indices of the tensor arguments given tangents (k = 0 has none: it would leave [0, 1])."""
    return [i for i, p in enumerate(prim) if isinstance(p, torch.Tensor)
            and not (i == 2 and c["if"])]


JVP = configs(80, seed=11)


@needs_triton
@pytest.mark.parametrize("c", JVP, ids=config_id)
def test_jvp_agrees(c):
    """torch.func.jvp on the C++ backend (its tangent kernel), on Triton (its tangent kernel),
    on the reference (torch's forward AD of the loop), and dual tensors whose primals require
    grad (the rule's torch-op composite): the same tangents within GRAD_TOL."""
    inp = build(c)
    prim, f = _primals(c, inp)
    idx = _differentiable(c, prim)
    g = torch.Generator().manual_seed(c["seed"] + 1)
    tans = tuple(torch.randn(prim[i].shape, generator=g, dtype=torch.float64).to(prim[i].dtype)
                 for i in idx)

    def fi(*values):
        full = list(prim)
        for i, v in zip(idx, values):
            full[i] = v
        return f(*full)

    got = {}
    for backend in ("cpu", "triton", "reference"):
        with pypaper.use_backend(backend):
            got[backend] = func.jvp(fi, tuple(prim[i] for i in idx), tans)[1]
    with pypaper.use_backend("cpu"), fwAD.dual_level():
        duals = [fwAD.make_dual(prim[i].clone().requires_grad_(), t) for i, t in zip(idx, tans)]
        got["composite"] = tuple(fwAD.unpack_dual(o).tangent for o in fi(*duals))
    dt = c["dtype"]
    for name in ("triton", "reference", "composite"):
        for k, (a, w) in enumerate(zip(got[name], got["cpu"])):
            assert_close(a, w, GRAD_TOL[dt], f"tangent {k}: {name} against the C++ kernel",
                         atol=1e-12 if dt == torch.float64 else 1e-6)


SECOND = configs(60, seed=13)


@pytest.mark.parametrize("c", SECOND, ids=config_id)
def test_second_order_agrees(c):
    """In float64, C++ backend against the reference's autograd: forward-over-reverse HVPs
    (torch.func.jvp of grad: lif_backward's jvp rule), reverse-over-reverse (torch.func: its
    double-backward rule) and eager create_graph=True then backward (the reference rerun with a
    graph)."""
    inp = build(c)
    prim, f = _primals(c, inp, torch.float64)
    idx = _differentiable(c, prim)
    weights = [w.double() for w in (inp["ws"], inp["wl"], inp["wv"]) if w is not None]

    def loss(*values):
        full = list(prim)
        for i, v in zip(idx, values):
            full[i] = v
        return sum((o * w).sum() for o, w in zip(f(*full), weights))

    g = torch.Generator().manual_seed(c["seed"] + 2)
    vt = tuple(torch.randn(prim[i].shape, generator=g, dtype=torch.float64) for i in idx)
    primals = tuple(prim[i] for i in idx)
    argnums = tuple(range(len(idx)))
    got = {}
    for backend in ("cpu", "reference"):
        with pypaper.use_backend(backend):
            grad = func.grad(loss, argnums=argnums)
            hvp = func.jvp(grad, primals, vt)[1]
            rr = func.grad(lambda *a: sum((gg * v).sum() for gg, v in zip(grad(*a), vt)),
                           argnums=argnums)(*primals)
            leaves = [p.clone().requires_grad_() for p in primals]
            first = torch.autograd.grad(loss(*leaves), leaves, create_graph=True,
                                        allow_unused=True, materialize_grads=True)
            second = sum((a * v).sum() for a, v in zip(first, vt))
            eager = (torch.autograd.grad(second, leaves, allow_unused=True,
                                         materialize_grads=True)
                     if second.requires_grad else tuple(torch.zeros_like(p) for p in leaves))
        got[backend] = (hvp, rr, eager)
    for kind, a_all, w_all in zip(("hvp", "reverse-over-reverse", "eager double backward"),
                                  got["cpu"], got["reference"]):
        for i, a, w in zip(idx, a_all, w_all):
            assert_close(a, w, 1e-9, f"{kind}, argument {i}", atol=1e-10)


VMAP = [c for c in configs(120, seed=17) if c["layout"] == "contig"][:max(40, _SWEEP_N)]


@needs_triton
@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("c", VMAP, ids=config_id)
def test_vmap_agrees(c, backend):
    """vmap over two samples of x with the threshold batched too (one per sample) where it is a
    tensor in every other configuration (unbatched, but differentiated per sample, in the rest):
    outputs to the bit and per-sample gradients (x, tau / k, threshold) against the
    loop over the samples."""
    inp = build(c)
    prim, f = _primals(c, inp)
    x, v0, d, t = prim
    g = torch.Generator().manual_seed(c["seed"] + 3)
    x2 = (x.double() + torch.randn(x.shape, generator=g, dtype=torch.float64) * 0.3).to(x.dtype)
    xb = torch.stack([x, x2])
    # a tensor threshold is batched in every other configuration; in the others it is shared by
    # the samples and its gradient still per sample (vmap_rule expands it to [B, *F] for that)
    batch_t = isinstance(t, torch.Tensor) and c["seed"] % 2 == 0
    tb = torch.stack([t, t * 1.1 + 0.05]) if batch_t else None
    weights = [w for w in (inp["ws"], inp["wl"], inp["wv"]) if w is not None]

    def loss(x, d, t):
        return sum((o * w).sum() for o, w in zip(f(x, v0, d, t), weights))

    argnums = (0,) + tuple(i for i, p in ((1, d), (2, t))
                           if isinstance(p, torch.Tensor) and not (i == 1 and c["if"]))
    tt = tb if tb is not None else t
    t_dim = 0 if tb is not None else None
    with pypaper.use_backend(backend):
        outs = func.vmap(lambda a, b: f(a, v0, d, b), in_dims=(0, t_dim))(xb, tt)
        grads = func.vmap(func.grad(loss, argnums=argnums), in_dims=(0, None, t_dim))(xb, d, tt)
        for s in range(2):
            ts = tb[s] if tb is not None else t
            for o, want in zip(outs, f(xb[s], v0, d, ts)):
                assert_same(o[s], want, f"output of sample {s}")
            for k, want in zip(argnums, func.grad(loss, argnums=argnums)(xb[s], d, ts)):
                assert_close(grads[argnums.index(k)][s], want, GRAD_TOL[c["dtype"]] / 10,
                             f"gradient {k} of sample {s}", atol=1e-7)


# ---- regressions the sweep found ----------------------------------------------------------------

@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_one_element_parameters_of_more_dims_than_the_state(backend):
    """A tau / threshold of one element is one value in any shape (the kernels read one number):
    a (1, 1) tau with x [T, N], or (1, 1, 1) with per-sample thresholds, which lif_multi_step
    runs with x flattened to [T, 1, M]. The reference broadcast the parameter's dims into the
    state (spikes [3, 1, 1, 4] for x [3, 4]) and the forward-mode composite raised (its
    tangents had those dims)."""
    x = torch.randn(3, 4, dtype=torch.float64) + 0.5
    tau = torch.full((1, 1), 2.0, dtype=torch.float64, requires_grad=True)
    vth = torch.full((1, 1, 1), 0.9, dtype=torch.float64, requires_grad=True)
    with pypaper.use_backend(backend):
        s, v, vs = lif_multi_step(x, tau=tau, v_threshold=vth, store_v_seq=True)
    assert s.shape == vs.shape == x.shape and v.shape == (4,)
    with pypaper.use_backend("cpu"):
        sc, vc, vsc = lif_multi_step(x, tau=tau, v_threshold=vth, store_v_seq=True)
    assert torch.equal(s, sc) and torch.equal(v, vc) and torch.equal(vs, vsc)
    g = torch.autograd.grad((s.sum() + v.sum() + vs.sum()), (tau, vth))
    assert g[0].shape == tau.shape and g[1].shape == vth.shape
    # the composite tangent (dual tensors whose primals require grad), per-sample thresholds
    xs = torch.randn(2, 3, 5, dtype=torch.float64) + 0.5
    th = torch.rand(3, 5, dtype=torch.float64) + 0.5
    with pypaper.use_backend(backend), fwAD.dual_level():
        dtau = fwAD.make_dual(tau.detach().reshape(1, 1, 1).requires_grad_(),
                              torch.ones(1, 1, 1, dtype=torch.float64))
        s, v, _ = lif_multi_step(xs, tau=dtau, v_threshold=th)
        ts, tv = fwAD.unpack_dual(s).tangent, fwAD.unpack_dual(v).tangent
    assert ts.shape == xs.shape and tv.shape == (3, 5)
    with pypaper.use_backend("reference"), fwAD.dual_level():
        s, v, _ = lif_multi_step(xs, tau=fwAD.make_dual(torch.tensor(2.0, dtype=torch.float64),
                                                        torch.tensor(1.0, dtype=torch.float64)),
                                 v_threshold=th)
        torch.testing.assert_close(ts, fwAD.unpack_dual(s).tangent, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(tv, fwAD.unpack_dual(v).tangent, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_per_sample_parameters_with_no_time_steps(backend):
    """T = 0 with a per-sample threshold returns the initial state, as without one (the
    flattening reshape(0, 1, -1) raised: -1 is undetermined with no elements)."""
    x = torch.randn(0, 2, 3)
    v0 = torch.rand(2, 3)
    with pypaper.use_backend(backend):
        s, v, vs = lif_multi_step(x, v0, v_threshold=torch.rand(2, 3) + 0.5, store_v_seq=True)
    assert s.shape == vs.shape == x.shape and torch.equal(v, v0)


def test_double_backward_with_no_time_steps():
    """T = 0, create_graph=True on the CPU backend (second_order.backward_with_graph): v_last
    is the constant resting state, which autograd.grad refused as an output ("element 1 of
    tensors does not require grad"); the reference's own double backward gives zeros."""
    got = []
    for backend in ("cpu", "reference"):
        x = torch.randn(0, 2, 1, dtype=torch.float64, requires_grad=True)
        tau = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
        with pypaper.use_backend(backend):
            s, v, _ = lif_multi_step(x, tau=tau, v_reset=-0.3)
        gx, gt = torch.autograd.grad(s.sum() + v.sum(), (x, tau), create_graph=True,
                                     allow_unused=True, materialize_grads=True)
        got.append((gx.detach(), gt.detach()))
    assert got[0][0].shape == (0, 2, 1)
    assert torch.equal(got[0][0], got[1][0]) and torch.equal(got[0][1], got[1][1])
