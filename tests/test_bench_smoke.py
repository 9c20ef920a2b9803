"""Smoke tests of the benchmark suite (bench/): it runs, reports every provider, writes CSV and
PNG. No timing is asserted: the machines are shared and noisy."""
import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import harness

REPO = Path(__file__).resolve().parent.parent
PROVIDERS = ("pypaper", "reference", "compiled-reference", "torch")


def _rows(path: Path) -> list:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _toy_case() -> harness.Case:
    x = torch.randn(4096)
    xg = x.clone().requires_grad_()
    g = torch.ones_like(x)

    def broken():
        raise RuntimeError("no kernel for this input")

    def providers():
        return [
            harness.Provider("reference", {
                "fwd": lambda: x * 2,
                "fwd+bwd": harness.forward_backward(lambda: xg * 2, [xg], g)}),
            harness.Provider("fast", {
                "fwd": lambda: x + x,
                "fwd+bwd": harness.forward_backward(lambda: xg + xg, [xg], g)}),
            harness.unavailable("missing", "peer not installed"),
            harness.Provider("broken", {"fwd": broken}),
        ]

    return harness.Case("toy double", (4096,), torch.float32, "cpu",
                        {"fwd": 8 * 4096, "fwd+bwd": 20 * 4096}, providers,
                        bytes_note="toy count", memory=True)


def test_harness_reports_every_provider(tmp_path):
    limits = harness.measure_limits("cpu", repeats=2, numel=1 << 16)
    report = harness.run_family("toy", [_toy_case()], "cpu", harness.Timing(repeats=2),
                                csv_dir=tmp_path, progress=False, limits=limits)
    md = report.markdown
    assert md.startswith("## toy on cpu")
    assert "Limits: copy" in md and "THP" in md
    for mode in ("fwd", "fwd+bwd"):
        for prov in ("reference", "fast", "missing"):
            assert f"| toy double | 4096 | float32 | {mode} | {prov} |" in md
    assert "| toy double | 4096 | float32 | fwd | broken |" in md
    assert "missing unavailable" in md and "peer not installed" in md
    assert "broken failed" in md and "no kernel for this input" in md
    assert "1.00x" in md  # the reference against itself
    rows = _rows(tmp_path / "toy.csv")
    assert len(rows) == 7
    assert tuple(rows[0]) == harness.CSV_COLUMNS
    assert {r["provider"] for r in rows} == {"reference", "fast", "missing", "broken"}
    timed = [r for r in rows if r["median_ms"]]
    assert len(timed) == 4
    assert "peak MB" in md  # the case asked for it; the value may be blank where unreadable
    assert (tmp_path / "toy_cpu.png").stat().st_size > 0


