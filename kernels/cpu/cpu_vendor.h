// Which CPU vendor the process runs on, for the few choices measured to differ between Intel and
// AMD hosts: the LIF loops' far-prefetch hint (snn_cpu.h) and the delay op's dense-GEMM path
// (csrc/snn/delay_cpu.cpp: MKL's sgemm, what the GEMM path calls, ran at half the Xeon's rate or
// less on the AMD guests measured). Torch-free.
#pragma once

namespace pypaper {
namespace cpu {

inline bool cpu_is_amd() {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  static const bool amd = [] {
    __builtin_cpu_init();
    return __builtin_cpu_is("amd") != 0;
  }();
  return amd;
#else
  return false;
#endif
}

}  // namespace cpu
}  // namespace pypaper
