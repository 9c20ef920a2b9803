"""Batching rules of the quant family's ops under torch.func.vmap: one call over the whole batch.

- Elementwise ops with their quantization parameters as inputs (fake_quantize, quantize,
  dequantize, power_fake_quantize and the backward steps): each element's result depends on the
  element and the parameters only, so the batched input, batch dim first, is one bigger input;
  a per-channel ``axis`` counts from the front and moves by one.
- The quantized linear ops (int8 dynamic, int8 / int4 weight-only): x is [M, K] per sample and
  each row is quantized and multiplied on its own (the dynamic op's activation scale is per
  row), so a batch of samples is [B*M, K].

A rule folds only what folding leaves unchanged; it returns NotImplemented, and vmap runs the op
once per sample (pypaper/_autograd.py), when a parameter or weight is batched (an ensemble of
quantizers), when a backward is asked for a parameter's gradient (folded, the kernel would sum it
over the samples instead of giving one per sample), for group-wise layouts, and for stochastic
rounding (``seed``: per sample, the loop draws the same stream for every sample).
"""
from __future__ import annotations

import torch

from .. import _autograd


def _only_batched(in_dims, positions) -> bool:
    """Whether no argument outside ``positions`` is batched."""
    return all(d is None for i, d in enumerate(in_dims) if i not in positions)


def elementwise_rule(op, batched, out_dims, axis=None, refuse=None, channels_at=None):
    """The rule of an elementwise op. ``batched``: positions of the tensors that may carry the
    batch (same per-sample shape); ``out_dims``: each output's batch dim where it is batched (0,
    or None for an output that does not depend on the batched tensors, such as a gradient the
    call was not asked for); ``axis``: position of a per-channel axis argument, which moves by
    one as the batch goes first; ``channels_at``: position of a parameter with one value per
    leading channel (the power ops' max_abs: x as [C, inner]); when it has more than one, the
    batch goes second instead, after the leading dim, so that the channels stay leading;
    ``refuse(args, sample_dims)``: true for a call the rule does not fold (sample_dims: the
    dims of one sample of the first batched tensor)."""
    def rule(info, in_dims, *args):
        first = batched[0]
        sample_dims = args[first].dim() - (in_dims[first] is not None)
        if not _only_batched(in_dims, batched) or (refuse is not None
                                                   and refuse(args, sample_dims)):
            return NotImplemented
        args = list(args)
        at = 0
        if channels_at is not None and args[channels_at].numel() > 1:
            # channels are the leading elements of each sample: the batch goes after the
            # leading dim, which only keeps them whole when they split that dim evenly (C = 3
            # over a [2, 3] sample spans parts of rows)
            shape = _autograd.sample_shape(args[first], in_dims[first])
            lead = shape[0] if shape else 1
            if lead % args[channels_at].numel():
                return NotImplemented
            at = 1
        for i in batched:
            if args[i] is not None:
                args[i] = _autograd.batch_first(args[i], in_dims[i], info.batch_size).movedim(0, at)
        if axis is not None and args[axis] is not None and args[axis] >= 0:
            args[axis] += 1
        dims = out_dims if isinstance(out_dims, tuple) else (out_dims,)
        dims = tuple(None if d is None else at for d in dims)
        return op(*args), (dims if isinstance(out_dims, tuple) else dims[0])

    return rule


def linear_rule(op, rows_out: bool = False):
    """The rule of a quantized linear op, x [M, K] per sample (position 0) and nothing else
    batched: one call on [B*M, K]. ``rows_out``: the op also returns one value per row (the
    int32 op's activation scales)."""
    def rule(info, in_dims, x, *rest):
        if not _only_batched(in_dims, (0,)) or x.dim() != 3:
            return NotImplemented
        x = x.movedim(in_dims[0], 0)
        b, m = x.shape[0], x.shape[1]
        out = op(x.reshape(b * m, x.shape[2]), *rest)
        if rows_out:
            y, per_row = out
            return (y.reshape(b, m, *y.shape[1:]), per_row.reshape(b, m)), (0, 0)
        return out.reshape(b, m, *out.shape[1:]), 0

    return rule


