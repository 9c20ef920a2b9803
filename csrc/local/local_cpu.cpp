// CPU implementations of pypaper.local's fused local-loss layer ops (schemas in csrc/schemas.cpp).
//
// Each layer op is: the forward GEMM z = x W^T (torch's GEMM, written into the output tensor), one
// fused pass over blocks of its rows (kernels/cpu/local_cpu.h: 1/||x|| scale, bias, activation,
// the local loss and dZ, the bias gradient), and the weight-gradient GEMM dW = dZ^T x. Nothing is
// kept for a global backward: the ops return the detached output, the loss and the gradients.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../../kernels/cpu/local_cpu.h"
#include "local_args.h"

namespace pypaper {
namespace local {
namespace {

using pypaper::cpu::bf16;
using pypaper::cpu::fp16;
namespace lc = pypaper::cpu::local;

template <typename F>
void dispatch_storage(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kFloat: f(float{}); break;
    case at::kDouble: f(double{}); break;
    case at::kBFloat16: f(bf16{}); break;
    case at::kHalf: f(fp16{}); break;
    default: TORCH_CHECK_TYPE(false, "expected a float tensor, got ", st);
  }
}

template <typename In>
using math_t = typename pypaper::cpu::acc_type<In>::type;

template <typename In>
const In* cptr(const at::Tensor& t) {
  return reinterpret_cast<const In*>(t.const_data_ptr());
}

template <typename In>
In* mptr(at::Tensor& t) {
  return reinterpret_cast<In*>(t.mutable_data_ptr());
}

// The forward GEMM and the epilogue in one parallel region: the rows are cut into one range of
// whole row blocks per thread; each thread multiplies its rows (x_rows W^T, single-threaded GEMM
// inside the region) and runs the epilogue on them right away, while they are in its cache.
// epilogue(b0, b1, scratch) handles row blocks [b0, b1).
// ``align``: each thread's range starts at a multiple of this many blocks (so an epilogue that
// works on groups of blocks sees the same groups on any number of threads).
template <typename F>
void forward_rows(const at::Tensor& x, const at::Tensor& w, at::Tensor& h, F&& epilogue,
                  int64_t align = 1) {
  const int64_t n = x.size(0), nb = lc::num_blocks(n);
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), nb));
  const int64_t per = ((nb + nt - 1) / nt + align - 1) / align * align;
  // Detached views: the GEMMs run on worker threads, where autograd's thread-local state (the
  // caller's no-grad below the autograd key) does not apply.
  const at::Tensor xd = x.detach(), wt = w.detach().t();
  at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b0 = t * per, b1 = std::min(nb, b0 + per);
      if (b0 >= b1) continue;
      const int64_t r0 = b0 * lc::kRowBlock, r1 = std::min(n, b1 * lc::kRowBlock);
      at::Tensor hs = h.narrow(0, r0, r1 - r0);
      at::mm_out(hs, xd.narrow(0, r0, r1 - r0), wt);
      epilogue(b0, b1);
    }
  });
}

// Sums the per-block bias-gradient partials [nb, m] in block order into out [m] (storage In).
template <typename In, typename T>
void reduce_blocks(const T* partial, int64_t nb, int64_t m, In* out, bool accumulate = false) {
  // Small (blocks x features): serial, so it adds no thread barrier to the op.
  for (int64_t j = 0; j < m; ++j) {
    T acc = 0;
    for (int64_t b = 0; b < nb; ++b) acc += partial[b * m + j];
    if (accumulate) acc += static_cast<T>(pypaper::cpu::to_float(out[j]));
    out[j] = pypaper::cpu::store_as<In>(acc);
  }
}

template <typename T>
T sum_in_order(const T* v, int64_t n) {
  T acc = 0;
  for (int64_t i = 0; i < n; ++i) acc += v[i];
  return acc;
}

std::optional<at::Tensor> contig(const std::optional<at::Tensor>& t) {
  if (!t.has_value()) return std::nullopt;
  return t->contiguous();
}

