#!/usr/bin/env bash
# The exp/ trainer with FP8 experts against bf16 on one GPU: dmoe_125m (grouped experts, bf16
# parameters with fp32 main weights, a constant learning rate) trained from the same seed on the
# demo corpus (exp/demo.py) with --fp8 none and --fp8 blockwise. Each run's train.csv and
# valid.csv go to LOG_DIR/runs/{bf16,fp8}/ (plot them with `python -m exp.plot`; copies beside
# the logs as {bf16,fp8}_{train,valid}.csv), and
# LOG_DIR/summary.txt gets the loss every 50 steps, the validations and the median step time.
#
#   scripts/fp8_train_gpu.sh LOG_DIR
#
# Environment: ITERS (default 200), MICRO_BATCH (16: 16 x 1024 tokens), GLOBAL_BATCH (default
# MICRO_BATCH; a multiple accumulates gradients over micro-batches, the weights quantized once a
# step), EVAL_INTERVAL (100), EXTRA (more exp.train options, both runs), FP8_POLICY (a kernel policy
# as JSON for the FP8 run only, e.g. '{"fp8_weight_grad":true}': its weight gradients in FP8 too).
set -uo pipefail
cd "$(dirname "$0")/.."
LOG_DIR=${1:?usage: scripts/fp8_train_gpu.sh LOG_DIR}
mkdir -p "$LOG_DIR/runs"
source scripts/device_env.sh
DATA="${DATA_DIR:-/tmp/trainer-gpu-data}/stdlib_text_document"
python3 -c "from exp.demo import build_corpus; print(build_corpus('$DATA'))"
ITERS=${ITERS:-200}; MB=${MICRO_BATCH:-16}
for mode in bf16:none fp8:blockwise; do
  name=${mode%%:*}
  run="$LOG_DIR/runs/$name"
  rm -rf "$run"
  policy=()
  if [ "$name" = fp8 ] && [ -n "${FP8_POLICY:-}" ]; then policy=(--kernel-policy "$FP8_POLICY"); fi
  python3 -m exp.train --config dmoe_125m --data-path "$DATA" --save "$run" --mlp-impl grouped --fp8 "${mode#*:}" \
    --precision bf16-params --train-iters $((ITERS * 10)) --exit-iteration "$ITERS" --lr-decay-style constant \
    --eval-interval "${EVAL_INTERVAL:-100}" --eval-iters 4 --log-interval 10 --micro-batch-size "$MB" \
    --global-batch-size "${GLOBAL_BATCH:-$MB}" --no-progress --no-checkpoint "${policy[@]}" ${EXTRA:-} \
    >"$LOG_DIR/$name.log" 2>&1
  echo "$name: rc=$?"
  for f in train valid; do cp "$run/$f.csv" "$LOG_DIR/${name}_$f.csv" 2>/dev/null; done
done
python3 - "$LOG_DIR" <<'PY' | tee "$LOG_DIR/summary.txt"
import csv, os, statistics, sys
runs = os.path.join(sys.argv[1], "runs")
read = lambda name, f: list(csv.DictReader(open(os.path.join(runs, name, f))))  # noqa: E731
for name in ("bf16", "fp8"):
    train, valid = read(name, "train.csv"), read(name, "valid.csv")
    loss = {int(r["iteration"]): float(r["lm_loss"]) for r in train}
    marks = " / ".join(f"{loss[i]:.4f}" for i in sorted(loss) if i % 50 == 0)
    vals = " / ".join(f"{int(r['iteration'])}: {float(r['valid_loss']):.4f}" for r in valid)
    step = statistics.median(float(r["step_ms"]) for r in train[1:])
    print(f"{name}: lm loss every 50 steps {marks}; validation {vals}; median step {step:.1f} ms")
PY
