#!/usr/bin/env bash
# Wheels of the peers for a GPU host that has no package index (tools/gpu_check.sh installs what
# it finds in .whl/ into /tmp/site there): pure-Python or abi3 wheels of the pinned versions in
# requirements/peers.txt that the GPU image lacks, and the one real need it lacks (loguru, for
# SpikingJelly). Run here, where pip reaches an index; .whl/ is ignored by git and travels with
# the device tool's `carry`.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl $(grep -hoE '^(spikingjelly|snntorch|dcls|mlxtend|torchao|loguru)==[^ ]+' \
             requirements/peers.txt requirements/dev.txt)
ls -la .whl
