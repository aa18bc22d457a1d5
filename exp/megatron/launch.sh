#!/bin/bash
# Trains a config of exp/megatron/configs/ with pretrain_gpt.py under torchrun: exp/launch.sh --megatron.
#   exp/megatron/launch.sh NAME|CONFIG.json [EXP_DIR [TRAINING_STEPS [EP_SIZE]]] [pretrain_gpt.py options...]
# e.g. DATA_PATH=data/corpus_text_document exp/megatron/launch.sh dmoe_46m runs/mcore_dmoe_46m 20000 8
exec "$(dirname "${BASH_SOURCE[0]}")/../launch.sh" --megatron "$@"
