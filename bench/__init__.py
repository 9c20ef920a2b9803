"""pypaper's benchmark suite: ``python -m bench [--quick|--full] [--family NAME] ...``.

Each family is a module of this package with ``cases(device, quick, numel) -> list[Case]``
(bench/harness.py); adding one is one line in FAMILIES.
"""

FAMILIES = {
    "quant": "bench.quant",
    "fewbit": "bench.fewbit",
    "snn": "bench.snn",
    "delays": "bench.delays",
    "wtacrs": "bench.wtacrs",
    "hopfield": "bench.hopfield",
    "local": "bench.local",
    "qlinear": "bench.qlinear",
    "power": "bench.power",
}
