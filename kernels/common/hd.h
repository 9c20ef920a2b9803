// Host/device qualifiers shared by the CPU and CUDA kernels.
//
// Every per-element formula of pypaper lives once in kernels/common/ as a PYPAPER_HD inline
// function: the C++ CPU loop and the CUDA kernel call the same code, so the CPU tests (and the
// ctest suite) check the math that the GPU runs.
#pragma once

#if defined(__CUDACC__)
#define PYPAPER_HD __host__ __device__ __forceinline__
#else
#define PYPAPER_HD inline
#endif
