// lif_jvp's CPU loops for double storage, compiled on their own (kernels/cpu/snn_cpu_instances.h).
#include "../../../kernels/cpu/snn_cpu_instances.h"

PYPAPER_LIF_CPU_INSTANTIATE(jvp, LifJvpArgs, double)
