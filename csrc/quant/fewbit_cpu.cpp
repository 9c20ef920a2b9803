// CPU implementations of the few-bit activation ops: torch's own activation kernel, then the
// code packing of kernels/cpu/fewbit_cpu.h (AVX2 bit planes), then the backward's unpacking.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

#include "../../kernels/cpu/fewbit_cpu.h"
#include "../block_cache.h"
#include "fewbit_args.h"

namespace pypaper {
namespace fewbit {
namespace {

// Elements per packing task: a multiple of the 32-element block, so tasks own whole bytes of the
// codes; big enough to amortise a task, small enough to balance two cores.
constexpr int64_t kChunk = 1 << 15;
static_assert(kChunk % kBlock == 0, "chunks must hold whole blocks");

template <typename F>
void dispatch_storage(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kFloat: f(float{}); break;
    case at::kDouble: f(double{}); break;
    case at::kBFloat16: f(pypaper::cpu::bf16{}); break;
    case at::kHalf: f(pypaper::cpu::fp16{}); break;
    default: TORCH_CHECK_TYPE(false, "expected a float tensor, got ", st);
  }
}

std::tuple<at::Tensor, at::Tensor> fewbit_forward_cpu(const at::Tensor& x_in,
                                                      c10::string_view activation,
                                                      at::ArrayRef<double> params,
                                                      const at::Tensor& borders_in,
                                                      const at::Tensor& levels, int64_t bits,
                                                      bool fold) {
  check_forward(x_in, borders_in, levels, bits, fold);
  const std::vector<double> p(params.begin(), params.end());
  const Act act = parse_activation(std::string(activation), p);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor borders = borders_in.contiguous();
  // Outputs from the block cache (csrc/block_cache.h): a training step asks for the same sizes
  // every step, and fresh pages of a big tensor cost more than a pass over it.
  at::Tensor y = empty_cached(x.sizes(), x.options());
  const int64_t n = x.numel();
  at::Tensor codes = empty_cached({packed_bytes(n, bits)}, x.options().dtype(at::kByte));
  if (n == 0) return {y, codes};
  const int nb = static_cast<int>(borders.numel());
  const int b = static_cast<int>(bits);
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  // y: torch's own kernel on the whole tensor, so y is what torch's call gives (threads
  // included). Fusing it by chunks (calling it per chunk inside the packing loop, so that x is
  // read once) measured 30% slower here than this second, streaming pass for the codes.
  activation_out(y, x, act, p);
  uint8_t* cp = codes.data_ptr<uint8_t>();
  dispatch_storage(x.scalar_type(), [&](auto tag) {
    using In = decltype(tag);
    using T = typename pypaper::cpu::acc_type<In>::type;
    const In* xp = reinterpret_cast<const In*>(x.data_ptr());
    const T* bp = borders.data_ptr<T>();
    at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t begin = c * kChunk;
        cpu::pack_range<In, T>(xp, cp, begin, std::min(n, begin + kChunk), bp, nb, fold, b);
      }
    });
  });
  return {y, codes};
}

at::Tensor fewbit_backward_cpu(const at::Tensor& grad_in, const at::Tensor& codes_in,
                               const at::Tensor& levels_in, int64_t bits) {
  check_backward(grad_in, codes_in, levels_in, bits);
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor codes = codes_in.contiguous();
  const at::Tensor levels = levels_in.contiguous();
  at::Tensor gx = empty_cached(grad.sizes(), grad.options());
  const int64_t n = grad.numel();
  if (n == 0) return gx;
  const int b = static_cast<int>(bits);
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  dispatch_storage(grad.scalar_type(), [&](auto tag) {
    using In = decltype(tag);
    using T = typename pypaper::cpu::acc_type<In>::type;
    const In* gp = reinterpret_cast<const In*>(grad.data_ptr());
    In* op = reinterpret_cast<In*>(gx.data_ptr());
    const T* lp = levels.data_ptr<T>();
    const int64_t nblocks = (n + kBlock - 1) / kBlock;
    // Tasks of whole blocks (the partial block, if any, is the last).
    at::parallel_for(0, nblocks, kChunk / kBlock, [&](int64_t b0, int64_t b1) {
      cpu::backward_range<In, T>(gp, cp, op, b0 * kBlock, std::min(n, b1 * kBlock), lp, b);
    });
  });
  return gx;
}

}  // namespace

TORCH_LIBRARY_IMPL(pypaper, CPU, m) {
  m.impl("fewbit_forward", &fewbit_forward_cpu);
  m.impl("fewbit_backward", &fewbit_backward_cpu);
}

}  // namespace fewbit
}  // namespace pypaper
