#!/bin/bash
# Launches exp/megatron/pretrain_gpt.py with torchrun on one node:
#   exp/megatron/launch.sh CONFIG.json [pretrain_gpt.py options...]
#   NGPUS       processes (default: the number of GPUs)
#   DATA_PATH   prefix of the Megatron-format .bin/.idx data (or pass --data-path / --mock-data)
#   MASTER_PORT (default 6001)
set -euo pipefail
CONFIG=${1:?usage: exp/megatron/launch.sh CONFIG.json [pretrain_gpt.py options...]}
shift
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PY=${PYTHON:-python}
if [ -z "${NGPUS:-}" ]; then
    NGPUS=$("$PY" -c "import torch; print(max(1, torch.cuda.device_count()))")
fi
DATA_ARGS=()
if [ -n "${DATA_PATH:-}" ]; then DATA_ARGS=(--data-path "$DATA_PATH"); fi
cd "$ROOT"
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NGPUS" --master_port "${MASTER_PORT:-6001}" \
    exp/megatron/pretrain_gpt.py --config "$CONFIG" "${DATA_ARGS[@]}" "$@"
