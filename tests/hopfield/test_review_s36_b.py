"""Review s36 (b) of pypaper.hopfield: energy() under torch.compile(dynamic=True); size
mismatches of static patterns named at construction (hflayers asserts the static pattern
projection's size at its forward; pypaper failed later with a bare matmul / layer_norm shape
error); HopfieldPooling / HopfieldLayer against hflayers' documented semantics (shapes for
batch_first True / False, parameter names and shapes of an hflayers state_dict, seeded
initialisation, gradients against the plain-PyTorch replica). Tolerances: float64 1e-10."""
import math

import pytest
import torch

from pypaper.hopfield import Hopfield, HopfieldLayer, HopfieldPooling
from pypaper.hopfield.energy import energy

from .test_layers import NO_NORM, _randomize, reference_forward


# ---- 1. energy under torch.compile(dynamic=True) ---------------------------------------------
def _energy_f64(state, stored, beta):
    """E(xi) = -lse(beta, X xi) + xi.xi / 2 + log(N) / beta + M^2 / 2, in float64."""
    s, x = state.double(), stored.double()
    lse = torch.logsumexp(beta * s @ x.T, dim=-1) / beta
    m = x.norm(dim=-1).max()
    return -lse + 0.5 * (s * s).sum(-1) + math.log(x.shape[0]) / beta + 0.5 * m * m


def test_energy_under_compile_dynamic_true():
    """With dynamic=True beta arrives as a symbolic float: math.isfinite(beta) could not be
    traced (fullgraph: 'torch.* op returned non-Tensor'). Two betas and two stored-pattern
    counts run through the one compiled function."""
    torch._dynamo.reset()
    f = torch.compile(energy, fullgraph=True, dynamic=True)
    g = torch.Generator().manual_seed(0)
    for beta, n in [(0.5, 5), (0.7, 5), (1.3, 9)]:
        state = torch.randn(3, 4, dtype=torch.float64, generator=g)
        stored = torch.randn(n, 4, dtype=torch.float64, generator=g)
        torch.testing.assert_close(f(state, stored, beta), _energy_f64(state, stored, beta),
                                   rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("beta", [0.0, -1.0, math.inf, math.nan])
def test_energy_still_refuses_a_bad_beta(beta):
    with pytest.raises(ValueError, match="beta must be positive and finite"):
        energy(torch.randn(2, 3), torch.randn(4, 3), beta)


# ---- 2. static pattern projection of the wrong size ------------------------------------------
@pytest.mark.parametrize("kw, names", [
    # per-head size input_size = 8, pattern_size = 8 / 2 heads = 4
    (dict(input_size=8, num_heads=2, pattern_projection_as_static=True), r"pattern_size \(4\)"),
    (dict(input_size=8, pattern_size=4, pattern_projection_as_static=True), r"pattern_size \(4\)"),
    (dict(input_size=8, pattern_size=6, pattern_projection_size=5,
          pattern_projection_as_static=True), "pattern_projection_size"),
    # connected: the static projection is the stored-pattern projection (hidden_size features)
    (dict(input_size=8, hidden_size=4, pattern_size=8, pattern_projection_as_static=True,
          pattern_projection_as_connected=True), "hidden_size"),
], ids=["heads", "pattern_size", "projection_size", "connected"])
@pytest.mark.parametrize("cls", [Hopfield, HopfieldPooling, HopfieldLayer])
def test_static_pattern_projection_size_mismatch_named_at_construction(cls, kw, names):
    """Each used to build and then fail at forward inside out_proj with 'mat1 and mat2 shapes
    cannot be multiplied'."""
    with pytest.raises(ValueError, match=names) as e:
        cls(**kw)
    assert "pattern_projection_as_static" in str(e.value)


def test_static_unnormalised_pattern_projection_size_checked_at_forward():
    """Without a LayerNorm on it the size comes from the input: checked (naming pattern_size)
    before the retrieval, not left to a matmul error in the output projection."""
    m = Hopfield(input_size=8, pattern_size=4, pattern_projection_as_static=True,
                 **NO_NORM).double()
    _randomize(m)
    stored, state = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(2, 3, 8,
                                                                         dtype=torch.float64)
    with pytest.raises(ValueError, match="pattern_size"):
        m((stored, state, torch.randn(2, 5, 8, dtype=torch.float64)))
    proj = torch.randn(2, 5, 4, dtype=torch.float64)
    got = m((stored, state, proj))
    assert got.shape == (2, 3, 8)
    torch.testing.assert_close(got, reference_forward(m, (stored, state, proj))[0],
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kw", [
    dict(input_size=8, pattern_size=8, pattern_projection_as_static=True),
    dict(input_size=8, hidden_size=4, pattern_projection_as_static=True,
         pattern_projection_as_connected=True),
    dict(input_size=8, num_heads=2, pattern_projection_as_static=True,
         disable_out_projection=True),
])
def test_consistent_static_pattern_projections_still_build_and_match(kw):
    m = Hopfield(**kw, update_steps_max=1).double()
    _randomize(m)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    torch.testing.assert_close(m(x), reference_forward(m, x)[0], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cls, kw, flag", [
    (HopfieldPooling, dict(state_pattern_as_static=True, hidden_size=6), "normalize_state_pattern"),
    (HopfieldPooling, dict(state_pattern_as_static=True, num_heads=2), "normalize_state_pattern"),
    (HopfieldLayer, dict(stored_pattern_as_static=True, hidden_size=6, num_heads=2),
     "normalize_stored_pattern"),
])
def test_static_pattern_of_hidden_size_vs_its_layernorm_named_at_construction(cls, kw, flag):
    """A static state (stored) pattern has hidden_size features but its LayerNorm is sized
    input_size (stored_pattern_size): every forward failed inside layer_norm
    ('Given normalized_shape=[12] ...'). Without the normalisation the layer works."""
    with pytest.raises(ValueError, match=f"hidden_size.*{flag}"):
        cls(input_size=12, quantity=2, **kw)
    m = cls(input_size=12, quantity=2, **kw, **{flag: False, flag + "_affine": False},
            **({"pattern_projection_size": 6} if cls is HopfieldLayer else {}))
    x = torch.randn(3, 5, 12)
    assert m(x).shape == ((3, 24) if cls is HopfieldPooling else (3, 5, 12))


