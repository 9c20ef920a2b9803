"""Bad inputs raise exceptions whose messages name the argument (never a crash or wrong answer)."""
import pytest
import torch

from pypaper.quant import dequantize, fake_quantize, quantize


def test_integer_x():
    with pytest.raises(TypeError, match="x must be a floating tensor"):
        fake_quantize(torch.arange(10), 0.1, 0)
    with pytest.raises(TypeError, match="x must be a floating tensor"):
        quantize(torch.arange(10))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        quantize([1.0, 2.0])


@pytest.mark.parametrize("bits", [0, 1, 9, 16, 4.0, True])
def test_bits_out_of_range(bits):
    with pytest.raises(ValueError, match="bits must be an integer in 2..8"):
        fake_quantize(torch.randn(4), 0.1, 0, bits)
    with pytest.raises(ValueError, match="bits must be an integer in 2..8"):
        quantize(torch.randn(4), bits)


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_scale_values(scale):
    with pytest.raises(ValueError, match="scale must be positive, finite and at least"):
        fake_quantize(torch.randn(4), torch.tensor(scale), 0)


def test_bad_scale_dtype_and_shape():
    with pytest.raises(TypeError, match="scale must be a floating tensor"):
        fake_quantize(torch.randn(4), torch.tensor(1), 0)
    with pytest.raises(ValueError, match=r"scale has shape \(3,\), expected \(4,\)"):
        fake_quantize(torch.randn(4, 5), torch.ones(3), torch.zeros(4), axis=0)
    with pytest.raises(ValueError, match=r"scale has shape \(4,\), expected \(\)"):
        fake_quantize(torch.randn(4, 5), torch.ones(4), 0)
    with pytest.raises(ValueError, match="zero_point has shape"):
        fake_quantize(torch.randn(4, 5), torch.ones(4), torch.zeros(5), axis=0)
    with pytest.raises(ValueError, match=r"expected \(4, 2\) for group-wise"):
        fake_quantize(torch.randn(4, 8), torch.ones(8), torch.zeros(8), group_size=4)


@pytest.mark.parametrize("axis", [2, -3, 5])
def test_axis_out_of_range(axis):
    with pytest.raises(ValueError, match=f"axis {axis} is out of range"):
        fake_quantize(torch.randn(4, 5), torch.ones(5), torch.zeros(5), axis=axis)
    with pytest.raises(ValueError, match=f"axis {axis} is out of range"):
        quantize(torch.randn(4, 5), axis=axis)


def test_group_size_must_divide_the_last_dim():
    with pytest.raises(ValueError, match="group_size 3 does not divide the last dimension"):
        quantize(torch.randn(4, 8), 4, group_size=3)
    with pytest.raises(ValueError, match="group_size must be a positive integer"):
        quantize(torch.randn(4, 8), 4, group_size=0)
    with pytest.raises(ValueError, match="axis and group_size are exclusive"):
        quantize(torch.randn(4, 8), 4, axis=0, group_size=4)


def test_tensors_on_different_devices():
    meta_scale = torch.ones((), device="meta")
    with pytest.raises(ValueError, match="scale is on meta but x is on cpu"):
        fake_quantize(torch.randn(4), meta_scale, 0)
    with pytest.raises(ValueError, match="zero_point is on meta but x is on cpu"):
        fake_quantize(torch.randn(4), torch.tensor(0.1), torch.zeros((), device="meta"))


def test_non_finite_input_to_quantize():
    with pytest.raises(ValueError, match="x contains inf or NaN"):
        quantize(torch.tensor([1.0, float("inf")]))


def test_dequantize_needs_a_quantized_tensor():
    with pytest.raises(TypeError, match="q must be a QuantizedTensor"):
        dequantize(torch.zeros(3, dtype=torch.int8))


def test_direct_op_calls_are_checked_too():
    """torch.ops.pypaper.* called directly still raise, naming the argument."""
    ops = torch.ops.pypaper
    with pytest.raises(RuntimeError, match="x must be float32"):
        ops.fake_quantize(torch.arange(4), torch.tensor(1.0), torch.tensor(0), -128, 127)
    with pytest.raises(RuntimeError, match="quant_min .* must be below quant_max"):
        ops.fake_quantize(torch.randn(4), torch.tensor(1.0), torch.tensor(0), 5, 5)
    with pytest.raises(RuntimeError, match="scale has 3 elements, expected 4"):
        ops.fake_quantize(torch.randn(4, 2), torch.ones(3), torch.zeros(3), -8, 7, 0)
    with pytest.raises(RuntimeError, match="axis 3 is out of range"):
        ops.quantize(torch.randn(4, 2), torch.ones(3), torch.zeros(3), -8, 7, 3)
    with pytest.raises(RuntimeError, match="group_size 3 does not divide"):
        ops.quantize(torch.randn(4, 2), torch.ones(3), torch.zeros(3), -8, 7, None, 3)
    with pytest.raises(RuntimeError, match="pack=True needs a 4-bit code range"):
        ops.quantize(torch.randn(4, 2), torch.ones(()), torch.zeros(()), -128, 127, None, None, True)
    with pytest.raises(RuntimeError, match="seed must be an int64 tensor"):
        ops.fake_quantize(torch.randn(4), torch.tensor(1.0), torch.tensor(0), -8, 7, None, None,
                          torch.tensor([1.0]))
    with pytest.raises(RuntimeError, match="data must be"):
        ops.dequantize(torch.zeros(4, dtype=torch.uint8), torch.ones(()), torch.zeros(()), -128,
                       127, None, None, False, 4, torch.float32)


@pytest.mark.parametrize("scale", [1e-40, torch.tensor(1e-50, dtype=torch.float64),
                                   torch.tensor(1e300, dtype=torch.float64)])
def test_scales_that_break_in_the_math_dtype(scale):
    """A subnormal fp32 scale, or an fp64 scale that under/overflows in fp32, would make 1/s
    infinite in the kernels: rejected up front instead of answering NaN."""
    s = scale if isinstance(scale, torch.Tensor) else torch.tensor(scale)
    with pytest.raises(ValueError, match="scale must be positive, finite and at least"):
        fake_quantize(torch.tensor([0.0, 1.0]), s, 0)


def test_axis_and_group_size_types():
    with pytest.raises(ValueError, match="axis must be an integer"):
        quantize(torch.randn(4, 8), axis=1.0)
    with pytest.raises(ValueError, match="group_size must be a positive integer"):
        quantize(torch.randn(4, 8), 4, group_size=True)
    with pytest.raises(ValueError, match="group_size needs x with at least one dim"):
        quantize(torch.tensor(1.0), 4, group_size=1)


def test_code_range_must_fit_its_storage():
    ops = torch.ops.pypaper
    with pytest.raises(RuntimeError, match="must fit int8"):
        ops.quantize(torch.tensor([150.0, -50.0]), torch.tensor(1.0), torch.tensor(0), -100, 155)
    with pytest.raises(RuntimeError, match="pack=True needs a 4-bit code range"):
        ops.quantize(torch.randn(4), torch.tensor(1.0), torch.tensor(0), -2, 13, None, None, True)