// ---- Forward-Forward ------------------------------------------------------------------------

// Empty work (no rows or no features): the parameter gradients are zero, so written as zeros
// unless they are being accumulated into.
void zero_grads_unless(bool accumulate, at::Tensor& gw, const std::optional<at::Tensor>& gb) {
  if (accumulate) return;
  gw.zero_();
  if (gb.has_value()) gb->zero_();
}

// The layer's weight gradient dW = dZ^T x by one GEMM, written into gw or added to it (a
// module's .grad: the GEMM accumulates, no temporary).
void weight_grad_gemm(at::Tensor& gw, const at::Tensor& dz, const at::Tensor& x, bool accumulate) {
  if (accumulate) {
    gw.addmm_(dz.t(), x);
  } else {
    at::mm_out(gw, dz.t(), x);
  }
}

// Checks of the outputs of the *_out ops: h [n, m] in x's dtype, grad_weight [m, d] and
// grad_bias [m] (when there is a bias) in weight's dtype, all contiguous on x's device.
void check_outputs(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b,
                   const at::Tensor& h, const at::Tensor& gw,
                   const std::optional<at::Tensor>& gb) {
  const int64_t n = x.size(0), m = w.size(0);
  TORCH_CHECK(h.sizes() == at::IntArrayRef({n, m}) && h.scalar_type() == x.scalar_type() &&
                  h.is_contiguous() && h.device() == x.device(),
              "h must be a contiguous [", n, ", ", m, "] tensor of x's dtype and device");
  TORCH_CHECK(gw.sizes() == w.sizes() && gw.scalar_type() == w.scalar_type() &&
                  gw.is_contiguous() && gw.device() == w.device(),
              "grad_weight must be a contiguous tensor of weight's shape, dtype and device");
  TORCH_CHECK(b.has_value() == gb.has_value(), "grad_bias must be given exactly when bias is");
  if (gb.has_value()) {
    TORCH_CHECK(gb->sizes() == b->sizes() && gb->scalar_type() == b->scalar_type() &&
                    gb->is_contiguous(),
                "grad_bias must be a contiguous tensor of bias's shape and dtype");
  }
}

