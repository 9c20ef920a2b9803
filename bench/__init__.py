"""pypaper's benchmark suite: ``python -m bench [--quick|--full] [--family NAME] ...``.

Each family is a module of this package with ``cases(device, quick, numel) -> list[Case]``
(bench/harness.py); adding one is one line in FAMILIES.
"""

FAMILIES = {
    "quant": "bench.quant",
    "fewbit": "bench.fewbit",
    "snn": "bench.snn",
    "wtacrs": "bench.wtacrs",
    # ---- hopfield (issue #4) ----
    # ---- local (issue #6) ----
    # ---- quant models (issue #7): "qlinear" ----
}
