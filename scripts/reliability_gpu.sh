#!/usr/bin/env bash
# The GPU part of the reliability checks (docs/RELIABILITY.md), in one go:
#
#   scripts/reliability_gpu.sh LOG_DIR [ITEM...]
#
# ITEMs (default: all, in this order):
#   extreme      tests past 32767 block rows (B = 16 and 128) and the bitwise determinism test
#   tf32         the op and layer tests again with TF32 matmuls on (the normal run has them off),
#                fp32 results held to the TF32 limits of tests/utils.py
#   tiles        every tile configuration the library can pick, at shapes of several tiles
#                (tests/reliability/test_tile_configs.py), and the property tests drawn 8x larger
#                with bf16 among the dtypes (MEGABLOCKS_PROPERTY_REACH=8)
#   graphs       the no-host-sync, torch.compile fullgraph and CUDA-graph capture tests
#   memcheck     compute-sanitizer --tool memcheck over the op and layer suites (0 errors wanted)
#   racecheck    compute-sanitizer --tool racecheck (shared-memory hazards) over the kernel tests
#                named by RACECHECK_K (default: bf16 gmm, GLU-epilogue and sparse products, the
#                padded gather/scatter and the topology tests)
#   long         10,000 dMoE forward+backward steps, sparse and grouped (triton), allocated
#                memory flat after warm-up
# Environment: STEPS (default 10000), MEMCHECK_PATHS (default "tests/ops tests/layers"),
# MEMCHECK_K (a pytest -k selection for memcheck, default none), MEMCHECK_SHARDS (default 4),
# MEMCHECK_TIMEOUT (seconds per shard, default none), REVERSE=1 (tf32 and memcheck run their tests
# last first, to complete a run that a time limit cut). Wheels as in gpu_check.sh.
# Every item writes its log to LOG_DIR; the summary is printed last; the exit status is non-zero
# if any item failed.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG_DIR=${1:?usage: scripts/reliability_gpu.sh LOG_DIR [extreme|memcheck|long ...]}
shift
ITEMS=("$@")
[ ${#ITEMS[@]} -eq 0 ] && ITEMS=(extreme tf32 tiles graphs memcheck racecheck long)
WORKERS=()  # pytest-xdist, where installed ($PYTEST_WORKERS, default 8)
python3 -c "import xdist" 2>/dev/null && WORKERS=(-n "${PYTEST_WORKERS:-8}")
mkdir -p "$LOG_DIR"
source scripts/device_env.sh
python3 -c "import torch, triton; print('gpu:', torch.cuda.get_device_name(), '| torch', torch.__version__, '| triton', triton.__version__)" | tee "$LOG_DIR/env.txt"

status=(); failed=0
record() {  # name rc detail
  status+=("$1: rc=$2 $3"); [ "$2" = 0 ] || failed=1
}

for item in "${ITEMS[@]}"; do
  case "$item" in
    extreme)
      # Deterministic mode as documented: deterministic torch algorithms and a fixed cuBLAS workspace.
      CUBLAS_WORKSPACE_CONFIG=:4096:8 python3 -m pytest -q -ra tests/reliability/test_extreme_and_determinism.py \
        2>&1 | tee "$LOG_DIR/extreme.log"
      record extreme "${PIPESTATUS[0]}" ":: $(tail -n 1 "$LOG_DIR/extreme.log")"
      ;;
    tf32)
      # The whole op and layer suites: fp32 cases are named by their dtype in several ways
      # (torch.float32, fp32, dtype0), so none is selected by name; the 16-bit cases rerun as they are.
      TF32_PATHS=(tests/ops tests/layers tests/reliability/test_tile_configs.py)
      if [ "${REVERSE:-0}" = 1 ]; then  # last tests first, to finish a run that an earlier time limit cut
        mapfile -t TF32_PATHS < <(MEGABLOCKS_TEST_TF32=1 python3 -m pytest --collect-only -q -p no:cacheprovider "${TF32_PATHS[@]}" 2>/dev/null | grep "::" | tac)
      fi
      # -v: every result by name as it comes, so a run cut by a time limit still names its failures.
      MEGABLOCKS_TEST_TF32=1 python3 -m pytest -v -ra --tb=short "${WORKERS[@]}" "${TF32_PATHS[@]}" 2>&1 | tee "$LOG_DIR/tf32.log"
      record tf32 "${PIPESTATUS[0]}" ":: $(tail -n 1 "$LOG_DIR/tf32.log")"
      ;;
    tiles)
      MEGABLOCKS_PROPERTY_REACH=8 python3 -m pytest -q -ra "${WORKERS[@]}" tests/reliability/test_tile_configs.py \
        tests/reliability/test_properties.py tests/ops/test_sparse.py -k "not test_sparse or real_shapes" \
        2>&1 | tee "$LOG_DIR/tiles.log"
      record tiles "${PIPESTATUS[0]}" ":: $(tail -n 1 "$LOG_DIR/tiles.log")"
      ;;
    graphs)
      python3 -m pytest -q -ra "${WORKERS[@]}" tests -k "sync or graph or fullgraph" 2>&1 | tee "$LOG_DIR/graphs.log"
      record graphs "${PIPESTATUS[0]}" ":: $(tail -n 1 "$LOG_DIR/graphs.log")"
      ;;
    racecheck)
      if ! command -v compute-sanitizer >/dev/null; then
        record racecheck 127 ":: compute-sanitizer not on PATH"
        continue
      fi
      # racecheck reports shared-memory hazards between the threads of a block (the kernels'
      # software pipelines and reductions); it is slow, so it runs over a selection.
      PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "${RACECHECK_TIMEOUT:-0}" \
        compute-sanitizer --tool racecheck --racecheck-report all --error-exitcode 99 --print-limit 50 \
        --log-file "$LOG_DIR/racecheck_sanitizer.log" \
        python3 -m pytest -q -p no:cacheprovider tests/ops \
        -k "(${RACECHECK_K:-(test_gmm_forward_and_grads and bfloat16) or (test_triton_glu_epilogue and bfloat16) or (test_expert_mlp_products and bfloat16) or test_padded_gather_scatter or test_topology_hostile}) and not cuda_graph and not gg" \
        >"$LOG_DIR/racecheck_pytest.log" 2>&1
      rc=$?
      hazards=$(grep -c "^========= .*\(Race\|Hazard\|hazard\)" "$LOG_DIR/racecheck_sanitizer.log" || true)
      record racecheck "$rc" ":: $hazards hazard reports; $(grep -h "RACECHECK SUMMARY\|ERROR SUMMARY" "$LOG_DIR/racecheck_sanitizer.log" | tr '\n' ' '); $(tail -n 1 "$LOG_DIR/racecheck_pytest.log")"
      ;;
    memcheck)
      if ! command -v compute-sanitizer >/dev/null; then
        record memcheck 127 ":: compute-sanitizer not on PATH (it ships with the CUDA toolkit: /usr/local/cuda/bin)"
        continue
      fi
      # No caching allocator, so every out-of-bounds access leaves its own allocation and shows.
      # CUDA-graph capture cannot allocate without the caching allocator, so those tests are left
      # out here (their kernels run in the other tests). The selected tests are collected and
      # their ids dealt round-robin into $MEMCHECK_SHARDS (default 4) sanitizer processes running
      # side by side, so a long file is spread over all of them; --error-exitcode makes any
      # memcheck error fail the item. $MEMCHECK_TIMEOUT (seconds, default none) stops every shard
      # in time for the summary.
      # The optional 'gg' backend (grouped_gemm's CUTLASS kernel, a third-party package) reads past
      # its argument arrays under the sanitizer and takes the CUDA context down with it
      # (docs/RELIABILITY.md), so its cases are left out too unless MEMCHECK_GG=1.
      K="not cuda_graph"; [ "${MEMCHECK_GG:-0}" = 1 ] || K="$K and not gg"
      [ -n "${MEMCHECK_K:-}" ] && K="($MEMCHECK_K) and $K"
      mapfile -t IDS < <(python3 -m pytest --collect-only -q -p no:cacheprovider ${MEMCHECK_PATHS:-tests/ops tests/layers} -k "$K" 2>/dev/null | grep "::" | if [ "${REVERSE:-0}" = 1 ]; then tac; else cat; fi)
      echo "memcheck: ${#IDS[@]} tests" | tee "$LOG_DIR/memcheck_ids.txt"
      printf '%s\n' "${IDS[@]}" >>"$LOG_DIR/memcheck_ids.txt"
      SHARDS=${MEMCHECK_SHARDS:-4}; pids=()
      for ((i = 0; i < SHARDS; i++)); do
        shard=(); for ((j = i; j < ${#IDS[@]}; j += SHARDS)); do shard+=("${IDS[j]}"); done
        [ ${#shard[@]} -eq 0 ] && continue
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "${MEMCHECK_TIMEOUT:-0}" \
          compute-sanitizer --tool memcheck --error-exitcode 99 \
          --print-limit 50 --log-file "$LOG_DIR/memcheck_sanitizer_$i.log" \
          python3 -m pytest -v -p no:cacheprovider "${shard[@]}" \
          >"$LOG_DIR/memcheck_pytest_$i.log" 2>&1 &
        pids+=($!)
      done
      rc=0; for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
      errors=$(cat "$LOG_DIR"/memcheck_sanitizer_*.log | grep -c "^========= Invalid\|^========= Program hit" || true)
      passed=$(cat "$LOG_DIR"/memcheck_pytest_*.log | grep -c " PASSED" || true)
      nfailed=$(cat "$LOG_DIR"/memcheck_pytest_*.log | grep -c " FAILED" || true)
      summary=$(grep -h "ERROR SUMMARY" "$LOG_DIR"/memcheck_sanitizer_*.log | tr '\n' ' ')
      record memcheck "$rc" ":: $errors sanitizer reports; ${summary:-no summary}; tests passed $passed, failed $nfailed"
      ;;
    long)
      for impl in sparse triton; do
        python3 tests/reliability/long_run.py --steps "${STEPS:-10000}" --impl "$impl" --out "$LOG_DIR" \
          2>&1 | tee "$LOG_DIR/long_run_$impl.log"
        record "long run ($impl)" "${PIPESTATUS[0]}" ":: $(tail -n 1 "$LOG_DIR/long_run_$impl.log")"
      done
      ;;
    *) echo "unknown item $item (extreme, tf32, tiles, graphs, memcheck, racecheck, long)" >&2; exit 2 ;;
  esac
done

echo
echo "==== reliability_gpu summary ===="
cat "$LOG_DIR/env.txt"
for s in "${status[@]}"; do echo "$s"; done
exit "$failed"
