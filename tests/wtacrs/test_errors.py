"""Bad inputs raise exceptions that name the argument."""
import pytest
import torch

from pypaper import wtacrs as W


@pytest.mark.parametrize("ratio", [0, 0.0, -0.1, 1.5, float("nan"), "0.3", True])
def test_keep_ratio_outside_unit_interval(ratio):
    with pytest.raises(ValueError, match="keep_ratio"):
        W.WTACRSLinear(4, 4, keep_ratio=ratio)
    with pytest.raises(ValueError, match="keep_ratio"):
        W.convert(torch.nn.Sequential(torch.nn.Linear(4, 4)), keep_ratio=ratio)


@pytest.mark.parametrize("min_k", [0, -3, 2.5, None])
def test_min_k_below_one(min_k):
    with pytest.raises(ValueError, match="min_k"):
        W.WTACRSLinear(4, 4, min_k=min_k)


def test_estimator_and_store_dtype():
    with pytest.raises(ValueError, match="estimator"):
        W.WTACRSLinear(4, 4, estimator="topk")
    with pytest.raises(ValueError, match="store_dtype"):
        W.WTACRSLinear(4, 4, store_dtype=torch.int8)


def test_wrong_input_features():
    layer = W.WTACRSLinear(8, 4)
    for train in (True, False):
        layer.train(train)
        with pytest.raises(ValueError, match="in_features = 8"):
            layer(torch.randn(3, 5, 7))


def test_sample_ids_of_the_wrong_shape():
    layer = W.WTACRSLinear(8, 4, keep_ratio=0.5, min_k=1)
    x = torch.randn(4, 20, 8)
    with pytest.raises(ValueError, match=r"sample_ids .*expected shape \(4,\)"):
        layer(x, sample_ids=torch.arange(3))
    with pytest.raises(ValueError, match="sample_ids"):
        layer(x, sample_ids=torch.arange(4).reshape(2, 2))
    with pytest.raises(TypeError, match="sample_ids must be an integer tensor"):
        layer(x, sample_ids=torch.rand(4))
    with pytest.raises(ValueError, match="sample_ids"):
        with W.sample_ids(torch.zeros(2, 2, dtype=torch.long)):
            pass


def test_op_arguments():
    x = torch.randn(10, 4)
    s = W.row_norms(x)
    with pytest.raises(ValueError, match="k must be in"):
        W.select(s, 11, True, 0)
    with pytest.raises(ValueError, match="k must be in"):
        W.select(s, 0, True, 0)
    with pytest.raises(ValueError, match="k must be in"):
        torch.ops.pypaper.wtacrs_select(s, 11, True, torch.tensor([0]))
    with pytest.raises(ValueError, match="scores must be 1-D"):
        W.select(s[None], 3, True, 0)
    with pytest.raises(TypeError, match="seed"):
        torch.ops.pypaper.wtacrs_select(s, 3, True, torch.tensor([0.5]))
    with pytest.raises(ValueError, match="must be a 2-D"):
        W.row_norms(torch.randn(2, 3, 4))
    with pytest.raises(TypeError, match="x must be float32"):
        W.row_norms(torch.ones(3, 3, dtype=torch.int32))
    with pytest.raises(IndexError, match="indices must be in"):
        W.gather_scale(x, torch.tensor([0, 10]))
    with pytest.raises(TypeError, match="indices must be int64"):
        torch.ops.pypaper.wtacrs_gather_scale(x, torch.tensor([0, 1], dtype=torch.int32))
    with pytest.raises(TypeError, match="scales must be"):
        W.gather_scale(x, torch.tensor([0, 1]), torch.ones(2, dtype=torch.float64))
    with pytest.raises(TypeError, match="dtype must be"):
        W.gather_scale(x, torch.tensor([0, 1]), None, torch.int8)
    with pytest.raises(ValueError, match="grad_norm must be 1-D"):
        W.sample(x, torch.ones(9), 3, True, 0)
    xk, idx = W.sample(x, None, 3, True, 0)
    w = torch.randn(5, 4)
    with pytest.raises(ValueError, match="x_kept must have 4 features"):
        W.linear(x, w, None, xk[:, :3], idx)
    with pytest.raises(ValueError, match="in_features = 4"):
        W.linear(torch.randn(10, 3), w, None, xk, idx)
    with pytest.raises(ValueError, match="bias must be 1-D"):
        W.linear(x, w, torch.ones(4), xk, idx)


def test_convert_arguments():
    with pytest.raises(TypeError, match="model must be"):
        W.convert("bert")
    with pytest.raises(ValueError, match="from_linear"):
        W.convert(torch.nn.Linear(3, 3))
    with pytest.raises(TypeError, match="linear must be"):
        W.WTACRSLinear.from_linear(torch.nn.Conv1d(3, 3, 1))
