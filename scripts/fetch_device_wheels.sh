#!/usr/bin/env bash
# Fills .device-wheels/ with what an offline GPU machine (Python 3.12, x86-64) lacks for
# scripts/gpu_check.sh: the pure-Python test tools from the registry, plus any prebuilt wheels
# (stanford-stk, grouped_gemm, megatron-core) found in the folder given as $1.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.device-wheels
mkdir -p "$DEST"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform any \
  -d "$DEST" pytest-xdist execnet hypothesis attrs sortedcontainers 2>/dev/null \
  || python3 -m pip download -q --no-deps --python-version 3.12 -d "$DEST" pytest-xdist execnet hypothesis attrs sortedcontainers
if [ $# -ge 1 ]; then
  cp "$1"/*.whl "$DEST"/
fi
ls -1 "$DEST"
