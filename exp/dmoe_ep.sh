#!/bin/bash
# dMoE training with expert parallelism on one node: each of the NGPUS processes holds
# NUM_EXPERTS / EP_SIZE experts of every layer; tokens reach their experts by all_to_all.
# Usage: DATA_PATH=data/pile_text_document [NGPUS=8] [EP_SIZE=$NGPUS] exp/dmoe_ep.sh CONFIG.json EXP_DIR [extra exp.train options]
# e.g.   DATA_PATH=data/pile_text_document exp/dmoe_ep.sh exp/configs/dmoe_356m.json runs/dmoe_356m_ep8
# which runs
#   torchrun --standalone --nproc_per_node 8 -m exp.train --config exp/configs/dmoe_356m.json \
#       --data-path data/pile_text_document --save runs/dmoe_356m_ep8 --expert-parallel-size 8
# EP_SIZE must divide NGPUS and divide the config's expert count (or be a multiple of it).
set -euo pipefail
CONFIG=${1:?usage: exp/dmoe_ep.sh CONFIG.json EXP_DIR [extra exp.train options]}
EXP_DIR=${2:?usage: exp/dmoe_ep.sh CONFIG.json EXP_DIR [extra exp.train options]}
shift 2
PY=${PYTHON:-python}
if [ -z "${NGPUS:-}" ]; then
    NGPUS=$("$PY" -c "import torch; print(max(1, torch.cuda.device_count()))")
fi
export NGPUS
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
mkdir -p "$EXP_DIR"
"$HERE/launch.sh" "$CONFIG" --save "$EXP_DIR" --expert-parallel-size "${EP_SIZE:-$NGPUS}" "$@" 2>&1 | tee "$EXP_DIR/train.log"
