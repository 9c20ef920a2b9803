"""tools/triton_compile_check.py: launches recorded under the interpreter are compiled for an
NVIDIA GPU here, without one, and a kernel only the interpreter accepts is reported.

The bad kernel is the pattern that broke pypaper's few-bit pack kernel until 2026-12-04 (the
interpreter ran it, the compiler refuses it): a name assigned tiles of different shapes in the
two branches of a runtime `if`."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

triton = pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "triton_compile_check.py")

KERNELS = textwrap.dedent('''
    import triton
    import triton.language as tl

    @triton.jit
    def good_kernel(x_ptr, y_ptr, n, USE_RN: tl.constexpr, BF16_BITS: tl.constexpr,
                    BLOCK: tl.constexpr):
        o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = o < n
        x = tl.load(x_ptr + o, mask=m)
        if BF16_BITS:  # the interpreter's int16 bit patterns; compiled, a real bf16 pointer
            x = (x.to(tl.int32) << 16).to(tl.float32, bitcast=True)
        else:
            x = x.to(tl.float32)
        if USE_RN:  # compiled only: inline PTX
            x = tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=f,f,f", [x, x],
                                          dtype=tl.float32, is_pure=True, pack=1)
        tl.store(y_ptr + o, x, mask=m)

    @triton.jit
    def bad_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        if pid < n:
            v = tl.load(x_ptr + tl.arange(0, BLOCK))
        else:
            v = tl.load(x_ptr + tl.arange(0, 2 * BLOCK))
        tl.store(y_ptr + tl.arange(0, BLOCK), tl.sum(v, axis=0))

    @triton.jit
    def mode_kernel(x_ptr, y_ptr, n, MODE: tl.constexpr, BLOCK: tl.constexpr):
        # each MODE compiles a kernel of its own: only MODE == 3 is refused (bad_kernel's pattern)
        pid = tl.program_id(0)
        if MODE == 3:
            if pid < n:
                v = tl.load(x_ptr + tl.arange(0, BLOCK))
            else:
                v = tl.load(x_ptr + tl.arange(0, 2 * BLOCK))
            tl.store(y_ptr + tl.arange(0, BLOCK), tl.sum(v, axis=0))
        else:
            tl.store(y_ptr + tl.arange(0, BLOCK), tl.load(x_ptr + tl.arange(0, BLOCK)) * MODE)

    @triton.jit
    def fp8_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        # float8e4nv: compiles for sm_90, refused for sm_80 ("not supported in this architecture")
        o = tl.arange(0, BLOCK)
        m = o < n
        tl.store(y_ptr + o, tl.load(x_ptr + o, mask=m).to(tl.float8e4nv).to(tl.float32), mask=m)
''')

RECORD = textwrap.dedent('''
    import sys, torch
    sys.path.insert(0, sys.argv[2])
    import triton_compile_check
    triton_compile_check.start_recording(sys.argv[1])
    import kernels_under_test as k
    x = torch.arange(16, dtype=torch.bfloat16)
    y = torch.empty(16)
    k.good_kernel[(1,)](x.view(torch.int16), y, 16, USE_RN=False, BF16_BITS=True, BLOCK=16)
    assert torch.equal(y, x.float()), y
    k.good_kernel[(1,)](x.float(), y, 16, USE_RN=False, BF16_BITS=False, BLOCK=16)
    k.good_kernel[(1,)](x.float(), y, 15, USE_RN=False, BF16_BITS=False, BLOCK=16)
    k.bad_kernel[(1,)](torch.ones(32), y, 1, BLOCK=16)
    assert y[0] == 16
    # MODE 2 and 3 fall in one specialization class of a runtime int (not 1, not divisible by
    # 16): as constexprs they are two kernels
    k.mode_kernel[(1,)](torch.ones(32), y, 16, MODE=2, BLOCK=16)
    k.mode_kernel[(1,)](torch.ones(32), y, 16, MODE=3, BLOCK=16)
    k.fp8_kernel[(1,)](torch.ones(16), y, 16, BLOCK=16)
''')


def _run(args, env_extra, cwd):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_extra)
    # not the repository root: the tool finds pypaper there itself, as tools/dev.sh runs it
    env["PYTHONPATH"] = str(cwd)
    return subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    work = tmp_path_factory.mktemp("tcc")
    (work / "kernels_under_test.py").write_text(KERNELS)
    (work / "record.py").write_text(RECORD)
    launches = work / "launches"
    out = _run(["record.py", str(launches), os.path.join(ROOT, "tools")],
               {"TRITON_INTERPRET": "1"}, work)
    assert out.returncode == 0, out.stderr[-3000:]
    return work, launches


def test_recording_names_each_launch_and_reduces_tensors_to_dtypes(recorded):
    _, launches = recorded
    lines = [json.loads(line) for f in sorted(launches.iterdir()) for line in f.open()]
    assert [r["kernel"].split(":")[1] for r in lines] == (["good_kernel"] * 3 + ["bad_kernel"]
                                                          + ["mode_kernel"] * 2 + ["fp8_kernel"])
    assert lines[0]["constexprs"] == ["USE_RN", "BF16_BITS", "BLOCK"]
    first = lines[0]["args"]
    assert first["x_ptr"] == {"tensor": "int16", "align16": True}
    assert first["n"] == 16 and first["BF16_BITS"] is True and first["USE_RN"] is False


def test_launches_are_rebuilt_as_a_gpu_would_make_them(recorded):
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    try:
        import triton_compile_check as tcc
    finally:
        sys.path.pop(0)
    _, launches = recorded
    distinct = tcc.load_launches(str(launches))
    # n = 16 and n = 15 specialize differently (divisibility by 16): both kept; so are
    # MODE=2 and MODE=3 (constexprs, each value a kernel)
    assert len(distinct) == 7
    gpu = tcc.as_gpu_launch(distinct[0])
    assert gpu["USE_RN"] is True and gpu["BF16_BITS"] is False
    assert gpu["x_ptr"]["tensor"] == "bfloat16" and gpu["y_ptr"]["tensor"] == "float32"


def _failed(out):
    return [line for line in out.stdout.splitlines() if line.startswith("FAILED")]


def test_compiling_for_hopper_reports_only_the_kernels_the_compiler_refuses(recorded):
    work, launches = recorded
    out = _run([TOOL, str(launches), "--arch", "90", "--jobs", "1"], {}, work)
    assert out.returncode == 1, out.stdout + out.stderr[-3000:]
    failed = _failed(out)
    assert len(failed) == 2, out.stdout
    assert "bad_kernel" in failed[0] and "mode_kernel" in failed[1] and '"MODE": 3' in failed[1]
    assert "7 distinct launches of 4 Triton kernels" in out.stdout


@pytest.mark.parametrize("archs", ["90,80", "80,90"])
def test_each_architecture_compiles_for_itself(recorded, archs):
    """fp8_kernel fails for sm_80 only, in either order (Triton's compile cache per device
    number must not carry the first architecture's target to the second)."""
    work, launches = recorded
    out = _run([TOOL, str(launches), "--arch", archs, "--jobs", "1"], {}, work)
    fp8 = [line for line in _failed(out) if "fp8_kernel" in line]
    assert len(fp8) == 1 and fp8[0].startswith("FAILED sm_80 "), out.stdout


def test_nothing_recorded_is_an_error_only_when_required(tmp_path):
    assert _run([TOOL, str(tmp_path)], {}, tmp_path).returncode == 0
    assert _run([TOOL, str(tmp_path), "--require-launches"], {}, tmp_path).returncode == 1
