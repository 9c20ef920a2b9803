// Arithmetic against memory: the fused LIF CPU loops (kernels/cpu/snn_cpu.h) timed on their own,
// without torch, once with their data in cache and once cold from DRAM.
//
// bench.membw gives the memory floor of the LIF op (the streams it moves, nothing computed); this
// gives the other limit, the loops' own arithmetic: the same loops on a shape whose tensors fit
// in L2 (T = 32, 1024 neurons per thread: 128 KiB per [T, N] tensor), repeated. Where the cold
// time is close to the in-cache time, the loops are bound by their arithmetic on this CPU; where
// it is close to membw's floor, by memory. Both backward modes the op can run are timed:
//   rerun:  the forward keeps nothing, the backward reruns it from x per chunk (the CPU op's mode;
//           20 bytes per neuron-step for forward + backward)
//   keep_h: the forward writes H, the backward reads it (the GPU ops' mode; 24 bytes)
// The case is the bench's: fp32, tau = 2, hard reset to 0, decay_input, ATan(alpha = 2) (or
// surrogate id SURROGATE of kernels/common/snn_math.h with ALPHA), no parameter gradients.
// Threads take contiguous ranges of chunks, as at::parallel_for hands them.
//
// Usage: lif_loops STEPS COLD_NEURONS REPS [SURROGATE ALPHA]; prints one line per mode and case:
//   mode \t case \t threads \t neurons \t fwd_ms \t bwd_ms
// Built and run by bench/lif_loops.py (python -m bench.lif_loops).
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "../../kernels/cpu/snn_cpu.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace {

using pypaper::cpu::LifBackwardArgs;
using pypaper::cpu::LifForwardArgs;

constexpr size_t kHuge = size_t{2} << 20;
constexpr int64_t kHotNeuronsPerThread = 1024;
constexpr size_t kFlushBytes = size_t{256} << 20;  // written between cold repeats

float* alloc_floats(size_t n) {
  const size_t bytes = (n * sizeof(float) + kHuge - 1) / kHuge * kHuge;
  auto* p = static_cast<float*>(std::aligned_alloc(kHuge, bytes));
  if (p == nullptr) {
    std::fprintf(stderr, "out of memory\n");
    std::exit(1);
  }
#if defined(__linux__)
  madvise(p, bytes, MADV_HUGEPAGE);  // as pypaper's block cache does for the op's outputs
#endif
  return p;
}

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

struct Buffers {
  int64_t steps, neurons;
  std::vector<float*> owned;
  float *x, *s, *h, *gs, *gx, *v_last, *gv_init;
  Buffers(int64_t t, int64_t n) : steps(t), neurons(n) {
    const size_t m = static_cast<size_t>(t * n);
    x = take(m), s = take(m), h = take(m), gs = take(m), gx = take(m);
    v_last = take(n), gv_init = take(n);
    // x around the threshold (about a third of the neurons fire per step), gs in [-0.5, 0.5)
    for (size_t i = 0; i < m; ++i) {
      x[i] = 0.6f + static_cast<float>((i * 2654435761u) % 1000u) / 500.0f - 1.0f;
      gs[i] = static_cast<float>((i * 40503u) % 1000u) / 1000.0f - 0.5f;
      s[i] = h[i] = gx[i] = 0.0f;
    }
  }
  float* take(size_t n) {
    owned.push_back(alloc_floats(n));
    return owned.back();
  }
  ~Buffers() {
    for (float* p : owned) std::free(p);
  }
};

struct Timing {
  double fwd_ms, bwd_ms;
};

