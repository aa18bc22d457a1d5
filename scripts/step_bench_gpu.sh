#!/usr/bin/env bash
# The training-step measurements of benchmarks/RESULTS.md ("The training step as training runs
# it") in one go on a GPU machine: bench_dmoe over every default layer (breakdown by stage), the
# tests of the paths it times, then the op benchmarks whose backward changed method.
#
#   scripts/step_bench_gpu.sh LOG_DIR
set -uo pipefail
cd "$(dirname "$0")/.."
LOG_DIR=${1:?usage: scripts/step_bench_gpu.sh LOG_DIR}
mkdir -p "$LOG_DIR"
source scripts/device_env.sh
git rev-parse --short HEAD 2>/dev/null | tee "$LOG_DIR/commit.txt"
# Each part bounded, so that a slow one cannot take the others' results with it.
timeout "${BENCH_TIMEOUT:-240}" python3 benchmarks/bench_dmoe.py --out "$LOG_DIR" --contenders sparse,grouped_triton,torch_grouped_mm \
  --breakdown --rep "${REP:-300}" >"$LOG_DIR/bench_dmoe.log" 2>&1
echo "bench_dmoe: rc=$?"
timeout "${TEST_TIMEOUT:-200}" python3 -m pytest -q -n "${PYTEST_WORKERS:-12}" tests/layers/test_grad_layout.py tests/ops/test_sparse.py \
  tests/layers/test_dmoe.py tests/ops/test_eager.py tests/test_bench_dmoe.py tests/layers/test_graphs.py \
  tests/reliability/test_validation.py tests/integrations/test_megatron.py \
  "tests/integrations/test_hf.py::test_gradients_in_parameter_layout" >"$LOG_DIR/pytest.log" 2>&1
echo "pytest: rc=$? :: $(tail -n 1 "$LOG_DIR/pytest.log")"
for b in activation permute; do
  timeout "${OP_TIMEOUT:-60}" python3 "benchmarks/bench_$b.py" --out "$LOG_DIR" >"$LOG_DIR/bench_$b.log" 2>&1
  echo "bench_$b: rc=$?"
done
