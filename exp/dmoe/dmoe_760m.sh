#!/bin/bash
# dMoE 760m (dropless, 24 layers, hidden 1536, 16 heads, sequence 1024; 64 experts, top-1 by default)
# Usage: DATA_PATH=data/pile_text_document [NGPUS=8] exp/dmoe/dmoe_760m.sh EXP_DIR [TRAINING_STEPS] [NUM_EXPERTS] [TOP_K] [LOSS_WEIGHT] [BATCH_SIZE] [extra exp.train options]
set -euo pipefail
EXP_DIR=${1:?usage: exp/dmoe/dmoe_760m.sh EXP_DIR [TRAINING_STEPS] [NUM_EXPERTS] [TOP_K] [LOSS_WEIGHT] [BATCH_SIZE]}
TRAINING_STEPS=${2:-20000}
NUM_EXPERTS=${3:-64}
TOP_K=${4:-1}
LOSS_WEIGHT=${5:-0.1}
BATCH_SIZE=${6:-8}
shift $(( $# < 6 ? $# : 6 ))
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
mkdir -p "$EXP_DIR"
"$HERE/../launch.sh" exp/configs/dmoe_760m.json --save "$EXP_DIR" \
    --train-iters "$TRAINING_STEPS" --lr-decay-iters "$TRAINING_STEPS" \
    --moe-num-experts "$NUM_EXPERTS" --moe-top-k "$TOP_K" --moe-loss-weight "$LOSS_WEIGHT" \
    --micro-batch-size "$BATCH_SIZE" "$@" 2>&1 | tee "$EXP_DIR/train.log"
