// pypaper's block cache (what and why: block_cache.h).
#include "block_cache.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/Storage.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>

#if defined(__linux__)
#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace pypaper {
namespace {

constexpr size_t kMinBytes = size_t{1} << 20;  // below: torch's allocator (malloc's heap reuses)
constexpr size_t kAlign = size_t{2} << 20;     // a huge page

size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

int64_t default_limit() {
  if (const char* env = std::getenv("PYPAPER_CPU_CACHE_MB")) {
    char* end = nullptr;
    const long long mb = std::strtoll(env, &end, 10);
    TORCH_CHECK(end != env && *end == '\0' && mb >= 0,
                "PYPAPER_CPU_CACHE_MB must be a whole number of MiB >= 0 (0 turns pypaper's block "
                "cache off), got '", env, "'");
    return static_cast<int64_t>(mb) << 20;
  }
  int64_t limit = int64_t{4} << 30;
#if defined(__linux__)
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  if (pages > 0 && page > 0) limit = std::min<int64_t>(limit, int64_t{pages} * page / 8);
#endif
  return limit;
}

// A block handed out: the DataPtr's context, so the deleter knows the size.
struct Block {
  void* ptr;
  size_t bytes;
};

class BlockCache final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    if (n < kMinBytes) return c10::GetDefaultCPUAllocator()->allocate(n);
    const size_t want = round_up(n, kAlign);
    void* p = nullptr;
    size_t bytes = want;
    {
      std::lock_guard<std::mutex> lock(mutex());
      // Best fit among the free blocks no more than 1/8 bigger than asked.
      auto it = free_.lower_bound(want);
      if (it != free_.end() && it->first <= want + want / 8) {
        bytes = it->first;
        p = it->second;
        free_.erase(it);
        cached_ -= bytes;
        ++hits_;
      } else {
        ++misses_;
      }
      live_ += bytes;
    }
    if (p == nullptr) p = fresh(bytes);
    report(p, static_cast<int64_t>(bytes));
    return {p, new Block{p, bytes}, &BlockCache::release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  BlockCacheInfo info() {
    std::lock_guard<std::mutex> lock(mutex());
    return {limit_, static_cast<int64_t>(cached_), static_cast<int64_t>(free_.size()),
            static_cast<int64_t>(live_), hits_, misses_};
  }

  void set_limit(int64_t bytes) {
    TORCH_CHECK(bytes >= 0, "the block cache limit must be >= 0 bytes, got ", bytes);
    std::lock_guard<std::mutex> lock(mutex());
    limit_ = bytes;
    trim_locked();
  }

  static BlockCache& get() {
    // Never destroyed: tensors freed during interpreter shutdown still call release().
    static BlockCache* cache = new BlockCache();
    return *cache;
  }

 private:
  BlockCache() : limit_(default_limit()) {
#if defined(__linux__)
    // A fork while another thread holds the lock would leave the child's copy locked forever.
    pthread_atfork(nullptr, nullptr, [] { get().mutex_ = new std::mutex(); });
#endif
  }

  std::mutex& mutex() { return *mutex_; }

  // A new block: 2 MiB-aligned, advised as huge pages (one fault per 2 MiB instead of 512, and
  // the LIF kernels' rows, 1 MiB apart, stop costing a TLB miss each).
  static void* fresh(size_t bytes) {
    void* p = nullptr;
    if (posix_memalign(&p, kAlign, bytes) != 0) {
      block_cache_empty();  // the cached blocks may be what is missing
      if (posix_memalign(&p, kAlign, bytes) != 0) p = nullptr;
    }
    TORCH_CHECK_WITH(OutOfMemoryError, p != nullptr, "pypaper: out of CPU memory allocating ",
                     bytes, " bytes");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(p, bytes, MADV_HUGEPAGE);  // advice only: failure changes nothing
#endif
    return p;
  }

  static void release(void* ctx) {
    auto* b = static_cast<Block*>(ctx);
    BlockCache& c = get();
    report(b->ptr, -static_cast<int64_t>(b->bytes));
    bool keep;
    {
      std::lock_guard<std::mutex> lock(c.mutex());
      c.live_ -= b->bytes;
      keep = static_cast<int64_t>(c.cached_ + b->bytes) <= c.limit_;
      if (keep) {
        c.free_.emplace(b->bytes, b->ptr);
        c.cached_ += b->bytes;
      }
    }
    if (!keep) std::free(b->ptr);
    delete b;
  }

  // Frees the biggest cached blocks until the free list fits the limit. Holds the lock.
  void trim_locked() {
    while (static_cast<int64_t>(cached_) > limit_ && !free_.empty()) {
      auto it = std::prev(free_.end());
      cached_ -= it->first;
      std::free(it->second);
      free_.erase(it);
    }
  }

  static void report(void* p, int64_t delta) {
    if (c10::memoryProfilingEnabled()) {
      BlockCacheInfo i = get().info();
      c10::reportMemoryUsageToProfiler(p, delta, static_cast<size_t>(i.live_bytes),
                                       static_cast<size_t>(i.live_bytes + i.cached_bytes),
                                       c10::Device(c10::DeviceType::CPU));
    }
  }

  friend void pypaper::block_cache_empty();

  std::mutex* mutex_ = new std::mutex();
  std::multimap<size_t, void*> free_;
  size_t cached_ = 0, live_ = 0;
  int64_t hits_ = 0, misses_ = 0;
  int64_t limit_;
};

}  // namespace

at::Tensor empty_cached(at::IntArrayRef sizes, const at::TensorOptions& options) {
  TORCH_INTERNAL_ASSERT(options.device().is_cpu(), "empty_cached is for CPU tensors");
  if (BlockCache::get().info().limit_bytes == 0) return at::empty(sizes, options);
  const size_t nbytes = at::detail::computeStorageNbytesContiguous(sizes, options.dtype().itemsize());
  // Resizable, with the cache as its allocator: resize_ allocates the new size from it.
  c10::Storage storage(c10::Storage::use_byte_size_t(), static_cast<int64_t>(nbytes),
                       &BlockCache::get(), /*resizable=*/true);
  at::Tensor t = at::detail::make_tensor<c10::TensorImpl>(
      std::move(storage), c10::DispatchKeySet(c10::DispatchKey::CPU), options.dtype());
  t.unsafeGetTensorImpl()->set_sizes_contiguous(sizes);
  return t;
}

BlockCacheInfo block_cache_info() { return BlockCache::get().info(); }

void block_cache_empty() {
  BlockCache& c = BlockCache::get();
  std::lock_guard<std::mutex> lock(c.mutex());
  for (auto& kv : c.free_) std::free(kv.second);
  c.free_.clear();
  c.cached_ = 0;
}

void block_cache_set_limit(int64_t bytes) { BlockCache::get().set_limit(bytes); }

}  // namespace pypaper
