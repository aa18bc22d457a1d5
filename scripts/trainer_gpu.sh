#!/usr/bin/env bash
# The exp/ trainer's throughput on one GPU: each config in each precision trains ITERS steps on
# the demo corpus (exp/demo.py: byte tokens of the standard library's source), and the median
# tokens/s and step time of its logged steps after the first LOG_INTERVAL are printed.
#
#   scripts/trainer_gpu.sh LOG_DIR [CONFIG...]        (default: gpt2_125m dmoe_125m moe_125m)
#
# Environment: PRECISIONS (default "bf16 bf16-params"), ITERS (default 30), LOG_INTERVAL (5),
# MICRO_BATCH (16: micro-batch 16 x 1024 tokens), GLOBAL_BATCH (default MICRO_BATCH: one
# micro-batch a step; a multiple of it accumulates gradients over several), EXTRA (more exp.train
# options, e.g. --phase-times), ROUNDS (default 1: each config once; N > 1 runs the configs N times
# in turn, A B A B ..., so that a change in the machine during the call shows in every config).
# A CONFIG may carry exp.train options of its own after a colon, e.g. "dmoe_125m:--mlp-impl sparse".
set -uo pipefail
cd "$(dirname "$0")/.."
LOG_DIR=${1:?usage: scripts/trainer_gpu.sh LOG_DIR [CONFIG...]}
shift
CONFIGS=("$@")
[ ${#CONFIGS[@]} -eq 0 ] && CONFIGS=(gpt2_125m dmoe_125m moe_125m)
mkdir -p "$LOG_DIR"
source scripts/device_env.sh
DATA="${DATA_DIR:-/tmp/trainer-gpu-data}/stdlib_text_document"
python3 -c "from exp.demo import build_corpus; print(build_corpus('$DATA'))"
ITERS=${ITERS:-30}; LOG=${LOG_INTERVAL:-5}; MB=${MICRO_BATCH:-16}
for round in $(seq 1 "${ROUNDS:-1}"); do
for precision in ${PRECISIONS:-bf16 bf16-params}; do
  for spec in "${CONFIGS[@]}"; do
    config=${spec%%:*}; own=""; [ "$spec" != "$config" ] && own=${spec#*:}
    tag=$(echo "$spec" | tr -c 'A-Za-z0-9_\n-' '_')
    [ "${ROUNDS:-1}" -gt 1 ] && tag="${tag}_r$round"
    run="$LOG_DIR/runs/${tag}_$precision"
    rm -rf "$run"
    python3 -m exp.train --config "$config" --data-path "$DATA" --save "$run" --precision "$precision" \
      --train-iters "$ITERS" --lr-decay-iters "$ITERS" --log-interval "$LOG" --eval-interval 100000 \
      --eval-iters 1 --save-interval 100000 --micro-batch-size "$MB" --global-batch-size "${GLOBAL_BATCH:-$MB}" \
      --no-progress --no-checkpoint ${EXTRA:-} $own >"$LOG_DIR/${tag}_$precision.log" 2>&1
    echo "$spec $precision round $round rc=$? $(python3 - "$run/train.csv" "$LOG" <<'PY'
import csv, statistics, sys
rows = [r for r in csv.DictReader(open(sys.argv[1])) if int(r["iteration"]) > int(sys.argv[2])]
def med(k):
    vals = [float(r[k]) for r in rows if r.get(k) not in (None, "")]
    return statistics.median(vals) if vals else float("nan")

extra = " ".join(f"{k} {med(k):.1f}" for k in ("fwd_ms", "bwd_ms", "clip_ms", "optim_ms") if rows and rows[0].get(k))
print(f"tokens/s {med('tokens_per_s'):.0f} step_ms {med('step_ms'):.1f} mfu {med('mfu'):.3f} loss {rows[-1]['loss']} {extra}")
PY
)" | tee -a "$LOG_DIR/summary.txt"
  done
done
done
