#!/usr/bin/env bash
# Time to quality on one GPU: each config trains for the same training time (SECONDS_EACH of
# steps, evaluations left out) on the byte corpus of this machine's installed Python sources
# (exp.data.pycorpus, hundreds of MB: no byte repeats within the run), with the same constant
# learning rate after a short warm-up; then the validation loss against training time is plotted
# and each run's final loss is looked up on the others' curves (exp.plot --x time).
#
#   scripts/time_to_quality_gpu.sh LOG_DIR [CONFIG...]     (default: gpt2_125m dmoe_125m)
#
# Environment: DATA_DIR (default /tmp/time-to-quality-data), SECONDS_EACH (default 600), PRECISION (default bf16-params), MICRO_BATCH (16, one
# micro-batch a step), TRAIN_ITERS (20000: the schedule and the data index; the clock stops first), EVAL_INTERVAL (200), EVAL_ITERS (8), LR (6e-4), WARMUP (100), EXTRA.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG_DIR=${1:?usage: scripts/time_to_quality_gpu.sh LOG_DIR [CONFIG...]}
shift
CONFIGS=("$@")
[ ${#CONFIGS[@]} -eq 0 ] && CONFIGS=(gpt2_125m dmoe_125m)
mkdir -p "$LOG_DIR"
source scripts/device_env.sh
DATA="${DATA_DIR:-/tmp/time-to-quality-data}/python_sources"  # ~0.5 GB: kept out of LOG_DIR
python3 -m exp.data.pycorpus "$DATA" --scope installed | tee "$LOG_DIR/corpus.txt" || exit 1
MB=${MICRO_BATCH:-16}
RUNS=()
for config in "${CONFIGS[@]}"; do
  run="$LOG_DIR/runs/$config"
  rm -rf "$run"
  python3 -m exp.train --config "$config" --data-path "$DATA" --save "$run" --precision "${PRECISION:-bf16-params}" \
    --train-iters "${TRAIN_ITERS:-20000}" --exit-duration-s "${SECONDS_EACH:-600}" --lr "${LR:-6e-4}" --lr-warmup-iters "${WARMUP:-100}" \
    --lr-decay-style constant --eval-interval "${EVAL_INTERVAL:-200}" --eval-iters "${EVAL_ITERS:-8}" \
    --log-interval 50 --save-interval 100000000 --micro-batch-size "$MB" --global-batch-size "$MB" --no-progress --no-checkpoint \
    --no-plot ${EXTRA:-} >"$LOG_DIR/$config.log" 2>&1
  echo "$config rc=$?: $(tail -n 1 "$run/valid.csv")" | tee -a "$LOG_DIR/summary.txt"
  RUNS+=("$run")
done
python3 - "$DATA" "$MB" "${RUNS[@]}" <<'PY' | tee -a "$LOG_DIR/summary.txt"
import sys
from exp.data.indexed_dataset import IndexedDataset
from exp.log import read_csv
tokens = IndexedDataset(sys.argv[1]).num_tokens
for run in sys.argv[3:]:
    rows = read_csv(run + "/train.csv")
    used = rows[-1]["consumed_samples"] * 1025 if rows else 0
    print(f"{run}: {int(rows[-1]['iteration']) if rows else 0} steps, {used / 1e6:.1f}M tokens read of the corpus' "
          f"{tokens / 1e6:.1f}M ({used / tokens:.2f} of one pass)")
PY
python3 -m exp.plot "${RUNS[@]}" --x time --out "$LOG_DIR/time_to_quality.png" \
  --title "validation loss against training time, one GPU" | tee -a "$LOG_DIR/summary.txt"
