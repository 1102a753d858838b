#!/usr/bin/env bash
# GPU checks for a short lease (one H100/H200): benchmarks 1, 2, 3 and 5 of docs/benchmarks.md plus a smoke
# run of the CUDA training path (amp_bf16, fused AdamW, channels_last, torch.compile), about 5 minutes; and
# the online / centre-crop cached / reinforced image-teacher comparison with ViT-B-32 students and a ViT-L-14
# teacher (benchmarks/bench_reinforced.py), about 6 minutes. Run from the repository root:
#     bash benchmarks/gpu_check.sh OUT_DIR [SHARED_DATA] [LINEAR_FEATURES.pt]
#     CHECKS=reinforced bash benchmarks/gpu_check.sh OUT_DIR      # only the reinforced comparison (< 10 min)
# CHECKS: a comma-separated subset of smoke,train_step,overhead,eval,reinforced (default: all).
# SHARED_DATA needs cifar10_jpg/test and clip_prompts (a subset is fine); LINEAR_FEATURES comes from
# `python benchmarks/bench_eval.py --save-features F.pt` on any machine. Both are optional.
set -uo pipefail
OUT=${1:-gpu_results}
SHARED=${2:-}
FEATURES=${3:-}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PROTORKD_CACHE=/tmp/protorkd-cache PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
TINY_TEXT=(--text-model-builder custom --text-model tiny-text)
CHECKS=${CHECKS:-smoke,train_step,overhead,eval,reinforced}
want() { [[ ",$CHECKS," == *",$1,"* ]]; }

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; $PY -c \
  "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"; } 2>&1 | tee "$OUT/device.txt"

if want smoke; then
echo "== smoke: demo training on CUDA (amp_bf16, torch.compile)" | tee "$OUT/smoke.txt"
timeout 150 $PY -m protorkd train --demo-size 4096 --epochs 2 "${TINY_TEXT[@]}" --precision amp_bf16 \
  --torchcompile --batch-size 256 --workers 8 --logs /tmp/gpu-logs --name smoke --report-to "" \
  --linear-frequency 0 2>&1 | grep -E "epoch .* step|evaluation|experiment|top1|Error|error" | tee -a "$OUT/smoke.txt"
fi

if want train_step; then
echo "== 1. training step vs open_clip" | tee "$OUT/train_step.txt"
timeout 120 $PY benchmarks/bench_train_step.py --model ViT-B-32 --batch-size 256 --precision amp_bf16 \
  --steps 10 --rounds 3 2>&1 | grep -v WARNING | tee -a "$OUT/train_step.txt"
fi

if want overhead; then
echo "== 2-3. distillation and clustering overheads" | tee "$OUT/overhead.txt"
timeout 240 $PY benchmarks/bench_overhead.py --out /tmp/overhead --demo-size 8192 --epochs 3 --repeats 1 \
  2>&1 | tail -20 | tee -a "$OUT/overhead.txt"
fi

if want eval; then
echo "== 5. evaluation speed" | tee "$OUT/eval.txt"
CKPT=/tmp/gpu-logs/smoke/checkpoints/epoch_2.pt
PARTS=""
[ -n "$SHARED" ] && PARTS="zeroshot"
[ -n "$FEATURES" ] && PARTS="${PARTS:+$PARTS,}linear"
if [ -n "$PARTS" ] && [ -f "$CKPT" ]; then
  timeout 120 $PY benchmarks/bench_eval.py --checkpoint "$CKPT" --device cuda --parts "$PARTS" \
    ${SHARED:+--shared-data "$SHARED"} ${FEATURES:+--features "$FEATURES"} 2>&1 | tee -a "$OUT/eval.txt"
fi
fi

if want reinforced; then
# ViT-B-32 students (224 px, bf16 autocast, batch 256) on 4096 demo rows; a random ViT-L-14 teacher (the cost of
# a forward pass does not depend on its weights); one round of 3 epochs each, the first untimed; K = 10 views.
echo "== 6. image-teacher KD: online vs centre-crop cached vs reinforced (ViT-B-32 student, ViT-L-14 teacher)" \
  | tee "$OUT/reinforced.txt"
timeout 480 $PY benchmarks/bench_reinforced.py --out /tmp/bench-reinforced-gpu --student vit-b-32 \
  --batch-size 256 --rows 4096 --views 10 --epochs 3 --rounds 1 --teacher-model ViT-L-14 2>&1 \
  | grep -vE "WARNING|^round" | tee -a "$OUT/reinforced.txt"
fi
echo "done" | tee -a "$OUT/device.txt"
