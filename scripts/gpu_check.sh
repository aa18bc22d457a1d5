#!/usr/bin/env bash
# GPU check: installs the wheels the GPU machine lacks, runs the test suite on CUDA tensors
# (Triton compiled, bf16 included), optionally the benchmarks, and prints a summary last.
#
#   scripts/gpu_check.sh LOG_DIR [--bench] [--csrc]
#
# --bench runs every benchmarks/bench_*.py, or only those named in $BENCHES (e.g. "permute csrc").
# $TEST_PATHS (default: tests) picks a part of the suite, to split a run across calls; -k=EXPR
# passes a pytest selection.
# Wheels are taken from $MEGABLOCKS_WHEELS (default: .device-wheels/) when that folder exists
# (scripts/fetch_device_wheels.sh fills it): stanford-stk, grouped_gemm for the [gg] extra,
# megatron-core, and the test tools (pytest-xdist, hypothesis). --csrc builds the optional CUDA
# ops first.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG_DIR=${1:?usage: scripts/gpu_check.sh LOG_DIR [--bench] [--csrc]}
shift
BENCH=0; CSRC=0; PYTEST_ARGS=()
for arg in "$@"; do
  case "$arg" in
    --bench) BENCH=1 ;;
    --csrc) CSRC=1 ;;
    -k=*) PYTEST_ARGS+=(-k "${arg#-k=}") ;;
    *) echo "unknown option $arg" >&2; exit 2 ;;
  esac
done
mkdir -p "$LOG_DIR"
source scripts/device_env.sh

python3 - <<'PY' | tee "$LOG_DIR/env.txt"
import subprocess, torch, triton
print("gpu:", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
print("torch:", torch.__version__, "triton:", triton.__version__, "cuda:", torch.version.cuda)
try:
    import stk; print("stk: ok")
except Exception as e: print("stk:", e)
try:
    import grouped_gemm; print("grouped_gemm: ok")
except Exception as e: print("grouped_gemm:", e)
import os
git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
print("commit:", os.environ.get("MEGABLOCKS_COMMIT") or git.stdout.strip() or "unknown")
PY

status=()
if [ "$CSRC" = 1 ]; then
  ( MEGABLOCKS_BUILD_CUDA=1 python3 setup.py build_ext --inplace ) >"$LOG_DIR/csrc_build.log" 2>&1
  status+=("csrc build: rc=$?")
fi

# Kernel compilation dominates the suite's time on a GPU: spread the tests over worker processes
# when pytest-xdist is importable ($PYTEST_WORKERS, default 8; 0 turns it off).
if [ "${PYTEST_WORKERS:-8}" != 0 ] && python3 -c "import xdist" 2>/dev/null; then
  PYTEST_ARGS+=(-n "${PYTEST_WORKERS:-8}")
fi
python3 -m pytest -q -ra --durations=25 ${TEST_PATHS:-tests} "${PYTEST_ARGS[@]}" 2>&1 | tee "$LOG_DIR/pytest.log"
rc=${PIPESTATUS[0]}
status+=("pytest (CUDA): rc=$rc :: $(tail -n 1 "$LOG_DIR/pytest.log")")

if [ "$BENCH" = 1 ]; then
  for b in benchmarks/bench_*.py; do
    name=$(basename "$b" .py)
    if [ -n "${BENCHES:-}" ] && [[ " $BENCHES " != *" ${name#bench_} "* ]]; then continue; fi
    python3 "$b" --out "$LOG_DIR" >"$LOG_DIR/$name.log" 2>&1
    status+=("$name: rc=$? (log $LOG_DIR/$name.log)")
  done
fi

echo
echo "==== gpu_check summary ===="
cat "$LOG_DIR/env.txt"
for s in "${status[@]}"; do echo "$s"; done
[ "$rc" = 0 ]
