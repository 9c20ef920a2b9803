"""Review of pypaper.snn.functional as a drop-in for SpikingJelly 2.0's activation_based.functional
(2026-12-06): seq_to_ann_forward under torch.export with a dynamic batch."""
import pytest
import torch
from torch import nn
from torch.export import Dim, export

from pypaper.snn import functional, layer


class _SeqToANN(nn.Module):
    def __init__(self, mods):
        super().__init__()
        self.mods = mods

    def forward(self, x_seq):
        return functional.seq_to_ann_forward(x_seq, self.mods)


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("make", [lambda: _SeqToANN(nn.Flatten()),
                                  lambda: layer.SeqToANNContainer(nn.Flatten()),
                                  lambda: _SeqToANN([nn.Flatten(), nn.Unflatten(1, (3, 4))])],
                         ids=["function", "container", "view_chain"])
@pytest.mark.parametrize("dynamic", [(1,), (0, 1)], ids=["N", "T_N"])
def test_export_view_only_layers_with_dynamic_batch(make, strict, dynamic):
    # Before: the merged [T * N] dim got the symbolic stride Min(12, 12 * N), and the alias that
    # nn.Flatten hands back needed the guard N * Min(12, 12 * N) == 12 * N when unflattened:
    # export raised "Constraints violated (batch)".
    model = make()
    names = {0: "T", 1: "batch"}
    ep = export(model, (torch.randn(4, 3, 3, 4),),
                dynamic_shapes=({d: Dim(names[d]) for d in dynamic},), strict=strict)
    x = torch.randn(6 if 0 in dynamic else 4, 5, 3, 4)
    got, want = ep.module()(x), model(x)
    assert got.shape == want.shape
    assert torch.equal(got, want)
    assert got.stride() == want.stride()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed", "offset"])
def test_eager_matches_spikingjelly_values_strides_and_aliasing(layout):
    sj_functional = pytest.importorskip("spikingjelly.activation_based.functional")
    x = torch.randn(4, 3, 2, 5, 6)
    if layout == "channels_last":
        x = x.flatten(0, 1).contiguous(memory_format=torch.channels_last).unflatten(0, (4, 3))
    elif layout == "transposed":
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
    elif layout == "offset":
        x = torch.randn(5, 3, 2, 5, 6)[1:]
    for mods in (nn.Flatten(), nn.Conv2d(2, 3, 3)):
        got = functional.seq_to_ann_forward(x, mods)
        want = sj_functional.seq_to_ann_forward(x, mods)
        assert torch.equal(got, want)
        assert got.stride() == want.stride()
        assert (got.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()) == \
            (want.untyped_storage().data_ptr() == x.untyped_storage().data_ptr())


def test_export_keeps_gradients_of_a_trained_block():
    # the exported graph's flatten(0, 1) is an as_strided: values and the input gradient (through
    # a conv, then the view-only Flatten) equal eager's
    torch.manual_seed(0)
    block = layer.SeqToANNContainer(nn.Conv2d(2, 3, 3, padding=1), nn.Flatten())
    ep = export(block, (torch.randn(4, 3, 2, 5, 5),), dynamic_shapes=({1: Dim("batch")},))
    x = torch.randn(4, 6, 2, 5, 5, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    ep.module()(x).square().sum().backward()
    block(x2).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
