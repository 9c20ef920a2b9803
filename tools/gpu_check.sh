#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU whose python3 has a CUDA build of torch, nvcc,
# pytest and pytest-xdist (the lent H200 machines of this workplace's `device` tool; nothing is
# fetched there). Builds pypaper._C with the CUDA kernels, runs every test marked `cuda` or
# `triton` (the Triton kernels compiled, not interpreted), then the GPU benchmarks.
#
#   OUT=/tmp/out PYPAPER_COMMIT=$(git rev-parse --short HEAD) bash tools/gpu_check.sh [phase...]
#   phases, in this order by default (most wanted first): info build test-snn bench-snn
#   test-rest bench-snn-full test-quant bench-more; also test-snn-cuda (the CUDA LIF tests only)
#   and debug-segv (a backtrace of the crash seen on 2026-12-04)
#
# Device time is short, so each phase gets a time limit of its own, cut to what is left of
# GPU_CHECK_BUDGET seconds (default 540); a phase with under 20 s left is skipped. Logs, JUnit
# files and the benchmark CSVs go to $LOGS and are packed into $OUT/results.tgz after every
# phase (the device tool brings back at most 8 files), so a phase stopped by its limit still
# leaves what the earlier ones wrote. Python packages missing there (the peers)
# travel as wheels in .whl/ (GPU_CHECK_WHEELS; tools/gpu_wheels.sh) and go to /tmp/site.
# A built extension (pypaper/_C*.so, carried) skips the build unless GPU_CHECK_REBUILD=1.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/pypaper-gpu}
LOGS=${LOGS:-/tmp/pypaper-gpu-logs}
rm -rf "$LOGS"  # a warm machine keeps /tmp: only this run's logs go into this run's tarball
mkdir -p "$OUT" "$LOGS/bench"
PY=${PYTHON:-python3}
export PATH=$PATH:/usr/local/cuda/bin  # nvcc, where the image keeps it off PATH
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET:-540}
NPROC=$(nproc)

# phase NAME SECONDS CMD...: CMD (a command, or a function of this script) under `timeout`, its
# output in $LOGS/NAME.log, its tail here.
phase() {
  local name=$1 want=$2; shift 2
  declare -F "$1" >/dev/null && set -- bash -c '"$@"' _ "$@"  # a function, exported below
  local left=$(( BUDGET - ($(date +%s) - START) - 5 ))
  (( left < want )) && want=$left
  if (( want < 20 )); then echo "== $name: skipped (${left}s left)"; return 0; fi
  echo "== $(date +%T) $name (limit ${want}s)"
  local t0=$(date +%s)
  timeout -k 5 "$want" "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc in $(( $(date +%s) - t0 ))s"
  tail -n "${TAIL:-25}" "$LOGS/$name.log"
  tar czf "$OUT/results.tgz" -C "$LOGS" .
  return $rc
}

WHEELS=${GPU_CHECK_WHEELS:-.whl}
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$WHEELS"/*.whl >"$LOGS/wheels.log" 2>&1 || cat "$LOGS/wheels.log"
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
XDIST=(-n "$(( NPROC < 12 ? NPROC : 12 ))")
"$PY" -c "import xdist" 2>/dev/null || XDIST=()
PYTEST=(env OMP_NUM_THREADS=2 "$PY" -m pytest -p no:cacheprovider --tb=short -rfE "${XDIST[@]}")
"$PY" -c "import pytest_timeout" 2>/dev/null && PYTEST+=(--timeout 120)

info() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,temperature.gpu,power.draw \
    --format=csv
  "$PY" -c "import torch, sys; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0))"
  "$PY" -c "import triton; print('triton', triton.__version__)"
  nvcc --version | tail -2; echo "cores: $NPROC"; lscpu | grep -m1 'Model name'
  "$PY" -m pip list 2>/dev/null | grep -iE '^(spikingjelly|snntorch|torchao|dcls|mlxtend|pytest|pytest-xdist|hypothesis) '
}

build() {
  local so
  so=pypaper/_C$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
  if [ "${GPU_CHECK_REBUILD:-0}" != 1 ] && [ -f "$so" ]; then
    echo "using the carried $so"
  else
    # -g0: no debug info (a quarter less compile time for the template-heavy loops, and an
    # 11 MB library instead of 67); the CPU loops are built for this host as usual
    PYPAPER_CPU_ARCH="${PYPAPER_CPU_ARCH:--march=native} -g0" MAX_JOBS=$NPROC \
      "$PY" setup.py build_ext --inplace || return 1
    # back with the results (debug info stripped: 67 MB -> ~15), so that a later call can carry
    # it instead of building again
    strip --strip-debug -o /tmp/_C.so "$so" && gzip -c /tmp/_C.so >"$OUT/_C.so.gz"
  fi
  "$PY" -c "
import json, pypaper
info = pypaper.build_info(); print(json.dumps(info))
assert info['extension_loaded'] and info['cuda_kernels'], 'no CUDA kernels in pypaper._C'"
}

