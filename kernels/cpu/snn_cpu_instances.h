// The fused LIF CPU loops (snn_cpu.h, snn_jvp_cpu.h), each op for each storage type, instantiated
// once in a translation unit of its own (csrc/snn/lif_loops/<op>_<type>.cpp) and declared
// `extern template` everywhere else (csrc/snn/snn_cpu.cpp).
//
// Why: the loops are templates over the reset, the surrogate and the charge flags, so one op for
// one type is hundreds of specialized loops. Instantiated together inside the op file they made
// it the slowest file of the build by far (about 4.5 minutes here; over 10 on a 16-core GPU host,
// where the whole rest of the build took 5), and its compile was the build's critical path.
// Split 12 ways (3 ops x 4 types), the longest piece compiles in ~50 s on a 2-core guest (the op
// file itself in 12 s), and they run in parallel.
#pragma once
#include "snn_cpu.h"
#include "snn_jvp_cpu.h"

// X(op, Args, In): one line per op (forward, backward, jvp) for storage type In; the math type
// is acc_type<In> (float for the 16-bit types).
#define PYPAPER_LIF_CPU_OPS(X, In) \
  X(forward, LifForwardArgs, In)   \
  X(backward, LifBackwardArgs, In) \
  X(jvp, LifJvpArgs, In)

#define PYPAPER_LIF_CPU_DECLARE(op, Args, In)                                                    \
  extern template void lif_##op<In, typename acc_type<In>::type>(                                \
      const Args<In, typename acc_type<In>::type>&, int64_t, int64_t);

// The explicit instantiation definition, for the one translation unit of (op, In).
#define PYPAPER_LIF_CPU_INSTANTIATE(op, Args, In)                                                \
  namespace pypaper {                                                                            \
  namespace cpu {                                                                                \
  template void lif_##op<In, typename acc_type<In>::type>(                                       \
      const Args<In, typename acc_type<In>::type>&, int64_t, int64_t);                           \
  }                                                                                              \
  }

namespace pypaper {
namespace cpu {
PYPAPER_LIF_CPU_OPS(PYPAPER_LIF_CPU_DECLARE, float)
PYPAPER_LIF_CPU_OPS(PYPAPER_LIF_CPU_DECLARE, double)
PYPAPER_LIF_CPU_OPS(PYPAPER_LIF_CPU_DECLARE, bf16)
PYPAPER_LIF_CPU_OPS(PYPAPER_LIF_CPU_DECLARE, fp16)
}  // namespace cpu
}  // namespace pypaper
