#!/usr/bin/env bash
# The Fashion-MNIST distillation experiment on ONE GPU, in about 9 minutes of wall time:
#   1. the CNN teacher (configs/fashion_mnist_teacher.toml) and, at the same time, the student
#      without distillation (it needs no teacher);
#   2. the soft- and hard-distilled students, concurrently (DeiT-tiny at 51 tokens is
#      launch-bound, so three processes share one GPU well);
#   3. evaluation of every model on the test split (JSON), an fp16 copy of the hard student
#      (the embedded-model candidate) evaluated too, and a summary.
#
# Usage:   scripts/gpu_fashion_mnist.sh OUT_DIR [FASHION_MNIST_DIR]
#          FASHION_MNIST_DIR holds the four IDX .gz files (default: the Debian package's folder).
# Env:     PYTHON (default python3), DEVICE (default cuda),
#          TEACHER_SECONDS (default 90) / STUDENT_SECONDS (default 330): training-time budgets;
#          each run fits its cosine schedule into its budget (schedule.fit_to_time), so the
#          whole script ends in about 9 minutes whatever the GPU's speed,
#          TEACHER_OVERRIDES / STUDENT_OVERRIDES / OVERRIDES: extra `section.key=value` words,
#          e.g. a CPU dry run: DEVICE=cpu OVERRIDES="schedule.epochs=1 data.train_subset=1024
#          data.val_subset=512 run.precision=fp32 run.compile=false optim.fused=false".
# Needs:   torch, timm, numpy, safetensors, tqdm (tensorboard optional); no network.
# Output (OUT_DIR): runs/{teacher,none,soft,hard}/ (config, metrics.jsonl, train.log, model/),
#          eval/*.json, logs/*.log, timeline.log, summary.json, plus the few files a
#          size-limited copy-back needs: model_hard_fp16/, results.tar.gz (logs+metrics+evals).
set -euo pipefail