// The Forward-Forward layer into given outputs: h (overwritten), grad_weight / grad_bias
// (overwritten, or added to when accumulate: dW by addmm into the existing gradient, so a
// module's .grad is updated without a separate pass over it). Returns the loss.
at::Tensor ff_core(const at::Tensor& x_in, const at::Tensor& weight_in,
                   const std::optional<at::Tensor>& bias_in, int64_t num_pos, double threshold,
                   bool normalize, double eps, bool accumulate, at::Tensor& h, at::Tensor& gw,
                   const std::optional<at::Tensor>& gb_out) {
  const int64_t n = x_in.size(0), d = x_in.size(1), m = weight_in.size(0);
  TORCH_CHECK_VALUE(num_pos >= 0 && num_pos <= n, "num_pos must be in [0, N] = [0, ", n,
                    "], got ", num_pos);
  check_finite(threshold, "threshold");
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, "eps must be finite and >= 0, got ", eps);
  const at::Tensor x = x_in.detach().contiguous(), w = weight_in.detach().contiguous();
  const std::optional<at::Tensor> b = contig(bias_in);
  const at::ScalarType mt = math_type_of(x.scalar_type());
  at::Tensor loss = at::zeros({}, x.options().dtype(mt));
  if (n == 0 || m == 0) {
    zero_grads_unless(accumulate, gw, gb_out);
    return loss;
  }
  at::Tensor dz = at::empty({n, m}, x.options());
  const int64_t nb = lc::num_blocks(n);
  at::Tensor partial = at::zeros({nb, m}, x.options().dtype(mt));
  at::Tensor row_loss = at::empty({n}, x.options().dtype(mt));
  at::Tensor inv = at::empty({n}, x.options().dtype(mt));
  dispatch_storage(x.scalar_type(), [&](auto tag) {
    using In = decltype(tag);
    using T = math_t<In>;
    const In* xp = cptr<In>(x);
    const In* bp = b.has_value() ? cptr<In>(*b) : nullptr;
    In* hp = mptr<In>(h);
    In* dp = mptr<In>(dz);
    T* ip = inv.mutable_data_ptr<T>();
    T* pp = partial.mutable_data_ptr<T>();
    T* lp = row_loss.mutable_data_ptr<T>();
    const T w_pos = num_pos > 0 ? T(1) / T(num_pos) : T(0);
    const T w_neg = n - num_pos > 0 ? T(1) / T(n - num_pos) : T(0);
    forward_rows(x, w, h, [&](int64_t b0, int64_t b1) {
      std::vector<T> tmp(m);
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t r0 = blk * lc::kRowBlock, r1 = std::min(n, r0 + lc::kRowBlock);
        if (normalize) lc::row_inv_norms<In, T>(xp, d, d, r0, r1, T(eps), ip);
        lc::ff_rows<In, T>(hp, m, normalize ? ip : nullptr, bp, r0, r1, num_pos, T(threshold),
                           w_pos, w_neg, dp, lp, pp + blk * m, tmp.data());
      }
    });
    if (gb_out.has_value()) {
      at::Tensor gb = *gb_out;
      reduce_blocks<In, T>(pp, nb, m, mptr<In>(gb), accumulate);
    }
    loss.fill_(sum_in_order(lp, n));
  });
  weight_grad_gemm(gw, dz, x, accumulate);
  return loss;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ff_linear_cpu(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    int64_t num_pos, double threshold, bool normalize, double eps) {
  check_linear(x, weight, bias);
  at::Tensor h = at::empty({x.size(0), weight.size(0)}, x.options());
  at::Tensor gw = at::empty(weight.sizes(), weight.options());
  std::optional<at::Tensor> gb;
  if (bias.has_value()) gb = at::empty({weight.size(0)}, weight.options());
  at::Tensor loss = ff_core(x, weight, bias, num_pos, threshold, normalize, eps, false, h, gw, gb);
  return {h, loss, gw, gb.has_value() ? *gb : at::empty({0}, weight.options())};
}

at::Tensor ff_linear_out_cpu(const at::Tensor& x, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, int64_t num_pos,
                             double threshold, bool normalize, double eps, bool accumulate,
                             at::Tensor& h, at::Tensor& grad_weight,
                             const std::optional<at::Tensor>& grad_bias) {
  check_linear(x, weight, bias);
  check_outputs(x, weight, bias, h, grad_weight, grad_bias);
  return ff_core(x, weight, bias, num_pos, threshold, normalize, eps, accumulate, h, grad_weight,
                 grad_bias);
}

// ---- Forward-Forward, single forward with class embeddings -----------------------------------

// Per-thread scratch tensors of the single-forward op, kept between calls (slot: [x; class_x],
// [x; class_x] W^T, [dZ; dZ_c]) and reused while the shape and dtype repeat, as a training loop
// calls the layer: freshly allocated megabyte buffers cost ~0.1 ms a call in page faults and
// allocator work (3% of the layer at N = 256, d = 1024). Never returned to the caller. Buffers
// over kWorkspaceMaxBytes are allocated per call and not kept (so a thread holds at most ~3 x 64 MB).
constexpr int64_t kWorkspaceMaxBytes = int64_t{64} << 20;

at::Tensor workspace(int slot, at::IntArrayRef sizes, const at::TensorOptions& opts) {
  thread_local at::Tensor cache[3];
  at::Tensor& t = cache[slot];
  if (t.defined() && t.sizes() == sizes && t.scalar_type() == opts.dtype().toScalarType() &&
      t.device() == opts.device()) {
    return t;
  }
  at::Tensor fresh = at::empty(sizes, opts);
  t = fresh.nbytes() <= static_cast<size_t>(kWorkspaceMaxBytes) ? fresh : at::Tensor();
  return fresh;
}

constexpr int64_t kSfGroup = 4;

