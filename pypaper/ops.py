"""Every pypaper op in one namespace: ``pypaper.ops.<name>``.

Each family defines its ops in ``pypaper/<family>/ops.py`` (typed wrapper, docstring with the
math and the paper, backend selection); this module only re-exports them so a user can find any
op from one place. One line per family.
"""
from .quant.ops import dequantize, fake_quantize, quantize
from .quant.fewbit.ops import activation as fewbit_activation
from .snn.ops import lif_multi_step
from .snn.delays import delayed_linear
from .wtacrs.ops import (gather_scale as wtacrs_gather_scale, linear as wtacrs_linear,
                         row_norms as wtacrs_row_norms, sample as wtacrs_sample,
                         sampled_grad_weight as wtacrs_sampled_grad_weight,
                         select as wtacrs_select)
from .hopfield.ops import hopfield_retrieve
from .local.ops import (ff_linear as local_ff_linear, ff_sf_linear as local_ff_sf_linear,
                        head_loss as local_head_loss, local_head, tp_linear as local_tp_linear)
from .quant.qlinear_ops import (int4_weight_only_linear, int8_dynamic_linear,
                                int8_dynamic_linear_int32, int8_weight_only_linear)
from .quant.power import power_dequantize, power_fake_quantize, power_quantize

__all__ = [name for name in dir() if not name.startswith("_")]
