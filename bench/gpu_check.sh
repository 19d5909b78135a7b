#!/usr/bin/env bash
# The GPU check, prepared for the first GPU machine mathtune is lent (<= 8 min on one GPU):
#   1. the demo recipe on CUDA in bf16 (training capped at 60 s, then base vs trained on 200 items);
#   2. 20 optimizer steps in fp16 with the GradScaler (the guards watch for overflow/NaN);
#   3. greedy decoding of 1,319 GSM8K-format questions: mathtune's CUDA path vs transformers'
#      generate_batch (continuous batching) on the same prompts, tokens/s each (<= 3 min in all);
#   4. `mathtune grpo` for 2 minutes on top of step 1's run (the bundled model + its demo LoRA, merged):
#      which sampler CUDA gets (mathtune's fast path or TRL's generation) and the reward, pass rate and
#      seconds sampling / scoring / training per step (its progress line and metrics.jsonl).
#
#   bash bench/gpu_check.sh            # on a CUDA machine, after `make install`
#   bash bench/gpu_check.sh --dry-run  # on a CPU: the same steps, tiny, to check the script runs
#
# Each step prints its own summary (step 4 its command line first); the last line of step 3 says which
# decoding path was faster, which is the one that should become mathtune's CUDA default. Runs write
# under $OUT_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT_DIR=${OUT_DIR:-runs/gpu-check}
RECIPE=configs/smollm2-135m/lora-unit-conversion.yaml

if [ "${1:-}" = "--dry-run" ]; then
  device=cpu; bf16=fp32; fp16=fp32; train_time=20; steps=2; eval_items=8; compare=(--dry-run)
  grpo=(--max-steps 2 --num-generations 4 --batch-size 4 --max-completion-length 16)
else
  device=cuda; bf16=bf16; fp16=fp16; train_time=60; steps=20; eval_items=200; compare=()
  grpo=(--max-time 120 --num-generations 8 --batch-size 64 --max-completion-length 128)
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: use --dry-run')"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

echo "== 1/4 demo recipe, $device, $bf16"
"$PY" -m mathtune train --config "$RECIPE" --device "$device" --precision "$bf16" --max-time "$train_time" \
  --eval-samples "$eval_items" --output-dir "$OUT_DIR/demo-$bf16"

echo "== 2/4 $steps steps, $device, $fp16 (GradScaler on CUDA)"
"$PY" -m mathtune train --config "$RECIPE" --device "$device" --precision "$fp16" --max-steps "$steps" \
  --eval-samples 0 --output-dir "$OUT_DIR/steps-$fp16"

echo "== 3/4 decoding: mathtune vs transformers generate_batch"
"$PY" bench/gpu_generate_compare.py "${compare[@]}"

echo "== 4/4 mathtune grpo on step 1's run, $device, $bf16 (${grpo[*]})"
cmd=("$PY" -m mathtune grpo --model "$OUT_DIR/demo-$bf16" --task unit-conversion --device "$device"
     --precision "$bf16" "${grpo[@]}" --eval-samples 0 --no-wandb --output-dir "$OUT_DIR/grpo-$bf16")
printf '+ %q' "${cmd[0]}"; printf ' %q' "${cmd[@]:1}"; echo
rm -rf "$OUT_DIR/grpo-$bf16"  # a rerun starts fresh (an earlier try's checkpoints are refused without --resume)
"${cmd[@]}"
