#!/usr/bin/env bash
# Megatron-Core integration on the GPU machine: a tiny GPT with megablocks dMoE MLPs trains for
# 50 steps with falling loss on 1 GPU and on 2 GPUs with expert parallelism, then tokens/s of
# megablocks' dMoE (sparse, grouped) against megatron-core's own MoE layer (grouped GEMM) on the
# same model and GPU. Prints a summary last and writes $LOG_DIR/megatron_summary.{json,md}.
#
#   scripts/megatron_gpu.sh LOG_DIR
#
# Needs megatron-core (from $MEGABLOCKS_WHEELS, default .device-wheels/, as scripts/gpu_check.sh)
# and grouped_gemm for megatron-core's grouped GEMM experts (the comparison is skipped without it).
# NGPUS_EP (default 2) sets the expert-parallel run's GPU count; BENCH_STEPS (default 30).
set -uo pipefail
cd "$(dirname "$0")/.."
LOG_DIR=${1:?usage: scripts/megatron_gpu.sh LOG_DIR}
mkdir -p "$LOG_DIR"
source scripts/device_env.sh
NGPUS_EP=${NGPUS_EP:-2}
BENCH_STEPS=${BENCH_STEPS:-30}

# 1. Data: the Python standard library's source as byte-level Megatron-format data.
DATA="$LOG_DIR/data/stdlib"
if [ ! -f "${DATA}_text_document.idx" ]; then
  python3 - "$LOG_DIR/data/stdlib.jsonl" <<'PY'
import json, os, sys, sysconfig
root = sysconfig.get_paths()["stdlib"]
os.makedirs(os.path.dirname(sys.argv[1]), exist_ok=True)
n = 0
with open(sys.argv[1], "w") as out:
    for dirpath, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            if name.endswith(".py") and "test" not in dirpath and n < 1500:
                with open(os.path.join(dirpath, name), errors="replace") as f:
                    out.write(json.dumps({"text": f.read()}) + "\n")
                n += 1
print("documents:", n)
PY
  python3 -m exp.data.preprocess --input "$LOG_DIR/data/stdlib.jsonl" --output-prefix "$DATA" \
    2>&1 | tee "$LOG_DIR/preprocess.log"
fi

run() {  # run NAME NGPUS [pretrain_gpt.py options...]
  local name=$1 n=$2; shift 2
  echo "== $name ($n GPU)"
  timeout 900 python3 -m torch.distributed.run --standalone --nproc_per_node "$n" --master_port 6011 \
    exp/megatron/pretrain_gpt.py "$@" > "$LOG_DIR/$name.log" 2>&1
  local rc=$?
  echo "   exit $rc; $(grep '"final"' "$LOG_DIR/$name.log" | tail -1)"
  [ $rc -eq 0 ] || tail -30 "$LOG_DIR/$name.log"
}

TINY=(--config exp/megatron/configs/tiny_dmoe.json --data-path "${DATA}_text_document"
      --cache-dir "$LOG_DIR/cache" --bf16 --train-iters 50)
# 2. 50 steps, falling loss: 1 GPU; then NGPUS_EP GPUs with expert parallelism (the global batch
#    is the same, split over the data-parallel ranks).
run train_1gpu_sparse 1 "${TINY[@]}" --mlp-impl sparse
run train_1gpu_grouped 1 "${TINY[@]}" --mlp-impl grouped
run train_${NGPUS_EP}gpu_ep${NGPUS_EP} "$NGPUS_EP" "${TINY[@]}" --mlp-impl sparse \
    --expert-model-parallel-size "$NGPUS_EP" --micro-batch-size $((16 / NGPUS_EP))
run train_1gpu_megatron 1 "${TINY[@]}" --moe-impl megatron --moe-grouped-gemm

# 3. tokens/s on one model (the dmoe_125m shape with 64 experts, top-1, sequence 1024, micro
#    batch 8, bf16, mock data), megablocks vs megatron-core's own MoE with grouped GEMM.
BENCH=(--config exp/megatron/configs/dmoe_125m.json --mock-data --vocab-size 51200 --bf16
       --micro-batch-size 8 --global-batch-size 8 --train-iters "$BENCH_STEPS" --log-interval 5
       --eval-interval 0 --save-interval 0 --cache-dir "$LOG_DIR/cache")
run bench_megablocks_sparse 1 "${BENCH[@]}" --mlp-impl sparse
run bench_megablocks_grouped 1 "${BENCH[@]}" --mlp-impl grouped
run bench_megatron_grouped_gemm 1 "${BENCH[@]}" --moe-impl megatron --moe-grouped-gemm
run bench_megatron_sequential 1 "${BENCH[@]}" --moe-impl megatron

python3 - "$LOG_DIR" <<'PY'
import glob, json, os, sys
log_dir = sys.argv[1]
rows = {}
for path in sorted(glob.glob(os.path.join(log_dir, "*.log"))):
    name = os.path.basename(path)[:-4]
    finals = [json.loads(l)["final"] for l in open(path) if l.startswith('{"final"')]
    if name.startswith(("train_", "bench_")):
        rows[name] = finals[-1] if finals else None
json.dump(rows, open(os.path.join(log_dir, "megatron_summary.json"), "w"), indent=1)
lines = ["| run | world | EP | first loss | last loss | falls | tokens/s |", "|---|---|---|---|---|---|---|"]
ok = True
for name, r in rows.items():
    if r is None:
        lines.append(f"| {name} | failed | | | | | |")
        ok = False
        continue
    falls = r["last_loss"] < r["first_loss"]
    if name.startswith("train_") and not falls:
        ok = False
    tps = f"{r['tokens_per_s']:.0f}" if r["tokens_per_s"] else "-"
    lines.append(f"| {name} | {r['world']} | {r['ep']} | {r['first_loss']:.4f} | {r['last_loss']:.4f} | "
                 f"{'yes' if falls else 'NO'} | {tps} |")
open(os.path.join(log_dir, "megatron_summary.md"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
print("RESULT:", "PASS" if ok else "FAIL")
PY
