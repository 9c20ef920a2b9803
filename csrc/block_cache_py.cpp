// pybind11 bindings of the block cache's counters and controls (csrc/block_cache.h), for
// pypaper/memory.py.
#include <pybind11/pybind11.h>

#include "block_cache.h"

namespace py = pybind11;

namespace pypaper {

void register_block_cache(py::module_& m) {
  m.def(
      "block_cache_info",
      [] {
        const BlockCacheInfo i = block_cache_info();
        py::dict d;
        d["limit_bytes"] = i.limit_bytes;
        d["cached_bytes"] = i.cached_bytes;
        d["cached_blocks"] = i.cached_blocks;
        d["live_bytes"] = i.live_bytes;
        d["hits"] = i.hits;
        d["misses"] = i.misses;
        return d;
      },
      "Counters of pypaper's CPU block cache");
  m.def("block_cache_empty", &block_cache_empty, "Frees every cached block");
  m.def(
      "block_cache_set_limit",
      [](int64_t bytes) {
        if (bytes < 0) throw py::value_error("limit_bytes must be >= 0");
        block_cache_set_limit(bytes);
      },
      py::arg("limit_bytes"), "Sets the most bytes the free list may hold");
}

}  // namespace pypaper