// The single-forward FF layer into given outputs: h (overwritten), grad_weight / grad_bias
// (overwritten, or added to when accumulate, as ff_core). Returns (E, loss).
std::tuple<at::Tensor, at::Tensor> sf_core(
    const at::Tensor& x_in, const at::Tensor& class_x_in, const at::Tensor& weight_in,
    const std::optional<at::Tensor>& bias_in, const at::Tensor& y_in, bool normalize, double eps,
    double temperature, bool accumulate, at::Tensor& h, at::Tensor& gw,
    const std::optional<at::Tensor>& gb_out) {
  check_linear(class_x_in, weight_in, bias_in, "class_x");
  const int64_t n = x_in.size(0), d = x_in.size(1), m = weight_in.size(0);
  const int64_t k = class_x_in.size(0);
  TORCH_CHECK_VALUE(k >= 1, "class_x must hold one row per class (at least 1), got 0 rows");
  check_labels(y_in, n, x_in);
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0,
                    "temperature must be finite and > 0, got ", temperature);
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, "eps must be finite and >= 0, got ", eps);
  const at::Tensor x = x_in.detach().contiguous(), cx = class_x_in.detach().contiguous();
  const at::Tensor w = weight_in.detach().contiguous();
  const at::Tensor y = y_in.contiguous();
  check_label_values(y.const_data_ptr<int64_t>(), n, k);
  const std::optional<at::Tensor> b = contig(bias_in);
  const at::ScalarType mt = math_type_of(x.scalar_type());
  at::Tensor loss = at::zeros({}, x.options().dtype(mt));
  if (m == 0) {
    zero_grads_unless(accumulate, gw, gb_out);
    return {at::empty({k, m}, x.options()), loss};
  }
  // One forward GEMM for the data rows and the class rows: [x; class_x] W^T (a separate GEMM
  // of the k class rows alone would read all of W again for a few rows). The class rows' E is
  // computed first: every data row's epilogue needs it. The same [x; class_x] is the right
  // operand of the single dW GEMM. The data rows' h is written into h by the epilogue (which
  // may be za's own rows: the functional op).
  at::Tensor xa = workspace(0, {n + k, d}, x.options());
  xa.narrow(0, 0, n).copy_(x);
  xa.narrow(0, n, k).copy_(cx);
  at::Tensor za = workspace(1, {n + k, m}, x.options());
  at::mm_out(za, xa, w.t());
  at::Tensor emb = at::empty({k, m}, x.options().dtype(mt));
  at::Tensor inv_c = at::empty({k}, x.options().dtype(mt));
  // dZ of the data rows and of the class rows in one buffer, so that dW is one GEMM
  // [dZ; dZ_c]^T [x; class_x].
  at::Tensor dza = workspace(2, {n + k, m}, x.options());
  at::Tensor dz = dza.narrow(0, 0, n), dzc = dza.narrow(0, n, k);
  at::Tensor dlogits = at::empty({n, k}, x.options().dtype(mt));
  const int64_t nb = lc::num_blocks(n);
  at::Tensor partial = at::zeros({nb + 1, m}, x.options().dtype(mt));
  // dE partials: one per group of kSfGroup row blocks (the epilogue's unit of work), summed in
  // group order afterwards: the same result on any number of threads.
  const int64_t ngroups = (nb + kSfGroup - 1) / kSfGroup;
  at::Tensor de_part = at::zeros({std::max<int64_t>(ngroups, 1), k, m}, x.options().dtype(mt));
  at::Tensor row_loss = at::empty({n}, x.options().dtype(mt));
  at::Tensor inv = at::empty({n}, x.options().dtype(mt));
  dispatch_storage(x.scalar_type(), [&](auto tag) {
    using In = decltype(tag);
    using T = math_t<In>;
    const In* bp = b.has_value() ? cptr<In>(*b) : nullptr;
    T* ep = emb.mutable_data_ptr<T>();
    T* icp = inv_c.mutable_data_ptr<T>();
    In* chp = mptr<In>(za) + n * m;  // the class rows of za
    if (normalize) lc::row_inv_norms<In, T>(cptr<In>(cx), d, d, 0, k, T(eps), icp);
    for (int64_t c = 0; c < k; ++c) {
      const T sc = normalize ? icp[c] : T(1);
      for (int64_t j = 0; j < m; ++j) {
        T v = sc * static_cast<T>(pypaper::cpu::to_float(chp[c * m + j]));
        if (bp) v += static_cast<T>(pypaper::cpu::to_float(bp[j]));
        ep[c * m + j] = v > T(0) ? v : T(0);
        chp[c * m + j] = pypaper::cpu::store_as<In>(ep[c * m + j]);
      }
    }
    T* pp = partial.mutable_data_ptr<T>();
    T* lp = row_loss.mutable_data_ptr<T>();
    if (n > 0) {
      const In* xp = cptr<In>(x);
      const In* zp = cptr<In>(za);
      In* hp = mptr<In>(h);
      In* dp = mptr<In>(dz);
      T* ip = inv.mutable_data_ptr<T>();
      T* dlp = dlogits.mutable_data_ptr<T>();
      const int64_t* yp = y.const_data_ptr<int64_t>();
      const T scale = T(1) / T(n);
      const T* emb_p = emb.const_data_ptr<T>();  // [k, m] math type
      at::parallel_for(0, ngroups, 1, [&](int64_t g0, int64_t g1) {
        // Per group of row blocks, on cache-resident rows: h rows (math type), logits = h E^T,
        // the CE, and row by row dh = dlogits E, the group's share of dE = dlogits^T H, and dz,
        // db through the ReLU (sf_block_epilogue).
        const int64_t rows_max = kSfGroup * lc::kRowBlock;
        at::Tensor hm = at::empty({std::is_same_v<In, T> ? 0 : rows_max, m}, emb.options());
        at::Tensor dh = at::empty({m}, emb.options());
        at::Tensor lg = at::empty({rows_max, k}, emb.options());
        for (int64_t grp = g0; grp < g1; ++grp) {
          const int64_t blk = grp * kSfGroup;
          const int64_t r0 = blk * lc::kRowBlock;
          const int64_t r1 = std::min(n, std::min(nb, blk + kSfGroup) * lc::kRowBlock);
          if (normalize) lc::row_inv_norms<In, T>(xp, d, d, r0, r1, T(eps), ip);
          // fp32: h itself is the math-type copy (no scratch pass); bf16 / fp16: a fp32 scratch.
          T* hmp;
          if constexpr (std::is_same_v<In, T>) {
            hmp = hp + r0 * m;
          } else {
            hmp = hm.mutable_data_ptr<T>();
          }
          lc::sf_rows_h<In, T>(zp, hp, m, normalize ? ip : nullptr, bp, r0, r1, hmp);
          lc::sf_block_epilogue<In, T>(hmp, r0, r1, m, emb_p, k, yp + r0, T(1.0 / temperature),
                                       scale, normalize ? ip : nullptr, lg.mutable_data_ptr<T>(),
                                       dlp + r0 * k, lp + r0, dh.mutable_data_ptr<T>(),
                                       de_part.mutable_data_ptr<T>() + grp * k * m, dp,
                                       pp + blk * m);
        }
      });
    }
    loss.fill_(sum_in_order(lp, n));
    // dE = dlogits^T H (the class rows are scored by every row), then through their ReLU.
    T* dep = de_part.mutable_data_ptr<T>();
    for (int64_t grp = 1; grp < ngroups; ++grp) {
      const T* src = dep + grp * k * m;
      for (int64_t i = 0; i < k * m; ++i) dep[i] += src[i];
    }
    In* dcp = mptr<In>(dzc);
    T* last = pp + nb * m;
    for (int64_t c = 0; c < k; ++c) {
      const T sc = normalize ? icp[c] : T(1);
      for (int64_t j = 0; j < m; ++j) {
        const T g = ep[c * m + j] > T(0) ? dep[c * m + j] : T(0);
        dcp[c * m + j] = pypaper::cpu::store_as<In>(g * sc);
        last[j] += g;
      }
    }
    if (gb_out.has_value()) {
      at::Tensor gb = *gb_out;
      reduce_blocks<In, T>(pp, nb + 1, m, mptr<In>(gb), accumulate);
    }
  });
  weight_grad_gemm(gw, dza, xa, accumulate);
  return {za.narrow(0, n, k).clone(), loss};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ff_sf_linear_cpu(
    const at::Tensor& x, const at::Tensor& class_x, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& y, bool normalize, double eps,
    double temperature) {
  check_linear(x, weight, bias);
  const int64_t n = x.size(0), m = weight.size(0);
  at::Tensor h = at::empty({n, m}, x.options());
  at::Tensor gw = at::empty(weight.sizes(), weight.options());
  std::optional<at::Tensor> gb;
  if (bias.has_value()) gb = at::empty({m}, weight.options());
  auto [e, loss] = sf_core(x, class_x, weight, bias, y, normalize, eps, temperature, false, h, gw,
                           gb);
  return {h, e, loss, gw, gb.has_value() ? *gb : at::empty({0}, weight.options())};
}

