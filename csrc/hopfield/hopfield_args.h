// Argument checks of the hopfield ops, shared by the CPU and CUDA implementations. The Python
// wrapper (pypaper/hopfield/ops.py) checks first with friendlier messages; these keep a direct
// torch.ops.pypaper.hopfield_* call from crashing or answering wrong.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace pypaper {
namespace hopfield {

inline bool is_float_type(at::ScalarType st) {
  return st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16;
}

// q [B, H, L, d], k [B, H, S, d], v [B, H, S, dv], one float dtype, one device.
inline void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(is_float_type(q.scalar_type()),
              "q must be a float32, float64, float16 or bfloat16 tensor, got ", q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "k and v must have q's dtype ", q.scalar_type(), ", got ", k.scalar_type(), " and ",
              v.scalar_type());
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(),
              "q, k and v must be on one device");
  TORCH_CHECK(q.dim() == 4, "q must have shape [B, H, L, d], got ", q.sizes());
  TORCH_CHECK(k.dim() == 4, "k must have shape [B, H, S, d], got ", k.sizes());
  TORCH_CHECK(v.dim() == 4, "v must have shape [B, H, S, dv], got ", v.sizes());
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && v.size(0) == q.size(0) &&
                  v.size(1) == q.size(1),
              "q, k and v must share batch and head dims, got ", q.sizes(), ", ", k.sizes(), ", ",
              v.sizes());
  TORCH_CHECK(k.size(3) == q.size(3), "k's pattern size ", k.size(3), " must equal q's ",
              q.size(3));
  TORCH_CHECK(v.size(2) == k.size(2), "v must have one row per stored pattern (k.shape[2] = ",
              k.size(2), "), got ", v.size(2));
}

// One value per head (or one for all heads), as a vector of length H.
inline std::vector<double> per_head(c10::ArrayRef<double> a, int64_t heads, const char* name) {
  TORCH_CHECK(a.size() == 1 || static_cast<int64_t>(a.size()) == heads, name,
              " must hold one value or one per head (", heads, "), got ", a.size());
  std::vector<double> out(heads);
  for (int64_t h = 0; h < heads; ++h) out[h] = a.size() == 1 ? a[0] : a[h];
  return out;
}

inline std::vector<int64_t> per_head_steps(c10::IntArrayRef a, int64_t heads) {
  TORCH_CHECK(a.size() == 1 || static_cast<int64_t>(a.size()) == heads,
              "steps must hold one value or one per head (", heads, "), got ", a.size());
  std::vector<int64_t> out(heads);
  for (int64_t h = 0; h < heads; ++h) {
    out[h] = a.size() == 1 ? a[0] : a[h];
    TORCH_CHECK(out[h] >= -1, "steps must be >= 0 (or -1: until converged), got ", out[h]);
  }
  return out;
}

inline void check_beta_eps(const std::vector<double>& beta, const std::vector<double>& eps) {
  for (double b : beta) {
    TORCH_CHECK(std::isfinite(b) && b > 0, "beta must be positive and finite, got ", b);
  }
  for (double e : eps) {
    TORCH_CHECK(std::isfinite(e) && e >= 0, "eps must be finite and >= 0, got ", e);
  }
}

// attn_mask: 4 dims, each 1 or the full size of [B, H, L, S], a float dtype (additive).
// pad_mask: [B or 1, S], a float dtype (additive).
inline void check_masks(const c10::optional<at::Tensor>& attn, const c10::optional<at::Tensor>& pad,
                        const at::Tensor& q, const at::Tensor& k) {
  const int64_t full[4] = {q.size(0), q.size(1), q.size(2), k.size(2)};
  if (attn.has_value()) {
    TORCH_CHECK(attn->device() == q.device(), "attn_mask must be on q's device");
    TORCH_CHECK(is_float_type(attn->scalar_type()),
                "attn_mask must be an additive float tensor here (the Python wrapper converts "
                "bool masks), got ", attn->scalar_type());
    TORCH_CHECK(attn->dim() == 4, "attn_mask must have 4 dims [B|1, H|1, L|1, S|1], got ",
                attn->sizes());
    for (int i = 0; i < 4; ++i) {
      TORCH_CHECK(attn->size(i) == 1 || attn->size(i) == full[i], "attn_mask has shape ",
                  attn->sizes(), ", not broadcastable to [B, H, L, S] = [", full[0], ", ",
                  full[1], ", ", full[2], ", ", full[3], "]");
    }
  }
  if (pad.has_value()) {
    TORCH_CHECK(pad->device() == q.device(), "pad_mask must be on q's device");
    TORCH_CHECK(is_float_type(pad->scalar_type()),
                "pad_mask must be an additive float tensor here, got ", pad->scalar_type());
    TORCH_CHECK(pad->dim() == 2 && (pad->size(0) == 1 || pad->size(0) == full[0]) &&
                    pad->size(1) == full[3],
                "pad_mask must have shape [B, S] = [", full[0], ", ", full[3], "], got ",
                pad->sizes());
  }
}

}  // namespace hopfield
}  // namespace pypaper
