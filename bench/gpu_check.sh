#!/usr/bin/env bash
# The GPU check, prepared for the first GPU machine mathtune is lent (<= 5 min on one GPU):
#   1. the demo recipe on CUDA in bf16 (training capped at 60 s, then base vs trained on 200 items);
#   2. 20 optimizer steps in fp16 with the GradScaler (the guards watch for overflow/NaN);
#   3. greedy decoding of 1,319 GSM8K-format questions: mathtune's CUDA path vs transformers'
#      generate_batch (continuous batching) on the same prompts, tokens/s each (<= 3 min in all).
#
#   bash bench/gpu_check.sh            # on a CUDA machine, after `make install`
#   bash bench/gpu_check.sh --dry-run  # on a CPU: the same steps, tiny, to check the script runs
#
# Each step prints its own summary; the last line of step 3 says which decoding path was faster,
# which is the one that should become mathtune's CUDA default. Runs write under $OUT_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT_DIR=${OUT_DIR:-runs/gpu-check}
RECIPE=configs/smollm2-135m/lora-unit-conversion.yaml

if [ "${1:-}" = "--dry-run" ]; then
  device=cpu; bf16=fp32; fp16=fp32; train_time=20; steps=2; eval_items=8; compare=(--dry-run)
else
  device=cuda; bf16=bf16; fp16=fp16; train_time=60; steps=20; eval_items=200; compare=()
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: use --dry-run')"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

echo "== 1/3 demo recipe, $device, $bf16"
"$PY" -m mathtune train --config "$RECIPE" --device "$device" --precision "$bf16" --max-time "$train_time" \
  --eval-samples "$eval_items" --output-dir "$OUT_DIR/demo-$bf16"

echo "== 2/3 $steps steps, $device, $fp16 (GradScaler on CUDA)"
"$PY" -m mathtune train --config "$RECIPE" --device "$device" --precision "$fp16" --max-steps "$steps" \
  --eval-samples 0 --output-dir "$OUT_DIR/steps-$fp16"

echo "== 3/3 decoding: mathtune vs transformers generate_batch"
"$PY" bench/gpu_generate_compare.py "${compare[@]}"