OUT=${1:?usage: scripts/gpu_fashion_mnist.sh OUT_DIR [FASHION_MNIST_DIR]}
DATA=${2:-${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
read -r -a COMMON <<< "data.path=$DATA run.device=$DEVICE run.progress=false ${OVERRIDES:-}"
read -r -a TEACHER_EXTRA <<< "run.time_limit=${TEACHER_SECONDS:-90} schedule.fit_to_time=true \
${TEACHER_OVERRIDES:-}"
read -r -a STUDENT_EXTRA <<< "run.time_limit=${STUDENT_SECONDS:-330} schedule.fit_to_time=true \
${STUDENT_OVERRIDES:-}"
mkdir -p "$OUT/runs" "$OUT/eval" "$OUT/logs"
START=$SECONDS

log() { echo "[$(date +%T) +$((SECONDS - START))s] $*" | tee -a "$OUT/timeline.log"; }

train_run() {  # name config [overrides...]: one training run, output in logs/NAME.log
    local name=$1 config=$2 t0=$SECONDS
    shift 2
    log "train $name: start"
    if "$PY" -m deit.train --config "$REPO/configs/$config" --out "$OUT/runs/$name" \
        "${COMMON[@]}" "$@" > "$OUT/logs/train_$name.log" 2>&1; then
        log "train $name: done in $((SECONDS - t0))s"
    else
        log "train $name: FAILED (see logs/train_$name.log)"; tail -n 30 "$OUT/logs/train_$name.log"
        return 1
    fi
}

eval_run() {  # name model_dir [teacher]: eval JSON into eval/NAME.json
    local name=$1 model=$2 t0=$SECONDS
    local teacher_args=()
    [[ $# -ge 3 ]] && teacher_args=(--teacher "$3")
    "$PY" -m deit eval --model "$model" --data fashion-mnist:test --data-root "$DATA" \
        --device "$DEVICE" --batch-size 1000 --json "${teacher_args[@]}" \
        > "$OUT/eval/$name.json" 2> "$OUT/logs/eval_$name.log"
    log "eval $name: $("$PY" -c "import json,sys; r=json.load(open(sys.argv[1])); \
print(f\"top1 {100*r['top1']:.2f}%\")" "$OUT/eval/$name.json") ($((SECONDS - t0))s)"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true; } \
    > "$OUT/logs/gpu.txt" 2>&1
log "repo $REPO, data $DATA, device $DEVICE, python $("$PY" -c 'import torch; print(torch.__version__)')"

# Stage 1: teacher, and the undistilled student alongside it.
train_run none fashion_mnist_deit_tiny_none.toml "${STUDENT_EXTRA[@]}" & NONE_PID=$!
train_run teacher fashion_mnist_teacher.toml "${TEACHER_EXTRA[@]}"
TEACHER="$OUT/runs/teacher/model"

# Stage 2: the distilled students, together.
train_run soft fashion_mnist_deit_tiny_soft.toml distill.teacher="$TEACHER" \
    "${STUDENT_EXTRA[@]}" & SOFT_PID=$!
train_run hard fashion_mnist_deit_tiny_hard.toml distill.teacher="$TEACHER" \
    "${STUDENT_EXTRA[@]}" & HARD_PID=$!
FAILED=0
for pid in $NONE_PID $SOFT_PID $HARD_PID; do wait "$pid" || FAILED=1; done
[[ $FAILED == 0 ]] || { log "a student run failed"; exit 1; }

# Stage 3: evaluation, the fp16 copy of the hard student, summary.
eval_run teacher "$TEACHER" & EVAL_PIDS=($!)
for kind in none soft hard; do
    eval_run "$kind" "$OUT/runs/$kind/model" "$TEACHER" & EVAL_PIDS+=($!)
done
"$PY" - "$OUT/runs/hard/model" "$OUT/model_hard_fp16" <<'EOF'
import sys

import torch

from deit.checkpoints import load_model
from deit.saving import save_model

m = load_model(sys.argv[1])
save_model(m.model, sys.argv[2], labels=m.labels, preprocess=m.preprocess, format="deit",
           dtype=torch.float16, metadata={**m.metadata, "dtype": "float16"})
EOF
eval_run hard_fp16 "$OUT/model_hard_fp16" & EVAL_PIDS+=($!)
for pid in "${EVAL_PIDS[@]}"; do wait "$pid" || FAILED=1; done
[[ $FAILED == 0 ]] || { log "an evaluation failed (see logs/eval_*.log)"; exit 1; }
"$PY" - "$OUT" "$((SECONDS - START))" <<'EOF'
import json
import sys
from pathlib import Path

out, total = Path(sys.argv[1]), int(sys.argv[2])
summary = {"wall_seconds": total, "models": {}}
for f in sorted((out / "eval").glob("*.json")):
    r = json.loads(f.read_text())
    keep = ("top1", "top5", "cls_top1", "dist_top1", "teacher_top1", "agreement", "num_samples")
    summary["models"][f.stem] = {k: r.get(k) for k in keep}
for run in ("teacher", "none", "soft", "hard"):
    lines = (out / "runs" / run / "metrics.jsonl").read_text().splitlines()
    epochs = [json.loads(x) for x in lines if '"kind": "epoch"' in x]
    if epochs:
        summary["models"].setdefault(run, {})["train"] = {
            "epochs": epochs[-1]["epoch"], "train_seconds": sum(e["epoch_time"] for e in epochs),
            "img_per_s_last_epoch": epochs[-1]["img_per_s"]}
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps(summary, indent=2))
EOF
tar -czf "$OUT/results.tar.gz" -C "$OUT" logs eval timeline.log summary.json \
    $(cd "$OUT" && ls -d runs/*/config.json runs/*/metrics.jsonl runs/*/train.log runs/*/model/config.json)
log "all done in $((SECONDS - START))s"
