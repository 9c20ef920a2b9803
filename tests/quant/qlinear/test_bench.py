"""Smoke test of bench/qlinear.py: every provider of every case runs or says why not, on a small
shape; the GOP/s table prints. No timing is asserted."""
from bench import harness
from bench import qlinear as bq


def test_bench_qlinear_smoke(tmp_path):
    cases = bq.cases("cpu", quick=True, numel=65536)
    assert {c.kernel for c in cases} == set(bq.KINDS)
    limits = harness.measure_limits("cpu", repeats=2, numel=1 << 16)
    report = harness.run_family("qlinear", cases, "cpu", harness.Timing(repeats=2),
                                csv_dir=tmp_path, make_plot=False, progress=False, limits=limits)
    names = {r.provider for r in report.results}
    assert {"fp32 nn.Linear", "pypaper", "reference", "torch.ao dynamic"} <= names
    ours = [r for r in report.results if r.provider.startswith("pypaper")]
    assert ours and not any(r.error for r in ours)
    assert all(r.median_s or r.reason for r in report.results)
    table = bq.gops_table(report.results, limits)
    assert "GOP/s" in table and "int4 weight-only linear" in table
    assert (tmp_path / "qlinear.csv").exists()
