// The op contract (../shared/DESIGN.md): an op returns tensors of its own, never views. A view of
// an internal tensor (a result computed flat, then x.view(shape) / reshape / permute) breaks
// forward-mode AD through the op's autograd, where autograd asserts 'the tangent have the same
// layout as primal' (the delay op, 2026-12-05); tests/conftest.py checks every opcheck'd op's
// outputs for it. Large outputs are allocated in their final shape and written through views; the
// small ones (parameter gradients) go through this copy.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

namespace pypaper {

// A new contiguous tensor of `sizes` and `dtype` on src's device holding src's values in order.
inline at::Tensor fresh_copy(const at::Tensor& src, at::IntArrayRef sizes, at::ScalarType dtype) {
  at::Tensor out = at::empty(sizes, src.options().dtype(dtype));
  out.copy_(src.reshape(sizes));
  return out;
}

}  // namespace pypaper
