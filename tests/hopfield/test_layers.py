"""Hopfield / HopfieldPooling / HopfieldLayer against the independent plain-PyTorch replica of
hflayers' functional (pypaper/hopfield/reference.py: sequence-first layout, materialising loop)
for each option, equality with torch.nn.MultiheadAttention, masks, accessors, state_dict names,
bad constructor arguments. Tolerance: float64 1e-10."""
import itertools

import pytest
import torch

from pypaper.hopfield import Hopfield, HopfieldLayer, HopfieldPooling, reference as R

NO_NORM = dict(normalize_stored_pattern=False, normalize_stored_pattern_affine=False,
               normalize_state_pattern=False, normalize_state_pattern_affine=False,
               normalize_pattern_projection=False, normalize_pattern_projection_affine=False)


def _randomize(m):
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.5)


def reference_forward(m: Hopfield, data, pad=None, am=None):
    """hflayers' computation for module m's parameters, via reference.hopfield_core_forward."""
    c = m.association_core
    if isinstance(data, torch.Tensor):
        sp = st = pp = data
    else:
        sp, st, pp = data
    if m.batch_first:
        sp, st, pp = sp.transpose(0, 1), st.transpose(0, 1), pp.transpose(0, 1)
    if m.norm_stored_pattern is not None:
        sp = m.norm_stored_pattern(sp)
    if m.norm_state_pattern is not None:
        st = m.norm_state_pattern(st)
    if m.norm_pattern_projection is not None:
        pp = m.norm_pattern_projection(pp)
    wq, wk, wv = c.split_weights()
    out, assoc, proj = R.hopfield_core_forward(
        st, sp, pp, num_heads=c.num_heads, head_dim=c.head_dim, pattern_dim=c.pattern_dim,
        q_proj_weight=wq, k_proj_weight=wk, v_proj_weight=wv, in_proj_bias=c.in_proj_bias,
        bias_k=c.bias_k, bias_v=c.bias_v, add_zero_attn=c.add_zero_attn,
        out_proj_weight=None if c.out_proj is None else c.out_proj.weight,
        out_proj_bias=None if c.out_proj is None else c.out_proj.bias,
        key_as_static=c.key_as_static, query_as_static=c.query_as_static,
        value_as_static=c.value_as_static, value_as_connected=c.value_as_connected,
        normalize_pattern=c.normalize_pattern, p_norm_weight=c.p_norm_weight,
        p_norm_bias=c.p_norm_bias, scaling=m.scaling, update_steps_max=m.update_steps_max,
        update_steps_eps=m.update_steps_eps, key_padding_mask=pad, attn_mask=am)
    if m.batch_first:
        out = out.transpose(0, 1)
    if m.association_activation is not None:
        out = m.association_activation(out)
    return out, assoc, proj


OPTIONS = [
    dict(),
    dict(update_steps_max=3),
    dict(update_steps_max=None, update_steps_eps=1e-6),
    dict(update_steps_max=torch.tensor([0, 2, 5, 1]), scaling=torch.tensor([0.2, 0.5, 1.0, 2.0])),
    dict(hidden_size=6, pattern_size=5, output_size=7, update_steps_max=2),
    dict(stored_pattern_size=9, pattern_projection_size=11, update_steps_max=1),
    dict(normalize_hopfield_space=True, normalize_hopfield_space_affine=True, update_steps_max=2),
    dict(concat_bias_pattern=True, add_zero_association=True, update_steps_max=2),
    dict(pattern_projection_as_connected=True, stored_pattern_size=9,
         pattern_projection_size=9, update_steps_max=1),
    dict(disable_out_projection=True, input_bias=False),
    dict(batch_first=False, association_activation="tanh", update_steps_max=2),
    dict(**NO_NORM, update_steps_max=2),
    dict(state_pattern_as_static=True, hidden_size=16, update_steps_max=1),
    dict(stored_pattern_as_static=True, pattern_projection_as_static=True, hidden_size=16,
         disable_out_projection=True),
]


