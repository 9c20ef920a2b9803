// pypaper._C: the pybind11 module. Tensor ops live in the dispatcher (csrc/schemas.cpp and the
// TORCH_LIBRARY_IMPL blocks); loading this module registers them. Here only non-tensor helpers.
#include <pybind11/pybind11.h>
#include <torch/version.h>

#include <string>

#include "../kernels/cpu/cpu_vendor.h"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace py = pybind11;

namespace pypaper {
void register_fewbit(py::module_& m);        // csrc/quant/fewbit_py.cpp
void register_block_cache(py::module_& m);   // csrc/block_cache_py.cpp
}

#define PYPAPER_STR_(x) #x
#define PYPAPER_STR(x) PYPAPER_STR_(x)

namespace {

std::string compiler() {
#if defined(__clang__)
  return std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  return "gcc " + std::to_string(__GNUC__) + "." + std::to_string(__GNUC_MINOR__) + "." +
         std::to_string(__GNUC_PATCHLEVEL__);
#elif defined(_MSC_VER)
  return "msvc " + std::to_string(_MSC_VER);
#else
  return "unknown";
#endif
}

// Vector units the CPU kernels were compiled for (set by -march=... at build time).
std::string simd_level() {
#if defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
  return "avx2+fma";
#elif defined(__AVX2__)
  return "avx2";
#elif defined(__AVX__)
  return "avx";
#elif defined(__SSE4_2__)
  return "sse4.2";
#elif defined(__ARM_NEON)
  return "neon";
#else
  return "scalar";
#endif
}

py::dict build_info() {
  py::dict d;
  d["compiler"] = compiler();
#if defined(_OPENMP)
  d["openmp"] = true;
  d["openmp_max_threads"] = omp_get_max_threads();
#else
  d["openmp"] = false;
  d["openmp_max_threads"] = 1;
#endif
  d["simd"] = simd_level();
#if defined(PYPAPER_WITH_CUDA)
  d["cuda_kernels"] = true;
  d["cuda_arch_list"] = std::string(PYPAPER_STR(PYPAPER_CUDA_ARCHS));  // e.g. "8.0_9.0"
#else
  d["cuda_kernels"] = false;
  d["cuda_arch_list"] = std::string();
#endif
  d["torch_version"] = std::string(TORCH_VERSION);
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pypaper native kernels (ops are registered in torch.ops.pypaper)";
  m.def("build_info", &build_info,
        "How this extension was built: compiler, OpenMP, SIMD level, CUDA kernels, torch version");
  m.def("cpu_is_amd", &pypaper::cpu::cpu_is_amd,
        "Whether the CPU is AMD's (kernels/cpu/cpu_vendor.h: the vendor-dependent defaults)");
  pypaper::register_fewbit(m);
  pypaper::register_block_cache(m);
}