# ---- 3. HopfieldPooling / HopfieldLayer against hflayers' semantics --------------------------
def _hflayers_names(cls, E, H, hd, pd, out, quantity, bf, separated=False, trainable=True,
                    static_state=False, static_stored=False):
    """The parameters an hflayers checkpoint holds (its documented layout: one packed
    in_proj_weight when every input has input_size features, norms sized by their inputs,
    [1, quantity, size] lookup / pooling weights batch-first, else [quantity, 1, size])."""
    lead = (1, quantity) if bf else (quantity, 1)
    rows = (not static_state) * H * hd + (not static_stored) * H * hd + H * pd
    names = {
        "hopfield.association_core.in_proj_weight": (rows, E),
        "hopfield.association_core.in_proj_bias": ((not static_state) * H * hd +
                                                   (not static_stored) * H * hd + H * pd,),
        "hopfield.association_core.out_proj.weight": (out, H * pd),
        "hopfield.association_core.out_proj.bias": (out,),
    }
    for n in ("stored_pattern", "state_pattern", "pattern_projection"):
        names[f"hopfield.norm_{n}.weight"] = (E,)
        names[f"hopfield.norm_{n}.bias"] = (E,)
    if cls is HopfieldPooling:
        names["pooling_weights"] = lead + (hd if static_state else E,)
    else:
        names["lookup_weights"] = lead + (hd if static_stored else E,)
        if separated:
            names["target_weights"] = lead + (hd if static_stored else E,)
    return names


@pytest.mark.parametrize("bf", [True, False])
@pytest.mark.parametrize("cls, kw, shape_kw", [
    (HopfieldPooling, dict(num_heads=2, quantity=3), dict(H=2, hd=6, pd=6, quantity=3)),
    (HopfieldPooling, dict(num_heads=1, quantity=2, trainable=False, state_pattern_as_static=True,
                           hidden_size=12), dict(H=1, hd=12, pd=12, quantity=2,
                                                 static_state=True)),
    (HopfieldLayer, dict(num_heads=3, quantity=5, lookup_weights_as_separated=True),
     dict(H=3, hd=4, pd=4, quantity=5, separated=True)),
    (HopfieldLayer, dict(quantity=4, stored_pattern_as_static=True, hidden_size=12),
     dict(H=1, hd=12, pd=12, quantity=4, static_stored=True)),
])
def test_wrappers_shapes_state_dict_seed_and_gradients(cls, kw, shape_kw, bf):
    E, N, S = 12, 3, 7
    torch.manual_seed(11)
    m = cls(input_size=E, batch_first=bf, update_steps_max=2, **kw)
    torch.manual_seed(11)
    m2 = cls(input_size=E, batch_first=bf, update_steps_max=2, **kw)
    # seeded construction is reproducible, and so is reset_parameters
    sd = m.state_dict()
    assert sd.keys() == m2.state_dict().keys()
    assert all(torch.equal(v, m2.state_dict()[k]) for k, v in sd.items())
    torch.manual_seed(5)
    m.reset_parameters()
    torch.manual_seed(5)
    m2.reset_parameters()
    assert all(torch.equal(v, m2.state_dict()[k]) for k, v in m.state_dict().items())
    # an hflayers checkpoint (its names and shapes) loads strictly
    want = _hflayers_names(cls, E, out=E, bf=bf, **shape_kw)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == want
    ckpt = {k: torch.randn(s) for k, s in want.items()}
    m.load_state_dict(ckpt, strict=True)
    assert all(torch.equal(v, ckpt[k]) for k, v in m.state_dict().items())
    frozen = {"pooling_weights"} if kw.get("trainable") is False else set()
    assert {n for n, p in m.named_parameters() if not p.requires_grad} == frozen
    # shapes: pooling [N, quantity * out] batch-first (hflayers flattens dim 1 of its
    # sequence-first output otherwise: [quantity, N * out]); lookup keeps the input's layout
    m = m.double()
    x = torch.randn(N, S, E, dtype=torch.float64)
    if not bf:
        x = x.transpose(0, 1)
    x.requires_grad_(True)
    out = m(x)
    q = shape_kw["quantity"]
    if cls is HopfieldPooling:
        assert out.shape == ((N, q * E) if bf else (q, N * E))
        ref = reference_forward(m.hopfield, m._prepare_input(x))[0].flatten(1)
    else:
        assert out.shape == ((N, S, E) if bf else (S, N, E))
        ref = reference_forward(m.hopfield, m._prepare_input(x))[0]
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    params = [p for p in m.parameters() if p.requires_grad] + [x]
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, params, g, allow_unused=True)
    exp = torch.autograd.grad(ref, params, g, allow_unused=True)
    for a, b in zip(got, exp):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
