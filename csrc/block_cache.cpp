// pypaper's block cache (what and why: block_cache.h).
#include "block_cache.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/Storage.h>
#include <c10/util/Exception.h>

#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <iterator>
#include <limits>
#include <list>
#include <map>
#include <mutex>
#include <unordered_map>
#include <utility>

#if defined(__linux__)
#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace pypaper {
namespace {

constexpr size_t kMinBytes = size_t{1} << 20;    // below: torch's allocator (malloc's heap reuses)
constexpr size_t kSmallAlign = size_t{64} << 10;  // blocks under kHugeFrom: 64 KiB steps
constexpr size_t kHuge = size_t{2} << 20;         // a huge page
// Blocks of at least this size are rounded to whole huge pages and advised as such (at most
// 12.5% rounding); smaller ones would pay up to twice their size in resident memory.
constexpr size_t kHugeFrom = size_t{16} << 20;

size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

size_t block_size(size_t n) { return n >= kHugeFrom ? round_up(n, kHuge) : round_up(n, kSmallAlign); }

int64_t default_limit() {
  if (const char* env = std::getenv("PYPAPER_CPU_CACHE_MB")) {
    char* end = nullptr;
    errno = 0;
    const long long mb = std::strtoll(env, &end, 10);
    TORCH_CHECK(end != env && *end == '\0' && errno == 0 && mb >= 0 &&
                    mb <= (std::numeric_limits<int64_t>::max() >> 20),
                "PYPAPER_CPU_CACHE_MB must be a whole number of MiB, 0 (pypaper's block cache "
                "off) to ", std::numeric_limits<int64_t>::max() >> 20, ", got '", env, "'");
    return static_cast<int64_t>(mb) << 20;
  }
  int64_t limit = int64_t{4} << 30;
#if defined(__linux__)
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  if (pages > 0 && page > 0) limit = std::min<int64_t>(limit, int64_t{pages} * page / 8);
#endif
  return limit;
}

class BlockCache final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    if (n < kMinBytes) return c10::GetDefaultCPUAllocator()->allocate(n);
    const size_t want = block_size(n);
    void* p = nullptr;
    size_t bytes = want;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      // Best fit among the free blocks no more than 1/8 bigger than asked.
      auto it = by_size_.lower_bound(want);
      if (it != by_size_.end() && it->first <= want + want / 8) {
        bytes = it->first;
        p = it->second->ptr;
        unlink_locked(it);
        ++hits_;
        track_locked(p, bytes);
      }
    }
    if (p == nullptr) {
      p = fresh(bytes);  // may throw: nothing is counted before it succeeds
      std::lock_guard<std::mutex> lock(mutex_);
      ++misses_;
      track_locked(p, bytes);
    }
    // The context is the data pointer itself (torch's copy-on-write clone requires it); the size
    // is looked up in live_ on release.
    return {p, p, &BlockCache::release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  BlockCacheInfo info() {
    std::lock_guard<std::mutex> lock(mutex_);
    return info_locked();
  }

  int64_t limit() {
    std::lock_guard<std::mutex> lock(mutex_);
    return limit_;
  }

  void set_limit(int64_t bytes) {
    TORCH_CHECK(bytes >= 0, "the block cache limit must be >= 0 bytes, got ", bytes);
    std::lock_guard<std::mutex> lock(mutex_);
    limit_ = bytes;
    evict_locked();
  }

  void empty() {
    std::lock_guard<std::mutex> lock(mutex_);
    const int64_t limit = limit_;
    limit_ = 0;
    evict_locked();
    limit_ = limit;
  }

  static BlockCache& get() {
    // Never destroyed: tensors freed during interpreter shutdown still call release().
    static BlockCache* cache = new BlockCache();
    return *cache;
  }

 private:
  struct Free {
    void* ptr;
    size_t bytes;
  };
  using Lru = std::list<Free>;  // front: the most recently freed

  BlockCache() : limit_(default_limit()) {
#if defined(__linux__)
    // Hold the lock across fork, so the child never inherits a half-updated free list.
    pthread_atfork([] { get().mutex_.lock(); }, [] { get().mutex_.unlock(); },
                   [] { get().mutex_.unlock(); });
#endif
  }

  BlockCacheInfo info_locked() const {
    return {limit_, static_cast<int64_t>(cached_bytes_), static_cast<int64_t>(lru_.size()),
            static_cast<int64_t>(live_bytes_), hits_, misses_};
  }

  // A new block, 64-byte aligned at least; big ones 2 MiB-aligned and advised as huge pages (one
  // fault per 2 MiB instead of 512, and the LIF kernels' rows, 1 MiB apart, stop costing a TLB
  // miss each).
  void* fresh(size_t bytes) {
    const size_t align = bytes >= kHugeFrom ? kHuge : size_t{4096};
    void* p = nullptr;
    if (posix_memalign(&p, align, bytes) != 0) {
      empty();  // the cached blocks may be what is missing
      if (posix_memalign(&p, align, bytes) != 0) p = nullptr;
    }
    TORCH_CHECK_WITH(OutOfMemoryError, p != nullptr, "pypaper: out of CPU memory allocating ",
                     bytes, " bytes");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (bytes >= kHugeFrom) madvise(p, bytes, MADV_HUGEPAGE);  // advice only
#endif
    return p;
  }

  static void release(void* p) {
    BlockCache& c = get();
    bool keep = false;
    {
      std::lock_guard<std::mutex> lock(c.mutex_);
      auto it = c.live_.find(p);
      TORCH_INTERNAL_ASSERT(it != c.live_.end(), "pypaper block cache: unknown block");
      const size_t bytes = it->second;
      c.live_.erase(it);
      c.live_bytes_ -= bytes;
      keep = static_cast<int64_t>(bytes) <= c.limit_;
      if (keep) {
        // Keep it; make room by freeing the least recently freed blocks (after a change of
        // shapes the old sizes would otherwise hold the limit for good). p is the newest, so
        // it stays.
        c.lru_.push_front(Free{p, bytes});
        c.by_size_.emplace(bytes, c.lru_.begin());
        c.cached_bytes_ += bytes;
        c.evict_locked();
      }
      c.report_locked(p, -static_cast<int64_t>(bytes));
    }
    if (!keep) std::free(p);
  }

  // Removes a free block from both indexes (the caller owns it now). Holds the lock.
  void unlink_locked(std::multimap<size_t, Lru::iterator>::iterator it) {
    cached_bytes_ -= it->first;
    lru_.erase(it->second);
    by_size_.erase(it);
  }

  // Frees the least recently freed blocks until the free list holds at most limit_ bytes.
  void evict_locked() {
    while (!lru_.empty() && static_cast<int64_t>(cached_bytes_) > limit_) {
      const Free oldest = lru_.back();
      auto range = by_size_.equal_range(oldest.bytes);
      for (auto it = range.first; it != range.second; ++it) {
        if (it->second == std::prev(lru_.end())) {
          unlink_locked(it);
          break;
        }
      }
      std::free(oldest.ptr);
    }
  }

  void report_locked(void* p, int64_t delta) const {
    if (c10::memoryProfilingEnabled()) {
      c10::reportMemoryUsageToProfiler(p, delta, live_bytes_, live_bytes_ + cached_bytes_,
                                       c10::Device(c10::DeviceType::CPU));
    }
  }

  // A block handed out: counted live and reported to the profiler. Holds the lock.
  void track_locked(void* p, size_t bytes) {
    live_[p] = bytes;
    live_bytes_ += bytes;
    report_locked(p, static_cast<int64_t>(bytes));
  }

  std::mutex mutex_;
  Lru lru_;
  std::multimap<size_t, Lru::iterator> by_size_;
  std::unordered_map<void*, size_t> live_;
  size_t cached_bytes_ = 0, live_bytes_ = 0;
  int64_t hits_ = 0, misses_ = 0;
  int64_t limit_;
};

}  // namespace

at::Tensor empty_cached(at::IntArrayRef sizes, const at::TensorOptions& options) {
  TORCH_INTERNAL_ASSERT(options.device().is_cpu(), "empty_cached is for CPU tensors");
  if (BlockCache::get().limit() == 0) return at::empty(sizes, options);
  const size_t nbytes =
      at::detail::computeStorageNbytesContiguous(sizes, options.dtype().itemsize());
  // Resizable, with the cache as its allocator: resize_ allocates the new size from it.
  c10::Storage storage(c10::Storage::use_byte_size_t(), static_cast<int64_t>(nbytes),
                       &BlockCache::get(), /*resizable=*/true);
  at::Tensor t = at::detail::make_tensor<c10::TensorImpl>(
      std::move(storage), c10::DispatchKeySet(c10::DispatchKey::CPU), options.dtype());
  t.unsafeGetTensorImpl()->set_sizes_contiguous(sizes);
  return t;
}

BlockCacheInfo block_cache_info() { return BlockCache::get().info(); }

void block_cache_empty() { BlockCache::get().empty(); }

void block_cache_set_limit(int64_t bytes) { BlockCache::get().set_limit(bytes); }

}  // namespace pypaper
