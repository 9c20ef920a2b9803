"""convert / revert on a small model: pickling and copies, the global RNG stream, hooks, weights
loaded into the converted model, one module under two names, converting again, pruned layers."""
import pytest
import torch
from torch import nn

from pypaper.wtacrs import WTACRSLinear, convert, revert


class Block(nn.Module):
    """Three siblings reading one input (one SampleGroup), dropout, an output layer."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.drop = nn.Dropout(0.3)
        self.out = nn.Linear(8, 4)

    def forward(self, x):
        return self.out(self.drop(self.q(x) * self.k(x) + self.v(x)))


def _mlp_with_attention_siblings():
    torch.manual_seed(0)
    return Block()


def test_converted_model_pickles_and_deepcopies_after_a_training_step():
    """A SampleGroup's last sample is held by weak references: a copy starts without it."""
    import copy
    import io

    m = convert(_mlp_with_attention_siblings(), keep_ratio=0.25, min_k=1)
    m(torch.randn(64, 8)).sum().backward()
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    twin = copy.deepcopy(m)
    x = torch.randn(5, 8)
    m.eval(), loaded.eval(), twin.eval()
    assert torch.equal(loaded(x), m(x)) and torch.equal(twin(x), m(x))


def test_without_a_generator_the_global_rng_stream_is_untouched():
    """Dropout after a converted layer draws what it draws in the unconverted model: the
    layer's seed is read from the global generator without advancing it, so the training
    forward equals the unconverted model's, and successive steps still sample afresh."""
    x = torch.randn(64, 8)
    plain = _mlp_with_attention_siblings()
    conv = convert(_mlp_with_attention_siblings(), keep_ratio=0.25, min_k=1)
    torch.manual_seed(5)
    want = plain(x)
    torch.manual_seed(5)
    got = conv(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    layer = conv.out
    torch.manual_seed(6)
    seeds = {int(layer._seed("cpu")) for _ in range(4)}
    assert len(seeds) == 4  # fresh per call although the global state did not move


def test_hooks_follow_the_swap_both_ways():
    m = _mlp_with_attention_siblings()
    seen = []
    m.out.register_forward_hook(lambda mod, i, o: seen.append("before"))
    convert(m, keep_ratio=0.5, min_k=1)
    m(torch.randn(3, 8))
    assert seen == ["before"]
    m.out.register_forward_hook(lambda mod, i, o: seen.append("after"))
    revert(m)
    assert type(m.out) is nn.Linear
    m(torch.randn(3, 8))
    assert seen == ["before", "before", "after"]


def test_a_hook_handle_given_out_before_the_swap_keeps_removing():
    m = _mlp_with_attention_siblings()
    seen = []
    handle = m.out.register_forward_hook(lambda mod, i, o: seen.append(1))
    convert(m, keep_ratio=0.5, min_k=1)
    handle.remove()
    m(torch.randn(3, 8))
    revert(m)
    m(torch.randn(3, 8))
    assert seen == []


def test_revert_keeps_weights_loaded_into_the_converted_model():
    m = convert(_mlp_with_attention_siblings(), keep_ratio=0.5, min_k=1)
    sd = {k: torch.full_like(v, 0.25) for k, v in m.state_dict().items()}
    m.load_state_dict(sd, assign=True)
    revert(m)
    assert all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())


def test_one_linear_under_two_names_stays_one_module():
    lin = nn.Linear(8, 8)
    m = nn.Sequential(lin, nn.ReLU(), lin)
    convert(m, keep_ratio=0.5, min_k=1)
    assert isinstance(m[0], WTACRSLinear) and m[0] is m[2]
    revert(m)
    assert m[0] is lin and m[2] is lin


def test_convert_again_sets_the_new_options():
    m = convert(_mlp_with_attention_siblings(), keep_ratio=0.3)
    convert(m, keep_ratio=0.1, min_k=4)
    assert (m.q.keep_ratio, m.q.min_k) == (0.1, 4) and (m.out.keep_ratio, m.out.min_k) == (0.1, 4)


def test_pruned_linear_is_left_alone_with_a_warning():
    m = _mlp_with_attention_siblings()
    from torch.nn.utils import prune

    prune.l1_unstructured(m.out, "weight", amount=0.5)
    with pytest.warns(UserWarning, match="out is left as nn.Linear"):
        convert(m, keep_ratio=0.5, min_k=1)
    assert type(m.out) is nn.Linear and isinstance(m.q, WTACRSLinear)
    m(torch.randn(4, 8)).sum().backward()
