"""Smoke test of bench/wtacrs.py through the CLI: every provider reported, CSV rows with the
bytes kept for backward, speedups against nn.Linear. Timings are not asserted."""
import csv
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_cli_quick_wtacrs(tmp_path):
    cmd = [sys.executable, "-m", "bench", "--quick", "--family", "wtacrs", "--device", "cpu",
           "--numel", "65536", "--repeats", "2", "--csv-dir", str(tmp_path), "--no-progress",
           "--no-plot"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    provs = ("torch", "pypaper wta-crs", "pypaper crs", "reference")
    for mode in ("fwd", "fwd+bwd"):
        for prov in provs:
            assert f"| wtacrs linear keep 0.3 | 1024x64 | float32 | {mode} | {prov} |" in out.stdout
    for prov in ("torch", "pypaper wta-crs", "pypaper wta-crs 0.1", "pypaper crs",
                 "pypaper wta-crs + 2-bit GELU", "pypaper wta-crs bf16 rows",
                 "pypaper wta-crs bf16 rows + 2-bit GELU"):
        assert f"| wtacrs bert step L1 h64 | 2x32x64 | float32 | fwd+bwd | {prov} |" in out.stdout
    with open(tmp_path / "wtacrs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert all(r["baseline"] == "torch" and r["median_ms"] for r in rows), rows
    saved = {(r["kernel"], r["provider"]): int(r["saved_bytes"]) for r in rows}
    layer = "wtacrs linear keep 0.3"
    assert saved[(layer, "torch")] == 1024 * 64 * 4  # nn.Linear keeps x
    # 308 kept rows of 64 floats + their int64 indices
    assert saved[(layer, "pypaper wta-crs")] == 308 * 64 * 4 + 308 * 8
    assert saved[(layer, "reference")] == saved[(layer, "pypaper wta-crs")]
    step = "wtacrs bert step L1 h64"
    assert saved[(step, "pypaper wta-crs")] < saved[(step, "torch")]
    # at this size min_k = 32 rows bind for both ratios
    assert saved[(step, "pypaper wta-crs 0.1")] <= saved[(step, "pypaper wta-crs")]
    # the few-bit GELU keeps 2 bits of its input instead of 32
    assert saved[(step, "pypaper wta-crs + 2-bit GELU")] < saved[(step, "pypaper wta-crs")]
    # kept rows in bf16: 2 bytes a value instead of 4 (the indices stay int64)
    assert saved[(step, "pypaper wta-crs bf16 rows")] < saved[(step, "pypaper wta-crs")]
    assert (saved[(step, "pypaper wta-crs bf16 rows + 2-bit GELU")]
            < saved[(step, "pypaper wta-crs + 2-bit GELU")])
