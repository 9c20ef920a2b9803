#!/usr/bin/env bash
# One entry point for a fresh machine (Python 3.11, no GPU needed):
#   bash tools/dev.sh bench     set up, build, run the benchmark suite in quick mode (prints the table)
#   bash tools/dev.sh test      set up, build, run ctest (C++ tests + CUDA compile proof), pytest and
#                               the Triton compile check (tools/triton_compile_check.py)
#   bash tools/dev.sh setup     set up and build only
#   bash tools/dev.sh wheel     build a wheel and install it into a fresh venv that has torch
# Extra arguments after bench/test go to `python -m bench` / pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
VENV=${PYPAPER_VENV:-$ROOT/.venv}
# nvcc where the machine has one; the venv's ninja and cmake-friendly tools first
export PATH="$VENV/bin:$PATH:/usr/local/cuda/bin"

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    echo "== creating $VENV"
    "$PY" -m venv "$VENV"
  fi
  # torch==2.13.0 is pinned: a plain "torch" would pull a multi-GB CUDA build.
  # PYPAPER_TORCH=<version> (with PYPAPER_VENV=<another venv>) sets up against that torch instead
  # (and the Triton it brings): how pypaper is checked on other torch releases (README, "Torch
  # versions"). From PyPI that is a CUDA build: PYPAPER_CUDA=0 keeps the build CPU-only.
  if [ -n "${PYPAPER_TORCH:-}" ]; then
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "torch==$PYPAPER_TORCH"
    grep -v -E '^(torch|triton)==' requirements/dev.txt >"$VENV/dev-without-torch.txt"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$VENV/dev-without-torch.txt"
    # Triton < 3.8's interpreter calls int() on 0-d numpy arrays, an error from numpy 2.4 on
    # ("only 0-dimensional arrays can be converted to Python scalars" became a TypeError): seen
    # with torch 2.11's Triton 3.6
    if "$VENV/bin/python" -c "import sys, triton; v = tuple(map(int, triton.__version__.split('.')[:2])); sys.exit(v >= (3, 8))" 2>/dev/null; then
      "$VENV/bin/python" -m pip install -q --disable-pip-version-check "numpy<2.4"
    fi
  else
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r requirements/dev.txt
  fi
  # Peers that declare torch: --no-deps keeps the pinned CPU torch (requirements/peers.txt).
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps -r requirements/peers.txt
  # In place, so ninja rebuilds only what changed (build/); the jobs run from the repository
  # root, where the package is importable. (`pip install --no-build-isolation -e .` works too
  # but rebuilds everything in a temporary directory each time.)
  echo "== building pypaper._C in place (ninja, incremental)"
  mkdir -p build
  if ! MAX_JOBS=${MAX_JOBS:-2} "$VENV/bin/python" setup.py build_ext --inplace >build/build_ext.log 2>&1; then
    cat build/build_ext.log
    echo "build failed (log above: build/build_ext.log)" >&2
    exit 1
  fi
  "$VENV/bin/python" -c "import pypaper, json; print(json.dumps(pypaper.build_info()))"
}

ctest_build() {
  echo "== CMake: C++ unit tests and the CUDA compile proof"
  local req=OFF
  command -v nvcc >/dev/null && req=ON
  cmake -S . -B build-cmake -G Ninja -DPython3_EXECUTABLE="$VENV/bin/python" \
    -DPYPAPER_REQUIRE_CUDA=$req >/dev/null
  cmake --build build-cmake
  ctest --test-dir build-cmake --output-on-failure
}

wheel() {
  echo "== wheel: build, then install into a fresh venv that has torch"
  rm -rf dist build-wheel-venv
  trap 'rm -rf "$ROOT/build-wheel-venv"' EXIT
  "$VENV/bin/python" -m pip wheel -q --no-build-isolation --no-deps -w dist .
  "$PY" -m venv build-wheel-venv
  build-wheel-venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0 numpy
  build-wheel-venv/bin/python -m pip install -q --disable-pip-version-check --no-deps dist/pypaper-*.whl
  (cd /tmp && "$ROOT/build-wheel-venv/bin/python" -c "
import torch, pypaper
from pypaper.quant import fake_quantize, quantize, dequantize
info = pypaper.build_info(); assert info['extension_loaded'], info
x = torch.randn(1000)
assert (dequantize(quantize(x)) - x).abs().max() < 0.05
print('wheel OK:', pypaper.__file__, info['simd'])")
  rm -rf build-wheel-venv
}

# pytest, recording each Triton launch it interprets (tests/conftest.py), then those launches
# compiled for NVIDIA Hopper (sm_90) by Triton's compiler and ptxas: the interpreter accepts kernels
# the compiler refuses, and the GPU-only paths (inline PTX, bf16 pointers) are never interpreted.
# Where a GPU ran the kernels compiled, nothing is recorded and the check is skipped.
test_python() {
  local launches=$ROOT/build/triton-launches require=()
  rm -rf "$launches"
  [ $# -eq 0 ] && require=(--require-launches)
  PYPAPER_TRITON_LAUNCHES=$launches "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
  if [ -d "$launches" ]; then
    echo "== Triton kernels compiled for sm_90 (the launches pytest interpreted)"
    "$VENV/bin/python" tools/triton_compile_check.py "$launches" --arch 90 "${require[@]}"
  else
    echo "== Triton compile check skipped: no interpreted launches were recorded"
  fi
}

cmd=${1:-test}
shift || true
case "$cmd" in
  setup) setup ;;
  bench) setup; "$VENV/bin/python" -m bench --quick "$@" ;;
  test) setup; ctest_build; test_python "$@" ;;
  wheel) setup; wheel ;;
  *) echo "usage: bash tools/dev.sh [setup|bench|test|wheel] [args]" >&2; exit 2 ;;
esac
