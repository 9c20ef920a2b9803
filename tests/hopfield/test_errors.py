"""Bad inputs of hopfield_retrieve raise exceptions that name the argument; hflayers' documented
behaviour where its code has bugs (pypaper.hopfield.reference.HFLAYERS_FIXES)."""
import pytest
import torch

from pypaper.hopfield import Hopfield, HopfieldPooling, hopfield_retrieve, reference


def qkv(B=2, H=2, L=3, S=4, d=5, dv=6, dtype=torch.float32):
    return (torch.randn(B, H, L, d, dtype=dtype), torch.randn(B, H, S, d, dtype=dtype),
            torch.randn(B, H, S, dv, dtype=dtype))


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(beta=0.0), ValueError, "beta"),
    (dict(beta=-1.0), ValueError, "beta"),
    (dict(beta=float("inf")), ValueError, "beta"),
    (dict(beta=[1.0, 2.0, 3.0]), ValueError, "beta"),
    (dict(beta="big"), TypeError, "beta"),
    (dict(steps=-2), ValueError, "steps"),
    (dict(steps=1.5), TypeError, "steps"),
    (dict(steps=[1, 2, 3]), ValueError, "steps"),
    (dict(eps=-1e-3), ValueError, "eps"),
    (dict(mask=torch.zeros(3, 5, dtype=torch.bool)), ValueError, "mask"),
    (dict(mask=torch.zeros(3, 4, dtype=torch.int32)), TypeError, "mask"),
    (dict(mask=torch.zeros(1, 1, 1, 1, 3, 4, dtype=torch.bool)), ValueError, "mask"),
    (dict(pad_mask=torch.zeros(2, 5, dtype=torch.bool)), ValueError, "pad_mask"),
    (dict(pad_mask=torch.zeros(2, 4, dtype=torch.int64)), TypeError, "pad_mask"),
])
def test_bad_arguments(kwargs, exc, match):
    q, k, v = qkv()
    args = dict(beta=0.5, steps=1, eps=1e-4)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        hopfield_retrieve(q, k, v, **args)


def test_bad_tensors():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="pattern size"):
        hopfield_retrieve(q, k[..., :4], v)
    with pytest.raises(ValueError, match="v has"):
        hopfield_retrieve(q, k, v[:, :, :3])
    with pytest.raises(TypeError, match="dtype"):
        hopfield_retrieve(q, k.double(), v)
    with pytest.raises(TypeError, match="q must be a floating"):
        hopfield_retrieve(q.int(), k, v)
    with pytest.raises(ValueError, match="q must have shape"):
        hopfield_retrieve(q[0], k, v)
    with pytest.raises(ValueError, match="share"):
        hopfield_retrieve(q, k[:1], v[:1])


def test_direct_op_call_checks_too():
    q, k, v = qkv()
    op = torch.ops.pypaper.hopfield_retrieve
    with pytest.raises(RuntimeError, match="beta"):
        op(q, k, v, [0.0], [1], [1e-4], None, None)
    with pytest.raises(RuntimeError, match="steps"):
        op(q, k, v, [1.0], [-3], [1e-4], None, None)
    with pytest.raises(RuntimeError, match="attn_mask"):
        op(q, k, v, [1.0], [1], [1e-4], torch.zeros(3, 4), None)
    with pytest.raises(RuntimeError, match="one value or one per head"):
        op(q, k, v, [1.0, 2.0, 3.0], [1], [1e-4], None, None)


def test_concat_bias_pattern_is_applied():
    """hflayers silently ignores concat_bias_pattern; here the bias patterns take part."""
    torch.manual_seed(0)
    a = Hopfield(input_size=8, num_heads=2, concat_bias_pattern=True)
    b = Hopfield(input_size=8, num_heads=2, concat_bias_pattern=False)
    b.load_state_dict({k: v for k, v in a.state_dict().items() if "bias_k" not in k and
                       "bias_v" not in k})
    with torch.no_grad():
        a.association_core.bias_k.normal_(0, 1.0)
        a.association_core.bias_v.normal_(0, 1.0)
    x = torch.randn(2, 5, 8)
    assert not torch.allclose(a(x), b(x))
    assert a.get_association_matrix(x).shape[-1] == 6  # one more stored pattern
    assert "concat_bias_pattern" in reference.HFLAYERS_FIXES


def test_uint8_masks_work_like_bool():
    m = Hopfield(input_size=8, num_heads=2)
    x = torch.randn(2, 5, 8)
    pad = torch.zeros(2, 5, dtype=torch.uint8)
    pad[0, 3:] = 1
    am = torch.zeros(5, 5, dtype=torch.uint8)
    am[:, 1] = 1
    torch.testing.assert_close(m(x, pad, am), m(x, pad.bool(), am.bool()), rtol=0, atol=0)


def test_per_head_scaling_scales_each_head():
    """Head h uses scaling[h] (hflayers interleaves the entries over the hidden vector)."""
    torch.manual_seed(0)
    m = Hopfield(input_size=8, num_heads=2, scaling=torch.tensor([0.01, 5.0]))
    with torch.no_grad():
        m.association_core.in_proj_weight.normal_(0, 1.0)
    x = torch.randn(1, 6, 8)
    a = m.get_association_matrix(x)[0]
    # head 0 is nearly uniform (1/6), head 1 is peaked
    assert (a[0].amax(-1) < 0.2).all() and (a[1].amax(-1) > 0.6).all()
    # the same, head by head, with a scalar scaling per model
    for h, s in enumerate((0.01, 5.0)):
        m1 = Hopfield(input_size=8, num_heads=2, scaling=s)
        m1.load_state_dict(m.state_dict())
        torch.testing.assert_close(m1.get_association_matrix(x)[0, h], a[h])


def test_pooling_bad_quantity():
    with pytest.raises(ValueError, match="quantity"):
        HopfieldPooling(input_size=8, quantity=0)
