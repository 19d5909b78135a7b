#!/usr/bin/env bash
# Env-var wrapper around `mathtune train`: each variable below becomes its flag, but only when set
# (so a recipe's or the default value is never overridden by an empty variable). Extra arguments
# are passed through unchanged and come last, so they win over the variables.
#
#   MAX_SAMPLES=1000 BATCH_SIZE=4 scripts/train.sh --no-wandb
#   CONFIG=configs/smollm2-135m/lora-unit-conversion.yaml MAX_TIME=120 scripts/train.sh
#   DRY_RUN=1 ... scripts/train.sh     # print the command without running it
#
# Variables: CONFIG MODEL TASK TRAIN_FILE EVAL_FILE METHOD MAX_SAMPLES BATCH_SIZE
#   GRAD_ACCUM (or GRADIENT_ACCUMULATION_STEPS) NUM_EPOCHS MAX_STEPS LEARNING_RATE MAX_LENGTH
#   MAX_TIME OUTPUT_DIR SAVE_STEPS SEED PRECISION DEVICE EVAL_SAMPLES
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -x "$repo/.venv/bin/mathtune" ]]; then
  cmd=("$repo/.venv/bin/mathtune" train)
else
  cmd=(mathtune train)
fi

if [[ -n "${GRAD_ACCUM:-}" && -n "${GRADIENT_ACCUMULATION_STEPS:-}" && "$GRAD_ACCUM" != "$GRADIENT_ACCUMULATION_STEPS" ]]; then
  echo "error: GRAD_ACCUM=$GRAD_ACCUM and GRADIENT_ACCUMULATION_STEPS=$GRADIENT_ACCUMULATION_STEPS disagree: set one" >&2
  exit 2
fi
GRAD_ACCUM="${GRAD_ACCUM:-${GRADIENT_ACCUMULATION_STEPS:-}}"

# add VAR --flag: append "--flag $VAR" when VAR is set and not empty
add() {
  local value="${!1:-}"
  if [[ -n "$value" ]]; then
    cmd+=("$2" "$value")
  fi
}
add CONFIG --config
add MODEL --model
add TASK --task
add TRAIN_FILE --train-file
add EVAL_FILE --eval-file
add METHOD --method
add MAX_SAMPLES --max-samples
add BATCH_SIZE --batch-size
add GRAD_ACCUM --gradient-accumulation-steps
add NUM_EPOCHS --num-epochs
add MAX_STEPS --max-steps
add LEARNING_RATE --learning-rate
add MAX_LENGTH --max-length
add MAX_TIME --max-time
add OUTPUT_DIR --output-dir
add SAVE_STEPS --save-steps
add SEED --seed
add PRECISION --precision
add DEVICE --device
add EVAL_SAMPLES --eval-samples
cmd+=("$@")

printf 'running:'
printf ' %q' "${cmd[@]}"
printf '\n'
if [[ -n "${DRY_RUN:-}" ]]; then
  exit 0
fi
exec "${cmd[@]}"
