// Memory-bandwidth floor of a streaming kernel on this CPU: what the hardware gives a loop that
// moves the same streams as a kernel, with nothing to compute. Each pattern runs on buffers made
// cold first (a 512 MiB buffer written in between, twice the L3 of the machines here), on all
// OpenMP threads; stores are non-temporal (no read for ownership), as the LIF kernels' stores of
// big outputs are. Two access orders: linear (each thread one contiguous half) and the LIF
// kernels' own (chunks of 128 neurons, each walking its T rows N floats apart). Prints one line
// per pattern and order:   name \t order \t bytes_moved \t median_ms \t GB/s
// Built and run by bench/membw.py (python -m bench.membw); torch-free on purpose.
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace {

constexpr size_t kSteps = 32;       // T of the bench's LIF case
constexpr size_t kChunk = 128;      // kernels/cpu/snn_cpu.h: kLifChunk
constexpr size_t kAhead = 2;        // kernels/cpu/snn_cpu.h: kLifPrefetchSteps

float* buffer(size_t floats) {
  void* p = nullptr;
  if (posix_memalign(&p, size_t{2} << 20, floats * 4) != 0) std::abort();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  madvise(p, floats * 4, MADV_HUGEPAGE);  // as pypaper's block cache does for its blocks
#endif
  std::memset(p, 0, floats * 4);
  return static_cast<float*>(p);
}

// One pass over [lo, hi): read a (and b), write the sum to dst (and dst2) non-temporally, or,
// without outputs, fold the reads into acc (four vector accumulators: the adds never limit it).
struct Streams {
  const float* a;
  const float* b;
  float* dst;
  float* dst2;
};

#if defined(__AVX__)
inline void pass(const Streams& s, size_t lo, size_t hi, __m256 acc[4]) {
  if (s.dst == nullptr) {
    for (size_t i = lo; i < hi; i += 32) {
      for (int k = 0; k < 4; ++k) {
        acc[k] = _mm256_add_ps(acc[k], _mm256_load_ps(s.a + i + 8 * k));
        if (s.b) acc[k] = _mm256_add_ps(acc[k], _mm256_load_ps(s.b + i + 8 * k));
      }
    }
    return;
  }
  for (size_t i = lo; i < hi; i += 8) {
    __m256 v = s.a ? _mm256_load_ps(s.a + i) : _mm256_set1_ps(1.f);
    if (s.b) v = _mm256_add_ps(v, _mm256_load_ps(s.b + i));
    _mm256_stream_ps(s.dst + i, v);
    if (s.dst2) _mm256_stream_ps(s.dst2 + i, v);
  }
}
#endif

float run(const Streams& s, size_t n, bool lif_order, bool reverse) {
  float total = 0;
#pragma omp parallel reduction(+ : total)
  {
#if defined(__AVX__)
    const int id = omp_get_thread_num(), nt = omp_get_num_threads();
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                     _mm256_setzero_ps()};
    if (!lif_order) {
      const size_t lo = n / 32 * id / nt * 32, hi = n / 32 * (id + 1) / nt * 32;
      pass(s, lo, hi, acc);
    } else {
      const size_t neurons = n / kSteps, chunks = neurons / kChunk;
      const size_t c0 = chunks * id / nt, c1 = chunks * (id + 1) / nt;
      for (size_t c = c0; c < c1; ++c) {
        for (size_t k = 0; k < kSteps; ++k) {
          const size_t t = reverse ? kSteps - 1 - k : k;
          const size_t off = t * neurons + c * kChunk;
          if (k + kAhead < kSteps) {
            const size_t ahead = reverse ? off - kAhead * neurons : off + kAhead * neurons;
            for (size_t j = 0; j < kChunk; j += 16) {
              _mm_prefetch(reinterpret_cast<const char*>(s.a + ahead + j), _MM_HINT_T0);
              if (s.b) _mm_prefetch(reinterpret_cast<const char*>(s.b + ahead + j), _MM_HINT_T0);
            }
          }
          pass(s, off, off + kChunk, acc);
        }
      }
    }
    _mm_sfence();
    alignas(32) float out[8];
    _mm256_store_ps(out, _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]),
                                       _mm256_add_ps(acc[2], acc[3])));
    for (float v : out) total += v;
#else
    (void)s; (void)n; (void)lif_order; (void)reverse;
#endif
  }
  return total;
}

float g_sink;

}  // namespace

int main(int argc, char** argv) {
#if !defined(__AVX__)
  std::fprintf(stderr, "membw needs AVX (x86-64 with -march=native)\n");
  return 2;
#endif
  const size_t mib = argc > 1 ? std::strtoul(argv[1], nullptr, 10) : 32;  // per stream
  const int reps = argc > 2 ? std::atoi(argv[2]) : 11;
  const size_t n = ((mib << 18) / (kSteps * kChunk)) * kSteps * kChunk;  // floats per stream
  float *a = buffer(n), *b = buffer(n), *c = buffer(n), *d = buffer(n);
  const size_t nflush = size_t{512} << 18;
  float* flush = buffer(nflush);
  struct Pattern {
    const char* name;
    Streams s;
    bool reverse;  // the backward walks time backwards
  };
  const Pattern patterns[] = {
      {"read 1 stream", {a, nullptr, nullptr, nullptr}, false},
      {"read 2 streams", {a, b, nullptr, nullptr}, false},
      {"write 1 stream", {nullptr, nullptr, c, nullptr}, false},
      {"copy (1 read, 1 write)", {a, nullptr, c, nullptr}, false},
      {"1 read, 2 writes (LIF forward keeping H)", {a, nullptr, c, d}, false},
      {"2 reads, 1 write (LIF backward)", {a, b, c, nullptr}, true}};
  for (const Pattern& p : patterns) {
    const int streams = (p.s.a != nullptr) + (p.s.b != nullptr) + (p.s.dst != nullptr) +
                        (p.s.dst2 != nullptr);
    for (int order = 0; order < 2; ++order) {
      if (order == 1 && p.s.a == nullptr) continue;  // nothing to prefetch: same as linear
      std::vector<double> ms;
      for (int r = 0; r < reps + 1; ++r) {
#pragma omp parallel for
        for (size_t i = 0; i < nflush; i += 16) flush[i] += 1.f;
        const double t0 = omp_get_wtime();
        g_sink += run(p.s, n, order == 1, p.reverse);
        if (r > 0) ms.push_back((omp_get_wtime() - t0) * 1e3);  // the first is a warm-up
      }
      std::sort(ms.begin(), ms.end());
      const double med = ms[ms.size() / 2];
      const double bytes = double(n) * 4 * streams;
      std::printf("%s\t%s\t%.0f\t%.4f\t%.2f\n", p.name, order ? "lif" : "linear", bytes, med,
                  bytes / med / 1e6);
    }
  }
  return g_sink == 12345.f ? 1 : 0;
}
