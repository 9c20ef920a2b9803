"""Every pypaper op in one namespace: ``pypaper.ops.<name>``.

Each family defines its ops in ``pypaper/<family>/ops.py`` (typed wrapper, docstring with the
math and the paper, backend selection); this module only re-exports them so a user can find any
op from one place. One line per family; add yours below.
"""
from .quant.ops import dequantize, fake_quantize, quantize
from .quant.fewbit.ops import activation as fewbit_activation
from .snn.ops import lif_multi_step
from .wtacrs.ops import (gather_scale as wtacrs_gather_scale, linear as wtacrs_linear,
                         row_norms as wtacrs_row_norms, sample as wtacrs_sample,
                         sampled_grad_weight as wtacrs_sampled_grad_weight,
                         select as wtacrs_select)
# ---- hopfield (issue #4): add the import line here ----
# ---- local (issue #6): add the import line here ----
# ---- quant models (issue #7, linear kernels): add the import line here ----
# ---- quant models (issue #7, power quantizer): add the import line here ----

__all__ = [name for name in dir() if not name.startswith("_")]