def test_cli_quick_quant(tmp_path):
    cmd = [sys.executable, "-m", "bench", "--quick", "--family", "quant", "--device", "cpu",
           "--numel", "65536", "--repeats", "2", "--csv-dir", str(tmp_path), "--no-progress"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    expected = [("fake_quantize int8 per-tensor", "fwd"), ("fake_quantize int8 per-tensor", "fwd+bwd"),
                ("quantize+dequantize int8 per-tensor", "fwd")]
    for kernel, mode in expected:
        for prov in PROVIDERS:
            assert f"| {kernel} | 256x256 | float32 | {mode} | {prov} |" in out.stdout, out.stdout
    rows = _rows(tmp_path / "quant.csv")
    assert len(rows) == len(expected) * len(PROVIDERS)
    assert {r["provider"] for r in rows} == set(PROVIDERS)
    assert all(r["device"] == "cpu" and r["torch"] == torch.__version__ for r in rows)
    assert (tmp_path / "quant_cpu.png").stat().st_size > 0


def test_cli_quick_fewbit(tmp_path):
    cmd = [sys.executable, "-m", "bench", "--quick", "--family", "fewbit", "--device", "cpu",
           "--numel", "65536", "--repeats", "2", "--csv-dir", str(tmp_path), "--no-progress"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    provs = ("pypaper", "torch", "uint8-codes", "compiled-reference", "reference")
    for mode in ("fwd", "fwd+bwd"):
        for prov in provs:
            assert f"| fewbit gelu 2-bit | 65536 | float32 | {mode} | {prov} |" in out.stdout
    rows = _rows(tmp_path / "fewbit.csv")
    assert {r["provider"] for r in rows} == set(provs)
    saved = {r["provider"]: int(r["saved_bytes"]) for r in rows}
    # torch keeps the fp32 input, the uint8 version one byte per element, pypaper 2 bits
    # (plus the 4 fp32 levels)
    assert saved["torch"] == 4 * 65536 and saved["uint8-codes"] == 65536 + 16
    assert saved["pypaper"] == saved["reference"] == 65536 // 4 + 16
    assert all(r["baseline"] == "torch" for r in rows)


def test_cli_quick_delays(tmp_path):
    """The DelayedLinear cases: every provider reported (dcls timed where installed, else named
    as missing), the same result rows for both sigmas, dcls the baseline."""
    cmd = [sys.executable, "-m", "bench", "--quick", "--family", "delays", "--device", "cpu",
           "--numel", "51200", "--repeats", "1", "--csv-dir", str(tmp_path), "--no-progress",
           "--no-plot"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    have_dcls = importlib.util.find_spec("DCLS") is not None
    for label in ("sigma 7.27 (DCLS SIG 7)", "sigma 0.5 (DCLS SIG 0.23)"):
        for mode in ("fwd", "fwd+bwd"):
            for prov in ("pypaper", "reference", "linear"):
                assert f"| DelayedLinear K=21 {label} | 100x2x256x256 | float32 | {mode} | {prov} |" \
                    in out.stdout, out.stdout
    assert ("dcls is not installed" in out.stdout) != have_dcls
    rows = _rows(tmp_path / "delays.csv")
    assert all(r["baseline"] == "dcls" for r in rows)
    saved = {r["provider"]: int(r["saved_bytes"]) for r in rows
             if r["mode"] == "fwd+bwd" and "0.23" in r["kernel"]}
    assert saved["pypaper"] == 100 * 2 * 256 * 4 + 8  # the gather keeps x (and sigma, float64)


def test_cli_quick_snn(tmp_path):
    """Both quick cases (the fused multi-step LIF and the single-step loop): every provider
    reported, timed where its library is installed, SpikingJelly the baseline; the single-step
    loop keeps less for backward with pypaper (x per step, not x and H) than SpikingJelly."""
    cmd = [sys.executable, "-m", "bench", "--quick", "--family", "snn", "--device", "cpu",
           "--numel", "16384", "--repeats", "1", "--csv-dir", str(tmp_path), "--no-progress",
           "--no-plot", "--providers", "pypaper,spikingjelly,snntorch"]  # no torch.compile (minutes)
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    loop = "Linear(64,64)+LIF single-step loop T=32"
    for mode in ("fwd", "fwd+bwd"):
        for prov in ("pypaper", "spikingjelly", "snntorch"):
            assert f"| LIF multi-step T=32 | 32x16x32 | float32 | {mode} | {prov} |" in out.stdout
            assert f"| {loop} | 32x16x64 | float32 | {mode} | {prov} |" in out.stdout, out.stdout
    rows = _rows(tmp_path / "snn.csv")
    assert all(r["baseline"] == "spikingjelly" for r in rows)
    loop_rows = {r["provider"]: r for r in rows if r["kernel"] == loop and r["mode"] == "fwd+bwd"}
    have_sj = importlib.util.find_spec("spikingjelly") is not None
    assert bool(loop_rows["spikingjelly"]["median_ms"]) == have_sj
    if have_sj:
        assert int(loop_rows["pypaper"]["saved_bytes"]) < int(loop_rows["spikingjelly"]["saved_bytes"])


@pytest.mark.skipif(importlib.util.find_spec("snntorch") is None, reason="snntorch not installed")
def test_snn_bound_reports_the_floor_and_the_fixed_costs():
    cmd = [sys.executable, "-m", "bench.snn_bound", "--neurons", "512", "--rounds", "1",
           "--membw-reps", "1"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "memory floor (bench.membw, 1 MiB per stream, cold):" in out.stdout
    for name in ("built-in", "contract", "pypaper"):
        row = [line for line in out.stdout.splitlines() if line.startswith(f"| {name} |")]
        assert len(row) == 1, out.stdout
        ms, bound = (float(v) for v in row[0].split("|")[2:4])
        assert 0 < ms < bound  # the bound adds the floor


def test_lif_loops_reports_arithmetic_and_memory_for_both_modes():
    cmd = [sys.executable, "-m", "bench.lif_loops", "--neurons", "8192", "--reps", "1",
           "--threads", "1"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    for mode in ("rerun", "keep_h"):
        for case in ("in cache", "cold", "memory floor"):
            row = [line for line in out.stdout.splitlines()
                   if line.startswith(f"| {mode} | {case} |")]
            assert len(row) >= 1, out.stdout
            fwd, bwd, both = (float(v) for v in row[-1].split("|")[5:8])
            assert fwd > 0 and bwd > 0 and both == pytest.approx(fwd + bwd, abs=2e-3)
        for part in ("fwd", "bwd"):
            line = [x for x in out.stdout.splitlines() if x.startswith(f"- {mode} {part}: cold")]
            assert len(line) == 1 and ("bound by arithmetic" in line[0]
                                       or "bound by memory" in line[0]), out.stdout


@pytest.mark.parametrize("n", range(1, 8))
def test_balanced_orders_are_a_williams_design(n):
    """Every round is a permutation; per cycle every provider is first equally often and comes
    right after every other provider equally often (the carryover of the previous call is
    balanced, not pinned on one provider)."""
    import collections

    balanced_orders = harness.balanced_orders

    rows = balanced_orders(n)
    assert all(sorted(r) == list(range(n)) for r in rows)
    firsts = collections.Counter(r[0] for r in rows)
    pairs = collections.Counter((r[i], r[i + 1]) for r in rows for i in range(n - 1))
    assert len(set(firsts.values())) == 1 and len(firsts) == n
    assert len(pairs) == n * (n - 1) and len(set(pairs.values())) <= 1


def test_snn_second_order_case_times_every_provider(tmp_path):
    """The full snn set's double-backward case, on a tiny shape: pypaper, the reference and
    SpikingJelly (when installed) each run, and give the same second derivative."""
    from bench import snn as snn_bench

    case = snn_bench.second_order_case(4, 64, torch.float32, "cpu")
    providers = {p.name: p for p in case.providers()}
    assert {"pypaper", "reference", "spikingjelly"} <= set(providers)
    got = {n: p.calls["fwd+bwd"]() for n, p in providers.items() if p.calls}
    assert got["pypaper"].abs().sum() > 0
    for name, value in got.items():
        torch.testing.assert_close(value, got["reference"], rtol=1e-4, atol=1e-5, msg=name)
    report = harness.run_family("snn", [case], "cpu", harness.Timing(repeats=2),
                                csv_dir=tmp_path, progress=False,
                                limits=harness.measure_limits("cpu", repeats=2, numel=1 << 16))
    assert "| LIF double backward T=4 | 4x16x4 | float32 | fwd+bwd | pypaper |" in report.markdown


def test_snn_zoo_case_times_the_built_and_the_converted_network(tmp_path):
    """The full snn set's model-zoo case, on a tiny network: SpikingJelly's MNISTNet as built and
    after pypaper.snn.convert give the same outputs and both are timed."""
    pytest.importorskip("h5py")
    pytest.importorskip("spikingjelly.activation_based")
    from bench import snn as snn_bench

    case = snn_bench.zoo_case(2, 2, "cpu")
    providers = {p.name: p for p in case.providers()}
    assert set(providers) == {"pypaper", "spikingjelly"}
    assert all(p.calls for p in providers.values()), [p.reason for p in providers.values()]
    # the converted network's PLIF layers keep x only (SpikingJelly's keep more per step)
    assert providers["pypaper"].saved_bytes < providers["spikingjelly"].saved_bytes
    torch.manual_seed(0)  # the same dropout masks
    got = providers["pypaper"].calls["fwd"]()
    torch.manual_seed(0)
    torch.testing.assert_close(got, providers["spikingjelly"].calls["fwd"]())
    report = harness.run_family("snn", [case], "cpu", harness.Timing(repeats=2),
                                csv_dir=tmp_path, progress=False,
                                limits=harness.measure_limits("cpu", repeats=2, numel=1 << 16))
    assert "| zoo MNISTNet(PLIF, 2 ch) built vs converted T=2 |" in report.markdown
    assert "| pypaper |" in report.markdown and "| spikingjelly |" in report.markdown
