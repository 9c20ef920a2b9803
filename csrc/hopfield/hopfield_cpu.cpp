// CPU implementation of the fused modern-Hopfield retrieval (schemas in csrc/schemas.cpp): the
// per-head update loop with its in-op convergence check, driving the tile loops of
// kernels/cpu/hopfield_cpu.h under at::parallel_for.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "../../kernels/cpu/hopfield_cpu.h"
#include "hopfield_args.h"

namespace pypaper {
namespace hopfield {
namespace {

constexpr int64_t kMaxUnboundedSteps = 100000;

at::ScalarType math_type(at::ScalarType st) {
  return st == at::kDouble ? at::kDouble : at::kFloat;
}

template <typename T>
cpu::Masks<T> make_masks(const at::Tensor& attn, const at::Tensor& pad, int64_t heads) {
  cpu::Masks<T> m;
  m.heads = heads;
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

at::Tensor mask_in(const c10::optional<at::Tensor>& m, at::ScalarType mt) {
  return m.has_value() ? m->to(mt).contiguous() : at::Tensor();
}

// Tasks per thread chunk so that each chunk has at least ~256K multiply-adds: small problems
// run on the calling thread (a parallel region costs more than they do, and much more on a
// loaded machine).
int64_t grain_for(int64_t work_per_task) {
  return std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(work_per_task, 1));
}

// A forward pass task: head-batch bh, rows [r0, r0 + rows).
struct Task {
  int64_t bh, r0, rows;
};

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> retrieve_impl(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const std::vector<double>& beta, const std::vector<int64_t>& steps,
    const std::vector<double>& eps, const at::Tensor& attn, const at::Tensor& pad) {
  const int64_t B = q_in.size(0), H = q_in.size(1), L = q_in.size(2), d = q_in.size(3);
  const int64_t S = k_in.size(2), dv = v_in.size(3), BH = B * H;
  const auto mt = math_type(q_in.scalar_type());
  const at::Tensor q = q_in.to(mt).contiguous();
  const at::Tensor k = k_in.to(mt).contiguous();
  const at::Tensor v = v_in.to(mt).contiguous();
  const auto opts = q.options();
  const cpu::Masks<T> masks = make_masks<T>(attn, pad, H);
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();

  bool unbounded = false;
  int64_t max_steps = 0;
  for (int64_t s : steps) {
    unbounded |= s < 0;
    max_steps = std::max(max_steps, s);
  }
  at::Tensor out = at::empty({B, H, L, dv}, opts);
  T* outp = out.data_ptr<T>();
  std::vector<at::Tensor> states;  // states[n] holds xi_{n+1}, [B, H, L, d]
  std::vector<at::Tensor> lses;    // lses[n] holds the row lse of P_n, [B, H, L]
  auto state_ptr = [&](int64_t n) -> const T* {  // xi_n
    return n == 0 ? qp : states[n - 1].template data_ptr<T>();
  };

  // ||K_bh||_F for the cheap convergence test (computed at the first check).
  std::vector<double> knorm;
  auto ensure_knorm = [&]() {
    if (!knorm.empty()) return;
    knorm.assign(BH, 0.0);
    at::parallel_for(0, BH, grain_for(S * d), [&](int64_t b0, int64_t b1) {
      for (int64_t bh = b0; bh < b1; ++bh) knorm[bh] = std::sqrt(cpu::sum_sq_diff<T>(kp + bh * S * d, nullptr, S * d));
    });
  };

  enum Status { kRunning, kFinalize, kDone };
  std::vector<int> status(H, kRunning);
  std::vector<int64_t> final_step(H, 0);
  const int64_t lt = std::min<int64_t>(cpu::kLTile, std::max<int64_t>(L, 1));
  const int64_t tiles = L == 0 ? 0 : (L + lt - 1) / lt;
  at::Tensor scratch_lse = at::empty({B, H, L}, opts);
  // Finite limits: one allocation of every slot up front (views are handed out per step).
  at::Tensor states_all, lse_all;
  if (!unbounded) {
    // Uninitialised: every slot a head writes is written whole (all b, all rows); the slots it
    // never reaches are set after the loop (zero states, -inf lse).
    states_all = at::empty({max_steps, B, H, L, d}, opts);
    lse_all = at::empty({max_steps + 1, B, H, L}, opts);
  }
  std::vector<int64_t> states_written(H, 0), lse_written(H, 0);  // slots [0, count) per head

  for (int64_t n = 0;; ++n) {
    bool any = false;
    for (int64_t h = 0; h < H; ++h) any |= status[h] != kDone;
    if (!any) break;
    TORCH_CHECK(n <= kMaxUnboundedSteps, "hopfield_retrieve: no convergence after ",
                kMaxUnboundedSteps, " update steps (steps=-1); raise eps or bound the steps");
    // What each head does in this pass: 1 an update (W = K, writes xi_{n+1} and lse_n),
    // 2 its output from xi_n (W = V, the step limit is reached), 3 its output from the state it
    // converged at (xi_{final}, W = V; that lse is already stored).
    std::vector<int> role(H, 0);
    bool any_update = false;
    for (int64_t h = 0; h < H; ++h) {
      if (status[h] == kFinalize) {
        role[h] = 3;
      } else if (status[h] == kRunning) {
        role[h] = (steps[h] >= 0 && n >= steps[h]) ? 2 : 1;
      }
      any_update |= role[h] == 1;
    }
    if (any_update) {
      states.push_back(unbounded ? at::zeros({B, H, L, d}, opts)
                                 : states_all.select(0, static_cast<int64_t>(states.size())));
    }
    if (static_cast<int64_t>(lses.size()) == n) {
      lses.push_back(unbounded
                         ? at::full({B, H, L}, -std::numeric_limits<double>::infinity(), opts)
                         : lse_all.select(0, n));
    }
    T* next = any_update ? states.back().template data_ptr<T>() : nullptr;
    T* lse_n = lses[n].template data_ptr<T>();
    T* lse_scratch = scratch_lse.data_ptr<T>();
    std::vector<Task> tasks;
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t h = 0; h < H; ++h) {
        if (role[h] == 0) continue;
        for (int64_t t = 0; t < tiles; ++t) {
          tasks.push_back({b * H + h, t * lt, std::min(lt, L - t * lt)});
        }
      }
    }
    at::parallel_for(0, static_cast<int64_t>(tasks.size()), grain_for(lt * S * (d + std::max(d, dv))),
                     [&](int64_t t0, int64_t t1) {
      const cpu::SequentialBlas sequential_blas;
      std::vector<T> ws;
      for (int64_t t = t0; t < t1; ++t) {
        const Task& tk = tasks[t];
        const int64_t h = tk.bh % H;
        const int r = role[h];
        const int64_t src = r == 3 ? final_step[h] : n;
        const T* xi = state_ptr(src) + (tk.bh * L + tk.r0) * d;
        const T* w = r == 1 ? kp + tk.bh * S * d : vp + tk.bh * S * dv;
        const int64_t dw = r == 1 ? d : dv;
        T* dst = r == 1 ? next + (tk.bh * L + tk.r0) * d : outp + (tk.bh * L + tk.r0) * dv;
        T* lse = (r == 3 ? lse_scratch : lse_n) + tk.bh * L + tk.r0;
        cpu::retrieve_tile<T>(xi, kp + tk.bh * S * d, w, S, d, dw, static_cast<T>(beta[h]),
                              masks, tk.bh, tk.r0, tk.rows, dst, lse, ws);
      }
    });
    for (int64_t h = 0; h < H; ++h) {
      if (role[h] == 1) states_written[h] = static_cast<int64_t>(states.size());
      if (role[h] == 1 || role[h] == 2) lse_written[h] = n + 1;
    }
    for (int64_t h = 0; h < H; ++h) {
      if (role[h] == 3) {
        status[h] = kDone;
      } else if (role[h] == 2) {
        status[h] = kDone;
        final_step[h] = n;
      }
    }
    // The convergence check of the heads that updated (from the second update on): hflayers
    // stops a head once max over the batch of ||P_n - P_{n-1}||_F <= eps.
    if (n == 0) continue;
    std::vector<int64_t> undecided;
    std::vector<int64_t> upd;
    for (int64_t h = 0; h < H; ++h) {
      if (role[h] == 1) upd.push_back(h);
    }
    if (!upd.empty()) {
      ensure_knorm();
      // ||xi_{n+1} - xi_n||_F per (b, updating head), in parallel.
      std::vector<double> change(BH, 0.0);
      const T* prev = state_ptr(n);
      at::parallel_for(0, BH, grain_for(L * d), [&](int64_t b0, int64_t b1) {
        for (int64_t bh = b0; bh < b1; ++bh) {
          if (role[bh % H] != 1) continue;
          change[bh] = std::sqrt(cpu::sum_sq_diff<T>(next + bh * L * d, prev + bh * L * d, L * d));
        }
      });
      for (int64_t h : upd) {
        // A NaN anywhere in the batch (a fully masked row: softmax of all -inf) makes hflayers'
        // max over the batch NaN, and NaN > eps is false: the head stops for every item. So a
        // NaN change is never skipped by an earlier "surely active" item: it goes to the exact
        // pass, which decides with the NaN.
        bool active = false, nan = false;
        for (int64_t b = 0; b < B && !nan; ++b) {
          const double c = change[b * H + h];
          nan = std::isnan(c);
          active = active || surely_active<T>(c, knorm[b * H + h], eps[h]);
        }
        if (!active || nan) undecided.push_back(h);
      }
    }
    if (undecided.empty()) continue;
    std::vector<Task> dtasks;
    for (int64_t h : undecided) {
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t t = 0; t < tiles; ++t) {
          dtasks.push_back({b * H + h, t * lt, std::min(lt, L - t * lt)});
        }
      }
    }
    std::vector<double> dsq(dtasks.size(), 0.0);
    const T* lse_prev = lses[n - 1].template data_ptr<T>();
    at::parallel_for(0, static_cast<int64_t>(dtasks.size()), grain_for(2 * lt * S * d),
                     [&](int64_t t0, int64_t t1) {
      const cpu::SequentialBlas sequential_blas;
      std::vector<T> ws;
      for (int64_t t = t0; t < t1; ++t) {
        const Task& tk = dtasks[t];
        const int64_t h = tk.bh % H;
        const int64_t off = tk.bh * L + tk.r0;
        dsq[t] = cpu::diff_sq_tile<T>(state_ptr(n) + off * d, lse_n + off,
                                      state_ptr(n - 1) + off * d, lse_prev + off,
                                      kp + tk.bh * S * d, S, d, static_cast<T>(beta[h]), masks,
                                      tk.bh, tk.r0, tk.rows, ws);
      }
    });
    std::vector<double> per_bh(BH, 0.0);
    for (size_t t = 0; t < dtasks.size(); ++t) per_bh[dtasks[t].bh] += dsq[t];
    for (int64_t h : undecided) {
      // max over the batch with NaN propagating, as torch's max in hflayers (std::max would
      // drop a NaN and keep the head running on the other items)
      double mx = 0;
      for (int64_t b = 0; b < B && !std::isnan(mx); ++b) {
        const double c = std::sqrt(per_bh[b * H + h]);
        mx = (std::isnan(c) || c > mx) ? c : mx;
      }
      if (!(mx > eps[h])) {
        status[h] = kFinalize;
        final_step[h] = n;
      }
    }
  }

  // Saved for the backward: xi_1..xi_Nmax and lse_0..lse_Nmax. With finite step limits the
  // leading sizes are fixed by them (max(steps) and max(steps) + 1: the fake kernel's shapes);
  // slots a converged head never reached stay zero (states) / -inf (lse).
  at::Tensor states_t, lse_t;
  if (unbounded) {
    states_t = states.empty() ? at::empty({0, B, H, L, d}, opts) : at::stack(states, 0);
    lse_t = at::stack(lses, 0);
  } else {
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t n = states_written[h]; n < max_steps; ++n) {
        states_all.select(0, n).select(1, h).zero_();
      }
      for (int64_t n = lse_written[h]; n <= max_steps; ++n) {
        lse_all.select(0, n).select(1, h).fill_(-std::numeric_limits<double>::infinity());
      }
    }
    states_t = states_all;
    lse_t = lse_all;
  }
  at::Tensor nsteps = at::empty({H}, opts.dtype(at::kLong));
  for (int64_t h = 0; h < H; ++h) nsteps.data_ptr<int64_t>()[h] = final_step[h];
  return {out.to(q_in.scalar_type()), states_t, lse_t, nsteps};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> hopfield_retrieve_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, c10::ArrayRef<double> beta_in,
    c10::IntArrayRef steps_in, c10::ArrayRef<double> eps_in,
    const c10::optional<at::Tensor>& attn_mask, const c10::optional<at::Tensor>& pad_mask) {
  check_qkv(q, k, v);
  const int64_t H = q.size(1);
  const auto beta = per_head(beta_in, H, "beta");
  const auto eps = per_head(eps_in, H, "eps");
  const auto steps = per_head_steps(steps_in, H);
  check_beta_eps(beta, eps);
  check_masks(attn_mask, pad_mask, q, k);
  const auto mt = math_type(q.scalar_type());
  const at::Tensor attn = mask_in(attn_mask, mt), pad = mask_in(pad_mask, mt);
  if (mt == at::kDouble) return retrieve_impl<double>(q, k, v, beta, steps, eps, attn, pad);
  return retrieve_impl<float>(q, k, v, beta, steps, eps, attn, pad);
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_impl(
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
  const at::Tensor states = states_in.to(mt).contiguous(), lse = lse_in.to(mt).contiguous();
  const at::Tensor nsteps = nsteps_in.to(at::kLong).contiguous();
  const int64_t n_states = states.size(0), n_lse = lse.size(0);
  for (int64_t h = 0; h < H; ++h) {
    const int64_t nh = nsteps.data_ptr<int64_t>()[h];
    TORCH_CHECK(nh >= 0 && nh <= n_states && nh < n_lse, "nsteps[", h, "] = ", nh,
                " does not fit the saved states (", n_states, ") and lse (", n_lse, ")");
  }
  const auto opts = q.options();
  at::Tensor dq = at::empty({B, H, L, d}, opts);
  // Zeroed per head inside its task (in cache, right before the accumulation).
  at::Tensor dk = at::empty({B, H, S, d}, opts);
  at::Tensor dvt = at::empty({B, H, S, dv}, opts);
  const cpu::Masks<T> masks = make_masks<T>(attn, pad, H);
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const T* op = out.data_ptr<T>();
  const T* gp = go.data_ptr<T>();
  const T* sp = states.data_ptr<T>();
  const T* lp = lse.data_ptr<T>();
  const int64_t* np = nsteps.data_ptr<int64_t>();
  T* dqp = dq.data_ptr<T>();
  T* dkp = dk.data_ptr<T>();
  T* dvp = dvt.data_ptr<T>();
  const int64_t slab = BH * L * d;
  const int64_t bwd_work = (states_in.size(0) + 1) * L * S * (3 * d + 2 * dv);
  at::parallel_for(0, BH, grain_for(bwd_work), [&](int64_t b0, int64_t b1) {
    const cpu::SequentialBlas sequential_blas;
    std::vector<T> ws, ga(static_cast<size_t>(L * std::max(d, dv))), gb(ga.size()),
        delta(static_cast<size_t>(L));
    for (int64_t bh = b0; bh < b1; ++bh) {
      const int64_t h = bh % H;
      const int64_t N = np[h];
      const T bt = static_cast<T>(beta[h]);
      const T* kh = kp + bh * S * d;
      std::fill(dkp + bh * S * d, dkp + (bh + 1) * S * d, T(0));
      std::fill(dvp + bh * S * dv, dvp + (bh + 1) * S * dv, T(0));
      auto xi = [&](int64_t n) { return n == 0 ? qp + bh * L * d : sp + (n - 1) * slab + bh * L * d; };
      // The last step: out = P_N V.
      cpu::row_dots<T>(gp + bh * L * dv, op + bh * L * dv, L, dv, delta.data());
      T* g_cur = ga.data();
      cpu::backward_step<T>(xi(N), lp + N * BH * L + bh * L, kh, vp + bh * S * dv,
                            gp + bh * L * dv, delta.data(), L, S, d, dv, bt, masks, bh, g_cur,
                            dkp + bh * S * d, dvp + bh * S * dv, ws);
      // The updates: xi_{n+1} = P_n K, back to xi_0 = q.
      for (int64_t n = N - 1; n >= 0; --n) {
        T* g_next = g_cur == ga.data() ? gb.data() : ga.data();
        cpu::row_dots<T>(g_cur, xi(n + 1), L, d, delta.data());
        cpu::backward_step<T>(xi(n), lp + n * BH * L + bh * L, kh, kh, g_cur, delta.data(), L, S,
                              d, d, bt, masks, bh, g_next, dkp + bh * S * d, dkp + bh * S * d, ws);
        g_cur = g_next;
      }
      std::copy(g_cur, g_cur + L * d, dqp + bh * L * d);
    }
  });
  const auto st = q_in.scalar_type();
  return {dq.to(st), dk.to(st), dvt.to(st)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> hopfield_retrieve_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& states, const at::Tensor& lse,
    const at::Tensor& nsteps, c10::ArrayRef<double> beta_in,
    const c10::optional<at::Tensor>& attn_mask, const c10::optional<at::Tensor>& pad_mask) {
  check_qkv(q, k, v);
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), d = q.size(3), dv = v.size(3);
  TORCH_CHECK(grad_out.sizes() == out.sizes() && out.dim() == 4 && out.size(0) == B &&
                  out.size(1) == H && out.size(2) == L && out.size(3) == dv,
              "grad_out and out must have shape [B, H, L, dv]");
  TORCH_CHECK(states.dim() == 5 && states.size(1) == B && states.size(2) == H &&
                  states.size(3) == L && states.size(4) == d,
              "states must have shape [n, B, H, L, d], got ", states.sizes());
  TORCH_CHECK(lse.dim() == 4 && lse.size(1) == B && lse.size(2) == H && lse.size(3) == L &&
                  lse.size(0) >= 1,
              "lse must have shape [n + 1, B, H, L], got ", lse.sizes());
  TORCH_CHECK(nsteps.dim() == 1 && nsteps.size(0) == H, "nsteps must have shape [H]");
  const auto beta = per_head(beta_in, H, "beta");
  check_beta_eps(beta, {});
  check_masks(attn_mask, pad_mask, q, k);
  const auto mt = math_type(q.scalar_type());
  const at::Tensor attn = mask_in(attn_mask, mt), pad = mask_in(pad_mask, mt);
  if (mt == at::kDouble) {
    return backward_impl<double>(grad_out, q, k, v, out, states, lse, nsteps, beta, attn, pad);
  }
  return backward_impl<float>(grad_out, q, k, v, out, states, lse, nsteps, beta, attn, pad);
}

}  // namespace

TORCH_LIBRARY_IMPL(pypaper, CPU, m) {
  m.impl("hopfield_retrieve", &hopfield_retrieve_cpu);
  m.impl("hopfield_retrieve_backward", &hopfield_retrieve_backward_cpu);
}

}  // namespace hopfield
}  // namespace pypaper
