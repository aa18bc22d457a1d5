#!/bin/bash
# Launches exp.train with torchrun on one node: launch.sh CONFIG.json [exp.train options...]
#   NGPUS     processes (default: the number of GPUs, or 1 without one)
#   DATA_PATH prefix of the Megatron-format .bin/.idx data (required unless given as --data-path)
#   MASTER_PORT (default 6000)
# Expert parallelism: add --expert-parallel-size N (exp/dmoe_ep.sh does, with N = NGPUS by default).
set -euo pipefail
CONFIG=$1; shift
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python}
if [ -z "${NGPUS:-}" ]; then
    NGPUS=$("$PY" -c "import torch; print(max(1, torch.cuda.device_count()))")
fi
DATA_ARGS=()
if [ -n "${DATA_PATH:-}" ]; then DATA_ARGS=(--data-path "$DATA_PATH"); fi
cd "$ROOT"
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NGPUS" --master_port "${MASTER_PORT:-6000}" \
    -m exp.train --config "$CONFIG" "${DATA_ARGS[@]}" "$@"
