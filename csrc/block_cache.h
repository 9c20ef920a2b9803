// pypaper's block cache: a caching allocator for the large CPU outputs of pypaper's kernels.
//
// Why: a training step allocates the same big outputs every step (the LIF op's spikes, its saved
// H, its grad_x: [T, N] each, tens of MB). glibc hands every allocation above 32 MiB to a fresh
// mmap and unmaps it on free, so each step pays page faults and the kernel's zeroing of every
// page again - measured here at 1.3-3 ms per 32 MiB (10-25 GB/s, more than the LIF kernel itself
// spends on the same bytes) and up to 6 ms when transparent huge pages are off. PyTorch's CUDA
// allocator caches blocks for the same reason; on the CPU torch does not.
//
// What: requests of at least 1 MiB get blocks of their own (rounded up to 64 KiB; from 16 MiB on to
// whole 2 MiB huge pages, aligned and advised as huge pages where Linux allows), which on free go
// to a free list instead of back to the system; the next request of the same size (within 1/8)
// takes one back. When the free list would exceed its limit, the least recently freed blocks are
// freed first. Smaller requests go to torch's CPU allocator unchanged. The limit is
// PYPAPER_CPU_CACHE_MB (0 turns the cache off), read when pypaper is imported, by default an
// eighth of physical memory, at most 4 GiB; pypaper.memory changes it, reports the counters and
// empties the cache.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>

namespace pypaper {

// at::empty(sizes, options) for a CPU tensor in the contiguous layout, with storage from the block
// cache (its allocator stays attached to the storage, so resize_ works as for any tensor).
at::Tensor empty_cached(at::IntArrayRef sizes, const at::TensorOptions& options);

struct BlockCacheInfo {
  int64_t limit_bytes;     // most bytes the free list may hold
  int64_t cached_bytes;    // bytes in the free list now
  int64_t cached_blocks;
  int64_t live_bytes;      // bytes of cache blocks held by tensors now
  int64_t hits, misses;    // requests served from the free list / by a new block
};

BlockCacheInfo block_cache_info();
void block_cache_empty();               // frees every cached block
void block_cache_set_limit(int64_t bytes);  // frees cached blocks above the new limit

}  // namespace pypaper
