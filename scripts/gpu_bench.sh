#!/usr/bin/env bash
# Every GPU figure of the speed issue in one run (about 5 minutes on one H100/H200): ours,
# timm and transformers side by side, in the same process, on the same weights.
#   1. DeiT-tiny-distilled, bf16: batch 1024 throughput (eager, compile, compile-max) and
#      batch-1 latency (eager, compile-max = CUDA graphs);
#   2. DeiT-small and DeiT-base, bf16, batch 1024 / 256, compile-max, ours vs timm;
#   3. training step, DeiT-tiny-distilled 224 px, batch 256, bf16, compiled, ours vs timm.
#
# Usage:   scripts/gpu_bench.sh OUT_DIR
# Env:     PYTHON (default python3), DEVICE (default cuda), SECONDS_PER (default 3: timed
#          seconds per measurement). A CPU dry run: DEVICE=cpu SMALL=1 scripts/gpu_bench.sh /tmp/b
# Output:  OUT_DIR/bench.jsonl (one JSON object per measurement), bench.log, versions.txt.
set -uo pipefail

OUT=${1:?usage: scripts/gpu_bench.sh OUT_DIR}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
SEC=${SECONDS_PER:-3}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
if [[ -n ${SMALL:-} ]]; then BIG=8 MID=4 TRAIN=4 STEPS=2; else BIG=1024 MID=256 TRAIN=256 STEPS=30; fi

run() {  # a command whose stdout is JSON lines; failures are logged, the script goes on
    echo "[$(date +%T)] $*" | tee -a "$OUT/bench.log"
    timeout 240 "$@" >> "$OUT/bench.jsonl" 2>> "$OUT/bench.log" || echo "FAILED: $*" | tee -a "$OUT/bench.log"
}
bench() { run "$PY" -m deit.cli bench --device "$DEVICE" --json --min-seconds "$SEC" "$@"; }

{
    "$PY" -c 'import torch, timm, transformers; print("torch", torch.__version__, "timm",
timm.__version__, "transformers", transformers.__version__)'
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null || true
} > "$OUT/versions.txt" 2>&1

bench --dtype bf16 --batch "$BIG" --mode eager --mode compile --mode compile-max
bench --dtype bf16 --batch 1 --mode eager --mode compile-max
bench --model deit_small_distilled_patch16_224 --dtype bf16 --batch "$BIG" --mode compile-max \
    --impl deit --impl timm
bench --model deit_base_distilled_patch16_224 --dtype bf16 --batch "$MID" --mode compile-max \
    --impl deit --impl timm
run "$PY" "$REPO/benchmarks/bench_train.py" steps --device "$DEVICE" --dtype bf16 \
    --batch "$TRAIN" --steps "$STEPS" --compile --json
echo "[$(date +%T)] done: $(wc -l < "$OUT/bench.jsonl") measurements" | tee -a "$OUT/bench.log"
