#!/usr/bin/env bash
# Before/after on a GPU machine: bench_dmoe and bench_fused_moe from an older tree (OLD_TREE, a
# copy of megablocks/, benchmarks/ and scripts/ at the older commit) and from this one, in
# interleaved rounds, each run in its own processes; CSVs and logs under LOG_DIR.
#
#   scripts/ab_bench_gpu.sh OLD_TREE LOG_DIR [ROUNDS]
set -uo pipefail
cd "$(dirname "$0")/.."
OLD=${1:?usage: scripts/ab_bench_gpu.sh OLD_TREE LOG_DIR [ROUNDS]}
LOG_DIR=${2:?usage: scripts/ab_bench_gpu.sh OLD_TREE LOG_DIR [ROUNDS]}
ROUNDS=${3:-2}
OLD=$(cd "$OLD" && pwd)
mkdir -p "$LOG_DIR"
LOG_DIR=$(cd "$LOG_DIR" && pwd)
source scripts/device_env.sh
NEW=$PWD
SITE_PATH=${PYTHONPATH#*:}
CONFIGS=${AB_CONFIGS:-mixtral,qwen3moe,mixtral_t64,qwen3_t64,qwen3_decode}
run() {  # tree label round
  local tree=$1 label=$2 round=$3
  (cd "$tree" && PYTHONPATH="$tree:$SITE_PATH" timeout "${DMOE_TIMEOUT:-150}" python3 benchmarks/bench_dmoe.py \
     --out "$LOG_DIR/dmoe_${label}${round}" --configs "$CONFIGS" \
     --contenders sparse,grouped_triton,torch_grouped_mm --modes fwd,fwdbwd --rep "${REP:-100}" \
     >"$LOG_DIR/dmoe_${label}${round}.log" 2>&1)
  echo "bench_dmoe $label round $round: rc=$?"
  (cd "$tree" && PYTHONPATH="$tree:$SITE_PATH" timeout "${MOE_TIMEOUT:-60}" python3 benchmarks/bench_fused_moe.py \
     --out "$LOG_DIR/fused_moe_${label}${round}" --configs mixtral qwen3moe --tokens 64 1024 \
     >"$LOG_DIR/fused_moe_${label}${round}.log" 2>&1)
  echo "bench_fused_moe $label round $round: rc=$?"
}
for round in $(seq 1 "$ROUNDS"); do
  if [ $((round % 2)) -eq 1 ]; then run "$OLD" old "$round"; run "$NEW" new "$round"
  else run "$NEW" new "$round"; run "$OLD" old "$round"; fi
done