@pytest.mark.parametrize("opts", OPTIONS, ids=[str(i) for i in range(len(OPTIONS))])
def test_hopfield_matches_hflayers_reference(opts):
    m = Hopfield(input_size=16, num_heads=4, **opts).double()
    _randomize(m)
    N, L, S = 3, 5, 8
    ks = opts.get("stored_pattern_size", 16)
    vs = opts.get("pattern_projection_size", 16)
    bf = opts.get("batch_first", True)
    shape = (lambda n, l, e: (n, l, e)) if bf else (lambda n, l, e: (l, n, e))
    st = torch.randn(*shape(N, L, 16), dtype=torch.float64)
    sp = torch.randn(*shape(N, S, ks), dtype=torch.float64)
    pp = torch.randn(*shape(N, S, vs), dtype=torch.float64)
    pad = torch.zeros(N, S, dtype=torch.bool)
    pad[1, -3:] = True
    extra = int(bool(opts.get("concat_bias_pattern"))) + int(bool(opts.get("add_zero_association")))
    am = torch.rand(L, S) < 0.2
    am[:, 0] = False
    data = (sp, st, pp)
    out = m(data, stored_pattern_padding_mask=pad, association_mask=am)
    want, assoc, proj = reference_forward(m, data, pad, am)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    a = m.get_association_matrix(data, stored_pattern_padding_mask=pad, association_mask=am)
    assert a.shape == (N, 4, L, S + extra)
    torch.testing.assert_close(a, assoc, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(m.get_projected_pattern_matrix(data), proj, rtol=1e-10, atol=1e-10)
    # gradients through the fused op equal those through the materialising loop
    g = torch.randn_like(out)
    params = [p for p in m.parameters() if p.requires_grad]
    ga = torch.autograd.grad(out, params, g, allow_unused=True)
    gb = torch.autograd.grad(want, params, g, allow_unused=True)
    for x, y in zip(ga, gb):
        if x is None or y is None:
            assert x is None and y is None
        else:
            torch.testing.assert_close(x, y, rtol=1e-8, atol=1e-9)


def test_steps_zero_without_normalisation_is_multihead_attention():
    E, H = 16, 4
    m = Hopfield(input_size=E, num_heads=H, update_steps_max=0, **NO_NORM)
    mha = torch.nn.MultiheadAttention(E, H, batch_first=True)
    with torch.no_grad():
        c = m.association_core
        c.in_proj_weight.copy_(mha.in_proj_weight)
        c.in_proj_bias.copy_(mha.in_proj_bias)
        c.out_proj.weight.copy_(mha.out_proj.weight)
        c.out_proj.bias.copy_(mha.out_proj.bias)
    x = torch.randn(3, 7, E)
    kpm = torch.zeros(3, 7, dtype=torch.bool)
    kpm[0, -2:] = True
    am = torch.triu(torch.ones(7, 7, dtype=torch.bool), 1)
    torch.testing.assert_close(m(x), mha(x, x, x, need_weights=False)[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m(x, stored_pattern_padding_mask=kpm, association_mask=am),
                               mha(x, x, x, key_padding_mask=kpm, attn_mask=am,
                                   need_weights=False)[0], rtol=1e-5, atol=1e-6)
    # state_dict keys are hflayers' (association_core.in_proj_weight, ...)
    keys = set(m.state_dict())
    assert {"association_core.in_proj_weight", "association_core.in_proj_bias",
            "association_core.out_proj.weight", "association_core.out_proj.bias"} <= keys


def test_pooling_and_layer_match_reference_and_shapes():
    torch.manual_seed(1)
    pool = HopfieldPooling(input_size=12, hidden_size=8, num_heads=2, quantity=3,
                           update_steps_max=2).double()
    _randomize(pool)
    x = torch.randn(4, 9, 12, dtype=torch.float64)
    out = pool(x)
    assert out.shape == (4, 3 * 12)
    stored, state, proj = pool._prepare_input(x)
    want = reference_forward(pool.hopfield, (stored, state, proj))[0].flatten(1)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    assert pool.get_association_matrix(x).shape == (4, 2, 3, 9)
    assert pool.quantity == 3 and pool.batch_first and pool.hidden_size == 8

    layer = HopfieldLayer(input_size=12, num_heads=3, quantity=10, update_steps_max=1,
                          lookup_weights_as_separated=True, output_size=5).double()
    _randomize(layer)
    y = layer(x)
    assert y.shape == (4, 9, 5)
    want = reference_forward(layer.hopfield, layer._prepare_input(x))[0]
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-10)
    assert layer.get_association_matrix(x).shape == (4, 3, 9, 10)
    assert layer.target_weights is not None and layer.quantity == 10


def test_pooling_seq_first_and_padding():
    pool = HopfieldPooling(input_size=8, num_heads=2, quantity=2, batch_first=False).double()
    x = torch.randn(6, 3, 8, dtype=torch.float64)  # [S, N, E]
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[0, 4:] = True
    out = pool(x, stored_pattern_padding_mask=pad)
    # padded patterns do not matter: removing them gives the same pooled vector for item 0
    out0 = pool(x[:4, :1], stored_pattern_padding_mask=pad[:1, :4])
    torch.testing.assert_close(out.view(2, 3, 8)[:, 0], out0.view(2, 1, 8)[:, 0],
                               rtol=1e-10, atol=1e-10)


def test_dropout_training_uses_materialising_path_and_eval_is_deterministic():
    m = Hopfield(input_size=8, num_heads=2, dropout=0.5)
    x = torch.randn(2, 5, 8)
    m.train()
    a, b = m(x), m(x)
    assert not torch.equal(a, b)
    m.eval()
    assert torch.equal(m(x), m(x))


BAD = [
    (dict(input_size=10, num_heads=3), ValueError, "num_heads"),
    (dict(input_size=8, num_heads=0), ValueError, "num_heads"),
    (dict(input_size=8, scaling=-1.0), ValueError, "scaling"),
    (dict(input_size=8, scaling=0.0), ValueError, "scaling"),
    (dict(input_size=8, update_steps_max=-2), ValueError, "update_steps_max"),
    (dict(input_size=8, update_steps_eps=0.0), ValueError, "update_steps_eps"),
    (dict(input_size=8, num_heads=2, scaling=[1.0, 2.0, 3.0]), ValueError, "scaling"),
    (dict(input_size=8, normalize_hopfield_space_affine=True), ValueError, "normalize_hopfield"),
    (dict(input_size=8, dropout=1.5), ValueError, "dropout"),
    (dict(input_size=8, hidden_size=-1), ValueError, "hidden_size"),
    (dict(input_size=8, association_activation="nope"), ValueError, "association_activation"),
    (dict(input_size=8, scaling=torch.tensor(0.5, requires_grad=True)), ValueError, "scaling"),
    (dict(input_size=8.0), ValueError, "input_size"),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD)
def test_bad_constructor_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        Hopfield(**kwargs)


def test_bad_forward_inputs():
    m = Hopfield(input_size=8, num_heads=2)
    x = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match="input_size"):
        m(torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match="stored_pattern_size"):
        m((torch.randn(2, 5, 6), x, x))
    with pytest.raises(ValueError, match="stored_pattern_padding_mask"):
        m(x, stored_pattern_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="association_mask"):
        m(x, association_mask=torch.zeros(5, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="association_mask"):
        m(x, association_mask=torch.zeros(5, 5, dtype=torch.int32))
    with pytest.raises(TypeError, match="tuple of three"):
        m((x, x))


def test_layer_under_torch_compile_fullgraph():
    torch._dynamo.reset()
    m = Hopfield(input_size=16, num_heads=4, update_steps_max=2)
    x = torch.randn(2, 6, 16)
    want = m(x)
    compiled = torch.compile(m, fullgraph=True)
    with torch._inductor.config.patch(fx_graph_cache=False):
        got = compiled(x)
        got.sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert m.association_core.in_proj_weight.grad is not None


def test_all_static_is_the_parameter_free_retrieval():
    """Every pattern static, no output projection (hflayers' static execution): no parameters,
    beta = 1, and the output is softmax(X X^T) X."""
    m = Hopfield(stored_pattern_as_static=True, state_pattern_as_static=True,
                 pattern_projection_as_static=True, disable_out_projection=True, **NO_NORM)
    assert list(m.parameters()) == []
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    want = torch.softmax(x @ x.transpose(1, 2), dim=-1) @ x
    torch.testing.assert_close(m(x), want, rtol=1e-10, atol=1e-10)


def test_seeded_init_draws_like_hflayers():
    """hflayers' Hopfield.__init__ ends with reset_parameters() after HopfieldCore's own: two
    rounds of draws, so the same seed gives hflayers' weights only with both."""
    torch.manual_seed(3)
    m = Hopfield(input_size=8, num_heads=2, concat_bias_pattern=True)
    torch.manual_seed(3)
    core = type(m.association_core)(embed_dim=8, num_heads=2, add_bias_kv=True)
    core.reset_parameters()
    for name, p in core.state_dict().items():
        assert torch.equal(p, m.association_core.state_dict()[name]), name


def test_numpy_integer_sizes_are_accepted():
    np = pytest.importorskip("numpy")
    m = Hopfield(input_size=np.int64(8), num_heads=np.int32(2))
    assert m(torch.randn(2, 3, 8)).shape == (2, 3, 8)
    p = HopfieldPooling(input_size=np.int64(8), quantity=np.int64(3))
    assert p(torch.randn(2, 5, 8)).shape == (2, 3 * 8)


def test_hopfield_space_normalisation_in_fp32_with_a_bf16_projection(monkeypatch):
    """CUDA autocast runs layer_norm in fp32 while the projected v stays bf16 (CPU autocast does
    not, so the fp32 layer_norm is imposed here): the layer casts q, k back to v's dtype, as
    hflayers' bmm would have autocast them together."""
    from pypaper.hopfield import layers

    m = Hopfield(input_size=8, num_heads=2, normalize_hopfield_space=True,
                 **NO_NORM).to(torch.bfloat16)
    x = torch.randn(2, 5, 8, dtype=torch.bfloat16)
    want = m(x)
    plain = layers.F.layer_norm
    def fp32_layer_norm(t, shape, w=None, b=None, eps=1e-5):
        return plain(t.float(), shape, None if w is None else w.float(),
                     None if b is None else b.float(), eps)

    monkeypatch.setattr(layers.F, "layer_norm", fp32_layer_norm)
    y = m(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), want.float(), rtol=0.05, atol=0.05)


def test_per_head_unbounded_steps_with_minus_one():
    """hflayers: a head updates while step < update_steps_max or update_steps_max < 0, so -1 in a
    per-head tensor leaves that head unbounded; it equals passing None for every head."""
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    torch.manual_seed(0)
    a = Hopfield(input_size=8, num_heads=2, update_steps_max=torch.tensor([-1, -1])).double()
    torch.manual_seed(0)
    b = Hopfield(input_size=8, num_heads=2, update_steps_max=None).double()
    torch.testing.assert_close(a(x), b(x), rtol=1e-10, atol=1e-10)
    torch.manual_seed(0)
    c = Hopfield(input_size=8, num_heads=2, update_steps_max=torch.tensor([0, -1])).double()
    assert c(x).shape == (2, 6, 8)
