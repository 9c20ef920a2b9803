"""bench/hopfield.py runs end to end at a tiny size (every provider, both quick modes), writes its
CSV rows, and reports the saved-for-backward bytes of the fused op below the plain loop's."""
import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_hopfield_bench_smoke(tmp_path):
    cmd = [sys.executable, "-m", "bench", "--quick", "--family", "hopfield", "--device", "cpu",
           "--numel", "4096", "--repeats", "2", "--csv-dir", str(tmp_path), "--no-progress"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "hopfield.csv")))
    providers = {r["provider"] for r in rows}
    assert {"pypaper", "sdpa-chain", "reference", "compiled-reference", "pypaper-layer",
            "reference-layer", "compiled-reference-layer"} <= providers
    assert all(r["median_ms"] for r in rows), [r for r in rows if not r["median_ms"]]
    saved = {(r["kernel"], r["provider"]): int(r["saved_bytes"]) for r in rows
             if r["mode"] == "fwd+bwd" and r["saved_bytes"]}
    for (kernel, prov), nbytes in saved.items():
        if prov == "pypaper":
            assert nbytes < saved[(kernel, "reference")]