std::tuple<at::Tensor, at::Tensor> ff_sf_linear_out_cpu(
    const at::Tensor& x, const at::Tensor& class_x, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& y, bool normalize, double eps,
    double temperature, bool accumulate, at::Tensor& h, at::Tensor& grad_weight,
    const std::optional<at::Tensor>& grad_bias) {
  check_linear(x, weight, bias);
  check_outputs(x, weight, bias, h, grad_weight, grad_bias);
  return sf_core(x, class_x, weight, bias, y, normalize, eps, temperature, accumulate, h,
                 grad_weight, grad_bias);
}

// ---- target projection (tpSGD) --------------------------------------------------------------

// The target-projection layer into given outputs (see ff_core). Returns the loss.
at::Tensor tp_core(const at::Tensor& x_in, const at::Tensor& weight_in,
                   const std::optional<at::Tensor>& bias_in, const at::Tensor& proj_in,
                   const at::Tensor& y_in, int64_t activation, bool sign, bool accumulate,
                   at::Tensor& h, at::Tensor& gw, const std::optional<at::Tensor>& gb_out) {
  const int64_t n = x_in.size(0), m = weight_in.size(0);
  TORCH_CHECK_VALUE(activation >= 0 && activation <= 2,
                    "activation must be 0 (sigmoid), 1 (tanh) or 2 (relu), got ", activation);
  TORCH_CHECK(proj_in.dim() == 2 && proj_in.size(1) == m,
              "proj must have shape [num_classes, out_features] (P^T) with out_features = ", m,
              ", got ", proj_in.sizes());
  TORCH_CHECK(is_float_type(proj_in.scalar_type()), "proj must be a float tensor, got ",
              proj_in.scalar_type());
  TORCH_CHECK(proj_in.device() == x_in.device(), "proj is on ", proj_in.device(),
              " but x is on ", x_in.device());
  check_labels(y_in, n, x_in);
  const at::Tensor x = x_in.detach().contiguous(), w = weight_in.detach().contiguous();
  const at::Tensor y = y_in.contiguous();
  check_label_values(y.const_data_ptr<int64_t>(), n, proj_in.size(0));
  const std::optional<at::Tensor> b = contig(bias_in);
  const at::ScalarType mt = math_type_of(x.scalar_type());
  const at::Tensor proj = proj_in.to(mt).contiguous();
  at::Tensor loss = at::zeros({}, x.options().dtype(mt));
  if (n == 0 || m == 0) {
    zero_grads_unless(accumulate, gw, gb_out);
    return loss;
  }
  at::Tensor dz = at::empty({n, m}, x.options());
  const int64_t nb = lc::num_blocks(n);
  at::Tensor partial = at::zeros({nb, m}, x.options().dtype(mt));
  at::Tensor row_loss = at::empty({n}, x.options().dtype(mt));
  dispatch_storage(x.scalar_type(), [&](auto tag) {
    using In = decltype(tag);
    using T = math_t<In>;
    const In* bp = b.has_value() ? cptr<In>(*b) : nullptr;
    In* hp = mptr<In>(h);
    In* dp = mptr<In>(dz);
    const T* pj = proj.const_data_ptr<T>();
    const int64_t* yp = y.const_data_ptr<int64_t>();
    T* pp = partial.mutable_data_ptr<T>();
    T* lp = row_loss.mutable_data_ptr<T>();
    const T scale = T(1) / T(n);
    auto run = [&](auto act_tag, auto sign_tag) {
      constexpr int ACT = decltype(act_tag)::value;
      constexpr bool SIGN = decltype(sign_tag)::value;
      forward_rows(x, w, h, [&](int64_t b0, int64_t b1) {
        for (int64_t blk = b0; blk < b1; ++blk) {
          const int64_t r0 = blk * lc::kRowBlock, r1 = std::min(n, r0 + lc::kRowBlock);
          lc::tp_rows<In, T, ACT, SIGN>(hp, m, bp, pj, yp, scale, r0, r1, dp, lp, pp + blk * m);
        }
      });
    };
    auto with_sign = [&](auto act_tag) {
      if (sign) {
        run(act_tag, std::true_type{});
      } else {
        run(act_tag, std::false_type{});
      }
    };
    switch (activation) {
      case 0: with_sign(std::integral_constant<int, 0>{}); break;
      case 1: with_sign(std::integral_constant<int, 1>{}); break;
      default: with_sign(std::integral_constant<int, 2>{}); break;
    }
    if (gb_out.has_value()) {
      at::Tensor gb = *gb_out;
      reduce_blocks<In, T>(pp, nb, m, mptr<In>(gb), accumulate);
    }
    loss.fill_(sum_in_order(lp, n));
  });
  weight_grad_gemm(gw, dz, x, accumulate);
  return loss;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> tp_linear_cpu(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& proj, const at::Tensor& y, int64_t activation, bool sign) {
  check_linear(x, weight, bias);
  at::Tensor h = at::empty({x.size(0), weight.size(0)}, x.options());
  at::Tensor gw = at::empty(weight.sizes(), weight.options());
  std::optional<at::Tensor> gb;
  if (bias.has_value()) gb = at::empty({weight.size(0)}, weight.options());
  at::Tensor loss = tp_core(x, weight, bias, proj, y, activation, sign, false, h, gw, gb);
  return {h, loss, gw, gb.has_value() ? *gb : at::empty({0}, weight.options())};
}

at::Tensor tp_linear_out_cpu(const at::Tensor& x, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, const at::Tensor& proj,
                             const at::Tensor& y, int64_t activation, bool sign, bool accumulate,
                             at::Tensor& h, at::Tensor& grad_weight,
                             const std::optional<at::Tensor>& grad_bias) {
  check_linear(x, weight, bias);
  check_outputs(x, weight, bias, h, grad_weight, grad_bias);
  return tp_core(x, weight, bias, proj, y, activation, sign, accumulate, h, grad_weight,
                 grad_bias);
}

// ---- local head: global pool -> linear -> cross-entropy ------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> local_head_cpu(
    const at::Tensor& feat_in, const at::Tensor& weight_in,
    const std::optional<at::Tensor>& bias_in, const at::Tensor& y_in) {
  TORCH_CHECK(is_float_type(feat_in.scalar_type()), "feat must be a float tensor, got ",
              feat_in.scalar_type());
  TORCH_CHECK(feat_in.dim() >= 2, "feat must have shape [N, C, *spatial], got ", feat_in.sizes());
  const int64_t n = feat_in.size(0), c = feat_in.size(1);
  TORCH_CHECK(weight_in.dim() == 2 && weight_in.size(1) == c,
              "weight must have shape [num_classes, C] with C = feat.shape[1] = ", c, ", got ",
              weight_in.sizes());
  TORCH_CHECK(weight_in.scalar_type() == feat_in.scalar_type(), "weight dtype ",
              weight_in.scalar_type(), " must match feat dtype ", feat_in.scalar_type());
  const int64_t k = weight_in.size(0);
  TORCH_CHECK_VALUE(k >= 1, "weight must have at least one class row");
  if (bias_in.has_value()) {
    TORCH_CHECK(bias_in->dim() == 1 && bias_in->size(0) == k, "bias must have shape [", k,
                "], got ", bias_in->sizes());
    TORCH_CHECK(bias_in->scalar_type() == feat_in.scalar_type(), "bias dtype ",
                bias_in->scalar_type(), " must match feat dtype ", feat_in.scalar_type());
  }
  check_labels(y_in, n, feat_in);
  const at::Tensor y = y_in.contiguous();
  check_label_values(y.const_data_ptr<int64_t>(), n, k);
  int64_t s = 1;
  for (int64_t i = 2; i < feat_in.dim(); ++i) s *= feat_in.size(i);
  const at::Tensor feat = feat_in.contiguous();
  const at::ScalarType mt = math_type_of(feat.scalar_type());
  const at::Tensor wt = weight_in.to(mt).contiguous();
  at::Tensor pooled = at::empty({n, c}, feat.options().dtype(mt));
  dispatch_storage(feat.scalar_type(), [&](auto tag) {
    using In = decltype(tag);
    using T = math_t<In>;
    const In* fp = cptr<In>(feat);
    T* pp = pooled.mutable_data_ptr<T>();
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(1, c * s));
    at::parallel_for(0, n, grain, [&](int64_t r0, int64_t r1) {
      lc::pool_rows<In, T>(fp, c, s, r0, r1, pp);
    });
  });
  at::Tensor logits = bias_in.has_value() ? at::addmm(bias_in->to(mt), pooled, wt.t())
                                          : at::mm(pooled, wt.t());
  at::Tensor dlogits = at::empty({n, k}, logits.options());
  at::Tensor row_loss = at::zeros({n}, logits.options());
  at::Tensor loss = at::zeros({}, logits.options());
  at::Tensor gb = bias_in.has_value() ? at::zeros({k}, bias_in->options())
                                      : at::empty({0}, weight_in.options());
  if (n > 0) {
    if (mt == at::kDouble) {
      lc::ce_rows<double>(logits.const_data_ptr<double>(), k, y.const_data_ptr<int64_t>(), 1.0,
                          1.0 / double(n), 0, n, dlogits.mutable_data_ptr<double>(),
                          row_loss.mutable_data_ptr<double>());
      loss.fill_(sum_in_order(row_loss.const_data_ptr<double>(), n));
    } else {
      lc::ce_rows<float>(logits.const_data_ptr<float>(), k, y.const_data_ptr<int64_t>(), 1.0f,
                         1.0f / float(n), 0, n, dlogits.mutable_data_ptr<float>(),
                         row_loss.mutable_data_ptr<float>());
      loss.fill_(sum_in_order(row_loss.const_data_ptr<float>(), n));
    }
    if (bias_in.has_value()) gb.copy_(dlogits.sum(0));
  }
  at::Tensor gw = at::mm(dlogits.t(), pooled).to(weight_in.scalar_type());
  at::Tensor gpooled = at::mm(dlogits, wt);
  return {loss, logits, gpooled, gw, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(pypaper, CPU, m) {
  m.impl("local_ff_linear", &ff_linear_cpu);
  m.impl("local_ff_sf_linear", &ff_sf_linear_cpu);
  m.impl("local_ff_sf_linear_out", &ff_sf_linear_out_cpu);
  m.impl("local_tp_linear", &tp_linear_cpu);
  m.impl("local_ff_linear_out", &ff_linear_out_cpu);
  m.impl("local_tp_linear_out", &tp_linear_out_cpu);
  m.impl("local_head", &local_head_cpu);
}

}  // namespace local
}  // namespace pypaper
