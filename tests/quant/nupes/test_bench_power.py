"""Smoke test of the `power` benchmark family (bench/power.py): every provider runs and is
reported, CSV rows are written. No timing is asserted."""
import csv
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def test_cli_quick_power(tmp_path):
    cmd = [sys.executable, "-m", "bench", "--quick", "--family", "power", "--device", "cpu",
           "--numel", "65536", "--repeats", "2", "--csv-dir", str(tmp_path), "--no-progress",
           "--no-plot"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    shape = "16x4096"  # bench.power.shape_for(65536): rows of 4096, a weight matrix's shape
    fq = ("pypaper", "reference", "compiled-formula", "uniform (pypaper)", "uniform (torch)")
    for mode in ("fwd", "fwd+bwd"):
        for prov in fq:
            assert f"| power fake-quant 4-bit | {shape} | float32 | {mode} | {prov} |" in out.stdout
    for prov in ("pypaper", "reference", "compiled-formula"):
        assert f"| power quantize 4-bit -> int8 | {shape} | float32 | fwd | {prov} |" in out.stdout
    with open(tmp_path / "power.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * len(fq) + 3
    assert all(r["median_ms"] for r in rows), rows
