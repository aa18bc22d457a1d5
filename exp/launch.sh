#!/bin/bash
# Trains one config on one node with torchrun, from the repository root.
#
#   exp/launch.sh NAME|CONFIG.json [EXP_DIR [ARG...]] [exp.train options...]
#   exp/launch.sh --megatron NAME|CONFIG.json [EXP_DIR [ARG...]] [pretrain_gpt.py options...]
#
# NAME is a config in exp/configs/ without .json (dmoe_125m); with --megatron, a config in
# exp/megatron/configs/, trained by exp/megatron/pretrain_gpt.py instead of exp.train.
# EXP_DIR is the run directory (--save); the output is also copied to EXP_DIR/train.log.
# The ARGs after it are those of MegaBlocks' scripts for the config's family; each one left out
# keeps the config's value, and they end at the first option:
#   gpt2_*       TRAINING_STEPS
#   dmoe_*       TRAINING_STEPS NUM_EXPERTS TOP_K LOSS_WEIGHT BATCH_SIZE
#   moe_*        TRAINING_STEPS NUM_EXPERTS CAPACITY_FACTOR TOP_K LOSS_WEIGHT BATCH_SIZE
#   --megatron   TRAINING_STEPS EP_SIZE
# TRAINING_STEPS sets --train-iters (and exp.train's --lr-decay-iters, so the decay ends with the run).
#
# Environment:
#   NGPUS        processes (default: the number of GPUs, or 1 without one)
#   DATA_PATH    prefix of the Megatron-format .bin/.idx data (or pass --data-path)
#   MASTER_PORT  default 6000 (6001 with --megatron, so both can run at once)
#   PYTHON       the interpreter (default python)
#   DRY_RUN=1    print the command instead of running it
#
# e.g. DATA_PATH=data/pile_text_document exp/launch.sh dmoe_46m runs/dmoe_46m 20000 64 1 0.1 64
#      DATA_PATH=data/pile_text_document exp/launch.sh dmoe_356m runs/dmoe_356m_ep8 --expert-parallel-size 8
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python}
PROGRAM=(-m exp.train)
PORT=6000
FAMILY=
if [ "${1:-}" = --megatron ]; then
    shift
    PROGRAM=(exp/megatron/pretrain_gpt.py)
    PORT=6001
    FAMILY=megatron
fi
if [ $# -eq 0 ] || [ "$1" = -h ] || [ "$1" = --help ]; then
    sed -n '2,/^set /{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}"  # the header above is the usage
    if [ $# -eq 0 ]; then exit 2; fi
    exit 0
fi

CONFIG=$1
shift
if [ -z "$FAMILY" ]; then
    NAME=$(basename "$CONFIG" .json)
    FAMILY=${NAME%%_*}
fi
case $FAMILY in
    megatron) POSITIONAL=(--train-iters --expert-model-parallel-size) ;;
    gpt2) POSITIONAL=(--train-iters) ;;
    dmoe) POSITIONAL=(--train-iters --moe-num-experts --moe-top-k --moe-loss-weight --micro-batch-size) ;;
    moe) POSITIONAL=(--train-iters --moe-num-experts --moe-capacity-factor --moe-top-k --moe-loss-weight --micro-batch-size) ;;
    *) POSITIONAL=() ;;
esac

ARGS=(--config "$CONFIG")
if [ -n "${DATA_PATH:-}" ]; then ARGS+=(--data-path "$DATA_PATH"); fi
EXP_DIR=
if [ $# -gt 0 ] && [[ $1 != -* ]]; then
    EXP_DIR=$1
    shift
    ARGS+=(--save "$EXP_DIR")
    for flag in "${POSITIONAL[@]}"; do
        if [ $# -eq 0 ] || [[ $1 == -* ]]; then break; fi
        ARGS+=("$flag" "$1")
        if [ "$flag" = --train-iters ] && [ "$FAMILY" != megatron ]; then ARGS+=(--lr-decay-iters "$1"); fi
        shift
    done
fi

if [ -z "${NGPUS:-}" ]; then
    NGPUS=$("$PY" -c "import torch; print(max(1, torch.cuda.device_count()))")
fi
CMD=("$PY" -m torch.distributed.run --standalone --nproc_per_node "$NGPUS" --master_port "${MASTER_PORT:-$PORT}"
     "${PROGRAM[@]}" "${ARGS[@]}" "$@")

if [ "${DRY_RUN:-0}" = 1 ]; then
    printf '( cd %q && exec' "$ROOT"
    printf ' %q' "${CMD[@]}"
    printf ' )'
    if [ -n "$EXP_DIR" ]; then printf ' 2>&1 | tee %q' "$EXP_DIR/train.log"; fi
    printf '\n'
    exit 0
fi
if [ -z "$EXP_DIR" ]; then
    cd "$ROOT"
    exec "${CMD[@]}"
fi
mkdir -p "$EXP_DIR"
( cd "$ROOT" && exec "${CMD[@]}" ) 2>&1 | tee "$EXP_DIR/train.log"
