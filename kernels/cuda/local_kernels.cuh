// Launchers of pypaper.local's CUDA kernels (kernels/cuda/local_kernels.cu), torch-free.
//
// The fused local-loss layers: the GEMMs (z = x W^T, dW = dZ^T x) are cuBLAS's, done by the glue
// (csrc/local/local_cuda.cpp); these kernels are everything between them, one thread block per
// output row, with the math of kernels/common/local_math.h (shared with the CPU loops).
//
// Matrices are row-major contiguous. "Math type": float for fp32 / fp16 / bf16 storage, double
// for fp64; row_loss, db, proj, pooled and logits are in the math type. db is accumulated with
// atomic adds (zero it first). Launchers enqueue on `stream`, return the launch status
// (cudaSuccess without a launch for empty work) and never synchronize.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "quant_kernels.cuh"  // FloatType

namespace pypaper {
namespace gpu {

// Forward-Forward epilogue: z [n, m] (the GEMM's x W^T) is overwritten by h = ReLU(inv_r z + b)
// with inv_r = 1 / (||x_r|| + eps) (1 when !normalize; x [n, d]); row_loss[r] = w_r
// softplus(s_r (theta - g_r)), g = sum h^2, rows r < num_pos positive (s = 1, w = 1/num_pos),
// the rest negative (s = -1, w = 1/(n - num_pos)); dz = inv_r w_r 2 h dloss/dg; db += w_r 2 h
// dloss/dg (bias may be nullptr, then db is not touched).
cudaError_t launch_local_ff_rows(FloatType type, void* z, const void* x, const void* bias,
                                 void* dz, void* row_loss, void* db, int64_t n, int64_t m,
                                 int64_t d, int64_t num_pos, double theta, double eps,
                                 bool normalize, cudaStream_t stream);

// tpSGD epilogue: z [n, m] is overwritten by h = act(z + b) (act 0 sigmoid, 1 tanh, 2 relu);
// t = proj[y_r] [m] (sign: its sign); row_loss[r] = ||h - t||^2 / (2n); dz = (h - t) act' / n;
// db += dz.
cudaError_t launch_local_tp_rows(FloatType type, void* z, const void* bias, const void* proj,
                                 const int64_t* y, void* dz, void* row_loss, void* db, int64_t n,
                                 int64_t m, int activation, bool sign, cudaStream_t stream);

// Single-forward FF epilogue (ForwardGNN's SF) of the n data rows: z [n, m] is overwritten by
// h = ReLU(inv_r z + b) (inv_r as FF's); logits_rc = inv_temp h_r . emb_c with emb [k, m] the class
// embeddings (math type); row_loss[r] = (logsumexp - logit_y) / n; dlogits [n, k] (math type) =
// inv_temp (softmax - onehot(y)) / n; dz = inv_r 1[h > 0] dlogits_r emb; db += 1[h > 0] dlogits_r emb.
// k <= kSfMaxClasses (the logits live in shared memory), else cudaErrorInvalidValue.
constexpr int64_t kSfMaxClasses = 4096;
cudaError_t launch_local_sf_rows(FloatType type, void* z, const void* x, const void* bias,
                                 const void* emb, const int64_t* y, void* dz, void* dlogits,
                                 void* row_loss, void* db, int64_t n, int64_t m, int64_t d,
                                 int64_t k, double eps, double inv_temp, bool normalize,
                                 cudaStream_t stream);

// pooled[r, c] = mean over the s positions of feat[r, c, :] (feat [n, c, s]).
cudaError_t launch_local_pool(FloatType type, const void* feat, void* pooled, int64_t n,
                              int64_t c, int64_t s, cudaStream_t stream);

// Softmax cross-entropy rows of logits [n, k] (math type; f64 selects double): row_loss[r] =
// (logsumexp - logit_y) / n, dlogits = (softmax - onehot(y)) / n.
cudaError_t launch_local_ce_rows(bool f64, const void* logits, const int64_t* y, void* dlogits,
                                 void* row_loss, int64_t n, int64_t k, cudaStream_t stream);

}  // namespace gpu
}  // namespace pypaper
