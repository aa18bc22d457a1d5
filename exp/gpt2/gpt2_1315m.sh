#!/bin/bash
# GPT-2 1315m dense: 24 layers, hidden 2048, 16 heads, sequence 1024
# Usage: DATA_PATH=data/pile_text_document [NGPUS=8] exp/gpt2/gpt2_1315m.sh EXP_DIR [TRAINING_STEPS] [extra exp.train options]
set -euo pipefail
EXP_DIR=${1:?usage: exp/gpt2/gpt2_1315m.sh EXP_DIR [TRAINING_STEPS]}
TRAINING_STEPS=${2:-100000}
shift $(( $# < 2 ? $# : 2 ))
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
mkdir -p "$EXP_DIR"
"$HERE/../launch.sh" exp/configs/gpt2_1315m.json --save "$EXP_DIR" \
    --train-iters "$TRAINING_STEPS" --lr-decay-iters "$TRAINING_STEPS" "$@" 2>&1 | tee "$EXP_DIR/train.log"
