"""The op contract's "an op returns no views", checked by tests/conftest.py at every opcheck.

Found by that check on 2026-12-05: the quant and power fake-quantize backward ops (C++ and
Triton) returned views of their flat results, the LIF backward its parameter gradients reshaped,
packed quantize of a 0-dim x its codes viewed to 0-dim, and the delay op's gather path (shapes
where permute + contiguous hands back the permuted tensor itself) its output. Each now returns
tensors of its own (csrc/fresh_output.h, pypaper._autograd.fresh_output).
"""
import pytest
import torch

from pypaper._autograd import fresh_output
from tests.conftest import assert_no_view_outputs


@pytest.fixture(scope="module")
def view_returning_op():
    """An op whose CPU kernel returns a view of a result it computed flat: what the check is for."""
    lib = torch.library.Library("pypaper_view_probe", "FRAGMENT")
    lib.define("flat_double(Tensor x) -> Tensor")
    lib.impl("flat_double", lambda x: (x.reshape(-1) * 2).view(x.shape), "CPU")
    yield torch.ops.pypaper_view_probe.flat_double.default
    lib._destroy()


def test_the_check_refuses_a_view(view_returning_op):
    with pytest.raises(AssertionError, match="are views"):
        assert_no_view_outputs(view_returning_op, (torch.randn(2, 3),))


def test_the_check_runs_inside_opcheck(view_returning_op):
    """tests/conftest.py wraps torch.library.opcheck: a view output fails any opcheck test."""
    with pytest.raises(AssertionError, match="are views"):
        torch.library.opcheck(view_returning_op, (torch.randn(2, 3),),
                              test_utils=("test_schema",))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fresh_output_is_no_view(dtype):
    g = torch.arange(6, dtype=torch.float64)
    out = fresh_output(g, (2, 3), dtype)
    assert not out._is_view() and out.dtype == dtype and out.shape == (2, 3)
    assert torch.equal(out, g.reshape(2, 3).to(dtype))
    assert out.data_ptr() != g.data_ptr()


def test_quantize_packed_zero_dim_codes():
    """packed quantize of a 0-dim x: 0-dim uint8 codes (one byte, the code in its low nibble)
    of their own; they were a view of a [1] tensor before."""
    x, scale, zp = torch.tensor(-0.7), torch.tensor(0.1), torch.tensor(0)
    q = torch.ops.pypaper.quantize(x, scale, zp, -8, 7, None, None, True)
    assert q.shape == () and q.dtype == torch.uint8 and not q._is_view()
    assert int(q) & 0xF == (-7) & 0xF