bench() {  # bench NAME ARGS...: one `python -m bench` run on the GPU, CSV rows under $LOGS/bench
  local name=$1; shift
  phase "$name" "${BENCH_LIMIT:-120}" "$PY" -m bench --device cuda --no-plot --no-progress \
    --csv-dir "$LOGS/bench" "$@"
}

SNN_PROVIDERS=pypaper,pypaper-cuda,pypaper-triton,spikingjelly,snntorch,reference

snn_quick() {
  # the issue's figure case at 2^20 neurons (2^18 x 32 steps x 4 B = 32 MiB would sit in the
  # 60 MB L2), and the single-step Linear(1024) + LIF loop; torch.compile's reference comes last
  # (bench-more): Inductor compiles the 32-step loop for a while, and a family's CSV is written
  # only when all its cases are done
  BENCH_LIMIT=70 bench bench-snn-quick --quick --family snn --numel $(( 1 << 25 )) \
    --providers "$SNN_PROVIDERS"
}

snn_full() {
  # T sweep, sizes, bf16, the Open Neuromorphic shape (Linear(n, n) + LIF, T = 500), SLTT memory
  # and the zoo model; no torch.compile'd reference here (Inductor compiles each shape anew)
  BENCH_LIMIT=120 bench bench-snn-full --full --repeats 10 --family snn \
    --case "LIF multi-step" --case "Linear(" --case "SLTT" --case "MNISTNet" \
    --providers "$SNN_PROVIDERS,pypaper-bptt,pypaper-sltt-online"
}

bench_more() {
  BENCH_LIMIT=120 bench bench-snn-compiled --quick --family snn --numel $(( 1 << 25 )) \
    --case "LIF multi-step" --providers pypaper,compiled-reference
  for fam in hopfield wtacrs local quant fewbit qlinear power delays; do
    BENCH_LIMIT=60 bench "bench-$fam" --quick --family "$fam"
  done
}

# -v: one line per test, so that a phase stopped by its limit still shows what failed
tests() { local name=$1 limit=$2; shift 2
  TAIL=40 phase "$name" "$limit" "${PYTEST[@]}" -v -m "cuda or triton" "$@" --junitxml="$LOGS/junit-$name.xml"
}

export PY NPROC OUT LOGS
export -f info build phase
phases=("$@")
(( ${#phases[@]} )) || phases=(info build test-snn bench-snn test-rest bench-snn-full test-quant bench-more)
for p in "${phases[@]}"; do
  case "$p" in
    info) TAIL=40 phase info 30 info ;;
    build) TAIL=15 phase build 300 build || { echo "build failed: build.log"; exit 1; } ;;
    test-snn) tests test-snn 100 tests/snn ;;
    test-snn-cuda) TAIL=40 phase test-snn-cuda 100 "${PYTEST[@]}" -v -m cuda tests/snn \
                     --junitxml="$LOGS/junit-test-snn-cuda.xml" ;;
    bench-snn) snn_quick ;;
    test-rest) tests test-rest 80 tests --ignore=tests/snn --ignore=tests/quant ;;
    bench-snn-full) snn_full ;;
    test-quant) tests test-quant 150 tests/quant ;;
    bench-more) bench_more ;;
    # the segfault of 2026-12-04 (tests/snn/test_lif_cuda.py, surrogate id 9, right after the
    # opcheck tests in one xdist worker): the host backtrace (cuda-gdb debugs host code too; there
    # is no gdb there), in one process, the opcheck tests first as they were; glibc's heap checks
    # on in the debugged program only, in case an earlier call corrupted the heap (since glibc
    # 2.34 MALLOC_CHECK_ needs libc_malloc_debug preloaded); rc is cuda-gdb's, read the log
    debug-segv) TAIL=60 phase debug-segv 90 cuda-gdb -batch \
                  -ex 'set exec-wrapper env LD_PRELOAD=libc_malloc_debug.so.0 MALLOC_CHECK_=3' \
                  -ex run -ex bt --args "$PY" -m pytest -p no:cacheprovider -p no:xdist -x -q \
                  tests/snn/test_lif_cuda.py -k "opcheck or bad_calls" ;;
    *) echo "unknown phase $p" >&2; exit 2 ;;
  esac
done
echo "== summary"
for f in "$LOGS"/test-*.log; do
  [ -f "$f" ] || continue
  echo "$(basename "$f"): $(grep -E '^=+ .*(passed|failed|error|skipped)' "$f" | tail -n 1)"
  grep -E '^(FAILED|ERROR) ' "$f" | cut -c1-220 | head -n 30
done
for f in "$LOGS"/bench-*.log; do [ -f "$f" ] && grep -E '^\| .*\| pypaper' "$f" | cut -c1-160 | head -n 12; done
echo "== done in $(( $(date +%s) - START ))s"