def register_fake_quantize(suffix: str = "") -> None:
    """fake_quantize, its backward, quantize and dequantize (suffix "" or "_triton")."""
    ops = torch.ops.pypaper
    # fake_quantize(x, scale, zero_point, qmin, qmax, axis, group_size, seed, grad_factor)
    _autograd.register_vmap(f"pypaper::fake_quantize{suffix}", elementwise_rule(
        getattr(ops, f"fake_quantize{suffix}").default, (0,), 0, axis=5,
        refuse=lambda a, nd: a[6] is not None or a[7] is not None))
    # fake_quantize_backward(grad, x, scale, zero_point, qmin, qmax, axis, group_size, seed,
    #                        grad_factor, need_scale_grad, need_zero_point_grad)
    _autograd.register_vmap(f"pypaper::fake_quantize_backward{suffix}", elementwise_rule(
        getattr(ops, f"fake_quantize_backward{suffix}").default, (0, 1), (0, None, None), axis=6,
        refuse=lambda a, nd: a[7] is not None or a[8] is not None or a[10] or a[11]))
    # quantize(x, scale, zero_point, qmin, qmax, axis, group_size, pack): codes; packing pairs
    # codes along the last dim, which a 0-d sample does not have
    _autograd.register_vmap(f"pypaper::quantize{suffix}", elementwise_rule(
        getattr(ops, f"quantize{suffix}").default, (0,), 0, axis=5,
        refuse=lambda a, nd: a[6] is not None or (a[7] and nd == 0)))
    # dequantize(data, scale, zero_point, qmin, qmax, axis, group_size, packed, last_dim, dtype)
    _autograd.register_vmap(f"pypaper::dequantize{suffix}", elementwise_rule(
        getattr(ops, f"dequantize{suffix}").default, (0,), 0, axis=5,
        refuse=lambda a, nd: a[6] is not None or (a[7] and nd == 0)))


def register_power(suffix: str = "") -> None:
    """The power quantizer's four ops (suffix "" or "_triton")."""
    ops = torch.ops.pypaper
    # power_fake_quantize(x, max_abs, exponent, qmax, ste)
    _autograd.register_vmap(f"pypaper::power_fake_quantize{suffix}", elementwise_rule(
        getattr(ops, f"power_fake_quantize{suffix}").default, (0,), 0, channels_at=1))
    # power_fake_quantize_backward(grad, x, max_abs, exponent, qmax, need_max_grad,
    #                              need_exponent_grad, ste)
    _autograd.register_vmap(f"pypaper::power_fake_quantize_backward{suffix}", elementwise_rule(
        getattr(ops, f"power_fake_quantize_backward{suffix}").default, (0, 1), (0, None, None),
        refuse=lambda a, nd: a[5] or a[6], channels_at=2))
    # power_quantize(x, max_abs, exponent, qmax) -> int8 codes;
    # power_dequantize(codes, max_abs, exponent, qmax, dtype)
    _autograd.register_vmap(f"pypaper::power_quantize{suffix}", elementwise_rule(
        getattr(ops, f"power_quantize{suffix}").default, (0,), 0, channels_at=1))
    _autograd.register_vmap(f"pypaper::power_dequantize{suffix}", elementwise_rule(
        getattr(ops, f"power_dequantize{suffix}").default, (0,), 0, channels_at=1))


def register_linear(suffix: str = "") -> None:
    """The quantized linear ops (suffix "" or "_triton")."""
    ops = torch.ops.pypaper
    for name in ("int8_dynamic_linear", "int8_weight_only_linear", "int4_weight_only_linear"):
        _autograd.register_vmap(f"pypaper::{name}{suffix}",
                                linear_rule(getattr(ops, f"{name}{suffix}").default))
    _autograd.register_vmap(f"pypaper::int8_dynamic_linear_int32{suffix}",
                            linear_rule(getattr(ops, f"int8_dynamic_linear_int32{suffix}").default,
                                        rows_out=True))
