#!/usr/bin/env bash
# FP8 on a GPU machine in one call: the FP8 tests (kernels compiled, bf16 included; the FP8 layers'
# gradient-accumulation fusion and the trainer's FP8 run among them), then the bench_fp8
# measurements of the targets (the products, serving replayed and again in interleaved rounds, the
# layer steps, alone and accumulating over micro-batches into main_grad) and the weight cache's bytes;
# then (`host`, also in `all`) the host's time to issue the bf16 and FP8 layer steps against their
# kernels' time (`host_costs.py --fp8-layers $FP8_HOST_LAYERS`: the exp/ trainer's layer among them).
#
#   scripts/fp8_gpu.sh LOG_DIR [tests|bench|host|all] [bench_fp8.py arguments]
#
# Without arguments for bench_fp8.py, the default set below. Each part is bounded
# ($TEST_TIMEOUT, $BENCH_TIMEOUT, $HOST_TIMEOUT seconds), so that a slow one cannot take the others' results with it.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG_DIR=${1:?usage: scripts/fp8_gpu.sh LOG_DIR [tests|bench|host|all] [bench_fp8.py arguments]}
PART=${2:-all}
shift $(( $# < 2 ? $# : 2 ))
mkdir -p "$LOG_DIR"
source scripts/device_env.sh
python3 -c "import torch, triton; print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)" \
  | tee "$LOG_DIR/env.txt"
echo "commit: ${MEGABLOCKS_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}" | tee -a "$LOG_DIR/env.txt"
if [ "$PART" = tests ] || [ "$PART" = all ]; then
  timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -ra -n "${PYTEST_WORKERS:-14}" tests/ops/test_fp8.py \
    tests/integrations/test_fp8_serving.py tests/layers/test_fp8_one_node.py tests/layers/test_fp8_mlp_node.py \
    tests/layers/test_fp8_dmoe.py \
    tests/integrations/test_hf.py tests/integrations/test_moefy.py tests/test_bench_fp8.py \
    tests/layers/test_grad_accumulation_fusion.py tests/exp/test_trainer.py -k "not test_trainer or fp8" \
    >"$LOG_DIR/pytest.log" 2>&1
  echo "pytest: rc=$? :: $(tail -n 1 "$LOG_DIR/pytest.log")"
fi
if [ "$PART" = bench ] || [ "$PART" = all ]; then
  if [ $# -eq 0 ]; then
    set -- --configs --weights --layers --serving olmoe qwen3moe mixtral --serving-rounds 7 \
      --layer-accumulate mixtral olmoe --dmoe-inference olmoe mixtral --cache-bytes olmoe qwen3moe mixtral
  fi
  timeout "${BENCH_TIMEOUT:-420}" python3 benchmarks/bench_fp8.py --out "$LOG_DIR" "$@" >"$LOG_DIR/bench_fp8.log" 2>&1
  echo "bench_fp8: rc=$? (log $LOG_DIR/bench_fp8.log)"
fi
if [ "$PART" = host ] || [ "$PART" = all ]; then
  timeout "${HOST_TIMEOUT:-300}" python3 benchmarks/host_costs.py \
    --fp8-layers "${FP8_HOST_LAYERS:-dmoe_125m,mb_paper,olmoe,mixtral}" >"$LOG_DIR/host_fp8_layers.log" 2>&1
  echo "host_costs: rc=$? :: $(grep -c HOST-BOUND "$LOG_DIR/host_fp8_layers.log") host-bound forms (log $LOG_DIR/host_fp8_layers.log)"
fi
