#!/bin/bash
# MoE 125m with a capacity factor (12 layers, hidden 768, 12 heads, sequence 1024; 64 experts, top-1, capacity factor 1 by default)
# Usage: DATA_PATH=data/pile_text_document [NGPUS=8] exp/moe/moe_125m.sh EXP_DIR [TRAINING_STEPS] [NUM_EXPERTS] [CAPACITY_FACTOR] [TOP_K] [LOSS_WEIGHT] [BATCH_SIZE] [extra exp.train options]
set -euo pipefail
EXP_DIR=${1:?usage: exp/moe/moe_125m.sh EXP_DIR [TRAINING_STEPS] [NUM_EXPERTS] [CAPACITY_FACTOR] [TOP_K] [LOSS_WEIGHT] [BATCH_SIZE]}
TRAINING_STEPS=${2:-20000}
NUM_EXPERTS=${3:-64}
CAPACITY_FACTOR=${4:-1}
TOP_K=${5:-1}
LOSS_WEIGHT=${6:-0.1}
BATCH_SIZE=${7:-32}
shift $(( $# < 7 ? $# : 7 ))
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
mkdir -p "$EXP_DIR"
"$HERE/../launch.sh" exp/configs/moe_125m.json --save "$EXP_DIR" \
    --train-iters "$TRAINING_STEPS" --lr-decay-iters "$TRAINING_STEPS" \
    --moe-num-experts "$NUM_EXPERTS" --moe-capacity-factor "$CAPACITY_FACTOR" --moe-top-k "$TOP_K" \
    --moe-loss-weight "$LOSS_WEIGHT" --micro-batch-size "$BATCH_SIZE" "$@" 2>&1 | tee "$EXP_DIR/train.log"
