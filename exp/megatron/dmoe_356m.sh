#!/bin/bash
# megatron-core GPT with megablocks dMoE MLPs, the MegaBlocks dmoe_356m size (64 experts, top-1, bf16).
# Usage: DATA_PATH=data/pile_text_document [NGPUS=8] exp/megatron/dmoe_356m.sh EXP_DIR [TRAINING_STEPS] [EP_SIZE] [extra pretrain_gpt.py options]
set -euo pipefail
EXP_DIR=${1:?usage: exp/megatron/dmoe_356m.sh EXP_DIR [TRAINING_STEPS] [EP_SIZE]}
TRAINING_STEPS=${2:-20000}
EP_SIZE=${3:-1}
shift $(( $# < 3 ? $# : 3 ))
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
mkdir -p "$EXP_DIR"
"$HERE/launch.sh" exp/megatron/configs/dmoe_356m.json --save "$EXP_DIR" --bf16 \
    --train-iters "$TRAINING_STEPS" --expert-model-parallel-size "$EP_SIZE" "$@" 2>&1 | tee "$EXP_DIR/train.log"
