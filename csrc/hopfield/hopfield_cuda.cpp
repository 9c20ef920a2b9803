// CUDA implementation of the fused Hopfield retrieval (schemas in csrc/schemas.cpp): the per-head
// update loop of hopfield_cpu.cpp, with the per-head state (running / converged / done, the
// final step, the step limits) kept in device tensors so that, for finite step limits, no value
// is read back to the host: every pass launches the kernels of kernels/cuda/hopfield_kernels.cu,
// whose per-head flags say which heads take part. Unbounded heads (steps = -1) read one flag
// per step. 16-bit inputs run in fp32 (converted here), fp64 in fp64.
#include <ATen/core/Tensor.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/amax.h>
#include <ATen/ops/any.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/clamp_min.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/full_like.h>
#include <ATen/ops/sqrt.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/tensor.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <vector>

#include "../../kernels/cuda/hopfield_kernels.cuh"
#include "hopfield_args.h"

namespace pypaper {
namespace hopfield {
namespace {

constexpr int64_t kMaxCols = 512;

at::ScalarType math_type(at::ScalarType st) {
  return st == at::kDouble ? at::kDouble : at::kFloat;
}

template <typename T>
gpu::HopfieldMasks<T> make_masks(const at::Tensor& attn, const at::Tensor& pad) {
  gpu::HopfieldMasks<T> m;
  if (attn.defined()) {
    m.attn = attn.data_ptr<T>();
    m.a_b = attn.size(0) == 1 ? 0 : attn.stride(0);
    m.a_h = attn.size(1) == 1 ? 0 : attn.stride(1);
    m.a_l = attn.size(2) == 1 ? 0 : attn.stride(2);
    m.a_s = attn.size(3) == 1 ? 0 : attn.stride(3);
  }
  if (pad.defined()) {
    m.pad = pad.data_ptr<T>();
    m.p_b = pad.size(0) == 1 ? 0 : pad.stride(0);
    m.p_s = pad.stride(1);
  }
  return m;
}

at::Tensor device_longs(const std::vector<int64_t>& v, const at::Tensor& like) {
  at::Tensor host = at::empty({static_cast<int64_t>(v.size())}, at::TensorOptions().dtype(at::kLong));
  std::copy(v.begin(), v.end(), host.data_ptr<int64_t>());
  return host.to(like.device());
}

at::Tensor device_values(const std::vector<double>& v, const at::Tensor& like, at::ScalarType st) {
  at::Tensor host = at::empty({static_cast<int64_t>(v.size())}, at::TensorOptions().dtype(at::kDouble));
  std::copy(v.begin(), v.end(), host.data_ptr<double>());
  return host.to(like.device()).to(st);
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> retrieve_cuda_impl(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const std::vector<double>& beta, const std::vector<int64_t>& steps,
    const std::vector<double>& eps, const at::Tensor& attn, const at::Tensor& pad) {
  const int64_t B = q_in.size(0), H = q_in.size(1), L = q_in.size(2), d = q_in.size(3);
  const int64_t S = k_in.size(2), dv = v_in.size(3), BH = B * H;
  const auto mt = math_type(q_in.scalar_type());
  const at::Tensor k = k_in.to(mt).contiguous(), v = v_in.to(mt).contiguous();
  const auto opts = k.options();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q_in.get_device()).stream();
  bool unbounded = false;
  int64_t nmax = 0;
  std::vector<int64_t> limit_v(H);
  for (int64_t h = 0; h < H; ++h) {
    unbounded |= steps[h] < 0;
    nmax = std::max(nmax, steps[h]);
    limit_v[h] = steps[h] < 0 ? (int64_t{1} << 62) : steps[h];
  }
  const at::Tensor betas = device_values(beta, k, mt);
  const at::Tensor epss = device_values(eps, k, at::kDouble);
  const at::Tensor limit = device_longs(limit_v, k);
  int64_t cap = unbounded ? 8 : nmax + 1;
  at::Tensor xs = at::zeros({cap, B, H, L, d}, opts);
  xs.select(0, 0).copy_(q_in.to(mt));
  at::Tensor lse = at::full({cap, B, H, L}, -std::numeric_limits<double>::infinity(), opts);
  at::Tensor out = at::zeros({B, H, L, dv}, opts);
  at::Tensor status = at::zeros({H}, opts.dtype(at::kLong));  // 0 running, 1 converged, 2 done
  at::Tensor final_step = at::zeros({H}, opts.dtype(at::kLong));
  at::Tensor partial = at::zeros({B, H, L}, opts);
  const gpu::HopfieldMasks<T> masks = make_masks<T>(attn, pad);
  int64_t used = 0;
  for (int64_t n = 0;; ++n) {
    if (unbounded) {
      if (!(status != 2).any().item<bool>()) break;
      if (n + 1 >= xs.size(0)) {
        xs = at::cat({xs, at::zeros_like(xs)});
        lse = at::cat({lse, at::full_like(lse, -std::numeric_limits<double>::infinity())});
      }
    } else if (n > nmax) {
      break;
    }
    const at::Tensor nn = at::full({H}, n, opts.dtype(at::kLong));
    const at::Tensor run = status == 0;
    const at::Tensor upd = run & (nn < limit);
    const at::Tensor out_now = (run & (nn >= limit)) | (status == 1);
    const at::Tensor src = at::where(status == 1, final_step, nn);
    if (unbounded && upd.any().item<bool>()) used = n + 1;
    const at::Tensor upd_i = upd.to(at::kInt), out_i = out_now.to(at::kInt);
    gpu::HopfieldPassParams<T> p{};
    p.xs = xs.data_ptr<T>();
    p.slab = BH * L * d;
    p.k = k.data_ptr<T>();
    p.beta = betas.data_ptr<T>();
    p.lse = lse.data_ptr<T>();
    p.H = H;
    p.L = L;
    p.S = S;
    p.d = d;
    p.BH = BH;
    p.masks = masks;
    // updates: xi_{n+1} = P_n K into slot n + 1
    p.src = nn.data_ptr<int64_t>();
    p.lse_slot = nn.data_ptr<int64_t>();
    p.w = k.data_ptr<T>();
    p.dw = d;
    p.flag = upd_i.data_ptr<int32_t>();
    p.dst = xs.select(0, std::min(n + 1, xs.size(0) - 1)).data_ptr<T>();
    C10_CUDA_CHECK(gpu::hopfield_pass<T>(p, stream));
    // outputs: out = P V from each finishing head's last state
    p.src = src.data_ptr<int64_t>();
    p.lse_slot = src.data_ptr<int64_t>();
    p.w = v.data_ptr<T>();
    p.dw = dv;
    p.flag = out_i.data_ptr<int32_t>();
    p.dst = out.data_ptr<T>();
    C10_CUDA_CHECK(gpu::hopfield_pass<T>(p, stream));
    final_step = at::where(run & (nn >= limit), nn, final_step);
    status = at::where(out_now, at::full_like(status, 2), status);
    if (n >= 1) {
      gpu::HopfieldDiffParams<T> dp{};
      dp.xa = xs.select(0, n).data_ptr<T>();
      dp.la = lse.select(0, n).data_ptr<T>();
      dp.xb = xs.select(0, n - 1).data_ptr<T>();
      dp.lb = lse.select(0, n - 1).data_ptr<T>();
      dp.k = k.data_ptr<T>();
      dp.beta = betas.data_ptr<T>();
      dp.flag = upd_i.data_ptr<int32_t>();
      dp.partial = partial.data_ptr<T>();
      dp.H = H;
      dp.L = L;
      dp.S = S;
      dp.d = d;
      dp.BH = BH;
      dp.masks = masks;
      C10_CUDA_CHECK(gpu::hopfield_diff<T>(dp, stream));
      const at::Tensor norm = at::amax(at::sqrt(at::sum(partial, {2}).clamp_min(0)), {0}).to(at::kDouble);
      // not (norm > eps): a NaN norm (a fully masked row anywhere in the batch; amax keeps
      // NaN) stops the head, as hflayers' `change > eps` test does
      const at::Tensor conv = upd & ~(norm > epss);
      status = at::where(conv, at::full_like(status, 1), status);
      final_step = at::where(conv, nn, final_step);
    }
  }
  if (!unbounded) used = nmax;
  at::Tensor states = xs.narrow(0, 1, used).clone();
  at::Tensor lse_out = lse.narrow(0, 0, used + 1).clone();
  return {out.to(q_in.scalar_type()), states, lse_out, final_step};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> hopfield_retrieve_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, c10::ArrayRef<double> beta_in,
    c10::IntArrayRef steps_in, c10::ArrayRef<double> eps_in,
    const c10::optional<at::Tensor>& attn_mask, const c10::optional<at::Tensor>& pad_mask) {
  check_qkv(q, k, v);
  TORCH_CHECK(q.is_cuda(), "q must be a CUDA tensor for the CUDA kernel, got ", q.device());
  TORCH_CHECK(q.size(3) <= kMaxCols && v.size(3) <= kMaxCols,
              "the CUDA kernel supports pattern sizes up to ", kMaxCols, ", got ", q.size(3),
              " and ", v.size(3));
  const int64_t H = q.size(1);
  const auto beta = per_head(beta_in, H, "beta");
  const auto eps = per_head(eps_in, H, "eps");
  const auto steps = per_head_steps(steps_in, H);
  check_beta_eps(beta, eps);
  check_masks(attn_mask, pad_mask, q, k);
  const c10::cuda::CUDAGuard guard(q.device());
  const auto mt = math_type(q.scalar_type());
  const at::Tensor attn = attn_mask.has_value() ? attn_mask->to(mt) : at::Tensor();
  const at::Tensor pad = pad_mask.has_value() ? pad_mask->to(mt) : at::Tensor();
  if (mt == at::kDouble) return retrieve_cuda_impl<double>(q, k, v, beta, steps, eps, attn, pad);
  return retrieve_cuda_impl<float>(q, k, v, beta, steps, eps, attn, pad);
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda_impl(
    const at::Tensor& go_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& states_in,
    const at::Tensor& lse_in, const at::Tensor& nsteps_in, const std::vector<double>& beta,
    const at::Tensor& attn, const at::Tensor& pad) {
  const int64_t B = q_in.size(0), H = q_in.size(1), L = q_in.size(2), d = q_in.size(3);
  const int64_t S = k_in.size(2), dv = v_in.size(3), BH = B * H;
  const auto mt = math_type(q_in.scalar_type());
  const at::Tensor q = q_in.to(mt).contiguous(), k = k_in.to(mt).contiguous();
  const at::Tensor v = v_in.to(mt).contiguous(), out = out_in.to(mt).contiguous();
  const at::Tensor go = go_in.to(mt).contiguous();
  const at::Tensor st = states_in.to(mt).contiguous(), ls = lse_in.to(mt).contiguous();
  const at::Tensor ns = nsteps_in.to(k.device()).to(at::kLong);
  const auto opts = k.options();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q_in.get_device()).stream();
  const at::Tensor betas = device_values(beta, k, mt);
  const gpu::HopfieldMasks<T> masks = make_masks<T>(attn, pad);
  at::Tensor dk = at::zeros({B, H, S, d}, opts);
  at::Tensor dvt = at::zeros({B, H, S, dv}, opts);
  at::Tensor g = at::zeros({B, H, L, d}, opts);
  const int64_t nmax = st.size(0);
  const at::Tensor delta_last = at::sum(go * out, {3}).contiguous();
  for (int64_t n = nmax; n >= 0; --n) {
    const at::Tensor xi = n == 0 ? q : st.select(0, n - 1);
    const at::Tensor lse_n = ls.select(0, n);
    const at::Tensor last = (ns == n).to(at::kInt);
    const at::Tensor mid = (ns > n).to(at::kInt);
    at::Tensor g_new = at::zeros_like(g);
    gpu::HopfieldBackwardParams<T> p{};
    p.xi = xi.data_ptr<T>();
    p.lse = lse_n.data_ptr<T>();
    p.k = k.data_ptr<T>();
    p.beta = betas.data_ptr<T>();
    p.g_xi = g_new.data_ptr<T>();
    p.dk = dk.data_ptr<T>();
    p.H = H;
    p.L = L;
    p.S = S;
    p.d = d;
    p.BH = BH;
    p.masks = masks;
    // heads whose last step is n: out = P_n V
    p.w = v.data_ptr<T>();
    p.g = go.data_ptr<T>();
    p.delta = delta_last.data_ptr<T>();
    p.flag = last.data_ptr<int32_t>();
    p.dw_grad = dvt.data_ptr<T>();
    p.dw = dv;
    C10_CUDA_CHECK(gpu::hopfield_backward_step<T>(p, stream));
    if (n < nmax) {
      // heads past step n: xi_{n+1} = P_n K
      const at::Tensor delta_mid = at::sum(g * st.select(0, n), {3}).contiguous();
      p.w = k.data_ptr<T>();
      p.g = g.data_ptr<T>();
      p.delta = delta_mid.data_ptr<T>();
      p.flag = mid.data_ptr<int32_t>();
      p.dw_grad = dk.data_ptr<T>();
      p.dw = d;
      C10_CUDA_CHECK(gpu::hopfield_backward_step<T>(p, stream));
    }
    g = g_new;
  }
  const auto dt = q_in.scalar_type();
  return {g.to(dt), dk.to(dt), dvt.to(dt)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> hopfield_retrieve_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& states, const at::Tensor& lse,
    const at::Tensor& nsteps, c10::ArrayRef<double> beta_in,
    const c10::optional<at::Tensor>& attn_mask, const c10::optional<at::Tensor>& pad_mask) {
  check_qkv(q, k, v);
  TORCH_CHECK(q.is_cuda(), "q must be a CUDA tensor for the CUDA kernel, got ", q.device());
  TORCH_CHECK(states.dim() == 5 && lse.dim() == 4 && nsteps.dim() == 1,
              "states [n, B, H, L, d], lse [n + 1, B, H, L] and nsteps [H] expected");
  const int64_t H = q.size(1);
  const auto beta = per_head(beta_in, H, "beta");
  check_masks(attn_mask, pad_mask, q, k);
  const c10::cuda::CUDAGuard guard(q.device());
  const auto mt = math_type(q.scalar_type());
  const at::Tensor attn = attn_mask.has_value() ? attn_mask->to(mt) : at::Tensor();
  const at::Tensor pad = pad_mask.has_value() ? pad_mask->to(mt) : at::Tensor();
  if (mt == at::kDouble) {
    return backward_cuda_impl<double>(grad_out, q, k, v, out, states, lse, nsteps, beta, attn, pad);
  }
  return backward_cuda_impl<float>(grad_out, q, k, v, out, states, lse, nsteps, beta, attn, pad);
}

}  // namespace

TORCH_LIBRARY_IMPL(pypaper, CUDA, m) {
  m.impl("hopfield_retrieve", &hopfield_retrieve_cuda);
  m.impl("hopfield_retrieve_backward", &hopfield_retrieve_backward_cuda);
}

}  // namespace hopfield
}  // namespace pypaper
