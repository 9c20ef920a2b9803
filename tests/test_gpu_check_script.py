"""tools/gpu_check.sh, the time-boxed GPU check, runs its phase machinery here: a GPU session has
minutes of device time, and a script that breaks there wastes them. The CUDA-only steps fail here
as they should; what is checked is that phases run under their limits, log, pack and summarize."""
import shutil
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _run(tmp_path, *phases, budget=60):
    env = {"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "GPU_CHECK_BUDGET": str(budget),
           "OUT": str(tmp_path / "out"), "LOGS": str(tmp_path / "logs"), "HOME": str(tmp_path),
           "GPU_CHECK_WHEELS": str(tmp_path / "no-wheels")}  # nothing installed into /tmp/site
    return subprocess.run(["bash", str(SCRIPT), *phases], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_syntax():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_a_phase_logs_and_packs_its_output(tmp_path):
    r = _run(tmp_path, "info")
    assert r.returncode == 0, r.stderr
    assert "== info: rc=" in r.stdout and "== summary" in r.stdout
    with tarfile.open(tmp_path / "out" / "results.tgz") as tar:
        names = tar.getnames()
    assert "./info.log" in names
    assert "cores:" in (tmp_path / "logs" / "info.log").read_text()


def test_build_uses_a_carried_extension_and_says_when_it_has_no_cuda_kernels(tmp_path):
    so = ROOT / "pypaper" / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    if not so.exists():
        pytest.skip("pypaper._C is not built in place")
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "test-old.log").write_text("FAILED stale\n")  # a warm machine's leftover
    r = _run(tmp_path, "build")
    log = (tmp_path / "logs" / "build.log").read_text()
    assert f"using the carried pypaper/{so.name}" in log
    import torch

    if not torch.cuda.is_available():
        assert r.returncode == 1 and "no CUDA kernels in pypaper._C" in log
    assert "stale" not in r.stdout and not (tmp_path / "logs" / "test-old.log").exists()


def test_a_phase_without_time_left_is_skipped_and_an_unknown_one_refused(tmp_path):
    r = _run(tmp_path, "info", budget=10)
    assert "== info: skipped" in r.stdout
    r = _run(tmp_path, "no-such-phase")
    assert r.returncode == 2 and "unknown phase no-such-phase" in r.stderr
