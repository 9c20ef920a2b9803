// lif_backward's CPU loops for fp16 storage, compiled on their own (kernels/cpu/snn_cpu_instances.h).
#include "../../../kernels/cpu/snn_cpu_instances.h"

PYPAPER_LIF_CPU_INSTANTIATE(backward, LifBackwardArgs, fp16)