Timing run(Buffers& b, bool keep_h, int threads, int reps, char* flush, int32_t surrogate,
           float alpha) {
  static const float k = 0.5f, tau = 2.0f, vth = 1.0f;
  const int64_t m = b.steps * b.neurons;
  const bool stream = m * static_cast<int64_t>(sizeof(float)) >= pypaper::cpu::kStreamBytes;
  LifForwardArgs<float, float> fa{};
  fa.x = b.x;
  fa.decay = &k;  // tau = 2 is a power of two: the op charges with k = 1/tau
  fa.decay_period = 1;
  fa.vth = &vth;
  fa.vth_period = 1;
  fa.spikes = b.s;
  fa.h_seq = keep_h ? b.h : nullptr;
  fa.v_last = b.v_last;
  fa.steps = b.steps;
  fa.neurons = b.neurons;
  fa.decay_input = true;
  fa.hard = true;
  fa.stream = stream;
  fa.prefetch_nta = pypaper::cpu::lif_prefetch_nta_default();
  LifBackwardArgs<float, float> ba{};
  ba.grad_spikes = b.gs;
  ba.h_seq = keep_h ? b.h : nullptr;
  ba.x_seq = keep_h ? nullptr : b.x;
  ba.charge_decay = &k;
  ba.decay = &tau;
  ba.decay_period = 1;
  ba.vth = &vth;
  ba.vth_period = 1;
  ba.grad_x = b.gx;
  ba.grad_v_init = b.gv_init;
  ba.steps = b.steps;
  ba.neurons = b.neurons;
  ba.alpha = alpha;
  ba.surrogate = surrogate;
  ba.decay_input = true;
  ba.div = true;
  ba.hard = true;
  ba.stream = stream;
  ba.prefetch_nta = pypaper::cpu::lif_prefetch_nta_default();
  const int64_t chunks = pypaper::cpu::lif_num_chunks(b.neurons);
  auto parallel = [&](auto&& body) {
#pragma omp parallel num_threads(threads)
    {
      const int64_t id = omp_get_thread_num(), n = omp_get_num_threads();
      body(chunks * id / n, chunks * (id + 1) / n);
    }
  };
  auto sweep = [&] {
    if (flush == nullptr) return;
#pragma omp parallel for num_threads(threads)
    for (int64_t i = 0; i < static_cast<int64_t>(kFlushBytes); i += 64) flush[i] += 1;
  };
  std::vector<double> f, g;
  for (int r = -1; r < reps; ++r) {  // r = -1: warm-up
    sweep();
    const double t0 = now_s();
    parallel([&](int64_t c0, int64_t c1) { pypaper::cpu::lif_forward(fa, c0, c1); });
    const double t1 = now_s();
    sweep();
    const double t2 = now_s();
    parallel([&](int64_t c0, int64_t c1) { pypaper::cpu::lif_backward(ba, c0, c1); });
    const double t3 = now_s();
    if (r >= 0) f.push_back(t1 - t0), g.push_back(t3 - t2);
  }
  std::sort(f.begin(), f.end());
  std::sort(g.begin(), g.end());
  return {f[f.size() / 2] * 1e3, g[g.size() / 2] * 1e3};
}

}  // namespace

int main(int argc, char** argv) {
  const int64_t steps = argc > 1 ? std::atol(argv[1]) : 32;
  const int64_t cold_neurons = argc > 2 ? std::atol(argv[2]) : (int64_t{1} << 18);
  const int reps = argc > 3 ? std::max(1, std::atoi(argv[3])) : 11;
  const int32_t surrogate = argc > 4 ? std::atoi(argv[4]) : 1;
  const float alpha = argc > 5 ? std::strtof(argv[5], nullptr) : 2.0f;
  if (!pypaper::snn::valid_surrogate(surrogate) || !(alpha > 0.0f)) {
    std::fprintf(stderr, "unknown surrogate id %d or alpha %g not positive\n", surrogate, alpha);
    return 2;
  }
  const int threads = omp_get_max_threads();
  auto* flush = reinterpret_cast<char*>(alloc_floats(kFlushBytes / sizeof(float)));
  for (size_t i = 0; i < kFlushBytes; ++i) flush[i] = static_cast<char>(i);
  struct Case {
    const char* name;
    int threads;
    int64_t neurons;
    bool cold;
    int reps;
  };
  // In cache: ~1 ms of work per repeat, so timer and thread wake-up stay small.
  const int hot_reps = std::max(reps, static_cast<int>(200 * 32 / std::max<int64_t>(steps, 1)));
  const Case cases[] = {
      {"in cache", 1, kHotNeuronsPerThread, false, hot_reps},
      {"in cache", threads, kHotNeuronsPerThread * threads, false, hot_reps},
      {"cold", threads, cold_neurons, true, reps},
  };
  for (const bool keep_h : {false, true}) {
    for (const Case& c : cases) {
      Buffers b(steps, c.neurons);
      const Timing t = run(b, keep_h, c.threads, c.reps, c.cold ? flush : nullptr, surrogate,
                             alpha);
      std::printf("%s\t%s\t%d\t%lld\t%.4f\t%.4f\n", keep_h ? "keep_h" : "rerun", c.name,
                  c.threads, static_cast<long long>(c.neurons), t.fwd_ms, t.bwd_ms);
      std::fflush(stdout);
    }
  }
  std::free(flush);
  return 0;
}
